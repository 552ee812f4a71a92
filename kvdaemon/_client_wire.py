# -*- test-case-name: tests.test_client -*-
"""
The wire formats behind :mod:`kvdaemon.client`: binary protocol request
packets, the responses of get, set, delete, range get (RangeOps opcode
0x30), range delete (0x37) and kv_engine's resumable range scans (0xDA to
0xDC), and the records those carry.

Range scan continue frames pack records back to back.  A key-only frame
holds ``[LEB128 length][key]`` per record; a document frame holds 25 bytes
of metadata (flags u32, expiry u32, seqno u64, CAS u64, datatype u8, all
big-endian), then ``[LEB128 length][key][LEB128 length][value]``.  The
lengths are unsigned LEB128: 7 bits a byte, least significant group first,
with the high bit set on every byte but the last.
"""

from __future__ import annotations

import base64
import enum
import json
import struct
from typing import Callable

import attrs

#: magic, opcode, key length, extras length, data type, vbucket (request)
#: or status (response), total body length, opaque, CAS.
HEADER = struct.Struct(">BBHBBHIIQ")
REQUEST_MAGIC = 0x80
RESPONSE_MAGIC = 0x81

#: The fixed part of range get and range delete extras: end key length,
#: reserved, flags (bit 0 start inclusive, bit 1 end inclusive) and max
#: items.  The end key follows inside the extras.
_RANGE_EXTRAS = struct.Struct(">HBBI")
_START_INCLUSIVE = 0x01
_END_INCLUSIVE = 0x02

#: Range scan continue extras after the 16-byte scan id: item limit, time
#: limit in milliseconds, byte limit.
CONTINUE_LIMITS = struct.Struct(">III")
#: The per-document metadata of a range scan frame: flags, expiry, seqno,
#: CAS, datatype.
_DOCUMENT_META = struct.Struct(">IIQQB")

U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
STORAGE_EXTRAS = struct.Struct(">II")

#: The datatype bit that marks a JSON value.
DATATYPE_JSON = 0x01

#: memcached's key length limit.
MAX_KEY_LENGTH = 250
#: The maximum end key length of a range get or range delete.  The end key
#: is part of the extras, whose length field is one byte, after 8 fixed
#: bytes.
MAX_RANGE_END_LENGTH = 255 - _RANGE_EXTRAS.size
#: The length of a range scan id.
SCAN_ID_LENGTH = 16

#: The largest key there can be, so an inclusive upper bound for a scan
#: with no end: every key of at most 250 bytes sorts at or before it.
_LAST_KEY = b"\xff" * MAX_KEY_LENGTH

_U32_MAX = 2**32 - 1


class Opcode(enum.IntEnum):
    """The binary protocol opcodes this client sends."""

    GET = 0x00
    SET = 0x01
    DELETE = 0x04
    RANGE_GET = 0x30
    RANGE_DELETE = 0x37
    RANGE_SCAN_CREATE = 0xDA
    RANGE_SCAN_CONTINUE = 0xDB
    RANGE_SCAN_CANCEL = 0xDC


class ResponseStatus(enum.IntEnum):
    """
    Response statuses of memcached's binary protocol and of kv_engine's
    range scans.  ``NOT_FOUND`` also means "no such scan" for continue and
    cancel, and "no key in the range" for create.
    """

    SUCCESS = 0x00
    NOT_FOUND = 0x01
    EXISTS = 0x02
    TOO_LARGE = 0x03
    INVALID_ARGUMENTS = 0x04
    NOT_STORED = 0x05
    NON_NUMERIC = 0x06
    AUTH_ERROR = 0x20
    AUTH_CONTINUE = 0x21
    UNKNOWN_COMMAND = 0x81
    OUT_OF_MEMORY = 0x82
    BUSY = 0x85
    RANGE_SCAN_CANCELLED = 0xA5
    RANGE_SCAN_MORE = 0xA6
    RANGE_SCAN_COMPLETE = 0xA7


class KVStatusError(Exception):
    """
    The server replied to a request with an error status.

    :ivar opcode: the request's opcode.
    :ivar status: the response status, a :class:`ResponseStatus` when the
        client knows the number, else an ``int``.
    :ivar message: the text the server sent with the error, decoded as
        UTF-8 (undecodable bytes replaced).
    """

    def __init__(self, opcode: int, status: int, message: str) -> None:
        try:
            status = ResponseStatus(status)
        except ValueError:
            pass
        super().__init__(opcode, status, message)
        self.opcode = opcode
        self.status = status
        self.message = message

    def __str__(self) -> str:
        name = self.status.name if isinstance(self.status, ResponseStatus) else "unknown status"
        return "opcode 0x%02x failed with status 0x%02x (%s): %s" % (self.opcode, self.status, name, self.message)


class KVProtocolError(Exception):
    """
    The server sent bytes that are not a valid response.  The client closes
    the connection, and every request still waiting fails with this error.
    """


@attrs.frozen
class Record:
    """
    One item returned by a range get or a range scan.

    ``value`` is ``None`` for a key-only scan.  Range get and get fill in
    ``flags``, ``cas`` and ``datatype`` but leave ``expiry`` and ``seqno``
    at 0, because their responses do not carry them.
    """

    key: bytes
    value: bytes | None
    flags: int = 0
    expiry: int = 0
    cas: int = 0
    seqno: int = 0
    datatype: int = 0


# -- wire format --


@attrs.frozen
class Response:
    """One response packet."""

    opcode: int
    status: int
    datatype: int
    opaque: int
    cas: int
    extras: bytes
    key: bytes
    value: bytes

    def error(self) -> KVStatusError:
        """Return the error this response reports."""
        return KVStatusError(self.opcode, self.status, self.value.decode("utf-8", "replace"))


def pack_request(
    opcode: int,
    opaque: int,
    *,
    key: bytes = b"",
    extras: bytes = b"",
    value: bytes = b"",
    cas: int = 0,
    datatype: int = 0,
) -> bytes:
    """Build one request packet."""
    body_length = len(extras) + len(key) + len(value)
    header = HEADER.pack(REQUEST_MAGIC, opcode, len(key), len(extras), datatype, 0, body_length, opaque, cas)
    return b"".join((header, extras, key, value))


def read_uleb128(data: bytes, offset: int) -> tuple[int, int]:
    """
    Decode the unsigned LEB128 number at ``offset``: 7 bits a byte, least
    significant group first, high bit set on every byte but the last.

    :return: the number and the offset just after it.
    :raise KVProtocolError: the number is truncated or longer than 64 bits.
    """
    number = 0
    shift = 0
    while True:
        if offset >= len(data):
            raise KVProtocolError("truncated LEB128 length at the end of a range scan frame")
        byte = data[offset]
        offset += 1
        number |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 63:
            raise KVProtocolError("LEB128 length longer than 64 bits in a range scan frame")
    if number >= 2**64:
        raise KVProtocolError("LEB128 length longer than 64 bits in a range scan frame")
    return number, offset


def _read_sized(data: bytes, offset: int, field: str) -> tuple[bytes, int]:
    """Read a LEB128 length and that many bytes after it."""
    length, offset = read_uleb128(data, offset)
    end = offset + length
    if end > len(data):
        raise KVProtocolError(
            "%s length %d runs past the end of a range scan frame (%d bytes left)" % (field, length, len(data) - offset)
        )
    return data[offset:end], end


def decode_scan_keys(data: bytes) -> list[Record]:
    """Decode a key-only range scan frame value: ``[LEB128 length][key]`` repeated."""
    records = []
    offset = 0
    while offset < len(data):
        key, offset = _read_sized(data, offset, "key")
        records.append(Record(key, None))
    return records


def decode_scan_documents(data: bytes) -> list[Record]:
    """
    Decode a document range scan frame value: for each document, 25 bytes
    of metadata, then ``[LEB128 length][key][LEB128 length][value]``.
    """
    records = []
    offset = 0
    while offset < len(data):
        if offset + _DOCUMENT_META.size > len(data):
            raise KVProtocolError("truncated document metadata in a range scan frame")
        flags, expiry, seqno, cas, datatype = _DOCUMENT_META.unpack_from(data, offset)
        key, offset = _read_sized(data, offset + _DOCUMENT_META.size, "key")
        value, offset = _read_sized(data, offset, "value")
        records.append(Record(key, value, flags, expiry, cas, seqno, datatype))
    return records


def check_key(key: bytes, field: str = "key", limit: int = MAX_KEY_LENGTH, allow_empty: bool = True) -> None:
    if not isinstance(key, bytes):
        raise TypeError("%s must be bytes, not %s" % (field, type(key).__name__))
    if not key and not allow_empty:
        raise ValueError("%s must not be empty" % field)
    if len(key) > limit:
        raise ValueError("%s is %d bytes long; the maximum is %d" % (field, len(key), limit))


def check_u32(value: int, field: str) -> None:
    if not 0 <= value <= _U32_MAX:
        raise ValueError("%s must be between 0 and %d, not %d" % (field, _U32_MAX, value))


def check_scan_id(scan_id: bytes) -> None:
    if not isinstance(scan_id, bytes) or len(scan_id) != SCAN_ID_LENGTH:
        raise ValueError("a scan id must be %d bytes, not %r" % (SCAN_ID_LENGTH, scan_id))


def range_extras(
    end: bytes | None, start_inclusive: bool, end_inclusive: bool, max_items: int
) -> bytes:
    end = end or b""
    check_key(end, "end key", MAX_RANGE_END_LENGTH)
    check_u32(max_items, "max_items")
    flags = 0
    if start_inclusive:
        flags |= _START_INCLUSIVE
    if end_inclusive:
        flags |= _END_INCLUSIVE
    return _RANGE_EXTRAS.pack(len(end), 0, flags, max_items) + end


def scan_create_body(
    start: bytes | None, end: bytes | None, exclusive_start: bool, exclusive_end: bool, key_only: bool
) -> bytes:
    """
    Build the JSON value of a range scan create request, with base64 keys
    under ``start``/``excl_start`` and ``end``/``excl_end``.

    kv_engine requires both bounds, so a missing start is the empty key
    and a missing end is the largest possible key, inclusive.
    """
    start = start or b""
    check_key(start, "start key")
    bounds = {("excl_start" if exclusive_start else "start"): base64.b64encode(start).decode("ascii")}
    if end is None:
        bounds["end"] = base64.b64encode(_LAST_KEY).decode("ascii")
    else:
        check_key(end, "end key")
        bounds["excl_end" if exclusive_end else "end"] = base64.b64encode(end).decode("ascii")
    return json.dumps({"range": bounds, "key_only": key_only}).encode("ascii")


# -- response parsers --


def parse_get(key: bytes) -> Callable[[Response], Record | None]:
    def parse(response: Response) -> Record | None:
        if response.status == ResponseStatus.NOT_FOUND:
            return None
        if response.status != ResponseStatus.SUCCESS:
            raise response.error()
        if len(response.extras) != U32.size:
            raise KVProtocolError("get response with %d bytes of extras; expected 4 (flags)" % len(response.extras))
        (flags,) = U32.unpack(response.extras)
        return Record(key, response.value, flags=flags, cas=response.cas, datatype=response.datatype)

    return parse


def parse_set(response: Response) -> int:
    if response.status != ResponseStatus.SUCCESS:
        raise response.error()
    return response.cas


def parse_delete(response: Response) -> bool:
    if response.status == ResponseStatus.NOT_FOUND:
        return False
    if response.status != ResponseStatus.SUCCESS:
        raise response.error()
    return True


def parse_range_delete(response: Response) -> int:
    if response.status != ResponseStatus.SUCCESS:
        raise response.error()
    # kvdaemon sends the count as an 8-byte big-endian value, the way incr
    # and decr return numbers.
    if len(response.value) != U64.size:
        raise KVProtocolError("range delete response with a %d-byte value; expected 8 (the count)" % len(response.value))
    return U64.unpack(response.value)[0]


def parse_scan_create(response: Response) -> bytes:
    if response.status != ResponseStatus.SUCCESS:
        raise response.error()
    if len(response.value) != SCAN_ID_LENGTH:
        raise KVProtocolError(
            "range scan create response with a %d-byte value; expected a %d-byte scan id"
            % (len(response.value), SCAN_ID_LENGTH)
        )
    return response.value


def parse_success(response: Response) -> None:
    if response.status != ResponseStatus.SUCCESS:
        raise response.error()


