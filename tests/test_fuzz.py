"""
Fuzz tests: random and half-valid input on text, meta, binary and range
connections never raises out of ``dataReceived``, never reaches the
connection's unexpected-error handler, and never disturbs another
connection or the data it stored.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from kvdaemon import KVDaemonFactory, Settings
from tests.support import Client, FakeReactor, FakeThreadPool

NOW = 1_700_000_000

#: Words that make half-valid text requests more likely than random bytes would.
_WORDS = [
    b"get", b"gets", b"gat", b"gats", b"set", b"add", b"replace", b"append", b"prepend", b"cas",
    b"delete", b"incr", b"decr", b"touch", b"flush_all", b"version", b"verbosity", b"stats",
    b"mg", b"ms", b"md", b"ma", b"mn", b"me", b"rget", b"rdelete", b"lru_crawler", b"metadump",
    b"mgdump", b"all", b"noreply", b"settings", b"conns", b"k", b"key", b"0", b"1", b"-1", b"5",
    b"4294967296", b"99999999999999999999", b"v", b"T10", b"q", b"O123", b"b", b"MS", b"N5",
    b"a" * 251, b"", b"\x00", b"\xff",
]

_TEXT_LINES = st.lists(st.sampled_from(_WORDS), min_size=0, max_size=7).map(b" ".join)
_TEXT_CHUNKS = st.one_of(
    _TEXT_LINES.map(lambda line: line + b"\r\n"),
    _TEXT_LINES.map(lambda line: line + b"\n"),
    st.binary(max_size=40),
)
_TEXT_STREAMS = st.lists(_TEXT_CHUNKS, max_size=12).map(b"".join)

_BINARY_HEADER = struct.Struct(">BBHBBHIIQ")


@st.composite
def _binary_packets(draw: st.DrawFn) -> bytes:
    """Draw one binary request whose lengths may or may not agree with its body."""
    opcode = draw(st.sampled_from(list(range(0x25)) + [0x30, 0x37, 0xDA, 0xDB, 0xDC, draw(st.integers(0, 255))]))
    key = draw(st.binary(max_size=12))
    extras = draw(st.binary(max_size=30))
    value = draw(st.binary(max_size=30))
    key_length = draw(st.one_of(st.just(len(key)), st.integers(0, 300)))
    extras_length = draw(st.one_of(st.just(len(extras)), st.integers(0, 40)))
    body_length = draw(st.one_of(st.just(len(key) + len(extras) + len(value)), st.integers(0, 100)))
    magic = draw(st.sampled_from([0x80, 0x80, 0x80, 0x81, 0x00]))
    header = _BINARY_HEADER.pack(magic, opcode, key_length, extras_length, 0, 0, body_length, 7, 0)
    return header + extras + key + value


_BINARY_STREAMS = st.lists(_binary_packets(), max_size=6).map(lambda packets: b"\x80" + b"".join(packets)[1:] if packets else b"")


class FuzzTests(SynchronousTestCase):
    def run_stream(self, data: bytes, split_at: list[int]) -> None:
        reactor = FakeReactor()
        reactor.advance(NOW)
        pool = FakeThreadPool()
        # flush_all and range deletes are turned off: they destroy data on
        # purpose, and the key "kept" is not among the fuzzed words.
        factory = KVDaemonFactory(Settings(threads=1, allow_destructive=False), reactor=reactor, threadpool=pool)
        keeper = Client(factory, 40000)
        self.assertEqual(keeper.send(b"set kept 5 0 4\r\nsafe\r\n"), b"STORED\r\n")

        fuzzer = Client(factory, 40001)
        cuts = sorted({min(cut, len(data)) for cut in split_at} | {0, len(data)})
        with capturedLogs() as events:
            for start, end in zip(cuts, cuts[1:]):
                fuzzer.protocol.dataReceived(data[start:end])
            # Let any stream the input started run to its end.
            for _ in range(10000):
                if pool.pending:
                    pool.run_next()
                elif reactor.thread_calls:
                    reactor.run_thread_calls()
                else:
                    break

        failures = [event for event in events if "log_failure" in event or event.get("log_level") == LogLevel.critical]
        self.assertEqual(failures, [], data)
        self.assertEqual(keeper.send(b"get kept\r\n"), b"VALUE kept 5 4\r\nsafe\r\nEND\r\n")

    @hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_TEXT_STREAMS, st.lists(st.integers(0, 400), max_size=5))
    def test_text_fuzz_never_fails(self, data: bytes, split_at: list[int]) -> None:
        self.run_stream(data, split_at)

    @hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_BINARY_STREAMS, st.lists(st.integers(0, 400), max_size=5))
    def test_binary_fuzz_never_fails(self, data: bytes, split_at: list[int]) -> None:
        self.run_stream(data, split_at)

    @hypothesis_settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=5))
    def test_random_bytes_never_fail(self, data: bytes, split_at: list[int]) -> None:
        self.run_stream(data, split_at)
