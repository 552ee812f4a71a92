"""
Tests for kvdaemon._connection: protocol detection, the batching of one
read's replies, the pending-input bound, and what happens when a handler
raises.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from kvdaemon import KVDaemonFactory, Settings
from kvdaemon._connection import OUTPUT_BATCH_BYTES
from tests.support import FakeReactor, FakeThreadPool

NOW = 1_700_000_000


class CountingTransport(StringTransport):
    """A StringTransport that counts write calls and records TCP_NODELAY."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.write_calls = 0
        self.no_delay = False

    def write(self, data: bytes) -> None:
        self.write_calls += 1
        super().write(data)

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


def connect(**settings):
    """Return a new connection, its transport and the factory behind it."""
    reactor = FakeReactor()
    reactor.advance(NOW)
    factory = KVDaemonFactory(Settings(**settings), reactor=reactor, threadpool=FakeThreadPool())
    address = IPv4Address("TCP", "127.0.0.1", 40000)
    protocol = factory.buildProtocol(address)
    transport = CountingTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport, factory


class ConnectionTests(SynchronousTestCase):
    def test_connection_sets_tcp_no_delay(self) -> None:
        _, transport, _ = connect()
        self.assertTrue(transport.no_delay)

    def test_one_read_replies_in_one_write(self) -> None:
        protocol, transport, _ = connect()

        protocol.dataReceived(b"set a 0 0 1\r\nx\r\nget a\r\nversion\r\nbogus\r\n")

        self.assertEqual(transport.write_calls, 1)
        self.assertEqual(
            transport.value(),
            b"STORED\r\nVALUE a 0 1\r\nx\r\nEND\r\nVERSION 1.6.18\r\nERROR\r\n",
        )

    def test_large_replies_flushed_in_batches(self) -> None:
        protocol, transport, _ = connect()
        value = b"v" * 20000
        protocol.dataReceived(b"set big 0 0 %d\r\n%s\r\n" % (len(value), value))
        transport.clear()
        transport.write_calls = 0

        protocol.dataReceived(b"get big\r\n" * 10)

        reply = b"VALUE big 0 20000\r\n" + value + b"\r\nEND\r\n"
        self.assertEqual(transport.value(), reply * 10)
        # About 20 KB per reply: a write each time 64 KiB or more have
        # piled up, then one for the rest.
        replies_per_write = -(-OUTPUT_BATCH_BYTES // len(reply))
        self.assertEqual(transport.write_calls, -(-10 // replies_per_write))

    def test_first_byte_picks_protocol(self) -> None:
        from kvdaemon._binary import BinaryHandler
        from kvdaemon._text import TextHandler

        text, _, _ = connect()
        text.dataReceived(b"version\r\n")
        binary, _, _ = connect()
        binary.dataReceived(b"\x80")

        self.assertIsInstance(text.handler, TextHandler)
        self.assertIsInstance(binary.handler, BinaryHandler)

    def test_pending_input_bound_pauses_reading(self) -> None:
        protocol, transport, _ = connect(max_pending_input=1000)
        protocol.pauseProducing()

        protocol.dataReceived(b"version\r\n" * 200)

        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(transport.value(), b"")

        protocol.resumeProducing()

        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(transport.value(), b"VERSION 1.6.18\r\n" * 200)

    def test_handler_error_logged_and_closes(self) -> None:
        protocol, transport, _ = connect()
        protocol.dataReceived(b"version\r\n")
        transport.clear()

        def broken(parts: list[bytes]) -> None:
            raise ZeroDivisionError("broken command")

        protocol.handler._commands[b"version"] = broken
        with capturedLogs() as events:
            protocol.dataReceived(b"get nothing\r\nversion\r\nget nothing\r\n")

        failures = [event for event in events if "log_failure" in event]
        self.assertEqual(len(failures), 1)
        self.assertEqual(failures[0]["peer"], "tcp:127.0.0.1:40000")
        self.assertIsInstance(failures[0]["log_failure"].value, ZeroDivisionError)
        # Replies produced before the error are sent, then the connection closes.
        self.assertEqual(transport.value(), b"END\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
