"""
The fuzz oracle over real TCP.  Corrupted classic text and binary
requests go to an in-process server on the real reactor.  They must get
the replies that the oracle and the twin predict and leave the same items
as the twin, and the server must keep serving new connections.

Hypothesis runs in a worker thread with blocking sockets, so the
reactor thread keeps serving.  The test reads and checks the server
through ``blockingCallFromThread``.  One server and one twin serve all the
examples, receiving the same streams in the same order, so that their
items and CAS values stay equal from one example to the next.
"""

from __future__ import annotations

import socket
import time

from hypothesis import given, strategies as st
from twisted.internet import reactor, threads
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from kvdaemon import Settings
from tests.fuzz_support import (
    KEPT_KEY,
    KEPT_VALUE,
    MAX_ITEM_SIZE,
    SEED_ITEMS,
    SEED_REQUESTS,
    FuzzServer,
    LogWatch,
    describe,
    fuzz_settings,
)
from tests.fuzz_text import classic_requests
from tests.support import send_and_read, start_server
from tests.test_fuzz_binary import BinaryFuzzTestCase, corrupted_streams as corrupted_binary_streams
from tests.test_fuzz_text import TextFuzzTestCase, corrupted_streams as corrupted_text_streams

#: Seconds a blocking socket call may take before the test fails.
TIMEOUT = 10.0


def receive(connection: socket.socket, length: int, until_close: bool) -> tuple[bytes, bool]:
    """
    Read ``length`` bytes, or until the server closes when ``until_close``.
    Return what arrived and whether the server closed the connection.
    """
    received = b""
    while len(received) < length or until_close:
        try:
            chunk = connection.recv(65536)
        except socket.timeout:
            # A server that should close but keeps the connection open
            # times out here and must not count as closed.
            return received, False
        except ConnectionResetError:
            return received, True
        if not chunk:
            return received, True
        received += chunk
    return received, False


def item_fields(items: dict) -> dict:
    """Return the fields of items that do not depend on the clock: value, flags and CAS."""
    return {key: (item.value, item.flags, item.cas) for key, item in items.items()}


class TcpFuzzTests(TextFuzzTestCase, BinaryFuzzTestCase, TestCase):
    """Corrupted requests over TCP to a server on the real reactor."""

    @inlineCallbacks
    def test_corrupted_requests_over_tcp(self):
        service, port = yield start_server(self, Settings(threads=1, max_item_size=MAX_ITEM_SIZE))
        self.factory = service.factory
        self.port = port
        self.twin = FuzzServer(now=time.time())
        self.destructive = False
        yield threads.deferToThread(self.seed)
        yield threads.deferToThread(self.run_examples)

    def seed(self) -> None:
        # The twin stored the same items when it was built.
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as connection:
            reply = send_and_read(connection, SEED_REQUESTS, b"STORED\r\n" * len(SEED_ITEMS))
        self.assertEqual(reply, b"STORED\r\n" * len(SEED_ITEMS))

    def run_examples(self) -> None:
        text = st.tuples(st.just("text"), corrupted_text_streams(classic_requests))
        binary = st.tuples(st.just("binary"), corrupted_binary_streams())

        @fuzz_settings(40)
        @given(st.one_of(text, binary))
        def check(example: tuple[str, bytes]) -> None:
            self.check_over_tcp(*example)

        check()

    def server_items(self) -> dict:
        """Return the server's live items, read on the reactor thread."""
        return threads.blockingCallFromThread(reactor, lambda: dict(self.factory.store.scan(None, None)))

    def check_over_tcp(self, protocol: str, stream: bytes) -> None:
        """Send ``stream`` on a new connection and check it against the oracle and the twin."""
        # Items that expire in a few seconds expire on both servers alike.
        self.twin.reactor.advance(max(0.0, time.time() - self.twin.reactor.seconds()))
        with LogWatch() as watch:
            if protocol == "text":
                prediction = self.predict_text(self.twin, stream)
            else:
                prediction = self.predict_binary(self.twin, stream)
            self.destructive = self.destructive or prediction.destructive
            with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as connection:
                connection.sendall(stream)
                reply, closed = receive(connection, len(prediction.reply), prediction.closed)
            self.wait_for_connections_to_close()
        context = "%s stream %s, framed as %s" % (protocol, describe(stream), prediction.framing)
        self.assertEqual(watch.failures, [], context)
        self.assertEqual(reply, prediction.reply, context)
        self.assertEqual(closed, prediction.closed, context)
        self.assertEqual(item_fields(self.server_items()), item_fields(self.twin.items()), context)
        if not self.destructive:
            self.assertEqual(self.server_items()[KEPT_KEY].value, KEPT_VALUE, context)
        self.check_fresh_tcp_connection()

    def wait_for_connections_to_close(self) -> None:
        """
        Wait until the server has seen every client connection close, so
        that it has executed every request the client sent.
        """
        deadline = time.monotonic() + TIMEOUT
        while threads.blockingCallFromThread(reactor, lambda: len(self.factory.connections)):
            self.assertLess(time.monotonic(), deadline, "the server kept a closed client's connection open")
            time.sleep(0.005)

    def check_fresh_tcp_connection(self) -> None:
        request = b"set !fresh 3 0 2\r\nok\r\nget !fresh\r\n"
        expected = b"STORED\r\nVALUE !fresh 3 2\r\nok\r\nEND\r\n"
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as connection:
            self.assertEqual(send_and_read(connection, request, b"END\r\n"), expected)
        # The twin gets the same request, so that the stores stay equal.
        self.assertEqual(self.twin.connect().send(request), expected)
        self.wait_for_connections_to_close()
