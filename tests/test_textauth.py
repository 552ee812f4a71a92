"""
Tests for text-protocol authentication (``--auth-file``, memcached's
``-Y``): the gate before authentication, the handover to the ordinary
text handler, and the replies compared with a real memcached started with
an authentication file.
"""

from __future__ import annotations

import os
import socket
import tempfile

import pymemcache
from pymemcache.exceptions import MemcacheClientError
from twisted.internet import defer, threads
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from kvdaemon import KVDaemonFactory, Settings
from kvdaemon._textauth import MAX_CREDENTIALS_LENGTH, credentials_match
from tests.support import Client, FakeReactor, FakeThreadPool, MemcachedProcess, start_server

USERS = {b"alice": b"secret", b"bob": b"pw2"}
LOGIN = b"set auth 0 0 12\r\nalice secret\r\n"
UNAUTHENTICATED = b"CLIENT_ERROR unauthenticated\r\n"

#: Requests that must all be rejected before authentication.
GUARDED_REQUESTS = [
    b"get kept\r\n",
    b"gets kept\r\n",
    b"version\r\n",
    b"stats\r\n",
    b"flush_all\r\n",
    b"delete kept\r\n",
    b"incr counter 1\r\n",
    b"touch kept 10\r\n",
    b"mg kept v\r\n",
    b"md kept\r\n",
    b"mn\r\n",
    b"quit\r\n",
    b"rget 1 1 0 a\r\n",
    b"rdelete 1 1 0 a\r\n",
    b"lru_crawler metadump all\r\n",
    b"\r\n",
    b"add kept 0 0 12\r\n",
    b"set kept 0 0\r\n",
    b"set kept 0 0 many\r\n",
    b"GET / HTTP/1.1\r\n",
]


def make_factory(**overrides: object) -> KVDaemonFactory:
    reactor = FakeReactor()
    settings = Settings(threads=1, auth_users=USERS, **overrides)
    factory = KVDaemonFactory(settings, reactor=reactor, threadpool=FakeThreadPool())
    factory.store.store("set", b"kept", b"safe", 5, 0)
    return factory


class CredentialsMatchTests(SynchronousTestCase):
    def test_known_user_right_password(self) -> None:
        self.assertTrue(credentials_match(USERS, b"alice", b"secret"))

    def test_known_user_wrong_password(self) -> None:
        self.assertFalse(credentials_match(USERS, b"alice", b"secreT"))
        self.assertFalse(credentials_match(USERS, b"alice", b"secret2"))
        self.assertFalse(credentials_match(USERS, b"alice", b"pw2"))

    def test_unknown_user(self) -> None:
        self.assertFalse(credentials_match(USERS, b"carol", b"secret"))


class AuthenticationGateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.factory = make_factory()
        self.client = Client(self.factory)

    def test_requests_rejected_before_login(self) -> None:
        for request in GUARDED_REQUESTS:
            self.assertEqual(self.client.send(request), UNAUTHENTICATED, request)
        self.assertFalse(self.client.closed)
        self.assertEqual(self.factory.store.get(b"kept").value, b"safe")
        self.assertEqual(self.factory.stats.cmd_get, 0)
        self.assertEqual(self.factory.stats.cmd_flush, 0)

    def test_login_then_commands_served(self) -> None:
        self.assertEqual(self.client.send(LOGIN), b"STORED\r\n")
        self.assertEqual(self.client.send(b"get kept auth\r\n"), b"VALUE kept 5 4\r\nsafe\r\nEND\r\n")
        self.assertEqual(self.client.send(b"set new 0 0 1\r\nx\r\n"), b"STORED\r\n")
        self.assertEqual(self.factory.stats.auth_cmds, 1)
        self.assertEqual(self.factory.stats.auth_errors, 0)

    def test_login_key_not_stored(self) -> None:
        self.client.send(LOGIN)
        self.assertIsNone(self.factory.store.get(b"auth"))

    def test_login_and_requests_in_one_read(self) -> None:
        reply = self.client.send(b"get kept\r\n" + LOGIN + b"get kept\r\nversion\r\n")
        self.assertEqual(reply, UNAUTHENTICATED + b"STORED\r\nVALUE kept 5 4\r\nsafe\r\nEND\r\nVERSION 1.6.18\r\n")

    def test_login_split_at_every_byte(self) -> None:
        data = LOGIN + b"get kept\r\n"
        reply = self.client.send_chunks([data[i : i + 1] for i in range(len(data))])
        self.assertEqual(reply, b"STORED\r\nVALUE kept 5 4\r\nsafe\r\nEND\r\n")

    def test_wrong_password_fails(self) -> None:
        reply = self.client.send(b"set auth 0 0 12\r\nalice secreT\r\nget kept\r\n")
        self.assertEqual(reply, b"CLIENT_ERROR authentication failure\r\n" + UNAUTHENTICATED)
        self.assertEqual(self.factory.stats.auth_cmds, 1)
        self.assertEqual(self.factory.stats.auth_errors, 1)

    def test_unknown_user_fails(self) -> None:
        self.assertEqual(self.client.send(b"set auth 0 0 12\r\ncarol secret\r\n"), b"CLIENT_ERROR authentication failure\r\n")

    def test_retry_after_failure_succeeds(self) -> None:
        self.client.send(b"set auth 0 0 10\r\nalice nope\r\n")
        self.assertEqual(self.client.send(b"set auth 0 0 7\r\nbob pw2\r\n"), b"STORED\r\n")
        self.assertEqual(self.client.send(b"mn\r\n"), b"MN\r\n")

    def test_extra_spaces_and_tokens_ignored(self) -> None:
        # memcached splits the block on spaces and reads the first two tokens.
        self.assertEqual(self.client.send(b"set auth 0 0 20\r\n  alice secret extra\r\n"), b"STORED\r\n")

    def test_noreply_login_still_replies(self) -> None:
        self.assertEqual(self.client.send(b"set auth 0 0 12 noreply\r\nalice secret\r\n"), b"STORED\r\n")

    def test_bad_termination_rejected(self) -> None:
        reply = self.client.send(b"set auth 0 0 11\r\nalice secret\r\n")
        self.assertEqual(reply, b"CLIENT_ERROR bad command line termination\r\n" + UNAUTHENTICATED)

    def test_single_token_rejected(self) -> None:
        reply = self.client.send(b"set auth 0 0 5\r\nalice\r\n")
        self.assertEqual(reply, b"CLIENT_ERROR bad authentication token format\r\n")
        self.assertEqual(self.factory.stats.auth_cmds, 0)

    def test_long_line_closes(self) -> None:
        self.assertEqual(self.client.send(b"g" * 2049), b"")
        self.assertTrue(self.client.closed)

    def test_oversized_login_closes(self) -> None:
        reply = self.client.send(b"set auth 0 0 %d\r\n" % (MAX_CREDENTIALS_LENGTH + 1))
        self.assertEqual(reply, b"")
        self.assertTrue(self.client.closed)

    def test_largest_login_block_read(self) -> None:
        block = b"alice secret " + b"x" * (MAX_CREDENTIALS_LENGTH - 13)
        reply = self.client.send(b"set auth 0 0 %d\r\n%s\r\n" % (len(block), block))
        self.assertEqual(reply, b"STORED\r\n")

    def test_binary_request_gets_no_reply(self) -> None:
        # A binary get header contains no newline byte, so the gate waits for one.
        header = b"\x80\x00" + b"\x00" * 22
        self.assertEqual(self.client.send(header), b"")
        self.assertFalse(self.client.closed)

    def test_add_is_not_a_login(self) -> None:
        reply = self.client.send(b"add auth 0 0 12\r\nalice secret\r\nmn\r\n")
        self.assertEqual(reply, UNAUTHENTICATED * 3)

    def test_failure_logged_once_with_peer(self) -> None:
        with capturedLogs() as events:
            self.client.send(b"set auth 0 0 12\r\nalice secreT\r\n")
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["log_level"], LogLevel.warn)
        self.assertEqual(events[0]["peer"], "tcp:127.0.0.1:40000")
        self.assertNotIn(b"secreT", repr(events[0]).encode())

    def test_rejection_logged_once_with_peer(self) -> None:
        with capturedLogs() as events:
            self.client.send(b"get kept\r\n")
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["peer"], "tcp:127.0.0.1:40000")

    def test_sasl_takes_precedence(self) -> None:
        factory = make_factory(sasl_users={b"alice": b"secret"})
        client = Client(factory)
        # SASL makes the connection binary, so a text request gets no reply.
        self.assertEqual(client.send(b"get kept\r\n"), b"")

    def test_settings_stats_show_auth(self) -> None:
        self.client.send(LOGIN)
        self.assertIn(b"STAT auth_enabled_ascii yes\r\n", self.client.send(b"stats settings\r\n"))


def write_auth_file(testcase: TestCase) -> str:
    fd, path = tempfile.mkstemp(suffix=".auth")
    with os.fdopen(fd, "wb") as f:
        f.write(b"".join(b"%s:%s\n" % pair for pair in USERS.items()))
    testcase.addCleanup(os.remove, path)
    return path


def step_through(port: int, steps: list[bytes]) -> list[bytes]:
    """Send each step on one connection and collect its reply, waiting for each before the next."""
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        for step in steps:
            connection.sendall(step)
            connection.settimeout(5)
            reply = connection.recv(65536)
            connection.settimeout(0.2)
            try:
                while True:
                    more = connection.recv(65536)
                    if not more:
                        break
                    reply += more
            except socket.timeout:
                pass
            replies.append(reply)
    return replies


class AuthReferenceTests(TestCase):
    """kvdaemon with ``auth_users`` against ``memcached -Y``."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.memcached = MemcachedProcess("-Y", write_auth_file(self))
        self.addCleanup(self.memcached.stop)
        _, self.port = yield start_server(self, Settings(threads=2, auth_users=USERS))

    @defer.inlineCallbacks
    def test_replies_match_memcached(self):
        # One request per step, because memcached 1.6.18 replies only to the
        # first request of each read until the connection has authenticated.
        steps = [
            b"get foo\r\n",
            b"version\r\n",
            b"\r\n",
            b"mg foo v\r\n",
            b"set auth 0 0 12\r\nalice secreT\r\n",
            b"set auth 0 0 12\r\ncarol secret\r\n",
            b"set auth 0 0 5\r\nalice\r\n",
            b"set auth 0 0 12\r\nalice secretX\n",
            b"set auth 0 0 20\r\n  alice secret extra\r\n",
            b"set x 0 0 1\r\ny\r\n",
            b"get x\r\n",
            b"version\r\n",
        ]
        reference = yield threads.deferToThread(step_through, self.memcached.port, steps)
        ours = yield threads.deferToThread(step_through, self.port, steps)
        for step, theirs, mine in zip(steps, reference, ours):
            self.assertEqual(mine, theirs, step)
        self.assertEqual(ours[-2:], [b"VALUE x 0 1\r\ny\r\nEND\r\n", b"VERSION 1.6.18\r\n"])

    @defer.inlineCallbacks
    def test_auth_stats_match_memcached(self):
        steps = [b"set auth 0 0 10\r\nalice nope\r\n", LOGIN, b"stats\r\n"]
        reference = yield threads.deferToThread(step_through, self.memcached.port, steps)
        ours = yield threads.deferToThread(step_through, self.port, steps)
        for line in [b"STAT auth_cmds 2\r\n", b"STAT auth_errors 1\r\n"]:
            self.assertIn(line, reference[-1])
            self.assertIn(line, ours[-1])


class AuthClientTests(TestCase):
    """A real client (pymemcache) authenticating the way memcached documents."""

    timeout = 60

    @defer.inlineCallbacks
    def test_pymemcache_login_and_round_trip(self):
        _, port = yield start_server(self, Settings(threads=2, auth_users=USERS))

        def use_client() -> tuple[bool, bytes | None, dict[bytes, bytes]]:
            client = pymemcache.Client(("127.0.0.1", port), timeout=5)
            try:
                # pymemcache sends sets with noreply by default, but the
                # login reply must be read before the next request.
                logged_in = client.set("auth", b"bob pw2", noreply=False)
                client.set("k1", b"v1")
                client.set("k2", b"v2")
                return logged_in, client.get("k1"), client.get_many(["k1", "k2"])
            finally:
                client.close()

        logged_in, value, values = yield threads.deferToThread(use_client)
        self.assertTrue(logged_in)
        self.assertEqual(value, b"v1")
        self.assertEqual(values, {"k1": b"v1", "k2": b"v2"})

    @defer.inlineCallbacks
    def test_pymemcache_without_login_rejected(self):
        _, port = yield start_server(self, Settings(threads=2, auth_users=USERS))

        def use_client() -> None:
            client = pymemcache.Client(("127.0.0.1", port), timeout=5)
            try:
                client.get("k1")
            finally:
                client.close()

        failure = yield self.assertFailure(threads.deferToThread(use_client), MemcacheClientError)
        self.assertIn(b"unauthenticated", str(failure).encode())
