"""
A kvdaemon server driven by hand for unit tests of binary streaming
opcodes: connections over StringTransport, worker steps run by
FakeThreadPool and thread hand-offs by FakeReactor, both only when the test
pumps them.
"""

from __future__ import annotations

import struct

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from kvdaemon import KVDaemonFactory, Settings
from kvdaemon._connection import Connection
from tests.binary_packets import Response, parse, request, storage_extras
from tests.support import FakeReactor, FakeThreadPool

#: A fixed Unix time for the fake clock, so expiry times are realistic.
NOW = 1_700_000_000

SET = 0x01
NOOP = 0x0A
GETK = 0x0C
STAT = 0x10


class FakeClient:
    """One connection to a :class:`FakeServer`, over a StringTransport."""

    def __init__(self, server: FakeServer, port: int) -> None:
        self.server = server
        peer = IPv4Address("TCP", "127.0.0.1", port)
        self.connection: Connection = server.factory.buildProtocol(peer)
        self.transport = StringTransport(peerAddress=peer)
        self.connection.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        """Feed ``data`` to the connection without running any worker step."""
        self.connection.dataReceived(data)

    def take(self) -> list[Response]:
        """Return the responses written since the last call."""
        written = self.transport.value()
        self.transport.clear()
        return parse(written)

    def exchange(self, data: bytes) -> list[Response]:
        """Feed ``data``, run every worker step and hand-off, and return the responses."""
        self.send(data)
        self.server.pump()
        return self.take()

    def lose_connection(self) -> None:
        """Drop the connection as the reactor does when the peer goes away."""
        self.connection.connectionLost()

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


class FakeServer:
    """A factory with a fake reactor and a fake worker pool."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.reactor = FakeReactor()
        self.reactor.advance(NOW)
        self.threadpool = FakeThreadPool()
        self.factory = KVDaemonFactory(settings or Settings(), reactor=self.reactor, threadpool=self.threadpool)
        self.store = self.factory.store
        self._next_port = 40000

    def connect(self) -> FakeClient:
        self._next_port += 1
        return FakeClient(self, self._next_port)

    def run_step(self) -> None:
        """Run one queued worker step and the hand-offs it scheduled."""
        self.threadpool.run_next()
        self.reactor.run_thread_calls()

    def pump(self) -> int:
        """Run worker steps and hand-offs until none is queued; return how many steps ran."""
        steps = 0
        while self.threadpool.pending or self.reactor.thread_calls:
            if self.threadpool.pending:
                self.threadpool.run_next()
                steps += 1
            self.reactor.run_thread_calls()
        return steps

    def set(self, key: bytes, value: bytes, flags: int = 0, exptime: int = 0) -> None:
        """Store an item on the reactor thread, as a client's set would."""
        self.store.store("set", key, value, flags, exptime)


def set_request(key: bytes, value: bytes, flags: int = 0, exptime: int = 0, opaque: int = 0) -> bytes:
    """A binary set request."""
    return request(SET, key, storage_extras(flags, exptime), value, opaque=opaque)


def stats_request(opaque: int = 0) -> bytes:
    """A binary stat request for the general statistics."""
    return request(STAT, opaque=opaque)


def stats_from(responses: list[Response]) -> dict[str, str]:
    """Collect the name/value pairs of a binary stat reply (up to its empty-key end)."""
    values: dict[str, str] = {}
    for response in responses:
        if response.opcode != STAT:
            continue
        if not response.key:
            break
        values[response.key.decode()] = response.value.decode()
    return values


def u64(data: bytes) -> int:
    """Decode a big-endian 64-bit number."""
    return struct.unpack(">Q", data)[0]
