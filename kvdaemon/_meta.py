# -*- test-case-name: tests.test_meta -*-
"""
memcached's meta commands: ``mg`` (get), ``ms`` (set), ``md`` (delete),
``ma`` (arithmetic), ``mn`` (no-op) and ``me`` (debug).

A meta request is a two-letter command, a key and single-letter flags,
some of them carrying a token (``T30``, ``Oabc``).  Replies, flag semantics
and error strings follow memcached 1.6.18 and were compared with it byte
for byte, quirks included: each command words the same parse error its own
way, and numeric tokens are read like C's ``strtol`` and then truncated to
the width of their field, so ``F4294967296`` stores flags 0.  One flag goes
beyond 1.6.18, which rejects it as invalid: ``E<cas>`` gives the item that
a command writes that CAS value instead of a new one, as later memcached
releases do.

Quiet mode (flag ``q``) hides only the replies that mean success (or a miss
for ``mg``), so a pipeline of quiet requests closed by ``mn`` sends back
only what went wrong.  As in memcached 1.6.18, the replies it hides are:

=======  ====================================================
command  replies hidden by ``q``
=======  ====================================================
``mg``   ``EN``
``ms``   ``HD``
``md``   ``HD``
``ma``   ``HD`` and ``VA`` when the delta was applied
=======  ====================================================

Errors are never hidden.
"""

from __future__ import annotations

import binascii
from typing import TYPE_CHECKING, Callable

from kvdaemon._store import (
    MARK_BINARY_KEY,
    MARK_STALE,
    MARK_WIN_SENT,
    MAX_KEY_LENGTH,
    Item,
    StoreResult,
    absolute_expiry,
)
from kvdaemon._text import BAD_FORMAT, ERROR, TOO_LARGE, DataRequest, ProtocolError, read_number

if TYPE_CHECKING:
    from kvdaemon._stats import Stats
    from kvdaemon._text import TextHandler

#: memcached rejects a meta request line with more tokens than this
#: (command, key, data length and flags all count).
MAX_REQUEST_TOKENS = 19

#: The longest ``O`` (opaque) token memcached echoes, the ``O`` included.
MAX_OPAQUE_LENGTH = 32

#: The largest ``ms`` data length memcached accepts (``INT_MAX - 2``).
MAX_DATA_LENGTH = 2**31 - 3

_DUPLICATE_FLAG = b"CLIENT_ERROR duplicate flag\r\n"
_INVALID_FLAG = b"CLIENT_ERROR invalid flag\r\n"
_BAD_TOKEN = b"CLIENT_ERROR bad token in command line format\r\n"
_BAD_KEY_ENCODING = b"CLIENT_ERROR error decoding key\r\n"
_BAD_MODE_LENGTH = b"CLIENT_ERROR incorrect length for M token\r\n"
_BAD_INITIAL = b"CLIENT_ERROR invalid numeric initial value\r\n"
_BAD_DELTA = b"CLIENT_ERROR invalid numeric delta value\r\n"
_OPAQUE_TOO_LONG = b"CLIENT_ERROR opaque token too long\r\n"
_INVALID_OR_DUPLICATE_FLAG = b"CLIENT_ERROR invalid or duplicate flag\r\n"
_GET_FLAGS_TOO_LONG = b"CLIENT_ERROR options flags are too long\r\n"
_FLAGS_TOO_LONG = b"CLIENT_ERROR options flags too long\r\n"
_INVALID_SET_MODE = b"CLIENT_ERROR invalid mode for ms M token\r\n"
_INVALID_ARITHMETIC_MODE = b"CLIENT_ERROR invalid mode for ma M token\r\n"
_NON_NUMERIC = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"

_SET_MODES = {
    None: "set",
    b"S": "set",
    b"E": "add",
    b"A": "append",
    b"P": "prepend",
    b"R": "replace",
}

#: ``ma`` modes: whether each one increments.
_ARITHMETIC_MODES = {None: True, b"I": True, b"+": True, b"D": False, b"-": False}

_SET_CODES = {
    StoreResult.STORED: b"HD",
    StoreResult.NOT_STORED: b"NS",
    StoreResult.EXISTS: b"EX",
    StoreResult.NOT_FOUND: b"NF",
    # memcached 1.6.18 replies NS when an append or prepend outgrows the
    # item size limit.
    StoreResult.TOO_LARGE: b"NS",
}

#: Flags that only ask for something in the reply; they are read from the
#: request tokens again when the reply is built.
_REPLY_FLAGS = frozenset(b"ksctfOPL")

_U32_MASK = 2**32 - 1
_U64 = 2**64

# -- tokens --


def parse_int32(text: bytes) -> int | None:
    """
    Read a number as memcached 1.6.18's ``safe_strtol`` does: any value of
    a C ``long``, truncated to a signed 32-bit integer.  Return ``None``
    when ``text`` is not a number.
    """
    value = read_number(text)
    if value is None or not -(2**63) <= value < 2**63:
        return None
    value &= _U32_MASK
    return value - 2**32 if value >= 2**31 else value


def parse_unsigned(text: bytes, bits: int) -> int | None:
    """
    Read a number as memcached's ``safe_strtoul`` (``bits=32``) and
    ``safe_strtoull`` (``bits=64``) do: C's ``strtoull``, which also
    accepts a minus sign, then a rejection of negative numbers only where
    they wrapped to 2**63 or more, then truncation to ``bits``.  Return
    ``None`` when ``text`` is not accepted.
    """
    value = read_number(text)
    if value is None or not -_U64 < value < _U64:
        return None
    if value < 0:
        value += _U64
        if value >= 2**63:
            return None
    return value & (2**bits - 1)


_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BASE64_VALUES = {symbol: index for index, symbol in enumerate(_BASE64_ALPHABET)}
_BASE64_VALUES[ord("=")] = 0
_NOT_BASE64 = bytes(byte for byte in range(256) if byte not in _BASE64_VALUES)


def decode_key(encoded: bytes) -> bytes | None:
    """
    Decode a base64 key (flag ``b``) the way memcached 1.6.18 does.

    Bytes outside the base64 alphabet are skipped; what remains must be a
    positive multiple of four symbols.  Decoding stops after the first
    group of four that contains padding, which may be one or two ``=``.
    Return ``None`` when the key cannot be decoded.
    """
    symbols = encoded.translate(None, _NOT_BASE64)
    if not symbols or len(symbols) % 4:
        return None
    if b"=" not in symbols:
        return binascii.a2b_base64(symbols)
    decoded = bytearray()
    for start in range(0, len(symbols), 4):
        group = symbols[start : start + 4]
        bits = 0
        for symbol in group:
            bits = bits << 6 | _BASE64_VALUES[symbol]
        padding = group.count(b"=")
        if padding > 2:
            return None
        decoded += bits.to_bytes(3, "big")[: 3 - padding]
        if padding:
            break
    return bytes(decoded)


def _key_flag(key: bytes, binary: bool) -> bytes:
    if binary:
        return b" k" + binascii.b2a_base64(key, newline=False) + b" b"
    return b" k" + key


def _ttl_flag(expires: int, now: int) -> bytes:
    if expires == 0:
        return b" t-1"
    # memcached prints the remaining time as an unsigned 32-bit number, so
    # an item that has already expired shows a huge TTL.
    return b" t%d" % ((expires - now) & _U32_MASK)


# -- the size fields of "me" --

#: Bytes that memcached 1.6 (64-bit) stores per item besides key and
#: value: the item header, the key's NUL, the value's CRLF and the CAS
#: value.  Non-zero client flags take 4 bytes more.
_ITEM_SIZE_OVERHEAD = 48 + 1 + 2 + 8


def _slab_class_sizes(smallest: int = 96, factor: float = 1.25, largest: int = 512 * 1024) -> tuple[int, ...]:
    # memcached 1.6's defaults: 48-byte minimum space for key and value
    # (-n 48) after the 48-byte header, growth factor 1.25 (-f), chunks up
    # to half of a 1 MiB slab page, sizes rounded up to 8 bytes.
    sizes = []
    size = smallest
    while size < largest / factor:
        size += -size % 8
        sizes.append(size)
        size = int(size * factor)
    sizes.append(largest)
    return tuple(sizes)


_SLAB_CLASS_SIZES = _slab_class_sizes()


def item_size(key: bytes, item: Item) -> int:
    """Return the bytes memcached 1.6 would use for ``item`` (``me``'s ``size``)."""
    return _ITEM_SIZE_OVERHEAD + len(key) + len(item.value) + (4 if item.flags else 0)


def slab_class(size: int) -> int:
    """
    Return the memcached slab class (``me``'s ``cls``) that an item of
    ``size`` bytes would use with default settings.  Items larger than the
    largest class are stored in chunks of that class.
    """
    for index, chunk_size in enumerate(_SLAB_CLASS_SIZES):
        if size <= chunk_size:
            return index + 1
    return len(_SLAB_CLASS_SIZES)


# -- flags --


class MetaFlags:
    """
    The flags of one meta request, read the way memcached 1.6.18 reads them
    before it executes the request.
    """

    __slots__ = (
        "key",
        "binary_key",
        "quiet",
        "value",
        "no_bump",
        "defer_bump",
        "ttl",
        "vivify",
        "vivify_ttl",
        "recache_ttl",
        "client_flags",
        "compare_cas",
        "new_cas",
        "mode",
        "delta",
        "initial",
        "invalidate",
    )

    def __init__(self, key: bytes) -> None:
        #: The key, base64-decoded when ``binary_key`` (flag ``b``) is set.
        self.key = key
        self.binary_key = False
        #: ``q``: hide the replies that mean success or a miss.
        self.quiet = False
        #: ``v``: return the value.
        self.value = False
        #: ``u``: leave the item's LRU position and access time alone.
        self.no_bump = False
        #: ``h`` or ``l``: bump the item only after the reply is built, so
        #: that it reports the access before this one.
        self.defer_bump = False
        #: ``T``: the new expiry time, in protocol form; ``None`` if absent.
        self.ttl: int | None = None
        #: ``N``: create the item on a miss, expiring after ``vivify_ttl``.
        self.vivify = False
        self.vivify_ttl = 0
        #: ``R``: win the right to recache when the item expires sooner.
        self.recache_ttl: int | None = None
        #: ``F``: the client flags to store.
        self.client_flags = 0
        #: ``C``: the CAS value the item must have; ``None`` if absent.
        self.compare_cas: int | None = None
        #: ``E``: the CAS value to give the written item; ``None`` if absent.
        self.new_cas: int | None = None
        #: ``M``: the mode character; ``None`` if absent.
        self.mode: bytes | None = None
        #: ``D`` and ``J``: the delta and the initial value for ``ma``.
        self.delta = 1
        self.initial = 0
        #: ``I``: invalidate (mark stale) instead of deleting or rejecting.
        self.invalidate = False


def parse_flags(parts: list[bytes], first: int) -> MetaFlags:
    """
    Read the flags ``parts[first:]`` of a meta request whose key is
    ``parts[1]``.

    :raise ProtocolError: with memcached's reply for the first repeated or
        unknown flag, or else for the last flag whose token is invalid.
    """
    flags = MetaFlags(parts[1])
    seen: set[int] = set()
    error = BAD_FORMAT
    failed = False
    for token in parts[first:]:
        code = token[0]
        if code >= 127 or code in seen:
            raise ProtocolError(_DUPLICATE_FLAG)
        seen.add(code)
        if code in _REPLY_FLAGS:
            continue
        flag = token[:1]
        argument = token[1:]
        if flag == b"v":
            flags.value = True
        elif flag == b"q":
            flags.quiet = True
        elif flag == b"T":
            flags.ttl = parse_int32(argument)
            if flags.ttl is None:
                error, failed = _BAD_TOKEN, True
        elif flag == b"N":
            flags.vivify = True
            value = parse_int32(argument)
            if value is None:
                error, failed = _BAD_TOKEN, True
            else:
                flags.vivify_ttl = value
        elif flag == b"R":
            flags.recache_ttl = parse_int32(argument)
            if flags.recache_ttl is None:
                error, failed = _BAD_TOKEN, True
        elif flag in (b"h", b"l"):
            flags.defer_bump = True
        elif flag == b"u":
            flags.no_bump = True
        elif flag == b"b":
            flags.binary_key = True
            key = decode_key(flags.key)
            if key is None:
                error, failed = _BAD_KEY_ENCODING, True
            else:
                flags.key = key
        elif flag == b"F":
            value = parse_unsigned(argument, 32)
            if value is None:
                # memcached keeps the previous error text for a bad F.
                failed = True
            else:
                flags.client_flags = value
        elif flag == b"C":
            flags.compare_cas = parse_unsigned(argument, 64)
            if flags.compare_cas is None:
                error, failed = _BAD_TOKEN, True
        elif flag == b"E":
            flags.new_cas = parse_unsigned(argument, 64)
            if flags.new_cas is None:
                error, failed = _BAD_TOKEN, True
        elif flag == b"M":
            if len(token) != 2:
                error, failed = _BAD_MODE_LENGTH, True
            else:
                flags.mode = argument
        elif flag == b"D":
            value = parse_unsigned(argument, 64)
            if value is None:
                error, failed = _BAD_DELTA, True
            else:
                flags.delta = value
        elif flag == b"J":
            value = parse_unsigned(argument, 64)
            if value is None:
                error, failed = _BAD_INITIAL, True
            else:
                flags.initial = value
        elif flag == b"I":
            flags.invalidate = True
        else:
            raise ProtocolError(_INVALID_FLAG)
    if failed:
        raise ProtocolError(error)
    return flags


class MetaCommands:
    """
    Executes meta requests for one :class:`kvdaemon._text.TextHandler`.

    Runs on the reactor thread only.
    """

    def __init__(self, handler: TextHandler) -> None:
        self.handler = handler
        self.connection = handler.connection
        self.store = handler.store

    @property
    def stats(self) -> Stats:
        # Read through the handler each time: "stats reset" gives the
        # handler a new Stats object.
        return self.handler.stats

    # -- shared steps --

    def _read_request(self, parts: list[bytes], too_long: bytes, bad_flags: bytes | None = None) -> MetaFlags:
        if len(parts) < 2:
            raise ProtocolError(ERROR)
        if len(parts[1]) > MAX_KEY_LENGTH:
            raise ProtocolError(BAD_FORMAT)
        if len(parts) > MAX_REQUEST_TOKENS:
            raise ProtocolError(too_long)
        if bad_flags is None:
            return parse_flags(parts, 2)
        try:
            return parse_flags(parts, 2)
        except ProtocolError:
            raise ProtocolError(bad_flags) from None

    def _echoed_flags(self, parts: list[bytes], flags: MetaFlags) -> bytes:
        """Return the ``O`` and ``k`` flags of a reply without an item, in request order."""
        echoed = []
        for token in parts[2:]:
            if token[0] == 0x4F:  # O
                if len(token) > MAX_OPAQUE_LENGTH:
                    raise ProtocolError(_OPAQUE_TOO_LONG)
                echoed.append(b" " + token)
            elif token[0] == 0x6B:  # k
                echoed.append(_key_flag(flags.key, flags.binary_key))
        return b"".join(echoed)

    def _vivify(self, flags: MetaFlags, value: bytes) -> Item | None:
        """Create the empty item that ``N`` requests on a miss; the reply's flags set its TTL."""
        store = self.store
        store.store("add", flags.key, value, 0, 0)
        if flags.new_cas is not None:
            store.modify(flags.key, cas=flags.new_cas)
            store.set_marks(flags.key, 0)
        return store.get(flags.key, bump=False)

    def _set_expiry(self, key: bytes, item: Item, expires: int) -> None:
        if expires != item.exptime:
            self.store.modify(key, expires=expires)

    def _expiry(self, ttl: int) -> int:
        return absolute_expiry(ttl, self.store.clock())

    # -- mg --

    def get(self, parts: list[bytes]) -> None:
        """``mg <key> <flags>*``: fetch an item, or parts of what is known about it."""
        flags = self._read_request(parts, _GET_FLAGS_TOO_LONG)
        store = self.store
        key = flags.key
        if flags.defer_bump:
            item = store.get(key, bump=False)
        else:
            item = store.get(key, bump=not flags.no_bump)
        created = False
        if item is None and flags.vivify:
            item = self._vivify(flags, b"")
            created = item is not None
        if item is None:
            self.stats.cmd_get += 1
            self.stats.get_misses += 1
            echoed = self._echoed_flags(parts, flags)
            if not flags.quiet:
                self.connection.write(b"EN" + echoed + b"\r\n")
            return
        self._send_item(parts, flags, item, created)

    def _send_item(self, parts: list[bytes], flags: MetaFlags, item: Item, created: bool) -> None:
        store = self.store
        key = flags.key
        marks = store.marks(key)
        line, expires, won = self._item_flags(parts, flags, item, marks, created)

        # Z comes before X, and W is never sent together with Z, as in
        # memcached.
        if marks & MARK_WIN_SENT:
            line.append(b" Z")
        if marks & MARK_STALE:
            line.append(b" X")
            if not marks & MARK_WIN_SENT:
                won = True
        if won:
            line.append(b" W")
            store.set_marks(key, marks | MARK_WIN_SENT)
        line.append(b"\r\n")

        self._set_expiry(key, item, expires)
        if (flags.defer_bump or created) and not flags.no_bump:
            store.get(key)
        if flags.ttl is not None:
            self.stats.cmd_touch += 1
            self.stats.touch_hits += 1
        else:
            self.stats.cmd_get += 1
            self.stats.get_hits += 1

        if flags.value:
            self.connection.write_sequence([b"".join(line), item.value, b"\r\n"])
        else:
            self.connection.write(b"".join(line))

    def _item_flags(
        self, parts: list[bytes], flags: MetaFlags, item: Item, marks: int, created: bool
    ) -> tuple[list[bytes], int, bool]:
        """
        Build the start of an ``mg`` hit's reply line, flag by flag.

        :return: the line's parts, the item's new expiry time and whether
            the request won the right to recache the item.
        """
        key = flags.key
        now = int(self.store.clock())
        expires = item.exptime
        won = False
        line = [b"VA %d" % len(item.value) if flags.value else b"HD"]
        # Flags act in request order, so "t T30" reports the TTL from
        # before the update and "T30 t" the one after it.
        for token in parts[2:]:
            flag = token[:1]
            if flag == b"s":
                line.append(b" s%d" % len(item.value))
            elif flag == b"t":
                line.append(_ttl_flag(expires, now))
            elif flag == b"c":
                line.append(b" c%d" % item.cas)
            elif flag == b"f":
                line.append(b" f%d" % item.flags)
            elif flag == b"k":
                line.append(_key_flag(key, bool(marks & MARK_BINARY_KEY)))
            elif flag == b"O":
                if len(token) > MAX_OPAQUE_LENGTH:
                    # memcached has already applied the flags before this one.
                    self._set_expiry(key, item, expires)
                    raise ProtocolError(_OPAQUE_TOO_LONG)
                line.append(b" " + token)
            elif flag == b"h":
                line.append(b" h1" if item.fetched else b" h0")
            elif flag == b"l":
                line.append(b" l%d" % (now - item.last_access))
            elif flag == b"T":
                expires = self._expiry(flags.ttl)
            elif flag == b"N":
                if created:
                    expires = self._expiry(flags.vivify_ttl)
                    won = True
            elif flag == b"R":
                recache_before = self._expiry(flags.recache_ttl)
                if not marks & MARK_WIN_SENT and not created and expires != 0 and expires < recache_before:
                    won = True
        return line, expires, won

    # -- ms --

    def set(self, parts: list[bytes]) -> DataRequest | None:
        """``ms <key> <datalen> <flags>*``: store the data block that follows."""
        if len(parts) < 2:
            raise ProtocolError(ERROR)
        if len(parts[1]) > MAX_KEY_LENGTH or len(parts) == 2:
            raise ProtocolError(BAD_FORMAT)
        if len(parts) > MAX_REQUEST_TOKENS:
            raise ProtocolError(_FLAGS_TOO_LONG)
        length = parse_int32(parts[2])
        if length is None or not 0 <= length <= MAX_DATA_LENGTH:
            raise ProtocolError(BAD_FORMAT)

        # From here on memcached has read the data length, so it skips the
        # data block of a rejected request.
        try:
            flags = parse_flags(parts, 3)
            mode = self._set_mode(parts, flags)
        except ProtocolError:
            self.handler.swallow(length + 2)
            raise
        if not self.store.fits(flags.key, length, flags.client_flags):
            self.stats.store_too_large += 1
            # memcached drops the old item in every mode, so that a failed
            # write never leaves older data readable.
            self.store.delete(flags.key)
            self.handler.swallow(length + 2)
            raise ProtocolError(TOO_LARGE)

        def receive(value: bytes) -> None:
            self._finish_set(parts, flags, mode, value)

        return length, receive

    def _set_mode(self, parts: list[bytes], flags: MetaFlags) -> str:
        # memcached checks the mode after the opaque length and reports the
        # mode error if both are wrong.
        opaque_too_long = any(token[0] == 0x4F and len(token) > MAX_OPAQUE_LENGTH for token in parts[3:])
        mode = _SET_MODES.get(flags.mode)
        if mode is None:
            raise ProtocolError(_INVALID_SET_MODE)
        if opaque_too_long:
            raise ProtocolError(_OPAQUE_TOO_LONG)
        return mode

    def _finish_set(self, parts: list[bytes], flags: MetaFlags, mode: str, value: bytes) -> None:
        self.stats.cmd_set += 1
        result, cas = self._store_value(flags, mode, value)
        if result == StoreResult.STORED and flags.quiet:
            return
        line = [_SET_CODES[result]]
        for token in parts[3:]:
            flag = token[:1]
            if flag == b"O":
                line.append(b" " + token)
            elif flag == b"k":
                line.append(_key_flag(flags.key, flags.binary_key))
            elif flag == b"c":
                line.append(b" c%d" % cas)
        line.append(b"\r\n")
        self.connection.write(b"".join(line))

    def _store_value(self, flags: MetaFlags, mode: str, value: bytes) -> tuple[str, int]:
        """
        Store ``value`` as requested by an ``ms`` request's ``flags`` and ``mode``.

        :return: a :class:`StoreResult` name and the CAS value (0 unless
            stored).
        """
        store = self.store
        key = flags.key
        compare = flags.compare_cas
        exptime = flags.ttl or 0
        marks = MARK_BINARY_KEY if flags.binary_key else 0
        stale_expiry = None

        if compare is not None and mode in ("set", "replace"):
            mode = "cas"
            old = store.get(key, bump=False) if flags.invalidate else None
            if old is not None and compare < old.cas:
                # With I, an older CAS still stores the value but marks it
                # stale, keeping the old item's expiry and win token.
                mode = "set"
                exptime = 0
                stale_expiry = old.exptime
                marks |= MARK_STALE | (store.marks(key) & MARK_WIN_SENT)
        elif compare and mode in ("append", "prepend"):
            # memcached compares for these modes only when C is not 0.
            old = store.get(key, bump=False)
            if old is not None and old.cas != compare:
                return StoreResult.EXISTS, 0

        result, cas = store.store(mode, key, value, flags.client_flags, exptime, compare or 0)
        if mode == "cas":
            self.stats.count_cas(result)
        if result != StoreResult.STORED:
            return result, 0

        if stale_expiry is not None or flags.new_cas is not None:
            store.modify(key, expires=stale_expiry, cas=flags.new_cas)
            if flags.new_cas is not None:
                cas = flags.new_cas
        store.set_marks(key, marks)
        return result, cas

    # -- md --

    def delete(self, parts: list[bytes]) -> None:
        """``md <key> <flags>*``: delete an item, or with ``I`` mark it stale."""
        flags = self._read_request(parts, _FLAGS_TOO_LONG, _INVALID_OR_DUPLICATE_FLAG)
        echoed = self._echoed_flags(parts, flags)
        store = self.store
        key = flags.key
        item = store.get(key, bump=False)
        if item is None:
            self.stats.delete_misses += 1
            code = b"NF"
        elif flags.compare_cas is not None and item.cas != flags.compare_cas:
            self.stats.delete_misses += 1
            code = b"EX"
        elif flags.invalidate:
            self._invalidate(flags, item)
            code = b"HD"
        else:
            store.delete(key)
            self.stats.delete_hits += 1
            code = b"HD"
        if code == b"HD" and flags.quiet:
            return
        self.connection.write(code + echoed + b"\r\n")

    def _invalidate(self, flags: MetaFlags, item: Item) -> None:
        # A stale item gets a new CAS value and loses its win token, so
        # that the next mg wins the right to recache it.
        store = self.store
        expires = item.exptime if flags.ttl is None else self._expiry(flags.ttl)
        cas = store.new_cas() if flags.new_cas is None else flags.new_cas
        marks = store.marks(flags.key) & MARK_BINARY_KEY | MARK_STALE
        if store.modify(flags.key, expires=expires, cas=cas) is not None:
            store.set_marks(flags.key, marks)

    # -- ma --

    def arithmetic(self, parts: list[bytes]) -> None:
        """``ma <key> <flags>*``: increment or decrement a decimal value."""
        flags = self._read_request(parts, _FLAGS_TOO_LONG, _INVALID_OR_DUPLICATE_FLAG)
        increment = _ARITHMETIC_MODES.get(flags.mode)
        if increment is None:
            raise ProtocolError(_INVALID_ARITHMETIC_MODE)
        store = self.store
        key = flags.key
        marks = store.marks(key)
        old = store.get(key, bump=False) if marks else None
        old_length = len(old.value) if old is not None else 0

        result, number, _ = store.incr(key, flags.delta, increment, flags.compare_cas or 0)
        name = "incr" if increment else "decr"
        if result == StoreResult.NON_NUMERIC:
            raise ProtocolError(_NON_NUMERIC)
        if result == StoreResult.STORED:
            self._count(name + "_hits")
            if flags.new_cas is not None:
                store.modify(key, cas=flags.new_cas)
            # memcached rewrites a number that still fits in place and so
            # keeps the item's marks, but puts a longer one in a new item.
            if marks and len(b"%d" % number) <= old_length:
                store.set_marks(key, marks)
            else:
                store.set_marks(key, 0)
            item = store.get(key, bump=False)
            self._send_number(parts, flags, item, number, created=False)
        elif result == StoreResult.NOT_FOUND and flags.vivify:
            number = flags.initial
            item = self._vivify(flags, b"%d" % number)
            self._send_number(parts, flags, item, number, created=True)
        else:
            if result == StoreResult.NOT_FOUND:
                self._count(name + "_misses")
                code = b"NF"
            else:
                code = b"EX"
            self.connection.write(code + self._echoed_flags(parts, flags) + b"\r\n")

    def _count(self, counter: str) -> None:
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)

    def _send_number(self, parts: list[bytes], flags: MetaFlags, item: Item | None, number: int, created: bool) -> None:
        if item is None:
            # Only a store that evicts the item it has just written gets
            # here.  memcached's protocol.txt gives NS for an item that ma
            # failed to create.
            self.connection.write(b"NS" + self._echoed_flags(parts, flags) + b"\r\n")
            return

        key = flags.key
        digits = b"%d" % number
        now = int(self.store.clock())
        expires = item.exptime
        line = [b"VA %d" % len(digits) if flags.value else b"HD"]
        for token in parts[2:]:
            flag = token[:1]
            if flag == b"c":
                line.append(b" c%d" % item.cas)
            elif flag == b"t":
                line.append(_ttl_flag(expires, now))
            elif flag == b"T":
                expires = self._expiry(flags.ttl)
            elif flag == b"N":
                if created:
                    expires = self._expiry(flags.vivify_ttl)
            elif flag == b"O":
                if len(token) > MAX_OPAQUE_LENGTH:
                    self._set_expiry(key, item, expires)
                    raise ProtocolError(_OPAQUE_TOO_LONG)
                line.append(b" " + token)
            elif flag == b"k":
                line.append(_key_flag(key, flags.binary_key))
        self._set_expiry(key, item, expires)

        # An item created by N is reported even in quiet mode.
        if flags.quiet and not created:
            return
        line.append(b"\r\n")
        if flags.value:
            line.append(digits + b"\r\n")
        self.connection.write(b"".join(line))

    # -- mn and me --

    def noop(self, parts: list[bytes]) -> None:
        """``mn``: reply ``MN``, which marks the end of a pipeline of quiet requests."""
        self.connection.write(b"MN\r\n")

    def debug(self, parts: list[bytes]) -> None:
        """
        ``me <key> [b]``: describe an item in memcached's format.

        ``exp`` is the remaining TTL negated, as memcached 1.6.18 prints
        it, and ``la`` the seconds since the last access.  ``cls`` and
        ``size`` are the slab class and the bytes that memcached would use
        for the item.
        """
        if len(parts) < 2 or len(parts[1]) > MAX_KEY_LENGTH:
            raise ProtocolError(BAD_FORMAT)
        key = parts[1]
        if len(parts) > 2 and parts[2] == b"b":
            key = decode_key(key)
            if key is None:
                raise ProtocolError(BAD_FORMAT)

        store = self.store
        item = store.get(key, bump=False)
        if item is None:
            self.connection.write(b"EN\r\n")
            return

        now = int(store.clock())
        if store.marks(key) & MARK_BINARY_KEY:
            shown_key = binascii.b2a_base64(key, newline=False)
        else:
            shown_key = key
        size = item_size(key, item)
        self.connection.write(
            b"ME %s exp=%d la=%d cas=%d fetch=%s cls=%d size=%d\r\n"
            % (
                shown_key,
                -1 if item.exptime == 0 else now - item.exptime,
                now - item.last_access,
                item.cas,
                b"yes" if item.fetched else b"no",
                slab_class(size),
                size,
            )
        )


def text_commands(handler: TextHandler) -> dict[bytes, Callable[[list[bytes]], DataRequest | None]]:
    """Return the meta commands for ``handler``'s connection, by command name."""
    commands = MetaCommands(handler)
    return {
        b"mg": commands.get,
        b"ms": commands.set,
        b"md": commands.delete,
        b"ma": commands.arithmetic,
        b"mn": commands.noop,
        b"me": commands.debug,
    }
