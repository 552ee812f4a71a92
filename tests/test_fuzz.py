"""
Fuzz tests for random and half-valid input on text, meta, binary and
range connections.  The input never raises out of ``dataReceived``, never
reaches the connection's unexpected-error handler, and never disturbs
another connection or the data it stored.  A new connection is still
served.

The tests with an oracle for the replies are in ``test_fuzz_text`` and
``test_fuzz_binary``.
"""

from __future__ import annotations

import struct

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from kvdaemon import Settings
from tests.fuzz_support import KEPT_KEY, KEPT_VALUE, FuzzServer, LogWatch, describe, fuzz_settings, split

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

SASL_USERS = {b"fuzz": b"secret"}


def _sasl_auth(mechanism: bytes, message: bytes, opaque: int = 1) -> bytes:
    body_length = len(mechanism) + len(message)
    return _BINARY_HEADER.pack(0x80, 0x21, len(mechanism), 0, 0, 0, body_length, opaque, 0) + mechanism + message


#: A SASL PLAIN exchange that succeeds, one that fails, or none, then
#: half-valid binary packets.
_SASL_STREAMS = st.tuples(
    st.sampled_from([b"", _sasl_auth(b"PLAIN", b"\0fuzz\0secret"), _sasl_auth(b"PLAIN", b"\0fuzz\0wrong")]),
    st.lists(_binary_packets(), max_size=5).map(b"".join),
).map(b"".join)


class FuzzTests(SynchronousTestCase):
    def fuzz(self, settings: Settings, data: bytes, split_at: list[int]) -> FuzzServer:
        """Deliver ``data`` cut at ``split_at`` to a new server and check that no unexpected error was logged."""
        server = FuzzServer(settings)
        with LogWatch() as watch:
            fuzzer = server.connect()
            server.deliver(fuzzer, split(data, split_at))
        self.assertEqual(watch.failures, [], describe(data))
        return server

    def run_stream(self, data: bytes, split_at: list[int]) -> None:
        # flush_all and range deletes are turned off because they destroy
        # data on purpose.  The key KEPT_KEY is not among the fuzzed words.
        server = self.fuzz(Settings(threads=1, allow_destructive=False), data, split_at)
        keeper = server.connect()
        self.assertEqual(keeper.send(b"get %s\r\n" % KEPT_KEY), b"VALUE %s 5 4\r\n%s\r\nEND\r\n" % (KEPT_KEY, KEPT_VALUE))
        self.assertEqual(keeper.send(b"set !fresh 0 0 2\r\nok\r\nget !fresh\r\n"), b"STORED\r\nVALUE !fresh 0 2\r\nok\r\nEND\r\n")

    @fuzz_settings(300)
    @given(_TEXT_STREAMS, st.lists(st.integers(0, 400), max_size=5))
    def test_text_fuzz_never_fails(self, data: bytes, split_at: list[int]) -> None:
        self.run_stream(data, split_at)

    @fuzz_settings(300)
    @given(_BINARY_STREAMS, st.lists(st.integers(0, 400), max_size=5))
    def test_binary_fuzz_never_fails(self, data: bytes, split_at: list[int]) -> None:
        self.run_stream(data, split_at)

    @fuzz_settings(200)
    @given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=5))
    def test_random_bytes_never_fail(self, data: bytes, split_at: list[int]) -> None:
        self.run_stream(data, split_at)

    @fuzz_settings(200)
    @given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=5))
    def test_random_bytes_binary_never_fail(self, data: bytes, split_at: list[int]) -> None:
        # The first byte 0x80 makes the connection a binary one.
        self.run_stream(b"\x80" + data, split_at)

    @fuzz_settings(200)
    @given(_SASL_STREAMS, st.lists(st.integers(0, 300), max_size=5))
    def test_binary_fuzz_with_sasl_never_fails(self, data: bytes, split_at: list[int]) -> None:
        settings = Settings(threads=1, allow_destructive=False, sasl_users=SASL_USERS)
        server = self.fuzz(settings, data, split_at)
        keeper = server.connect()
        get = _BINARY_HEADER.pack(0x80, 0x00, len(KEPT_KEY), 0, 0, 0, len(KEPT_KEY), 2, 0) + KEPT_KEY
        reply = keeper.send(_sasl_auth(b"PLAIN", b"\0fuzz\0secret") + get)
        auth_header = _BINARY_HEADER.unpack_from(reply)
        self.assertEqual((auth_header[1], auth_header[5]), (0x21, 0), reply)
        get_start = _BINARY_HEADER.size + auth_header[6]
        get_header = _BINARY_HEADER.unpack_from(reply, get_start)
        self.assertEqual((get_header[1], get_header[5], get_header[7]), (0x00, 0, 2), reply)
        self.assertEqual(reply[get_start + _BINARY_HEADER.size + 4 :], KEPT_VALUE)
