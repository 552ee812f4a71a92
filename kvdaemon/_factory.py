# -*- test-case-name: tests.test_service -*-
"""
The protocol factory: the state that every connection of one server shares
(settings, store, statistics, worker pool, running streams).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from kvdaemon._connection import Connection, describe_address
from kvdaemon._logging import SERVER_EVENTS_PER_WINDOW, LogLimit, limited_logger
from kvdaemon._settings import Settings
from kvdaemon._stats import Stats
from kvdaemon._store import Store
from kvdaemon._streaming import Stream

#: Seconds between two checks for idle connections when
#: ``Settings.idle_timeout`` is on, so a connection is closed at most this
#: much later than its timeout.
IDLE_CHECK_INTERVAL = 1.0


class _TooManyConnections(protocol.Protocol):
    """Tell the client the server is full and hang up, as memcached does."""

    def connectionMade(self) -> None:
        self.transport.write(b"ERROR Too many open connections\r\n")
        self.transport.loseConnection()


class KVDaemonFactory(protocol.Factory):
    """
    Builds :class:`Connection` protocols that serve one shared store.

    All methods run on the reactor thread.

    :param settings: limits and switches.
    :param reactor: the reactor that connections, timers and thread
        hand-offs use.
    :param threadpool: the pool streaming jobs run on; its owner (normally
        :class:`kvdaemon.KVDaemonService`) starts and stops it.
    :param store: the store to serve; by default a new empty one sized
        from ``settings``.
    """

    log = Logger()
    protocol = Connection

    def __init__(
        self,
        settings: Settings,
        *,
        reactor: Any,
        threadpool: ThreadPool,
        store: Store | None = None,
    ) -> None:
        self.settings = settings
        self.reactor = reactor
        self.threadpool = threadpool
        if store is None:
            store = Store(reactor.seconds, settings.max_memory, settings.max_item_size)
        self.store = store
        self.stats = Stats(started=reactor.seconds())
        #: The log budget that all connections share, and that rejections
        #: of new connections draw on.
        self.log_limit = LogLimit(reactor.seconds, "all connections", events=SERVER_EVENTS_PER_WINDOW)
        self._limited_log = limited_logger(self, self.log_limit)
        self.connections: set[Connection] = set()
        self.streams: set[Stream] = set()
        #: The verbosity level last set by a client's ``verbosity`` command.
        self.verbosity = 0
        #: The first TCP port the server listens on (0 for none), for
        #: ``stats settings``.
        self.tcp_port = 0
        #: Endpoint descriptions this server listens on, for ``stats settings``.
        self.listen_descriptions: list[str] = []
        #: Per-server state that the binary protocol's resumable scans keep.
        self.scans: Any = None
        self._last_connection_id = 0
        #: Deferreds of :meth:`close_connections` calls, fired once no
        #: connection is left.
        self._all_closed: list[defer.Deferred[None]] = []
        #: Runs while idle_timeout is on and connections are open.
        self._idle_check: LoopingCall | None = None

    def reset_stats(self) -> None:
        """Zero the counters that ``stats reset`` clears, keeping gauges such as open connections."""
        old = self.stats
        self.stats = Stats(
            started=old.started,
            curr_connections=old.curr_connections,
            total_connections=0,
            streams_running=old.streams_running,
            scans_open=old.scans_open,
        )
        for connection in self.connections:
            connection.stats = self.stats
            if connection.handler is not None:
                connection.handler.stats = self.stats
        self.store.evictions = 0
        self.store.total_items = 0
        self.store.reclaimed = 0
        self.store.expired_unfetched = 0
        self.store.evicted_unfetched = 0
        self.store.get_expired = 0
        self.store.get_flushed = 0

    def buildProtocol(self, addr: Any) -> protocol.Protocol | None:
        if len(self.connections) >= self.settings.max_connections:
            self.stats.rejected_connections += 1
            self._limited_log.warn(
                "Rejected a connection from {peer}: {limit} connections already open",
                peer=describe_address(addr),
                limit=self.settings.max_connections,
            )
            rejected = _TooManyConnections()
            rejected.factory = self
            return rejected
        return super().buildProtocol(addr)

    def connection_opened(self, connection: Connection) -> None:
        """Count a new connection and give it an id."""
        self._last_connection_id += 1
        connection.connection_id = self._last_connection_id
        self.connections.add(connection)
        self.stats.curr_connections += 1
        self.stats.total_connections += 1
        if self.settings.idle_timeout and self._idle_check is None:
            self._idle_check = LoopingCall(self.close_idle_connections)
            self._idle_check.clock = self.reactor
            self._idle_check.start(min(IDLE_CHECK_INTERVAL, self.settings.idle_timeout), now=False)

    def connection_closed(self, connection: Connection) -> None:
        """Forget a closed connection."""
        if connection in self.connections:
            self.connections.discard(connection)
            self.stats.curr_connections -= 1
        if not self.connections and self._all_closed:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                d.callback(None)
        if not self.connections and self._idle_check is not None:
            self._idle_check.stop()
            self._idle_check = None

    def close_idle_connections(self) -> None:
        """
        Close every connection that has waited ``idle_timeout`` seconds or
        more for a request, without a reply, as memcached's
        ``-o idle_timeout`` does.

        Like memcached, this skips a connection that has a stream running,
        output waiting to be sent or a request partly received.
        """
        deadline = self.reactor.seconds() - self.settings.idle_timeout
        for connection in list(self.connections):
            if connection.last_request_time <= deadline and connection.waiting_for_request:
                self.stats.idle_kicks += 1
                self.log.info(
                    "Closing {peer}: no request for {timeout} seconds",
                    peer=connection.peer,
                    timeout=self.settings.idle_timeout,
                )
                connection.close()

    def cancel_streams(self) -> None:
        """Cancel every running stream, for example at shutdown."""
        for stream in list(self.streams):
            stream.cancel()

    def close_connections(self, grace_period: float) -> defer.Deferred[None]:
        """
        Close every connection once the replies already written to it have
        been sent, and abort the connections still open ``grace_period``
        seconds later: a client that reads nothing never takes its replies.

        :return: a Deferred that fires once no connection is left.
        """
        for connection in list(self.connections):
            connection.close()
        if not self.connections:
            return defer.succeed(None)
        closed: defer.Deferred[None] = defer.Deferred()
        self._all_closed.append(closed)
        timer = self.reactor.callLater(grace_period, self._abort_connections, grace_period)

        def stop_timer(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        closed.addCallback(stop_timer)
        return closed

    def _abort_connections(self, grace_period: float) -> None:
        self.log.warn(
            "Aborting {count} connections still open {grace_period} seconds after closing began: {peers}",
            count=len(self.connections),
            grace_period=grace_period,
            peers=", ".join(sorted(connection.peer for connection in self.connections)),
        )
        for connection in list(self.connections):
            connection.abort()
