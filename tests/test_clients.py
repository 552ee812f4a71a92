"""
Real memcached clients against an in-process kvdaemon: pymemcache and
python-memcached round-trip every classic text command.

The clients block, so each test's client code runs in a thread
(``deferToThread``) while the reactor serves the in-process server.
"""

from __future__ import annotations

import time

import memcache
from pymemcache.client.base import Client as PymemcacheClient
from pymemcache.exceptions import MemcacheClientError, MemcacheIllegalInputError, MemcacheServerError
from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from kvdaemon import Settings
from kvdaemon._version import PROTOCOL_VERSION
from tests.support import start_server

#: A 250-byte key, the longest memcached accepts.
LONG_KEY = "k" * 250


class ClientTestCase(TestCase):
    """An in-process kvdaemon on a free port of 127.0.0.1."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.service, self.port = yield start_server(self, Settings(threads=2, max_item_size=64 * 1024))

    def in_thread(self, function, *args):
        """Run blocking client code in a thread; return its Deferred."""
        return threads.deferToThread(function, *args)


class PymemcacheTests(ClientTestCase):
    """pymemcache's base client, with and without noreply."""

    def client(self, **kwargs) -> PymemcacheClient:
        client = PymemcacheClient(("127.0.0.1", self.port), timeout=10, connect_timeout=10, **kwargs)
        self.addCleanup(client.close)
        return client

    def test_storage_commands(self):
        client = self.client(default_noreply=False)

        def run():
            self.assertTrue(client.set("k", b"v1", flags=7))
            self.assertEqual(client.get("k"), b"v1")
            self.assertFalse(client.add("k", b"v2"))
            self.assertTrue(client.add("new", b"n"))
            self.assertTrue(client.replace("k", b"v3"))
            self.assertFalse(client.replace("missing", b"x"))
            self.assertTrue(client.append("k", b">"))
            self.assertTrue(client.prepend("k", b"<"))
            self.assertFalse(client.append("missing", b"x"))
            self.assertEqual(client.get("k"), b"<v3>")
            self.assertEqual(client.get_many(["k", "new", "missing"]), {"k": b"<v3>", "new": b"n"})

        return self.in_thread(run)

    def test_storage_noreply(self):
        client = self.client(default_noreply=True)

        def run():
            self.assertTrue(client.set("k", b"v1"))
            self.assertTrue(client.add("k", b"ignored"))
            self.assertTrue(client.append("k", b"!"))
            self.assertEqual(client.set_many({"a": b"1", "b": b"2"}), [])
            self.assertEqual(client.get_many(["k", "a", "b"]), {"k": b"v1!", "a": b"1", "b": b"2"})
            self.assertTrue(client.delete("a"))
            self.assertIsNone(client.incr("b", 5, noreply=True))
            self.assertTrue(client.touch("b", 100))
            self.assertEqual(client.get_many(["a", "b"]), {"b": b"7"})

        return self.in_thread(run)

    def test_cas(self):
        client = self.client(default_noreply=False)

        def run():
            self.assertIsNone(client.cas("k", b"x", b"1"))
            client.set("k", b"old")
            value, unique = client.gets("k")
            self.assertEqual(value, b"old")
            self.assertFalse(client.cas("k", b"new", str(int(unique) + 1)))
            self.assertTrue(client.cas("k", b"new", unique))
            self.assertFalse(client.cas("k", b"newer", unique))
            self.assertEqual(client.get("k"), b"new")
            many = client.gets_many(["k", "missing"])
            self.assertEqual(list(many), ["k"])
            self.assertEqual(many["k"][0], b"new")
            self.assertNotEqual(many["k"][1], unique)

        return self.in_thread(run)

    def test_gat_gats(self):
        client = self.client(default_noreply=False)

        def run():
            client.set("k", b"value", flags=3)
            # raw_command returns the reply without its end token.
            self.assertEqual(client.raw_command("gat 100 k missing", b"END\r\n"), b"VALUE k 3 5\r\nvalue\r\n")
            reply = client.raw_command("gats 0 k", b"END\r\n")
            self.assertTrue(reply.startswith(b"VALUE k 3 5 "), reply)
            self.assertEqual(client.gets("k")[1], reply.split(b"\r\n")[0].split()[4])

        return self.in_thread(run)

    def test_delete(self):
        client = self.client(default_noreply=False)

        def run():
            client.set("k", b"v")
            self.assertTrue(client.delete("k"))
            self.assertFalse(client.delete("k"))
            self.assertIsNone(client.get("k"))
            client.set_many({"a": b"1", "b": b"2"})
            self.assertTrue(client.delete_many(["a", "b", "c"]))
            self.assertEqual(client.get_many(["a", "b"]), {})

        return self.in_thread(run)

    def test_incr_decr(self):
        client = self.client(default_noreply=False)

        def run():
            self.assertIsNone(client.incr("n", 1))
            client.set("n", b"10")
            self.assertEqual(client.incr("n", 5), 15)
            self.assertEqual(client.decr("n", 20), 0)
            client.set("n", b"18446744073709551615")
            self.assertEqual(client.incr("n", 2), 1)
            client.set("n", b"text")
            with self.assertRaises(MemcacheClientError):
                client.incr("n", 1)

        return self.in_thread(run)

    def test_touch_and_expiry(self):
        client = self.client(default_noreply=False)

        def run():
            self.assertFalse(client.touch("k", 10))
            client.set("k", b"v", expire=100)
            self.assertTrue(client.touch("k", -1))
            self.assertIsNone(client.get("k"))
            client.set("gone", b"v", expire=-1)
            self.assertIsNone(client.get("gone"))
            client.set("later", b"v", expire=int(time.time()) + 1000)
            self.assertEqual(client.get("later"), b"v")

        return self.in_thread(run)

    def test_flush_all(self):
        client = self.client(default_noreply=False)

        def run():
            client.set("k", b"v")
            self.assertTrue(client.flush_all(delay=100))
            self.assertEqual(client.get("k"), b"v")
            self.assertTrue(client.flush_all())
            self.assertIsNone(client.get("k"))
            client.set("k", b"v")
            self.assertTrue(client.flush_all(noreply=True))
            self.assertIsNone(client.get("k"))

        return self.in_thread(run)

    def test_version_verbosity_quit(self):
        client = self.client(default_noreply=False)

        def run():
            self.assertEqual(client.version(), PROTOCOL_VERSION)
            self.assertEqual(client.raw_command("verbosity 1"), b"OK")
            client.quit()
            self.assertEqual(client.version(), PROTOCOL_VERSION)

        return self.in_thread(run)

    def test_stats(self):
        client = self.client(default_noreply=False)

        def run():
            client.set("k", b"v")
            client.get("k")
            client.get("missing")
            stats = client.stats()
            self.assertEqual(stats[b"get_hits"], 1)
            self.assertEqual(stats[b"get_misses"], 1)
            self.assertEqual(stats[b"curr_items"], 1)
            self.assertEqual(stats[b"version"], PROTOCOL_VERSION)
            settings = client.stats("settings")
            self.assertEqual(settings[b"item_size_max"], 64 * 1024)
            conns = client.stats("conns")
            self.assertEqual(len([name for name in conns if name.endswith(b":addr")]), 1)
            self.assertEqual(client.raw_command("stats reset", b"RESET\r\n"), b"")
            self.assertEqual(client.stats()[b"get_hits"], 0)

        return self.in_thread(run)

    def test_key_and_value_limits(self):
        client = self.client(default_noreply=False)

        def run():
            self.assertTrue(client.set(LONG_KEY, b"v"))
            self.assertEqual(client.get(LONG_KEY), b"v")
            with self.assertRaises(MemcacheIllegalInputError):
                client.set(LONG_KEY + "k", b"v")
            client.set("big", b"old")
            with self.assertRaises(MemcacheServerError):
                client.set("big", b"x" * (64 * 1024))
            self.assertIsNone(client.get("big"))
            self.assertTrue(client.set("binary", bytes(range(256)) * 4))
            self.assertEqual(client.get("binary"), bytes(range(256)) * 4)

        return self.in_thread(run)


class PythonMemcachedTests(ClientTestCase):
    """python-memcached (the ``memcache`` module)."""

    def client(self, **kwargs) -> memcache.Client:
        client = memcache.Client(["127.0.0.1:%d" % self.port], socket_timeout=10, **kwargs)
        self.addCleanup(client.disconnect_all)
        return client

    def test_storage_commands(self):
        client = self.client()

        def run():
            self.assertTrue(client.set("k", "text"))
            self.assertEqual(client.get("k"), "text")
            self.assertFalse(client.add("k", "other"))
            self.assertTrue(client.add("new", b"bytes"))
            self.assertTrue(client.replace("k", "v3"))
            self.assertFalse(client.replace("missing", "x"))
            self.assertTrue(client.append("k", ">"))
            self.assertTrue(client.prepend("k", "<"))
            self.assertEqual(client.get("k"), "<v3>")
            self.assertEqual(client.get_multi(["k", "new", "missing"]), {"k": "<v3>", "new": b"bytes"})
            self.assertEqual(client.set_multi({"a": 1, "b": 2}), [])
            self.assertEqual(client.get_multi(["a", "b"]), {"a": 1, "b": 2})

        return self.in_thread(run)

    def test_flags_round_trip_types(self):
        client = self.client()
        values = {"int": 42, "long": 2**70, "str": "text", "bytes": b"\x00\xff", "dict": {"a": [1, 2]}}

        def run():
            for key, value in values.items():
                self.assertTrue(client.set(key, value), key)
            for key, value in values.items():
                self.assertEqual(client.get(key), value, key)

        return self.in_thread(run)

    def test_noreply(self):
        client = self.client()

        def run():
            client.set("k", "1", noreply=True)
            client.append("k", "2", noreply=True)
            client.incr("k", 10, noreply=True)
            client.touch("k", 100, noreply=True)
            client.set("gone", "x")
            client.delete("gone", noreply=True)
            self.assertEqual(client.get_multi(["k", "gone"]), {"k": "22"})

        return self.in_thread(run)

    def test_cas(self):
        client = self.client(cache_cas=True)

        def run():
            client.set("k", "old")
            self.assertEqual(client.gets("k"), "old")
            other = memcache.Client(["127.0.0.1:%d" % self.port], socket_timeout=10)
            try:
                other.set("k", "changed")
            finally:
                other.disconnect_all()
            self.assertFalse(client.cas("k", "mine"))
            self.assertEqual(client.gets("k"), "changed")
            self.assertTrue(client.cas("k", "mine"))
            self.assertEqual(client.get("k"), "mine")

        return self.in_thread(run)

    def test_delete_incr_decr_touch(self):
        client = self.client()

        def run():
            client.set("n", "5")
            self.assertEqual(client.incr("n", 10), 15)
            self.assertEqual(client.decr("n", 100), 0)
            self.assertIsNone(client.incr("missing"))
            self.assertTrue(client.touch("n", 100))
            self.assertFalse(client.touch("missing", 100))
            self.assertTrue(client.delete("n"))
            self.assertIsNone(client.get("n"))
            client.set_multi({"a": 1, "b": 2})
            self.assertTrue(client.delete_multi(["a", "b"]))
            self.assertEqual(client.get_multi(["a", "b"]), {})

        return self.in_thread(run)

    def test_flush_all_and_stats(self):
        client = self.client()

        def run():
            client.set("k", "v")
            client.get("k")
            [(_, stats)] = client.get_stats()
            self.assertEqual(stats["curr_items"], "1")
            self.assertEqual(stats["get_hits"], "1")
            [(_, settings)] = client.get_stats("settings")
            self.assertEqual(settings["cas_enabled"], "yes")
            [(_, conns)] = client.get_stats("conns")
            self.assertTrue(any(name.endswith(":state") for name in conns))
            client.flush_all()
            self.assertIsNone(client.get("k"))

        return self.in_thread(run)

    def test_key_limit(self):
        client = self.client()

        def run():
            self.assertTrue(client.set(LONG_KEY, "v"))
            self.assertEqual(client.get(LONG_KEY), "v")
            with self.assertRaises(memcache.Client.MemcachedKeyLengthError):
                client.set(LONG_KEY + "k", "v")

        return self.in_thread(run)

    def test_quit(self):
        client = self.client()

        def run():
            client.set("k", "v")
            client.quit_all()
            self.assertEqual(client.get("k"), "v")

        return self.in_thread(run)
