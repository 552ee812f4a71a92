"""
python-binary-memcached (``bmemcached``) against an in-process kvdaemon:
every operation the client offers round-trips, and SASL PLAIN works with
right credentials and fails with wrong or missing ones.  The blocking
client runs in threads so the server's reactor keeps running.
"""

from __future__ import annotations

import bmemcached
from bmemcached.exceptions import MemcachedException
from twisted.internet import defer, reactor, task, threads
from twisted.trial.unittest import TestCase

from kvdaemon import Settings
from tests.binary_packets import converse
from tests.support import start_server

USERS = {b"alice": b"secret"}


class ClientTestCase(TestCase):
    """An in-process kvdaemon and a way to run bmemcached scenarios against it."""

    timeout = 60
    settings = Settings(threads=2)

    @defer.inlineCallbacks
    def setUp(self):
        self.service, self.port = yield start_server(self, self.settings)

    def run_client(self, scenario, **credentials) -> defer.Deferred:
        """
        Run ``scenario(client)`` in a thread with a new client and close the
        client there, since bmemcached keeps its sockets per thread.  Fire
        with the scenario's result once the server has seen the client go.
        """

        def run():
            client = bmemcached.Client(("127.0.0.1:%d" % self.port,), socket_timeout=5, **credentials)
            try:
                return scenario(client)
            finally:
                client.disconnect_all()

        d = threads.deferToThread(run)
        d.addBoth(self._after_disconnect)
        return d

    @defer.inlineCallbacks
    def _after_disconnect(self, result):
        factory = self.service.factory
        for _ in range(500):
            if not factory.connections:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        return result


class BmemcachedTests(ClientTestCase):
    @defer.inlineCallbacks
    def test_set_get_types(self):
        values = {"text": "héllo", "number": 42, "raw": b"\x00\xff", "object": {"a": [1, 2]}}

        def round_trip(client):
            stored = {key: client.set(key, value) for key, value in values.items()}
            return stored, {key: client.get(key) for key in values}

        stored, fetched = yield self.run_client(round_trip)
        self.assertEqual(stored, {key: True for key in values})
        self.assertEqual(fetched, values)

    @defer.inlineCallbacks
    def test_get_missing_default(self):
        value = yield self.run_client(lambda client: client.get("missing", "fallback"))
        self.assertEqual(value, "fallback")

    @defer.inlineCallbacks
    def test_get_multi(self):
        def scenario(client):
            client.set("a", "1")
            client.set("b", "2")
            return client.get_multi(["a", "b", "missing"])

        self.assertEqual((yield self.run_client(scenario)), {"a": "1", "b": "2"})

    @defer.inlineCallbacks
    def test_set_multi(self):
        def scenario(client):
            failed = client.set_multi({"m1": "x", "m2": "y"})
            return failed, client.get("m1"), client.get("m2")

        failed, first, second = yield self.run_client(scenario)
        self.assertFalse(failed)
        self.assertEqual((first, second), ("x", "y"))

    @defer.inlineCallbacks
    def test_add_and_replace(self):
        def scenario(client):
            return (
                client.replace("r", "no"),
                client.add("r", "first"),
                client.add("r", "second"),
                client.replace("r", "third"),
                client.get("r"),
            )

        self.assertEqual((yield self.run_client(scenario)), (False, True, False, True, "third"))

    @defer.inlineCallbacks
    def test_gets_and_cas(self):
        def scenario(client):
            client.set("c", "v1")
            value, cas = client.gets("c")
            swapped = client.cas("c", "v2", cas)
            stale = client.cas("c", "v3", cas)
            return value, cas, swapped, stale, client.get("c")

        value, cas, swapped, stale, final = yield self.run_client(scenario)
        self.assertEqual(value, "v1")
        self.assertNotEqual(cas, 0)
        self.assertTrue(swapped)
        self.assertFalse(stale)
        self.assertEqual(final, "v2")

    @defer.inlineCallbacks
    def test_delete_and_delete_multi(self):
        def scenario(client):
            client.set_multi({"d1": "x", "d2": "y", "d3": "z"})
            first = client.delete("d1")
            again = client.delete("d1")
            multi = client.delete_multi(["d2", "d3"])
            return first, again, multi, client.get_multi(["d1", "d2", "d3"])

        # bmemcached's delete returns True for a missing key too.
        first, again, multi, remaining = yield self.run_client(scenario)
        self.assertTrue(first)
        self.assertTrue(again)
        self.assertTrue(multi)
        self.assertEqual(remaining, {})

    @defer.inlineCallbacks
    def test_delete_with_cas(self):
        def scenario(client):
            client.set("dc", "x")
            _, cas = client.gets("dc")
            wrong = client.delete("dc", cas + 1)
            right = client.delete("dc", cas)
            return wrong, right

        self.assertEqual((yield self.run_client(scenario)), (False, True))

    @defer.inlineCallbacks
    def test_incr_and_decr(self):
        def scenario(client):
            return (
                client.incr("n", 1, default=10),
                client.incr("n", 5),
                client.decr("n", 3),
                client.decr("n", 100),
                client.decr("fresh", 1, default=7),
            )

        self.assertEqual((yield self.run_client(scenario)), (10, 15, 12, 0, 7))

    @defer.inlineCallbacks
    def test_flush_all(self):
        def scenario(client):
            client.set("f", "x")
            flushed = client.flush_all()
            return flushed, client.get("f")

        self.assertEqual((yield self.run_client(scenario)), (True, None))

    @defer.inlineCallbacks
    def test_stats(self):
        def scenario(client):
            client.set("s", "x")
            client.get("s")
            return client.stats(), client.stats("settings")

        general, settings = yield self.run_client(scenario)
        (server_stats,) = general.values()
        self.assertEqual(server_stats["version"], b"1.6.18")
        self.assertEqual(server_stats["cmd_get"], b"1")
        self.assertEqual(server_stats["cmd_set"], b"1")
        (server_settings,) = settings.values()
        self.assertEqual(server_settings["item_size_max"], b"%d" % self.settings.max_item_size)


class SaslClientTests(ClientTestCase):
    settings = Settings(threads=2, sasl_users=USERS)

    @defer.inlineCallbacks
    def test_right_credentials_work(self):
        def scenario(client):
            stored = client.set("k", "v")
            return stored, client.get("k")

        result = yield self.run_client(scenario, username="alice", password="secret")
        self.assertEqual(result, (True, "v"))
        stats = self.service.factory.stats
        self.assertEqual((stats.auth_cmds, stats.auth_errors), (1, 0))

    @defer.inlineCallbacks
    def test_wrong_credentials_fail(self):
        stored = self.run_client(lambda client: client.set("k", "v"), username="alice", password="wrong")
        error = yield self.assertFailure(stored, MemcachedException)
        self.assertEqual(error.code, 0x20)
        stats = self.service.factory.stats
        self.assertEqual((stats.auth_cmds, stats.auth_errors), (1, 1))
        self.assertEqual(len(self.service.factory.store), 0)

    @defer.inlineCallbacks
    def test_unauthenticated_request_auth_error(self):
        error = yield self.assertFailure(self.run_client(lambda client: client.get("k")), MemcachedException)
        self.assertEqual(error.code, 0x20)

    @defer.inlineCallbacks
    def test_text_connection_refused(self):
        short = yield threads.deferToThread(converse, self.port, b"version\r\n")
        self.assertEqual(short, (b"", False))
        long = yield threads.deferToThread(converse, self.port, b"get a b c d e f g h i j k\r\n", None, 3.0)
        self.assertEqual(long, (b"", True))
