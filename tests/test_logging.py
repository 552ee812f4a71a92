"""
Tests for kvdaemon._logging: the per-connection and server-wide caps on
log events, alone and on connections that send bad requests in a loop.
"""

from __future__ import annotations

from twisted.internet import protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from kvdaemon import KVDaemonFactory, Settings
from kvdaemon._logging import EVENTS_PER_WINDOW, WINDOW_SECONDS, LogLimit, limited_logger
from tests.support import Client, FakeReactor, FakeThreadPool

PEER = "tcp:127.0.0.1:40000"


class Source:
    """A stand-in for a connection's handler."""


class LogLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limit = LogLimit(self.clock.seconds, PEER, events=3, window=10)
        self.logger = limited_logger(Source(), self.limit)

    def emit_info(self, count: int) -> list[dict]:
        with capturedLogs() as events:
            for number in range(count):
                self.logger.info("event {number}", number=number)
        return events

    def test_events_within_limit_emitted(self) -> None:
        events = self.emit_info(3)
        self.assertEqual([event["number"] for event in events], [0, 1, 2])

    def test_namespace_names_source_class(self) -> None:
        events = self.emit_info(1)
        self.assertEqual(events[0]["log_namespace"], "tests.test_logging.Source")

    def test_events_past_limit_dropped(self) -> None:
        events = self.emit_info(10)
        self.assertEqual(len(events), 3)
        self.assertEqual(self.limit.suppressed, 7)

    def test_errors_never_dropped(self) -> None:
        self.emit_info(5)
        with capturedLogs() as events:
            self.logger.error("bad {thing}", thing=1)
            self.logger.failure("failed", Failure(ValueError("broken")))
        self.assertEqual([event["log_level"] for event in events], [LogLevel.error, LogLevel.critical])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_debug_not_counted(self) -> None:
        with capturedLogs() as events:
            for _ in range(5):
                self.logger.debug("detail")
        self.assertEqual(len(events), 5)
        self.assertEqual(self.limit.emitted, 0)

    def test_new_window_reports_and_admits(self) -> None:
        self.emit_info(5)
        self.clock.advance(10)
        events = self.emit_info(1)
        self.assertEqual(len(events), 2)
        self.assertEqual(events[0]["count"], 2)
        self.assertEqual(events[0]["peer"], PEER)
        self.assertEqual(events[1]["number"], 0)
        self.assertEqual(self.limit.suppressed, 0)

    def test_report_without_drops_silent(self) -> None:
        self.emit_info(2)
        with capturedLogs() as events:
            self.limit.report()
        self.assertEqual(events, [])


class ConnectionLogLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        reactor = FakeReactor()
        self.factory = KVDaemonFactory(Settings(threads=1), reactor=reactor, threadpool=FakeThreadPool())
        self.reactor = reactor

    def test_garbage_loop_logs_capped(self) -> None:
        client = Client(self.factory)
        with capturedLogs() as events:
            reply = client.send(b"bogus\r\n" * 1000)
        self.assertEqual(reply, b"ERROR\r\n" * 1000)
        self.assertEqual(len(events), EVENTS_PER_WINDOW)
        self.assertTrue(all(event["peer"] == PEER for event in events))

    def test_close_reports_dropped_count(self) -> None:
        client = Client(self.factory)
        client.send(b"bogus\r\n" * 100)
        with capturedLogs() as events:
            client.protocol.connectionLost(protocol.connectionDone)
        reports = [event for event in events if "count" in event]
        self.assertEqual(len(reports), 1)
        self.assertEqual(reports[0]["count"], 100 - EVENTS_PER_WINDOW)
        self.assertEqual(reports[0]["peer"], PEER)

    def test_budget_is_per_connection(self) -> None:
        noisy = Client(self.factory, 40000)
        quiet = Client(self.factory, 40001)
        noisy.send(b"bogus\r\n" * 100)
        with capturedLogs() as events:
            quiet.send(b"bogus\r\n")
        self.assertEqual([event["peer"] for event in events], ["tcp:127.0.0.1:40001"])

    def test_budget_renews_after_window(self) -> None:
        client = Client(self.factory)
        client.send(b"bogus\r\n" * 100)
        self.reactor.advance(WINDOW_SECONDS)
        with capturedLogs() as events:
            client.send(b"bogus\r\n")
        self.assertEqual(len(events), 2)
        self.assertEqual(events[0]["count"], 100 - EVENTS_PER_WINDOW)

    def test_binary_garbage_logs_capped(self) -> None:
        client = Client(self.factory)
        unknown_opcode = b"\x80\x7f" + b"\x00" * 22
        with capturedLogs() as events:
            client.send(unknown_opcode * 100)
        self.assertEqual(len(events), EVENTS_PER_WINDOW)


class ServerLogLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        reactor = FakeReactor()
        self.factory = KVDaemonFactory(Settings(threads=1, max_connections=1), reactor=reactor, threadpool=FakeThreadPool())
        self.factory.log_limit.events = 5
        self.reactor = reactor

    def test_many_connections_share_budget(self) -> None:
        factory = KVDaemonFactory(Settings(threads=1), reactor=self.reactor, threadpool=FakeThreadPool())
        factory.log_limit.events = 5
        with capturedLogs() as events:
            for port in range(40000, 40010):
                Client(factory, port).send(b"bogus\r\n")
        self.assertEqual(len(events), 5)
        self.assertEqual(factory.log_limit.suppressed, 5)

    def test_server_report_after_window(self) -> None:
        factory = KVDaemonFactory(Settings(threads=1), reactor=self.reactor, threadpool=FakeThreadPool())
        factory.log_limit.events = 5
        for port in range(40000, 40010):
            Client(factory, port).send(b"bogus\r\n")
        self.reactor.advance(WINDOW_SECONDS)
        with capturedLogs() as events:
            Client(factory, 40100).send(b"bogus\r\n")
        self.assertEqual(events[0]["peer"], "all connections")
        self.assertEqual(events[0]["count"], 5)
        self.assertEqual(events[1]["peer"], "tcp:127.0.0.1:40100")

    def test_rejected_connections_logs_capped(self) -> None:
        Client(self.factory, 40000)
        with capturedLogs() as events:
            for port in range(40001, 40021):
                Client(self.factory, port)
        self.assertEqual(self.factory.stats.rejected_connections, 20)
        self.assertEqual(len(events), 5)
        self.assertTrue(all(event["log_format"].startswith("Rejected a connection") for event in events))
