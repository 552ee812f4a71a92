"""
Tests for kvdaemon._binary_ranges: range get (0x30) and range delete (0x37)
for binary clients.

The unit tests step the worker pool and the reactor's thread hand-offs by
hand over a StringTransport.  The integration tests run a real server on
127.0.0.1 and talk to it over raw sockets.
"""

from __future__ import annotations

import socket
import struct

from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from kvdaemon import Settings
from kvdaemon._binary_ranges import InvalidRangeRequest, parse_range_request
from kvdaemon._ranges import DELETE_STEP_ITEMS
from tests.binary_harness import GETK, NOOP, FakeServer, set_request, stats_from, stats_request, u64
from tests.binary_packets import Response, converse, parse, request
from tests.support import start_server

RANGE_GET = 0x30
RANGE_DELETE = 0x37

SUCCESS = 0x00
INVALID = 0x04
AUTH_ERROR = 0x20
BUSY = 0x85

START_INCLUSIVE = 0x01
END_INCLUSIVE = 0x02

KEYS = [b"a", b"b", b"c", b"d", b"e"]

#: The keys of the range b..d for each value of the flags byte.
EXPECTED_BY_FLAGS = {
    0: [b"c"],
    START_INCLUSIVE: [b"b", b"c"],
    END_INCLUSIVE: [b"c", b"d"],
    START_INCLUSIVE | END_INCLUSIVE: [b"b", b"c", b"d"],
}


def range_extras(
    end: bytes = b"",
    flags: int = START_INCLUSIVE | END_INCLUSIVE,
    max_items: int = 0,
    reserved: int = 0,
    end_length: int | None = None,
) -> bytes:
    """The extras of a 0x30 or 0x37 request; ``end_length`` overrides the length field."""
    if end_length is None:
        end_length = len(end)
    return struct.pack(">HBBI", end_length, reserved, flags, max_items) + end


def range_request(opcode: int, start: bytes = b"", end: bytes = b"", *, opaque: int = 0, **options) -> bytes:
    """A 0x30 or 0x37 request for the range from ``start`` to ``end``."""
    return request(opcode, start, range_extras(end, **options), opaque=opaque)


def item_keys(responses: list[Response]) -> list[bytes]:
    """The keys of the per-item responses of a range get (the trailer left out)."""
    return [response.key for response in responses if response.opcode == RANGE_GET and response.key]


class ParseRangeRequestTests(SynchronousTestCase):
    """parse_range_request builds a KeyRange from the request key and extras."""

    def test_parse_flags_set_inclusive_bounds(self) -> None:
        for flags in range(4):
            key_range = parse_range_request(b"b", range_extras(b"d", flags))
            self.assertEqual(key_range.start_inclusive, bool(flags & START_INCLUSIVE), flags)
            self.assertEqual(key_range.end_inclusive, bool(flags & END_INCLUSIVE), flags)

    def test_parse_keys_and_max_items(self) -> None:
        key_range = parse_range_request(b"start", range_extras(b"end", max_items=0xFFFFFFFF))
        self.assertEqual(key_range.start, b"start")
        self.assertEqual(key_range.end, b"end")
        self.assertEqual(key_range.max_items, 0xFFFFFFFF)

    def test_parse_empty_keys_mean_no_bounds(self) -> None:
        key_range = parse_range_request(b"", range_extras())
        self.assertIsNone(key_range.start)
        self.assertIsNone(key_range.end)
        self.assertEqual(key_range.max_items, 0)

    def test_parse_length_errors_close(self) -> None:
        cases = [
            b"\x00" * 7,
            range_extras(b"end", end_length=4),
            range_extras(b"end", end_length=2),
            range_extras(end_length=1),
        ]
        for extras in cases:
            with self.assertRaises(InvalidRangeRequest) as caught:
                parse_range_request(b"a", extras)
            self.assertTrue(caught.exception.close, extras)

    def test_parse_flag_errors_keep_connection(self) -> None:
        for extras in [range_extras(flags=0x04), range_extras(flags=0x80), range_extras(reserved=1)]:
            with self.assertRaises(InvalidRangeRequest) as caught:
                parse_range_request(b"a", extras)
            self.assertFalse(caught.exception.close, extras)


class RangeTestCase(SynchronousTestCase):
    """A fake server holding the keys a to e, and one client."""

    settings = Settings()

    def setUp(self) -> None:
        self.server = FakeServer(self.settings)
        for number, key in enumerate(KEYS):
            self.server.set(key, b"value-" + key, flags=number)
        self.client = self.server.connect()

    def remaining_keys(self) -> list[bytes]:
        return [key for key, _ in self.server.store.scan(None, None)]


class RangeGetTests(RangeTestCase):
    def test_range_get_every_flag_combination(self) -> None:
        for flags, expected in EXPECTED_BY_FLAGS.items():
            responses = self.client.exchange(range_request(RANGE_GET, b"b", b"d", flags=flags))
            self.assertEqual(item_keys(responses), expected, flags)
            self.assertEqual(len(responses), len(expected) + 1, flags)

    def test_range_get_item_shaped_like_getk(self) -> None:
        item = self.server.store.get(b"c", bump=False)
        responses = self.client.exchange(range_request(RANGE_GET, b"c", b"c", opaque=0x1234))
        self.assertEqual(responses[0], Response(RANGE_GET, SUCCESS, b"c", b"\x00\x00\x00\x02", b"value-c", 0x1234, item.cas))

    def test_range_get_ends_with_empty_response(self) -> None:
        responses = self.client.exchange(range_request(RANGE_GET, b"a", b"b", opaque=9))
        self.assertEqual(responses[-1], Response(RANGE_GET, SUCCESS, b"", b"", b"", 9, 0))

    def test_range_get_no_lower_bound(self) -> None:
        responses = self.client.exchange(range_request(RANGE_GET, b"", b"c", flags=0))
        self.assertEqual(item_keys(responses), [b"a", b"b"])

    def test_range_get_no_upper_bound(self) -> None:
        responses = self.client.exchange(range_request(RANGE_GET, b"c", b"", flags=0))
        self.assertEqual(item_keys(responses), [b"d", b"e"])

    def test_range_get_no_bounds(self) -> None:
        responses = self.client.exchange(range_request(RANGE_GET, flags=0))
        self.assertEqual(item_keys(responses), KEYS)

    def test_range_get_max_results(self) -> None:
        responses = self.client.exchange(range_request(RANGE_GET, b"b", max_items=2))
        self.assertEqual(item_keys(responses), [b"b", b"c"])
        self.assertEqual(responses[-1].key, b"")

    def test_range_get_max_results_above_count(self) -> None:
        responses = self.client.exchange(range_request(RANGE_GET, max_items=100))
        self.assertEqual(item_keys(responses), KEYS)

    def test_range_get_start_after_end_empty(self) -> None:
        responses = self.client.exchange(range_request(RANGE_GET, b"d", b"b", opaque=3))
        self.assertEqual(responses, [Response(RANGE_GET, SUCCESS, b"", b"", b"", 3, 0)])

    def test_range_get_skips_expired_items(self) -> None:
        self.server.set(b"b", b"short-lived", exptime=5)
        self.server.set(b"c", b"short-lived", exptime=5)
        self.server.reactor.advance(10)
        responses = self.client.exchange(range_request(RANGE_GET, max_items=3))
        self.assertEqual(item_keys(responses), [b"a", b"d", b"e"])

    def test_range_get_echoes_opaque(self) -> None:
        responses = self.client.exchange(range_request(RANGE_GET, opaque=0xCAFEF00D))
        self.assertEqual(len(responses), len(KEYS) + 1)
        for response in responses:
            self.assertEqual(response.opaque, 0xCAFEF00D)

    def test_range_get_bytewise_key_order(self) -> None:
        for key in [b"b\xff", b"b\x00", b"b\x7f", b"B"]:
            self.server.set(key, b"x")
        responses = self.client.exchange(range_request(RANGE_GET, b"b", b"c", flags=START_INCLUSIVE))
        self.assertEqual(item_keys(responses), [b"b", b"b\x00", b"b\x7f", b"b\xff"])

    def test_range_get_later_requests_wait(self) -> None:
        pipeline = (
            request(GETK, b"a", opaque=1)
            + range_request(RANGE_GET, b"b", b"c", opaque=2)
            + request(GETK, b"e", opaque=3)
            + request(NOOP, opaque=4)
        )
        self.client.send(pipeline)
        before = self.client.take()
        self.assertEqual([response.opaque for response in before], [1])
        self.server.pump()
        after = self.client.take()
        self.assertEqual([(response.opaque, response.key) for response in after], [(2, b"b"), (2, b"c"), (2, b""), (3, b"e"), (4, b"")])

    def test_range_get_behind_other_requests(self) -> None:
        pipeline = set_request(b"f", b"new", opaque=1) + request(NOOP, opaque=2) + range_request(RANGE_GET, b"e", opaque=3)
        responses = self.client.exchange(pipeline)
        self.assertEqual([(response.opcode, response.opaque) for response in responses], [(0x01, 1), (NOOP, 2), (RANGE_GET, 3), (RANGE_GET, 3), (RANGE_GET, 3)])
        self.assertEqual(item_keys(responses), [b"e", b"f"])

    def test_range_get_runs_on_worker(self) -> None:
        self.client.send(range_request(RANGE_GET))
        self.assertEqual(self.client.take(), [])
        self.assertEqual(len(self.server.threadpool.pending), 1)
        self.server.pump()
        self.assertEqual(item_keys(self.client.take()), KEYS)


class RangeGetPauseTests(SynchronousTestCase):
    """A client that stops reading pauses a range get between steps."""

    def setUp(self) -> None:
        self.server = FakeServer(Settings(stream_buffer=4096))
        self.keys = [b"key%04d" % number for number in range(200)]
        for key in self.keys:
            self.server.set(key, b"v" * 1000)
        self.client = self.server.connect()

    def test_pause_holds_no_worker_step(self) -> None:
        self.client.send(range_request(RANGE_GET, opaque=5))
        self.server.threadpool.run_next()
        self.client.connection.pauseProducing()
        self.server.reactor.run_thread_calls()

        self.assertEqual(self.server.threadpool.pending, [])
        first = item_keys(self.client.take())
        self.assertGreater(len(first), 0)
        self.assertLess(len(first), len(self.keys))
        self.assertEqual(self.server.pump(), 0)
        self.assertEqual(self.client.take(), [])

        self.client.connection.resumeProducing()
        self.assertEqual(len(self.server.threadpool.pending), 1)
        self.server.pump()
        rest = self.client.take()
        self.assertEqual(first + item_keys(rest), self.keys)
        self.assertEqual(rest[-1], Response(RANGE_GET, SUCCESS, b"", b"", b"", 5, 0))

    def test_step_output_bounded_by_spool(self) -> None:
        self.client.send(range_request(RANGE_GET))
        self.server.run_step()
        written = len(self.client.transport.value())
        # A step ends once it has produced the spool cap; the item that
        # crosses the cap is sent whole.
        self.assertLessEqual(written, 4096 + 24 + 4 + 7 + 1000)
        self.assertGreater(self.server.pump(), 1)


class RangeDeleteTests(RangeTestCase):
    def test_range_delete_every_flag_combination(self) -> None:
        for flags, expected in EXPECTED_BY_FLAGS.items():
            server = FakeServer()
            for key in KEYS:
                server.set(key, b"x")
            responses = server.connect().exchange(range_request(RANGE_DELETE, b"b", b"d", flags=flags))
            self.assertEqual(len(responses), 1, flags)
            self.assertEqual(u64(responses[0].value), len(expected), flags)
            remaining = [key for key, _ in server.store.scan(None, None)]
            self.assertEqual(remaining, [key for key in KEYS if key not in expected], flags)

    def test_range_delete_reply_shape(self) -> None:
        responses = self.client.exchange(range_request(RANGE_DELETE, b"b", b"c", opaque=0x77))
        self.assertEqual(responses, [Response(RANGE_DELETE, SUCCESS, b"", b"", struct.pack(">Q", 2), 0x77, 0)])

    def test_range_delete_no_bounds(self) -> None:
        responses = self.client.exchange(range_request(RANGE_DELETE))
        self.assertEqual(u64(responses[0].value), 5)
        self.assertEqual(self.remaining_keys(), [])

    def test_range_delete_no_lower_bound(self) -> None:
        responses = self.client.exchange(range_request(RANGE_DELETE, b"", b"b"))
        self.assertEqual(u64(responses[0].value), 2)
        self.assertEqual(self.remaining_keys(), [b"c", b"d", b"e"])

    def test_range_delete_no_upper_bound(self) -> None:
        responses = self.client.exchange(range_request(RANGE_DELETE, b"d"))
        self.assertEqual(u64(responses[0].value), 2)
        self.assertEqual(self.remaining_keys(), [b"a", b"b", b"c"])

    def test_range_delete_max_results(self) -> None:
        responses = self.client.exchange(range_request(RANGE_DELETE, b"b", max_items=2))
        self.assertEqual(u64(responses[0].value), 2)
        self.assertEqual(self.remaining_keys(), [b"a", b"d", b"e"])

    def test_range_delete_empty_range(self) -> None:
        responses = self.client.exchange(range_request(RANGE_DELETE, b"bb", b"bc"))
        self.assertEqual(u64(responses[0].value), 0)
        self.assertEqual(self.remaining_keys(), KEYS)

    def test_range_delete_skips_expired_items(self) -> None:
        self.server.set(b"b", b"short-lived", exptime=5)
        self.server.reactor.advance(10)
        responses = self.client.exchange(range_request(RANGE_DELETE, max_items=2))
        self.assertEqual(u64(responses[0].value), 2)
        self.assertEqual(self.remaining_keys(), [b"d", b"e"])

    def test_range_delete_mutates_on_reactor_thread(self) -> None:
        self.client.send(range_request(RANGE_DELETE))
        self.server.threadpool.run_next()
        # The worker step only collected the keys.
        self.assertEqual(self.remaining_keys(), KEYS)
        self.server.reactor.run_thread_calls()
        self.assertEqual(self.remaining_keys(), [])
        self.assertEqual(u64(self.client.take()[0].value), 5)

    def test_range_delete_counts_deleted_items(self) -> None:
        self.client.exchange(range_request(RANGE_DELETE, b"a", b"b"))
        stats = stats_from(self.client.exchange(stats_request()))
        self.assertEqual(stats["range_items_deleted"], "2")

    def test_range_delete_several_steps(self) -> None:
        count = DELETE_STEP_ITEMS + 100
        for number in range(count):
            self.server.set(b"many%05d" % number, b"x")
        self.client.send(range_request(RANGE_DELETE, b"many", b"many\xff"))
        steps = self.server.pump()
        responses = self.client.take()
        self.assertGreaterEqual(steps, 2)
        self.assertEqual(u64(responses[0].value), count)
        self.assertEqual(self.remaining_keys(), KEYS)

    def test_range_delete_pipelined_order(self) -> None:
        pipeline = request(GETK, b"b", opaque=1) + range_request(RANGE_DELETE, b"b", b"c", opaque=2) + request(GETK, b"b", opaque=3)
        responses = self.client.exchange(pipeline)
        self.assertEqual([(response.opaque, response.status) for response in responses], [(1, SUCCESS), (2, SUCCESS), (3, 0x01)])


class RangeDeleteDisabledTests(RangeTestCase):
    settings = Settings(allow_destructive=False)

    def test_range_delete_disabled_rejected(self) -> None:
        responses = self.client.exchange(range_request(RANGE_DELETE, opaque=6) + request(NOOP, opaque=7))
        self.assertEqual(responses[0], Response(RANGE_DELETE, AUTH_ERROR, b"", b"", b"Auth failure.", 6, 0))
        self.assertEqual(responses[1].opaque, 7)
        self.assertEqual(self.remaining_keys(), KEYS)
        self.assertFalse(self.client.closed)

    def test_range_get_allowed_when_disabled(self) -> None:
        responses = self.client.exchange(range_request(RANGE_GET))
        self.assertEqual(item_keys(responses), KEYS)


class RangeErrorTests(RangeTestCase):
    def assert_invalid(self, response: Response, opcode: int, opaque: int) -> None:
        self.assertEqual(response, Response(opcode, INVALID, b"", b"", b"Invalid arguments", opaque, 0))

    def test_short_extras_close(self) -> None:
        for opcode in (RANGE_GET, RANGE_DELETE):
            client = self.server.connect()
            responses = client.exchange(request(opcode, b"a", b"\x00" * 7, opaque=1) + request(NOOP))
            self.assertEqual(len(responses), 1)
            self.assert_invalid(responses[0], opcode, 1)
            self.assertTrue(client.closed)

    def test_value_closes(self) -> None:
        client = self.server.connect()
        responses = client.exchange(request(RANGE_GET, b"a", range_extras(), b"value", opaque=1))
        self.assert_invalid(responses[0], RANGE_GET, 1)
        self.assertTrue(client.closed)

    def test_end_key_length_mismatch_closes(self) -> None:
        for opcode in (RANGE_GET, RANGE_DELETE):
            for end_length in (2, 4, 300):
                client = self.server.connect()
                extras = range_extras(b"end", end_length=end_length)
                responses = client.exchange(request(opcode, b"a", extras, opaque=2) + request(NOOP))
                self.assertEqual(len(responses), 1, end_length)
                self.assert_invalid(responses[0], opcode, 2)
                self.assertTrue(client.closed)
        self.assertEqual(self.remaining_keys(), KEYS)

    def test_unknown_flag_bits_keep_connection(self) -> None:
        for opcode in (RANGE_GET, RANGE_DELETE):
            for flags in (0x04, 0x80, 0xFF):
                responses = self.client.exchange(range_request(opcode, flags=flags, opaque=3) + request(NOOP, opaque=4))
                self.assert_invalid(responses[0], opcode, 3)
                self.assertEqual(responses[1].opaque, 4)
        self.assertFalse(self.client.closed)
        self.assertEqual(self.remaining_keys(), KEYS)

    def test_reserved_byte_rejected(self) -> None:
        responses = self.client.exchange(range_request(RANGE_DELETE, reserved=1, opaque=5) + request(NOOP, opaque=6))
        self.assert_invalid(responses[0], RANGE_DELETE, 5)
        self.assertEqual(responses[1].opaque, 6)
        self.assertEqual(self.remaining_keys(), KEYS)

    def test_invalid_request_logged_with_peer(self) -> None:
        with capturedLogs() as events:
            self.client.exchange(range_request(RANGE_GET, flags=0x10))
        rejections = [event for event in events if "Rejected range request" in event.get("log_format", "")]
        self.assertEqual(len(rejections), 1)
        self.assertEqual(rejections[0]["peer"], self.client.connection.peer)

    def test_too_many_streams_busy(self) -> None:
        server = FakeServer(Settings(max_streams=1))
        for key in KEYS:
            server.set(key, b"x")
        first = server.connect()
        second = server.connect()
        first.send(range_request(RANGE_GET))
        for opcode in (RANGE_GET, RANGE_DELETE):
            second.send(range_request(opcode, opaque=8) + request(NOOP, opaque=9))
            responses = second.take()
            self.assertEqual(responses[0], Response(opcode, BUSY, b"", b"", b"Busy", 8, 0))
            self.assertEqual(responses[1].opaque, 9)
        self.assertFalse(second.closed)
        server.pump()
        self.assertEqual(item_keys(first.take()), KEYS)
        self.assertEqual([key for key, _ in server.store.scan(None, None)], KEYS)
        stats = stats_from(second.exchange(stats_request()))
        self.assertEqual(stats["streams_rejected"], "2")


def _read_until_trailer(sock: socket.socket, opcode: int, opaque: int) -> list[Response]:
    """Read responses until the empty-key end of a range get (blocking)."""
    data = b""
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise AssertionError("connection closed before the end of the range get")
        data += chunk
        responses = _parse_complete(data)
        last = responses[-1] if responses else None
        if last is not None and last.opcode == opcode and last.opaque == opaque and not last.key:
            return responses


def _parse_complete(data: bytes) -> list[Response]:
    """Parse the complete packets at the start of ``data``."""
    offset = 0
    while offset + 24 <= len(data):
        body_length = struct.unpack_from(">I", data, offset + 8)[0]
        if offset + 24 + body_length > len(data):
            break
        offset += 24 + body_length
    return parse(data[:offset])


class RangeOverSocketTests(TestCase):
    """0x30 and 0x37 against a real server on 127.0.0.1."""

    @defer.inlineCallbacks
    def test_range_get_pipelined_over_socket(self) -> None:
        service, port = yield start_server(self)
        pipeline = b"".join(set_request(key, b"value-" + key, opaque=number) for number, key in enumerate(KEYS))
        pipeline += range_request(RANGE_GET, b"b", b"d", flags=START_INCLUSIVE, opaque=100)
        pipeline += request(GETK, b"e", opaque=101)
        pipeline += range_request(RANGE_GET, b"d", opaque=102)
        pipeline += request(NOOP, opaque=103)
        output, closed = yield threads.deferToThread(converse, port, pipeline)
        responses = parse(output)
        self.assertFalse(closed)
        self.assertEqual(
            [(response.opaque, response.key) for response in responses[len(KEYS) :]],
            [(100, b"b"), (100, b"c"), (100, b""), (101, b"e"), (102, b"d"), (102, b"e"), (102, b""), (103, b"")],
        )
        self.assertEqual(responses[len(KEYS)].value, b"value-b")

    @defer.inlineCallbacks
    def test_range_delete_over_socket(self) -> None:
        service, port = yield start_server(self)
        pipeline = b"".join(set_request(key, b"x") for key in KEYS)
        pipeline += range_request(RANGE_DELETE, b"b", b"d", flags=END_INCLUSIVE, opaque=50)
        pipeline += range_request(RANGE_GET, opaque=51)
        output, closed = yield threads.deferToThread(converse, port, pipeline)
        responses = parse(output)[len(KEYS) :]
        self.assertEqual(responses[0], Response(RANGE_DELETE, SUCCESS, b"", b"", struct.pack(">Q", 2), 50, 0))
        self.assertEqual(item_keys(responses[1:]), [b"a", b"b", b"e"])

    @defer.inlineCallbacks
    def test_slow_reader_pauses_range_get(self) -> None:
        stream_buffer = 64 * 1024
        service, port = yield start_server(self, Settings(threads=2, stream_buffer=stream_buffer))
        value = b"v" * 8192
        keys = [b"big%05d" % number for number in range(2000)]
        for key in keys:
            service.factory.store.store("set", key, value, 0, 0)
        packet_size = 24 + 4 + len(keys[0]) + len(value)
        total = packet_size * len(keys)

        def connect_and_send() -> socket.socket:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            sock.connect(("127.0.0.1", port))
            sock.sendall(range_request(RANGE_GET, opaque=77))
            return sock

        sock = yield threads.deferToThread(connect_and_send)
        self.addCleanup(sock.close)
        connection = None
        for _ in range(200):
            connection = next(iter(service.factory.connections), None)
            if connection is not None and connection.stream is not None and connection.stream.paused:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertIsNotNone(connection)
        stream = connection.stream
        self.assertIsNotNone(stream)
        self.assertTrue(stream.paused)
        # Give a step that was running when the stream paused time to end.
        yield deferLater(reactor, 0.2, lambda: None)

        transport = connection.transport
        queued = len(transport.dataBuffer) + transport._tempDataLen
        # Twisted pauses the producer above 64 KiB; a step adds at most one
        # spool cap and one packet after that.
        self.assertLessEqual(queued, 64 * 1024 + stream_buffer + packet_size)
        self.assertLess(stream.bytes_sent, total)

        responses = yield threads.deferToThread(_read_until_trailer, sock, RANGE_GET, 77)
        self.assertEqual(item_keys(responses), keys)
        self.assertEqual(len(responses), len(keys) + 1)
        for response in responses[:-1]:
            self.assertEqual(response.value, value)
