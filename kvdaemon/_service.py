# -*- test-case-name: tests.test_service,tests.test_service_shutdown -*-
"""
The kvdaemon service: listening endpoints, the worker pool and the factory,
started and stopped together, for ``twistd kvdaemon`` or any Twisted
application.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from kvdaemon._factory import KVDaemonFactory
from kvdaemon._settings import Settings

#: The default listening endpoint: loopback only, like a safely
#: configured memcached.
DEFAULT_LISTEN = "tcp:11211:interface=127.0.0.1"


class KVDaemonService(service.Service):
    """
    A kvdaemon server as a Twisted service.

    ``startService`` starts the worker pool and listens on every endpoint.
    ``stopService`` stops listening, cancels running streams (aborting
    their connections, so their clients get truncated replies), stops the
    pool and closes every other connection once the replies already
    written to it have been sent.  Connections still open
    ``settings.shutdown_grace`` seconds later are aborted, so a client
    that reads nothing cannot hold the process.  The pool is the
    service's own, never the reactor's shared one.

    :param settings: limits and switches.
    :param listen: Twisted server endpoint descriptions, such as
        ``"tcp:11211:interface=127.0.0.1"`` or ``"unix:/run/kv.sock"``.
    :param reactor: the reactor to use; the global one by default.
    """

    log = Logger()

    def __init__(
        self,
        settings: Settings | None = None,
        listen: Sequence[str] = (DEFAULT_LISTEN,),
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.settings = settings if settings is not None else Settings()
        self.listen = list(listen)
        self.reactor = reactor
        self.threadpool = ThreadPool(minthreads=0, maxthreads=self.settings.threads, name="kvdaemon-workers")
        self.factory = KVDaemonFactory(self.settings, reactor=reactor, threadpool=self.threadpool)
        self.factory.listen_descriptions = self.listen
        self._shutdown_trigger: Any = None
        #: The ports listened on, once :meth:`startService` has run.
        self.ports: list[IListeningPort] = []

    def startService(self) -> None:
        """
        Start the pool and listen on every endpoint.

        :raise Exception: whatever an endpoint raised when it could not
            listen (an address in use, a bad description), so that twistd
            exits instead of running a server that serves nothing.
        """
        self.threadpool.start()
        # Worker threads are not daemon threads: a program that shuts the
        # reactor down without stopping this service would hang on exit,
        # so the pool also stops with the reactor.
        self._shutdown_trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self._stop_pool)
        for description in self.listen:
            try:
                endpoint = serverFromString(self.reactor, description)
            except Exception as error:
                self.log.error("Invalid endpoint {endpoint}: {error}", endpoint=description, error=error)
                self._stop_listening_and_pool()
                raise
            failures: list[Any] = []
            d = endpoint.listen(self.factory)
            d.addCallbacks(self._listening, failures.append)
            if failures:
                self.log.error(
                    "Could not listen on {endpoint}: {error}",
                    endpoint=description,
                    error=failures[0].value,
                )
                self._stop_listening_and_pool()
                failures[0].raiseException()
            self.log.info(
                "kvdaemon listening on {endpoint}",
                endpoint=description,
            )
        super().startService()
        self.log.info(
            "kvdaemon started: {max_memory} bytes of item memory, {threads} worker threads",
            max_memory=self.settings.max_memory,
            threads=self.settings.threads,
        )
        settings = self.settings
        if settings.sasl_users is not None:
            authentication = "SASL (binary clients)"
        elif settings.auth_users is not None:
            authentication = "auth file (text clients)"
        else:
            authentication = "none"
        self.log.info(
            "kvdaemon access: authentication {authentication}; flush_all and range deletes {flush};"
            " key dumps {dumps}; shutdown command {shutdown}",
            authentication=authentication,
            flush="enabled" if settings.allow_destructive else "disabled",
            dumps="enabled" if settings.allow_dumps else "disabled",
            shutdown="enabled" if settings.enable_shutdown else "disabled",
        )

    def _listening(self, port: IListeningPort) -> None:
        self.ports.append(port)
        # UNIX socket addresses have no port.
        tcp_port = getattr(port.getHost(), "port", None)
        if not self.factory.tcp_port and isinstance(tcp_port, int):
            self.factory.tcp_port = tcp_port

    def stopService(self) -> defer.Deferred[None]:
        """
        Stop listening, cancel every stream, stop the pool and close every
        connection.

        :return: a Deferred that fires once the ports have stopped
            listening and every connection is closed.  It waits for the
            pool's threads to finish their current steps, then at most
            ``settings.shutdown_grace`` seconds for the connections.
        """
        super().stopService()
        # Connections already closing, such as the one that sent a
        # shutdown command, are not counted as closed by the stop.
        connections = sum(1 for connection in self.factory.connections if not connection.closing)
        streams = len(self.factory.streams)
        stopped = self._stop_listening_and_pool()
        closed = self.factory.close_connections(self.settings.shutdown_grace)
        closed.addCallback(lambda _: self.factory.log_limit.report())
        d = defer.gatherResults([stopped, closed], consumeErrors=True)
        d.addCallback(
            lambda _: self.log.info(
                "kvdaemon stopped: closed {connections} connections and cancelled {streams} streams",
                connections=connections,
                streams=streams,
            )
        )
        return d

    def _stop_pool(self) -> None:
        if self.threadpool.started:
            self.threadpool.stop()

    def _stop_listening_and_pool(self) -> defer.Deferred[None]:
        ports, self.ports = self.ports, []
        stopped = [defer.maybeDeferred(port.stopListening) for port in ports]
        self.factory.cancel_streams()
        if self.factory.scans is not None:
            self.factory.scans.close()
        self._stop_pool()
        if self._shutdown_trigger is not None:
            self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        return defer.gatherResults(stopped, consumeErrors=True)
