# -*- test-case-name: tests.test_binary_ranges -*-
"""
Range get (0x30) and range delete (0x37) for binary protocol clients, in
the request form of the memcached wiki's RangeOps page.

Request: the key is the start key (empty for no lower bound).  The extras
are the end key's length (u16), a reserved byte (0), a flags byte (bit 0:
start inclusive, bit 1: end inclusive), the maximum number of items (u32,
0 for no maximum), and then the end key itself, so the extras are 8 bytes
plus the end key (an empty end key means no upper bound).  There is no
value.

Range get replies with one response per item, shaped like a GETK reply
(4 bytes of flags as extras, the key, the value, the CAS in the header),
and ends with a response that has no key, extras or value, the way a
binary ``stat`` reply ends.  Range delete replies once, after the store
mutations: a success response whose value is the number of items deleted
as an 8-byte big-endian number.

Both run as the same streaming jobs as the text ``rget`` and ``rdelete``
(:class:`kvdaemon._ranges.RangeReadJob` and
:class:`kvdaemon._ranges.RangeDeleteJob`), with formatters that build
binary packets.

Errors:

- extras shorter than 8 bytes, or a value: "Invalid arguments" (0x04) and
  the connection is closed, like every binary request whose lengths are
  wrong;
- an end-key length that disagrees with the extras length: the same;
- flag bits other than bits 0 and 1, or a non-zero reserved byte:
  "Invalid arguments" (0x04), and the connection stays open;
- range delete while destructive commands are disabled: "Auth failure."
  (0x20), the reply memcached 1.6 sends for a binary flush when flush is
  disabled;
- the server already runs its maximum number of streams: 0x85 "Busy".
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Callable

from twisted.logger import Logger

from kvdaemon._binary import Command, Request, Status, expect, pack_response
from kvdaemon._ranges import KeyRange, RangeDeleteJob, RangeReadJob
from kvdaemon._store import Item

if TYPE_CHECKING:
    from kvdaemon._binary import BinaryHandler

RANGE_GET = 0x30
RANGE_DELETE = 0x37

#: end-key length, reserved, flags, max items; the end key follows.
RANGE_EXTRAS = struct.Struct(">HBBI")
START_INCLUSIVE = 0x01
END_INCLUSIVE = 0x02
_KNOWN_FLAGS = START_INCLUSIVE | END_INCLUSIVE

#: The largest extras length the header's u8 field can carry.
_MAX_EXTRAS_LENGTH = 255

#: kv_engine's "busy" status; memcached 1.6 has none for "too many streams".
STATUS_BUSY = 0x85
BUSY_TEXT = b"Busy"

_FLAGS = struct.Struct(">I")
_COUNT = struct.Struct(">Q")


class InvalidRangeRequest(ValueError):
    """
    A range request with invalid extras.

    ``close`` is true when the lengths disagree, after which the
    connection is closed as for any binary request with wrong lengths.
    """

    def __init__(self, reason: str, close: bool) -> None:
        super().__init__(reason)
        self.close = close


def parse_range_request(key: bytes, extras: bytes) -> KeyRange:
    """
    Build the key range of a 0x30 or 0x37 request.

    :raise InvalidRangeRequest: the extras are shorter than 8 bytes, the
        end-key length disagrees with them, or the flags or the reserved
        byte are invalid.
    """
    if len(extras) < RANGE_EXTRAS.size:
        raise InvalidRangeRequest("%d bytes of extras, expected at least %d" % (len(extras), RANGE_EXTRAS.size), True)
    end_length, reserved, flags, max_items = RANGE_EXTRAS.unpack_from(extras)
    if RANGE_EXTRAS.size + end_length != len(extras):
        raise InvalidRangeRequest(
            "end-key length %d does not match %d bytes of extras" % (end_length, len(extras)),
            True,
        )
    if flags & ~_KNOWN_FLAGS:
        raise InvalidRangeRequest("unknown flag bits 0x%02x" % (flags & ~_KNOWN_FLAGS,), False)
    if reserved:
        raise InvalidRangeRequest("reserved byte is 0x%02x, expected 0" % (reserved,), False)
    end = extras[RANGE_EXTRAS.size :]
    return KeyRange(
        key or None,
        end or None,
        bool(flags & START_INCLUSIVE),
        bool(flags & END_INCLUSIVE),
        max_items,
    )


def item_formatter(opaque: int) -> Callable[[bytes, Item], bytes]:
    """Return a function that packs one item as a GETK-shaped 0x30 response (runs on worker threads)."""

    def format_item(key: bytes, item: Item) -> bytes:
        return pack_response(RANGE_GET, opaque, key=key, extras=_FLAGS.pack(item.flags), value=item.value, cas=item.cas)

    return format_item


def count_formatter(opaque: int) -> Callable[[int], bytes]:
    """Return a function that packs the 0x37 reply for a number of deleted items."""

    def format_count(count: int) -> bytes:
        return pack_response(RANGE_DELETE, opaque, value=_COUNT.pack(count))

    return format_count


class BinaryRangeCommands:
    """The range opcodes of one binary connection (reactor thread only)."""

    log = Logger()

    def __init__(self, handler: BinaryHandler) -> None:
        self.handler = handler
        self.log = handler.connection.logger_for(self)

    def range_get(self, request: Request) -> None:
        key_range = self._parse(request)
        if key_range is None:
            return
        trailer = pack_response(RANGE_GET, request.opaque)
        job = RangeReadJob(self.handler.store, key_range, item_formatter(request.opaque), trailer)
        self._start(request, job)

    def range_delete(self, request: Request) -> None:
        peer = self.handler.connection.peer
        if not self.handler.settings.allow_destructive:
            self.log.info("Rejected a range delete from {peer}: destructive commands are disabled", peer=peer)
            self.handler.send_error(request, Status.AUTH_ERROR)
            return
        key_range = self._parse(request)
        if key_range is None:
            return
        job = RangeDeleteJob(self.handler.store, key_range, count_formatter(request.opaque), self._count_deleted)

        def log_deleted() -> None:
            self.log.info("Range delete from {peer} deleted {count} items", peer=peer, count=job.deleted)

        self._start(request, job, log_deleted)

    def _parse(self, request: Request) -> KeyRange | None:
        """Return the request's key range, or ``None`` after replying with an error."""
        try:
            return parse_range_request(request.key, request.extras)
        except InvalidRangeRequest as error:
            connection = self.handler.connection
            self.log.info(
                "Rejected range request 0x{opcode:02x} from {peer}: {reason}",
                opcode=request.opcode,
                peer=connection.peer,
                reason=str(error),
            )
            self.handler.send_error(request, Status.EINVAL)
            if error.close:
                connection.close()
            return None

    def _count_deleted(self, count: int) -> None:
        self.handler.stats.range_items_deleted += count

    def _start(
        self,
        request: Request,
        job: RangeReadJob | RangeDeleteJob,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        # start_stream logs the rejection with the number of streams.
        if not self.handler.connection.start_stream(job, on_done):
            self.handler.send(request, STATUS_BUSY, value=BUSY_TEXT)


def binary_commands(handler: BinaryHandler) -> dict[int, Command]:
    """Return the range opcodes' entries for :attr:`BinaryHandler.commands`."""
    commands = BinaryRangeCommands(handler)
    # Extras of 8 to 255 bytes, an optional start key and no value; the
    # end-key length inside the extras is checked when the request runs.
    check = expect(extras=tuple(range(RANGE_EXTRAS.size, _MAX_EXTRAS_LENGTH + 1)), key=None)
    return {
        RANGE_GET: Command(commands.range_get, check),
        RANGE_DELETE: Command(commands.range_delete, check),
    }
