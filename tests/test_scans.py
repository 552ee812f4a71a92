"""
Tests for kvdaemon._scans: resumable range scans (create 0xDA, continue
0xDB, cancel 0xDC) in the form of Couchbase kv_engine's range scans.

The unit tests step the worker pool, the reactor's thread hand-offs and
the clock by hand over StringTransports.  The integration tests run a real
server on 127.0.0.1 and talk to it over raw sockets.  Records are decoded
here from the protocol description, with a LEB128 decoder of the tests'
own.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
from typing import NamedTuple

from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from kvdaemon import Settings, _scans
from kvdaemon._scans import FRAME_BYTES, parse_create_request, uleb128
from tests.binary_harness import NOOP, STAT, FakeClient, FakeServer, set_request, stats_from, stats_request
from tests.binary_packets import Response, parse, request

CREATE = 0xDA
CONTINUE = 0xDB
CANCEL = 0xDC

SUCCESS = 0x00
NOT_FOUND = 0x01
INVALID = 0x04
BUSY = 0x85
CANCELLED = 0xA5
MORE = 0xA6
COMPLETE = 0xA7

#: The keys k00 to k19.
KEYS = [b"k%02d" % number for number in range(20)]

SCAN_COUNTERS = ["scans_created", "scans_open", "scans_expired", "scans_cancelled", "scans_completed"]


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def create_request(bounds: dict[str, bytes] | None = None, key_only: bool | None = None, opaque: int = 0) -> bytes:
    """A create request for the range with these bounds (names as in the JSON, keys as bytes)."""
    document: dict[str, object] = {"range": {name: b64(key) for name, key in (bounds or {}).items()}}
    if key_only is not None:
        document["key_only"] = key_only
    return request(CREATE, value=json.dumps(document).encode(), opaque=opaque)


def continue_request(scan_id: bytes, items: int = 0, milliseconds: int = 0, byte_limit: int = 0, opaque: int = 0) -> bytes:
    return request(CONTINUE, extras=struct.pack(">16sIII", scan_id, items, milliseconds, byte_limit), opaque=opaque)


def cancel_request(scan_id: bytes, opaque: int = 0) -> bytes:
    return request(CANCEL, extras=scan_id, opaque=opaque)


def read_uleb128(data: bytes, offset: int) -> tuple[int, int]:
    """Decode one unsigned LEB128 number at ``offset``; return it and the offset after it."""
    number = 0
    shift = 0
    while True:
        byte = data[offset]
        offset += 1
        number |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return number, offset
        shift += 7


class Document(NamedTuple):
    """One document record of a continue frame."""

    flags: int
    expiry: int
    seqno: int
    cas: int
    datatype: int
    key: bytes
    value: bytes


_DOCUMENT_HEADER = struct.Struct(">IIQQB")


def decode_keys(data: bytes) -> list[bytes]:
    """Split a key-only frame's value into keys."""
    keys = []
    offset = 0
    while offset < len(data):
        length, offset = read_uleb128(data, offset)
        keys.append(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise ValueError("a key record runs past the end of the frame")
    return keys


def decode_documents(data: bytes) -> list[Document]:
    """Split a document frame's value into documents."""
    documents = []
    offset = 0
    while offset < len(data):
        header = _DOCUMENT_HEADER.unpack_from(data, offset)
        offset += _DOCUMENT_HEADER.size
        key_length, offset = read_uleb128(data, offset)
        key = data[offset : offset + key_length]
        offset += key_length
        value_length, offset = read_uleb128(data, offset)
        value = data[offset : offset + value_length]
        offset += value_length
        documents.append(Document(*header, key, value))
    if offset != len(data):
        raise ValueError("a document record runs past the end of the frame")
    return documents


class ContinueResult(NamedTuple):
    """The responses of one continue: the record frames and the last response."""

    frames: list[Response]
    final: Response

    @property
    def status(self) -> int:
        return self.final.status

    def keys(self) -> list[bytes]:
        keys: list[bytes] = []
        for frame in self.frames:
            if frame.extras == b"\x00\x00\x00\x00":
                keys += decode_keys(frame.value)
            else:
                keys += [document.key for document in decode_documents(frame.value)]
        return keys

    def documents(self) -> list[Document]:
        return [document for frame in self.frames for document in decode_documents(frame.value)]


def continue_result(responses: list[Response]) -> ContinueResult:
    """Split a continue's responses into record frames and the last response."""
    if not responses:
        raise AssertionError("the continue sent no response")
    frames = responses[:-1]
    for frame in frames:
        if frame.opcode != CONTINUE or frame.status != SUCCESS:
            raise AssertionError("unexpected response inside a continue: %r" % (frame,))
    return ContinueResult(frames, responses[-1])


class Uleb128Tests(SynchronousTestCase):
    def test_uleb128_matches_decoder(self) -> None:
        for number in [0, 1, 127, 128, 255, 16383, 16384, 2**21, 2**32 - 1, 2**63]:
            encoded = uleb128(number)
            self.assertEqual(read_uleb128(encoded, 0), (number, len(encoded)), number)

    def test_uleb128_known_bytes(self) -> None:
        self.assertEqual(uleb128(0), b"\x00")
        self.assertEqual(uleb128(127), b"\x7f")
        self.assertEqual(uleb128(128), b"\x80\x01")
        self.assertEqual(uleb128(624485), b"\xe5\x8e\x26")


class ParseCreateRequestTests(SynchronousTestCase):
    def test_parse_inclusive_bounds(self) -> None:
        key_range, key_only = parse_create_request(b'{"range": {"start": "YQ==", "end": "Yg=="}, "key_only": true}')
        self.assertEqual((key_range.start, key_range.end), (b"a", b"b"))
        self.assertEqual((key_range.start_inclusive, key_range.end_inclusive), (True, True))
        self.assertTrue(key_only)

    def test_parse_exclusive_bounds(self) -> None:
        key_range, key_only = parse_create_request(b'{"range": {"excl_start": "YQ==", "excl_end": "Yg=="}}')
        self.assertEqual((key_range.start, key_range.end), (b"a", b"b"))
        self.assertEqual((key_range.start_inclusive, key_range.end_inclusive), (False, False))
        self.assertFalse(key_only)

    def test_parse_missing_bounds(self) -> None:
        key_range, _ = parse_create_request(b'{"range": {}}')
        self.assertIsNone(key_range.start)
        self.assertIsNone(key_range.end)

    def test_parse_invalid_documents(self) -> None:
        cases = [
            b"",
            b"{",
            b"\xff\xfe",
            b"[]",
            b'{"key_only": true}',
            b'{"range": []}',
            b'{"range": {}, "key_only": 1}',
            b'{"range": {"start": 5}}',
            b'{"range": {"start": "!!"}}',
            b'{"range": {"start": "YQ"}}',
            '{"range": {"start": "\u00e9"}}'.encode(),
            b'{"range": {"start": "YQ==", "excl_start": "YQ=="}}',
            b'{"range": {"start": "Yg==", "end": "YQ=="}}',
            b'{"range": {"excl_start": "YQ==", "end": "YQ=="}}',
        ]
        for value in cases:
            with self.assertRaises(ValueError, msg=repr(value)):
                parse_create_request(value)


class ScanTestCase(SynchronousTestCase):
    """A fake server holding the keys k00 to k19, and one client."""

    settings = Settings()

    def setUp(self) -> None:
        self.server = FakeServer(self.settings)
        for number, key in enumerate(KEYS):
            self.server.set(key, b"value-%d" % number, flags=number)
        self.client = self.server.connect()

    def create(self, bounds: dict[str, bytes] | None = None, key_only: bool | None = None, client: FakeClient | None = None) -> bytes:
        """Create a scan and return its id."""
        responses = (client or self.client).exchange(create_request(bounds, key_only))
        self.assertEqual(len(responses), 1)
        self.assertEqual(responses[0].status, SUCCESS, responses[0])
        return responses[0].value

    def run_continue(self, scan_id: bytes, client: FakeClient | None = None, **limits: int) -> ContinueResult:
        return continue_result((client or self.client).exchange(continue_request(scan_id, **limits)))

    def scan_all(self, scan_id: bytes, **limits: int) -> tuple[list[bytes], int]:
        """Continue until the scan completes; return every key and the number of continues."""
        keys: list[bytes] = []
        for count in range(1, 1000):
            result = self.run_continue(scan_id, **limits)
            keys += result.keys()
            if result.status == COMPLETE:
                return keys, count
            self.assertEqual(result.status, MORE)
        raise AssertionError("the scan did not complete")

    def stats(self) -> dict[str, str]:
        return stats_from(self.server.connect().exchange(stats_request()))

    def scan_counters(self) -> dict[str, int]:
        stats = self.stats()
        return {name: int(stats[name]) for name in SCAN_COUNTERS}

    def assert_error(self, response: Response, opcode: int, status: int, text: bytes) -> None:
        self.assertEqual(response.opcode, opcode)
        self.assertEqual(response.status, status)
        self.assertEqual(response.value, text)
        self.assertEqual(response.key, b"")
        self.assertEqual(response.extras, b"")


class CreateTests(ScanTestCase):
    def test_create_returns_scan_id(self) -> None:
        responses = self.client.exchange(create_request(opaque=0x4242))
        self.assertEqual(len(responses), 1)
        response = responses[0]
        self.assertEqual((response.opcode, response.status, response.opaque), (CREATE, SUCCESS, 0x4242))
        self.assertEqual(len(response.value), 16)
        self.assertEqual((response.key, response.extras), (b"", b""))

    def test_create_ids_differ(self) -> None:
        self.assertNotEqual(self.create(), self.create())

    def test_create_start_end_inclusive(self) -> None:
        keys, _ = self.scan_all(self.create({"start": b"k05", "end": b"k10"}))
        self.assertEqual(keys, KEYS[5:11])

    def test_create_excl_start_excl_end(self) -> None:
        keys, _ = self.scan_all(self.create({"excl_start": b"k05", "excl_end": b"k10"}))
        self.assertEqual(keys, KEYS[6:10])

    def test_create_mixed_bounds(self) -> None:
        keys, _ = self.scan_all(self.create({"excl_start": b"k05", "end": b"k07"}))
        self.assertEqual(keys, [b"k06", b"k07"])
        keys, _ = self.scan_all(self.create({"start": b"k05", "excl_end": b"k07"}))
        self.assertEqual(keys, [b"k05", b"k06"])

    def test_create_bounds_between_keys(self) -> None:
        keys, _ = self.scan_all(self.create({"start": b"k055", "end": b"k07x"}))
        self.assertEqual(keys, [b"k06", b"k07"])

    def test_create_no_bounds(self) -> None:
        keys, _ = self.scan_all(self.create())
        self.assertEqual(keys, KEYS)

    def test_create_one_bound(self) -> None:
        keys, _ = self.scan_all(self.create({"start": b"k17"}))
        self.assertEqual(keys, KEYS[17:])
        keys, _ = self.scan_all(self.create({"excl_end": b"k02"}))
        self.assertEqual(keys, KEYS[:2])

    def test_create_key_only_true(self) -> None:
        result = self.run_continue(self.create({"start": b"k00", "end": b"k02"}, key_only=True))
        self.assertEqual(len(result.frames), 1)
        self.assertEqual(result.frames[0].extras, b"\x00\x00\x00\x00")
        self.assertEqual(decode_keys(result.frames[0].value), KEYS[:3])

    def test_create_key_only_false(self) -> None:
        for key_only in (False, None):
            result = self.run_continue(self.create({"start": b"k00", "end": b"k02"}, key_only=key_only))
            self.assertEqual(len(result.frames), 1)
            self.assertEqual(result.frames[0].extras, b"\x00\x00\x00\x01")
            documents = decode_documents(result.frames[0].value)
            self.assertEqual([(document.key, document.value) for document in documents], [(b"k00", b"value-0"), (b"k01", b"value-1"), (b"k02", b"value-2")])

    def test_create_bad_json(self) -> None:
        for value in [b"{", b"", b"[1]", b'{"range": 1}', b'{"range": {}, "key_only": "yes"}']:
            responses = self.client.exchange(request(CREATE, value=value) + request(NOOP, opaque=1))
            self.assert_error(responses[0], CREATE, INVALID, b"Invalid arguments")
            self.assertEqual(responses[1].opaque, 1)
        self.assertFalse(self.client.closed)
        self.assertEqual(self.scan_counters()["scans_created"], 0)

    def test_create_bad_base64(self) -> None:
        for encoded in ["!!!!", "YQ", "\u00e9", 7]:
            value = json.dumps({"range": {"start": encoded}}).encode()
            responses = self.client.exchange(request(CREATE, value=value))
            self.assert_error(responses[0], CREATE, INVALID, b"Invalid arguments")
        self.assertEqual(self.scan_counters()["scans_open"], 0)

    def test_create_both_start_forms(self) -> None:
        value = json.dumps({"range": {"start": b64(b"a"), "excl_start": b64(b"a")}}).encode()
        responses = self.client.exchange(request(CREATE, value=value))
        self.assert_error(responses[0], CREATE, INVALID, b"Invalid arguments")

    def test_create_inverted_range(self) -> None:
        for bounds in [{"start": b"k09", "end": b"k01"}, {"excl_start": b"k05", "end": b"k05"}, {"start": b"k05", "excl_end": b"k05"}]:
            responses = self.client.exchange(create_request(bounds))
            self.assert_error(responses[0], CREATE, INVALID, b"Invalid arguments")

    def test_create_single_key_range(self) -> None:
        keys, _ = self.scan_all(self.create({"start": b"k05", "end": b"k05"}))
        self.assertEqual(keys, [b"k05"])

    def test_create_empty_range_not_found(self) -> None:
        for bounds in [{"start": b"z"}, {"excl_end": b"k00"}, {"start": b"k050", "end": b"k059"}]:
            responses = self.client.exchange(create_request(bounds))
            self.assert_error(responses[0], CREATE, NOT_FOUND, b"Not found")
        self.assertEqual(self.scan_counters()["scans_created"], 0)

    def test_create_expired_keys_not_found(self) -> None:
        self.server.set(b"x1", b"short-lived", exptime=5)
        self.server.reactor.advance(10)
        responses = self.client.exchange(create_request({"start": b"x"}))
        self.assert_error(responses[0], CREATE, NOT_FOUND, b"Not found")

    def test_create_with_extras_closes(self) -> None:
        responses = self.client.exchange(request(CREATE, extras=b"\x00" * 4, value=b'{"range": {}}'))
        self.assertEqual(responses[0].status, INVALID)
        self.assertTrue(self.client.closed)


class ContinueTests(ScanTestCase):
    def test_continue_without_limits_completes(self) -> None:
        result = self.run_continue(self.create())
        self.assertEqual(result.keys(), KEYS)
        self.assertEqual(result.final, Response(CONTINUE, COMPLETE, b"", b"", b"", 0, 0))

    def test_continue_item_limit(self) -> None:
        scan_id = self.create()
        first = self.run_continue(scan_id, items=3)
        self.assertEqual(first.keys(), KEYS[:3])
        self.assertEqual(first.status, MORE)
        second = self.run_continue(scan_id, items=5)
        self.assertEqual(second.keys(), KEYS[3:8])
        self.assertEqual(second.status, MORE)
        keys, continues = self.scan_all(scan_id, items=5)
        self.assertEqual(keys, KEYS[8:])
        self.assertEqual(continues, 3)

    def test_continue_item_limit_at_range_end(self) -> None:
        scan_id = self.create()
        result = self.run_continue(scan_id, items=len(KEYS))
        self.assertEqual(result.keys(), KEYS)
        self.assertEqual(result.status, MORE)
        last = self.run_continue(scan_id, items=len(KEYS))
        self.assertEqual(last.frames, [])
        self.assertEqual(last.status, COMPLETE)

    def test_continue_time_limit(self) -> None:
        class SteppingClock:
            """A monotonic clock that moves one second per reading."""

            def __init__(self) -> None:
                self.now = 0.0

            def monotonic(self) -> float:
                self.now += 1.0
                return self.now

        self.patch(_scans, "time", SteppingClock())
        scan_id = self.create()
        result = self.run_continue(scan_id, milliseconds=10)
        self.assertEqual(result.keys(), KEYS[:1])
        self.assertEqual(result.status, MORE)
        keys, _ = self.scan_all(scan_id, milliseconds=10)
        self.assertEqual(keys, KEYS[1:])

    def test_continue_time_limit_not_reached(self) -> None:
        class StoppedClock:
            def monotonic(self) -> float:
                return 100.0

        self.patch(_scans, "time", StoppedClock())
        result = self.run_continue(self.create(), milliseconds=10)
        self.assertEqual(result.keys(), KEYS)
        self.assertEqual(result.status, COMPLETE)

    def test_continue_byte_limit_soft(self) -> None:
        scan_id = self.create(key_only=True)
        result = self.run_continue(scan_id, byte_limit=1)
        self.assertEqual(result.keys(), KEYS[:1])
        self.assertEqual(result.status, MORE)

    def test_continue_byte_limit_counts_values(self) -> None:
        for number in range(10):
            self.server.set(b"v%d" % number, b"x" * 100)
        scan_id = self.create({"start": b"v"})
        # Each record counts 2 key bytes and 100 value bytes, so the limit
        # is passed with the third record.
        result = self.run_continue(scan_id, byte_limit=250)
        self.assertEqual(result.keys(), [b"v0", b"v1", b"v2"])
        self.assertEqual(result.status, MORE)

    def test_continue_first_limit_reached_wins(self) -> None:
        scan_id = self.create(key_only=True)
        result = self.run_continue(scan_id, items=2, byte_limit=1000)
        self.assertEqual(result.keys(), KEYS[:2])

    def test_continue_document_fields(self) -> None:
        long_key = b"p" + b"k" * 199
        long_value = bytes(range(256)) * 80
        self.server.set(long_key, long_value, flags=0xDEADBEEF, exptime=3600)
        item = self.server.store.get(long_key, bump=False)
        result = self.run_continue(self.create({"start": b"p"}))
        self.assertEqual(
            result.documents(),
            [Document(0xDEADBEEF, self.server.reactor.seconds() + 3600, item.cas, item.cas, 0, long_key, long_value)],
        )
        self.assertEqual(result.status, COMPLETE)

    def test_continue_key_record_lengths(self) -> None:
        long_key = b"q" * 250
        self.server.set(long_key, b"x")
        result = self.run_continue(self.create({"start": b"q"}, key_only=True))
        self.assertEqual(result.frames[0].value, b"\xfa\x01" + long_key)
        self.assertEqual(result.keys(), [long_key])

    def test_continue_frames_split(self) -> None:
        value = b"v" * 1000
        keys = [b"s%04d" % number for number in range(300)]
        for key in keys:
            self.server.set(key, value)
        result = self.run_continue(self.create({"start": b"s"}))
        self.assertGreaterEqual(len(result.frames), 4)
        collected = []
        for frame in result.frames:
            self.assertEqual(frame.extras, b"\x00\x00\x00\x01")
            # Records never straddle two frames, so each frame decodes alone.
            documents = decode_documents(frame.value)
            self.assertGreater(len(documents), 0)
            self.assertLessEqual(len(frame.value), 2 * FRAME_BYTES)
            collected += [document.key for document in documents]
        self.assertEqual(collected, keys)
        self.assertEqual(result.final, Response(CONTINUE, COMPLETE, b"", b"", b"", 0, 0))

    def test_continue_echoes_opaque(self) -> None:
        scan_id = self.create()
        responses = self.client.exchange(continue_request(scan_id, items=4, opaque=0xABCD))
        self.assertEqual(len(responses), 2)
        for response in responses:
            self.assertEqual(response.opaque, 0xABCD)

    def test_complete_removes_scan(self) -> None:
        scan_id = self.create()
        self.assertEqual(self.run_continue(scan_id).status, COMPLETE)
        responses = self.client.exchange(continue_request(scan_id) + cancel_request(scan_id))
        self.assert_error(responses[0], CONTINUE, NOT_FOUND, b"Not found")
        self.assert_error(responses[1], CANCEL, NOT_FOUND, b"Not found")
        counters = self.scan_counters()
        self.assertEqual(counters["scans_completed"], 1)
        self.assertEqual(counters["scans_open"], 0)

    def test_continue_unknown_id(self) -> None:
        self.create()
        responses = self.client.exchange(continue_request(b"\x01" * 16, opaque=3))
        self.assert_error(responses[0], CONTINUE, NOT_FOUND, b"Not found")
        self.assertEqual(responses[0].opaque, 3)
        self.assertFalse(self.client.closed)

    def test_second_continue_busy(self) -> None:
        scan_id = self.create()
        other = self.server.connect()
        self.client.send(continue_request(scan_id, opaque=1))
        other.send(continue_request(scan_id, opaque=2))
        responses = other.take()
        self.assertEqual(len(responses), 1)
        self.assert_error(responses[0], CONTINUE, BUSY, b"Busy")
        self.server.pump()
        result = continue_result(self.client.take())
        self.assertEqual(result.keys(), KEYS)
        self.assertEqual(result.status, COMPLETE)

    def test_continue_too_many_streams(self) -> None:
        server = FakeServer(Settings(max_streams=1))
        for key in KEYS:
            server.set(key, b"x")
        streaming, client = server.connect(), server.connect()
        scan_id = client.exchange(create_request())[0].value
        other_scan_id = streaming.exchange(create_request())[0].value
        # The other scan's continue takes the only stream.
        streaming.send(continue_request(other_scan_id))
        client.send(continue_request(scan_id))
        responses = client.take()
        self.assertEqual(len(responses), 1)
        self.assert_error(responses[0], CONTINUE, BUSY, b"Busy")
        server.pump()
        self.assertEqual(continue_result(streaming.take()).status, COMPLETE)
        # The rejected continue left its scan free.
        result = continue_result(client.exchange(continue_request(scan_id)))
        self.assertEqual(result.keys(), KEYS)
        self.assertEqual(result.status, COMPLETE)

    def test_continue_wrong_extras_length_closes(self) -> None:
        scan_id = self.create()
        responses = self.client.exchange(request(CONTINUE, extras=scan_id + b"\x00" * 8))
        self.assertEqual(responses[0].status, INVALID)
        self.assertTrue(self.client.closed)

    def test_continue_requests_behind_wait(self) -> None:
        scan_id = self.create()
        self.client.send(request(NOOP, opaque=1) + continue_request(scan_id, items=2, opaque=2) + request(NOOP, opaque=3))
        self.assertEqual([response.opaque for response in self.client.take()], [1])
        self.server.pump()
        responses = self.client.take()
        self.assertEqual([(response.opaque, response.status) for response in responses], [(2, SUCCESS), (2, MORE), (3, SUCCESS)])


class ContinuePauseTests(ScanTestCase):
    # The stall timeout is longer than three scan lifetimes.
    settings = Settings(stream_buffer=4096, scan_lifetime=10.0, stall_timeout=60.0)

    def setUp(self) -> None:
        super().setUp()
        self.keys = [b"s%04d" % number for number in range(300)]
        for key in self.keys:
            self.server.set(key, b"v" * 1000)

    def test_paused_continue_holds_no_thread(self) -> None:
        scan_id = self.create({"start": b"s"})
        self.client.send(continue_request(scan_id))
        self.server.threadpool.run_next()
        self.client.connection.pauseProducing()
        self.server.reactor.run_thread_calls()
        self.assertEqual(self.server.threadpool.pending, [])
        first = self.client.take()
        self.assertGreater(len(first), 0)

        self.client.connection.resumeProducing()
        self.server.pump()
        result = continue_result(first + self.client.take())
        self.assertEqual(result.keys(), self.keys)
        self.assertEqual(result.status, COMPLETE)

    def test_paused_continue_not_expired(self) -> None:
        scan_id = self.create({"start": b"s"})
        self.client.send(continue_request(scan_id))
        self.server.threadpool.run_next()
        self.client.connection.pauseProducing()
        self.server.reactor.run_thread_calls()
        self.server.reactor.advance(self.settings.scan_lifetime * 3)
        self.assertEqual(self.scan_counters()["scans_expired"], 0)
        self.client.connection.resumeProducing()
        self.server.pump()
        self.assertEqual(continue_result(self.client.take()).status, COMPLETE)


class CancelTests(ScanTestCase):
    settings = Settings(stream_buffer=4096)

    def test_cancel_idle_scan(self) -> None:
        scan_id = self.create()
        responses = self.client.exchange(cancel_request(scan_id, opaque=9))
        self.assertEqual(responses, [Response(CANCEL, SUCCESS, b"", b"", b"", 9, 0)])
        responses = self.client.exchange(continue_request(scan_id))
        self.assert_error(responses[0], CONTINUE, NOT_FOUND, b"Not found")
        counters = self.scan_counters()
        self.assertEqual(counters["scans_cancelled"], 1)
        self.assertEqual(counters["scans_open"], 0)

    def test_cancel_unknown_id(self) -> None:
        responses = self.client.exchange(cancel_request(b"\x02" * 16, opaque=4))
        self.assert_error(responses[0], CANCEL, NOT_FOUND, b"Not found")
        self.assertEqual(responses[0].opaque, 4)

    def test_cancel_wrong_extras_length_closes(self) -> None:
        responses = self.client.exchange(request(CANCEL, extras=b"\x00" * 15))
        self.assertEqual(responses[0].status, INVALID)
        self.assertTrue(self.client.closed)

    def test_cancel_before_first_step(self) -> None:
        scan_id = self.create()
        self.client.send(continue_request(scan_id, opaque=5))
        other = self.server.connect()
        self.assertEqual(other.exchange(cancel_request(scan_id))[0].status, SUCCESS)
        self.server.pump()
        self.assertEqual(self.client.take(), [Response(CONTINUE, CANCELLED, b"", b"", b"", 5, 0)])

    def test_cancel_between_steps(self) -> None:
        for number in range(300):
            self.server.set(b"s%04d" % number, b"v" * 1000)
        scan_id = self.create({"start": b"s"})
        self.client.send(continue_request(scan_id))
        self.server.run_step()
        other = self.server.connect()
        self.assertEqual(other.exchange(cancel_request(scan_id))[0].status, SUCCESS)
        self.server.pump()
        result = continue_result(self.client.take())
        self.assertGreater(len(result.frames), 0)
        self.assertLess(len(result.keys()), 300)
        self.assertEqual(result.status, CANCELLED)
        self.assertFalse(self.client.closed)
        self.assertEqual(self.client.exchange(request(NOOP, opaque=6))[0].opaque, 6)

    def test_cancel_while_paused(self) -> None:
        for number in range(300):
            self.server.set(b"s%04d" % number, b"v" * 1000)
        scan_id = self.create({"start": b"s"})
        self.client.send(continue_request(scan_id))
        self.server.threadpool.run_next()
        self.client.connection.pauseProducing()
        self.server.reactor.run_thread_calls()
        self.server.connect().exchange(cancel_request(scan_id))
        self.client.connection.resumeProducing()
        self.server.pump()
        self.assertEqual(continue_result(self.client.take()).status, CANCELLED)


class ScanLimitTests(ScanTestCase):
    settings = Settings(max_scans=2)

    def test_too_many_scans_busy(self) -> None:
        first = self.create()
        self.create()
        responses = self.client.exchange(create_request(opaque=7))
        self.assert_error(responses[0], CREATE, BUSY, b"Busy")
        self.assertEqual(responses[0].opaque, 7)
        self.client.exchange(cancel_request(first))
        self.create()
        counters = self.scan_counters()
        self.assertEqual(counters["scans_created"], 3)
        self.assertEqual(counters["scans_open"], 2)

    def test_scans_shared_by_connections(self) -> None:
        scan_id = self.create()
        other = self.server.connect()
        self.assertEqual(self.run_continue(scan_id, client=other, items=5).keys(), KEYS[:5])
        self.assertEqual(self.run_continue(scan_id, items=5).keys(), KEYS[5:10])


class ExpiryTests(ScanTestCase):
    settings = Settings(scan_lifetime=10.0)

    def test_idle_scan_expires(self) -> None:
        scan_id = self.create()
        self.server.reactor.advance(8)
        self.assertEqual(self.run_continue(scan_id, items=1).status, MORE)
        # The continue restarted the scan's idle time.
        self.server.reactor.advance(8)
        self.assertEqual(self.run_continue(scan_id, items=1).status, MORE)
        self.server.reactor.advance(15)
        responses = self.client.exchange(continue_request(scan_id))
        self.assert_error(responses[0], CONTINUE, NOT_FOUND, b"Not found")
        counters = self.scan_counters()
        self.assertEqual(counters["scans_expired"], 1)
        self.assertEqual(counters["scans_open"], 0)

    def test_expiry_timer_stops_without_scans(self) -> None:
        self.create()
        self.assertEqual(len(self.server.reactor.getDelayedCalls()), 1)
        self.server.reactor.advance(15)
        self.assertEqual(self.server.reactor.getDelayedCalls(), [])
        self.create()
        self.assertEqual(len(self.server.reactor.getDelayedCalls()), 1)

    def test_scan_counters(self) -> None:
        self.create()
        self.server.reactor.advance(15)
        completed = self.create()
        cancelled = self.create()
        self.create()
        self.run_continue(completed)
        self.client.exchange(cancel_request(cancelled))
        self.assertEqual(
            self.scan_counters(),
            {"scans_created": 4, "scans_open": 1, "scans_expired": 1, "scans_cancelled": 1, "scans_completed": 1},
        )

    def test_scan_counters_after_stats_reset(self) -> None:
        self.create()
        self.client.exchange(request(STAT, b"reset"))
        self.create()
        counters = self.scan_counters()
        self.assertEqual(counters["scans_created"], 1)
        self.assertEqual(counters["scans_open"], 2)


class ConnectionLostTests(ScanTestCase):
    settings = Settings(stream_buffer=4096)

    def setUp(self) -> None:
        super().setUp()
        self.keys = [b"s%04d" % number for number in range(300)]
        for key in self.keys:
            self.server.set(key, b"v" * 1000)

    def test_lost_connection_frees_scan(self) -> None:
        scan_id = self.create({"start": b"s"})
        self.client.send(continue_request(scan_id))
        self.server.run_step()
        received = continue_result(self.client.take() + [Response(CONTINUE, MORE, b"", b"", b"", 0, 0)]).keys()
        self.assertGreater(len(received), 0)
        self.client.lose_connection()
        self.server.pump()

        other = self.server.connect()
        result = self.run_continue(scan_id, client=other)
        self.assertEqual(result.status, COMPLETE)
        self.assertEqual(received + result.keys(), self.keys)

    def test_interrupted_step_sent_again(self) -> None:
        scan_id = self.create({"start": b"s"})
        self.client.send(continue_request(scan_id))
        # The step ran on the worker, but the connection went away before
        # the reactor thread sent its frames.
        self.server.threadpool.run_next()
        self.client.lose_connection()
        self.server.pump()
        self.assertEqual(self.client.take(), [])

        result = self.run_continue(scan_id, client=self.server.connect())
        self.assertEqual(result.keys(), self.keys)

    def test_step_after_release_leaves_cursor(self) -> None:
        scan_id = self.create({"start": b"s"})
        registry = self.server.factory.scans
        scan = registry.scans[scan_id]
        scan.busy = True
        lost = _scans.ContinueJob(registry, scan, 0, (0, 0, 0))
        later: list[_scans.ContinueJob] = []

        def lose_connection() -> None:
            # What the reactor thread does while the lost connection's step
            # is still running on its worker: the stream is cancelled, the
            # job released and the scan continued on another connection.
            lost_spool.cancelled = True
            lost.release()
            scan.busy = True
            later.append(_scans.ContinueJob(registry, scan, 0, (0, 0, 0)))

        lost_spool = RecordingSpool(on_first_write=lose_connection)
        self.assertIsNone(lost.run_step(lost_spool))
        self.assertEqual(len(lost_spool.chunks), 1)

        spool = RecordingSpool()
        status = later[0].run_step(spool)
        self.assertEqual(status, COMPLETE)
        keys = continue_result([parse(chunk)[0] for chunk in spool.chunks] + [Response(CONTINUE, status, b"", b"", b"", 0, 0)]).keys()
        self.assertEqual(keys, self.keys)


class RecordingSpool:
    """A spool for driving a ContinueJob step by hand: it keeps every chunk."""

    def __init__(self, on_first_write=None) -> None:
        self.chunks: list[bytes] = []
        self.cancelled = False
        self.stopping = False
        self.remaining = 1 << 30
        self._on_first_write = on_first_write

    def write(self, chunk: bytes) -> bool:
        self.chunks.append(chunk)
        if self._on_first_write is not None:
            on_first_write, self._on_first_write = self._on_first_write, None
            on_first_write()
        return not self.cancelled


# -- integration tests --


def _read_continue(sock: socket.socket, buffer: bytearray) -> list[Response]:
    """Read the responses of one continue, up to its last frame (blocking)."""
    responses: list[Response] = []
    while True:
        while len(buffer) >= 24:
            body_length = struct.unpack_from(">I", buffer, 8)[0]
            if len(buffer) < 24 + body_length:
                break
            packet = bytes(buffer[: 24 + body_length])
            del buffer[: 24 + body_length]
            response = parse(packet)[0]
            responses.append(response)
            if response.status != SUCCESS:
                return responses
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise AssertionError("connection closed during a continue")
        buffer += chunk


def _read_packet(sock: socket.socket, buffer: bytearray) -> Response:
    """Read one response packet (blocking)."""
    while True:
        if len(buffer) >= 24:
            body_length = struct.unpack_from(">I", buffer, 8)[0]
            if len(buffer) >= 24 + body_length:
                packet = bytes(buffer[: 24 + body_length])
                del buffer[: 24 + body_length]
                return parse(packet)[0]
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise AssertionError("connection closed")
        buffer += chunk


def _scan_keys(port: int, items: int) -> list[bytes]:
    """Create a key-only scan over every key and continue it to the end (blocking)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        buffer = bytearray()
        sock.sendall(create_request(key_only=True))
        created = _read_packet(sock, buffer)
        if created.status != SUCCESS:
            raise AssertionError("create failed: %r" % (created,))
        keys: list[bytes] = []
        while True:
            sock.sendall(continue_request(created.value, items=items))
            result = continue_result(_read_continue(sock, buffer))
            keys += result.keys()
            if result.status == COMPLETE:
                return keys
            if result.status != MORE:
                raise AssertionError("continue ended with status 0x%02x" % (result.status,))


class ScanOverSocketTests(TestCase):
    """Resumable scans against a real server on 127.0.0.1."""

    @defer.inlineCallbacks
    def test_scan_over_socket(self) -> None:
        service, port = yield start_server_with_keys(self, 500)
        keys = yield threads.deferToThread(_scan_keys, port, 37)
        self.assertEqual(keys, [b"key%05d" % number for number in range(500)])

    @defer.inlineCallbacks
    def test_scan_during_writes(self) -> None:
        count = 3000
        service, port = yield start_server_with_keys(self, count)
        # Every third key is deleted, every fifth rewritten, and a new key
        # is inserted after every seventh, while the scan runs.
        deleted = {b"key%05d" % number for number in range(0, count, 3)}
        rewritten = {b"key%05d" % number for number in range(0, count, 5)}
        inserted = {b"key%05d-new" % number for number in range(0, count, 7)}

        def write() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                buffer = bytearray()
                for number in range(count):
                    key = b"key%05d" % number
                    if key in deleted:
                        sock.sendall(request(0x04, key, opaque=number))
                        _read_packet(sock, buffer)
                    if key in rewritten:
                        sock.sendall(set_request(key, b"new value", opaque=number))
                        _read_packet(sock, buffer)
                    if number % 7 == 0:
                        sock.sendall(set_request(key + b"-new", b"inserted", opaque=number))
                        _read_packet(sock, buffer)

        scanned, _ = yield defer.gatherResults(
            [threads.deferToThread(_scan_keys, port, 25), threads.deferToThread(write)], consumeErrors=True
        )
        self.assertEqual(len(scanned), len(set(scanned)))
        self.assertEqual(scanned, sorted(scanned))
        unchanged = {b"key%05d" % number for number in range(count)} - deleted - rewritten
        self.assertEqual(unchanged - set(scanned), set())
        self.assertEqual(set(scanned) - unchanged - deleted - rewritten - inserted, set())

    @defer.inlineCallbacks
    def test_lost_connection_frees_scan_over_socket(self) -> None:
        service, port = yield start_server_with_keys(self, 2000, value=b"v" * 8192)

        def create_and_continue() -> tuple[socket.socket, bytes]:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            sock.connect(("127.0.0.1", port))
            buffer = bytearray()
            sock.sendall(create_request())
            scan_id = _read_packet(sock, buffer).value
            sock.sendall(continue_request(scan_id))
            return sock, scan_id

        sock, scan_id = yield threads.deferToThread(create_and_continue)
        scan = service.factory.scans.scans[scan_id]
        yield wait_until(lambda: any(stream.paused for stream in service.factory.streams))
        self.assertTrue(scan.busy)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        yield wait_until(lambda: not scan.busy)

        def continue_elsewhere() -> list[Response]:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as other:
                other.sendall(continue_request(scan_id, items=10))
                return _read_continue(other, bytearray())

        result = continue_result((yield threads.deferToThread(continue_elsewhere)))
        self.assertEqual(result.status, MORE)
        self.assertEqual(len(result.documents()), 10)

    @defer.inlineCallbacks
    def test_service_stop_with_open_scans(self) -> None:
        service, port = yield start_server_with_keys(self, 2000, value=b"v" * 8192)

        def open_scans() -> socket.socket:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            sock.connect(("127.0.0.1", port))
            buffer = bytearray()
            sock.sendall(create_request(key_only=True))
            _read_packet(sock, buffer)
            sock.sendall(create_request())
            streaming = _read_packet(sock, buffer).value
            sock.sendall(continue_request(streaming))
            return sock

        sock = yield threads.deferToThread(open_scans)
        self.addCleanup(sock.close)
        yield wait_until(lambda: any(stream.paused for stream in service.factory.streams))

        yield service.stopService()
        self.assertEqual(service.factory.scans.scans, {})
        self.assertEqual(service.factory.stats.scans_cancelled, 2)
        self.assertEqual(service.factory.stats.scans_open, 0)
        self.assertEqual(service.factory.streams, set())
        closed = yield threads.deferToThread(_drain_until_closed, sock)
        self.assertTrue(closed)


def _drain_until_closed(sock: socket.socket) -> bool:
    """Read until the server closes the connection; return whether it did (blocking)."""
    sock.settimeout(10)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        return False
    return True


@defer.inlineCallbacks
def wait_until(condition, timeout: float = 10.0):
    """Poll ``condition`` on the reactor until it is true; fail after ``timeout`` seconds."""
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        yield deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("condition not met within %s seconds" % (timeout,))


@defer.inlineCallbacks
def start_server_with_keys(testcase: TestCase, count: int, value: bytes = b"value"):
    """Start a server on 127.0.0.1 holding ``key00000`` onwards; fire with ``(service, port)``."""
    from tests.support import start_server

    service, port = yield start_server(testcase, Settings(threads=2, stream_buffer=64 * 1024))
    for number in range(count):
        service.factory.store.store("set", b"key%05d" % number, value, 0, 0)
    return service, port
