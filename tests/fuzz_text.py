"""
Hypothesis strategies for valid text and meta protocol requests, the
corruptions the fuzz tests apply to them, and an oracle that splits a byte
stream into requests the way memcached 1.6 frames them.

The oracle (:func:`frame_text`) is written from memcached's protocol rules,
not with kvdaemon's parser.  For each request it predicts whether the
server must reject it (and with which error line), close the connection,
or execute it.  For a request that the server executes, it also gives the
request in canonical form (single spaces, numbers in plain decimal,
ignored tokens dropped), which the tests send to a twin server to obtain
the normal reply.
"""

from __future__ import annotations

import base64
import re
from typing import NamedTuple

import attrs
from hypothesis import strategies as st

from tests.fuzz_support import ITEM_OVERHEAD, KEYS, MAX_ITEM_SIZE, MAX_KEY_LENGTH, VALUE_ALPHABET

# -- numbers, as memcached's safe_strto* functions read them --

#: C whitespace, an optional sign and decimal digits, then the end of the
#: token or a whitespace byte, after which anything is ignored.
_C_NUMBER = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-9]+)(?:[ \t\n\v\f\r].*)?\Z", re.DOTALL)

_I32 = (-(2**31), 2**31 - 1)
_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1
#: The largest data length memcached accepts (INT_MAX - 2).
MAX_DATA_LENGTH = 2**31 - 3


def c_number(token: bytes) -> int | None:
    """Return the number a token is, read like C's ``strtol``, or ``None``."""
    match = _C_NUMBER.match(token)
    if match is None:
        return None
    value = int(match.group(2))
    return -value if match.group(1) == b"-" else value


def c_unsigned(token: bytes) -> int | None:
    """
    Return a token read by memcached's ``safe_strtoull``: C's ``strtoull``
    (a minus sign negates modulo 2**64), rejected when a negative number
    wrapped to 2**63 or more.
    """
    value = c_number(token)
    if value is None or not -(2**64) < value < 2**64:
        return None
    if value < 0:
        value += 2**64
        if value >= 2**63:
            return None
    return value


def text_unsigned(token: bytes, maximum: int) -> int | None:
    """
    A classic command's unsigned field.  kvdaemon rejects values above
    ``maximum``, where memcached 1.6.18 truncates flags to 32 bits.
    """
    value = c_unsigned(token)
    return value if value is not None and value <= maximum else None


def text_signed32(token: bytes) -> int | None:
    """
    A classic command's signed 32-bit field (expiry time, data length).
    kvdaemon rejects values out of range, where memcached 1.6.18
    truncates them.
    """
    value = c_number(token)
    return value if value is not None and _I32[0] <= value <= _I32[1] else None


def meta_signed32(token: bytes) -> int | None:
    """A meta signed field: any C ``long``, truncated to 32 bits as memcached 1.6.18 does."""
    value = c_number(token)
    if value is None or not -(2**63) <= value < 2**63:
        return None
    value &= _U32_MAX
    return value - 2**32 if value > _I32[1] else value


def meta_unsigned(token: bytes, bits: int) -> int | None:
    """A meta unsigned field: read like :func:`c_unsigned`, then truncated to ``bits``."""
    value = c_unsigned(token)
    return None if value is None else value & (2**bits - 1)


_BASE64_SYMBOLS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def decoded_key_length(key: bytes) -> int | None:
    """
    Return the length of a base64 key (meta flag ``b``) as memcached
    1.6.18 decodes it, or ``None`` when it rejects the key.  It skips
    bytes outside the alphabet, needs a positive multiple of four symbols,
    and stops after the first group of four with one or two ``=``.
    """
    symbols = bytes(byte for byte in key if byte in _BASE64_SYMBOLS)
    if not symbols or len(symbols) % 4:
        return None
    length = 0
    for start in range(0, len(symbols), 4):
        padding = symbols[start : start + 4].count(b"=")
        if padding > 2:
            return None
        length += 3 - padding
        if padding:
            break
    return length


def item_fits(key: bytes, length: int, flags: int) -> bool:
    """Whether an item fits the fuzz servers' item size limit."""
    return len(key) + length + ITEM_OVERHEAD + (4 if flags else 0) <= MAX_ITEM_SIZE


# -- requests and their strategies --


@attrs.define
class Field:
    """
    One token of a request line.  ``kind`` names how the server reads the
    token and which corruptions apply.  The kinds are ``command``, ``key``,
    ``u32``, ``i32``, ``u64``, ``length`` (the data block's length),
    ``bool`` (rget's 0 or 1), ``noreply``, ``flag`` (a meta flag without a
    number) and ``number_flag`` (a meta flag followed by a number).
    """

    kind: str
    value: bytes


@attrs.define
class TextRequest:
    """A request line's fields and its data block (without the CRLF), if any."""

    fields: list[Field]
    data: bytes | None = None

    def encode(self) -> bytes:
        line = b" ".join(field.value for field in self.fields) + b"\r\n"
        if self.data is None:
            return line
        return line + self.data + b"\r\n"


def _field(kind: str, value: bytes) -> Field:
    return Field(kind, value)


keys = st.sampled_from(KEYS)
values = st.lists(st.sampled_from(list(VALUE_ALPHABET)), max_size=16).map(bytes)
client_flags = st.sampled_from([0, 1, 7, 2**32 - 1])
exptimes = st.sampled_from([0, 100, 3600, -1])
deltas = st.sampled_from([0, 1, 5, 2**64 - 1])
cas_values = st.integers(0, 12)
noreply = st.booleans()
opaques = st.lists(st.sampled_from(list(b"ABC0123456789")), min_size=0, max_size=8).map(bytes)


def _with_noreply(fields: list[Field], quiet: bool) -> list[Field]:
    return fields + [_field("noreply", b"noreply")] if quiet else fields


@st.composite
def storage_requests(draw: st.DrawFn) -> TextRequest:
    """set, add, replace, append, prepend and cas with a data block."""
    command = draw(st.sampled_from([b"set", b"add", b"replace", b"append", b"prepend", b"cas"]))
    data = draw(values)
    fields = [
        _field("command", command),
        _field("key", draw(keys)),
        _field("u32", b"%d" % draw(client_flags)),
        _field("i32", b"%d" % draw(exptimes)),
        _field("length", b"%d" % len(data)),
    ]
    if command == b"cas":
        fields.append(_field("u64", b"%d" % draw(cas_values)))
    return TextRequest(_with_noreply(fields, draw(noreply)), data)


@st.composite
def retrieval_requests(draw: st.DrawFn) -> TextRequest:
    """get, gets, gat and gats."""
    command = draw(st.sampled_from([b"get", b"gets", b"gat", b"gats"]))
    fields = [_field("command", command)]
    if command in (b"gat", b"gats"):
        fields.append(_field("i32", b"%d" % draw(exptimes)))
    fields += [_field("key", key) for key in draw(st.lists(keys, min_size=1, max_size=3))]
    return TextRequest(fields)


@st.composite
def item_requests(draw: st.DrawFn) -> TextRequest:
    """delete, incr, decr and touch."""
    command = draw(st.sampled_from([b"delete", b"incr", b"decr", b"touch"]))
    fields = [_field("command", command), _field("key", draw(keys))]
    if command in (b"incr", b"decr"):
        fields.append(_field("u64", b"%d" % draw(deltas)))
    elif command == b"touch":
        fields.append(_field("i32", b"%d" % draw(exptimes)))
    elif draw(st.booleans()):
        # The old "delete <key> 0" form.
        fields.append(_field("bool", b"0"))
    return TextRequest(_with_noreply(fields, draw(noreply)))


@st.composite
def range_requests(draw: st.DrawFn) -> TextRequest:
    """rget and rdelete."""
    command = draw(st.sampled_from([b"rget", b"rget", b"rdelete"]))
    fields = [
        _field("command", command),
        _field("bool", draw(st.sampled_from([b"0", b"1"]))),
        _field("bool", draw(st.sampled_from([b"0", b"1"]))),
        _field("u32", b"%d" % draw(st.integers(0, 4))),
        _field("key", draw(keys)),
    ]
    if draw(st.booleans()):
        fields.append(_field("key", draw(keys)))
    quiet = command == b"rdelete" and draw(noreply)
    return TextRequest(_with_noreply(fields, quiet))


def _meta_flag(letter: bytes, number: int | None = None) -> Field:
    if number is None:
        return _field("flag", letter)
    return _field("number_flag", letter + b"%d" % number)


#: Flags each meta command is generated with: a letter and a strategy for
#: its number, or None for a flag without one.
_META_FLAGS = {
    b"mg": {
        b"v": None, b"k": None, b"s": None, b"f": None, b"t": None, b"c": None, b"q": None,
        b"h": None, b"l": None, b"u": None, b"T": exptimes, b"N": exptimes, b"O": opaques,
    },
    b"ms": {
        b"T": exptimes, b"F": client_flags, b"q": None, b"k": None, b"c": None, b"I": None,
        b"C": cas_values, b"O": opaques, b"M": st.sampled_from([b"S", b"E", b"A", b"P", b"R"]),
    },
    b"md": {b"q": None, b"k": None, b"I": None, b"C": cas_values, b"T": exptimes, b"O": opaques},
    b"ma": {
        b"v": None, b"q": None, b"k": None, b"t": None, b"c": None, b"N": exptimes,
        b"J": st.sampled_from([0, 10, 2**64 - 1]), b"D": deltas, b"T": exptimes, b"O": opaques,
        b"M": st.sampled_from([b"I", b"D", b"+", b"-"]),
    },
}  # fmt: skip


@st.composite
def meta_requests(draw: st.DrawFn) -> TextRequest:
    """mg, ms, md, ma and mn with a few flags each."""
    command = draw(st.sampled_from([b"mg", b"ms", b"md", b"ma", b"mn"]))
    fields = [_field("command", command)]
    if command == b"mn":
        return TextRequest(fields)

    available = _META_FLAGS[command]
    letters = draw(st.lists(st.sampled_from(sorted(available) + [b"b"]), unique=True, max_size=5))
    key = draw(keys)
    if b"b" in letters:
        key = base64.b64encode(key)
    fields.append(_field("key", key))
    data = None
    if command == b"ms":
        data = draw(values)
        fields.append(_field("length", b"%d" % len(data)))

    for letter in letters:
        argument = available.get(letter)
        if argument is None:
            fields.append(_meta_flag(letter))
        elif letter in (b"O", b"M"):
            fields.append(_field("flag", letter + draw(argument)))
        else:
            fields.append(_meta_flag(letter, draw(argument)))
    return TextRequest(fields, data)


classic_requests = st.one_of(storage_requests(), retrieval_requests(), item_requests(), range_requests())
text_requests = st.one_of(classic_requests, meta_requests())

# -- corruptions --

#: Replacements for a number of any field: junk, signs, and forms that C's
#: strtol reads as a number although they look odd.
JUNK_NUMBERS = [
    b"", b"abc", b"1x", b"x1", b"-", b"+", b"0x10", b"1.5", b"-1", b"-0", b"+7", b"007",
    b"\t5", b"5\t", b"5\tjunk", b"5\r", b"\x00", b"99999999999999999999999",
]  # fmt: skip

#: Replacements at the edges of each kind of field's range.
BOUNDARY_NUMBERS = {
    "u32": [b"4294967295", b"4294967296", b"-4294967295"],
    "i32": [b"2147483647", b"2147483648", b"-2147483648", b"-2147483649", b"4294967301"],
    "u64": [b"18446744073709551615", b"18446744073709551616", b"-18446744073709551615", b"9223372036854775808"],
    "length": [b"2147483645", b"2147483646", b"4294967301", b"-2147483648"],
    "bool": [b"1", b"2", b"00", b"01"],
    "number_flag": [
        b"2147483648", b"4294967301", b"4294967296", b"18446744073709551616",
        b"-18446744073709551615", b"9223372036854775808", b"-9223372036854775809",
    ],
}  # fmt: skip

#: Letters a meta flag may be swapped to: flags memcached accepts, letters
#: it rejects, and bytes above 126, which it reports as duplicate flags.
SWAP_LETTERS = [bytes([letter]) for letter in b"vkstcfqhlubIOTNRFCEDJMPLZxyWS!"] + [b"\x7f", b"\x80", b"\xc3", b"\xff"]

#: Key bytes that change how a line is split, besides any byte at all.
_SPECIAL_BYTES = [0x20, 0x0A, 0x0D, 0x00, 0x09, 0x80, 0xFF]

_NUMERIC_KINDS = ("u32", "i32", "u64", "length", "bool", "number_flag")


@st.composite
def corrupt(draw: st.DrawFn, request: TextRequest) -> bytes:
    """Return ``request`` encoded with exactly one field corrupted."""
    fields = [attrs.evolve(field) for field in request.fields]
    data = request.data
    choices = ["drop token", "extra token"]
    if any(field.kind == "key" for field in fields):
        choices += ["key byte", "key byte", "long key"]
    if any(field.kind in _NUMERIC_KINDS for field in fields):
        choices += ["number", "number"]
    if data is not None:
        choices += ["length", "length"]
    if any(field.kind in ("flag", "number_flag") for field in fields):
        choices += ["flag letter", "flag letter", "long flag"]
    choice = draw(st.sampled_from(choices))

    if choice == "key byte":
        field = draw(st.sampled_from([field for field in fields if field.kind == "key"]))
        index = draw(st.integers(0, len(field.value) - 1))
        byte = draw(st.one_of(st.sampled_from(_SPECIAL_BYTES), st.integers(0, 255)))
        field.value = field.value[:index] + bytes([byte]) + field.value[index + 1 :]
    elif choice == "long key":
        field = draw(st.sampled_from([field for field in fields if field.kind == "key"]))
        field.value = b"K" * draw(st.sampled_from([MAX_KEY_LENGTH, MAX_KEY_LENGTH + 1, 400]))
    elif choice == "number":
        field = draw(st.sampled_from([field for field in fields if field.kind in _NUMERIC_KINDS]))
        junk = draw(st.sampled_from(JUNK_NUMBERS + BOUNDARY_NUMBERS[field.kind] * 3))
        field.value = field.value[:1] + junk if field.kind == "number_flag" else junk
    elif choice == "flag letter":
        field = draw(st.sampled_from([field for field in fields if field.kind in ("flag", "number_flag")]))
        field.value = draw(st.sampled_from(SWAP_LETTERS)) + field.value[1:]
    elif choice == "long flag":
        # memcached echoes an opaque (O) token of up to 32 bytes.
        field = draw(st.sampled_from([field for field in fields if field.kind in ("flag", "number_flag")]))
        field.value = (field.value + b"9" * 40)[: draw(st.sampled_from([32, 33, 40]))]
    elif choice == "drop token":
        del fields[draw(st.integers(0, len(fields) - 1))]
    elif choice == "extra token":
        fields.insert(draw(st.integers(1, len(fields))), _field("junk", draw(st.sampled_from([b"noreply", b"0", b"X"]))))
    else:
        assert data is not None
        change = draw(st.sampled_from(["length field", "shorter data", "longer data", "trailer"]))
        if change == "shorter data" and not data:
            change = "longer data"
        length_field = next(field for field in fields if field.kind == "length")
        if change == "length field":
            length = len(data) + draw(st.sampled_from([-3, -2, -1, 1, 2, 3, 7, MAX_ITEM_SIZE // 2, MAX_ITEM_SIZE]))
            length_field.value = b"%d" % length
        elif change == "shorter data":
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif change == "longer data":
            data += draw(values.filter(bool))
        else:
            line = b" ".join(field.value for field in fields)
            trailer = draw(st.sampled_from([b"\n", b"\r", b"XY", b"\r\r", b"\n\n"]))
            return line + b"\r\n" + data + trailer
    return TextRequest(fields, data).encode()


# -- the oracle --


class Unit(NamedTuple):
    """
    One request of a stream as memcached frames it.

    ``outcome`` is ``execute``, ``reject`` or ``close``.  A rejected
    request gets the error line ``line``, or a line of class ``error`` when
    ``line`` is ``None``, or no reply at all when it has ``silent`` set
    because the request used noreply.  ``twin`` is the request the twin
    server gets: the canonical form of an executed request, the raw bytes
    otherwise.
    """

    raw: bytes
    outcome: str
    twin: bytes
    error: str | None = None
    silent: bool = False
    #: Whether an executed request may legitimately reply with an error
    #: line (a counter on a non-numeric value).
    may_error: bool = False
    #: Whether the request deletes a key range.
    destructive: bool = False
    line: bytes | None = None


class Framing(NamedTuple):
    """A stream split into units, and the bytes left waiting for more input."""

    units: list[Unit]
    pending: bytes
    closed: bool


_STORAGE = {b"set": 5, b"add": 5, b"replace": 5, b"append": 5, b"prepend": 5, b"cas": 6}
#: Commands that exist but that the generated streams never contain, so
#: the oracle does not predict their replies.
_UNMODELLED = {b"version", b"verbosity", b"stats", b"flush_all", b"quit", b"lru_crawler", b"me"}
MAX_LINE_LENGTH = 2048
MAX_META_TOKENS = 19

#: Meta flags with a numeric token, and the function that reads it.  Flags
#: other than these, ``M``, ``b`` and ``_META_FREE_FLAGS`` are invalid.
_META_NUMBER_FLAGS = {
    ord("T"): meta_signed32,
    ord("N"): meta_signed32,
    ord("R"): meta_signed32,
    ord("F"): lambda token: meta_unsigned(token, 32),
    ord("C"): lambda token: meta_unsigned(token, 64),
    ord("E"): lambda token: meta_unsigned(token, 64),
    ord("D"): lambda token: meta_unsigned(token, 64),
    ord("J"): lambda token: meta_unsigned(token, 64),
}
_META_FREE_FLAGS = frozenset(b"kstcfOPLvqhluI")
_MAX_OPAQUE_LENGTH = 32
_SET_MODES = frozenset(b"SEAPR")
_ARITHMETIC_MODES = frozenset(b"ID+-")


ERROR = b"ERROR\r\n"
BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
BAD_CHUNK = b"CLIENT_ERROR bad data chunk\r\n"
TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
INVALID_EXPTIME = b"CLIENT_ERROR invalid exptime argument\r\n"
INVALID_DELTA = b"CLIENT_ERROR invalid numeric delta argument\r\n"
DELETE_USAGE = b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"
#: A meta command's parse error: the oracle checks the class of the error
#: line only, because memcached 1.6.18 words the same error differently
#: from one meta command to the next.
META_ERROR = "CLIENT_ERROR"
CLOSE = "close"


class _Rejected(Exception):
    """
    A request the server rejects with ``reply``: the exact error line, or
    the class of the line as a string, or :data:`CLOSE`.  The server then
    skips ``swallow`` bytes of data block.
    """

    def __init__(self, reply: bytes | str, swallow: int = 0) -> None:
        super().__init__(reply)
        self.reply = reply
        self.swallow = swallow


def frame_text(stream: bytes) -> Framing:
    """Split ``stream`` into the units memcached reads from it."""
    units = []
    offset = 0
    while offset < len(stream):
        eol = stream.find(b"\n", offset)
        if eol < 0:
            rest = stream[offset:]
            if len(rest) > MAX_LINE_LENGTH and not rest.lstrip(b" ").startswith((b"get ", b"gets ")):
                units.append(Unit(rest, "close", rest))
                return Framing(units, b"", True)
            break
        unit, end = _frame_line(stream, offset, eol)
        if unit is None:
            break
        units.append(unit)
        offset = end
        if unit.outcome == "close":
            return Framing(units, b"", True)
    return Framing(units, stream[offset:], False)


def _tokens(line: bytes) -> list[bytes]:
    if line.endswith(b"\r"):
        line = line[:-1]
    if b"\0" in line:
        line = line[: line.index(b"\0")]
    return [token for token in line.split(b" ") if token]


def _frame_line(stream: bytes, offset: int, eol: int) -> tuple[Unit | None, int]:
    """
    Frame the request whose line ends at ``eol``, and return it with the
    offset after it, or ``(None, offset)`` when its data block is incomplete.
    """
    line_end = eol + 1
    tokens = _tokens(stream[offset:eol])
    command = tokens[0] if tokens else b""
    line = stream[offset:line_end]
    quiet = False
    try:
        if command in _STORAGE or command == b"ms":
            if command == b"ms":
                parsed = _parse_meta_set(tokens)
            else:
                parsed = _parse_storage(tokens)
            canonical_line, length, key, flags, quiet = parsed
            return _frame_data(stream, offset, line_end, canonical_line, length, key, flags, command, quiet)
        canonical, quiet, may_error, destructive = _parse_line(tokens)
    except _Rejected as rejection:
        if rejection.reply == CLOSE:
            return Unit(line, "close", line), line_end
        end = min(line_end + rejection.swallow, len(stream))
        raw = stream[offset:end]
        silent = rejection.reply != ERROR and bool(tokens) and _reply_suppressed(tokens)
        return _rejected_unit(raw, rejection.reply, silent), end
    return Unit(line, "execute", canonical, may_error=may_error, destructive=destructive), line_end


def _rejected_unit(raw: bytes, reply: bytes | str, silent: bool) -> Unit:
    if isinstance(reply, str):
        return Unit(raw, "reject", raw, reply, silent)
    return Unit(raw, "reject", raw, reply.split(b" ")[0].rstrip().decode(), silent, line=reply)


def _reply_suppressed(tokens: list[bytes]) -> bool:
    # A classic command whose last token is "noreply" hides its errors,
    # except the ERROR for a wrong number of tokens.  Meta commands never do.
    command = tokens[0]
    if command in _STORAGE or command in (b"incr", b"decr", b"touch"):
        return tokens[-1] == b"noreply"
    if command == b"rdelete":
        return len(tokens) in (6, 7) and tokens[-1] == b"noreply"
    if command == b"delete":
        return len(tokens) > 2 and tokens[-1] == b"noreply"
    return False


def _frame_data(
    stream: bytes,
    offset: int,
    line_end: int,
    canonical_line: bytes,
    length: int,
    key: bytes,
    flags: int,
    command: bytes,
    quiet: bool,
) -> tuple[Unit | None, int]:
    line = stream[offset:line_end]
    if not item_fits(key, length, flags):
        end = min(line_end + length + 2, len(stream))
        raw = stream[offset:end]
        return _rejected_unit(raw, TOO_LARGE, quiet), end
    end = line_end + length + 2
    if end > len(stream):
        return None, offset
    raw = stream[offset:end]
    if stream[end - 2 : end] != b"\r\n":
        return _rejected_unit(raw, BAD_CHUNK, quiet), end
    data = stream[line_end : end - 2]
    # Storage never replies with an error line once its data block is
    # read whole.
    return Unit(line, "execute", canonical_line + data + b"\r\n"), end


def _parse_storage(tokens: list[bytes]) -> tuple[bytes, int, bytes, int, bool]:
    command = tokens[0]
    words = _STORAGE[command]
    if len(tokens) not in (words, words + 1):
        raise _Rejected(ERROR)
    quiet = tokens[-1] == b"noreply"
    key = tokens[1]
    if len(key) > MAX_KEY_LENGTH:
        raise _Rejected(BAD_FORMAT)
    flags = text_unsigned(tokens[2], _U32_MAX)
    exptime = text_signed32(tokens[3])
    length = text_signed32(tokens[4])
    cas = text_unsigned(tokens[5], _U64_MAX) if command == b"cas" else 0
    if None in (flags, exptime, length, cas) or not 0 <= length <= MAX_DATA_LENGTH:
        raise _Rejected(BAD_FORMAT)
    line = b"%s %s %d %d %d" % (command, key, flags, exptime, length)
    if command == b"cas":
        line += b" %d" % cas
    if quiet:
        line += b" noreply"
    return line + b"\r\n", length, key, flags, quiet


def _parse_meta_set(tokens: list[bytes]) -> tuple[bytes, int, bytes, int, bool]:
    if len(tokens) < 2:
        raise _Rejected(ERROR)
    if len(tokens[1]) > MAX_KEY_LENGTH or len(tokens) == 2 or len(tokens) > MAX_META_TOKENS:
        raise _Rejected(META_ERROR)
    length = meta_signed32(tokens[2])
    if length is None or not 0 <= length <= MAX_DATA_LENGTH:
        raise _Rejected(META_ERROR)
    try:
        flags = _parse_meta_flags(tokens[3:], _SET_MODES, tokens[1])
    except _Rejected:
        raise _Rejected(META_ERROR, length + 2) from None
    client_flags = next((value for letter, value in flags if letter == b"F"), 0)
    key = tokens[1]
    if any(letter == b"b" for letter, _ in flags):
        key = b"k" * decoded_key_length(key)
    line = b"ms %s %d%s\r\n" % (tokens[1], length, _canonical_flags(flags))
    return line, length, key, client_flags, False


def _parse_meta_flags(tokens: list[bytes], modes: frozenset[int] | None, key: bytes) -> list[tuple[bytes, object]]:
    """
    Read the flags of a meta request for ``key``.

    :return: ``(letter, argument)`` pairs.  The argument is the number of
        a numeric flag and the rest of the token for any other flag.
    """
    seen = set()
    flags = []
    for token in tokens:
        letter = token[0]
        if letter >= 127 or letter in seen:
            raise _Rejected(META_ERROR)
        seen.add(letter)
        argument = token[1:]
        if letter in _META_NUMBER_FLAGS:
            number = _META_NUMBER_FLAGS[letter](argument)
            if number is None:
                raise _Rejected(META_ERROR)
            flags.append((bytes([letter]), number))
        elif letter == ord("M"):
            if len(argument) != 1 or (modes is not None and argument[0] not in modes):
                raise _Rejected(META_ERROR)
            flags.append((b"M", argument))
        elif letter == ord("b"):
            if decoded_key_length(key) is None:
                raise _Rejected(META_ERROR)
            flags.append((b"b", argument))
        elif letter in _META_FREE_FLAGS:
            if letter == ord("O") and len(token) > _MAX_OPAQUE_LENGTH:
                raise _Rejected(META_ERROR)
            flags.append((bytes([letter]), argument))
        else:
            raise _Rejected(META_ERROR)
    return flags


def _canonical_flags(flags: list[tuple[bytes, object]]) -> bytes:
    parts = []
    for letter, argument in flags:
        if isinstance(argument, int):
            parts.append(b" %s%d" % (letter, argument))
        else:
            parts.append(b" " + letter + argument)
    return b"".join(parts)


def _parse_line(tokens: list[bytes]) -> tuple[bytes, bool, bool, bool]:
    """
    Parse a request without a data block.

    :return: its canonical form, whether it requested no reply, whether it
        may reply with an error line, and whether it deletes a range.
    :raise _Rejected: the request is invalid.
    """
    if not tokens:
        raise _Rejected(ERROR)
    command = tokens[0]
    if command in _UNMODELLED:
        raise AssertionError("the fuzz oracle does not model %r" % (command,))
    if command in (b"get", b"gets"):
        if len(tokens) < 2:
            raise _Rejected(ERROR)
        _check_keys(tokens[1:])
        return b" ".join(tokens) + b"\r\n", False, False, False
    if command in (b"gat", b"gats"):
        if len(tokens) < 2:
            raise _Rejected(ERROR)
        exptime = text_signed32(tokens[1])
        if exptime is None:
            raise _Rejected(INVALID_EXPTIME)
        _check_keys(tokens[2:])
        return b" ".join([command, b"%d" % exptime] + tokens[2:]) + b"\r\n", False, False, False
    if command == b"delete":
        return _parse_delete(tokens)
    if command in (b"incr", b"decr", b"touch"):
        if len(tokens) not in (3, 4):
            raise _Rejected(ERROR)
        quiet = tokens[-1] == b"noreply"
        _check_keys(tokens[1:2])
        if command == b"touch":
            number = text_signed32(tokens[2])
        else:
            number = text_unsigned(tokens[2], _U64_MAX)
        if number is None:
            raise _Rejected(INVALID_EXPTIME if command == b"touch" else INVALID_DELTA)
        canonical = b"%s %s %d%s\r\n" % (command, tokens[1], number, b" noreply" if quiet else b"")
        return canonical, quiet, command != b"touch", False
    if command == b"mn":
        return b"mn\r\n", False, False, False
    if command in (b"mg", b"md", b"ma"):
        return _parse_meta(tokens)
    if command in (b"rget", b"rdelete"):
        return _parse_range(tokens)
    if tokens[-1].startswith(b"HTTP/"):
        raise _Rejected(CLOSE)
    raise _Rejected(ERROR)


def _check_keys(keys: list[bytes]) -> None:
    if any(len(key) > MAX_KEY_LENGTH for key in keys):
        raise _Rejected(BAD_FORMAT)


def _parse_delete(tokens: list[bytes]) -> tuple[bytes, bool, bool, bool]:
    if not 2 <= len(tokens) <= 4:
        raise _Rejected(ERROR)
    quiet = False
    if len(tokens) > 2:
        hold_is_zero = tokens[2] == b"0"
        quiet = tokens[-1] == b"noreply"
        valid = (hold_is_zero or quiet) if len(tokens) == 3 else (hold_is_zero and quiet)
        if not valid:
            raise _Rejected(DELETE_USAGE)
    _check_keys(tokens[1:2])
    return b"delete %s%s\r\n" % (tokens[1], b" noreply" if quiet else b""), quiet, False, False


def _parse_meta(tokens: list[bytes]) -> tuple[bytes, bool, bool, bool]:
    command = tokens[0]
    if len(tokens) < 2:
        raise _Rejected(ERROR)
    if len(tokens[1]) > MAX_KEY_LENGTH or len(tokens) > MAX_META_TOKENS:
        raise _Rejected(META_ERROR)
    flags = _parse_meta_flags(tokens[2:], _ARITHMETIC_MODES if command == b"ma" else None, tokens[1])
    canonical = b"%s %s%s\r\n" % (command, tokens[1], _canonical_flags(flags))
    return canonical, False, command == b"ma", False


def _parse_range(tokens: list[bytes]) -> tuple[bytes, bool, bool, bool]:
    command = tokens[0]
    quiet = False
    if command == b"rdelete" and len(tokens) in (6, 7) and tokens[-1] == b"noreply":
        quiet = True
        tokens = tokens[:-1]
    if not 5 <= len(tokens) <= 6:
        raise _Rejected(ERROR)
    if tokens[1] not in (b"0", b"1") or tokens[2] not in (b"0", b"1"):
        raise _Rejected(BAD_FORMAT)
    max_items = text_unsigned(tokens[3], _U32_MAX)
    if max_items is None:
        raise _Rejected(BAD_FORMAT)
    _check_keys(tokens[4:])
    canonical = b" ".join(tokens[:3] + [b"%d" % max_items] + tokens[4:])
    if quiet:
        canonical += b" noreply"
    return canonical + b"\r\n", quiet, False, command == b"rdelete"
