"""
Tests for kvdaemon._ranges: rget, rdelete and the lru_crawler key dumps.

The unit tests run the jobs and parsers directly.  The integration tests
run a real server in this process on 127.0.0.1, with the real reactor, and
talk to it over blocking sockets run in threads (``deferToThread``) so the
server's reactor keeps running.  Several of them use clients that stop
reading: such a client sets a small receive buffer, so the kernel buffers
little for it and the server's stream soon pauses.
"""

from __future__ import annotations

import ctypes
import gc
import re
import socket
import threading
import time
from typing import Any, Callable

from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from kvdaemon import Settings, Store
from kvdaemon._ranges import (
    ALL_KEYS,
    KeyRange,
    RangeDeleteJob,
    RangeReadJob,
    format_metadump_line,
    format_mgdump_line,
    format_value,
    memcached_item_size,
    parse_class_ids,
    parse_range,
    slab_class,
)
from kvdaemon._store import Item
from kvdaemon._text import ProtocolError
from tests.support import MemcachedProcess, exchange, start_server

MiB = 1024 * 1024

#: The receive buffer of clients that stop reading.  Linux doubles the
#: value and turns off receive-buffer autotuning for the socket.
SMALL_RECEIVE_BUFFER = 16 * 1024

_VALUE_HEADER = re.compile(rb"VALUE (\S+) (\d+) (\d+)\r\n")


def parse_values(reply: bytes) -> list[tuple[bytes, int, bytes]]:
    """
    Parse a ``get``-style reply into (key, flags, value) tuples.

    :raise AssertionError: the reply is not VALUE blocks followed by END.
    """
    items = []
    offset = 0
    while True:
        if reply.startswith(b"END\r\n", offset):
            if offset + 5 != len(reply):
                raise AssertionError("bytes after END: %r" % reply[offset + 5 : offset + 80])
            return items
        match = _VALUE_HEADER.match(reply, offset)
        if match is None:
            raise AssertionError("not a VALUE line at %d: %r" % (offset, reply[offset : offset + 80]))
        length = int(match.group(3))
        start = match.end()
        value = reply[start : start + length]
        if reply[start + length : start + length + 2] != b"\r\n":
            raise AssertionError("value of %r does not end in CRLF" % match.group(1))
        items.append((match.group(1), int(match.group(2)), value))
        offset = start + length + 2


def value_for(key: bytes, size: int) -> bytes:
    """Return a value of ``size`` bytes that differs from key to key."""
    pattern = key + b"|"
    return (pattern * (size // len(pattern) + 1))[:size]


def fill_store(store: Store, prefix: bytes, count: int, size: int) -> list[bytes]:
    """Store ``count`` items straight into ``store``; return their keys in order."""
    keys = [prefix + b"%06d" % i for i in range(count)]
    for key in keys:
        store.store("set", key, value_for(key, size), 0, 0)
    return keys


def rss_bytes() -> int:
    """Return this process's resident set size, from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line in /proc/self/status")


def release_free_memory() -> None:
    """Return free heap memory to the system with glibc's ``malloc_trim``, where there is one."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)


def discard_scan(port: int, request: bytes) -> int:
    """Send ``request`` and read its reply up to ``END``, keeping none of it; return the bytes read."""
    buffer = bytearray(256 * 1024)
    received = 0
    tail = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(request)
        while not tail.endswith(b"END\r\n"):
            count = client.recv_into(buffer)
            if not count:
                raise AssertionError("connection closed after %d bytes" % received)
            received += count
            tail = (tail + bytes(buffer[max(count - 8, 0) : count]))[-8:]
    return received


def connect_slow_reader(port: int) -> socket.socket:
    """Return a blocking client socket with a small receive buffer."""
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RECEIVE_BUFFER)
    client.settimeout(30)
    client.connect(("127.0.0.1", port))
    return client


def start_stalled_scan(port: int, request: bytes, first_read: int = 64 * 1024) -> tuple[socket.socket, bytes]:
    """
    Send ``request`` from a client with a small receive buffer, read at
    most ``first_read`` bytes of the reply, and return the socket, which
    then reads nothing more, with the bytes read.
    """
    client = connect_slow_reader(port)
    client.sendall(request)
    return client, client.recv(first_read)


def read_until(client: socket.socket, terminator: bytes, into: bytearray | None = None) -> bytearray:
    """Read from ``client`` until the data received ends with ``terminator``."""
    data = into if into is not None else bytearray()
    while not data.endswith(terminator):
        chunk = client.recv(256 * 1024)
        if not chunk:
            raise AssertionError("connection closed after %d bytes" % len(data))
        data += chunk
    return data


def read_exactly(client: socket.socket, count: int) -> bytes:
    """Read ``count`` bytes from ``client``."""
    data = bytearray()
    while len(data) < count:
        chunk = client.recv(count - len(data))
        if not chunk:
            raise AssertionError("connection closed after %d bytes" % len(data))
        data += chunk
    return bytes(data)


def stalled_streams(service: Any) -> list[Any]:
    """Return the server's streams that are paused and hold no thread."""
    return [stream for stream in service.factory.streams if stream.paused and not stream.stepping]


@defer.inlineCallbacks
def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition"):
    """Poll ``condition`` on the reactor every 20 ms until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        yield deferLater(reactor, 0.02, lambda: None)


class ParseRangeTests(SynchronousTestCase):
    """parse_range reads the text range form or raises memcached's replies."""

    def test_parse_range_with_end_key(self) -> None:
        key_range = parse_range([b"rget", b"0", b"1", b"10", b"a", b"z"])

        self.assertEqual(key_range, KeyRange(b"a", b"z", False, True, 10))

    def test_parse_range_without_end_key(self) -> None:
        key_range = parse_range([b"rget", b"1", b"0", b"0", b"a"])

        self.assertEqual(key_range, KeyRange(b"a", None, True, False, 0))

    def test_parse_range_errors(self) -> None:
        bad_format = b"CLIENT_ERROR bad command line format\r\n"
        cases = [
            ([b"rget", b"1", b"1", b"0"], b"ERROR\r\n"),
            ([b"rget", b"1", b"1", b"0", b"a", b"b", b"c"], b"ERROR\r\n"),
            ([b"rget", b"2", b"1", b"0", b"a"], bad_format),
            ([b"rget", b"1", b"yes", b"0", b"a"], bad_format),
            ([b"rget", b"1", b"1", b"x", b"a"], bad_format),
            ([b"rget", b"1", b"1", b"-1", b"a"], bad_format),
            ([b"rget", b"1", b"1", b"4294967296", b"a"], bad_format),
            ([b"rget", b"1", b"1", b"0", b"k" * 251], bad_format),
            ([b"rget", b"1", b"1", b"0", b"a", b"k" * 251], bad_format),
        ]
        for parts, reply in cases:
            with self.assertRaises(ProtocolError, msg=repr(parts)) as raised:
                parse_range(parts)
            self.assertEqual(raised.exception.reply, reply, parts)

    def test_parse_range_accepts_250_byte_keys(self) -> None:
        key = b"k" * 250

        self.assertEqual(parse_range([b"rget", b"1", b"1", b"0", key, key]).end, key)


class MetadumpFormatTests(SynchronousTestCase):
    """The lru_crawler line formats and memcached's size and class numbers."""

    def test_metadump_line_fields(self) -> None:
        item = Item(b"xy", 5, 1_800_000_000, 42, 1_700_000_000, True)

        line = format_metadump_line(b"b r%", item)

        self.assertEqual(
            line,
            b"key=b%20r%25 exp=1800000000 la=1700000000 cas=42 fetch=yes cls=1 size=69\n",
        )

    def test_metadump_never_expiring_is_minus_one(self) -> None:
        item = Item(b"a", 0, 0, 1, 1_700_000_000, False)

        self.assertIn(b" exp=-1 ", format_metadump_line(b"foo", item))
        self.assertIn(b" fetch=no ", format_metadump_line(b"foo", item))

    def test_metadump_key_encoding_keeps_unreserved(self) -> None:
        key = bytes(range(33, 127)) + b"\xff"
        item = Item(b"a", 0, 0, 1, 0, False)

        encoded = format_metadump_line(key, item).split(b" ")[0]

        self.assertEqual(
            encoded,
            b"key=%21%22%23%24%25%26%27%28%29%2A%2B%2C-.%2F0123456789%3A%3B%3C%3D%3E%3F%40"
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZ%5B%5C%5D%5E_%60abcdefghijklmnopqrstuvwxyz%7B%7C%7D~%FF",
        )

    def test_item_size_matches_memcached(self) -> None:
        # Sizes that memcached 1.6.18 reported for these items.
        cases = [
            (b"foo", b"a", 0, 63),
            (b"b%20r", b"xy", 5, 70),
            (b"k1000000", b"x" * 1000000, 0, 1000067),
        ]
        for key, value, flags, size in cases:
            item = Item(value, flags, 0, 1, 0, False)
            self.assertEqual(memcached_item_size(key, item), size, key)

    def test_slab_class_boundaries(self) -> None:
        cases = [(61, 1), (96, 1), (97, 2), (99, 2), (163, 4), (394840, 38), (394841, 39), (1000067, 39)]
        for size, class_id in cases:
            self.assertEqual(slab_class(size), class_id, size)

    def test_mgdump_line_plain_and_base64(self) -> None:
        item = Item(b"a", 0, 0, 1, 0, False)

        self.assertEqual(format_mgdump_line(b"foo", item), b"mg foo\r\n")
        self.assertEqual(format_mgdump_line(b"a b", item), b"mg YSBi b\r\n")

    def test_parse_class_ids(self) -> None:
        self.assertIsNone(parse_class_ids(b"all"))
        self.assertIsNone(parse_class_ids(b"hash"))
        self.assertEqual(parse_class_ids(b"1,,63"), frozenset([1, 63]))
        for token in [b"0", b"64", b"x", b"1,x", b",", b"ALL"]:
            with self.assertRaises(ProtocolError, msg=repr(token)) as raised:
                parse_class_ids(token)
            self.assertEqual(raised.exception.reply, b"BADCLASS invalid class id\r\n")


class RecordingSpool:
    """A spool double that keeps everything and ends a step after ``limit`` bytes."""

    def __init__(self, limit: int = 1 << 30) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.step_bytes = 0
        self.cancelled = False
        self.stopping = False

    @property
    def remaining(self) -> int:
        return max(self.limit - self.step_bytes, 1)

    def write(self, chunk: bytes) -> bool:
        self.chunks.append(chunk)
        self.step_bytes += len(chunk)
        return self.step_bytes < self.limit

    def new_step(self) -> None:
        self.step_bytes = 0


def run_job(job: Any, spool: RecordingSpool, max_steps: int = 10000) -> tuple[bytes, int]:
    """Run ``job`` step by step on this thread; return the trailer and the number of steps."""
    for steps in range(1, max_steps + 1):
        spool.new_step()
        tail = job.after_step(job.run_step(spool))
        if tail is not None:
            return tail, steps
    raise AssertionError("the job did not finish")


class RangeJobTests(SynchronousTestCase):
    """RangeReadJob and RangeDeleteJob run step by step on one thread."""

    def setUp(self) -> None:
        self.now = 1_700_000_000.0
        self.store = Store(lambda: self.now)
        self.keys = fill_store(self.store, b"k", 100, 50)

    def test_read_job_bounds(self) -> None:
        cases = [
            (KeyRange(b"k000010", b"k000020"), self.keys[10:21]),
            (KeyRange(b"k000010", b"k000020", False, False), self.keys[11:20]),
            (KeyRange(b"k000010", b"k000020", True, False, 3), self.keys[10:13]),
            (KeyRange(b"k000095", None), self.keys[95:]),
            (KeyRange(None, b"k000002"), self.keys[:3]),
            (KeyRange(b"k000020", b"k000010"), []),
            (KeyRange(b"z", None), []),
        ]
        for key_range, expected in cases:
            spool = RecordingSpool()
            job = RangeReadJob(self.store, key_range, lambda key, item: key + b"\n", b"END")
            tail, _ = run_job(job, spool)
            self.assertEqual(tail, b"END", key_range)
            self.assertEqual(b"".join(spool.chunks).split(), expected, key_range)

    def test_read_job_resumes_mid_batch(self) -> None:
        spool = RecordingSpool(limit=500)
        job = RangeReadJob(self.store, ALL_KEYS, format_value, b"END\r\n")

        tail, steps = run_job(job, spool)

        self.assertGreater(steps, 10)
        self.assertEqual([key for key, _, _ in parse_values(b"".join(spool.chunks) + tail)], self.keys)

    def test_read_job_skips_expired(self) -> None:
        self.store.store("set", b"k000005", b"gone", 0, 10)
        self.now += 11

        spool = RecordingSpool()
        run_job(RangeReadJob(self.store, ALL_KEYS, lambda key, item: key + b"\n", b""), spool)

        keys = b"".join(spool.chunks).split()
        self.assertNotIn(b"k000005", keys)
        self.assertEqual(len(keys), 99)

    def test_read_job_formatter_skips_without_counting(self) -> None:
        def even_only(key: bytes, item: Item) -> bytes | None:
            return key + b"\n" if int(key[1:]) % 2 == 0 else None

        spool = RecordingSpool()
        run_job(RangeReadJob(self.store, KeyRange(b"k", None, True, True, 5), even_only, b""), spool)

        self.assertEqual(b"".join(spool.chunks).split(), self.keys[0:10:2])

    def test_delete_job_deletes_range_in_steps(self) -> None:
        counted = []
        job = RangeDeleteJob(self.store, KeyRange(b"k000010", b"k000089"), lambda n: b"%d" % n, counted.append)

        tail, _ = run_job(job, RecordingSpool())

        self.assertEqual(tail, b"80")
        self.assertEqual(sum(counted), 80)
        self.assertEqual(len(self.store), 20)
        self.assertIsNone(self.store.get(b"k000010"))
        self.assertIsNotNone(self.store.get(b"k000090"))

    def test_delete_job_max_items(self) -> None:
        job = RangeDeleteJob(self.store, KeyRange(b"k", None, True, True, 7), lambda n: b"%d" % n)

        tail, _ = run_job(job, RecordingSpool())

        self.assertEqual(tail, b"7")
        self.assertIsNone(self.store.get(b"k000006"))
        self.assertIsNotNone(self.store.get(b"k000007"))

    def test_delete_job_writes_nothing_to_spool(self) -> None:
        spool = RecordingSpool()

        run_job(RangeDeleteJob(self.store, ALL_KEYS, lambda n: b""), spool)

        self.assertEqual(spool.chunks, [])
        self.assertEqual(len(self.store), 0)


class RangeCommandTests(TestCase):
    """rget, rdelete and lru_crawler over real sockets."""

    @defer.inlineCallbacks
    def ask(self, port: int, request: bytes, **options: Any):
        reply = yield threads.deferToThread(exchange, port, request, **options)
        return reply

    @defer.inlineCallbacks
    def test_rget_replies_like_get(self):
        _, port = yield start_server(self)
        yield self.ask(port, b"set a 1 0 1\r\nA\r\nset b 2 0 2\r\nBB\r\nset c 3 0 3\r\nCCC\r\n")

        reply = yield self.ask(port, b"rget 1 0 0 a c\r\n")

        self.assertEqual(reply, b"VALUE a 1 1\r\nA\r\nVALUE b 2 2\r\nBB\r\nEND\r\n")

    @defer.inlineCallbacks
    def test_rget_no_match_sends_end(self):
        _, port = yield start_server(self)

        reply = yield self.ask(port, b"rget 1 1 0 a\r\n")

        self.assertEqual(reply, b"END\r\n")

    @defer.inlineCallbacks
    def test_rget_pipelined_with_get_and_set(self):
        service, port = yield start_server(self, Settings(threads=2, stream_buffer=4096))
        keys = fill_store(service.factory.store, b"p", 200, 100)

        reply = yield self.ask(
            port,
            b"rget 1 1 0 p\r\nget p000001\r\nset q 0 0 3\r\nnew\r\nrget 1 1 2 p000198\r\nget q\r\n",
        )

        first_end = reply.index(b"END\r\n") + 5
        self.assertEqual([key for key, _, _ in parse_values(reply[:first_end])], keys)
        expected_rest = b"".join(
            [
                b"VALUE p000001 0 100\r\n" + value_for(b"p000001", 100) + b"\r\nEND\r\n",
                b"STORED\r\n",
                b"VALUE p000198 0 100\r\n" + value_for(b"p000198", 100) + b"\r\n",
                b"VALUE p000199 0 100\r\n" + value_for(b"p000199", 100) + b"\r\nEND\r\n",
                b"VALUE q 0 3\r\nnew\r\nEND\r\n",
            ]
        )
        self.assertEqual(reply[first_end:], expected_rest)

    @defer.inlineCallbacks
    def test_rget_errors(self):
        _, port = yield start_server(self)
        bad_format = b"CLIENT_ERROR bad command line format\r\n"

        reply = yield self.ask(
            port,
            b"rget 1 1 0\r\n"
            b"rget 1 1 0 a b c\r\n"
            b"rget 2 1 0 a\r\n"
            b"rget 1 1 many a\r\n"
            b"rget 1 1 0 " + b"k" * 251 + b"\r\n"
            b"rdelete 1 1\r\n"
            b"rdelete 1 x 0 a\r\n"
            b"version\r\n",
        )

        self.assertEqual(reply, b"ERROR\r\nERROR\r\n" + bad_format * 3 + b"ERROR\r\n" + bad_format + b"VERSION 1.6.18\r\n")

    @defer.inlineCallbacks
    def test_rdelete_deletes_range_and_counts(self):
        service, port = yield start_server(self)
        fill_store(service.factory.store, b"d", 50, 10)
        fill_store(service.factory.store, b"e", 5, 10)

        reply = yield self.ask(port, b"rdelete 1 1 0 d e\r\nrget 1 1 0 d\r\nstats\r\n")

        self.assertTrue(reply.startswith(b"DELETED 50\r\n"))
        listed = reply[len(b"DELETED 50\r\n") : reply.index(b"END\r\n") + 5]
        self.assertEqual([key for key, _, _ in parse_values(listed)], [b"e%06d" % i for i in range(5)])
        self.assertIn(b"STAT range_items_deleted 50\r\n", reply)

    @defer.inlineCallbacks
    def test_rdelete_noreply_sends_nothing(self):
        service, port = yield start_server(self)
        fill_store(service.factory.store, b"d", 20, 10)
        fill_store(service.factory.store, b"e", 3, 10)

        reply = yield self.ask(
            port,
            b"rdelete 1 1 0 d e noreply\r\nrdelete 1 1 0 e000001 noreply\r\nrdelete 2 1 0 x noreply\r\nrget 1 1 0 a\r\n",
        )

        # The second request deletes from e000001 with no end key: "noreply"
        # is the flag, not the end key.  The third is invalid, and its error
        # is silenced too.
        self.assertEqual([key for key, _, _ in parse_values(reply)], [b"e000000"])
        self.assertTrue(reply.endswith(b"END\r\n"))
        self.assertNotIn(b"DELETED", reply)
        self.assertNotIn(b"CLIENT_ERROR", reply)
        self.assertEqual(service.factory.stats.range_items_deleted, 22)

    @defer.inlineCallbacks
    def test_rdelete_max_items_and_exclusive(self):
        service, port = yield start_server(self)
        fill_store(service.factory.store, b"d", 10, 10)

        reply = yield self.ask(port, b"rdelete 0 1 3 d000000\r\nrget 1 1 0 d\r\n")

        self.assertTrue(reply.startswith(b"DELETED 3\r\n"))
        left = [key for key, _, _ in parse_values(reply[len(b"DELETED 3\r\n") :])]
        self.assertEqual(left, [b"d000000"] + [b"d%06d" % i for i in range(4, 10)])

    @defer.inlineCallbacks
    def test_rdelete_rejected_when_destructive_disabled(self):
        service, port = yield start_server(self, Settings(threads=2, allow_destructive=False))
        fill_store(service.factory.store, b"d", 10, 10)

        reply = yield self.ask(port, b"rdelete 1 1 0 d\r\nrdelete 1 1\r\n")

        self.assertEqual(reply, b"CLIENT_ERROR rdelete not allowed\r\nERROR\r\n")
        self.assertEqual(len(service.factory.store), 10)

    @defer.inlineCallbacks
    def test_metadump_lists_items_in_key_order(self):
        service, port = yield start_server(self)
        yield self.ask(port, b"set b 0 0 1\r\nB\r\nset a 7 100 2\r\nAA\r\nget a\r\nset gone 0 -1 1\r\nx\r\n")
        now = int(reactor.seconds())

        reply = yield self.ask(port, b"lru_crawler metadump all\r\n")

        lines = reply.split(b"\n")
        self.assertEqual(lines[-1], b"")
        self.assertEqual(lines[-2], b"END\r")
        fields = [dict(field.split(b"=", 1) for field in line.split(b" ")) for line in lines[:-2]]
        self.assertEqual([entry[b"key"] for entry in fields], [b"a", b"b"])
        self.assertEqual(fields[0][b"fetch"], b"yes")
        self.assertEqual(fields[1][b"fetch"], b"no")
        # trial's assertAlmostEqual has no delta argument.
        self.assertLessEqual(abs(int(fields[0][b"exp"]) - (now + 100)), 2)
        self.assertEqual(fields[1][b"exp"], b"-1")
        self.assertEqual(fields[0][b"size"], b"66")
        self.assertEqual(fields[1][b"size"], b"61")
        self.assertLessEqual(abs(int(fields[1][b"la"]) - now), 2)
        self.assertNotEqual(fields[0][b"cas"], fields[1][b"cas"])

    @defer.inlineCallbacks
    def test_metadump_class_filter(self):
        service, port = yield start_server(self)
        yield self.ask(port, b"set small 0 0 1\r\nx\r\nset big 0 0 100\r\n" + b"y" * 100 + b"\r\n")

        reply = yield self.ask(port, b"lru_crawler metadump 4\r\nlru_crawler metadump 1,2\r\n")

        first, second = reply.split(b"END\r\n")[:2]
        self.assertEqual(first.count(b"\n"), 1)
        self.assertTrue(first.startswith(b"key=big "))
        self.assertEqual(second.count(b"\n"), 1)
        self.assertTrue(second.startswith(b"key=small "))

    @defer.inlineCallbacks
    def test_mgdump_lists_keys(self):
        _, port = yield start_server(self)
        yield self.ask(port, b"set b 0 0 1\r\nB\r\nset a 0 0 1\r\nA\r\n")

        reply = yield self.ask(port, b"lru_crawler mgdump all\r\n")

        self.assertEqual(reply, b"mg a\r\nmg b\r\nEN\r\n")

    @defer.inlineCallbacks
    def test_dump_refused_behind_other_replies(self):
        _, port = yield start_server(self)

        reply = yield self.ask(port, b"version\r\nlru_crawler mgdump all\r\nlru_crawler metadump all\r\n")

        self.assertEqual(
            reply,
            b"VERSION 1.6.18\r\n"
            b"ERROR cannot pipeline other commands before mgdump\r\n"
            b"ERROR cannot pipeline other commands before metadump\r\n",
        )

    @defer.inlineCallbacks
    def test_dump_after_get_not_refused(self):
        _, port = yield start_server(self)

        reply = yield self.ask(port, b"get nothing\r\nlru_crawler mgdump all\r\n")

        self.assertEqual(reply, b"END\r\nEN\r\n")

    @defer.inlineCallbacks
    def test_requests_after_dump_are_served(self):
        _, port = yield start_server(self)
        yield self.ask(port, b"set a 0 0 1\r\nA\r\n")

        reply = yield self.ask(port, b"lru_crawler mgdump all\r\nversion\r\n")

        self.assertEqual(reply, b"mg a\r\nEN\r\nVERSION 1.6.18\r\n")

    @defer.inlineCallbacks
    def test_other_lru_crawler_forms_get_error(self):
        _, port = yield start_server(self)

        reply = yield self.ask(
            port,
            b"lru_crawler\r\nlru_crawler crawl all\r\nlru_crawler metadump\r\nlru_crawler metadump all extra\r\n",
        )
        bad_class = yield self.ask(port, b"lru_crawler mgdump 0\r\n")

        self.assertEqual(reply, b"ERROR\r\n" * 4)
        self.assertEqual(bad_class, b"BADCLASS invalid class id\r\n")


class MemcachedDumpReferenceTests(TestCase):
    """kvdaemon's lru_crawler replies next to memcached 1.6's."""

    def setUp(self) -> None:
        self.memcached = MemcachedProcess()
        self.addCleanup(self.memcached.stop)

    @defer.inlineCallbacks
    def both(self, port: int, request: bytes):
        ours = yield threads.deferToThread(exchange, port, request)
        theirs = yield threads.deferToThread(exchange, self.memcached.port, request)
        return ours, theirs

    @defer.inlineCallbacks
    def test_dump_errors_match_memcached(self):
        _, port = yield start_server(self)
        requests = [
            b"version\r\nlru_crawler metadump all\r\n",
            b"set x 0 0 1 noreply\r\na\r\nlru_crawler metadump all\r\n",
            b"bogus\r\nlru_crawler metadump all\r\n",
            b"delete nothing\r\nlru_crawler metadump all\r\n",
            b"get nothing\r\nversion\r\nlru_crawler metadump all\r\n",
            b"lru_crawler\r\n",
            b"lru_crawler foo\r\n",
            b"lru_crawler metadump\r\n",
            b"lru_crawler metadump all extra\r\n",
            b"lru_crawler metadump x\r\n",
            b"lru_crawler metadump 0\r\n",
            b"lru_crawler metadump 64\r\n",
            b"lru_crawler metadump 1,y\r\n",
        ]
        for request in requests:
            ours, theirs = yield self.both(port, request)
            self.assertEqual(ours, theirs, request)

    @defer.inlineCallbacks
    def test_dump_after_flushing_commands_matches_memcached(self):
        _, port = yield start_server(self)
        for request in [b"get nothing\r\nlru_crawler metadump all\r\n", b"mn\r\nlru_crawler metadump all\r\n"]:
            ours, theirs = yield self.both(port, b"flush_all\r\n" + request)
            self.assertEqual(ours, theirs, request)

    @defer.inlineCallbacks
    def test_metadump_fields_match_memcached(self):
        _, port = yield start_server(self)
        setup = b"".join(
            [
                b"set foo 0 0 1\r\na\r\n",
                b"set b%20r 5 0 2\r\nxy\r\n",
                b"set " + bytes(range(33, 127)) + b" 0 0 1\r\na\r\n",
                b"set k37 0 0 37\r\n" + b"x" * 37 + b"\r\n",
                b"set k100 9 0 100\r\n" + b"x" * 100 + b"\r\n",
                b"set k520000 0 0 520000\r\n" + b"x" * 520000 + b"\r\n",
                b"set k600000 0 0 600000\r\n" + b"x" * 600000 + b"\r\n",
                b"set fetched 0 0 1\r\na\r\nget fetched\r\n",
                b"set expired 0 -1 1\r\na\r\n",
            ]
        )
        yield self.both(port, setup)

        ours, theirs = yield self.both(port, b"lru_crawler metadump all\r\n")

        def fields(reply: bytes) -> dict[bytes, dict[bytes, bytes]]:
            self.assertTrue(reply.endswith(b"\nEND\r\n"), reply[-80:])
            entries = {}
            for line in reply[: -len(b"END\r\n")].splitlines():
                entry = dict(field.split(b"=", 1) for field in line.split(b" "))
                # Times and CAS uniques differ from server to server.
                del entry[b"la"], entry[b"cas"]
                entries[entry[b"key"]] = entry
            return entries

        self.assertEqual(fields(ours), fields(theirs))
        self.assertEqual(len(fields(ours)), 8)


class AdminSwitchesReferenceTests(TestCase):
    """--disable-dumps and --disable-flush-all next to memcached's -X and -F."""

    def setUp(self) -> None:
        self.memcached = MemcachedProcess("-X", "-F")
        self.addCleanup(self.memcached.stop)

    @defer.inlineCallbacks
    def test_disabled_commands_match_memcached(self):
        service, port = yield start_server(self, Settings(threads=2, allow_dumps=False, allow_destructive=False))
        requests = [
            b"set kept 0 0 4\r\nsafe\r\n",
            b"lru_crawler metadump all\r\n",
            b"lru_crawler metadump 1\r\n",
            b"lru_crawler metadump\r\n",
            b"flush_all\r\n",
            b"flush_all 0\r\n",
            b"flush_all noreply\r\nversion\r\n",
            b"get kept\r\n",
        ]
        for request in requests:
            ours = yield threads.deferToThread(exchange, port, request)
            theirs = yield threads.deferToThread(exchange, self.memcached.port, request)
            self.assertEqual(ours, theirs, request)

    @defer.inlineCallbacks
    def test_disabled_mgdump_rejected(self):
        # memcached 1.6.18 has no mgdump, so there is nothing to compare
        # with.  kvdaemon replies in the form memcached uses for metadump.
        service, port = yield start_server(self, Settings(threads=2, allow_dumps=False))
        fill_store(service.factory.store, b"k", 5, 10)
        with capturedLogs() as events:
            reply = yield threads.deferToThread(exchange, port, b"lru_crawler mgdump all\r\nrget 1 1 1 k\r\n")
        self.assertEqual(reply[: len(b"ERROR mgdump not allowed\r\n")], b"ERROR mgdump not allowed\r\n")
        # Range reads stay enabled.
        self.assertTrue(reply.endswith(b"END\r\n"))
        rejections = [event for event in events if event.get("reply") == b"ERROR mgdump not allowed\r\n"]
        self.assertEqual(len(rejections), 1)
        self.assertTrue(rejections[0]["peer"].startswith("tcp:127.0.0.1:"))
        self.assertIn(b"STAT dump_enabled no\r\n", (yield threads.deferToThread(exchange, port, b"stats settings\r\n")))


class StreamingBehaviourTests(TestCase):
    """Flow control of range streams with real sockets and clients that stop reading."""

    timeout = 240

    @defer.inlineCallbacks
    def test_stalled_reader_memory_bounded(self):
        value_size = 64 * 1024
        count = 1600  # 100 MiB of values
        stream_buffer = 256 * 1024
        settings = Settings(threads=2, max_memory=512 * MiB, stream_buffer=stream_buffer, stall_timeout=600)
        service, port = yield start_server(self, settings)
        keys = fill_store(service.factory.store, b"big", count, value_size)

        # Warm up: one complete scan of 2 MiB, so that worker threads,
        # allocator arenas and buffers exist before the baseline.  Then
        # return free heap memory to the system, so that the baseline
        # includes no free memory that the stalled stream could reuse unseen.
        yield threads.deferToThread(discard_scan, port, b"rget 1 1 32 big\r\n")
        gc.collect()
        release_free_memory()
        baseline = rss_bytes()

        client, first = yield threads.deferToThread(start_stalled_scan, port, b"rget 1 1 0 big\r\n")
        self.addCleanup(client.close)
        yield wait_until(lambda: len(stalled_streams(service)) == 1, what="the stream to pause")
        stream = next(iter(service.factory.streams))
        connection = next(c for c in service.factory.connections if c.stream is stream)

        peak = 0
        peak_transport_buffer = 0
        bytes_sent = []
        for _ in range(10):
            yield deferLater(reactor, 0.05, lambda: None)
            peak = max(peak, rss_bytes())
            transport = connection.transport
            buffered = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
            peak_transport_buffer = max(peak_transport_buffer, buffered)
            bytes_sent.append(stream.bytes_sent)

        # The client has read a small part of 100 MiB and the stream sits
        # still while the client does not read.
        self.assertLess(bytes_sent[-1], 20 * MiB)
        self.assertEqual(bytes_sent[0], bytes_sent[-1])
        # Twisted pauses a producer above 64 KiB; a step that was running
        # then adds at most one spool cap and one item.
        self.assertLessEqual(peak_transport_buffer, 64 * 1024 + stream_buffer + value_size + 1024)
        self.assertLessEqual(peak - baseline, stream_buffer + peak_transport_buffer + 4 * MiB)

        reply = yield threads.deferToThread(read_until, client, b"END\r\n", bytearray(first))
        self.assertEqual(stream.bytes_sent, len(reply))
        items = parse_values(bytes(reply))
        self.assertEqual([key for key, _, _ in items], keys)
        self.assertEqual(items[-1][2], value_for(keys[-1], value_size))

    @defer.inlineCallbacks
    def test_stalled_scans_leave_pool_free(self):
        settings = Settings(threads=2, stream_buffer=64 * 1024, stall_timeout=600)
        service, port = yield start_server(self, settings)
        keys = fill_store(service.factory.store, b"s", 160, 64 * 1024)
        stalled = []
        for _ in range(10):
            client, _ = yield threads.deferToThread(start_stalled_scan, port, b"rget 1 1 0 s\r\n")
            self.addCleanup(client.close)
            stalled.append(client)
        yield wait_until(lambda: len(stalled_streams(service)) == 10, what="10 paused streams")

        reply = yield threads.deferToThread(exchange, port, b"rget 1 1 2 s000100\r\nget s000003\r\n")

        self.assertEqual(
            parse_values(reply[: reply.index(b"END\r\n") + 5]),
            [(keys[100], 0, value_for(keys[100], 64 * 1024)), (keys[101], 0, value_for(keys[101], 64 * 1024))],
        )
        self.assertTrue(reply.endswith(b"VALUE s000003 0 65536\r\n" + value_for(keys[3], 64 * 1024) + b"\r\nEND\r\n"))
        self.assertEqual(len(stalled_streams(service)), 10)

    @defer.inlineCallbacks
    def test_scan_during_writes_and_deletes(self):
        settings = Settings(threads=2, stream_buffer=4096)
        service, port = yield start_server(self, settings)
        store = service.factory.store
        # 8 MB: more than the kernel's socket buffers take for a client
        # that does not read (Linux's default tcp_wmem maximum is 4 MiB),
        # so the scan is still running after the writer's first round.
        keys = fill_store(store, b"c", 2000, 4000)
        stable = keys[0::2]
        changing = keys[1::2]
        first_round_done = threading.Event()
        scan_started = threading.Event()
        streams_after_first_round: list[int] = []

        def scan() -> bytes:
            client = connect_slow_reader(port)
            with client:
                client.sendall(b"rget 1 1 0 c\r\n")
                data = bytearray(client.recv(32 * 1024))
                scan_started.set()
                # The scan is stalled part way through while the writer
                # deletes, rewrites and adds keys all over the range.
                if not first_round_done.wait(30):
                    raise AssertionError("the writer did not finish a round")
                return bytes(read_until(client, b"END\r\n", data))

        def write() -> int:
            operations = 0
            # On a busy machine the scanning thread may start late; the
            # first round must meet a scan that is under way.
            if not scan_started.wait(30):
                raise AssertionError("the scan did not start")
            with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
                for round_number in range(3):
                    requests = []
                    for key in changing:
                        requests.append(b"delete %s\r\n" % key)
                        requests.append(b"set %s 0 0 5\r\nround\r\n" % key)
                        requests.append(b"set %sx 0 0 3\r\nnew\r\n" % key)
                        operations += 3
                    client.sendall(b"".join(requests))
                    replies = read_exactly(client, len(changing) * len(b"DELETED\r\nSTORED\r\nSTORED\r\n"))
                    if round_number == 0:
                        self.assertEqual(replies.count(b"DELETED\r\n"), len(changing))
                        streams_after_first_round.append(len(service.factory.streams))
                    first_round_done.set()
            return operations

        reply, operations = yield defer.gatherResults([threads.deferToThread(scan), threads.deferToThread(write)])

        items = parse_values(reply)
        returned = [key for key, _, _ in items]
        self.assertEqual(returned, sorted(set(returned)))
        values = dict((key, value) for key, _, value in items)
        for key in stable:
            self.assertEqual(values.get(key), value_for(key, 4000), key)
        self.assertEqual(operations, 3 * 3 * len(changing))
        self.assertEqual(streams_after_first_round, [1])

    @defer.inlineCallbacks
    def test_too_many_streams_reply(self):
        settings = Settings(threads=2, stream_buffer=64 * 1024, max_streams=1, stall_timeout=600)
        service, port = yield start_server(self, settings)
        fill_store(service.factory.store, b"s", 160, 64 * 1024)
        client, _ = yield threads.deferToThread(start_stalled_scan, port, b"rget 1 1 0 s\r\n")
        self.addCleanup(client.close)
        yield wait_until(lambda: len(stalled_streams(service)) == 1, what="the stream to pause")

        reply = yield threads.deferToThread(exchange, port, b"rget 1 1 0 s\r\nrdelete 1 1 0 s\r\nget s000000\r\n")
        dump_reply = yield threads.deferToThread(exchange, port, b"lru_crawler mgdump all\r\n")

        rejected = b"SERVER_ERROR too many concurrent streams\r\n"
        self.assertTrue(reply.startswith(rejected * 2 + b"VALUE s000000 0 65536\r\n"), reply[:200])
        self.assertEqual(dump_reply, rejected)
        self.assertEqual(service.factory.stats.streams_rejected, 3)
        self.assertEqual(len(service.factory.store), 160)

    @defer.inlineCallbacks
    def test_stall_timeout_closes_connection(self):
        settings = Settings(threads=2, stream_buffer=64 * 1024, stall_timeout=0.5)
        service, port = yield start_server(self, settings)
        fill_store(service.factory.store, b"s", 160, 64 * 1024)
        client, _ = yield threads.deferToThread(start_stalled_scan, port, b"rget 1 1 0 s\r\n")
        self.addCleanup(client.close)

        yield wait_until(lambda: service.factory.stats.streams_stalled == 1, what="the stall timeout")
        yield wait_until(lambda: not service.factory.connections, what="the connection to close")

        self.assertEqual(service.factory.streams, set())
        self.assertEqual(service.factory.stats.streams_running, 0)
        closed = yield threads.deferToThread(self._read_to_close, client)
        self.assertTrue(closed)

    @defer.inlineCallbacks
    def test_service_stop_with_stalled_stream(self):
        settings = Settings(threads=2, stream_buffer=64 * 1024, stall_timeout=600)
        service, port = yield start_server(self, settings)
        fill_store(service.factory.store, b"s", 160, 64 * 1024)
        client, _ = yield threads.deferToThread(start_stalled_scan, port, b"rget 1 1 0 s\r\n")
        self.addCleanup(client.close)
        yield wait_until(lambda: len(stalled_streams(service)) == 1, what="the stream to pause")

        yield service.stopService()

        self.assertEqual(service.factory.streams, set())
        self.assertFalse(service.threadpool.started)
        closed = yield threads.deferToThread(self._read_to_close, client)
        self.assertTrue(closed)

    @staticmethod
    def _read_to_close(client: socket.socket) -> bool:
        """Read until the server closes or resets the connection; return whether it did within 30 seconds."""
        client.settimeout(30)
        try:
            while client.recv(256 * 1024):
                pass
        except ConnectionResetError:
            pass
        except socket.timeout:
            return False
        return True
