"""
The in-process servers that the fuzz tests drive.  One server gets the
fuzzed input.  A twin gets the same requests one at a time, as an oracle
framed them, so that the test can compare the two stores and the replies.

Everything runs synchronously on the test's thread.  The reactor is a
fake clock, and the worker pool runs its queued steps only when
:meth:`FuzzServer.pump` is called.
"""

from __future__ import annotations

import base64
import re
from typing import Callable, NamedTuple

from hypothesis import HealthCheck, settings as hypothesis_settings
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from kvdaemon import KVDaemonFactory, Settings
from kvdaemon._store import Item
from tests.support import Client, FakeReactor, FakeThreadPool

#: The fake clock's Unix time, so relative and absolute expiry times differ.
NOW = 1_700_000_000

#: A small item size limit, so that corrupted data lengths reach it and
#: the server must skip a data block it rejects that ends within the
#: stream, and so that appends outgrow it.
MAX_ITEM_SIZE = 100

#: Counted the way memcached 1.6 counts an item against the size limit:
#: a 48-byte header, an 8-byte CAS, the key's NUL and the value's CRLF,
#: and 4 more bytes for non-zero client flags.
ITEM_OVERHEAD = 48 + 8 + 1 + 2

#: The largest key memcached accepts.
MAX_KEY_LENGTH = 250

#: Items every fuzzed server stores before the fuzzing starts.  Fuzzed
#: requests use keys from :data:`KEYS`, and one byte of corruption cannot
#: turn any of those into ``!kept``.
KEPT_KEY = b"!kept"
KEPT_VALUE = b"safe"
SEED_ITEMS = {
    KEPT_KEY: (KEPT_VALUE, 5),
    b"K1": (b"VALUE1", 0),
    b"K2": (b"12", 3),
    b"K:3": (b"", 0),
    b"K_4-LONG": (b"ABCDEFGH", 7),
}

#: The text requests that store :data:`SEED_ITEMS`.
SEED_REQUESTS = b"".join(
    b"set %s %d 0 %d\r\n%s\r\n" % (key, flags, len(value), value) for key, (value, flags) in SEED_ITEMS.items()
)

#: Keys the generated requests use: the seeded ones, so that requests hit,
#: and some that are never stored.  They contain only upper case, digits
#: and punctuation, so a fragment of one of them never spells a command.
KEYS = [b"K1", b"K2", b"K:3", b"K_4-LONG", b"K5", b"K6", b"K77"]

#: Bytes of values: no lower case, so a misframed value never spells a
#: command either.
VALUE_ALPHABET = b"ABCXYZ0123456789 :\r\n"

#: Hypothesis settings for the fuzz modules.  There is no deadline,
#: because timing is not what these tests check and it varies with load.
FUZZ_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz_settings(max_examples: int) -> hypothesis_settings:
    """Return hypothesis settings for a fuzz test that runs ``max_examples`` examples."""
    return hypothesis_settings(max_examples=max_examples, **FUZZ_SETTINGS)


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``stream`` at the offsets ``cuts`` (clamped to its length)."""
    offsets = sorted({min(cut, len(stream)) for cut in cuts} | {0, len(stream)})
    return [stream[start:end] for start, end in zip(offsets, offsets[1:])]


def describe(stream: bytes) -> str:
    """Show a stream for a failure message, in base64 when it is long."""
    if len(stream) > 600:
        return "base64:" + base64.b64encode(stream).decode()
    return repr(stream)


class FuzzServer:
    """
    A kvdaemon factory on a fake reactor and a fake worker pool, seeded
    with :data:`SEED_ITEMS`.

    :param now: the Unix time the fake clock reads.
    """

    def __init__(self, settings: Settings | None = None, now: float = NOW) -> None:
        self.reactor = FakeReactor()
        self.reactor.advance(now)
        self.threadpool = FakeThreadPool()
        self.factory = KVDaemonFactory(
            settings or Settings(threads=1, max_item_size=MAX_ITEM_SIZE),
            reactor=self.reactor,
            threadpool=self.threadpool,
        )
        self.store = self.factory.store
        self._next_port = 40000
        # Stored directly rather than through a connection, because with
        # SASL on, every connection is parsed as binary, so a text set gets
        # no reply.  Items and CAS values come out as a client's set
        # requests in this order would leave them.
        for key, (value, flags) in SEED_ITEMS.items():
            self.store.store("set", key, value, flags, 0)

    def connect(self) -> Client:
        """Open a new connection over a ``StringTransport``."""
        self._next_port += 1
        return Client(self.factory, self._next_port)

    def pump(self) -> None:
        """Run queued worker steps and their hand-offs to the reactor until none is left."""
        for _ in range(100000):
            if self.threadpool.pending:
                self.threadpool.run_next()
            elif self.reactor.thread_calls:
                self.reactor.run_thread_calls()
            else:
                return
        raise AssertionError("streams did not finish within 100000 steps")

    def deliver(self, client: Client, chunks: list[bytes]) -> bytes:
        """
        Deliver ``chunks`` as separate reads, running queued worker steps
        after each as the reactor would, and return everything written.
        """
        output = []
        for chunk in chunks:
            client.protocol.dataReceived(chunk)
            self.pump()
            output.append(client.transport.value())
            client.transport.clear()
        return b"".join(output)

    def items(self) -> dict[bytes, Item]:
        """Return every live item, by key."""
        return dict(self.store.scan(None, None))


def unexpected_errors(events: list[dict]) -> list[dict]:
    """Return the log events that report an unexpected error: a logged failure or a critical event."""
    return [event for event in events if "log_failure" in event or event.get("log_level") == LogLevel.critical]


class LogWatch:
    """
    A context manager that captures log events, for checking afterwards
    that the connection's unexpected-error handler never ran.
    """

    def __enter__(self) -> LogWatch:
        self._capture = capturedLogs()
        self.events = self._capture.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._capture.__exit__(*exc_info)

    @property
    def failures(self) -> list[dict]:
        return unexpected_errors(self.events)


#: One text error line, as memcached words its error classes.
ERROR_LINE = {
    "ERROR": re.compile(rb"ERROR\r\n\Z"),
    "CLIENT_ERROR": re.compile(rb"CLIENT_ERROR [^\r\n]+\r\n\Z"),
    "SERVER_ERROR": re.compile(rb"SERVER_ERROR [^\r\n]+\r\n\Z"),
}


class Prediction(NamedTuple):
    """What the oracle and the twin expect a fuzzed connection to do with a stream."""

    reply: bytes
    closed: bool
    #: Whether a request that the stream executes deletes items by design.
    destructive: bool
    #: The oracle's framing, for failure messages.
    framing: str


class FuzzTestCase(SynchronousTestCase):
    """Checks that the fuzz modules share."""

    def check_fuzzed_stream(
        self,
        stream: bytes,
        cuts: list[int],
        predict: Callable[[FuzzServer, bytes], Prediction],
        check_fresh_connection: Callable[[FuzzServer], None],
    ) -> None:
        """
        Deliver ``stream`` cut at ``cuts`` to a fuzzed server, and check
        the replies, the items and a new connection against what
        ``predict`` gets from the oracle and a twin.
        """
        fuzzed = FuzzServer()
        twin = FuzzServer()
        with LogWatch() as watch:
            client = fuzzed.connect()
            reply = fuzzed.deliver(client, split(stream, cuts))
            prediction = predict(twin, stream)
        self.check_against_twin(stream, prediction, fuzzed, twin, reply, client.closed, watch)
        check_fresh_connection(fuzzed)

    def check_against_twin(
        self,
        stream: bytes,
        prediction: Prediction,
        fuzzed: FuzzServer,
        twin: FuzzServer,
        reply: bytes,
        closed: bool,
        watch: LogWatch,
    ) -> None:
        """
        Check a fuzzed connection's replies, its closed state and the
        fuzzed server's items against the prediction and the twin, and
        that the connection never reached its unexpected-error handler.
        """
        context = "stream %s, framed as %s" % (describe(stream), prediction.framing)
        self.assertEqual(watch.failures, [], context)
        self.assertEqual(reply, prediction.reply, context)
        self.assertEqual(closed, prediction.closed, context)
        self.assertEqual(fuzzed.items(), twin.items(), context)
        if not prediction.destructive:
            self.assertEqual(fuzzed.items()[KEPT_KEY].value, KEPT_VALUE, context)

    def replies_when_split(self, stream: bytes, chunks: list[bytes]) -> tuple[bytes, dict[bytes, Item], bool]:
        """Return the replies, the items and the closed state of a new server fed ``chunks``."""
        server = FuzzServer()
        with LogWatch() as watch:
            client = server.connect()
            reply = server.deliver(client, chunks)
        self.assertEqual(watch.failures, [], describe(stream))
        return reply, server.items(), client.closed

    def check_split_everywhere(self, stream: bytes) -> None:
        """
        Check that ``stream`` gets the same replies and leaves the same
        items whether it arrives in one read, in two reads split at any
        byte boundary, or one byte at a time.
        """
        whole = self.replies_when_split(stream, [stream])
        for cut in range(1, len(stream)):
            self.assertEqual(
                self.replies_when_split(stream, [stream[:cut], stream[cut:]]),
                whole,
                "stream %s split at %d" % (describe(stream), cut),
            )
        single_bytes = [stream[index : index + 1] for index in range(len(stream))]
        self.assertEqual(self.replies_when_split(stream, single_bytes), whole, describe(stream))
