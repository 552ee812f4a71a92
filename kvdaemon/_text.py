# -*- test-case-name: tests.test_text -*-
"""
memcached's text protocol: request framing, the classic commands and their
replies, byte for byte as memcached 1.6 sends them.

Meta commands (``mg``, ``ms`` ...) and range commands (``rget``,
``rdelete``, ``lru_crawler``) share this framing and are dispatched to
their own modules.
"""

from __future__ import annotations

import re
from functools import partial
from typing import TYPE_CHECKING, Callable

from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from kvdaemon import _stats
from kvdaemon._connection import OUTPUT_BATCH_BYTES
from kvdaemon._store import MAX_KEY_LENGTH, Item, StoreResult
from kvdaemon._version import PROTOCOL_VERSION

if TYPE_CHECKING:
    from kvdaemon._connection import Connection

#: memcached closes a connection that sends this many bytes without a
#: newline, unless the line is a ``get``/``gets`` with many keys.
MAX_LINE_LENGTH = 2048

#: The highest level ``verbosity`` sets; memcached caps larger requests.
MAX_VERBOSITY = 2


ERROR = b"ERROR\r\n"
BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
BAD_CHUNK = b"CLIENT_ERROR bad data chunk\r\n"
TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
INVALID_EXPTIME = b"CLIENT_ERROR invalid exptime argument\r\n"
END = b"END\r\n"

#: Commands after which memcached 1.6 has sent every reply queued before
#: them; ``lru_crawler metadump`` checks for queued replies (see
#: :attr:`TextHandler.follows_reply`).
_FLUSHING_COMMANDS = frozenset([b"get", b"gets", b"gat", b"gats", b"mn"])

_STORE_REPLIES = {
    StoreResult.STORED: b"STORED\r\n",
    StoreResult.NOT_STORED: b"NOT_STORED\r\n",
    StoreResult.EXISTS: b"EXISTS\r\n",
    StoreResult.NOT_FOUND: b"NOT_FOUND\r\n",
    StoreResult.TOO_LARGE: TOO_LARGE,
}

#: A command handler's request for a data block: the block's length
#: (without its trailing CRLF) and the function to call with the block.
DataRequest = tuple[int, Callable[[bytes], None]]

_U32_MAX = 2**32 - 1
_I32_MIN = -(2**31)
_I32_MAX = 2**31 - 1
_U64_MAX = 2**64 - 1


class ProtocolError(Exception):
    """
    A request memcached rejects; ``reply`` is sent to the client.

    :meth:`TextHandler.process` logs each one with the peer address, so
    code that raises it does not log the rejection itself.
    """

    def __init__(self, reply: bytes) -> None:
        super().__init__(reply)
        self.reply = reply


#: A number as memcached's ``safe_strto*`` functions read a token: C
#: whitespace, an optional sign and decimal digits, then the end of the
#: token or a whitespace byte, after which anything is ignored.
_C_NUMBER = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-9]+)(?:[ \t\n\v\f\r]|\Z)")


def read_number(token: bytes) -> int | None:
    """Return the signed number that ``token`` is, read as above, or ``None`` when it is not one."""
    if token.isdigit():
        return int(token)
    match = _C_NUMBER.match(token)
    if match is None:
        return None
    value = int(match.group(2))
    return -value if match.group(1) == b"-" else value


# NOTE: memcached 1.6.18 stores a parsed number into a 32-bit field
# without a range check, so it reads flags 4294967296 as 0 and exptime
# 4294967297 as 1.  These parsers reject out-of-range numbers instead, as
# later memcached releases do for flags.


def parse_uint(token: bytes, maximum: int, reply: bytes = BAD_FORMAT) -> int:
    """
    Parse an unsigned decimal as memcached's ``safe_strtoul`` and
    ``safe_strtoull`` do (``+5``, ``-0`` and ``-18446744073709551615``,
    which wraps to 1, are accepted).

    :raise ProtocolError: with ``reply``, for anything else or a value above
        ``maximum``.
    """
    value = read_number(token)
    if value is not None and -_U64_MAX <= value < 0:
        # C's strtoull negates a number below 2**64 modulo 2**64, and
        # memcached 1.6.18 rejects the result only when it is 2**63 or
        # more.
        value += _U64_MAX + 1
        if value >= 2**63:
            value = None
    if value is None or not 0 <= value <= maximum:
        raise ProtocolError(reply)
    return value


def parse_int(token: bytes, reply: bytes = BAD_FORMAT) -> int:
    """
    Parse a signed 32-bit decimal as memcached's ``safe_strtol`` does.

    :raise ProtocolError: with ``reply``, for anything else.
    """
    value = read_number(token)
    if value is None or not _I32_MIN <= value <= _I32_MAX:
        raise ProtocolError(reply)
    return value


def check_key(key: bytes) -> bytes:
    """Return ``key`` if memcached accepts it as a key, else raise :class:`ProtocolError`."""
    if len(key) > MAX_KEY_LENGTH:
        raise ProtocolError(BAD_FORMAT)
    return key


class TextHandler:
    """
    Executes text protocol requests for one :class:`Connection`.

    Runs on the reactor thread only.
    """

    log = Logger()

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.log = connection.logger_for(self)
        factory = connection.factory
        self.factory = factory
        self.store = factory.store
        self.stats = factory.stats
        self.settings = factory.settings
        self.noreply = False
        #: Bytes of a rejected data block still to be skipped.
        self._swallow = 0
        #: Whether the request being executed came in the same batch of
        #: input as an earlier request whose reply memcached would still
        #: hold unsent: any request but the ones in ``_FLUSHING_COMMANDS``.
        self.follows_reply = False
        self._commands: dict[bytes, Callable[[list[bytes]], DataRequest | None]] = {
            b"get": self.cmd_get,
            b"gets": self.cmd_gets,
            b"gat": self.cmd_gat,
            b"gats": self.cmd_gats,
            b"set": self.cmd_set,
            b"add": self.cmd_add,
            b"replace": self.cmd_replace,
            b"append": self.cmd_append,
            b"prepend": self.cmd_prepend,
            b"cas": self.cmd_cas,
            b"delete": self.cmd_delete,
            b"incr": self.cmd_incr,
            b"decr": self.cmd_decr,
            b"touch": self.cmd_touch,
            b"flush_all": self.cmd_flush_all,
            b"version": self.cmd_version,
            b"verbosity": self.cmd_verbosity,
            b"quit": self.cmd_quit,
            b"shutdown": self.cmd_shutdown,
            b"stats": self.cmd_stats,
        }
        self._register_extensions()

    def _register_extensions(self) -> None:
        from kvdaemon import _meta, _ranges

        self._commands.update(_meta.text_commands(self))
        self._commands.update(_ranges.text_commands(self))

    def connection_lost(self) -> None:
        pass

    # -- framing --

    def process(self, buffer: bytes, offset: int) -> int:
        """Execute complete requests in ``buffer`` from ``offset``; return the first unconsumed offset."""
        connection = self.connection
        commands = self._commands
        end = len(buffer)
        previous_command: bytes | None = None
        while offset < end and not connection.blocked:
            if self._swallow:
                skipped = min(self._swallow, end - offset)
                self._swallow -= skipped
                offset += skipped
                continue
            eol = buffer.find(b"\n", offset)
            if eol < 0:
                self._check_unterminated(buffer, offset)
                return offset
            line_end = eol - 1 if eol > offset and buffer[eol - 1] == 13 else eol
            line = buffer[offset:line_end]
            if b"\0" in line:
                # memcached reads the request line as a C string, so a NUL
                # byte ends it.
                line = line[: line.index(b"\0")]
            parts = line.split(b" ")
            if b"" in parts:
                parts = [part for part in parts if part]
            self.noreply = False
            self.follows_reply = previous_command is not None and previous_command not in _FLUSHING_COMMANDS
            previous_command = parts[0] if parts else b""
            if not parts:
                self.log.info("Empty request line from {peer}", peer=connection.peer)
                connection.write(ERROR)
                offset = eol + 1
                continue
            command = commands.get(parts[0])
            if command is None:
                if parts[-1].startswith(b"HTTP/"):
                    # memcached hangs up on HTTP clients instead of replying.
                    self.log.info("Closing {peer}: it sent an HTTP request", peer=connection.peer)
                    connection.close()
                    return eol + 1
                self.log.info("Unknown command from {peer}: {line!r}", peer=connection.peer, line=line[:64])
                connection.write(ERROR)
                offset = eol + 1
                continue
            try:
                data_request = command(parts)
            except ProtocolError as error:
                self.log.info(
                    "Rejected {command!r} from {peer}: {reply!r}",
                    command=parts[0],
                    peer=connection.peer,
                    reply=error.reply,
                )
                self.reply(error.reply)
                offset = eol + 1
                continue
            if data_request is None:
                offset = eol + 1
                continue
            length, receive = data_request
            data_start = eol + 1
            data_end = data_start + length + 2
            if data_end > end:
                connection.bytes_needed = data_end - offset
                return offset
            offset = data_end
            if buffer[data_end - 2 : data_end] != b"\r\n":
                self.log.info("Bad data chunk from {peer}", peer=connection.peer)
                # memcached counts the command before it checks the chunk.
                self.stats.cmd_set += 1
                self.reply(BAD_CHUNK)
                continue
            receive(buffer[data_start : data_end - 2])
        return offset

    def _check_unterminated(self, buffer: bytes, offset: int) -> None:
        pending = len(buffer) - offset
        if pending <= MAX_LINE_LENGTH:
            return
        # Like memcached, allow a long get/gets line after at most 100
        # leading spaces.
        window = buffer[offset : offset + 106]
        head = window.lstrip(b" ")
        leading_spaces = len(window) - len(head)
        if (
            leading_spaces <= 100
            and head.startswith((b"get ", b"gets "))
            and pending <= self.settings.max_pending_input
        ):
            return
        self.log.info(
            "Closing {peer}: a request line exceeded {limit} bytes",
            peer=self.connection.peer,
            limit=MAX_LINE_LENGTH,
        )
        self.connection.close()

    # -- helpers for command handlers --

    def reply(self, data: bytes) -> None:
        """Send ``data`` unless the request asked for no reply."""
        if not self.noreply:
            self.connection.write(data)

    def check_noreply(self, parts: list[bytes]) -> None:
        """
        Remember whether the request's last token is ``noreply``.

        memcached looks only at the last token, whatever its position, and
        then suppresses every reply to the request, errors included.
        """
        self.noreply = parts[-1] == b"noreply"

    def swallow(self, length: int) -> None:
        """Skip the next ``length`` bytes of input (a rejected data block)."""
        self._swallow = length

    # -- retrieval --

    def cmd_get(self, parts: list[bytes]) -> None:
        self._retrieve(parts[1:], with_cas=False)

    def cmd_gets(self, parts: list[bytes]) -> None:
        self._retrieve(parts[1:], with_cas=True)

    def cmd_gat(self, parts: list[bytes]) -> None:
        self._touch_and_retrieve(parts, with_cas=False)

    def cmd_gats(self, parts: list[bytes]) -> None:
        self._touch_and_retrieve(parts, with_cas=True)

    def _retrieve(self, keys: list[bytes], with_cas: bool) -> None:
        if not keys:
            raise ProtocolError(ERROR)
        self._send_values(keys, 0, with_cas, self._get)

    def _touch_and_retrieve(self, parts: list[bytes], with_cas: bool) -> None:
        # "gat <exptime>" with no key is valid and returns only END, and
        # memcached counts gat as touches, not gets.
        if len(parts) < 2:
            raise ProtocolError(ERROR)
        exptime = parse_int(parts[1], INVALID_EXPTIME)
        stats = self.stats
        touch = self.store.touch

        def get_and_touch(key: bytes) -> Item | None:
            stats.cmd_touch += 1
            item = touch(key, exptime)
            if item is None:
                stats.touch_misses += 1
            else:
                stats.touch_hits += 1
            return item

        self._send_values(parts[2:], 0, with_cas, get_and_touch)

    def _get(self, key: bytes) -> Item | None:
        stats = self.stats
        item = self.store.get(key)
        stats.cmd_get += 1
        if item is None:
            stats.get_misses += 1
        else:
            stats.get_hits += 1
        return item

    def _send_values(
        self,
        keys: list[bytes],
        start: int,
        with_cas: bool,
        fetch: Callable[[bytes], Item | None],
        keys_checked: bool = False,
    ) -> None:
        """
        Send a ``VALUE`` block for each item that ``fetch`` returns for
        ``keys[start:]``, then ``END``.

        A reply to many keys goes out in batches.  After a batch that the
        transport could not take at once, it stops and continues when the
        transport resumes, so a client that sends a long ``get`` line and
        reads nothing cannot make the server build the whole reply.
        :raise ProtocolError: a key is too long.  As in memcached, the keys
            before it are fetched and counted, and no value is sent.
        """
        connection = self.connection
        out = []
        batch_bytes = 0
        for index in range(start, len(keys)):
            key = keys[index]
            if len(key) > MAX_KEY_LENGTH:
                raise ProtocolError(BAD_FORMAT)
            item = fetch(key)
            if item is None:
                continue
            value = item.value
            if with_cas:
                out.append(b"VALUE %s %d %d %d\r\n%s\r\n" % (key, item.flags, len(value), item.cas, value))
            else:
                out.append(b"VALUE %s %d %d\r\n%s\r\n" % (key, item.flags, len(value), value))
            batch_bytes += len(value)
            if batch_bytes >= OUTPUT_BATCH_BYTES and index + 1 < len(keys):
                # A batch may be sent before the end only when no later key
                # can turn the reply into an error.
                if not keys_checked:
                    self._check_keys(keys, index + 1, fetch)
                    keys_checked = True
                connection.write(b"".join(out))
                out = []
                batch_bytes = 0
                if connection.producer_paused:
                    connection.finish_later(partial(self._send_values, keys, index + 1, with_cas, fetch, True))
                    return
        out.append(END)
        connection.write(b"".join(out))

    @staticmethod
    def _check_keys(keys: list[bytes], start: int, fetch: Callable[[bytes], Item | None]) -> None:
        """
        Raise :class:`ProtocolError` if a key from ``start`` on is too long,
        after fetching the keys before it, which memcached counts.
        """
        if max(map(len, keys[start:])) <= MAX_KEY_LENGTH:
            return
        for key in keys[start:]:
            if len(key) > MAX_KEY_LENGTH:
                raise ProtocolError(BAD_FORMAT)
            fetch(key)

    # -- storage --

    def cmd_set(self, parts: list[bytes]) -> DataRequest | None:
        return self._storage("set", parts)

    def cmd_add(self, parts: list[bytes]) -> DataRequest | None:
        return self._storage("add", parts)

    def cmd_replace(self, parts: list[bytes]) -> DataRequest | None:
        return self._storage("replace", parts)

    def cmd_append(self, parts: list[bytes]) -> DataRequest | None:
        return self._storage("append", parts)

    def cmd_prepend(self, parts: list[bytes]) -> DataRequest | None:
        return self._storage("prepend", parts)

    def cmd_cas(self, parts: list[bytes]) -> DataRequest | None:
        return self._storage("cas", parts)

    def _storage(self, mode: str, parts: list[bytes]) -> DataRequest | None:
        words = 6 if mode == "cas" else 5
        if len(parts) not in (words, words + 1):
            raise ProtocolError(ERROR)
        # A token after the last argument other than "noreply" is ignored.
        self.check_noreply(parts)
        key = check_key(parts[1])
        flags = parse_uint(parts[2], _U32_MAX)
        exptime = parse_int(parts[3])
        length = parse_int(parts[4])
        cas = parse_uint(parts[5], _U64_MAX) if mode == "cas" else 0
        if not 0 <= length <= _I32_MAX - 2:
            raise ProtocolError(BAD_FORMAT)
        if not self.store.fits(key, length, flags):
            self.log.info(
                "Rejected a {length}-byte value for {peer}: over the item size limit",
                length=length,
                peer=self.connection.peer,
            )
            self.stats.store_too_large += 1
            if mode == "set":
                self.store.delete(key)
            self.reply(TOO_LARGE)
            self.swallow(length + 2)
            return None
        noreply = self.noreply

        def receive(value: bytes) -> None:
            self.noreply = noreply
            self._store(mode, key, value, flags, exptime, cas)

        return length, receive

    def _store(self, mode: str, key: bytes, value: bytes, flags: int, exptime: int, cas: int) -> None:
        self.stats.cmd_set += 1
        result, _ = self.store.store(mode, key, value, flags, exptime, cas)
        if mode == "cas":
            self.stats.count_cas(result)
        self.reply(_STORE_REPLIES[result])

    # -- other item commands --

    def cmd_delete(self, parts: list[bytes]) -> None:
        if not 2 <= len(parts) <= 4:
            raise ProtocolError(ERROR)
        if len(parts) > 2:
            # "delete <key> 0 [noreply]" is an old form memcached still accepts.
            hold_is_zero = parts[2] == b"0"
            self.check_noreply(parts)
            if len(parts) == 3:
                valid = hold_is_zero or self.noreply
            else:
                valid = hold_is_zero and self.noreply
            if not valid:
                raise ProtocolError(b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n")
        key = check_key(parts[1])
        if self.store.delete(key) == StoreResult.STORED:
            self.stats.delete_hits += 1
            self.reply(b"DELETED\r\n")
        else:
            self.stats.delete_misses += 1
            self.reply(b"NOT_FOUND\r\n")

    def cmd_incr(self, parts: list[bytes]) -> None:
        self._arithmetic(parts, incr=True)

    def cmd_decr(self, parts: list[bytes]) -> None:
        self._arithmetic(parts, incr=False)

    def _arithmetic(self, parts: list[bytes], incr: bool) -> None:
        if len(parts) not in (3, 4):
            raise ProtocolError(ERROR)
        self.check_noreply(parts)
        key = check_key(parts[1])
        delta = parse_uint(parts[2], _U64_MAX, b"CLIENT_ERROR invalid numeric delta argument\r\n")
        result, value, _ = self.store.incr(key, delta, incr)
        name = "incr" if incr else "decr"
        if result == StoreResult.NOT_FOUND:
            setattr(self.stats, name + "_misses", getattr(self.stats, name + "_misses") + 1)
            self.reply(b"NOT_FOUND\r\n")
        elif result == StoreResult.NON_NUMERIC:
            self.log.info(
                "Rejected {command} from {peer}: the value is not a number",
                command=name,
                peer=self.connection.peer,
            )
            self.reply(b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n")
        else:
            setattr(self.stats, name + "_hits", getattr(self.stats, name + "_hits") + 1)
            self.reply(b"%d\r\n" % value)

    def cmd_touch(self, parts: list[bytes]) -> None:
        if len(parts) not in (3, 4):
            raise ProtocolError(ERROR)
        self.check_noreply(parts)
        key = check_key(parts[1])
        exptime = parse_int(parts[2], INVALID_EXPTIME)
        self.stats.cmd_touch += 1
        if self.store.touch(key, exptime) is None:
            self.stats.touch_misses += 1
            self.reply(b"NOT_FOUND\r\n")
        else:
            self.stats.touch_hits += 1
            self.reply(b"TOUCHED\r\n")

    # -- server commands --

    def cmd_flush_all(self, parts: list[bytes]) -> None:
        if len(parts) > 3:
            raise ProtocolError(ERROR)
        self.check_noreply(parts)
        # memcached counts a flush_all even when it rejects it.
        self.stats.cmd_flush += 1
        if not self.settings.allow_destructive:
            raise ProtocolError(b"CLIENT_ERROR flush_all not allowed\r\n")
        delay = 0
        if len(parts) != (2 if self.noreply else 1):
            delay = parse_int(parts[1], INVALID_EXPTIME)
        self.store.flush(delay)
        self.log.info("flush_all from {peer} (delay {delay} s)", peer=self.connection.peer, delay=delay)
        self.reply(b"OK\r\n")

    def cmd_version(self, parts: list[bytes]) -> None:
        self.connection.write(b"VERSION " + PROTOCOL_VERSION + b"\r\n")

    def cmd_verbosity(self, parts: list[bytes]) -> None:
        if len(parts) not in (2, 3):
            raise ProtocolError(ERROR)
        self.check_noreply(parts)
        level = parse_uint(parts[1], _U32_MAX)
        self.factory.verbosity = min(level, MAX_VERBOSITY)
        self.reply(b"OK\r\n")

    def cmd_quit(self, parts: list[bytes]) -> None:
        self.connection.close()

    def cmd_shutdown(self, parts: list[bytes]) -> None:
        # memcached 1.6.18 ignores noreply here and closes the connection
        # without a reply.  It can also drop replies still queued for
        # earlier requests in the same read, which kvdaemon sends first.
        if not self.settings.enable_shutdown:
            raise ProtocolError(b"ERROR: shutdown not enabled\r\n")
        if parts[1:] not in ([], [b"graceful"]):
            raise ProtocolError(b"CLIENT_ERROR invalid shutdown mode\r\n")
        self.log.info("Stopping the server: shutdown requested by {peer}", peer=self.connection.peer)
        self.connection.close()
        try:
            # The service stops the same way as on SIGTERM: twistd stops
            # its services before the reactor stops.
            self.factory.reactor.stop()
        except ReactorNotRunning:
            # An earlier shutdown request or signal is already stopping it.
            pass

    def cmd_stats(self, parts: list[bytes]) -> None:
        factory = self.factory
        if len(parts) == 1:
            lines = _stats.general_stats(
                self.stats, self.store, self.settings, factory.reactor.seconds(), self.settings.threads
            )
        elif parts[1] == b"settings":
            lines = _stats.settings_stats(self.settings, factory.listen_descriptions, factory.verbosity, factory.tcp_port)
        elif parts[1] == b"conns":
            lines = self._connection_stats()
        elif parts[1] == b"reset":
            factory.reset_stats()
            self.connection.write(b"RESET\r\n")
            return
        else:
            raise ProtocolError(ERROR)
        out = [b"STAT %s %s\r\n" % (name.encode(), str(value).encode()) for name, value in lines]
        out.append(END)
        self.connection.write_sequence(out)

    def _connection_stats(self) -> list[tuple[str, object]]:
        lines: list[tuple[str, object]] = []
        now = self.factory.reactor.seconds()
        for connection in sorted(self.factory.connections, key=lambda c: c.connection_id):
            prefix = "%d:" % connection.connection_id
            lines.append((prefix + "addr", connection.address))
            lines.append((prefix + "listen_addr", connection.listen_address))
            lines.append((prefix + "state", connection.state_name))
            lines.append((prefix + "secs_since_last_cmd", int(now - connection.last_request_time)))
        return lines
