"""
The meta-memcache client (PyPI ``meta-memcache``, which speaks only the
meta commands) against an in-process kvdaemon: its high-level operations
must round-trip.  The client blocks, so each operation runs in a thread
while the reactor serves it.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

from meta_memcache import (
    CacheClient,
    ConnectionPool,
    Key,
    LeasePolicy,
    RecachePolicy,
    RequestFlags,
    ServerAddress,
    SetMode,
    StalePolicy,
)
from twisted.internet import defer, reactor, task, threads
from twisted.trial.unittest import TestCase

from kvdaemon import Settings
from tests.support import start_server


class MetaMemcacheClientTests(TestCase):
    """meta-memcache's CacheClient talking to a kvdaemon on 127.0.0.1."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.service, port = yield start_server(self, Settings(threads=2))
        self.sockets: list[socket.socket] = []

        def connect() -> socket.socket:
            connection = socket.create_connection(("127.0.0.1", port), timeout=5)
            self.sockets.append(connection)
            return connection

        def make_pool(server: ServerAddress) -> ConnectionPool:
            return ConnectionPool(str(server), connect, initial_pool_size=0, max_pool_size=2)

        self.client = CacheClient.cache_client_from_servers(
            servers=[ServerAddress("127.0.0.1", port)],
            connection_pool_factory_fn=make_pool,
        )
        self.addCleanup(self.close_connections)

    @defer.inlineCallbacks
    def close_connections(self):
        for connection in self.sockets:
            connection.close()
        # Let the server see the clients leave before the test ends, so
        # that no connection outlives the test.
        factory = self.service.factory
        for _ in range(200):
            if not factory.connections:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        """Run a blocking client call in a thread."""
        return threads.deferToThread(function, *args, **kwargs)

    @defer.inlineCallbacks
    def test_set_get_delete(self):
        client = self.client
        self.assertTrue((yield self.call(client.set, "greeting", "hello", ttl=100)))
        self.assertEqual((yield self.call(client.get, "greeting")), "hello")
        self.assertTrue((yield self.call(client.delete, "greeting")))
        self.assertIsNone((yield self.call(client.get, "greeting")))
        self.assertFalse((yield self.call(client.delete, "greeting")))
        self.assertTrue((yield self.call(client.invalidate, "greeting")))

    @defer.inlineCallbacks
    def test_values_of_several_types(self):
        client = self.client
        values = {"text": "héllo", "number": 42, "blob": b"\x00\r\n\xff", "structure": {"a": [1, 2]}}
        for key, value in values.items():
            self.assertTrue((yield self.call(client.set, key, value, ttl=0)))
        for key, value in values.items():
            self.assertEqual((yield self.call(client.get, key)), value)

    @defer.inlineCallbacks
    def test_keys_sent_base64_encoded(self):
        # The client sends keys with spaces, non-ASCII characters or more
        # than 250 bytes in base64 with the b flag.
        client = self.client
        for key in ("with space", "ключ", "x" * 300):
            self.assertTrue((yield self.call(client.set, key, key.upper(), ttl=100)))
            self.assertEqual((yield self.call(client.get, key)), key.upper())
            self.assertTrue((yield self.call(client.delete, key)))

    @defer.inlineCallbacks
    def test_touch(self):
        client = self.client
        self.assertFalse((yield self.call(client.touch, "t", ttl=50)))
        yield self.call(client.set, "t", "v", ttl=0)
        self.assertTrue((yield self.call(client.touch, "t", ttl=50)))
        item = self.service.factory.store.get(b"t", bump=False)
        self.assertEqual(item.exptime, int(reactor.seconds()) + 50)

    @defer.inlineCallbacks
    def test_set_modes(self):
        client = self.client
        self.assertTrue((yield self.call(client.set, "m", "1", ttl=0, set_mode=SetMode.ADD)))
        self.assertFalse((yield self.call(client.set, "m", "2", ttl=0, set_mode=SetMode.ADD)))
        self.assertFalse((yield self.call(client.set, "absent", "2", ttl=0, set_mode=SetMode.REPLACE)))
        self.assertTrue((yield self.call(client.set, "m", "3", ttl=0, set_mode=SetMode.REPLACE)))
        self.assertEqual((yield self.call(client.get, "m")), "3")
        self.assertFalse((yield self.call(client.refill, "m", "4", ttl=0)))

    @defer.inlineCallbacks
    def test_compare_and_set(self):
        client = self.client
        cas = yield self.call(client.set_cas, "c", "v1", ttl=0)
        value, fetched_cas = yield self.call(client.get_cas, "c")
        self.assertEqual((value, fetched_cas), ("v1", cas))
        self.assertTrue((yield self.call(client.set, "c", "v2", ttl=0, cas_token=cas)))
        self.assertFalse((yield self.call(client.set, "c", "v3", ttl=0, cas_token=cas)))
        self.assertEqual((yield self.call(client.get, "c")), "v2")
        self.assertFalse((yield self.call(client.delete, "c", cas_token=cas)))

    @defer.inlineCallbacks
    def test_counters(self):
        client = self.client
        self.assertFalse((yield self.call(client.delta, "n", 1)))
        self.assertTrue((yield self.call(client.delta_initialize, "n", 1, initial_value=10, initial_ttl=100)))
        self.assertEqual((yield self.call(client.delta_and_get, "n", 5)), 15)
        self.assertEqual((yield self.call(client.delta_and_get, "n", -20)), 0)
        self.assertTrue((yield self.call(client.delta, "n", 7)))
        self.assertEqual((yield self.call(client.delta_initialize_and_get, "n2", 3, initial_value=1, initial_ttl=0)), 1)
        self.assertEqual((yield self.call(client.delta_initialize_and_get, "n2", 3, initial_value=1, initial_ttl=0)), 4)

    @defer.inlineCallbacks
    def test_multi_get(self):
        client = self.client
        yield self.call(client.set, "a", "1", ttl=0)
        yield self.call(client.set, "b", "2", ttl=0)
        results = yield self.call(client.multi_get, ["a", "b", "missing"])
        self.assertEqual({key.key: value for key, value in results.items()}, {"a": "1", "b": "2", "missing": None})

    @defer.inlineCallbacks
    def test_lease_on_miss(self):
        client = self.client
        policy = LeasePolicy(ttl=30, miss_retries=2, miss_retry_wait=0.01)
        # The first client wins the lease and gets a miss.  The next one
        # loses, retries and finds the value that the winner stored.
        value, cas = yield self.call(client.get_or_lease_cas, "lease", policy)
        self.assertIsNone(value)
        self.assertTrue((yield self.call(client.set, "lease", "filled", ttl=100, cas_token=cas)))
        self.assertEqual((yield self.call(client.get_or_lease, "lease", policy)), "filled")

    @defer.inlineCallbacks
    def test_lost_lease_waits_out_retries(self):
        client = self.client
        policy = LeasePolicy(ttl=30, miss_retries=2, miss_retry_wait=0.01)
        waits: list[float] = []
        self.assertIsNone((yield self.call(client.get_or_lease, "busy", policy)))
        self.assertIsNone((yield self.call(client.get_or_lease, "busy", policy, lease_wait_fn=waits.append)))
        self.assertEqual(len(waits), 1)

    @defer.inlineCallbacks
    def test_recache_win_when_ttl_low(self):
        client = self.client
        yield self.call(client.set, "r", "old", ttl=10)
        # The first reader inside the recache window wins the recache, which
        # the client reports as a miss.  Later readers get the old value.
        self.assertIsNone((yield self.call(client.get, "r", recache_policy=RecachePolicy(ttl=30))))
        self.assertEqual((yield self.call(client.get, "r", recache_policy=RecachePolicy(ttl=30))), "old")

    @defer.inlineCallbacks
    def test_stale_on_delete(self):
        client = self.client
        policy = StalePolicy(mark_stale_on_deletion_ttl=30)
        yield self.call(client.set, "s", "old", ttl=100)
        self.assertTrue((yield self.call(client.delete, "s", stale_policy=policy)))
        # One reader wins the recache of the stale value, and the others
        # get the stale value.
        self.assertIsNone((yield self.call(client.get, "s")))
        self.assertEqual((yield self.call(client.get, "s")), "old")

    @defer.inlineCallbacks
    def test_stale_write_with_older_cas(self):
        client = self.client
        policy = StalePolicy(mark_stale_on_cas_mismatch=True)
        cas = yield self.call(client.set_cas, "sw", "v1", ttl=100)
        yield self.call(client.set, "sw", "v2", ttl=100)
        # A write with the older CAS is stored, but marked stale.
        self.assertTrue((yield self.call(client.set, "sw", "v3", ttl=100, cas_token=cas, stale_policy=policy)))
        result = yield self.call(client.meta_get, Key("sw"), flags=RequestFlags(return_value=True))
        self.assertTrue(result.flags.stale)
