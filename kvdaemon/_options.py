# -*- test-case-name: tests.test_options -*-
"""
The ``twistd kvdaemon`` command line: option parsing, validation and the
service it builds.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Any

from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger
from twisted.python import usage

from kvdaemon._service import DEFAULT_LISTEN, KVDaemonService
from kvdaemon._settings import MiB, Settings

log = Logger()


def _bounded(name: str, value: str, low: float, high: float, unit: str, kind: type = int) -> Any:
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise usage.UsageError(
            "Invalid value %r for --%s: expected %s from %s to %s %s."
            % (value, name, "an integer" if kind is int else "a number", low, high, unit)
        )
    return number


def read_credentials(path: str, option: str = "sasl-file") -> dict[bytes, bytes]:
    """
    Read credentials for ``--OPTION``: one ``user:password`` per line.

    Blank lines and lines starting with ``#`` are ignored.
    :raise usage.UsageError: the file cannot be read or a line has no colon.
    """
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as error:
        raise usage.UsageError("Cannot read --%s %s: %s" % (option, path, error.strerror))
    users: dict[bytes, bytes] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith(b"#"):
            continue
        user, colon, password = line.partition(b":")
        if not colon or not user:
            raise usage.UsageError("Invalid line %d in --%s %s: expected user:password." % (number, option, path))
        users[user] = password
    if not users:
        raise usage.UsageError("--%s %s contains no user:password lines." % (option, path))
    return users


class Options(usage.Options):
    """Command-line options of ``twistd kvdaemon``."""

    synopsis = "[options]"
    longdesc = (
        "Serve the memcached text, meta and binary protocols, plus ordered "
        "range operations, from an in-memory store. Listens on "
        + DEFAULT_LISTEN
        + " unless --listen is given."
    )

    optParameters = [
        ["max-memory", "m", "64", "Item memory in MiB before LRU eviction starts (1 to 1048576)."],
        ["max-item-size", "I", str(MiB), "Largest item in bytes (1024 to 134217728)."],
        ["max-connections", "c", "1024", "Connections served at once (1 to 1000000)."],
        ["threads", "t", "4", "Worker threads for range operations (1 to 256)."],
        [
            "stream-buffer",
            None,
            str(256 * 1024),
            "Bytes a range operation may have produced per connection before the client has taken them"
            " (4096 to 67108864).",
        ],
        [
            "stall-timeout",
            None,
            "60",
            "Seconds a range operation may wait for a client that reads nothing before the connection is"
            " closed (0.1 to 86400).",
        ],
        ["max-streams", None, "256", "Range operations running at once across all connections (1 to 100000)."],
        ["max-scans", None, "64", "Open resumable range scans (binary protocol) at once (1 to 100000)."],
        ["scan-lifetime", None, "60", "Seconds an idle resumable range scan is kept (1 to 86400)."],
        [
            "shutdown-grace",
            None,
            "5",
            "Seconds a stopping server waits for clients to read the replies already sent to them before it"
            " drops their connections (0 to 3600).",
        ],
        [
            "idle-timeout",
            None,
            "0",
            "Seconds a connection waiting for a request may stay silent before it is closed, as with memcached's"
            " -o idle_timeout. 0 turns this off (0 to 2592000).",
        ],
        [
            "switch-interval",
            None,
            "0.5",
            "Milliseconds a worker thread may hold Python's interpreter lock while the reactor thread waits"
            " for it; Python's own default is 5 (0.05 to 100).",
        ],
        [
            "sasl-file",
            None,
            None,
            "Require SASL PLAIN authentication; the file has one user:password per line. As with memcached -S,"
            " every connection is then read as binary, so text clients get no reply.",
        ],
        [
            "auth-file",
            "Y",
            None,
            "Require text-protocol clients to authenticate, as memcached -Y does: a connection must first send"
            " a set whose data is 'user password', matching a user:password line of the file. Every connection"
            " is then read as text, so binary clients get no reply.",
        ],
    ]
    optFlags = [
        [
            "enable-shutdown",
            "A",
            "Let a client stop the server with the text command shutdown, as memcached -A does; the server then"
            " stops as on SIGTERM.",
        ],
        [
            "benchmark-unbounded-spool",
            None,
            "For benchmarks only: turn off the --stream-buffer cap and backpressure, so a client that stops"
            " reading makes the server buffer its whole reply in memory.",
        ],
        [
            "disable-flush-all",
            "F",
            "Reject flush_all (text and binary) and range deletes, the commands that destroy data in bulk.",
        ],
        ["disable-dumps", "X", "Reject lru_crawler metadump and mgdump, the commands that list every key."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Listen on a Twisted server endpoint (repeatable), e.g. tcp:11211:interface=127.0.0.1 or unix:/run/kv.sock."""
        self["listen"].append(description)

    def opt_disable_flush(self) -> None:
        """Turn on --disable-flush-all (its earlier name, kept as an alias)."""
        self["disable-flush-all"] = True

    def postOptions(self) -> None:
        if self["sasl-file"] and self["auth-file"]:
            raise usage.UsageError(
                "--sasl-file and --auth-file cannot be combined: SASL makes every connection binary,"
                " and --auth-file authenticates text connections."
            )
        sasl_users = None
        if self["sasl-file"]:
            sasl_users = read_credentials(self["sasl-file"], "sasl-file")
        auth_users = None
        if self["auth-file"]:
            auth_users = read_credentials(self["auth-file"], "auth-file")
        self["settings"] = Settings(
            max_memory=_bounded("max-memory", self["max-memory"], 1, 1048576, "MiB") * MiB,
            max_item_size=_bounded("max-item-size", self["max-item-size"], 1024, 128 * MiB, "bytes"),
            max_connections=_bounded("max-connections", self["max-connections"], 1, 1000000, "connections"),
            threads=_bounded("threads", self["threads"], 1, 256, "threads"),
            stream_buffer=(
                0
                if self["benchmark-unbounded-spool"]
                else _bounded("stream-buffer", self["stream-buffer"], 4096, 64 * MiB, "bytes")
            ),
            stall_timeout=_bounded("stall-timeout", self["stall-timeout"], 0.1, 86400, "seconds", float),
            shutdown_grace=_bounded("shutdown-grace", self["shutdown-grace"], 0, 3600, "seconds", float),
            enable_shutdown=bool(self["enable-shutdown"]),
            max_streams=_bounded("max-streams", self["max-streams"], 1, 100000, "streams"),
            max_scans=_bounded("max-scans", self["max-scans"], 1, 100000, "scans"),
            scan_lifetime=_bounded("scan-lifetime", self["scan-lifetime"], 1, 86400, "seconds", float),
            idle_timeout=_bounded("idle-timeout", self["idle-timeout"], 0, 2592000, "seconds"),
            allow_destructive=not self["disable-flush-all"],
            allow_dumps=not self["disable-dumps"],
            sasl_users=sasl_users,
            auth_users=auth_users,
        )
        self["switch-interval"] = _bounded("switch-interval", self["switch-interval"], 0.05, 100, "milliseconds", float)
        settings = self["settings"]
        if settings.max_item_size > settings.max_memory // 2:
            # memcached refuses the same combination.
            raise usage.UsageError(
                "Invalid value %d for --max-item-size: it must be at most half of --max-memory (%d bytes)."
                % (settings.max_item_size, settings.max_memory // 2)
            )
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        from twisted.internet.endpoints import serverFromString

        class _NoReactor:
            pass

        for description in self["listen"]:
            try:
                # Parsing an ssl: description also loads its key and
                # certificate files, so their errors surface here too.
                serverFromString(_NoReactor(), description)
            except ImportError as error:
                raise usage.UsageError(
                    "Cannot use --listen endpoint %r: %s. TLS endpoints need pyOpenSSL: install kvdaemon's"
                    " tls extra (pip install '.[tls]' in a checkout) or pip install 'Twisted[tls]'."
                    % (description, error)
                )
            except Exception as error:
                raise usage.UsageError("Invalid --listen endpoint %r: %s" % (description, error))


def make_service(options: Options) -> KVDaemonService:
    """
    Build the service that ``twistd kvdaemon`` runs, and set the
    interpreter's thread switch interval.

    The switch interval is process-wide, so only the daemon sets it; a
    program that embeds :class:`KVDaemonService` keeps its own.
    """
    sys.setswitchinterval(options["switch-interval"] / 1000.0)
    return KVDaemonService(options["settings"], options["listen"])


def stop_on_sigterm(reactor: Any) -> None:
    """
    Make SIGTERM stop the reactor without twistd re-raising the signal
    when the process exits, so that ``twistd kvdaemon`` exits with status 0
    after a clean stop, as memcached 1.6.18 does.

    twistd records the signal in the reactor's own SIGTERM handler and
    re-raises it once the reactor has stopped.  This replaces that handler
    once the reactor runs (the reactor installs its handlers as it starts),
    so it is for the daemon only: a program that embeds the service keeps
    its own signal handling.
    """

    def stop(number: int, frame: FrameType | None) -> None:
        # A signal handler interrupts whatever the reactor thread runs, so
        # it only schedules the stop and leaves the logging to that call.
        reactor.callFromThread(_stop_reactor, reactor)

    reactor.callWhenRunning(signal.signal, signal.SIGTERM, stop)


def _stop_reactor(reactor: Any) -> None:
    log.info("Received SIGTERM, stopping")
    try:
        reactor.stop()
    except ReactorNotRunning:
        # A second SIGTERM, or a shutdown command, is already stopping it.
        pass
