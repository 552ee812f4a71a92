# -*- test-case-name: tests.test_testing -*-
"""
In-memory doubles for the tests of programs that use kvdaemon.

:class:`MemoryKVDaemon` is a complete kvdaemon server with no sockets and
no threads: its connections are in-memory transports, its worker pool runs
queued work on the caller's thread, and its time is a
:class:`twisted.internet.task.Clock` that the test advances.  A test calls
:meth:`MemoryKVDaemon.flush` to deliver bytes and run streaming steps until
nothing moves, then checks its Deferreds synchronously::

    server = MemoryKVDaemon()
    client = server.connect()
    stored = client.set(b"greeting", b"hello")
    server.flush()
    self.successResultOf(stored)

:class:`SteppedReactor` and :class:`SteppedThreadPool` are the two fakes it
is built on, for tests that step the worker threads and the reactor by
hand.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim

from kvdaemon._factory import KVDaemonFactory
from kvdaemon._settings import Settings
from kvdaemon.client import KVClientProtocol

#: The Unix time a new MemoryKVDaemon's clock starts at, so that relative
#: and absolute expiry times differ as they do on a real clock.
START_TIME = 1_700_000_000


class SteppedThreadPool:
    """
    A stand-in for :class:`twisted.python.threadpool.ThreadPool` whose work
    runs only when the test calls :meth:`run_next`, on the test's thread.
    """

    def __init__(self) -> None:
        #: Queued work: (on_result, function, args, kwargs).
        self.pending: list[tuple[Callable[..., Any], Callable[..., Any], tuple, dict]] = []

    def callInThreadWithCallback(self, on_result: Callable[..., Any], func: Callable[..., Any], *args, **kwargs) -> None:
        self.pending.append((on_result, func, args, kwargs))

    def run_next(self) -> None:
        """Run the oldest queued work item, as a worker thread would."""
        on_result, func, args, kwargs = self.pending.pop(0)
        try:
            result = func(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class SteppedReactor(Clock):
    """
    A clock that also queues ``callFromThread`` calls until the test runs
    them with :meth:`run_thread_calls`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.thread_calls: list[tuple[Callable[..., Any], tuple, dict]] = []

    def callFromThread(self, func: Callable[..., Any], *args, **kwargs) -> None:
        self.thread_calls.append((func, args, kwargs))

    def run_thread_calls(self) -> int:
        """Run the queued ``callFromThread`` calls (and any they queue); return how many ran."""
        count = 0
        while self.thread_calls:
            func, args, kwargs = self.thread_calls.pop(0)
            func(*args, **kwargs)
            count += 1
        return count


class MemoryKVDaemon:
    """
    A kvdaemon server in memory (see the module documentation).

    :param settings: limits and switches, as for a real server.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.reactor = SteppedReactor()
        self.reactor.advance(START_TIME)
        self.threadpool = SteppedThreadPool()
        self.factory = KVDaemonFactory(
            settings if settings is not None else Settings(),
            reactor=self.reactor,
            threadpool=self.threadpool,  # type: ignore[arg-type]
        )
        #: The server's store, for setting up and checking data directly.
        self.store = self.factory.store
        self._pumps: list[iosim.IOPump] = []

    def connect(self, client: Any = None) -> Any:
        """
        Connect a client protocol to the server in memory and return it.

        :param client: the protocol to connect; a new
            :class:`kvdaemon.client.KVClientProtocol` by default.  Any
            Twisted protocol works, for example one that speaks the text
            protocol.
        """
        if client is None:
            client = KVClientProtocol()
        number = len(self._pumps)
        server = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000 + number))
        server_transport = iosim.FakeTransport(
            server,
            isServer=True,
            hostAddress=IPv4Address("TCP", "127.0.0.1", 11211),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000 + number),
        )
        client_transport = iosim.FakeTransport(
            client,
            isServer=False,
            hostAddress=IPv4Address("TCP", "127.0.0.1", 40000 + number),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 11211),
        )
        pump = iosim.connect(server, server_transport, client, client_transport, greet=False, clock=self.reactor)
        self._pumps.append(pump)
        return client

    def flush(self, limit: int = 100000) -> None:
        """
        Deliver the bytes waiting in either direction, run queued worker
        steps and their hand-offs to the reactor thread, and repeat until
        nothing moves.

        The clock is not advanced, so timers (expiry, stall timeouts) fire
        only when the test calls ``server.reactor.advance``.

        :raise RuntimeError: nothing settled within ``limit`` rounds.
        """
        for _ in range(limit):
            moved = False
            for pump in self._pumps:
                if pump.pump(advanceClock=False):
                    moved = True
            if self.threadpool.pending:
                self.threadpool.run_next()
                moved = True
            if self.reactor.run_thread_calls():
                moved = True
            if not moved:
                return
        raise RuntimeError("the in-memory server did not settle within %d rounds" % (limit,))
