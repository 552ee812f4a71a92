"""
Tests for the server's limits: ``--max-connections``, the memory that a
client reading none of its replies can make the server hold, and
``--max-memory`` under a write load three times its size.

The memory tests run ``twistd kvdaemon`` as a subprocess and read its
resident set size from ``/proc/PID/status``.
"""

from __future__ import annotations

import random
import socket
import threading
import time

from twisted.internet import defer, threads
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from kvdaemon import KVDaemonFactory, Settings
from kvdaemon._connection import OUTPUT_BATCH_BYTES
from tests.binary_packets import request as binary_request
from tests.daemon_process import DaemonProcess, MiB
from tests.support import Client, FakeReactor, FakeThreadPool, MemcachedProcess, send_and_read, start_server

REJECTION = b"ERROR Too many open connections\r\n"

#: The items the unread-replies tests fetch: 100 values of 10 KiB.
KEY_COUNT = 100
VALUE_SIZE = 10 * 1024

#: Bytes of requests a greedy client sends at most before giving up.
GREEDY_SEND_LIMIT = 200 * MiB

#: A greedy client whose sends make no progress for this long has filled
#: the kernel's socket buffers and the server's input backlog.
STALL_SECONDS = 3.0

#: Size of Twisted's transport write buffer (``FileDescriptor.bufferSize``).
#: Above this many bytes, the transport pauses the connection.
TRANSPORT_BUFFER = 64 * 1024

#: How much the server's RSS may grow while a client sends requests and
#: reads none of the replies.  The connection keeps its unprocessed input,
#: up to ``max_pending_input`` (2 MiB), and briefly a second copy of it
#: while a read is appended.  Twisted's transport buffer holds up to
#: TRANSPORT_BUFFER, and one batch of replies (OUTPUT_BATCH_BYTES plus one
#: value) is built before the pause takes effect.  4 MiB more covers the
#: interpreter's and the allocator's own growth.  Measured on a 2-core
#: test machine: 3.9 to 4.5 MiB of peak growth (``VmHWM``) for text and
#: binary pipelines, 2.1 to 2.6 MiB after the client closed, and 1.2 MiB
#: for one get line of 20,000 keys.
UNREAD_REPLIES_BOUND = 2 * Settings().max_pending_input + TRANSPORT_BUFFER + OUTPUT_BATCH_BYTES + VALUE_SIZE + 4 * MiB

#: The memory limit of the load test, in MiB, and the data written: three
#: times the limit.
LOAD_MAX_MEMORY = 32
LOAD_BYTES = 3 * LOAD_MAX_MEMORY * MiB
LOAD_WRITERS = 4

#: The default item size limit, which counts the key and 59 bytes of
#: memcached's item overhead besides the value.
ITEM_SIZE_LIMIT = 1024 * 1024
LOAD_VALUE_SIZES = [10, 100, 1000, 5000, 20000, 100000, 300000, ITEM_SIZE_LIMIT - 100]

#: How much the server's RSS may grow during the load test.  Items cost
#: more than ``--max-memory`` counts, because the store accounts key, value
#: and 48 bytes per item, but Python adds a key object, a dict slot and a
#: sorted-list slot.  Writes also copy each value through the input buffer.
#: Measured on a 2-core test machine: 41 to 45 MiB of peak growth
#: (``VmHWM``) for 32 MiB of items, about 1.3 times the limit.
LOAD_GROWTH_BOUND = int(2.5 * LOAD_MAX_MEMORY * MiB)


def make_factory(**settings) -> KVDaemonFactory:
    return KVDaemonFactory(Settings(**settings), reactor=FakeReactor(), threadpool=FakeThreadPool())


def peak_rss(pid: int) -> int:
    """Return the highest resident set size (``VmHWM``) of process ``pid`` so far, in bytes."""
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM line for pid %d: the process has exited" % pid)


def read_all(connection: socket.socket) -> bytes:
    """Read from ``connection`` until the server closes it."""
    chunks = []
    while True:
        chunk = connection.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


class MaxConnectionsTests(SynchronousTestCase):
    """``Settings.max_connections`` with in-memory transports."""

    def test_connection_over_limit_rejected(self) -> None:
        factory = make_factory(max_connections=2)
        first = Client(factory, port=40000)
        Client(factory, port=40001)

        with capturedLogs() as events:
            third = Client(factory, port=40002)

        self.assertEqual(third.transport.value(), REJECTION)
        self.assertTrue(third.closed)
        self.assertFalse(first.closed)
        self.assertEqual(factory.stats.rejected_connections, 1)
        self.assertEqual(factory.stats.curr_connections, 2)
        # memcached counts a rejected connection in neither of these.
        self.assertEqual(factory.stats.total_connections, 2)
        rejections = [event for event in events if event["log_format"].startswith("Rejected a connection")]
        self.assertEqual(len(rejections), 1)
        self.assertEqual(rejections[0]["peer"], "tcp:127.0.0.1:40002")
        self.assertEqual(rejections[0]["limit"], 2)

    def test_rejected_connection_ignores_requests(self) -> None:
        factory = make_factory(max_connections=1)
        Client(factory, port=40000)
        rejected = Client(factory, port=40001)
        rejected.transport.clear()

        self.assertEqual(rejected.send(b"version\r\n"), b"")

    def test_freed_slot_serves_new_connection(self) -> None:
        factory = make_factory(max_connections=1)
        first = Client(factory, port=40000)
        Client(factory, port=40001)

        first.protocol.connectionLost()
        second = Client(factory, port=40002)

        self.assertEqual(second.send(b"version\r\n"), b"VERSION 1.6.18\r\n")
        self.assertEqual(factory.stats.rejected_connections, 1)
        self.assertEqual(factory.stats.curr_connections, 1)


class MaxConnectionsSocketTests(TestCase):
    """``Settings.max_connections`` over real sockets."""

    @defer.inlineCallbacks
    def test_limit_over_sockets(self) -> None:
        _, port = yield start_server(self, Settings(threads=1, max_connections=2))
        results = yield threads.deferToThread(self._connect_past_limit, port)
        rejected_reply, stats_while_full, served_reply = results

        self.assertEqual(rejected_reply, REJECTION)
        self.assertIn(b"STAT rejected_connections 1\r\n", stats_while_full)
        self.assertIn(b"STAT curr_connections 2\r\n", stats_while_full)
        # As in memcached, the rejected connection is not counted here.
        self.assertIn(b"STAT total_connections 2\r\n", stats_while_full)
        self.assertEqual(served_reply, b"VERSION 1.6.18\r\n")

    def _connect_past_limit(self, port: int) -> tuple[bytes, bytes, bytes]:
        first = socket.create_connection(("127.0.0.1", port), timeout=30)
        second = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            # A reply proves the server has accepted each connection.
            send_and_read(first, b"version\r\n")
            send_and_read(second, b"version\r\n")
            with socket.create_connection(("127.0.0.1", port), timeout=30) as third:
                rejected_reply = read_all(third)
            stats_while_full = send_and_read(second, b"stats\r\n", b"END\r\n")

            first.close()
            # The slot is free once the server has seen the close.
            while b"STAT curr_connections 1\r\n" not in send_and_read(second, b"stats\r\n", b"END\r\n"):
                time.sleep(0.05)
            with socket.create_connection(("127.0.0.1", port), timeout=30) as fourth:
                served_reply = send_and_read(fourth, b"version\r\n")
        finally:
            first.close()
            second.close()
        return rejected_reply, stats_while_full, served_reply


class MaxConnectionsReferenceTests(SynchronousTestCase):
    """What memcached 1.6.18 itself does past ``-c``."""

    def test_memcached_rejection_matches(self) -> None:
        # memcached reserves some of its -c file descriptors for itself, so
        # it rejects before the Nth connection, and only the reply and the
        # counters are compared.  With -c 20 it fails to start (too many
        # open files).
        memcached = MemcachedProcess("-c", "30")
        self.addCleanup(memcached.stop)
        control = socket.create_connection(("127.0.0.1", memcached.port), timeout=30)
        accepted = [control]

        def counters() -> tuple[bytes, bytes]:
            lines = send_and_read(control, b"stats\r\n", b"END\r\n").split(b"\r\n")
            stats = dict(line.split(b" ")[1:3] for line in lines if line.startswith(b"STAT "))
            return stats[b"total_connections"], stats[b"rejected_connections"]

        rejected_reply = None
        try:
            while rejected_reply is None and len(accepted) < 30:
                before = counters()
                connection = socket.create_connection(("127.0.0.1", memcached.port), timeout=30)
                # Wait until memcached has either accepted or rejected it.
                after = counters()
                while after == before:
                    time.sleep(0.01)
                    after = counters()
                if after[1] == before[1]:
                    accepted.append(connection)
                    continue
                rejected_reply = read_all(connection)
                connection.close()
            total_connections, rejected_connections = counters()
        finally:
            for connection in accepted:
                connection.close()

        self.assertEqual(rejected_reply, REJECTION)
        self.assertEqual(rejected_connections, b"1")
        # The rejected connection is not counted in total_connections.
        self.assertEqual(total_connections, before[0])


class PausingTransport(StringTransport):
    """
    A StringTransport that pauses its streaming producer, as Twisted's TCP
    transport does, once more than ``limit`` bytes wait to be sent.
    """

    def __init__(self, limit: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.limit = limit

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and len(self.value()) > self.limit and self.producerState != "paused":
            self.producerState = "paused"
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        """Take the bytes written so far and resume the producer, as a socket that sent them would."""
        output = self.value()
        self.clear()
        if self.producer is not None and self.producerState == "paused":
            self.producerState = "producing"
            self.producer.resumeProducing()
        return output


class LongReplyTests(SynchronousTestCase):
    """A ``get`` of many keys to a transport that pauses the connection."""

    def setUp(self) -> None:
        self.factory = make_factory()
        self.value = b"v" * VALUE_SIZE
        for number in range(KEY_COUNT):
            self.factory.store.store("set", item_key(number), self.value, 0, 0, 0)
        self.transport = PausingTransport(TRANSPORT_BUFFER, peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.protocol = self.factory.buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)

    def expected_reply(self, keys: list[bytes], command: bytes = b"get") -> bytes:
        if command == b"gets":
            blocks = [b"VALUE %s 0 %d %d\r\n%s\r\n" % (key, VALUE_SIZE, self.factory.store.get(key).cas, self.value) for key in keys]
        else:
            blocks = [b"VALUE %s 0 %d\r\n%s\r\n" % (key, VALUE_SIZE, self.value) for key in keys]
        return b"".join(blocks) + b"END\r\n"

    def drain_all(self) -> bytes:
        chunks = []
        while True:
            chunk = self.transport.drain()
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def test_long_get_waits_for_transport(self) -> None:
        keys = [item_key(number) for number in range(KEY_COUNT)]

        self.protocol.dataReceived(b"get " + b" ".join(keys) + b"\r\nversion\r\n")

        # The reply stopped after the batch that filled the transport.
        self.assertEqual(self.transport.producerState, "paused")
        self.assertLess(len(self.transport.value()), TRANSPORT_BUFFER + 2 * OUTPUT_BATCH_BYTES)
        self.assertLess(self.factory.stats.cmd_get, KEY_COUNT)
        self.assertEqual(self.drain_all(), self.expected_reply(keys) + b"VERSION 1.6.18\r\n")
        self.assertEqual(self.factory.stats.cmd_get, KEY_COUNT)
        self.assertEqual(self.factory.stats.get_hits, KEY_COUNT)

    def test_long_gets_gat_wait_for_transport(self) -> None:
        keys = [item_key(number) for number in range(KEY_COUNT)]

        self.protocol.dataReceived(b"gets " + b" ".join(keys) + b"\r\n")
        gets_reply = self.drain_all()
        self.protocol.dataReceived(b"gat 100 " + b" ".join(keys) + b"\r\n")
        gat_reply = self.drain_all()

        self.assertEqual(gets_reply, self.expected_reply(keys, b"gets"))
        self.assertEqual(gat_reply, self.expected_reply(keys))
        self.assertEqual(self.factory.stats.touch_hits, KEY_COUNT)

    def test_long_get_bad_key_only_error(self) -> None:
        # memcached sends none of the values when a later key is too long.
        keys = [item_key(number) for number in range(KEY_COUNT)] + [b"k" * 251]

        self.protocol.dataReceived(b"get " + b" ".join(keys) + b"\r\n")

        self.assertEqual(self.drain_all(), b"CLIENT_ERROR bad command line format\r\n")
        self.assertEqual(self.factory.stats.cmd_get, KEY_COUNT)

    def test_connection_lost_during_long_get(self) -> None:
        keys = [item_key(number) for number in range(KEY_COUNT)]
        self.protocol.dataReceived(b"get " + b" ".join(keys) + b"\r\n")
        written = len(self.transport.value())

        self.protocol.connectionLost()
        self.transport.drain()

        self.assertEqual(self.transport.value(), b"")
        self.assertLess(self.factory.stats.cmd_get, KEY_COUNT)
        self.assertGreater(written, 0)


class GreedyClient:
    """
    A connection that sends ``chunk`` over and over from a thread and reads
    nothing, until GREEDY_SEND_LIMIT bytes are sent or :meth:`stop` is called.
    """

    def __init__(self, daemon: DaemonProcess, chunk: bytes) -> None:
        self.connection = daemon.connect()
        self.connection.settimeout(0.5)
        self.chunk = chunk
        #: Bytes the kernel has accepted so far.
        self.sent = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._send, name="greedy-client")
        self._thread.start()

    def _send(self) -> None:
        view = memoryview(self.chunk)
        while not self._stopping.is_set() and self.sent < GREEDY_SEND_LIMIT:
            try:
                self.sent += self.connection.send(view)
            except socket.timeout:
                continue
            except OSError:
                return

    def wait_until_stalled(self) -> None:
        """Return once GREEDY_SEND_LIMIT bytes are sent or no send has progressed for STALL_SECONDS."""
        last_sent = -1
        last_progress = time.monotonic()
        while self.sent < GREEDY_SEND_LIMIT and time.monotonic() - last_progress < STALL_SECONDS:
            time.sleep(0.1)
            if self.sent != last_sent:
                last_sent = self.sent
                last_progress = time.monotonic()

    def stop(self) -> None:
        """Stop sending and close the connection with the replies unread."""
        self._stopping.set()
        self._thread.join()
        self.connection.close()


def item_key(number: int) -> bytes:
    return b"key%03d" % number


class UnreadRepliesMemoryTests(SynchronousTestCase):
    """
    A client that sends requests and reads none of the replies, against a
    ``twistd kvdaemon`` subprocess.
    """

    def setUp(self) -> None:
        self.daemon = DaemonProcess(self)
        self.value = b"v" * VALUE_SIZE
        with self.daemon.connect() as connection:
            for number in range(KEY_COUNT):
                request = b"set %s 0 0 %d\r\n%s\r\n" % (item_key(number), VALUE_SIZE, self.value)
                self.assertEqual(send_and_read(connection, request), b"STORED\r\n")

    def warm_up(self, requests: bytes, last_request: bytes, last_reply_end: bytes) -> int:
        """
        Send ``requests`` and then ``last_request``, read the replies up to
        the one ending in ``last_reply_end``, and return the server's RSS.
        """
        with self.daemon.connect() as connection:
            send_and_read(connection, requests + last_request, last_reply_end)
        return self.daemon.rss()

    def check_server_works(self) -> None:
        with self.daemon.connect() as connection:
            self.assertEqual(send_and_read(connection, b"set other 0 0 5\r\nhello\r\n"), b"STORED\r\n")
            self.assertEqual(
                send_and_read(connection, b"get other\r\n", b"END\r\n"),
                b"VALUE other 0 5\r\nhello\r\nEND\r\n",
            )

    def wait_for_close(self) -> None:
        """Wait until the server has closed every connection except the one that reads the stats."""
        while self.daemon.stats()[b"curr_connections"] != b"1":
            time.sleep(0.1)

    def check_pipeline_bounded(self, requests: list[bytes], last_request: bytes, last_reply_end: bytes) -> None:
        baseline = self.warm_up(b"".join(requests), last_request, last_reply_end)

        greedy = GreedyClient(self.daemon, b"".join(requests) * 50)
        try:
            greedy.wait_until_stalled()
            # The server stopped reading long before the limit.  After that,
            # the kernel's socket buffers take at most a few tens of MiB more.
            self.assertLess(greedy.sent, GREEDY_SEND_LIMIT)
            self.check_server_works()
            growth_while_stalled = peak_rss(self.daemon.pid) - baseline
        finally:
            greedy.stop()

        self.assertLess(growth_while_stalled, UNREAD_REPLIES_BOUND)
        self.wait_for_close()
        self.assertLess(self.daemon.rss() - baseline, UNREAD_REPLIES_BOUND)
        self.check_server_works()

    def test_text_pipeline_bounded(self) -> None:
        requests = [b"get %s\r\n" % item_key(number) for number in range(KEY_COUNT)]

        self.check_pipeline_bounded(requests, b"version\r\n", b"VERSION 1.6.18\r\n")

    def test_binary_pipeline_bounded(self) -> None:
        # GETQ (0x09) for most keys, and a GET (0x00) now and then.
        requests = [
            binary_request(0x00 if number % 10 == 9 else 0x09, item_key(number), opaque=number)
            for number in range(KEY_COUNT)
        ]
        # The version reply's value is the version.
        self.check_pipeline_bounded(requests, binary_request(0x0B), b"1.6.18")

    def test_long_get_line_bounded(self) -> None:
        # One 140 KB request whose reply is 200 MB.
        keys = [item_key(number % KEY_COUNT) for number in range(20000)]
        request = b"get " + b" ".join(keys) + b"\r\n"
        expected = b"".join(b"VALUE %s 0 %d\r\n%s\r\n" % (key, VALUE_SIZE, self.value) for key in keys) + b"END\r\n"
        baseline = self.warm_up(b"get " + b" ".join(keys[:KEY_COUNT]) + b"\r\n", b"version\r\n", b"VERSION 1.6.18\r\n")
        written_before = int(self.daemon.stats()[b"bytes_written"])

        with self.daemon.connect() as greedy:
            greedy.sendall(request)
            # Wait until the server has stopped writing values.  After that,
            # bytes_written grows only by the stats replies themselves.
            written = written_before
            while True:
                time.sleep(1.0)
                now_written = int(self.daemon.stats()[b"bytes_written"])
                if now_written - written < VALUE_SIZE:
                    break
                written = now_written
            self.assertLess(written - written_before, len(expected) // 10)
            self.check_server_works()
            growth_while_stalled = peak_rss(self.daemon.pid) - baseline

            received = bytearray()
            while len(received) < len(expected):
                chunk = greedy.recv(1 << 20)
                if not chunk:
                    break
                received += chunk

        self.assertLess(growth_while_stalled, UNREAD_REPLIES_BOUND)
        self.assertEqual(len(received), len(expected))
        self.assertEqual(bytes(received), expected)
        self.check_server_works()

    def test_long_get_line_bad_key_bounded(self) -> None:
        # memcached replies with only the error when the last key is too
        # long, so the values before it must not be built up either.
        keys = [item_key(number % KEY_COUNT) for number in range(20000)]
        request = b"get " + b" ".join(keys) + b" " + b"k" * 251 + b"\r\n"
        baseline = self.warm_up(b"get " + b" ".join(keys[:KEY_COUNT]) + b"\r\n", b"version\r\n", b"VERSION 1.6.18\r\n")

        with self.daemon.connect() as connection:
            reply = send_and_read(connection, request)

        self.assertEqual(reply, b"CLIENT_ERROR bad command line format\r\n")
        self.assertLess(peak_rss(self.daemon.pid) - baseline, UNREAD_REPLIES_BOUND)
        self.assertEqual(self.daemon.stats()[b"cmd_get"], b"%d" % (KEY_COUNT + len(keys)))


class MaxMemoryLoadTests(SynchronousTestCase):
    """``--max-memory`` of a ``twistd kvdaemon`` subprocess under a write load three times its size."""

    def test_writes_past_limit_evict(self) -> None:
        daemon = DaemonProcess(self, "--max-memory", str(LOAD_MAX_MEMORY))
        baseline = daemon.rss()
        unexpected_replies: list[bytes] = []
        writer_errors: list[str] = []
        recent_items: dict[bytes, bytes] = {}
        barrier = threading.Barrier(LOAD_WRITERS)

        def write(writer: int) -> None:
            try:
                write_share(writer)
            except Exception as error:
                writer_errors.append(repr(error))
                barrier.abort()

        def write_share(writer: int) -> None:
            chooser = random.Random(writer)
            written = 0
            number = 0
            with daemon.connect() as connection:

                def store(key: bytes, value: bytes) -> None:
                    reply = send_and_read(connection, b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value))
                    if reply != b"STORED\r\n":
                        unexpected_replies.append(reply)

                while written < LOAD_BYTES // LOAD_WRITERS:
                    size = chooser.choice(LOAD_VALUE_SIZES)
                    store(b"w%d:%06d" % (writer, number), bytes([65 + number % 26]) * size)
                    written += size
                    number += 1
                # Items stored after every writer has finished its share
                # are the most recent, so the LRU keeps them.
                barrier.wait()
                for size in LOAD_VALUE_SIZES[-3:]:
                    key = b"recent%d:%d" % (writer, size)
                    value = bytes([97 + writer]) * size
                    store(key, value)
                    recent_items[key] = value

        writers = [threading.Thread(target=write, args=(writer,)) for writer in range(LOAD_WRITERS)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()

        self.assertEqual(writer_errors, [])
        self.assertEqual(unexpected_replies, [])
        stats = daemon.stats()
        self.assertGreater(int(stats[b"evictions"]), 0)
        self.assertLessEqual(int(stats[b"bytes"]), LOAD_MAX_MEMORY * MiB)
        self.assertEqual(len(recent_items), 3 * LOAD_WRITERS)
        with daemon.connect() as connection:
            for key, value in recent_items.items():
                reply = send_and_read(connection, b"get %s\r\n" % key, b"END\r\n")
                self.assertEqual(reply, b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (key, len(value), value))
        self.assertLess(peak_rss(daemon.pid) - baseline, LOAD_GROWTH_BOUND)
        self.assertNotIn("MemoryError", daemon.log())
        self.assertNotIn("Traceback", daemon.log())
