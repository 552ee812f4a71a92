"""
Tests for kvdaemon's service wiring: KVDaemonService start and stop on the
real reactor, its own worker pool, listen failures, and the connection
limit (memcached's ``ERROR Too many open connections``).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.internet import defer, protocol, reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from kvdaemon import KVDaemonFactory, KVDaemonService, Settings
from tests.support import FakeReactor, FakeThreadPool, exchange, send_and_read

TOO_MANY = b"ERROR Too many open connections\r\n"


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_until_closed(connection: socket.socket) -> bytes:
    received = b""
    while True:
        chunk = connection.recv(65536)
        if not chunk:
            return received
        received += chunk


class ServiceLifecycleTests(TestCase):
    """KVDaemonService on the real reactor, on 127.0.0.1."""

    timeout = 60

    def make_service(self, *listen: str, **settings) -> KVDaemonService:
        settings.setdefault("threads", 2)
        service = KVDaemonService(Settings(**settings), list(listen), reactor=reactor)
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    @defer.inlineCallbacks
    def test_start_listens_and_serves(self):
        service = self.make_service("tcp:0:interface=127.0.0.1")
        service.startService()
        self.assertTrue(service.running)
        self.assertEqual(len(service.ports), 1)
        self.assertTrue(service.threadpool.started)
        port = service.ports[0].getHost().port
        reply = yield threads.deferToThread(exchange, port, b"set k 0 0 1\r\nx\r\nget k\r\n")
        self.assertEqual(reply, b"STORED\r\nVALUE k 0 1\r\nx\r\nEND\r\n")

    @defer.inlineCallbacks
    def test_stop_closes_ports_and_pool(self):
        service = self.make_service("tcp:0:interface=127.0.0.1")
        service.startService()
        port = service.ports[0].getHost().port
        with capturedLogs() as events:
            yield service.stopService()
        self.assertFalse(service.running)
        self.assertEqual(service.ports, [])
        self.assertFalse(service.threadpool.started)
        self.assertEqual(service.threadpool.threads, [])
        stopped = [event for event in events if event.get("log_format", "").startswith("kvdaemon stopped")]
        self.assertEqual(len(stopped), 1)
        self.assertEqual((stopped[0]["connections"], stopped[0]["streams"]), (0, 0))
        with self.assertRaises(ConnectionRefusedError):
            connect(port).close()

    @defer.inlineCallbacks
    def test_stop_closes_idle_client(self):
        service = self.make_service("tcp:0:interface=127.0.0.1")
        service.startService()
        port = service.ports[0].getHost().port
        idle = yield threads.deferToThread(connect, port)
        self.addCleanup(idle.close)
        yield threads.deferToThread(send_and_read, idle, b"version\r\n")
        yield service.stopService()
        self.assertFalse(service.threadpool.started)
        self.assertEqual(service.factory.connections, set())
        self.assertEqual((yield threads.deferToThread(read_until_closed, idle)), b"")

    def test_own_pool_not_reactor_pool(self):
        service = self.make_service("tcp:0:interface=127.0.0.1", threads=3)
        self.assertIsNot(service.threadpool, reactor.getThreadPool())
        self.assertEqual(service.threadpool.max, 3)
        self.assertIs(service.factory.threadpool, service.threadpool)

    @defer.inlineCallbacks
    def test_several_endpoints_share_store(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "kv.sock")
        service = self.make_service("tcp:0:interface=127.0.0.1", "unix:" + path)
        service.startService()
        self.assertEqual(len(service.ports), 2)
        port = service.ports[0].getHost().port
        yield threads.deferToThread(exchange, port, b"set shared 0 0 2\r\nok\r\n")

        def get_over_unix_socket() -> bytes:
            with socket.socket(socket.AF_UNIX) as connection:
                connection.settimeout(10)
                connection.connect(path)
                return send_and_read(connection, b"get shared\r\n", b"END\r\n")

        reply = yield threads.deferToThread(get_over_unix_socket)
        self.assertEqual(reply, b"VALUE shared 0 2\r\nok\r\nEND\r\n")

    def test_listen_failure_raises(self):
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        busy = holder.getsockname()[1]
        service = self.make_service("tcp:0:interface=127.0.0.1", "tcp:%d:interface=127.0.0.1" % busy)
        with capturedLogs() as events:
            with self.assertRaises(CannotListenError):
                service.startService()
        self.assertFalse(service.running)
        self.assertEqual(service.ports, [])
        self.assertFalse(service.threadpool.started)
        errors = [event for event in events if event.get("log_format", "").startswith("Could not listen")]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["endpoint"], "tcp:%d:interface=127.0.0.1" % busy)

    def test_invalid_endpoint_raises(self):
        service = self.make_service("tcp:0:interface=127.0.0.1", "bogus:1")
        with capturedLogs() as events:
            with self.assertRaises(ValueError):
                service.startService()
        self.assertFalse(service.running)
        self.assertEqual(service.ports, [])
        self.assertFalse(service.threadpool.started)
        errors = [event for event in events if event.get("log_format", "").startswith("Invalid endpoint")]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["endpoint"], "bogus:1")


class ConnectionLimitTests(TestCase):
    """Connections past ``max_connections`` on real sockets."""

    timeout = 60

    @defer.inlineCallbacks
    def test_rejects_past_limit(self):
        service = KVDaemonService(Settings(threads=1, max_connections=2), ["tcp:0:interface=127.0.0.1"], reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.ports[0].getHost().port

        first = yield threads.deferToThread(connect, port)
        self.addCleanup(first.close)
        second = yield threads.deferToThread(connect, port)
        self.addCleanup(second.close)
        self.assertEqual((yield threads.deferToThread(send_and_read, first, b"version\r\n"))[:8], b"VERSION ")
        self.assertEqual((yield threads.deferToThread(send_and_read, second, b"version\r\n"))[:8], b"VERSION ")

        third = yield threads.deferToThread(connect, port)
        self.addCleanup(third.close)
        self.assertEqual((yield threads.deferToThread(read_until_closed, third)), TOO_MANY)
        self.assertEqual(service.factory.stats.rejected_connections, 1)

        first.close()
        for _ in range(500):
            if service.factory.stats.curr_connections < 2:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(service.factory.stats.curr_connections, 1)
        fourth = yield threads.deferToThread(connect, port)
        self.addCleanup(fourth.close)
        reply = yield threads.deferToThread(send_and_read, fourth, b"stats\r\n", b"END\r\n")
        self.assertIn(b"STAT rejected_connections 1\r\n", reply)
        self.assertIn(b"STAT curr_connections 2\r\n", reply)


class ConnectionLimitUnitTests(SynchronousTestCase):
    """The factory's connection limit, on StringTransport."""

    def setUp(self) -> None:
        self.factory = KVDaemonFactory(
            Settings(threads=1, max_connections=1),
            reactor=FakeReactor(),
            threadpool=FakeThreadPool(),
        )

    def connect(self, port: int):
        address = IPv4Address("TCP", "127.0.0.1", port)
        protocol = self.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 11211))
        protocol.makeConnection(transport)
        return protocol, transport

    def test_reject_reply_and_close(self) -> None:
        self.connect(50001)
        with capturedLogs() as events:
            protocol, transport = self.connect(50002)
        self.assertEqual(transport.value(), TOO_MANY)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.stats.rejected_connections, 1)
        self.assertEqual(self.factory.stats.curr_connections, 1)
        warnings = [event for event in events if "Rejected a connection" in event.get("log_format", "")]
        self.assertEqual(len(warnings), 1)

    def test_rejected_connection_ignores_input(self) -> None:
        self.connect(50001)
        protocol, transport = self.connect(50002)
        transport.clear()
        protocol.dataReceived(b"set k 0 0 1\r\nx\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(self.factory.store), 0)

    def test_slot_freed_after_close(self) -> None:
        first, _ = self.connect(50001)
        first.connectionLost(protocol.connectionDone)
        self.assertEqual(self.factory.stats.curr_connections, 0)
        second, transport = self.connect(50002)
        second.dataReceived(b"version\r\n")
        self.assertTrue(transport.value().startswith(b"VERSION "))


class SettingsReportTests(TestCase):
    @defer.inlineCallbacks
    def test_stats_settings_reports_tcp_port(self) -> None:
        service = KVDaemonService(Settings(threads=1), ["tcp:0:interface=127.0.0.1"], reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.ports[0].getHost().port

        reply = yield threads.deferToThread(exchange, port, b"stats settings\r\n")

        self.assertIn(b"STAT tcpport %d\r\n" % port, reply)
        self.assertTrue(reply.endswith(b"END\r\n"))
