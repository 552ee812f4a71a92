"""
Property-based fuzz tests of the binary protocol parser.

Valid requests with exactly one corrupted header or body field must get
the reply that :func:`tests.fuzz_binary.frame_binary` predicts.  That is
the exact error response (and a close where memcached closes), a close
without a reply for a wrong magic, or, when the corruption made another
valid request, that request's normal reply.  A twin server gives the
normal reply, and the test checks its opcode, opaque and status.  After
each corrupted stream the fuzzed server's items must equal the twin's,
and a new connection must still be served.

Valid and corrupted pipelines split at every byte boundary must get the
same replies and leave the same items as in one read.  In every test
nothing may raise out of ``dataReceived`` or reach the connection's
unexpected-error log.
"""

from __future__ import annotations

import struct

from hypothesis import given, reject, strategies as st

from tests.fuzz_binary import (
    FLUSH,
    FLUSHQ,
    GET,
    HEADER,
    KEY_ENOENT,
    NOOP,
    RANGE_DELETE,
    RULES,
    QUIET_GETS,
    SET,
    SUCCESS,
    Packet,
    Response,
    Unit,
    binary_requests,
    corrupt,
    frame_binary,
    parse_responses,
)
from tests.fuzz_support import (
    FuzzServer,
    FuzzTestCase,
    Prediction,
    describe,
    fuzz_settings,
)

#: The opaque of the NOOP that ends every generated stream.
SENTINEL_OPAQUE = 0xFEED
#: The opaque of the NOOP that makes a twin connection a binary one.
PRIMER_OPAQUE = 0xFFFF

#: Opcodes that delete items by design.
_DESTRUCTIVE = frozenset([FLUSH, FLUSHQ, RANGE_DELETE])


def encode_pipeline(packets: list[Packet]) -> bytes:
    """Encode ``packets`` with opaques 1, 2, ... so that replies name their request."""
    encoded = []
    for index, packet in enumerate(packets):
        packet.opaque = packet.opaque or index + 1
        encoded.append(packet.encode())
    return b"".join(encoded)


@st.composite
def corrupted_streams(draw: st.DrawFn) -> bytes:
    """
    Draw a pipeline of requests between two NOOPs.  Each request has
    exactly one corrupted field with a chance of three in four, and at
    least one request is corrupted.  The first NOOP makes the connection a
    binary one whatever the first corruption is.
    """
    corrupted = st.sampled_from([True, True, True, False])
    pipeline = draw(st.lists(st.tuples(binary_requests(), corrupted), min_size=1, max_size=5))
    target = draw(st.integers(0, len(pipeline) - 1))
    packets = []
    for index, (packet, damaged) in enumerate(pipeline):
        packet.opaque = index + 1
        packets.append(draw(corrupt(packet)) if damaged or index == target else packet)
    return noop(PRIMER_OPAQUE) + b"".join(packet.encode() for packet in packets) + noop(SENTINEL_OPAQUE)


def noop(opaque: int) -> bytes:
    return Packet(NOOP, opaque=opaque).encode()


class BinaryFuzzTestCase(FuzzTestCase):
    """Runs a stream against a fuzzed server and checks it against the twin."""

    def check_fresh_binary_connection(self, server: FuzzServer) -> None:
        client = server.connect()
        store = Packet(SET, b"!fresh", struct.pack(">II", 3, 0), b"ok", opaque=1).encode()
        fetch = Packet(GET, b"!fresh", opaque=2).encode()
        reply = client.send(store + fetch)
        header = HEADER.unpack_from(reply)
        self.assertEqual((header[1], header[5], header[7]), (SET, 0, 1), reply)
        header = HEADER.unpack_from(reply, HEADER.size)
        self.assertEqual((header[1], header[5], header[6], header[7]), (GET, 0, 6, 2), reply)
        self.assertEqual(reply[2 * HEADER.size :], struct.pack(">I", 3) + b"ok")

    def binary_twin_reply(self, twin: FuzzServer, unit: Unit, stream: bytes) -> tuple[bytes, bool]:
        """
        Send one unit to the twin on a new binary connection, check its
        reply, and return the reply and whether the connection closed.
        """
        context = "unit %r of stream %s" % (unit, describe(stream))
        if unit.outcome == "drop":
            return b"", True
        client = twin.connect()
        self.assertEqual(parse_responses(client.send(noop(PRIMER_OPAQUE))), [Response(NOOP, 0, PRIMER_OPAQUE)])
        reply = twin.deliver(client, [unit.raw])
        context += ": reply %r" % (reply,)

        if unit.outcome == "reject":
            self.assertEqual(reply, unit.reply, context)
            self.assertEqual(client.closed, unit.close, context)
            return reply, client.closed

        rule = RULES[unit.opcode]
        for response in parse_responses(reply):
            self.assertEqual((response.opcode, response.opaque), (unit.opcode, unit.opaque), context)
            self.assertIn(response.status, rule.statuses, context)
            if rule.quiet:
                # A quiet get hides misses, and every other quiet opcode hides successes.
                hidden = KEY_ENOENT if unit.opcode in QUIET_GETS else SUCCESS
                self.assertNotEqual(response.status, hidden, context)
        return reply, client.closed

    def predict_binary(self, twin: FuzzServer, stream: bytes) -> Prediction:
        """
        Frame ``stream`` with the oracle and collect the twin's replies to
        its units, up to the first that closes the connection.  A stream
        whose replies cannot be predicted is rejected as an example.
        """
        framing = frame_binary(stream)
        if framing.unpredictable:
            reject()
        replies = []
        for unit in framing.units:
            unit_reply, closed = self.binary_twin_reply(twin, unit, stream)
            replies.append(unit_reply)
            if closed:
                break
        destructive = any(unit.opcode in _DESTRUCTIVE for unit in framing.units if unit.outcome == "execute")
        return Prediction(b"".join(replies), framing.closed, destructive, repr(framing))

    def check_stream(self, stream: bytes, cuts: list[int]) -> None:
        """Check ``stream``, cut at ``cuts``, against the oracle and the twin."""
        self.check_fuzzed_stream(stream, cuts, self.predict_binary, self.check_fresh_binary_connection)


class CorruptedBinaryRequestTests(BinaryFuzzTestCase):
    """Binary requests with one corrupted field."""

    @fuzz_settings(800)
    @given(corrupted_streams(), st.lists(st.integers(0, 400), max_size=3))
    def test_binary_corruption_matches_oracle(self, stream: bytes, cuts: list[int]) -> None:
        self.check_stream(stream, cuts)


class SplitBinaryPipelineTests(BinaryFuzzTestCase):
    """Valid and corrupted binary pipelines delivered in pieces."""

    @fuzz_settings(20)
    @given(st.lists(binary_requests(), min_size=1, max_size=4))
    def test_binary_pipeline_split_everywhere(self, packets: list[Packet]) -> None:
        stream = encode_pipeline(packets) + noop(SENTINEL_OPAQUE)
        framing = frame_binary(stream)
        # A value past the item size limit gets "Too large.", which is not a framing error.
        self.assertLessEqual({unit.outcome for unit in framing.units}, {"execute", "reject"}, framing)
        self.check_split_everywhere(stream)

    @fuzz_settings(30)
    @given(corrupted_streams())
    def test_corrupted_binary_pipeline_split_everywhere(self, stream: bytes) -> None:
        self.check_split_everywhere(stream)
