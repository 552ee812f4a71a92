# -*- test-case-name: tests.test_scans -*-
"""
Resumable range scans for binary clients, in the form of Couchbase
kv_engine's range scan commands.

- ``0xDA`` create: the value is JSON, ``{"range": {"start": B64, "end": B64},
  "key_only": BOOL}``.  ``excl_start`` or ``excl_end`` in place of
  ``start`` or ``end`` leaves that key itself out of the range, and a
  bound left out entirely means no bound on that side (kv_engine requires
  both).  The reply's value is the new scan's 16-byte id.  Invalid JSON or
  base64, or a start after the end: 0x04.  No live key in the range: 0x01,
  as kv_engine does.  ``Settings.max_scans`` scans already open: 0x85.
- ``0xDB`` continue: 28 bytes of extras, the scan id and then three
  big-endian u32 limits: items, milliseconds and bytes (0 for none).  A
  continue sends at least one record unless the scan ends, whatever the
  limits, so the byte limit is soft.  The reply is a series of frames with
  status 0, 4 bytes of extras (0 for keys only, 1 for documents) and
  records packed in the value, then one last frame, without a body, with
  status 0xA6 (more: continue again), 0xA7 (complete: the scan is gone) or
  0xA5 (cancelled while this continue ran).  An unknown id gets 0x01; a
  scan that another connection is continuing, or a server that already
  runs its maximum number of streams, 0x85.
- ``0xDC`` cancel: the scan id as 16 bytes of extras.

A key record is ``uleb128(len(key)) key``.  A document record is a 25-byte
header (flags u32, expiry u32, seqno u64, CAS u64, datatype u8), then
``uleb128(len(key)) key uleb128(len(value)) value``.  kvdaemon keeps no
sequence numbers, so seqno carries the CAS unique, which grows with every
change just as a sequence number does.

A continue is a streaming job (:mod:`kvdaemon._streaming`): it runs on the
worker pool, its frames go through the connection's spool, and a client
that stops reading pauses it.  Between continues a scan holds only its
cursor (the last key sent).  Scans belong to the server, not to a
connection: any connection may continue or cancel a scan by its id.
Scans idle longer than ``Settings.scan_lifetime`` are dropped by a timer
on the reactor.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import struct
import time
from typing import TYPE_CHECKING, Any, Callable

import attrs
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from kvdaemon._binary import Command, Request, expect, pack_response
from kvdaemon._ranges import KeyRange, RangeCursor
from kvdaemon._stats import Stats
from kvdaemon._store import Item, Store
from kvdaemon._streaming import Spool

if TYPE_CHECKING:
    from kvdaemon._binary import BinaryHandler

SCAN_CREATE = 0xDA
SCAN_CONTINUE = 0xDB
SCAN_CANCEL = 0xDC

STATUS_SUCCESS = 0x00
#: No such scan, or (create) no key in the range.
STATUS_NOT_FOUND = 0x01
STATUS_INVALID = 0x04
STATUS_BUSY = 0x85
STATUS_CANCELLED = 0xA5
STATUS_MORE = 0xA6
STATUS_COMPLETE = 0xA7

SCAN_ID_LENGTH = 16
_CONTINUE_EXTRAS = struct.Struct(">16sIII")
_FRAME_EXTRAS = struct.Struct(">I")
#: flags, expiry, seqno, CAS, datatype.
_DOCUMENT_HEADER = struct.Struct(">IIQQB")

#: Records are packed into frames of about this many bytes.
FRAME_BYTES = 64 * 1024
#: Items one store read copies under the store lock.
BATCH_ITEMS = 256

_ERROR_TEXT = {
    STATUS_NOT_FOUND: b"Not found",
    STATUS_INVALID: b"Invalid arguments",
    STATUS_BUSY: b"Busy",
}


def uleb128(number: int) -> bytes:
    """Encode a non-negative integer as unsigned LEB128."""
    out = bytearray()
    while True:
        byte = number & 0x7F
        number >>= 7
        if number:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_key_record(key: bytes) -> bytes:
    """Pack one key-only record."""
    return uleb128(len(key)) + key


def encode_document_record(key: bytes, item: Item) -> bytes:
    """Pack one document record (header, key and value)."""
    header = _DOCUMENT_HEADER.pack(item.flags, item.exptime, item.cas, item.cas, 0)
    return b"".join((header, uleb128(len(key)), key, uleb128(len(item.value)), item.value))


def parse_create_request(value: bytes) -> tuple[KeyRange, bool]:
    """
    Parse a create request's JSON into a key range and the key-only flag.

    :raise ValueError: the JSON, the base64 or the range is invalid.
    """
    try:
        document = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError("invalid JSON: %s" % (error,))
    if not isinstance(document, dict) or not isinstance(document.get("range"), dict):
        raise ValueError('expected an object with a "range" object')
    bounds = document["range"]
    key_only = document.get("key_only", False)
    if not isinstance(key_only, bool):
        raise ValueError('"key_only" must be true or false')

    def bound(inclusive_name: str, exclusive_name: str) -> tuple[bytes | None, bool]:
        if inclusive_name in bounds and exclusive_name in bounds:
            raise ValueError('"%s" and "%s" exclude each other' % (inclusive_name, exclusive_name))
        name = inclusive_name if inclusive_name in bounds else exclusive_name
        if name not in bounds:
            return None, True
        encoded = bounds[name]
        if not isinstance(encoded, str):
            raise ValueError('"%s" must be a base64 string' % (name,))
        try:
            return base64.b64decode(encoded, validate=True), name == inclusive_name
        except ValueError:
            # binascii.Error for bad padding or characters, ValueError for
            # characters outside ASCII.
            raise ValueError('"%s" is not valid base64' % (name,))

    start, start_inclusive = bound("start", "excl_start")
    end, end_inclusive = bound("end", "excl_end")
    if start is not None and end is not None and (start > end or (start == end and not (start_inclusive and end_inclusive))):
        raise ValueError("the range is empty: start is after end")
    return KeyRange(start, end, start_inclusive, end_inclusive), key_only


@attrs.define(eq=False)
class Scan:
    """One open scan: its range, what it returns, and its cursor."""

    scan_id: bytes
    #: The position after the records already handed to a transport;
    #: replaced (never changed in place) on the reactor thread.
    cursor: RangeCursor
    key_only: bool
    #: reactor.seconds() when a continue last finished, or at creation.
    last_used: float
    #: True while a continue streams.
    busy: bool = False
    #: Set by a cancel; a running continue stops at its next record.
    cancelled: bool = False


class ScanRegistry:
    """
    The open scans of one server (reactor thread only, except that a
    running continue reads :attr:`Scan.cancelled` from its worker).

    :param stats: returns the server's current :class:`Stats`; a call
        each time, because ``stats reset`` replaces the object.
    """

    log = Logger()

    def __init__(
        self,
        store: Store,
        reactor: Any,
        max_scans: int,
        lifetime: float,
        stats: Callable[[], Stats],
    ) -> None:
        self.store = store
        self.reactor = reactor
        self.max_scans = max_scans
        self.lifetime = lifetime
        self._stats = stats
        self.scans: dict[bytes, Scan] = {}
        self._expiry = LoopingCall(self.expire_idle)
        self._expiry.clock = reactor

    @property
    def full(self) -> bool:
        """Whether :attr:`max_scans` scans are open."""
        return len(self.scans) >= self.max_scans

    def create(self, key_range: KeyRange, key_only: bool) -> Scan:
        """Open a scan (the caller checks :attr:`full` first)."""
        scan = Scan(os.urandom(SCAN_ID_LENGTH), RangeCursor(self.store, key_range), key_only, self.reactor.seconds())
        self.scans[scan.scan_id] = scan
        stats = self._stats()
        stats.scans_created += 1
        stats.scans_open = len(self.scans)
        if not self._expiry.running:
            # Checking four times per lifetime (at least every 5 seconds)
            # drops an idle scan at most a quarter lifetime late.
            self._expiry.start(max(min(self.lifetime / 4, 5.0), 0.05), now=False)
        return scan

    def remove(self, scan: Scan, counter: str) -> None:
        """Forget ``scan`` and count why (a ``Stats`` field name)."""
        if self.scans.pop(scan.scan_id, None) is scan:
            stats = self._stats()
            setattr(stats, counter, getattr(stats, counter) + 1)
            stats.scans_open = len(self.scans)
        if not self.scans and self._expiry.running:
            self._expiry.stop()

    def expire_idle(self) -> None:
        """Drop scans that no continue has used for :attr:`lifetime` seconds."""
        deadline = self.reactor.seconds() - self.lifetime
        for scan in list(self.scans.values()):
            if not scan.busy and scan.last_used <= deadline:
                self.log.info(
                    "Range scan {scan_id} expired after {lifetime} idle seconds",
                    scan_id=scan.scan_id.hex(),
                    lifetime=self.lifetime,
                )
                self.remove(scan, "scans_expired")

    def close(self) -> None:
        """Cancel every scan and stop the expiry timer (service shutdown)."""
        for scan in list(self.scans.values()):
            scan.cancelled = True
            self.remove(scan, "scans_cancelled")
        if self._expiry.running:
            self._expiry.stop()


class ContinueJob:
    """
    One continue of a scan, streamed as 0xDB frames.

    The steps advance a copy of the scan's cursor, and :meth:`after_step`
    stores a copy of it in the scan on the reactor thread once the step's
    frames went to the transport.  A step that runs on after its stream
    was cancelled (the connection was lost) so never moves the cursor that
    a later continue starts from, and that continue sends the interrupted
    step's records again.

    :param limits: item count, milliseconds and bytes (0 for no limit).
    """

    def __init__(self, registry: ScanRegistry, scan: Scan, opaque: int, limits: tuple[int, int, int]) -> None:
        self.registry = registry
        self.scan = scan
        self.opaque = opaque
        self.item_limit, time_limit_ms, self.byte_limit = limits
        self.deadline = time.monotonic() + time_limit_ms / 1000.0 if time_limit_ms else None
        self.items_sent = 0
        self.bytes_sent = 0
        self._cursor = copy.copy(scan.cursor)
        self._extras = _FRAME_EXTRAS.pack(0 if scan.key_only else 1)

    def _frame(self, records: list[bytes], status: int = STATUS_SUCCESS) -> bytes:
        return pack_response(SCAN_CONTINUE, self.opaque, status, extras=self._extras, value=b"".join(records))

    def _limit_reached(self) -> bool:
        if not self.items_sent:
            # Every continue returns at least one record unless the scan ends.
            return False
        if self.item_limit and self.items_sent >= self.item_limit:
            return True
        if self.byte_limit and self.bytes_sent >= self.byte_limit:
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline

    def run_step(self, spool: Spool) -> int | None:
        """
        Send frames of records (worker thread).

        :return: the status of the last frame once this continue is over
            (more, complete or cancelled), or ``None`` when the spool ended
            the step and another step should follow.
        """
        scan = self.scan
        cursor = self._cursor
        records: list[bytes] = []
        frame_bytes = 0
        while True:
            if scan.cancelled:
                return STATUS_CANCELLED
            if spool.cancelled:
                return None
            if self._limit_reached():
                status = STATUS_MORE
                break
            batch = cursor.next_batch(BATCH_ITEMS, FRAME_BYTES)
            if not batch:
                status = STATUS_COMPLETE
                break
            for key, item in batch:
                record = encode_key_record(key) if scan.key_only else encode_document_record(key, item)
                records.append(record)
                frame_bytes += len(record)
                cursor.take(key)
                self.items_sent += 1
                self.bytes_sent += len(key) + (0 if scan.key_only else len(item.value))
                if self._limit_reached():
                    break
            if frame_bytes >= FRAME_BYTES:
                go_on = spool.write(self._frame(records))
                records, frame_bytes = [], 0
                if not go_on:
                    return None
        if records:
            spool.write(self._frame(records))
        return status

    def release(self) -> None:
        """Free the scan for another continue after the stream was cancelled (reactor thread)."""
        self.scan.busy = False
        self.scan.last_used = self.registry.reactor.seconds()

    def after_step(self, status: int | None) -> bytes | None:
        scan = self.scan
        if scan.cancelled:
            status = STATUS_CANCELLED
        else:
            scan.cursor = copy.copy(self._cursor)
        if status is None:
            return None
        self.release()
        if status == STATUS_COMPLETE:
            self.registry.remove(scan, "scans_completed")
        return pack_response(SCAN_CONTINUE, self.opaque, status)


class ScanCommands:
    """The binary protocol's scan opcodes, for one connection."""

    log = Logger()

    def __init__(self, handler: BinaryHandler) -> None:
        self.handler = handler
        self.log = handler.connection.logger_for(self)
        factory = handler.connection.factory
        if factory.scans is None:
            factory.scans = ScanRegistry(
                factory.store,
                factory.reactor,
                factory.settings.max_scans,
                factory.settings.scan_lifetime,
                lambda: factory.stats,
            )
        self.registry: ScanRegistry = factory.scans

    def _error(self, request: Request, status: int, reason: str) -> None:
        self.log.info(
            "Range scan request 0x{opcode:02x} from {peer} failed: {reason}",
            opcode=request.opcode,
            peer=self.handler.connection.peer,
            reason=reason,
        )
        self.handler.send(request, status, value=_ERROR_TEXT.get(status, b""))

    def create(self, request: Request) -> None:
        try:
            key_range, key_only = parse_create_request(request.value)
        except ValueError as error:
            self._error(request, STATUS_INVALID, str(error))
            return
        if self.registry.full:
            self._error(request, STATUS_BUSY, "%d scans already open" % (self.registry.max_scans,))
            return
        # kv_engine rejects a create over a range without keys with "not
        # found".  Reading one item here holds the store lock only briefly.
        if not RangeCursor(self.handler.store, key_range).next_batch(1, 0):
            self._error(request, STATUS_NOT_FOUND, "no key in the range")
            return
        scan = self.registry.create(key_range, key_only)
        self.handler.send(request, value=scan.scan_id)

    def continue_(self, request: Request) -> None:
        scan_id, item_limit, time_limit, byte_limit = _CONTINUE_EXTRAS.unpack(request.extras)
        scan = self.registry.scans.get(scan_id)
        if scan is None:
            self._error(request, STATUS_NOT_FOUND, "no scan %s" % (scan_id.hex(),))
            return
        if scan.busy:
            self._error(request, STATUS_BUSY, "scan %s is already continuing" % (scan_id.hex(),))
            return
        scan.busy = True
        job = ContinueJob(self.registry, scan, request.opaque, (item_limit, time_limit, byte_limit))
        if not self.handler.connection.start_stream(job):
            scan.busy = False
            # start_stream has logged the rejection.
            self.handler.send(request, STATUS_BUSY, value=_ERROR_TEXT.get(STATUS_BUSY, b""))

    def cancel(self, request: Request) -> None:
        scan = self.registry.scans.get(request.extras)
        if scan is None:
            self._error(request, STATUS_NOT_FOUND, "no scan %s" % (request.extras.hex(),))
            return
        scan.cancelled = True
        self.registry.remove(scan, "scans_cancelled")
        self.handler.send(request)


def binary_commands(handler: BinaryHandler) -> dict[int, Command]:
    """Return the scan opcodes' entries for :attr:`BinaryHandler.commands`."""
    commands = ScanCommands(handler)
    return {
        SCAN_CREATE: Command(commands.create, expect(extras=(0,), key=False, value=True)),
        SCAN_CONTINUE: Command(commands.continue_, expect(extras=(_CONTINUE_EXTRAS.size,), key=False)),
        SCAN_CANCEL: Command(commands.cancel, expect(extras=(SCAN_ID_LENGTH,), key=False)),
    }
