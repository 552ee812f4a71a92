"""
Tests for ``--idle-timeout`` (``Settings.idle_timeout``): which connections
are closed and when, what is counted and logged, and the option itself.

The reference is memcached 1.6.18 with ``-o idle_timeout=N``, tried on
127.0.0.1.  It closes a connection waiting for a request without writing
anything, counts it in ``idle_kicks`` and shows ``idle_timeout`` in
``stats settings``.  It leaves alone a connection that is in the middle
of sending a value or whose replies the client has not read, and partial
request bytes do not count as a request.
"""

from __future__ import annotations

import socket

from twisted.internet import defer, threads
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from kvdaemon import KVDaemonFactory, Settings
from kvdaemon._factory import IDLE_CHECK_INTERVAL
from kvdaemon._options import Options
from tests.binary_packets import request as binary_request
from tests.daemon_process import DaemonProcess
from tests.support import Client, FakeReactor, FakeThreadPool, send_and_read, start_server

TIMEOUT = 10

GET_OPCODE = 0x00


def make_factory(**settings) -> KVDaemonFactory:
    settings.setdefault("idle_timeout", TIMEOUT)
    reactor = FakeReactor()
    reactor.advance(1_700_000_000)
    return KVDaemonFactory(Settings(**settings), reactor=reactor, threadpool=FakeThreadPool())


class IdleTimeoutTests(SynchronousTestCase):
    """Idle connections closed by a factory whose clock the test advances."""

    def setUp(self) -> None:
        self.factory = make_factory()
        self.reactor = self.factory.reactor
        self.client = Client(self.factory)

    def test_idle_connection_closed(self) -> None:
        self.reactor.advance(TIMEOUT - IDLE_CHECK_INTERVAL)
        self.assertFalse(self.client.closed)

        with capturedLogs() as events:
            self.reactor.advance(IDLE_CHECK_INTERVAL)

        self.assertTrue(self.client.closed)
        # Nothing is written first, as in memcached.
        self.assertEqual(self.client.transport.value(), b"")
        self.assertEqual(self.factory.stats.idle_kicks, 1)
        closures = [event for event in events if event["log_format"].startswith("Closing {peer}: no request")]
        self.assertEqual(len(closures), 1)
        self.assertEqual(closures[0]["peer"], "tcp:127.0.0.1:40000")
        self.assertEqual(closures[0]["timeout"], TIMEOUT)

    def test_closed_connection_logged_once(self) -> None:
        with capturedLogs() as events:
            self.reactor.pump([IDLE_CHECK_INTERVAL] * (3 * TIMEOUT))

        closures = [event for event in events if event["log_format"].startswith("Closing {peer}: no request")]
        self.assertEqual(len(closures), 1)
        self.assertEqual(self.factory.stats.idle_kicks, 1)

    def test_request_restarts_idle_time(self) -> None:
        self.reactor.advance(TIMEOUT - IDLE_CHECK_INTERVAL)
        self.assertEqual(self.client.send(b"version\r\n"), b"VERSION 1.6.18\r\n")

        self.reactor.advance(TIMEOUT - IDLE_CHECK_INTERVAL)
        self.assertFalse(self.client.closed)
        self.reactor.advance(IDLE_CHECK_INTERVAL)
        self.assertTrue(self.client.closed)

    def test_partial_request_not_counted(self) -> None:
        # memcached counts a request when its line is complete, so a
        # client that trickles bytes in is still idle.
        for byte in b"get ke":
            self.reactor.advance(IDLE_CHECK_INTERVAL)
            self.client.send(bytes([byte]))

        self.reactor.advance(TIMEOUT - 6 * IDLE_CHECK_INTERVAL)

        self.assertTrue(self.client.closed)

    def test_partial_value_keeps_connection(self) -> None:
        # memcached does not close a connection that is reading a value.
        self.client.send(b"set k 0 0 10\r\nabc")

        self.reactor.advance(3 * TIMEOUT)

        self.assertFalse(self.client.closed)
        self.assertEqual(self.client.send(b"defghij\r\n"), b"STORED\r\n")
        self.reactor.advance(TIMEOUT)
        self.assertTrue(self.client.closed)

    def test_partial_login_closed(self) -> None:
        # memcached started with -Y closes a connection that sent half of
        # its login block, so half-sent logins cannot hold the server's
        # connection slots.
        factory = make_factory(auth_users={b"alice": b"secret"})
        client = Client(factory)
        client.send(b"set auth 0 0 12\r\nalice")

        factory.reactor.advance(TIMEOUT)

        self.assertTrue(client.closed)
        self.assertEqual(factory.stats.idle_kicks, 1)

    def test_partial_value_after_login_keeps_connection(self) -> None:
        factory = make_factory(auth_users={b"alice": b"secret"})
        client = Client(factory)
        self.assertEqual(client.send(b"set auth 0 0 12\r\nalice secret\r\nset k 0 0 10\r\nabc"), b"STORED\r\n")

        factory.reactor.advance(3 * TIMEOUT)

        self.assertFalse(client.closed)

    def test_partial_binary_packet_keeps_connection(self) -> None:
        packet = binary_request(GET_OPCODE, key=b"some-key")
        binary = Client(self.factory, port=40001)
        binary.send(packet[:-3])

        self.reactor.advance(3 * TIMEOUT)

        self.assertFalse(binary.closed)
        self.assertEqual(binary.send(packet[-3:])[6:8], b"\x00\x01")

    def test_partial_binary_header_closed(self) -> None:
        # memcached closes an idle connection that sent part of a header,
        # as it closes one that sent part of a text request line.
        packet = binary_request(GET_OPCODE, key=b"some-key")
        binary = Client(self.factory, port=40001)
        binary.send(packet[:10])

        self.reactor.advance(TIMEOUT)

        self.assertTrue(binary.closed)

    def test_partial_binary_header_completed(self) -> None:
        packet = binary_request(GET_OPCODE, key=b"some-key")
        binary = Client(self.factory, port=40001)
        replies = binary.send_chunks([packet[i : i + 1] for i in range(len(packet))])
        self.assertEqual(replies[6:8], b"\x00\x01")

    def test_idle_binary_connection_closed(self) -> None:
        binary = Client(self.factory, port=40001)
        self.assertEqual(binary.send(binary_request(GET_OPCODE, key=b"some-key"))[6:8], b"\x00\x01")

        self.reactor.advance(TIMEOUT)

        self.assertTrue(binary.closed)
        self.assertEqual(self.factory.stats.idle_kicks, 2)

    def test_unread_output_keeps_connection(self) -> None:
        # The transport pauses its producer while its buffer is full.
        self.client.protocol.pauseProducing()

        self.reactor.advance(3 * TIMEOUT)

        self.assertFalse(self.client.closed)
        self.client.protocol.resumeProducing()
        self.reactor.advance(IDLE_CHECK_INTERVAL)
        self.assertTrue(self.client.closed)

    def test_queued_output_keeps_connection(self) -> None:
        # Twisted's TCP transport keeps bytes that the socket has not taken
        # in dataBuffer, and pauses its producer only past 64 KiB.
        self.client.transport.dataBuffer = b"unsent reply"

        self.reactor.advance(3 * TIMEOUT)

        self.assertFalse(self.client.closed)
        self.client.transport.dataBuffer = b""
        self.reactor.advance(IDLE_CHECK_INTERVAL)
        self.assertTrue(self.client.closed)

    def test_running_stream_keeps_connection(self) -> None:
        self.client.send(b"set a 0 0 1\r\nx\r\n")
        self.client.send(b"rget 1 1 0 a\r\n")
        self.assertIsNotNone(self.client.protocol.stream)

        self.reactor.advance(3 * TIMEOUT)

        self.assertFalse(self.client.closed)
        threadpool = self.factory.threadpool
        while threadpool.pending or self.reactor.thread_calls:
            if threadpool.pending:
                threadpool.run_next()
            self.reactor.run_thread_calls()
        self.assertIsNone(self.client.protocol.stream)
        self.assertEqual(self.client.transport.value(), b"VALUE a 0 1\r\nx\r\nEND\r\n")
        # The stream ended long after the rget request, so the next check
        # closes the connection, as memcached closes one whose last
        # request is older than the timeout.
        self.reactor.advance(IDLE_CHECK_INTERVAL)
        self.assertTrue(self.client.closed)

    def test_every_idle_connection_closed(self) -> None:
        others = [Client(self.factory, port=40001 + number) for number in range(3)]
        self.reactor.advance(TIMEOUT / 2)
        others[0].send(b"version\r\n")

        self.reactor.advance(TIMEOUT / 2)

        self.assertTrue(self.client.closed)
        self.assertFalse(others[0].closed)
        self.assertTrue(others[1].closed)
        self.assertTrue(others[2].closed)
        self.assertEqual(self.factory.stats.idle_kicks, 3)

    def test_check_stops_without_connections(self) -> None:
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)

        self.client.protocol.connectionLost()

        self.assertEqual(self.reactor.getDelayedCalls(), [])
        second = Client(self.factory, port=40001)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.reactor.advance(TIMEOUT)
        self.assertTrue(second.closed)

    def test_stats_report_idle_kicks(self) -> None:
        self.reactor.advance(TIMEOUT)
        client = Client(self.factory, port=40001)

        stats = client.send(b"stats\r\n")
        settings = client.send(b"stats settings\r\n")

        self.assertIn(b"STAT idle_kicks 1\r\n", stats)
        self.assertIn(b"STAT idle_timeout 10\r\n", settings)
        # idle_kicks sits between auth_errors and bytes_read, as in memcached 1.6.18.
        self.assertIn(b"STAT auth_errors 0\r\nSTAT idle_kicks 1\r\nSTAT bytes_read", stats)


class IdleTimeoutOffTests(SynchronousTestCase):
    """The default, ``idle_timeout`` 0."""

    def test_off_by_default(self) -> None:
        factory = make_factory(idle_timeout=0)
        client = Client(factory)

        factory.reactor.advance(30 * 24 * 3600)

        self.assertFalse(client.closed)
        self.assertEqual(factory.reactor.getDelayedCalls(), [])
        self.assertIn(b"STAT idle_timeout 0\r\n", client.send(b"stats settings\r\n"))
        self.assertIn(b"STAT idle_kicks 0\r\n", client.send(b"stats\r\n"))


class IdleTimeoutOptionTests(SynchronousTestCase):
    """The ``--idle-timeout`` option of ``twistd kvdaemon``."""

    def parse(self, *arguments: str) -> Settings:
        options = Options()
        options.parseOptions(list(arguments))
        return options["settings"]

    def test_option_sets_timeout(self) -> None:
        self.assertEqual(self.parse("--idle-timeout", "30").idle_timeout, 30)

    def test_option_defaults_off(self) -> None:
        self.assertEqual(self.parse().idle_timeout, 0)

    def test_invalid_values_rejected(self) -> None:
        for value in ["-1", "2592001", "1.5", "soon"]:
            with self.assertRaises(usage.UsageError) as raised:
                self.parse("--idle-timeout", value)
            message = str(raised.exception)
            self.assertIn("Invalid value %r for --idle-timeout" % value, message)
            self.assertIn("from 0 to 2592000 seconds", message)

    def test_help_describes_option(self) -> None:
        help_text = str(Options())
        self.assertIn("--idle-timeout=", help_text)
        self.assertIn("idle_timeout", help_text)


class IdleTimeoutTwistdTests(SynchronousTestCase):
    """``twistd kvdaemon --idle-timeout`` as a subprocess."""

    def test_twistd_closes_idle_connection(self) -> None:
        daemon = DaemonProcess(self, "--idle-timeout", "1")
        self.assertEqual(daemon.stats(b"settings")[b"idle_timeout"], b"1")

        with daemon.connect() as idle:
            self.assertEqual(send_and_read(idle, b"version\r\n"), b"VERSION 1.6.18\r\n")
            peer = "tcp:127.0.0.1:%d" % idle.getsockname()[1]
            self.assertEqual(idle.recv(100), b"")

        self.assertEqual(daemon.log().count("Closing %s: no request for 1 seconds" % peer), 1)
        self.assertGreaterEqual(int(daemon.stats()[b"idle_kicks"]), 1)


class IdleTimeoutSocketTests(TestCase):
    """Idle connections closed on the real reactor over real sockets."""

    @defer.inlineCallbacks
    def test_idle_socket_closed(self) -> None:
        service, port = yield start_server(self, Settings(threads=1, idle_timeout=1))

        idle_reply, served_reply = yield threads.deferToThread(self._idle_then_reconnect, port)

        # The server closed the connection without writing anything.
        self.assertEqual(idle_reply, b"")
        self.assertEqual(served_reply, b"VERSION 1.6.18\r\n")
        self.assertGreaterEqual(service.factory.stats.idle_kicks, 1)

    def _idle_then_reconnect(self, port: int) -> tuple[bytes, bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as idle:
            self.assertEqual(send_and_read(idle, b"version\r\n"), b"VERSION 1.6.18\r\n")
            idle_reply = idle.recv(100)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            served_reply = send_and_read(connection, b"version\r\n")
            # Wait until the server closes this one too, so that its idle
            # check has stopped when the test ends.
            connection.recv(100)
        return idle_reply, served_reply
