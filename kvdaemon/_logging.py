# -*- test-case-name: tests.test_logging -*-
"""
A per-connection cap on log events.

Every rejected request is logged with its peer, so a client that sends bad
requests in a loop would otherwise write one log line per request, as fast
as the server can parse them.  The loggers of one connection's handlers
share a :class:`LogLimit`: past :data:`EVENTS_PER_WINDOW` info and warn
events in a window of :data:`WINDOW_SECONDS`, events are counted instead of
emitted, and the count is logged when the window ends or the connection
closes.  All connections also share a server-wide limit of
:data:`SERVER_EVENTS_PER_WINDOW`, which caps clients that open many short
connections.  Errors and failures are always emitted.
"""

from __future__ import annotations

from typing import Callable

from twisted.logger import Logger, LogLevel

#: Info and warn events one connection may emit per window.
EVENTS_PER_WINDOW = 20

#: Info and warn events all connections together may emit per window.
SERVER_EVENTS_PER_WINDOW = 1000

#: The length of a window, in seconds.
WINDOW_SECONDS = 60.0

_LIMITED_LEVELS = frozenset([LogLevel.info, LogLevel.warn])


class LogLimit:
    """
    The log budget of one connection.

    :param seconds: the reactor's clock.
    :param peer: the connection's peer address, or what else the limit
        covers, for the summary line.
    :param parent: a limit shared with other connections, which every
        event this one admits must also pass.
    """

    log = Logger()

    def __init__(
        self,
        seconds: Callable[[], float],
        peer: str,
        events: int = EVENTS_PER_WINDOW,
        window: float = WINDOW_SECONDS,
        parent: LogLimit | None = None,
    ) -> None:
        self.seconds = seconds
        self.peer = peer
        self.events = events
        self.window = window
        self.parent = parent
        self.window_start = seconds()
        self.emitted = 0
        #: Events dropped in the current window.
        self.suppressed = 0

    def admit(self) -> bool:
        """Count one event and return whether it may be emitted."""
        now = self.seconds()
        if now - self.window_start >= self.window:
            self.report()
            self.window_start = now
            self.emitted = 0
        if self.emitted >= self.events:
            self.suppressed += 1
            return False
        if self.parent is not None and not self.parent.admit():
            return False
        self.emitted += 1
        return True

    def report(self) -> None:
        """Log how many events were dropped since the last report, if any."""
        if self.suppressed:
            self.log.info(
                "Dropped {count} log events for {peer}: more than {limit} in {window} seconds",
                count=self.suppressed,
                peer=self.peer,
                limit=self.events,
                window=self.window,
            )
            self.suppressed = 0


class LimitedLogger(Logger):
    """A :class:`Logger` whose info and warn events draw on a :class:`LogLimit`."""

    def __init__(self, namespace: str, source: object, limit: LogLimit) -> None:
        super().__init__(namespace, source)
        self.limit = limit

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if level in _LIMITED_LEVELS and not self.limit.admit():
            return
        super().emit(level, format, **kwargs)


def limited_logger(source: object, limit: LogLimit) -> LimitedLogger:
    """Return a logger for ``source`` with the namespace a class-level ``Logger()`` would give it."""
    cls = type(source)
    return LimitedLogger("%s.%s" % (cls.__module__, cls.__name__), source, limit)
