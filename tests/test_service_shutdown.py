"""
Tests for stopping kvdaemon: ``KVDaemonService.stopService`` stepped with
fakes (idle connections, a connection with output still pending, a running
stream), the text ``shutdown`` command against memcached 1.6.18, and
``twistd kvdaemon`` stopped under load by SIGTERM or by ``shutdown``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, threads
from twisted.internet.error import ReactorNotRunning
from twisted.internet.testing import MemoryReactor
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from kvdaemon import KVDaemonFactory, KVDaemonService, Settings
from kvdaemon._options import Options
from tests.binary_packets import request
from tests.support import (
    Client,
    FakeReactor,
    FakeThreadPool,
    MemcachedProcess,
    exchange,
    free_port,
    send_and_read,
    start_server,
    wait_for_port,
)
from tests.test_reference import parse_stats
from tests.test_twistd import REPOSITORY, TWISTD

EMBEDDING_PROGRAM = """
from twisted.internet import reactor
from kvdaemon import KVDaemonService

service = KVDaemonService(listen=["tcp:0:interface=127.0.0.1"])
service.startService()
assert service.threadpool.started
reactor.callLater(0.2, reactor.stop)
reactor.run()
assert not service.threadpool.started
print("exited")
"""

NOT_ENABLED = b"ERROR: shutdown not enabled\r\n"
INVALID_MODE = b"CLIENT_ERROR invalid shutdown mode\r\n"


class ReactorShutdownTests(TestCase):
    """A program embedding KVDaemonService exits when its reactor stops, even without stopService."""

    def test_reactor_stop_stops_worker_pool(self) -> None:
        result = subprocess.run(
            [sys.executable, "-c", EMBEDDING_PROGRAM],
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr.decode(errors="replace"))
        self.assertEqual(result.stdout.strip(), b"exited")


class ServiceReactor(MemoryReactor, FakeReactor):
    """
    A fake reactor for a whole service: MemoryReactor's listening, with the
    clock and queued ``callFromThread`` calls of the stepped reactor.
    """

    def __init__(self) -> None:
        MemoryReactor.__init__(self)
        FakeReactor.__init__(self)
        self.system_triggers: dict[int, tuple[str, str, Any]] = {}

    def addSystemEventTrigger(self, phase: str, event_type: str, function: Any, *args: Any, **kwargs: Any) -> int:
        trigger_id = len(self.system_triggers) + 1
        self.system_triggers[trigger_id] = (phase, event_type, function)
        return trigger_id

    def removeSystemEventTrigger(self, trigger_id: int) -> None:
        del self.system_triggers[trigger_id]


def stopped_events(events: list[dict]) -> list[dict]:
    return [event for event in events if event.get("log_format", "").startswith("kvdaemon stopped")]


class GracefulStopTests(SynchronousTestCase):
    """``stopService`` stepped on fakes: what each kind of connection gets."""

    def setUp(self) -> None:
        self.reactor = ServiceReactor()
        self.pool = FakeThreadPool()
        self.service = KVDaemonService(
            Settings(threads=1, stream_buffer=4096, shutdown_grace=3.0),
            ["tcp:11211:interface=127.0.0.1"],
            reactor=self.reactor,
        )
        # Streams run on the stepped pool.  The service still starts and
        # stops its own ThreadPool, which has no threads until work arrives.
        self.service.factory.threadpool = self.pool  # type: ignore[assignment]
        self.service.startService()
        self.factory = self.service.factory
        self.next_port = 40000

    def connect(self) -> Client:
        self.next_port += 1
        return Client(self.factory, self.next_port)

    def lose(self, *clients: Client) -> None:
        """Deliver connectionLost, as the reactor does once a closed transport is gone."""
        for client in clients:
            client.protocol.connectionLost(protocol.connectionDone)

    def start_stream(self) -> Client:
        for number in range(200):
            self.factory.store.store("set", b"key%04d" % number, b"v" * 100, 0, 0)
        client = self.connect()
        client.protocol.dataReceived(b"rget 1 1 0 key\r\n")
        self.pool.run_next()
        self.reactor.run_thread_calls()
        self.assertEqual(len(self.factory.streams), 1)
        return client

    def test_idle_connections_closed_not_aborted(self) -> None:
        first, second = self.connect(), self.connect()
        self.assertEqual(first.send(b"version\r\n")[:8], b"VERSION ")

        with capturedLogs() as events:
            stopped = self.service.stopService()
            self.assertNoResult(stopped)
            for client in [first, second]:
                self.assertTrue(client.transport.disconnecting)
                self.assertFalse(client.transport.disconnected)
            self.lose(first, second)

        self.successResultOf(stopped)
        self.assertEqual(self.service.ports, [])
        self.assertFalse(self.service.threadpool.started)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        [event] = stopped_events(events)
        self.assertEqual((event["connections"], event["streams"]), (2, 0))

    def test_written_replies_kept_then_closed(self) -> None:
        client = self.connect()
        client.protocol.dataReceived(b"set k 0 0 5\r\nhello\r\n")
        # Pausing simulates a full transport buffer, so the connection
        # stops executing requests and the get below waits unexecuted.
        client.protocol.pauseProducing()
        client.protocol.dataReceived(b"get k\r\n")
        self.assertEqual(client.transport.value(), b"STORED\r\n")

        stopped = self.service.stopService()

        self.assertEqual(client.transport.value(), b"STORED\r\n")
        self.assertTrue(client.transport.disconnecting)
        self.assertFalse(client.transport.disconnected)
        self.assertIsNone(client.transport.producer)
        self.assertNoResult(stopped)
        self.lose(client)
        self.successResultOf(stopped)

    def test_pending_output_aborted_after_grace(self) -> None:
        client = self.connect()
        client.protocol.pauseProducing()

        with capturedLogs() as events:
            stopped = self.service.stopService()
            self.reactor.advance(2.9)
            self.assertFalse(client.transport.disconnected)
            self.reactor.advance(0.1)
            self.assertTrue(client.transport.disconnected)
            self.assertNoResult(stopped)
            self.lose(client)

        self.successResultOf(stopped)
        warnings = [event for event in events if event.get("log_format", "").startswith("Aborting")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["count"], 1)
        self.assertEqual(warnings[0]["peers"], "tcp:127.0.0.1:40001")
        [event] = stopped_events(events)
        self.assertEqual((event["connections"], event["streams"]), (1, 0))

    def test_running_stream_cancelled_and_aborted(self) -> None:
        client = self.start_stream()
        sent = client.transport.value()
        self.assertTrue(sent.startswith(b"VALUE key0000 0 100\r\n"))

        with capturedLogs() as events:
            stopped = self.service.stopService()
            # Aborted at once, not after the grace period.
            self.assertTrue(client.transport.disconnected)
            self.assertEqual(self.factory.streams, set())
            self.assertEqual(self.factory.stats.streams_cancelled, 1)
            while self.pool.pending:
                self.pool.run_next()
            self.reactor.run_thread_calls()
            self.lose(client)

        self.successResultOf(stopped)
        self.assertEqual(client.transport.value(), sent)
        self.assertFalse(sent.endswith(b"END\r\n"))
        [event] = stopped_events(events)
        self.assertEqual((event["connections"], event["streams"]), (1, 1))

    def test_mixed_connections_counted(self) -> None:
        streaming = self.start_stream()
        idle = self.connect()
        backed_up = self.connect()
        backed_up.protocol.pauseProducing()

        with capturedLogs() as events:
            stopped = self.service.stopService()
            self.assertTrue(streaming.transport.disconnected)
            self.assertTrue(idle.transport.disconnecting)
            self.assertFalse(idle.transport.disconnected)
            self.lose(streaming, idle)
            self.assertNoResult(stopped)
            self.reactor.advance(3.0)
            self.assertTrue(backed_up.transport.disconnected)
            self.lose(backed_up)

        self.successResultOf(stopped)
        self.assertEqual(self.factory.connections, set())
        [event] = stopped_events(events)
        self.assertEqual((event["connections"], event["streams"]), (3, 1))

    def test_no_connections_stops_at_once(self) -> None:
        self.successResultOf(self.service.stopService())
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.reactor.system_triggers, {})


class StoppingReactor(FakeReactor):
    """A stepped reactor that records ``stop`` calls, and raises as a real one does when stopped twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stop_calls = 0

    def stop(self) -> None:
        self.stop_calls += 1
        if self.stop_calls > 1:
            raise ReactorNotRunning("Can't stop reactor that isn't running.")


class ShutdownCommandTests(SynchronousTestCase):
    """The text ``shutdown`` command on StringTransport."""

    def client(self, **settings: Any) -> Client:
        self.reactor = StoppingReactor()
        factory = KVDaemonFactory(Settings(threads=1, **settings), reactor=self.reactor, threadpool=FakeThreadPool())
        return Client(factory)

    def test_disabled_replies_error(self) -> None:
        client = self.client()
        for line in [b"shutdown", b"shutdown graceful", b"shutdown foo", b"shutdown noreply"]:
            self.assertEqual(client.send(line + b"\r\n"), NOT_ENABLED, line)
        self.assertFalse(client.closed)
        self.assertEqual(self.reactor.stop_calls, 0)

    def test_enabled_stops_reactor(self) -> None:
        for line in [b"shutdown", b"shutdown graceful", b"shutdown  graceful "]:
            client = self.client(enable_shutdown=True)
            with capturedLogs() as events:
                reply = client.send(line + b"\r\n")
            self.assertEqual(reply, b"", line)
            self.assertTrue(client.closed, line)
            self.assertFalse(client.transport.disconnected, line)
            self.assertEqual(self.reactor.stop_calls, 1, line)
            requests = [event for event in events if "shutdown requested" in event.get("log_format", "")]
            self.assertEqual([event["peer"] for event in requests], ["tcp:127.0.0.1:40000"], line)

    def test_enabled_invalid_mode(self) -> None:
        client = self.client(enable_shutdown=True)
        for line in [b"shutdown foo", b"shutdown noreply", b"shutdown graceful x", b"shutdown graceful noreply"]:
            self.assertEqual(client.send(line + b"\r\n"), INVALID_MODE, line)
        self.assertFalse(client.closed)
        self.assertEqual(self.reactor.stop_calls, 0)

    def test_earlier_replies_sent_later_requests_dropped(self) -> None:
        client = self.client(enable_shutdown=True)
        reply = client.send(b"set a 0 0 1\r\nx\r\nshutdown\r\nget a\r\n")
        self.assertEqual(reply, b"STORED\r\n")
        self.assertTrue(client.closed)

    def test_second_request_while_stopping(self) -> None:
        first = self.client(enable_shutdown=True)
        second = Client(first.protocol.factory, 40001)
        first.send(b"shutdown\r\n")
        self.assertEqual(second.send(b"shutdown graceful\r\n"), b"")
        self.assertTrue(second.closed)
        self.assertEqual(self.reactor.stop_calls, 2)

    def test_stats_settings_shows_switch(self) -> None:
        for enabled, expected in [(False, b"no"), (True, b"yes")]:
            reply = self.client(enable_shutdown=enabled).send(b"stats settings\r\n")
            self.assertIn(b"STAT shutdown_command " + expected + b"\r\n", reply)

    def test_stats_settings_shows_grace(self) -> None:
        reply = self.client(shutdown_grace=2.5).send(b"stats settings\r\n")
        self.assertIn(b"STAT shutdown_grace 2.5\r\n", reply)


class ShutdownOptionTests(SynchronousTestCase):
    """``--enable-shutdown`` and ``--shutdown-grace`` on the command line."""

    def parse(self, *arguments: str) -> Settings:
        options = Options()
        options.parseOptions(list(arguments))
        return options["settings"]

    def test_defaults(self) -> None:
        settings = self.parse()
        self.assertFalse(settings.enable_shutdown)
        self.assertEqual(settings.shutdown_grace, 5.0)

    def test_values_reach_settings(self) -> None:
        settings = self.parse("--enable-shutdown", "--shutdown-grace", "0.5")
        self.assertIs(settings.enable_shutdown, True)
        self.assertEqual(settings.shutdown_grace, 0.5)

    def test_invalid_grace_rejected(self) -> None:
        from twisted.python.usage import UsageError

        for value in ["-1", "3601", "soon"]:
            with self.assertRaises(UsageError) as raised:
                self.parse("--shutdown-grace", value)
            self.assertIn("--shutdown-grace", str(raised.exception))
            self.assertIn("from 0 to 3600 seconds", str(raised.exception))


#: memcached 1.6.18 has no binary shutdown command.  With or without ``-A``
#: it replies "Unknown command" to Couchbase's shutdown opcode 0x29, and
#: to 0x2c.
SHUTDOWN_OPCODES = [0x29, 0x2C]


class ShutdownReferenceTests(TestCase):
    """``shutdown`` against memcached 1.6.18, with and without memcached's ``-A``."""

    timeout = 120

    @defer.inlineCallbacks
    def compare(self, memcached_args: tuple[str, ...], settings: Settings, requests: list[bytes]):
        memcached = MemcachedProcess(*memcached_args)
        self.addCleanup(memcached.stop)
        _, port = yield start_server(self, settings)
        for data in requests:
            reference = yield threads.deferToThread(exchange, memcached.port, data)
            ours = yield threads.deferToThread(exchange, port, data)
            self.assertEqual(ours, reference, data)
        self.assertIsNone(memcached.process.poll())

    @defer.inlineCallbacks
    def test_disabled_matches_memcached(self):
        text = [b"shutdown\r\n", b"shutdown graceful\r\n", b"shutdown foo\r\n", b"shutdown noreply\r\n", b"SHUTDOWN\r\n"]
        binary = [request(opcode, opaque=0x01020304) for opcode in SHUTDOWN_OPCODES]
        yield self.compare((), Settings(threads=1), text + binary)

    @defer.inlineCallbacks
    def test_invalid_modes_match_memcached(self):
        text = [
            b"shutdown foo\r\n",
            b"shutdown noreply\r\n",
            b"shutdown graceful x\r\n",
            b"shutdown graceful noreply\r\n",
            b"version\r\nshutdown bogus\r\nversion\r\n",
        ]
        binary = [request(opcode, opaque=0x01020304) for opcode in SHUTDOWN_OPCODES]
        # Both servers report version 1.6.18, so the version replies match.
        yield self.compare(("-A",), Settings(threads=1, enable_shutdown=True), text + binary)


def read_until_closed(connection: socket.socket) -> tuple[bytes, bool]:
    """Read until the peer closes, and return the bytes and whether it reset the connection."""
    received = b""
    while True:
        try:
            chunk = connection.recv(65536)
        except ConnectionResetError:
            return received, True
        if not chunk:
            return received, False
        received += chunk


class TwistdProcess:
    """``twistd -n kvdaemon`` on a free port of 127.0.0.1, logging to a file."""

    def __init__(self, testcase: SynchronousTestCase, *plugin_arguments: str) -> None:
        directory = tempfile.mkdtemp()
        testcase.addCleanup(shutil.rmtree, directory)
        self.log_path = Path(directory) / "twistd.log"
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                *TWISTD,
                "-n",
                "--pidfile=",
                "--logfile=%s" % self.log_path,
                "kvdaemon",
                "--listen",
                "tcp:%d:interface=127.0.0.1" % self.port,
                *plugin_arguments,
            ],
            cwd=REPOSITORY,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        testcase.addCleanup(self.kill)
        wait_for_port(self.port, timeout=30)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.communicate(timeout=20)

    def wait(self) -> int:
        """Wait for the process to exit, at most a minute, and return its status."""
        self.process.communicate(timeout=60)
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text()


_STOPPED_LINE = re.compile(r"kvdaemon stopped: closed (\d+) connections and cancelled (\d+) streams")


def stopped_counts(log: str) -> list[tuple[int, int]]:
    """Return (connections, streams) from every closing line in a twistd log."""
    return [(int(connections), int(streams)) for connections, streams in _STOPPED_LINE.findall(log)]


def stats(connection: socket.socket) -> dict[bytes, bytes]:
    return parse_stats(send_and_read(connection, b"stats\r\n", b"END\r\n"))


class LoadWorker(threading.Thread):
    """
    A client that sets and gets its own key in a loop, one request at a
    time, until the server closes the connection.

    It records every reply it read whole, and the bytes of a reply that
    the close cut short (which must stay empty).
    """

    def __init__(self, port: int, number: int) -> None:
        super().__init__(daemon=True)
        self.connection = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.key = b"load%d" % number
        self.iterations = 0
        self.started_looping = threading.Event()
        self.checked_replies = 0
        self.truncated = b""
        self.wrong_replies: list[bytes] = []
        self.error: BaseException | None = None

    def request(self, data: bytes, expected: bytes) -> bool:
        """Send ``data`` and read its reply.  Return False once the server has closed the connection."""
        try:
            self.connection.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        received = b""
        while len(received) < len(expected):
            try:
                chunk = self.connection.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.truncated = received
                return False
            received += chunk
        if received != expected:
            self.wrong_replies.append(received)
        self.checked_replies += 1
        return True

    def run(self) -> None:
        try:
            while True:
                value = b"%s-%06d" % (self.key, self.iterations) * 4000
                if not self.request(b"set %s 0 0 %d\r\n%s\r\n" % (self.key, len(value), value), b"STORED\r\n"):
                    return
                expected = b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (self.key, len(value), value)
                if not self.request(b"get %s\r\n" % self.key, expected):
                    return
                self.iterations += 1
                if self.iterations == 20:
                    self.started_looping.set()
        except BaseException as error:
            self.error = error
        finally:
            self.started_looping.set()
            self.connection.close()


class TwistdStopTests(SynchronousTestCase):
    """``twistd kvdaemon`` stopped by SIGTERM under load, and by the ``shutdown`` command."""

    def fill_range(self, port: int, count: int, size: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            value = b"r" * size
            batch = b"".join(b"set range%06d 0 0 %d noreply\r\n%s\r\n" % (number, size, value) for number in range(count))
            connection.sendall(batch)
            self.assertEqual(send_and_read(connection, b"get range%06d\r\n" % (count - 1), b"END\r\n")[:6], b"VALUE ")

    def test_sigterm_under_load(self) -> None:
        server = TwistdProcess(self, "--shutdown-grace", "60")
        # 16 MB of items, far more than the socket buffers hold.
        self.fill_range(server.port, 1600, 10000)

        # A range get whose client reads 64 KiB and then stops reading.
        streaming = socket.socket()
        streaming.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        streaming.settimeout(30)
        streaming.connect(("127.0.0.1", server.port))
        self.addCleanup(streaming.close)
        streaming.sendall(b"rget 1 1 0 range\r\n")
        stream_start = b""
        while len(stream_start) < 65536:
            chunk = streaming.recv(65536)
            self.assertTrue(chunk)
            stream_start += chunk

        # A client that pipelines gets of a large item and reads nothing,
        # so its connection has output the server cannot send.
        backed_up = socket.socket()
        backed_up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        backed_up.settimeout(30)
        backed_up.connect(("127.0.0.1", server.port))
        self.addCleanup(backed_up.close)
        backed_up.sendall(b"get range000000\r\n" * 2000)

        workers = [LoadWorker(server.port, number) for number in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            self.assertTrue(worker.started_looping.wait(60))
            self.assertIsNone(worker.error)

        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as observer:
            # Wait until the server has seen the earlier clients close.
            # The observer itself is one of the 7 connections.
            for _ in range(1000):
                counters = stats(observer)
                if counters[b"curr_connections"] == b"7" and counters[b"streams_running"] == b"1":
                    break
                time.sleep(0.01)
            self.assertEqual(counters[b"streams_running"], b"1")
            self.assertEqual(counters[b"curr_connections"], b"7")
            os.kill(server.process.pid, signal.SIGTERM)
            self.assertEqual(read_until_closed(observer), (b"", False))

        # The backed-up client keeps the server in its grace period, while
        # the port stops accepting connections.  The kernel completes
        # handshakes until the listening socket is closed, a reactor
        # iteration after the server stopped reading it, so poll.
        connection_refused = False
        for _ in range(1000):
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=30).close()
            except ConnectionRefusedError:
                connection_refused = True
                break
            time.sleep(0.01)
        self.assertTrue(connection_refused)
        self.assertIsNone(server.process.poll())

        for worker in workers:
            worker.join(60)
            self.assertFalse(worker.is_alive())
            self.assertIsNone(worker.error)
            self.assertEqual(worker.truncated, b"", worker.key)
            self.assertEqual(worker.wrong_replies, [], worker.key)
            self.assertGreaterEqual(worker.checked_replies, 40)

        rest, _ = read_until_closed(streaming)
        stream_reply = stream_start + rest
        self.assertFalse(stream_reply.endswith(b"END\r\n"))
        self.assertLess(len(stream_reply), 1600 * 10000)

        backed_up.close()
        self.assertEqual(server.wait(), 0)
        log = server.log()
        self.assertEqual(stopped_counts(log), [(7, 1)], log)
        self.assertIn("Received SIGTERM", log)
        self.assertNotIn("Traceback", log)

    def test_shutdown_command_exits_zero(self) -> None:
        server = TwistdProcess(self, "--enable-shutdown")
        memcached = MemcachedProcess("-A")
        self.addCleanup(memcached.stop)
        idle = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        self.addCleanup(idle.close)
        self.assertEqual(send_and_read(idle, b"version\r\n")[:8], b"VERSION ")

        results = []
        for port in [memcached.port, server.port]:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
                connection.sendall(b"shutdown\r\n")
                results.append(read_until_closed(connection)[0])
        self.assertEqual(results, [b"", b""])

        self.assertEqual(read_until_closed(idle), (b"", False))
        self.assertEqual(server.wait(), 0)
        self.assertEqual(memcached.process.wait(60), 0)
        log = server.log()
        self.assertRegex(log, r"shutdown requested by tcp:127\.0\.0\.1:\d+")
        self.assertEqual(stopped_counts(log), [(1, 0)], log)
        self.assertNotIn("Traceback", log)
