# -*- test-case-name: tests.test_binary -*-
"""
memcached's binary protocol: packet framing, the opcodes memcached 1.6
serves, SASL PLAIN authentication, and a registration point for more
opcodes.

Every request and response starts with a 24-byte big-endian header (see
:data:`HEADER`); the body that follows is extras, then key, then value.  A
response echoes the request's opcode and opaque.  Replies and error texts
follow memcached 1.6.18, checked against that server.  Where a request is
malformed memcached closes the connection after its error reply, and so
does this module.

Adding opcodes
--------------

:attr:`BinaryHandler.commands` maps an opcode to a :class:`Command`: the
method that executes a complete :class:`Request`, a check of the header's
key, extras and body lengths (build it with :func:`expect`), and whether
the opcode is a quiet variant.  The framing layer has already checked the
magic, the lengths, the key limit and SASL authentication before
``execute`` runs, and it has the whole body in hand.  Reply with
:meth:`BinaryHandler.send`, :meth:`BinaryHandler.send_success` (silent for
quiet opcodes) or :meth:`BinaryHandler.send_error`; :func:`pack_response`
builds a packet for code that writes elsewhere, such as a streaming job
that returns one packet per item.

A module that adds opcodes (range get 0x30, range delete 0x37, resumable
scans 0xDA to 0xDC) defines ``binary_commands(handler)`` returning
``{opcode: Command}``, and :meth:`BinaryHandler._register_extensions`
calls it for each connection.
"""

from __future__ import annotations

import enum
import struct
from typing import TYPE_CHECKING, Callable

import attrs
from twisted.logger import Logger

from kvdaemon import _stats
from kvdaemon._sasl import MAX_MECHANISM_LENGTH, MECHANISMS, AuthResult, Outcome, PlainExchange
from kvdaemon._store import MAX_KEY_LENGTH, Item, StoreResult
from kvdaemon._version import PROTOCOL_VERSION

if TYPE_CHECKING:
    from kvdaemon._connection import Connection

#: magic, opcode, key length, extras length, data type, vbucket (request)
#: or status (response), total body length, opaque, CAS.
HEADER = struct.Struct(">BBHBBHIIQ")
HEADER_SIZE = HEADER.size

REQUEST_MAGIC = 0x80
RESPONSE_MAGIC = 0x81

#: The flags a get-family response carries as extras.
_FLAGS = struct.Struct(">I")
#: set/add/replace extras: flags, expiry.
_STORAGE_EXTRAS = struct.Struct(">II")
#: incr/decr extras: delta, initial value, expiry.
_COUNTER_EXTRAS = struct.Struct(">QQI")
#: incr/decr response value.
_COUNTER_VALUE = struct.Struct(">Q")
#: touch/gat/flush/verbosity extras: one 32-bit number.
_U32 = struct.Struct(">I")

#: An incr/decr expiry meaning "do not create a missing counter".
NO_CREATE_EXPIRY = 0xFFFFFFFF


class Opcode(enum.IntEnum):
    """Request opcodes memcached 1.6 defines for the binary protocol."""

    GET = 0x00
    SET = 0x01
    ADD = 0x02
    REPLACE = 0x03
    DELETE = 0x04
    INCREMENT = 0x05
    DECREMENT = 0x06
    QUIT = 0x07
    FLUSH = 0x08
    GETQ = 0x09
    NOOP = 0x0A
    VERSION = 0x0B
    GETK = 0x0C
    GETKQ = 0x0D
    APPEND = 0x0E
    PREPEND = 0x0F
    STAT = 0x10
    SETQ = 0x11
    ADDQ = 0x12
    REPLACEQ = 0x13
    DELETEQ = 0x14
    INCREMENTQ = 0x15
    DECREMENTQ = 0x16
    QUITQ = 0x17
    FLUSHQ = 0x18
    APPENDQ = 0x19
    PREPENDQ = 0x1A
    VERBOSITY = 0x1B
    TOUCH = 0x1C
    GAT = 0x1D
    GATQ = 0x1E
    SASL_LIST_MECHS = 0x20
    SASL_AUTH = 0x21
    SASL_STEP = 0x22
    GATK = 0x23
    GATKQ = 0x24


class Status(enum.IntEnum):
    """Response statuses."""

    SUCCESS = 0x00
    KEY_ENOENT = 0x01
    KEY_EEXISTS = 0x02
    E2BIG = 0x03
    EINVAL = 0x04
    NOT_STORED = 0x05
    DELTA_BADVAL = 0x06
    AUTH_ERROR = 0x20
    AUTH_CONTINUE = 0x21
    UNKNOWN_COMMAND = 0x81
    ENOMEM = 0x82


#: The body memcached sends with each error status.
ERROR_TEXT = {
    Status.KEY_ENOENT: b"Not found",
    Status.KEY_EEXISTS: b"Data exists for key.",
    Status.E2BIG: b"Too large.",
    Status.EINVAL: b"Invalid arguments",
    Status.NOT_STORED: b"Not stored.",
    Status.DELTA_BADVAL: b"Non-numeric server-side value for incr or decr",
    Status.AUTH_ERROR: b"Auth failure.",
    Status.UNKNOWN_COMMAND: b"Unknown command",
    Status.ENOMEM: b"Out of memory",
}


def pack_response(
    opcode: int,
    opaque: int,
    status: int = Status.SUCCESS,
    *,
    key: bytes = b"",
    extras: bytes = b"",
    value: bytes = b"",
    cas: int = 0,
) -> bytes:
    """Build one response packet."""
    body_length = len(extras) + len(key) + len(value)
    header = HEADER.pack(RESPONSE_MAGIC, opcode, len(key), len(extras), 0, status, body_length, opaque, cas)
    return b"".join((header, extras, key, value))


@attrs.frozen
class Request:
    """
    One complete request packet.  ``quiet`` is true for the opcodes that
    send nothing on success (and, for the get family, nothing on a miss).
    """

    opcode: int
    opaque: int
    cas: int
    key: bytes
    extras: bytes
    value: bytes
    quiet: bool = False


#: Checks a request header's key, extras and body lengths for one opcode.
LengthCheck = Callable[[int, int, int], bool]


def expect(extras: tuple[int, ...] = (0,), key: bool | None = False, value: bool = False) -> LengthCheck:
    """
    Build the length check memcached applies to one opcode.

    :param extras: the extras lengths allowed.
    :param key: True when a key is required, False when it is forbidden,
        None when either is fine.
    :param value: whether a value may follow the key.
    """

    def check(key_length: int, extras_length: int, body_length: int) -> bool:
        if extras_length not in extras:
            return False
        if key is not None and bool(key_length) != key:
            return False
        return value or body_length == key_length + extras_length

    return check


@attrs.frozen
class Command:
    """
    One opcode's entry in :attr:`BinaryHandler.commands`.

    A request whose lengths fail ``check`` gets "Invalid arguments" and its
    connection is closed.  A request whose value is larger than the item
    size limit is not buffered: its value is skipped and ``reject_large``
    (by default a "Too large." reply) is called with the request minus its
    value.  ``before_auth`` commands run on a connection that has not yet
    passed SASL authentication.
    """

    execute: Callable[[Request], None]
    check: LengthCheck
    quiet: bool = False
    before_auth: bool = False
    reject_large: Callable[[Request], None] | None = None


class BinaryHandler:
    """
    Executes binary protocol requests for one :class:`Connection`.

    Runs on the reactor thread only.
    """

    log = Logger()

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.log = connection.logger_for(self)
        factory = connection.factory
        self.factory = factory
        self.store = factory.store
        #: Replaced by the factory when a client resets the statistics.
        self.stats = factory.stats
        self.settings = factory.settings
        #: Bytes of a rejected request body still to be skipped.
        self._skip = 0
        self._requests_served = 0
        self.sasl: PlainExchange | None = None
        self.authenticated = True
        if self.settings.sasl_users is not None:
            self.sasl = PlainExchange(self.settings.sasl_users)
            self.authenticated = False
        self.commands: dict[int, Command] = {}
        self._register_core_commands()
        self._register_extensions()

    def _register_core_commands(self) -> None:
        """Fill :attr:`commands` with the opcodes memcached 1.6 serves."""
        no_body = expect()
        key_only = expect(key=True)
        key_and_value = expect(key=True, value=True)
        storage = expect(extras=(8,), key=True, value=True)
        counter = expect(extras=(20,), key=True)
        # memcached does not check the body length of touch and gat.
        touch = expect(extras=(4,), key=True, value=True)

        table: list[tuple[int, int | None, Callable[[Request], None], LengthCheck]] = [
            (Opcode.GET, Opcode.GETQ, self.cmd_get, key_only),
            (Opcode.GETK, Opcode.GETKQ, self.cmd_get, key_only),
            (Opcode.SET, Opcode.SETQ, self.cmd_set, storage),
            (Opcode.ADD, Opcode.ADDQ, self.cmd_add, storage),
            (Opcode.REPLACE, Opcode.REPLACEQ, self.cmd_replace, storage),
            (Opcode.APPEND, Opcode.APPENDQ, self.cmd_append, key_and_value),
            (Opcode.PREPEND, Opcode.PREPENDQ, self.cmd_prepend, key_and_value),
            (Opcode.DELETE, Opcode.DELETEQ, self.cmd_delete, key_only),
            (Opcode.INCREMENT, Opcode.INCREMENTQ, self.cmd_incr, counter),
            (Opcode.DECREMENT, Opcode.DECREMENTQ, self.cmd_decr, counter),
            (Opcode.QUIT, Opcode.QUITQ, self.cmd_quit, no_body),
            (Opcode.FLUSH, Opcode.FLUSHQ, self.cmd_flush, expect(extras=(0, 4))),
            (Opcode.GAT, Opcode.GATQ, self.cmd_gat, touch),
            (Opcode.GATK, Opcode.GATKQ, self.cmd_gat, touch),
            (Opcode.TOUCH, None, self.cmd_touch, touch),
            (Opcode.NOOP, None, self.cmd_noop, no_body),
            (Opcode.STAT, None, self.cmd_stat, expect(key=None, value=True)),
            (Opcode.VERBOSITY, None, self.cmd_verbosity, expect(extras=(4,))),
        ]
        for opcode, quiet_opcode, execute, check in table:
            reject_large = self._reject_large_set if opcode == Opcode.SET else None
            self.commands[opcode] = Command(execute, check, reject_large=reject_large)
            if quiet_opcode is not None:
                self.commands[quiet_opcode] = Command(execute, check, quiet=True, reject_large=reject_large)

        self.commands[Opcode.VERSION] = Command(self.cmd_version, no_body, before_auth=True)
        sasl_check = expect(key=True, value=True)
        if self.sasl is None:
            # With SASL off, memcached 1.6.18 still checks the lengths of
            # the SASL opcodes, closing the connection on a mismatch, and
            # replies "Unknown command" to well-formed requests.
            for opcode, check in (
                (Opcode.SASL_LIST_MECHS, no_body),
                (Opcode.SASL_AUTH, sasl_check),
                (Opcode.SASL_STEP, sasl_check),
            ):
                self.commands[opcode] = Command(self._reply_sasl_off, check)
        else:
            self.commands[Opcode.SASL_LIST_MECHS] = Command(self.cmd_sasl_list_mechs, no_body, before_auth=True)
            self.commands[Opcode.SASL_AUTH] = Command(
                self.cmd_sasl_auth, sasl_check, before_auth=True, reject_large=self._reject_large_sasl
            )
            self.commands[Opcode.SASL_STEP] = Command(
                self.cmd_sasl_step, sasl_check, before_auth=True, reject_large=self._reject_large_sasl
            )

    def _register_extensions(self) -> None:
        """Merge the opcodes of the modules that extend the binary protocol."""
        # Imported here because both modules import this one.
        from kvdaemon import _binary_ranges, _scans

        self.commands.update(_binary_ranges.binary_commands(self))
        self.commands.update(_scans.binary_commands(self))

    def connection_lost(self) -> None:
        self.sasl = None

    # -- framing --

    def process(self, buffer: bytes, offset: int) -> int:
        """Execute complete requests in ``buffer`` from ``offset``; return the first unconsumed offset."""
        connection = self.connection
        end = len(buffer)
        while offset < end and not connection.blocked:
            if self._skip:
                skipped = min(self._skip, end - offset)
                self._skip -= skipped
                offset += skipped
                continue
            next_offset = self._process_packet(buffer, offset, end)
            if next_offset is None:
                return offset
            offset = next_offset
        return offset

    def _process_packet(self, buffer: bytes, offset: int, end: int) -> int | None:
        """
        Execute or reject the packet at ``offset``.

        :return: the offset after what was consumed, or ``None`` after
            setting ``connection.bytes_needed`` when the packet's header is
            complete but the rest of it is not.
        """
        if end - offset < HEADER_SIZE:
            # bytes_needed stays 0: reparsing a partial header is cheap, and
            # a connection with bytes_needed set counts as partway through
            # a request, which the idle timeout spares.  memcached closes
            # an idle connection with a partial header, as it does one with
            # a partial text request line.
            return None
        magic, opcode, key_length, extras_length, _, _, body_length, opaque, cas = HEADER.unpack_from(buffer, offset)
        if magic != REQUEST_MAGIC:
            self._reject_magic(magic)
            return end
        key_start = offset + HEADER_SIZE + extras_length
        value_start = key_start + key_length
        # Like memcached, check nothing more until extras and key are in,
        # even when the header's lengths are inconsistent.
        if value_start > end:
            self.connection.bytes_needed = value_start - offset
            return None
        command = self.commands.get(opcode)
        if not self._header_acceptable(opcode, opaque, key_length, extras_length, body_length, command):
            return end
        if command is None:
            self.log.info("Unknown binary opcode 0x{opcode:02x} from {peer}", opcode=opcode, peer=self.connection.peer)
            self.connection.write(
                pack_response(opcode, opaque, Status.UNKNOWN_COMMAND, value=ERROR_TEXT[Status.UNKNOWN_COMMAND])
            )
            # memcached skips body-length bytes counted from after the extras
            # and key, so it also swallows the start of the next request.
            # Skipping exactly the body keeps the stream in step.
            self._skip = body_length
            return offset + HEADER_SIZE

        packet_end = offset + HEADER_SIZE + body_length
        extras = buffer[offset + HEADER_SIZE : key_start]
        key = buffer[key_start:value_start]
        value_length = packet_end - value_start
        if value_length and not self.store.fits(key, value_length):
            request = Request(opcode, opaque, cas, key, extras, b"", command.quiet)
            self.log.info(
                "Rejected a {length}-byte value for {peer} (opcode 0x{opcode:02x}): over the item size limit",
                length=value_length,
                peer=self.connection.peer,
                opcode=opcode,
            )
            (command.reject_large or self._reject_large)(request)
            self._skip = value_length
            return value_start
        if packet_end > end:
            self.connection.bytes_needed = packet_end - offset
            return None
        value = buffer[value_start:packet_end]
        self._requests_served += 1
        command.execute(Request(opcode, opaque, cas, key, extras, value, command.quiet))
        return packet_end

    def _header_acceptable(
        self, opcode: int, opaque: int, key_length: int, extras_length: int, body_length: int, command: Command | None
    ) -> bool:
        """
        Apply memcached's header checks, in its order; on failure send its
        error reply, close the connection and return False.
        """
        if key_length + extras_length > body_length:
            failure = Status.UNKNOWN_COMMAND, "key and extras exceed the body length"
        elif not self.authenticated and (command is None or not command.before_auth):
            failure = Status.AUTH_ERROR, "request before SASL authentication"
        elif key_length > MAX_KEY_LENGTH:
            failure = Status.EINVAL, "key longer than %d bytes" % MAX_KEY_LENGTH
        elif command is not None and not command.check(key_length, extras_length, body_length):
            failure = Status.EINVAL, "wrong key, extras or body length"
        else:
            return True
        status, reason = failure
        self.log.info(
            "Closing {peer}: {reason} (opcode 0x{opcode:02x})",
            peer=self.connection.peer,
            reason=reason,
            opcode=opcode,
        )
        self.connection.write(pack_response(opcode, opaque, status, value=ERROR_TEXT[status]))
        self.connection.close()
        return False

    def _reject_magic(self, magic: int) -> None:
        if self.sasl is not None and self._requests_served == 0:
            self.log.info(
                "Closing {peer}: SASL authentication is on, so only binary protocol requests are served",
                peer=self.connection.peer,
            )
        else:
            self.log.info(
                "Closing {peer}: invalid magic 0x{magic:02x} in a binary protocol request",
                peer=self.connection.peer,
                magic=magic,
            )
        self.connection.close()

    def _reply_sasl_off(self, request: Request) -> None:
        self.log.info(
            "SASL opcode 0x{opcode:02x} from {peer}, but SASL is off",
            opcode=request.opcode,
            peer=self.connection.peer,
        )
        self.send_error(request, Status.UNKNOWN_COMMAND)

    def _reject_large(self, request: Request) -> None:
        self.send_error(request, Status.E2BIG)

    def _reject_large_set(self, request: Request) -> None:
        # Like memcached, a failed set does not leave the old value behind.
        self.store.delete(request.key)
        self.send_error(request, Status.E2BIG)

    def _reject_large_sasl(self, request: Request) -> None:
        self.send_error(request, Status.ENOMEM)

    # -- replies --

    def send(
        self,
        request: Request,
        status: int = Status.SUCCESS,
        *,
        key: bytes = b"",
        extras: bytes = b"",
        value: bytes = b"",
        cas: int = 0,
    ) -> None:
        """Send a response to ``request``, whether or not it is quiet."""
        self.connection.write(
            pack_response(request.opcode, request.opaque, status, key=key, extras=extras, value=value, cas=cas)
        )

    def send_success(self, request: Request, *, value: bytes = b"", cas: int = 0) -> None:
        """Send a success response unless ``request`` is quiet."""
        if not request.quiet:
            self.send(request, value=value, cas=cas)

    def send_error(self, request: Request, status: Status) -> None:
        """Send an error response with memcached's text for ``status``; quiet requests get it too."""
        self.send(request, status, value=ERROR_TEXT[status])

    # -- retrieval --

    def cmd_get(self, request: Request) -> None:
        with_key = request.opcode in (Opcode.GETK, Opcode.GETKQ)
        self.stats.cmd_get += 1
        item = self.store.get(request.key)
        if item is None:
            self.stats.get_misses += 1
            self._send_miss(request, with_key)
            return
        self.stats.get_hits += 1
        key = request.key if with_key else b""
        self.send(request, key=key, extras=_FLAGS.pack(item.flags), value=item.value, cas=item.cas)

    def cmd_gat(self, request: Request) -> None:
        with_key = request.opcode in (Opcode.GATK, Opcode.GATKQ)
        item = self._touch(request)
        if item is None:
            self._send_miss(request, with_key)
            return
        key = request.key if with_key else b""
        self.send(request, key=key, extras=_FLAGS.pack(item.flags), value=item.value, cas=item.cas)

    def cmd_touch(self, request: Request) -> None:
        item = self._touch(request)
        if item is None:
            self.send_error(request, Status.KEY_ENOENT)
            return
        self.send(request, extras=_FLAGS.pack(item.flags), cas=item.cas)

    def _touch(self, request: Request) -> Item | None:
        (exptime,) = _U32.unpack(request.extras)
        self.stats.cmd_touch += 1
        item = self.store.touch(request.key, exptime)
        if item is None:
            self.stats.touch_misses += 1
        else:
            self.stats.touch_hits += 1
        return item

    def _send_miss(self, request: Request, with_key: bool) -> None:
        if request.quiet:
            return
        if with_key:
            # memcached replies to a keyed miss with the key and no error text.
            self.send(request, Status.KEY_ENOENT, key=request.key)
        else:
            self.send_error(request, Status.KEY_ENOENT)

    # -- storage --

    def cmd_set(self, request: Request) -> None:
        self._store_item(request, "set")

    def cmd_add(self, request: Request) -> None:
        self._store_item(request, "add")

    def cmd_replace(self, request: Request) -> None:
        self._store_item(request, "replace")

    def _store_item(self, request: Request, mode: str) -> None:
        flags, exptime = _STORAGE_EXTRAS.unpack(request.extras)
        # memcached turns set, add and replace into a compare-and-swap
        # whenever the request carries a CAS.
        if request.cas:
            mode = "cas"
        self.stats.cmd_set += 1
        result, cas = self.store.store(mode, request.key, request.value, flags, exptime, request.cas)
        if result == StoreResult.TOO_LARGE:
            # Non-zero flags add 4 bytes to an item, so a value that passed
            # the size check in _process_packet can still be too large.
            # memcached 1.6.18 then replies as for any value over the
            # limit, and a set, with or without a CAS, drops the old item.
            if request.opcode in (Opcode.SET, Opcode.SETQ):
                self.store.delete(request.key)
            self.send_error(request, Status.E2BIG)
            return
        if mode == "cas":
            if result == StoreResult.STORED:
                self.stats.cas_hits += 1
            elif result == StoreResult.EXISTS:
                self.stats.cas_badval += 1
            elif result == StoreResult.NOT_FOUND:
                self.stats.cas_misses += 1
        self._send_store_result(request, result, cas)

    def cmd_append(self, request: Request) -> None:
        self._concatenate(request, "append")

    def cmd_prepend(self, request: Request) -> None:
        self._concatenate(request, "prepend")

    def _concatenate(self, request: Request, mode: str) -> None:
        self.stats.cmd_set += 1
        if request.cas:
            # The store has no compare-and-swap append; checking first is
            # safe because every store mutation runs on this thread.
            item = self.store.get(request.key, bump=False)
            if item is not None and item.cas != request.cas:
                self.send_error(request, Status.KEY_EEXISTS)
                return
        result, cas = self.store.store(mode, request.key, request.value, 0, 0)
        self._send_store_result(request, result, cas)

    def _send_store_result(self, request: Request, result: str, cas: int) -> None:
        if result == StoreResult.STORED:
            self.send_success(request, cas=cas)
        elif result == StoreResult.EXISTS:
            self.send_error(request, Status.KEY_EEXISTS)
        elif result == StoreResult.NOT_FOUND:
            self.send_error(request, Status.KEY_ENOENT)
        elif request.opcode in (Opcode.ADD, Opcode.ADDQ):
            self.send_error(request, Status.KEY_EEXISTS)
        elif request.opcode in (Opcode.REPLACE, Opcode.REPLACEQ):
            self.send_error(request, Status.KEY_ENOENT)
        else:
            self.send_error(request, Status.NOT_STORED)

    # -- other item commands --

    def cmd_delete(self, request: Request) -> None:
        result = self.store.delete(request.key, request.cas)
        if result == StoreResult.STORED:
            self.stats.delete_hits += 1
            self.send_success(request)
        elif result == StoreResult.EXISTS:
            self.send_error(request, Status.KEY_EEXISTS)
        else:
            self.stats.delete_misses += 1
            self.send_error(request, Status.KEY_ENOENT)

    def cmd_incr(self, request: Request) -> None:
        self._arithmetic(request, incr=True)

    def cmd_decr(self, request: Request) -> None:
        self._arithmetic(request, incr=False)

    def _arithmetic(self, request: Request, incr: bool) -> None:
        delta, initial, exptime = _COUNTER_EXTRAS.unpack(request.extras)
        result, value, cas = self.store.incr(request.key, delta, incr, request.cas)
        name = "incr" if incr else "decr"
        if result == StoreResult.STORED:
            setattr(self.stats, name + "_hits", getattr(self.stats, name + "_hits") + 1)
            self.send_success(request, value=_COUNTER_VALUE.pack(value), cas=cas)
        elif result == StoreResult.NON_NUMERIC:
            self.log.info(
                "Rejected {command} from {peer}: the value is not a number",
                command=name,
                peer=self.connection.peer,
            )
            self.send_error(request, Status.DELTA_BADVAL)
        elif result == StoreResult.EXISTS:
            self.send_error(request, Status.KEY_EEXISTS)
        elif exptime == NO_CREATE_EXPIRY:
            setattr(self.stats, name + "_misses", getattr(self.stats, name + "_misses") + 1)
            self.send_error(request, Status.KEY_ENOENT)
        else:
            created, cas = self.store.store("add", request.key, b"%d" % initial, 0, exptime)
            if created == StoreResult.STORED:
                self.send_success(request, value=_COUNTER_VALUE.pack(initial), cas=cas)
            else:
                self.send_error(request, Status.NOT_STORED)

    # -- server commands --

    def cmd_noop(self, request: Request) -> None:
        self.send(request)

    def cmd_version(self, request: Request) -> None:
        self.send(request, value=PROTOCOL_VERSION)

    def cmd_quit(self, request: Request) -> None:
        self.send_success(request)
        self.connection.close()

    def cmd_flush(self, request: Request) -> None:
        if not self.settings.allow_destructive:
            # memcached started with flush disabled replies with an auth error.
            self.log.info("Rejected a flush from {peer}: flush is disabled", peer=self.connection.peer)
            self.send_error(request, Status.AUTH_ERROR)
            return
        delay = _U32.unpack(request.extras)[0] if request.extras else 0
        self.stats.cmd_flush += 1
        self.store.flush(delay)
        self.log.info("Binary flush from {peer} (delay {delay} s)", peer=self.connection.peer, delay=delay)
        self.send_success(request)

    def cmd_verbosity(self, request: Request) -> None:
        # NOTE: memcached 1.6.18 replies "Unknown command" to this opcode.
        # kvdaemon serves it as the binary protocol defines it, like the
        # text protocol's verbosity command.
        (self.factory.verbosity,) = _U32.unpack(request.extras)
        self.send(request)

    def cmd_stat(self, request: Request) -> None:
        factory = self.factory
        group = request.key
        if not group:
            lines = _stats.general_stats(
                self.stats, self.store, self.settings, factory.reactor.seconds(), self.settings.threads
            )
        elif group == b"settings":
            lines = _stats.settings_stats(self.settings, factory.listen_descriptions, factory.verbosity, factory.tcp_port)
        elif group == b"reset":
            factory.reset_stats()
            lines = []
        else:
            # memcached's binary stat also serves items, slabs and sizes,
            # which have no kvdaemon equivalent.  It does not serve conns.
            self.send_error(request, Status.KEY_ENOENT)
            return
        packets = [
            pack_response(request.opcode, request.opaque, key=name.encode(), value=str(value).encode())
            for name, value in lines
        ]
        packets.append(pack_response(request.opcode, request.opaque))
        self.connection.write_sequence(packets)

    # -- SASL --

    def cmd_sasl_list_mechs(self, request: Request) -> None:
        # memcached drops a connection's authentication when it lists the
        # mechanisms or starts a new exchange.
        self.authenticated = False
        self.send(request, value=MECHANISMS)

    def cmd_sasl_auth(self, request: Request) -> None:
        self.authenticated = False
        if len(request.key) > MAX_MECHANISM_LENGTH:
            self.send_error(request, Status.EINVAL)
            return
        self._finish_sasl(request, self.sasl.start(request.key, request.value))

    def cmd_sasl_step(self, request: Request) -> None:
        self.authenticated = False
        if len(request.key) > MAX_MECHANISM_LENGTH:
            self.send_error(request, Status.EINVAL)
            return
        self._finish_sasl(request, self.sasl.step(request.value))

    def _finish_sasl(self, request: Request, outcome: Outcome) -> None:
        if outcome.result is AuthResult.CONTINUE:
            self.send(request, Status.AUTH_CONTINUE)
            return
        self.stats.auth_cmds += 1
        if outcome.result is AuthResult.OK:
            self.authenticated = True
            self.log.debug("{peer} authenticated as {user}", peer=self.connection.peer, user=_printable(outcome.user))
            self.send(request, value=b"Authenticated")
            return
        self.stats.auth_errors += 1
        self.log.warn(
            "SASL authentication failed for {peer} (user {user}): {reason}",
            peer=self.connection.peer,
            user=_printable(outcome.user),
            reason=outcome.reason,
        )
        self.send_error(request, Status.AUTH_ERROR)


def _printable(name: bytes) -> str:
    """Decode a client-supplied name for a log line, escaping bytes that are not UTF-8."""
    return name.decode("utf-8", "backslashreplace")
