"""
Tests for kvdaemon.testing: the in-memory server that programs using
kvdaemon can test against without sockets or threads.
"""

from __future__ import annotations

import unittest

from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase

from kvdaemon import Settings
from kvdaemon.testing import START_TIME, MemoryKVDaemon


class _TextClient(Protocol):
    """Collects what the server sends."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class MemoryKVDaemonTests(SynchronousTestCase):
    def test_client_set_then_get(self) -> None:
        server = MemoryKVDaemon()
        client = server.connect()

        stored = client.set(b"greeting", b"hello", flags=3)
        fetched = client.get(b"greeting")
        server.flush()

        self.successResultOf(stored)
        record = self.successResultOf(fetched)
        self.assertEqual(record.value, b"hello")
        self.assertEqual(record.flags, 3)
        self.assertEqual(server.store.get(b"greeting").value, b"hello")

    def test_range_get_streams_through_worker_steps(self) -> None:
        server = MemoryKVDaemon(Settings(stream_buffer=4096))
        for number in range(300):
            server.store.store("set", b"key%04d" % number, b"v" * 50, 0, 0)
        client = server.connect()
        records = []

        done = client.range_get(b"key0100", b"key0200", records.append)
        server.flush()

        self.assertEqual(self.successResultOf(done), 100)
        self.assertEqual([record.key for record in records], [b"key%04d" % number for number in range(100, 200)])

    def test_resumable_scan_completes(self) -> None:
        server = MemoryKVDaemon()
        for number in range(50):
            server.store.store("set", b"s%03d" % number, b"x", 0, 0)
        client = server.connect()
        keys = []

        done = client.scan(b"s", None, lambda record: keys.append(record.key), item_limit=7)
        server.flush()

        self.assertEqual(self.successResultOf(done), 50)
        self.assertEqual(keys, [b"s%03d" % number for number in range(50)])

    def test_expiry_follows_advanced_clock(self) -> None:
        server = MemoryKVDaemon()
        client = server.connect()
        client.set(b"brief", b"x", exptime=10)
        server.flush()
        self.assertEqual(server.reactor.seconds(), START_TIME)

        server.reactor.advance(11)
        fetched = client.get(b"brief")
        server.flush()

        self.assertIsNone(self.successResultOf(fetched))

    def test_text_protocol_client(self) -> None:
        server = MemoryKVDaemon()
        text = server.connect(_TextClient())

        text.transport.write(b"set k 0 0 2\r\nhi\r\nget k\r\nrget 1 1 0 a\r\n")
        server.flush()

        self.assertEqual(
            text.received,
            b"STORED\r\nVALUE k 0 2\r\nhi\r\nEND\r\nVALUE k 0 2\r\nhi\r\nEND\r\n",
        )

    def test_two_clients_share_store(self) -> None:
        server = MemoryKVDaemon()
        writer = server.connect()
        reader = server.connect()

        writer.set(b"shared", b"1")
        server.flush()
        fetched = reader.get(b"shared")
        server.flush()

        self.assertEqual(self.successResultOf(fetched).value, b"1")
        self.assertEqual(server.factory.stats.curr_connections, 2)


class ReadmeTestingExampleTests(SynchronousTestCase):
    def test_readme_example_passes(self) -> None:
        from pathlib import Path

        readme = (Path(__file__).resolve().parent.parent / "README.rst").read_text()
        start = readme.index("    from twisted.trial.unittest import SynchronousTestCase\n")
        end = readme.index("``server.connect(protocol)``", start)
        source = "\n".join(line[4:] for line in readme[start:end].splitlines())
        namespace: dict = {}
        exec(compile(source, "README.rst", "exec"), namespace)

        case = namespace["GreetingTests"]("test_greeting_stored")
        result = unittest.TestResult()
        case.run(result)

        self.assertEqual(result.testsRun, 1)
        self.assertTrue(result.wasSuccessful(), result.errors + result.failures)
