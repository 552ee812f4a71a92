"""
Tests for kvdaemon._directwrite: replies sent straight to the socket keep
their order and their bytes whether or not the socket takes them whole.
"""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from kvdaemon._directwrite import direct_sender


class _Sender(protocol.Protocol):
    """On connect, send a large block and then small ones, all through direct_sender."""

    def connectionMade(self) -> None:
        send = direct_sender(self.transport)
        self.factory.sender_found.append(send is not None)
        for block in self.factory.blocks:
            if not send(block):
                self.transport.write(block)
        self.transport.loseConnection()


class _Collector(protocol.Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: object) -> None:
        self.done.callback(b"".join(self.received))


class DirectSenderTests(SynchronousTestCase):
    def test_direct_sender_none_for_string_transport(self) -> None:
        self.assertIsNone(direct_sender(StringTransport()))


class DirectSenderSocketTests(TestCase):
    @defer.inlineCallbacks
    def test_direct_sender_keeps_order_over_partial_sends(self) -> None:
        # 16 MiB is more than a loopback socket buffer takes at once, so
        # the first send is partial and the small blocks after it must
        # queue behind its rest.
        blocks = [bytes([65 + i % 26]) * (16 * 1024 * 1024 if i == 0 else 10 + i) for i in range(50)]
        factory = protocol.Factory.forProtocol(_Sender)
        factory.blocks = blocks
        factory.sender_found = []
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        collector = _Collector()
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            protocol.Factory.forProtocol(lambda: collector)
        )
        received = yield collector.done
        self.assertEqual(factory.sender_found, [True])
        self.assertEqual(len(received), sum(map(len, blocks)))
        self.assertEqual(received, b"".join(blocks))
