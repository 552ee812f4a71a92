"""
Property-based fuzz tests of the text and meta protocol parsers.

Valid requests with exactly one corrupted field must get the reply that
:func:`tests.fuzz_text.frame_text` predicts.  That is memcached's error
line (its class only, for meta commands), a close, or, when the
corruption made another valid request, that request's normal reply, which
a twin server gives for its canonical form.  After each corrupted stream
the fuzzed server's items must equal the twin's, and a new connection
must still be served.

Valid and corrupted pipelines split at every byte boundary must get the
same replies and leave the same items as in one read.  In every test
nothing may raise out of ``dataReceived`` or reach the connection's
unexpected-error log.
"""

from __future__ import annotations

import re

from hypothesis import given, strategies as st

from tests.fuzz_support import (
    ERROR_LINE,
    FuzzServer,
    FuzzTestCase,
    Prediction,
    describe,
    fuzz_settings,
)
from tests.fuzz_text import Unit, classic_requests, corrupt, frame_text, meta_requests, text_requests

#: The start of a reply that is an error line.
_ERROR_REPLY = re.compile(rb"(ERROR|CLIENT_ERROR |SERVER_ERROR )")


@st.composite
def corrupted_streams(draw: st.DrawFn, requests: st.SearchStrategy) -> bytes:
    """
    Draw a pipeline of requests ended by ``mn``.  Each request has exactly
    one corrupted field with a chance of three in four, and at least one
    request is corrupted.
    """
    corrupted = st.sampled_from([True, True, True, False])
    pipeline = draw(st.lists(st.tuples(requests, corrupted), min_size=1, max_size=6))
    target = draw(st.integers(0, len(pipeline) - 1))
    parts = []
    for index, (request, damaged) in enumerate(pipeline):
        if damaged or index == target:
            parts.append(draw(corrupt(request)))
        else:
            parts.append(request.encode())
    return b"".join(parts) + b"mn\r\n"


class TextFuzzTestCase(FuzzTestCase):
    """Runs a stream against a fuzzed server and checks it against the twin."""

    def check_fresh_text_connection(self, server: FuzzServer) -> None:
        client = server.connect()
        self.assertEqual(
            client.send(b"set !fresh 3 0 2\r\nok\r\nget !fresh\r\n"),
            b"STORED\r\nVALUE !fresh 3 2\r\nok\r\nEND\r\n",
        )

    def text_twin_reply(self, twin: FuzzServer, unit: Unit, stream: bytes) -> bytes:
        """Send one unit to the twin on a new text connection and check its reply against the oracle."""
        client = twin.connect()
        # A request first, so that the connection is a text one whatever
        # byte the unit starts with.
        self.assertEqual(client.send(b"mn\r\n"), b"MN\r\n")
        reply = twin.deliver(client, [unit.twin])
        context = "unit %r of stream %s: reply %r" % (unit, describe(stream), reply)

        if unit.outcome == "close":
            self.assertTrue(client.closed, context)
            self.assertEqual(reply, b"", context)
            return reply

        self.assertFalse(client.closed, context)
        if unit.outcome == "reject":
            if unit.silent:
                self.assertEqual(reply, b"", context)
            elif unit.line is not None:
                self.assertEqual(reply, unit.line, context)
            else:
                self.assertRegex(reply, ERROR_LINE[unit.error], context)
        elif not unit.may_error:
            self.assertIsNone(_ERROR_REPLY.match(reply), context)
        return reply

    def predict_text(self, twin: FuzzServer, stream: bytes) -> Prediction:
        """Frame ``stream`` with the oracle and collect the twin's replies to its units."""
        framing = frame_text(stream)
        reply = b"".join(self.text_twin_reply(twin, unit, stream) for unit in framing.units)
        destructive = any(unit.destructive for unit in framing.units if unit.outcome == "execute")
        return Prediction(reply, framing.closed, destructive, repr(framing))

    def check_stream(self, stream: bytes, cuts: list[int]) -> None:
        """Check ``stream``, cut at ``cuts``, against the oracle and the twin."""
        self.check_fuzzed_stream(stream, cuts, self.predict_text, self.check_fresh_text_connection)


class CorruptedClassicRequestTests(TextFuzzTestCase):
    """Classic text requests with one corrupted field."""

    @fuzz_settings(800)
    @given(corrupted_streams(classic_requests), st.lists(st.integers(0, 300), max_size=3))
    def test_classic_corruption_matches_oracle(self, stream: bytes, cuts: list[int]) -> None:
        self.check_stream(stream, cuts)


class CorruptedMetaRequestTests(TextFuzzTestCase):
    """Meta requests with one corrupted field."""

    @fuzz_settings(600)
    @given(corrupted_streams(meta_requests()), st.lists(st.integers(0, 300), max_size=3))
    def test_meta_corruption_matches_oracle(self, stream: bytes, cuts: list[int]) -> None:
        self.check_stream(stream, cuts)

    @fuzz_settings(150)
    @given(corrupted_streams(text_requests), st.lists(st.integers(0, 300), max_size=3))
    def test_mixed_corruption_matches_oracle(self, stream: bytes, cuts: list[int]) -> None:
        self.check_stream(stream, cuts)


class SplitPipelineTests(TextFuzzTestCase):
    """Valid and corrupted pipelines delivered in pieces."""

    @fuzz_settings(25)
    @given(st.lists(classic_requests, min_size=1, max_size=5))
    def test_classic_pipeline_split_everywhere(self, requests: list) -> None:
        stream = b"".join(request.encode() for request in requests)
        framing = frame_text(stream)
        self.assertEqual([unit.outcome for unit in framing.units], ["execute"] * len(requests), framing)
        self.check_split_everywhere(stream)

    @fuzz_settings(25)
    @given(st.lists(meta_requests(), min_size=1, max_size=5))
    def test_meta_pipeline_split_everywhere(self, requests: list) -> None:
        stream = b"".join(request.encode() for request in requests)
        framing = frame_text(stream)
        self.assertEqual([unit.outcome for unit in framing.units], ["execute"] * len(requests), framing)
        self.check_split_everywhere(stream)

    @fuzz_settings(40)
    @given(corrupted_streams(text_requests))
    def test_corrupted_pipeline_split_everywhere(self, stream: bytes) -> None:
        self.check_split_everywhere(stream)
