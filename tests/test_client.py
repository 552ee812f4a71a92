"""
Tests for kvdaemon.client: the wire formats and the protocol against
StringTransport with hand-built response packets, then the client against
a real in-process kvdaemon.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionAborted, ConnectionClosed, ConnectionDone, ConnectionLost
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from kvdaemon import KVClientProtocol, KVProtocolError, KVStatusError, Record, ResponseStatus, Settings, connect
from kvdaemon._client_wire import decode_scan_documents, decode_scan_keys, read_uleb128, scan_create_body
from tests.support import start_server

HEADER = struct.Struct(">BBHBBHIIQ")
RANGE_EXTRAS = struct.Struct(">HBBI")
DOCUMENT_META = struct.Struct(">IIQQB")

GET = 0x00
SET = 0x01
DELETE = 0x04
RANGE_GET = 0x30
RANGE_DELETE = 0x37
SCAN_CREATE = 0xDA
SCAN_CONTINUE = 0xDB
SCAN_CANCEL = 0xDC

KEYS_ONLY = struct.pack(">I", 0)
DOCUMENTS = struct.pack(">I", 1)
SCAN_ID = bytes(range(16))


# -- helpers: an independent encoder for the server's side of the wire --


def uleb128(number: int) -> bytes:
    """Encode ``number`` as unsigned LEB128."""
    out = bytearray()
    while True:
        low = number & 0x7F
        number >>= 7
        if number:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def response(
    opcode: int,
    opaque: int,
    status: int = 0,
    *,
    key: bytes = b"",
    extras: bytes = b"",
    value: bytes = b"",
    cas: int = 0,
    datatype: int = 0,
    magic: int = 0x81,
) -> bytes:
    """Build one response packet."""
    body = extras + key + value
    header = HEADER.pack(magic, opcode, len(key), len(extras), datatype, status, len(body), opaque, cas)
    return header + body


def key_record(key: bytes) -> bytes:
    return uleb128(len(key)) + key


def document_record(key: bytes, value: bytes, flags: int = 0, expiry: int = 0, seqno: int = 0, cas: int = 0) -> bytes:
    meta = DOCUMENT_META.pack(flags, expiry, seqno, cas, 0)
    return meta + uleb128(len(key)) + key + uleb128(len(value)) + value


def range_item(opaque: int, key: bytes, value: bytes, flags: int = 0, cas: int = 0) -> bytes:
    """A GETK-shaped range get response for one item."""
    return response(RANGE_GET, opaque, key=key, extras=struct.pack(">I", flags), value=value, cas=cas)


def parse_requests(data: bytes) -> list[dict[str, Any]]:
    """Split the bytes a client wrote into request packets."""
    requests = []
    offset = 0
    while offset < len(data):
        magic, opcode, key_length, extras_length, datatype, vbucket, body_length, opaque, cas = HEADER.unpack_from(
            data, offset
        )
        body = data[offset + HEADER.size : offset + HEADER.size + body_length]
        requests.append(
            {
                "magic": magic,
                "opcode": opcode,
                "datatype": datatype,
                "opaque": opaque,
                "cas": cas,
                "extras": body[:extras_length],
                "key": body[extras_length : extras_length + key_length],
                "value": body[extras_length + key_length :],
            }
        )
        offset += HEADER.size + body_length
    return requests


def connected_client() -> tuple[KVClientProtocol, StringTransport]:
    client = KVClientProtocol()
    transport = StringTransport()
    client.makeConnection(transport)
    return client, transport


def last_request(transport: StringTransport) -> dict[str, Any]:
    return parse_requests(transport.value())[-1]


# -- wire formats --


class ReadUleb128Tests(SynchronousTestCase):
    def test_uleb128_one_byte(self) -> None:
        self.assertEqual(read_uleb128(b"\x00", 0), (0, 1))
        self.assertEqual(read_uleb128(b"\x7f", 0), (127, 1))

    def test_uleb128_multi_byte(self) -> None:
        self.assertEqual(read_uleb128(b"\x80\x01", 0), (128, 2))
        self.assertEqual(read_uleb128(b"\xac\x02", 0), (300, 2))
        self.assertEqual(read_uleb128(b"\xff\x7f", 0), (16383, 2))
        self.assertEqual(read_uleb128(b"\x80\x80\x01", 0), (16384, 3))

    def test_uleb128_round_trips(self) -> None:
        for number in [0, 1, 127, 128, 255, 16383, 16384, 2**21, 2**32 - 1, 2**32, 2**63, 2**64 - 1]:
            encoded = uleb128(number)
            self.assertEqual(read_uleb128(encoded, 0), (number, len(encoded)), number)

    def test_uleb128_from_offset(self) -> None:
        data = b"xyz" + uleb128(1000) + b"rest"
        self.assertEqual(read_uleb128(data, 3), (1000, 5))

    def test_uleb128_truncated(self) -> None:
        for data in [b"", b"\x80", b"\xff\xff"]:
            with self.assertRaises(KVProtocolError):
                read_uleb128(data, 0)

    def test_uleb128_over_64_bits(self) -> None:
        with self.assertRaises(KVProtocolError):
            read_uleb128(uleb128(2**64), 0)
        with self.assertRaises(KVProtocolError):
            read_uleb128(b"\x80" * 10 + b"\x01", 0)


class DecodeScanRecordsTests(SynchronousTestCase):
    def test_decode_keys_kv_engine_example(self) -> None:
        # The layout kv_engine documents: key0, key11, then a 128-byte key
        # whose length takes two LEB128 bytes.
        long_key = b"key2" + b"2" * 123 + b"3"
        data = b"\x04key0" + b"\x05key11" + b"\x80\x01" + long_key
        records = decode_scan_keys(data)
        self.assertEqual([record.key for record in records], [b"key0", b"key11", long_key])
        self.assertEqual({record.value for record in records}, {None})

    def test_decode_keys_three_byte_length(self) -> None:
        key = b"k" * 20000
        records = decode_scan_keys(key_record(key) + key_record(b"a"))
        self.assertEqual([record.key for record in records], [key, b"a"])

    def test_decode_documents(self) -> None:
        value = b"v" * 300
        data = document_record(b"key0", b"value0", flags=7, expiry=1700000000, seqno=11, cas=12) + document_record(
            b"k1", value, seqno=13, cas=14
        )
        records = decode_scan_documents(data)
        self.assertEqual(
            records,
            [
                Record(b"key0", b"value0", flags=7, expiry=1700000000, cas=12, seqno=11, datatype=0),
                Record(b"k1", value, cas=14, seqno=13),
            ],
        )

    def test_decode_documents_empty_value(self) -> None:
        self.assertEqual(decode_scan_documents(document_record(b"k", b"")), [Record(b"k", b"")])

    def test_decode_keys_truncated_key(self) -> None:
        with self.assertRaises(KVProtocolError):
            decode_scan_keys(b"\x05key")

    def test_decode_documents_truncated_metadata(self) -> None:
        with self.assertRaises(KVProtocolError):
            decode_scan_documents(document_record(b"k", b"v")[:20])

    def test_decode_documents_value_past_end(self) -> None:
        with self.assertRaises(KVProtocolError):
            decode_scan_documents(document_record(b"k", b"value")[:-1])


class ScanCreateBodyTests(SynchronousTestCase):
    def test_create_body_inclusive_bounds(self) -> None:
        body = json.loads(scan_create_body(b"user", b"user\xff", False, False, False))
        self.assertEqual(body, {"range": {"start": "dXNlcg==", "end": "dXNlcv8="}, "key_only": False})

    def test_create_body_exclusive_bounds(self) -> None:
        body = json.loads(scan_create_body(b"a", b"b", True, True, True))
        self.assertEqual(body, {"range": {"excl_start": "YQ==", "excl_end": "Yg=="}, "key_only": True})

    def test_create_body_no_bounds(self) -> None:
        body = json.loads(scan_create_body(None, None, False, True, False))
        self.assertEqual(body["range"]["start"], "")
        self.assertEqual(base64.b64decode(body["range"]["end"]), b"\xff" * 250)
        self.assertNotIn("excl_end", body["range"])

    def test_create_body_key_too_long(self) -> None:
        with self.assertRaises(ValueError):
            scan_create_body(b"k" * 251, None, False, False, False)


# -- requests as written --


class RequestEncodingTests(SynchronousTestCase):
    def test_range_get_request(self) -> None:
        client, transport = connected_client()
        client.range_get(b"a", b"zz", lambda record: None, start_inclusive=True, end_inclusive=True, max_items=9)
        request = last_request(transport)
        self.assertEqual(request["magic"], 0x80)
        self.assertEqual(request["opcode"], RANGE_GET)
        self.assertEqual(request["key"], b"a")
        self.assertEqual(request["extras"], RANGE_EXTRAS.pack(2, 0, 0x03, 9) + b"zz")
        self.assertEqual(request["value"], b"")

    def test_range_get_request_flags(self) -> None:
        for start_inclusive, end_inclusive, flags in [(False, False, 0), (True, False, 1), (False, True, 2)]:
            client, transport = connected_client()
            client.range_get(b"a", b"b", print, start_inclusive=start_inclusive, end_inclusive=end_inclusive)
            self.assertEqual(last_request(transport)["extras"][3], flags)

    def test_range_get_request_unbounded(self) -> None:
        client, transport = connected_client()
        client.range_get(None, None, print)
        request = last_request(transport)
        self.assertEqual(request["key"], b"")
        self.assertEqual(request["extras"], RANGE_EXTRAS.pack(0, 0, 0x01, 0))

    def test_range_get_rejects_long_keys(self) -> None:
        client, transport = connected_client()
        with self.assertRaises(ValueError):
            client.range_get(b"a", b"e" * 248, print)
        with self.assertRaises(ValueError):
            client.range_get(b"s" * 251, None, print)
        with self.assertRaises(ValueError):
            client.range_get(b"a", b"b", print, max_items=-1)
        self.assertEqual(transport.value(), b"")

    def test_range_get_longest_end_key(self) -> None:
        client, transport = connected_client()
        client.range_get(b"a", b"e" * 247, print)
        self.assertEqual(len(last_request(transport)["extras"]), 255)

    def test_range_delete_request(self) -> None:
        client, transport = connected_client()
        client.range_delete(b"a", b"m", end_inclusive=True, max_items=3)
        request = last_request(transport)
        self.assertEqual(request["opcode"], RANGE_DELETE)
        self.assertEqual(request["key"], b"a")
        self.assertEqual(request["extras"], RANGE_EXTRAS.pack(1, 0, 0x03, 3) + b"m")

    def test_create_scan_request(self) -> None:
        client, transport = connected_client()
        client.create_scan(b"a", b"b", key_only=True)
        request = last_request(transport)
        self.assertEqual(request["opcode"], SCAN_CREATE)
        self.assertEqual(request["datatype"], 0x01)
        self.assertEqual(request["extras"], b"")
        self.assertEqual(request["key"], b"")
        self.assertEqual(json.loads(request["value"]), {"range": {"start": "YQ==", "end": "Yg=="}, "key_only": True})

    def test_continue_scan_request(self) -> None:
        client, transport = connected_client()
        client.continue_scan(SCAN_ID, print, item_limit=5, time_limit_ms=6, byte_limit=7)
        request = last_request(transport)
        self.assertEqual(request["opcode"], SCAN_CONTINUE)
        self.assertEqual(request["extras"], SCAN_ID + struct.pack(">III", 5, 6, 7))
        self.assertEqual(request["key"] + request["value"], b"")

    def test_continue_scan_rejects_bad_id(self) -> None:
        client, transport = connected_client()
        with self.assertRaises(ValueError):
            client.continue_scan(b"short", print)
        with self.assertRaises(ValueError):
            client.cancel_scan(SCAN_ID + b"x")
        self.assertEqual(transport.value(), b"")

    def test_cancel_scan_request(self) -> None:
        client, transport = connected_client()
        client.cancel_scan(SCAN_ID)
        request = last_request(transport)
        self.assertEqual(request["opcode"], SCAN_CANCEL)
        self.assertEqual(request["extras"], SCAN_ID)

    def test_set_request(self) -> None:
        client, transport = connected_client()
        client.set(b"k", b"value", flags=5, exptime=60)
        request = last_request(transport)
        self.assertEqual(request["opcode"], SET)
        self.assertEqual(request["extras"], struct.pack(">II", 5, 60))
        self.assertEqual(request["key"], b"k")
        self.assertEqual(request["value"], b"value")

    def test_get_rejects_empty_and_text_keys(self) -> None:
        client, transport = connected_client()
        with self.assertRaises(ValueError):
            client.get(b"")
        with self.assertRaises(TypeError):
            client.get("text")  # type: ignore[arg-type]
        self.assertEqual(transport.value(), b"")

    def test_pipelined_requests_distinct_opaques(self) -> None:
        client, transport = connected_client()
        for key in [b"a", b"b", b"c"]:
            client.get(key)
        opaques = [request["opaque"] for request in parse_requests(transport.value())]
        self.assertEqual(len(set(opaques)), 3)


# -- responses --


def feed_in_two(client: KVClientProtocol, data: bytes, split: int) -> None:
    client.dataReceived(data[:split])
    client.dataReceived(data[split:])


class FramingTests(SynchronousTestCase):
    """Responses split at every byte boundary give the same results."""

    def range_get_exchange(self) -> tuple[KVClientProtocol, list[Record], Deferred, Deferred, bytes]:
        client, transport = connected_client()
        records: list[Record] = []
        ranged = client.range_get(b"a", None, records.append)
        got = client.get(b"x")
        first, second = (request["opaque"] for request in parse_requests(transport.value()))
        stream = (
            range_item(first, b"a", b"1", flags=3, cas=10)
            + range_item(first, b"b" * 200, b"2" * 1000, cas=11)
            + range_item(first, b"c", b"", cas=12)
            + response(RANGE_GET, first)
            + response(GET, second, extras=struct.pack(">I", 9), value=b"xv", cas=13)
        )
        return client, records, ranged, got, stream

    def check_range_get(self, records: list[Record], ranged: Deferred, got: Deferred) -> None:
        self.assertEqual(
            records,
            [
                Record(b"a", b"1", flags=3, cas=10),
                Record(b"b" * 200, b"2" * 1000, cas=11),
                Record(b"c", b"", cas=12),
            ],
        )
        self.assertEqual(self.successResultOf(ranged), 3)
        self.assertEqual(self.successResultOf(got), Record(b"x", b"xv", flags=9, cas=13))

    def test_range_get_split_everywhere(self) -> None:
        _, _, _, _, stream = self.range_get_exchange()
        for split in range(1, len(stream)):
            client, records, ranged, got, stream = self.range_get_exchange()
            feed_in_two(client, stream, split)
            self.check_range_get(records, ranged, got)

    def test_range_get_byte_by_byte(self) -> None:
        client, records, ranged, got, stream = self.range_get_exchange()
        for index in range(len(stream)):
            client.dataReceived(stream[index : index + 1])
        self.check_range_get(records, ranged, got)

    def scan_exchange(self) -> tuple[KVClientProtocol, list[Record], Deferred, bytes]:
        client, transport = connected_client()
        records: list[Record] = []
        continued = client.continue_scan(SCAN_ID, records.append)
        opaque = last_request(transport)["opaque"]
        # The 130-byte key and the 300-byte value have two-byte LEB128
        # lengths.
        stream = (
            response(
                SCAN_CONTINUE,
                opaque,
                extras=DOCUMENTS,
                value=document_record(b"k1", b"one", flags=1, seqno=5, cas=6)
                + document_record(b"k" * 130, b"v" * 300, expiry=99),
            )
            + response(SCAN_CONTINUE, opaque, extras=DOCUMENTS, value=document_record(b"k3", b""))
            + response(SCAN_CONTINUE, opaque, ResponseStatus.RANGE_SCAN_MORE)
        )
        return client, records, continued, stream

    def test_scan_continue_split_everywhere(self) -> None:
        _, _, _, stream = self.scan_exchange()
        expected = [
            Record(b"k1", b"one", flags=1, seqno=5, cas=6),
            Record(b"k" * 130, b"v" * 300, expiry=99),
            Record(b"k3", b""),
        ]
        for split in range(1, len(stream)):
            client, records, continued, stream = self.scan_exchange()
            feed_in_two(client, stream, split)
            self.assertEqual(records, expected)
            self.assertIs(self.successResultOf(continued), False)

    def test_scan_continue_complete_with_records(self) -> None:
        client, transport = connected_client()
        records: list[Record] = []
        continued = client.continue_scan(SCAN_ID, records.append)
        opaque = last_request(transport)["opaque"]
        client.dataReceived(
            response(
                SCAN_CONTINUE,
                opaque,
                ResponseStatus.RANGE_SCAN_COMPLETE,
                extras=KEYS_ONLY,
                value=key_record(b"a") + key_record(b"b"),
            )
        )
        self.assertEqual(records, [Record(b"a", None), Record(b"b", None)])
        self.assertIs(self.successResultOf(continued), True)

    def test_responses_matched_by_opaque(self) -> None:
        client, transport = connected_client()
        first = client.get(b"a")
        second = client.get(b"b")
        opaques = [request["opaque"] for request in parse_requests(transport.value())]
        client.dataReceived(response(GET, opaques[1], extras=b"\0\0\0\0", value=b"B"))
        self.assertNoResult(first)
        self.assertEqual(self.successResultOf(second).value, b"B")
        client.dataReceived(response(GET, opaques[0], extras=b"\0\0\0\0", value=b"A"))
        self.assertEqual(self.successResultOf(first).value, b"A")

    def test_set_delete_results(self) -> None:
        client, transport = connected_client()
        stored = client.set(b"k", b"v")
        deleted = client.delete(b"k")
        missing = client.delete(b"k")
        deleted_count = client.range_delete(None, None)
        opaques = [request["opaque"] for request in parse_requests(transport.value())]
        client.dataReceived(
            response(SET, opaques[0], cas=77)
            + response(DELETE, opaques[1])
            + response(DELETE, opaques[2], ResponseStatus.NOT_FOUND, value=b"Not found")
            + response(RANGE_DELETE, opaques[3], value=struct.pack(">Q", 2**40 + 5))
        )
        self.assertEqual(self.successResultOf(stored), 77)
        self.assertIs(self.successResultOf(deleted), True)
        self.assertIs(self.successResultOf(missing), False)
        self.assertEqual(self.successResultOf(deleted_count), 2**40 + 5)

    def test_create_scan_returns_id(self) -> None:
        client, transport = connected_client()
        created = client.create_scan()
        client.dataReceived(response(SCAN_CREATE, last_request(transport)["opaque"], value=SCAN_ID))
        self.assertEqual(self.successResultOf(created), SCAN_ID)

    def test_get_miss_is_none(self) -> None:
        client, transport = connected_client()
        got = client.get(b"nope")
        client.dataReceived(response(GET, last_request(transport)["opaque"], ResponseStatus.NOT_FOUND, value=b"Not found"))
        self.assertIsNone(self.successResultOf(got))


class StatusErrorTests(SynchronousTestCase):
    def reply_with_error(self, call, status: int, message: bytes) -> Failure:
        """Send the request that ``call`` makes, reply with ``status`` and return the failure."""
        client, transport = connected_client()
        deferred = call(client)
        request = last_request(transport)
        client.dataReceived(response(request["opcode"], request["opaque"], status, value=message))
        return self.failureResultOf(deferred, KVStatusError)

    def test_set_error_carries_status_and_message(self) -> None:
        failure = self.reply_with_error(lambda client: client.set(b"k", b"v"), 0x03, b"Too large.")
        self.assertEqual(failure.value.status, ResponseStatus.TOO_LARGE)
        self.assertEqual(failure.value.message, "Too large.")
        self.assertEqual(failure.value.opcode, SET)
        self.assertIn("0x03", str(failure.value))
        self.assertIn("Too large.", str(failure.value))

    def test_unknown_command_status(self) -> None:
        failure = self.reply_with_error(lambda client: client.range_get(None, None, print), 0x81, b"Unknown command")
        self.assertEqual(failure.value.status, ResponseStatus.UNKNOWN_COMMAND)

    def test_unlisted_status_kept_as_int(self) -> None:
        failure = self.reply_with_error(lambda client: client.get(b"k"), 0x99, b"\xffodd")
        self.assertEqual(failure.value.status, 0x99)
        self.assertNotIsInstance(failure.value.status, ResponseStatus)
        self.assertEqual(failure.value.message, "\ufffdodd")

    def test_range_get_busy(self) -> None:
        failure = self.reply_with_error(lambda client: client.range_get(None, None, print), 0x85, b"Busy")
        self.assertEqual(failure.value.status, ResponseStatus.BUSY)

    def test_continue_no_such_scan(self) -> None:
        failure = self.reply_with_error(lambda client: client.continue_scan(SCAN_ID, print), 0x01, b"Not found")
        self.assertEqual(failure.value.status, ResponseStatus.NOT_FOUND)

    def test_continue_busy(self) -> None:
        failure = self.reply_with_error(lambda client: client.continue_scan(SCAN_ID, print), 0x85, b"Busy")
        self.assertEqual(failure.value.status, ResponseStatus.BUSY)

    def test_continue_cancelled_after_records(self) -> None:
        client, transport = connected_client()
        records: list[Record] = []
        continued = client.continue_scan(SCAN_ID, records.append)
        opaque = last_request(transport)["opaque"]
        client.dataReceived(
            response(SCAN_CONTINUE, opaque, extras=KEYS_ONLY, value=key_record(b"a"))
            + response(SCAN_CONTINUE, opaque, ResponseStatus.RANGE_SCAN_CANCELLED)
        )
        self.assertEqual(records, [Record(b"a", None)])
        failure = self.failureResultOf(continued, KVStatusError)
        self.assertEqual(failure.value.status, ResponseStatus.RANGE_SCAN_CANCELLED)

    def test_cancel_no_such_scan(self) -> None:
        failure = self.reply_with_error(lambda client: client.cancel_scan(SCAN_ID), 0x01, b"Not found")
        self.assertEqual(failure.value.opcode, SCAN_CANCEL)

    def test_error_keeps_connection_usable(self) -> None:
        client, transport = connected_client()
        failed = client.get(b"a")
        got = client.get(b"b")
        first, second = (request["opaque"] for request in parse_requests(transport.value()))
        client.dataReceived(
            response(GET, first, 0x04, value=b"Invalid arguments")
            + response(GET, second, extras=b"\0\0\0\0", value=b"ok")
        )
        self.failureResultOf(failed, KVStatusError)
        self.assertEqual(self.successResultOf(got).value, b"ok")
        self.assertFalse(transport.disconnecting)


class ProtocolErrorTests(SynchronousTestCase):
    def check_rejected(self, client: KVClientProtocol, transport: StringTransport, deferred: Deferred, data: bytes) -> None:
        client.dataReceived(data)
        self.failureResultOf(deferred, KVProtocolError)
        self.assertTrue(transport.disconnected)
        self.failureResultOf(client.get(b"later"), KVProtocolError)

    def test_bad_magic_aborts(self) -> None:
        client, transport = connected_client()
        got = client.get(b"k")
        self.check_rejected(client, transport, got, response(GET, 1, magic=0x80))

    def test_unknown_opaque_aborts(self) -> None:
        client, transport = connected_client()
        got = client.get(b"k")
        self.check_rejected(client, transport, got, response(GET, 999))

    def test_opcode_mismatch_aborts(self) -> None:
        client, transport = connected_client()
        got = client.get(b"k")
        self.check_rejected(client, transport, got, response(SET, last_request(transport)["opaque"]))

    def test_lengths_over_body_abort(self) -> None:
        client, transport = connected_client()
        got = client.get(b"k")
        packet = bytearray(response(GET, last_request(transport)["opaque"], extras=b"\0\0\0\0"))
        packet[2:4] = struct.pack(">H", 10)
        self.check_rejected(client, transport, got, bytes(packet))

    def test_duplicate_last_response_aborts(self) -> None:
        client, transport = connected_client()
        got = client.get(b"k")
        other = client.get(b"m")
        opaque = parse_requests(transport.value())[0]["opaque"]
        reply = response(GET, opaque, extras=b"\0\0\0\0")
        self.check_rejected(client, transport, other, reply + reply)
        self.assertIsNotNone(self.successResultOf(got))

    def test_range_item_without_flags_aborts(self) -> None:
        client, transport = connected_client()
        ranged = client.range_get(None, None, print)
        self.check_rejected(client, transport, ranged, response(RANGE_GET, last_request(transport)["opaque"], key=b"k"))

    def test_scan_frame_without_content_flags_aborts(self) -> None:
        client, transport = connected_client()
        continued = client.continue_scan(SCAN_ID, print)
        opaque = last_request(transport)["opaque"]
        self.check_rejected(client, transport, continued, response(SCAN_CONTINUE, opaque, value=key_record(b"a")))

    def test_scan_frame_bad_length_aborts(self) -> None:
        client, transport = connected_client()
        records: list[Record] = []
        continued = client.continue_scan(SCAN_ID, records.append)
        opaque = last_request(transport)["opaque"]
        frame = response(SCAN_CONTINUE, opaque, extras=KEYS_ONLY, value=key_record(b"a") + b"\x09short")
        self.check_rejected(client, transport, continued, frame)
        self.assertEqual(records, [])

    def test_short_scan_id_aborts(self) -> None:
        client, transport = connected_client()
        created = client.create_scan()
        self.check_rejected(client, transport, created, response(SCAN_CREATE, last_request(transport)["opaque"], value=b"123"))

    def test_data_after_error_ignored(self) -> None:
        client, transport = connected_client()
        got = client.get(b"k")
        client.dataReceived(response(GET, 1, magic=0x00))
        client.dataReceived(response(GET, 1, extras=b"\0\0\0\0"))
        self.failureResultOf(got, KVProtocolError)


class RecordCallbackErrorTests(SynchronousTestCase):
    def test_range_get_callback_error_fails_request(self) -> None:
        client, transport = connected_client()
        seen: list[bytes] = []

        def on_record(record: Record) -> None:
            seen.append(record.key)
            if record.key == b"b":
                raise ZeroDivisionError("consumer failed")

        ranged = client.range_get(None, None, on_record)
        later = client.get(b"x")
        first, second = (request["opaque"] for request in parse_requests(transport.value()))
        client.dataReceived(
            range_item(first, b"a", b"")
            + range_item(first, b"b", b"")
            + range_item(first, b"c", b"")
            + response(RANGE_GET, first)
            + response(GET, second, extras=b"\0\0\0\0", value=b"x")
        )
        self.assertEqual(seen, [b"a", b"b"])
        self.failureResultOf(ranged, ZeroDivisionError)
        self.assertEqual(self.successResultOf(later).value, b"x")

    def test_cancelled_range_get_drops_records(self) -> None:
        client, transport = connected_client()
        records: list[Record] = []
        ranged = client.range_get(None, None, records.append)
        opaque = last_request(transport)["opaque"]
        client.dataReceived(range_item(opaque, b"a", b""))
        ranged.cancel()
        client.dataReceived(range_item(opaque, b"b", b"") + response(RANGE_GET, opaque))
        self.failureResultOf(ranged, CancelledError)
        self.assertEqual([record.key for record in records], [b"a"])
        self.assertFalse(transport.disconnecting)


class PauseTests(SynchronousTestCase):
    def test_pause_mid_frame_holds_records(self) -> None:
        client, transport = connected_client()
        records: list[Record] = []

        def on_record(record: Record) -> None:
            records.append(record)
            if len(records) == 2:
                client.pauseProducing()

        continued = client.continue_scan(SCAN_ID, on_record)
        opaque = last_request(transport)["opaque"]
        keys = [b"k%d" % index for index in range(5)]
        client.dataReceived(
            response(SCAN_CONTINUE, opaque, extras=KEYS_ONLY, value=b"".join(map(key_record, keys)))
            + response(SCAN_CONTINUE, opaque, ResponseStatus.RANGE_SCAN_COMPLETE)
        )
        self.assertEqual(len(records), 2)
        self.assertTrue(client.paused)
        self.assertEqual(transport.producerState, "paused")
        self.assertNoResult(continued)

        client.resumeProducing()
        self.assertEqual([record.key for record in records], keys)
        self.assertIs(self.successResultOf(continued), True)
        self.assertFalse(client.paused)
        self.assertEqual(transport.producerState, "producing")

    def test_data_while_paused_waits(self) -> None:
        client, transport = connected_client()
        records: list[Record] = []
        ranged = client.range_get(None, None, records.append)
        got = client.get(b"x")
        first, second = (request["opaque"] for request in parse_requests(transport.value()))
        client.pauseProducing()
        client.dataReceived(range_item(first, b"a", b"") + response(RANGE_GET, first))
        client.dataReceived(response(GET, second, extras=b"\0\0\0\0", value=b"x"))
        self.assertEqual(records, [])
        self.assertNoResult(ranged)
        self.assertNoResult(got)

        client.resumeProducing()
        self.assertEqual([record.key for record in records], [b"a"])
        self.assertEqual(self.successResultOf(ranged), 1)
        self.assertEqual(self.successResultOf(got).value, b"x")

    def test_pause_and_resume_idempotent(self) -> None:
        client, transport = connected_client()
        calls: list[str] = []
        transport.pauseProducing = lambda: calls.append("pause")  # type: ignore[method-assign]
        transport.resumeProducing = lambda: calls.append("resume")  # type: ignore[method-assign]
        client.resumeProducing()
        client.pauseProducing()
        client.pauseProducing()
        client.resumeProducing()
        client.resumeProducing()
        self.assertEqual(calls, ["pause", "resume"])

    def test_resume_inside_callback(self) -> None:
        client, transport = connected_client()
        records: list[Record] = []

        def on_record(record: Record) -> None:
            records.append(record)
            client.pauseProducing()
            client.resumeProducing()

        ranged = client.range_get(None, None, on_record)
        opaque = last_request(transport)["opaque"]
        client.dataReceived(range_item(opaque, b"a", b"") + range_item(opaque, b"b", b"") + response(RANGE_GET, opaque))
        self.assertEqual(len(records), 2)
        self.assertEqual(self.successResultOf(ranged), 2)
        self.assertEqual(transport.producerState, "producing")

    def test_stop_producing_fails_everything(self) -> None:
        client, transport = connected_client()
        records: list[Record] = []
        ranged = client.range_get(None, None, records.append)
        got = client.get(b"x")
        opaque = parse_requests(transport.value())[0]["opaque"]
        client.pauseProducing()
        client.dataReceived(range_item(opaque, b"a", b"") + response(RANGE_GET, opaque))
        client.stopProducing()
        self.failureResultOf(ranged, ConnectionAborted)
        self.failureResultOf(got, ConnectionAborted)
        self.assertEqual(records, [])
        self.assertTrue(transport.disconnected)
        self.failureResultOf(client.get(b"y"), ConnectionAborted)


class ScanHelperTests(SynchronousTestCase):
    def start_scan(self, **kwargs: Any) -> tuple[KVClientProtocol, StringTransport, list[Record], Deferred]:
        client, transport = connected_client()
        records: list[Record] = []
        scanned = client.scan(b"a", b"z", records.append, **kwargs)
        create = last_request(transport)
        self.assertEqual(create["opcode"], SCAN_CREATE)
        transport.clear()
        client.dataReceived(response(SCAN_CREATE, create["opaque"], value=SCAN_ID))
        return client, transport, records, scanned

    def reply_to_continue(self, client: KVClientProtocol, transport: StringTransport, keys: list[bytes], status: int) -> None:
        request = last_request(transport)
        self.assertEqual(request["opcode"], SCAN_CONTINUE)
        transport.clear()
        frames = b""
        if keys:
            frames = response(SCAN_CONTINUE, request["opaque"], extras=KEYS_ONLY, value=b"".join(map(key_record, keys)))
        client.dataReceived(frames + response(SCAN_CONTINUE, request["opaque"], status))

    def test_scan_continues_until_complete(self) -> None:
        client, transport, records, scanned = self.start_scan(key_only=True, item_limit=2, byte_limit=100)
        self.assertEqual(last_request(transport)["extras"], SCAN_ID + struct.pack(">III", 2, 0, 100))
        self.reply_to_continue(client, transport, [b"a", b"b"], ResponseStatus.RANGE_SCAN_MORE)
        self.reply_to_continue(client, transport, [b"c", b"d"], ResponseStatus.RANGE_SCAN_MORE)
        self.reply_to_continue(client, transport, [b"e"], ResponseStatus.RANGE_SCAN_COMPLETE)
        self.assertEqual([record.key for record in records], [b"a", b"b", b"c", b"d", b"e"])
        self.assertEqual(self.successResultOf(scanned), 5)
        self.assertEqual(transport.value(), b"")

    def test_scan_sends_no_continue_while_paused(self) -> None:
        client, transport = connected_client()
        records: list[Record] = []

        def on_record(record: Record) -> None:
            records.append(record)
            client.pauseProducing()

        scanned = client.scan(None, None, on_record)
        create = last_request(transport)
        transport.clear()
        client.dataReceived(response(SCAN_CREATE, create["opaque"], value=SCAN_ID))
        self.reply_to_continue(client, transport, [b"a"], ResponseStatus.RANGE_SCAN_MORE)
        self.assertEqual(len(records), 1)
        self.assertEqual(transport.value(), b"")

        client.resumeProducing()
        self.assertEqual(last_request(transport)["opcode"], SCAN_CONTINUE)
        self.reply_to_continue(client, transport, [], ResponseStatus.RANGE_SCAN_COMPLETE)
        self.assertEqual(self.successResultOf(scanned), 1)

    def test_scan_paused_before_create_reply(self) -> None:
        client, transport = connected_client()
        scanned = client.scan(None, None, print)
        create = last_request(transport)
        transport.clear()
        client.pauseProducing()
        client.dataReceived(response(SCAN_CREATE, create["opaque"], value=SCAN_ID))
        self.assertEqual(transport.value(), b"")
        client.resumeProducing()
        self.assertEqual(last_request(transport)["opcode"], SCAN_CONTINUE)
        self.assertNoResult(scanned)

    def test_scan_empty_range(self) -> None:
        client, transport = connected_client()
        scanned = client.scan(b"x", b"y", print)
        create = last_request(transport)
        transport.clear()
        client.dataReceived(response(SCAN_CREATE, create["opaque"], ResponseStatus.NOT_FOUND, value=b"Not found"))
        self.assertEqual(self.successResultOf(scanned), 0)
        self.assertEqual(transport.value(), b"")

    def test_scan_create_error(self) -> None:
        client, transport = connected_client()
        scanned = client.scan(b"y", b"x", print)
        create = last_request(transport)
        client.dataReceived(response(SCAN_CREATE, create["opaque"], 0x04, value=b"Invalid arguments"))
        self.assertEqual(self.failureResultOf(scanned, KVStatusError).value.status, ResponseStatus.INVALID_ARGUMENTS)

    def test_cancelled_scan_cancels_on_server(self) -> None:
        client, transport, records, scanned = self.start_scan()
        request = last_request(transport)
        opaque = request["opaque"]
        transport.clear()
        client.dataReceived(response(SCAN_CONTINUE, opaque, extras=KEYS_ONLY, value=key_record(b"a")))
        scanned.cancel()
        client.dataReceived(
            response(SCAN_CONTINUE, opaque, extras=KEYS_ONLY, value=key_record(b"b"))
            + response(SCAN_CONTINUE, opaque, ResponseStatus.RANGE_SCAN_MORE)
        )
        self.failureResultOf(scanned, CancelledError)
        self.assertEqual([record.key for record in records], [b"a"])
        cancel = last_request(transport)
        self.assertEqual(cancel["opcode"], SCAN_CANCEL)
        self.assertEqual(cancel["extras"], SCAN_ID)
        client.dataReceived(response(SCAN_CANCEL, cancel["opaque"]))

    def test_scan_cancelled_before_create_reply(self) -> None:
        client, transport = connected_client()
        scanned = client.scan(None, None, print)
        create = last_request(transport)
        scanned.cancel()
        self.failureResultOf(scanned, CancelledError)
        client.dataReceived(response(SCAN_CREATE, create["opaque"], value=SCAN_ID))
        cancel = last_request(transport)
        self.assertEqual(cancel["opcode"], SCAN_CANCEL)
        self.assertEqual(cancel["extras"], SCAN_ID)

    def test_cancelled_scan_complete_sends_nothing(self) -> None:
        client, transport, records, scanned = self.start_scan()
        scanned.cancel()
        self.reply_to_continue(client, transport, [b"a"], ResponseStatus.RANGE_SCAN_COMPLETE)
        self.failureResultOf(scanned, CancelledError)
        self.assertEqual(records, [])
        self.assertEqual(transport.value(), b"")

    def test_scan_callback_error_cancels_scan(self) -> None:
        client, transport = connected_client()

        def on_record(record: Record) -> None:
            raise ValueError("bad record %r" % record.key)

        scanned = client.scan(None, None, on_record)
        client.dataReceived(response(SCAN_CREATE, last_request(transport)["opaque"], value=SCAN_ID))
        self.reply_to_continue(client, transport, [b"a", b"b"], ResponseStatus.RANGE_SCAN_MORE)
        self.assertIn("bad record b'a'", str(self.failureResultOf(scanned, ValueError).value))
        self.assertEqual(last_request(transport)["opcode"], SCAN_CANCEL)

    def test_scan_continue_error_fails_scan(self) -> None:
        client, transport, records, scanned = self.start_scan()
        self.reply_to_continue(client, transport, [b"a"], ResponseStatus.RANGE_SCAN_CANCELLED)
        self.assertEqual(self.failureResultOf(scanned, KVStatusError).value.status, ResponseStatus.RANGE_SCAN_CANCELLED)
        self.assertEqual(transport.value(), b"")


class ConnectionLossTests(SynchronousTestCase):
    def test_connection_loss_fails_pending(self) -> None:
        client, transport = connected_client()
        records: list[Record] = []
        ranged = client.range_get(None, None, records.append)
        got = client.get(b"x")
        opaque = parse_requests(transport.value())[0]["opaque"]
        client.dataReceived(range_item(opaque, b"a", b""))
        client.connectionLost(Failure(ConnectionLost("gone")))
        self.assertEqual(len(records), 1)
        self.failureResultOf(ranged, ConnectionLost)
        self.failureResultOf(got, ConnectionLost)
        self.failureResultOf(client.get(b"y"), ConnectionLost)

    def test_connection_loss_while_paused(self) -> None:
        client, transport = connected_client()
        first = client.get(b"a")
        second = client.get(b"b")
        opaque = parse_requests(transport.value())[0]["opaque"]
        client.pauseProducing()
        client.dataReceived(response(GET, opaque, extras=b"\0\0\0\0", value=b"A"))
        client.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(first)
        self.assertNoResult(second)

        client.resumeProducing()
        self.assertEqual(self.successResultOf(first).value, b"A")
        self.failureResultOf(second, ConnectionDone)

    def test_close_waits_for_connection_lost(self) -> None:
        client, transport = connected_client()
        closed = client.close()
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(closed)
        self.failureResultOf(client.get(b"x"), ConnectionClosed)
        client.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.successResultOf(closed))
        self.assertIsNone(self.successResultOf(client.close()))


# -- against a real kvdaemon --


class ClientIntegrationTests(TestCase):
    """The client against an in-process kvdaemon on 127.0.0.1."""

    @defer.inlineCallbacks
    def setUp(self):
        self.service, port = yield start_server(self, Settings(threads=2))
        self.client = yield connect(reactor, "tcp:127.0.0.1:%d" % port)
        self.addCleanup(self.client.close)
        self.cas = {}
        for index in range(50):
            key = b"key%03d" % index
            self.cas[key] = yield self.client.set(key, b"value %d" % index, flags=index)

    @defer.inlineCallbacks
    def range_get(self, *args: Any, **kwargs: Any):
        records: list[Record] = []
        count = yield self.client.range_get(*args, records.append, **kwargs)
        self.assertEqual(count, len(records))
        return records

    @defer.inlineCallbacks
    def scan(self, *args: Any, **kwargs: Any):
        records: list[Record] = []
        count = yield self.client.scan(*args, records.append, **kwargs)
        self.assertEqual(count, len(records))
        return records

    @defer.inlineCallbacks
    def test_get_set_delete_round_trip(self):
        record = yield self.client.get(b"key007")
        self.assertEqual(record, Record(b"key007", b"value 7", flags=7, cas=self.cas[b"key007"]))
        deleted = yield self.client.delete(b"key007")
        self.assertIs(deleted, True)
        self.assertIsNone((yield self.client.get(b"key007")))
        self.assertIs((yield self.client.delete(b"key007")), False)

    @defer.inlineCallbacks
    def test_range_get_bounds(self):
        records = yield self.range_get(b"key010", b"key013")
        self.assertEqual([record.key for record in records], [b"key010", b"key011", b"key012"])
        self.assertEqual(records[0], Record(b"key010", b"value 10", flags=10, cas=self.cas[b"key010"]))
        records = yield self.range_get(b"key010", b"key013", start_inclusive=False, end_inclusive=True)
        self.assertEqual([record.key for record in records], [b"key011", b"key012", b"key013"])
        records = yield self.range_get(b"key045", None)
        self.assertEqual(len(records), 5)
        records = yield self.range_get(None, None, max_items=4)
        self.assertEqual([record.key for record in records], [b"key000", b"key001", b"key002", b"key003"])

    @defer.inlineCallbacks
    def test_range_get_pipelined_with_get(self):
        records: list[Record] = []
        ranged = self.client.range_get(None, None, records.append)
        got = self.client.get(b"key049")
        count = yield ranged
        record = yield got
        self.assertEqual(count, 50)
        self.assertEqual(record.value, b"value 49")

    @defer.inlineCallbacks
    def test_range_delete_count(self):
        count = yield self.client.range_delete(b"key000", b"key010")
        self.assertEqual(count, 10)
        records = yield self.range_get(None, b"key011")
        self.assertEqual([record.key for record in records], [b"key010"])

    @defer.inlineCallbacks
    def test_scan_documents_in_steps(self):
        records = yield self.scan(None, None, item_limit=7)
        self.assertEqual([record.key for record in records], sorted(self.cas))
        self.assertEqual(records[3].value, b"value 3")
        self.assertEqual(records[3].flags, 3)
        self.assertEqual(records[3].cas, self.cas[b"key003"])

    @defer.inlineCallbacks
    def test_scan_key_only_exclusive(self):
        records = yield self.scan(b"key020", b"key024", exclusive_start=True, exclusive_end=True, key_only=True)
        self.assertEqual(records, [Record(b"key021", None), Record(b"key022", None), Record(b"key023", None)])

    @defer.inlineCallbacks
    def test_scan_empty_range(self):
        records = yield self.scan(b"zzz", None)
        self.assertEqual(records, [])

    @defer.inlineCallbacks
    def test_continue_after_cancel_fails(self):
        scan_id = yield self.client.create_scan(key_only=True)
        records: list[Record] = []
        complete = yield self.client.continue_scan(scan_id, records.append, item_limit=3)
        self.assertIs(complete, False)
        self.assertEqual(len(records), 3)
        yield self.client.cancel_scan(scan_id)
        error = yield self.assertFailure(self.client.continue_scan(scan_id, records.append), KVStatusError)
        self.assertEqual(error.status, ResponseStatus.NOT_FOUND)
        error = yield self.assertFailure(self.client.cancel_scan(scan_id), KVStatusError)
        self.assertEqual(error.status, ResponseStatus.NOT_FOUND)

    @defer.inlineCallbacks
    def test_continue_unknown_scan(self):
        error = yield self.assertFailure(self.client.continue_scan(b"\0" * 16, print), KVStatusError)
        self.assertEqual(error.status, ResponseStatus.NOT_FOUND)

    @defer.inlineCallbacks
    def test_paused_scan_stalls_server(self):
        # 4 MB of values: far more than the socket buffers and the
        # server's spool hold, so a paused client stalls the server.
        value = b"x" * 4000
        for index in range(1000):
            yield self.client.set(b"big%04d" % index, value)
        records: list[Record] = []

        def on_record(record: Record) -> None:
            records.append(record)
            if len(records) == 10:
                self.client.pauseProducing()

        scanned = self.client.scan(b"big", b"big\xff", on_record)
        connection = next(iter(self.service.factory.connections))
        yield wait_until(lambda: len(records) >= 10 and connection.producer_paused)
        # A client that kept reading would take the whole 4 MB and let the
        # server's stream finish well within these turns.
        yield wait_until(lambda: connection.stream is None, attempts=50)
        self.assertFalse(scanned.called)
        self.assertIsNotNone(connection.stream)
        self.assertTrue(connection.producer_paused)
        self.assertLess(connection.stream.bytes_sent, 1000 * len(value))
        self.assertEqual(len(records), 10)

        self.client.resumeProducing()
        count = yield scanned
        self.assertEqual(count, 1000)
        self.assertEqual([record.key for record in records], [b"big%04d" % index for index in range(1000)])
        self.assertTrue(all(record.value == value for record in records))


@defer.inlineCallbacks
def wait_until(condition, attempts: int = 500):
    """Let the reactor run until ``condition()`` holds, up to ``attempts`` turns of 10 ms."""
    for _ in range(attempts):
        if condition():
            return
        yield deferLater(reactor, 0.01, lambda: None)
