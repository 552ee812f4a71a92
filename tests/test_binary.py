"""
Unit tests for kvdaemon._binary and kvdaemon._sasl: every opcode, quiet
variants, opaque and CAS handling, error replies, malformed input and
packets split at every byte, over a StringTransport.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from kvdaemon import KVDaemonFactory, Settings
from kvdaemon._binary import ERROR_TEXT, pack_response
from kvdaemon._sasl import AuthResult, PlainExchange, parse_plain
from tests.binary_packets import Response, counter_extras, parse, request, storage_extras, u32
from tests.support import FakeReactor, FakeThreadPool

PEER = IPv4Address("TCP", "127.0.0.1", 40000)

#: A fixed Unix time for the fake clock, so expiry times are realistic.
NOW = 1_700_000_000

GET, SET, ADD, REPLACE, DELETE, INCR, DECR, QUIT, FLUSH = range(9)
GETQ, NOOP, VERSION, GETK, GETKQ, APPEND, PREPEND, STAT = range(9, 17)
SETQ, ADDQ, REPLACEQ, DELETEQ, INCRQ, DECRQ, QUITQ, FLUSHQ, APPENDQ, PREPENDQ = range(0x11, 0x1B)
VERBOSITY, TOUCH, GAT, GATQ = 0x1B, 0x1C, 0x1D, 0x1E
SASL_LIST, SASL_AUTH, SASL_STEP = 0x20, 0x21, 0x22
GATK, GATKQ = 0x23, 0x24

SUCCESS, NOT_FOUND, EXISTS, TOO_LARGE, INVALID, NOT_STORED, NON_NUMERIC = range(7)
AUTH_ERROR, AUTH_CONTINUE, UNKNOWN = 0x20, 0x21, 0x81

NOOP_PACKET = request(NOOP, opaque=0xFEED)


class BinaryTestCase(SynchronousTestCase):
    """A connection to a fresh server over a StringTransport."""

    settings = Settings()

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.reactor.advance(NOW)
        self.factory = KVDaemonFactory(self.settings, reactor=self.reactor, threadpool=FakeThreadPool())
        self.connection = self.factory.buildProtocol(PEER)
        self.transport = StringTransport(peerAddress=PEER)
        self.connection.makeConnection(self.transport)

    def send(self, data: bytes) -> list[Response]:
        """Feed ``data`` to the connection and return the responses it wrote."""
        self.connection.dataReceived(data)
        written = self.transport.value()
        self.transport.clear()
        return parse(written)

    def send_one(self, data: bytes) -> Response:
        """Feed one request and return its one response."""
        responses = self.send(data)
        self.assertEqual(len(responses), 1, responses)
        return responses[0]

    def set_item(self, key: bytes, value: bytes, flags: int = 0, exptime: int = 0) -> int:
        """Store an item through the protocol and return its CAS."""
        response = self.send_one(request(SET, key, storage_extras(flags, exptime), value))
        self.assertEqual(response.status, SUCCESS)
        return response.cas

    def assert_error(self, response: Response, opcode: int, status: int, opaque: int = 0) -> None:
        self.assertEqual(response.opcode, opcode)
        self.assertEqual(response.status, status)
        self.assertEqual(response.value, ERROR_TEXT[status])
        self.assertEqual(response.key, b"")
        self.assertEqual(response.extras, b"")
        self.assertEqual(response.opaque, opaque)
        self.assertEqual(response.cas, 0)

    def assert_closed(self) -> None:
        self.assertTrue(self.transport.disconnecting)

    def assert_open(self) -> None:
        self.assertFalse(self.transport.disconnecting)


class ErrorTextTests(SynchronousTestCase):
    """The error bodies are memcached 1.6's strings."""

    def test_error_text_matches_memcached(self) -> None:
        expected = {
            0x01: b"Not found",
            0x02: b"Data exists for key.",
            0x03: b"Too large.",
            0x04: b"Invalid arguments",
            0x05: b"Not stored.",
            0x06: b"Non-numeric server-side value for incr or decr",
            0x20: b"Auth failure.",
            0x81: b"Unknown command",
            0x82: b"Out of memory",
        }
        self.assertEqual({int(status): text for status, text in ERROR_TEXT.items()}, expected)

    def test_pack_response_layout(self) -> None:
        packet = pack_response(0x0C, 0x01020304, 1, key=b"k", extras=b"ee", value=b"vvv", cas=9)
        self.assertEqual(
            parse(packet), [Response(opcode=0x0C, status=1, key=b"k", extras=b"ee", value=b"vvv", opaque=0x01020304, cas=9)]
        )
        self.assertEqual(packet[:2], b"\x81\x0c")
        self.assertEqual(len(packet), 24 + 6)


class GetTests(BinaryTestCase):
    def test_get_hit_returns_flags_value_cas(self) -> None:
        cas = self.set_item(b"k", b"value", flags=0xDEADBEEF)
        response = self.send_one(request(GET, b"k", opaque=77))
        self.assertEqual(response, Response(GET, SUCCESS, b"", b"\xde\xad\xbe\xef", b"value", 77, cas))

    def test_get_miss_not_found(self) -> None:
        self.assert_error(self.send_one(request(GET, b"missing", opaque=5)), GET, NOT_FOUND, opaque=5)

    def test_getk_hit_returns_key(self) -> None:
        cas = self.set_item(b"k", b"v", flags=3)
        response = self.send_one(request(GETK, b"k", opaque=1))
        self.assertEqual(response, Response(GETK, SUCCESS, b"k", b"\x00\x00\x00\x03", b"v", 1, cas))

    def test_getk_miss_returns_key_without_text(self) -> None:
        response = self.send_one(request(GETK, b"missing", opaque=2))
        self.assertEqual(response, Response(GETK, NOT_FOUND, b"missing", b"", b"", 2, 0))

    def test_getq_hit_sent(self) -> None:
        cas = self.set_item(b"k", b"v")
        responses = self.send(request(GETQ, b"k", opaque=3) + NOOP_PACKET)
        self.assertEqual(responses[0], Response(GETQ, SUCCESS, b"", b"\x00\x00\x00\x00", b"v", 3, cas))
        self.assertEqual(responses[1].opcode, NOOP)
        self.assertEqual(len(responses), 2)

    def test_getq_miss_silent(self) -> None:
        responses = self.send(request(GETQ, b"missing", opaque=3) + NOOP_PACKET)
        self.assertEqual([r.opcode for r in responses], [NOOP])

    def test_getkq_hit_and_miss(self) -> None:
        self.set_item(b"a", b"1")
        responses = self.send(request(GETKQ, b"a", opaque=1) + request(GETKQ, b"b", opaque=2) + NOOP_PACKET)
        self.assertEqual([(r.opcode, r.key, r.value, r.opaque) for r in responses], [(GETKQ, b"a", b"1", 1), (NOOP, b"", b"", 0xFEED)])

    def test_get_counts_hits_and_misses(self) -> None:
        self.set_item(b"k", b"v")
        self.send(request(GET, b"k") + request(GETQ, b"x") + request(GETK, b"y"))
        stats = self.factory.stats
        self.assertEqual(stats.cmd_get, 3)
        self.assertEqual(stats.get_hits, 1)
        self.assertEqual(stats.get_misses, 2)

    def test_get_expired_item_missing(self) -> None:
        self.set_item(b"k", b"v", exptime=10)
        self.reactor.advance(11)
        self.assertEqual(self.send_one(request(GET, b"k")).status, NOT_FOUND)


class StorageTests(BinaryTestCase):
    def test_set_returns_cas_and_stores(self) -> None:
        response = self.send_one(request(SET, b"k", storage_extras(5, 0), b"val", opaque=9))
        self.assertEqual(response.status, SUCCESS)
        self.assertEqual(response.opaque, 9)
        self.assertNotEqual(response.cas, 0)
        self.assertEqual((response.key, response.extras, response.value), (b"", b"", b""))
        item = self.factory.store.get(b"k")
        self.assertEqual((item.value, item.flags, item.cas), (b"val", 5, response.cas))

    def test_set_new_cas_each_time(self) -> None:
        first = self.set_item(b"k", b"1")
        second = self.set_item(b"k", b"2")
        self.assertNotEqual(first, second)

    def test_set_empty_value(self) -> None:
        self.set_item(b"k", b"")
        self.assertEqual(self.send_one(request(GET, b"k")).value, b"")

    def test_setq_silent_on_success(self) -> None:
        responses = self.send(request(SETQ, b"k", storage_extras(), b"v") + NOOP_PACKET)
        self.assertEqual([r.opcode for r in responses], [NOOP])
        self.assertEqual(self.factory.store.get(b"k").value, b"v")

    def test_set_with_matching_cas_stores(self) -> None:
        cas = self.set_item(b"k", b"1")
        response = self.send_one(request(SET, b"k", storage_extras(), b"2", cas=cas))
        self.assertEqual(response.status, SUCCESS)
        self.assertNotIn(response.cas, (0, cas))
        self.assertEqual(self.factory.store.get(b"k").value, b"2")
        self.assertEqual(self.factory.stats.cas_hits, 1)

    def test_set_with_stale_cas_exists(self) -> None:
        cas = self.set_item(b"k", b"1")
        self.set_item(b"k", b"2")
        self.assert_error(self.send_one(request(SET, b"k", storage_extras(), b"3", cas=cas, opaque=4)), SET, EXISTS, 4)
        self.assertEqual(self.factory.store.get(b"k").value, b"2")
        self.assertEqual(self.factory.stats.cas_badval, 1)

    def test_set_with_cas_missing_key_not_found(self) -> None:
        self.assert_error(self.send_one(request(SET, b"k", storage_extras(), b"3", cas=42)), SET, NOT_FOUND)
        self.assertEqual(self.factory.stats.cas_misses, 1)

    def test_setq_failure_still_reported(self) -> None:
        self.set_item(b"k", b"1")
        responses = self.send(request(SETQ, b"k", storage_extras(), b"3", cas=999, opaque=8) + NOOP_PACKET)
        self.assert_error(responses[0], SETQ, EXISTS, 8)
        self.assertEqual(responses[1].opcode, NOOP)

    def test_add_new_key(self) -> None:
        response = self.send_one(request(ADD, b"k", storage_extras(), b"v"))
        self.assertEqual(response.status, SUCCESS)
        self.assertNotEqual(response.cas, 0)

    def test_add_existing_key_exists(self) -> None:
        self.set_item(b"k", b"v")
        self.assert_error(self.send_one(request(ADD, b"k", storage_extras(), b"w")), ADD, EXISTS)
        self.assertEqual(self.factory.store.get(b"k").value, b"v")

    def test_addq_silent_then_error(self) -> None:
        responses = self.send(
            request(ADDQ, b"k", storage_extras(), b"v") + request(ADDQ, b"k", storage_extras(), b"w", opaque=2)
        )
        self.assertEqual(len(responses), 1)
        self.assert_error(responses[0], ADDQ, EXISTS, 2)

    def test_add_with_cas_is_compare_and_swap(self) -> None:
        # memcached treats any storage request carrying a CAS as a CAS.
        self.assert_error(self.send_one(request(ADD, b"new", storage_extras(), b"v", cas=5)), ADD, NOT_FOUND)

    def test_replace_existing_key(self) -> None:
        self.set_item(b"k", b"v")
        self.assertEqual(self.send_one(request(REPLACE, b"k", storage_extras(7), b"w")).status, SUCCESS)
        item = self.factory.store.get(b"k")
        self.assertEqual((item.value, item.flags), (b"w", 7))

    def test_replace_missing_key_not_found(self) -> None:
        self.assert_error(self.send_one(request(REPLACE, b"k", storage_extras(), b"w")), REPLACE, NOT_FOUND)

    def test_replaceq_silent_then_error(self) -> None:
        self.set_item(b"k", b"v")
        responses = self.send(
            request(REPLACEQ, b"k", storage_extras(), b"w") + request(REPLACEQ, b"x", storage_extras(), b"w")
        )
        self.assertEqual(len(responses), 1)
        self.assert_error(responses[0], REPLACEQ, NOT_FOUND)

    def test_set_counts_cmd_set(self) -> None:
        self.set_item(b"a", b"1")
        self.send(request(ADD, b"a", storage_extras(), b"1") + request(APPEND, b"a", b"", b"2"))
        self.assertEqual(self.factory.stats.cmd_set, 3)

    def test_set_expiry_relative(self) -> None:
        self.set_item(b"k", b"v", exptime=100)
        self.reactor.advance(99)
        self.assertEqual(self.send_one(request(GET, b"k")).status, SUCCESS)
        self.reactor.advance(2)
        self.assertEqual(self.send_one(request(GET, b"k")).status, NOT_FOUND)

    def test_set_expiry_absolute(self) -> None:
        self.set_item(b"k", b"v", exptime=NOW + 50)
        self.reactor.advance(51)
        self.assertEqual(self.send_one(request(GET, b"k")).status, NOT_FOUND)


class ConcatenateTests(BinaryTestCase):
    def test_append_and_prepend(self) -> None:
        self.set_item(b"k", b"mid", flags=4)
        appended = self.send_one(request(APPEND, b"k", b"", b">", opaque=1))
        self.assertEqual((appended.status, appended.opaque), (SUCCESS, 1))
        self.assertNotEqual(appended.cas, 0)
        prepended = self.send_one(request(PREPEND, b"k", b"", b"<", opaque=2))
        self.assertEqual((prepended.status, prepended.opaque), (SUCCESS, 2))
        item = self.factory.store.get(b"k")
        self.assertEqual((item.value, item.flags, item.cas), (b"<mid>", 4, prepended.cas))

    def test_appendq_prependq_silent(self) -> None:
        self.set_item(b"k", b"m")
        responses = self.send(request(APPENDQ, b"k", b"", b"a") + request(PREPENDQ, b"k", b"", b"p") + NOOP_PACKET)
        self.assertEqual([r.opcode for r in responses], [NOOP])
        self.assertEqual(self.factory.store.get(b"k").value, b"pma")

    def test_append_missing_not_stored(self) -> None:
        self.assert_error(self.send_one(request(APPEND, b"k", b"", b"a")), APPEND, NOT_STORED)
        self.assert_error(self.send_one(request(PREPENDQ, b"k", b"", b"a")), PREPENDQ, NOT_STORED)

    def test_append_with_matching_cas(self) -> None:
        cas = self.set_item(b"k", b"m")
        self.assertEqual(self.send_one(request(APPEND, b"k", b"", b"a", cas=cas)).status, SUCCESS)
        self.assertEqual(self.factory.store.get(b"k").value, b"ma")

    def test_append_with_stale_cas_exists(self) -> None:
        self.set_item(b"k", b"m")
        self.assert_error(self.send_one(request(APPEND, b"k", b"", b"a", cas=12345)), APPEND, EXISTS)
        self.assertEqual(self.factory.store.get(b"k").value, b"m")


class DeleteTests(BinaryTestCase):
    def test_delete_hit_and_miss(self) -> None:
        self.set_item(b"k", b"v")
        response = self.send_one(request(DELETE, b"k", opaque=3))
        self.assertEqual(response, Response(DELETE, SUCCESS, b"", b"", b"", 3, 0))
        self.assert_error(self.send_one(request(DELETE, b"k", opaque=4)), DELETE, NOT_FOUND, 4)
        self.assertEqual((self.factory.stats.delete_hits, self.factory.stats.delete_misses), (1, 1))

    def test_deleteq_silent_on_success_reports_miss(self) -> None:
        self.set_item(b"k", b"v")
        responses = self.send(request(DELETEQ, b"k") + request(DELETEQ, b"k", opaque=6))
        self.assertEqual(len(responses), 1)
        self.assert_error(responses[0], DELETEQ, NOT_FOUND, 6)

    def test_delete_with_cas(self) -> None:
        cas = self.set_item(b"k", b"v")
        self.assert_error(self.send_one(request(DELETE, b"k", cas=cas + 1)), DELETE, EXISTS)
        self.assertEqual(self.send_one(request(DELETE, b"k", cas=cas)).status, SUCCESS)
        self.assertIsNone(self.factory.store.get(b"k"))


class CounterTests(BinaryTestCase):
    def counter(self, response: Response) -> int:
        self.assertEqual(response.status, SUCCESS)
        self.assertEqual(len(response.value), 8)
        return int.from_bytes(response.value, "big")

    def test_incr_missing_creates_with_initial(self) -> None:
        response = self.send_one(request(INCR, b"c", counter_extras(5, 10), opaque=2))
        self.assertEqual(self.counter(response), 10)
        self.assertEqual(response.opaque, 2)
        self.assertNotEqual(response.cas, 0)
        item = self.factory.store.get(b"c")
        self.assertEqual((item.value, item.flags, item.cas), (b"10", 0, response.cas))

    def test_incr_existing_adds_delta(self) -> None:
        self.set_item(b"c", b"10")
        response = self.send_one(request(INCR, b"c", counter_extras(5, 99)))
        self.assertEqual(self.counter(response), 15)
        self.assertEqual(response.cas, self.factory.store.get(b"c").cas)
        self.assertEqual(self.factory.stats.incr_hits, 1)

    def test_decr_stops_at_zero(self) -> None:
        self.set_item(b"c", b"3")
        self.assertEqual(self.counter(self.send_one(request(DECR, b"c", counter_extras(10)))), 0)
        self.assertEqual(self.factory.stats.decr_hits, 1)

    def test_incr_wraps_at_64_bits(self) -> None:
        self.set_item(b"c", b"%d" % (2**64 - 1))
        self.assertEqual(self.counter(self.send_one(request(INCR, b"c", counter_extras(2)))), 1)

    def test_incr_no_create_expiry_not_found(self) -> None:
        self.assert_error(self.send_one(request(INCR, b"c", counter_extras(1, 5, 0xFFFFFFFF))), INCR, NOT_FOUND)
        self.assert_error(self.send_one(request(DECRQ, b"c", counter_extras(1, 5, 0xFFFFFFFF))), DECRQ, NOT_FOUND)
        self.assertIsNone(self.factory.store.get(b"c"))
        self.assertEqual((self.factory.stats.incr_misses, self.factory.stats.decr_misses), (1, 1))

    def test_incr_created_counter_expires(self) -> None:
        self.send_one(request(INCR, b"c", counter_extras(1, 5, 30)))
        self.reactor.advance(31)
        self.assertIsNone(self.factory.store.get(b"c"))

    def test_incr_non_numeric(self) -> None:
        self.set_item(b"c", b"abc")
        self.assert_error(self.send_one(request(INCR, b"c", counter_extras(1))), INCR, NON_NUMERIC)
        self.assert_error(self.send_one(request(INCRQ, b"c", counter_extras(1))), INCRQ, NON_NUMERIC)

    def test_incr_non_numeric_logged_with_peer(self) -> None:
        self.set_item(b"c", b"abc")
        with capturedLogs() as events:
            self.send_one(request(DECR, b"c", counter_extras(1)))
        logged = [event for event in events if event.get("peer") == "tcp:127.0.0.1:40000"]
        self.assertEqual([event["command"] for event in logged], ["decr"])
        self.assertEqual(logged[0]["log_level"], LogLevel.info)

    def test_incr_with_cas(self) -> None:
        cas = self.set_item(b"c", b"1")
        self.assert_error(self.send_one(request(INCR, b"c", counter_extras(1), cas=cas + 1)), INCR, EXISTS)
        self.assertEqual(self.counter(self.send_one(request(INCR, b"c", counter_extras(1), cas=cas))), 2)

    def test_incrq_decrq_silent_on_success(self) -> None:
        self.set_item(b"c", b"10")
        responses = self.send(
            request(INCRQ, b"c", counter_extras(5)) + request(DECRQ, b"c", counter_extras(2)) + NOOP_PACKET
        )
        self.assertEqual([r.opcode for r in responses], [NOOP])
        self.assertEqual(self.factory.store.get(b"c").value.strip(), b"13")


class TouchTests(BinaryTestCase):
    def test_touch_hit_returns_flags_and_cas(self) -> None:
        cas = self.set_item(b"k", b"value", flags=9, exptime=10)
        response = self.send_one(request(TOUCH, b"k", u32(100), opaque=4))
        self.assertEqual(response, Response(TOUCH, SUCCESS, b"", b"\x00\x00\x00\x09", b"", 4, cas))
        self.reactor.advance(50)
        self.assertEqual(self.send_one(request(GET, b"k")).status, SUCCESS)

    def test_touch_miss(self) -> None:
        self.assert_error(self.send_one(request(TOUCH, b"k", u32(100))), TOUCH, NOT_FOUND)
        self.assertEqual((self.factory.stats.cmd_touch, self.factory.stats.touch_misses), (1, 1))

    def test_gat_returns_value_and_sets_expiry(self) -> None:
        cas = self.set_item(b"k", b"value", flags=1)
        response = self.send_one(request(GAT, b"k", u32(5), opaque=8))
        self.assertEqual(response, Response(GAT, SUCCESS, b"", b"\x00\x00\x00\x01", b"value", 8, cas))
        self.reactor.advance(6)
        self.assertEqual(self.send_one(request(GET, b"k")).status, NOT_FOUND)
        self.assertEqual(self.factory.stats.touch_hits, 1)

    def test_gatk_returns_key(self) -> None:
        self.set_item(b"k", b"value")
        response = self.send_one(request(GATK, b"k", u32(0)))
        self.assertEqual((response.status, response.key, response.value), (SUCCESS, b"k", b"value"))

    def test_gat_misses(self) -> None:
        self.assert_error(self.send_one(request(GAT, b"k", u32(0), opaque=1)), GAT, NOT_FOUND, 1)
        keyed = self.send_one(request(GATK, b"k", u32(0), opaque=2))
        self.assertEqual(keyed, Response(GATK, NOT_FOUND, b"k", b"", b"", 2, 0))

    def test_gatq_gatkq_hits_sent_misses_silent(self) -> None:
        self.set_item(b"k", b"v")
        responses = self.send(
            request(GATQ, b"k", u32(0), opaque=1)
            + request(GATKQ, b"k", u32(0), opaque=2)
            + request(GATQ, b"x", u32(0))
            + request(GATKQ, b"x", u32(0))
            + NOOP_PACKET
        )
        self.assertEqual([(r.opcode, r.key, r.opaque) for r in responses], [(GATQ, b"", 1), (GATKQ, b"k", 2), (NOOP, b"", 0xFEED)])


class ServerCommandTests(BinaryTestCase):
    def test_noop(self) -> None:
        self.assertEqual(self.send_one(request(NOOP, opaque=0xFFFFFFFF)), Response(NOOP, SUCCESS, b"", b"", b"", 0xFFFFFFFF, 0))

    def test_version(self) -> None:
        self.assertEqual(self.send_one(request(VERSION, opaque=1)), Response(VERSION, SUCCESS, b"", b"", b"1.6.18", 1, 0))

    def test_quit_replies_then_closes(self) -> None:
        responses = self.send(request(QUIT, opaque=3) + NOOP_PACKET)
        self.assertEqual(responses, [Response(QUIT, SUCCESS, b"", b"", b"", 3, 0)])
        self.assert_closed()

    def test_quitq_closes_silently(self) -> None:
        self.assertEqual(self.send(request(QUITQ) + NOOP_PACKET), [])
        self.assert_closed()

    def test_flush_removes_items(self) -> None:
        self.set_item(b"k", b"v")
        self.assertEqual(self.send_one(request(FLUSH, opaque=2)), Response(FLUSH, SUCCESS, b"", b"", b"", 2, 0))
        self.assertIsNone(self.factory.store.get(b"k"))
        self.assertEqual(self.factory.stats.cmd_flush, 1)

    def test_flushq_silent(self) -> None:
        self.set_item(b"k", b"v")
        self.assertEqual([r.opcode for r in self.send(request(FLUSHQ) + NOOP_PACKET)], [NOOP])
        self.assertIsNone(self.factory.store.get(b"k"))

    def test_flush_with_delay(self) -> None:
        self.set_item(b"k", b"v")
        self.assertEqual(self.send_one(request(FLUSH, b"", u32(10))).status, SUCCESS)
        self.assertIsNotNone(self.factory.store.get(b"k"))
        self.reactor.advance(11)
        self.assertIsNone(self.factory.store.get(b"k"))

    def test_verbosity_sets_level(self) -> None:
        self.assertEqual(self.send_one(request(VERBOSITY, b"", u32(2), opaque=6)), Response(VERBOSITY, SUCCESS, b"", b"", b"", 6, 0))
        self.assertEqual(self.factory.verbosity, 2)

    def test_stat_all_one_packet_each_then_empty(self) -> None:
        self.set_item(b"k", b"v")
        responses = self.send(request(STAT, opaque=11))
        self.assertGreater(len(responses), 10)
        self.assertEqual(responses[-1], Response(STAT, SUCCESS, b"", b"", b"", 11, 0))
        stats = {r.key: r.value for r in responses[:-1]}
        self.assertEqual(stats[b"cmd_set"], b"1")
        self.assertEqual(stats[b"version"], b"1.6.18")
        self.assertEqual(stats[b"curr_items"], b"1")
        for response in responses:
            self.assertEqual((response.opcode, response.status, response.opaque, response.cas), (STAT, SUCCESS, 11, 0))

    def test_stat_settings(self) -> None:
        responses = self.send(request(STAT, b"settings", opaque=1))
        stats = {r.key: r.value for r in responses[:-1]}
        self.assertEqual(stats[b"item_size_max"], b"%d" % self.settings.max_item_size)
        self.assertEqual(responses[-1].key, b"")

    def test_stat_reset_zeroes_counters(self) -> None:
        self.set_item(b"k", b"v")
        responses = self.send(request(STAT, b"reset", opaque=3))
        self.assertEqual(responses, [Response(STAT, SUCCESS, b"", b"", b"", 3, 0)])
        self.assertEqual(self.factory.stats.cmd_set, 0)
        self.send_one(request(GET, b"k"))
        self.assertEqual(self.factory.stats.cmd_get, 1)

    def test_stat_unknown_group_not_found(self) -> None:
        self.assert_error(self.send_one(request(STAT, b"bogus", opaque=2)), STAT, NOT_FOUND, 2)


class FlushDisabledTests(BinaryTestCase):
    settings = Settings(allow_destructive=False)

    def test_flush_disabled_auth_error(self) -> None:
        self.set_item(b"k", b"v")
        self.assert_error(self.send_one(request(FLUSH)), FLUSH, AUTH_ERROR)
        self.assert_error(self.send_one(request(FLUSHQ)), FLUSHQ, AUTH_ERROR)
        self.assertIsNotNone(self.factory.store.get(b"k"))
        self.assertEqual(self.factory.stats.cmd_flush, 0)


class UnknownOpcodeTests(BinaryTestCase):
    def test_unknown_opcode_keeps_connection(self) -> None:
        responses = self.send(request(0x50, opaque=4) + NOOP_PACKET)
        self.assert_error(responses[0], 0x50, UNKNOWN, 4)
        self.assertEqual(responses[1].opcode, NOOP)
        self.assert_open()

    def test_unknown_opcode_body_skipped(self) -> None:
        responses = self.send(request(0x51, b"key", b"extras", b"value" * 100) + NOOP_PACKET)
        self.assert_error(responses[0], 0x51, UNKNOWN)
        self.assertEqual(responses[1].opcode, NOOP)
        self.assertEqual(len(responses), 2)

    def test_unknown_opcode_logged_once_at_info(self) -> None:
        with capturedLogs() as events:
            self.send(request(0x50, b"key", b"", b"value"))
        logged = [event for event in events if event.get("peer") == "tcp:127.0.0.1:40000"]
        self.assertEqual([event["opcode"] for event in logged], [0x50])
        self.assertEqual(logged[0]["log_level"], LogLevel.info)

    def test_sasl_opcodes_unknown_when_sasl_off(self) -> None:
        responses = self.send(request(SASL_LIST) + request(SASL_AUTH, b"PLAIN", b"", b"\0a\0b") + NOOP_PACKET)
        self.assert_error(responses[0], SASL_LIST, UNKNOWN)
        self.assert_error(responses[1], SASL_AUTH, UNKNOWN)
        self.assertEqual(responses[2].opcode, NOOP)

    def test_malformed_sasl_opcodes_closed_when_sasl_off(self) -> None:
        # memcached 1.6.18 checks the SASL opcodes' lengths even with SASL
        # off.  A mechanism list takes no body, and an auth or step needs a
        # key and no extras.
        malformed = [
            request(SASL_LIST, b"PLAIN", opaque=4),
            request(SASL_AUTH, opaque=4),
            request(SASL_STEP, b"PLAIN", b"1234", opaque=4),
        ]
        for packet in malformed:
            self.setUp()
            responses = self.send(packet + NOOP_PACKET)
            self.assertEqual(len(responses), 1, packet)
            self.assert_error(responses[0], packet[1], INVALID, 4)
            self.assert_closed()


class MalformedRequestTests(BinaryTestCase):
    def test_wrong_magic_closes_silently(self) -> None:
        responses = self.send(NOOP_PACKET + request(GET, b"k", magic=0x81) + NOOP_PACKET)
        self.assertEqual([r.opcode for r in responses], [NOOP])
        self.assert_closed()

    def test_key_too_long_invalid_and_closed(self) -> None:
        responses = self.send(request(GET, b"k" * 251, opaque=3) + NOOP_PACKET)
        self.assertEqual(len(responses), 1)
        self.assert_error(responses[0], GET, INVALID, 3)
        self.assert_closed()

    def test_key_of_250_bytes_accepted(self) -> None:
        self.set_item(b"k" * 250, b"v")
        self.assertEqual(self.send_one(request(GET, b"k" * 250)).value, b"v")

    def test_wrong_extras_invalid_and_closed(self) -> None:
        cases = [
            (GET, b"k", b"xxxx", b""),
            (SET, b"k", b"1234", b"v"),
            (INCR, b"k", b"x" * 16, b""),
            (TOUCH, b"k", b"", b""),
            (APPEND, b"k", b"xxxx", b"v"),
            (FLUSH, b"", b"xx", b""),
            (VERBOSITY, b"", b"", b""),
            (DELETE, b"k", b"xxxx", b""),
        ]
        for opcode, key, extras, value in cases:
            self.setUp()
            responses = self.send(request(opcode, key, extras, value, opaque=opcode) + NOOP_PACKET)
            self.assertEqual(len(responses), 1, (opcode, responses))
            self.assert_error(responses[0], opcode, INVALID, opcode)
            self.assert_closed()

    def test_missing_or_extra_key_invalid_and_closed(self) -> None:
        cases = [
            (GET, b"", b""),
            (SET, b"", storage_extras()),
            (DELETE, b"", b""),
            (NOOP, b"k", b""),
            (VERSION, b"k", b""),
            (QUIT, b"k", b""),
            (FLUSH, b"k", b""),
        ]
        for opcode, key, extras in cases:
            self.setUp()
            responses = self.send(request(opcode, key, extras) + NOOP_PACKET)
            self.assertEqual(len(responses), 1, (opcode, responses))
            self.assert_error(responses[0], opcode, INVALID)
            self.assert_closed()

    def test_value_where_none_allowed_invalid(self) -> None:
        for opcode in (GET, DELETE, NOOP, VERSION):
            self.setUp()
            key = b"k" if opcode in (GET, DELETE) else b""
            self.assert_error(self.send_one(request(opcode, key, b"", b"value")), opcode, INVALID)
            self.assert_closed()

    def test_body_shorter_than_key_unknown_and_closed(self) -> None:
        responses = self.send(request(GET, b"k", key_length=5, body_length=1, opaque=2) + NOOP_PACKET)
        self.assertEqual(len(responses), 1)
        self.assert_error(responses[0], GET, UNKNOWN, 2)
        self.assert_closed()

    def test_oversized_set_too_large_value_skipped(self) -> None:
        self.set_item(b"k", b"old")
        size = self.settings.max_item_size + 1
        packet = request(SET, b"k", storage_extras(), b"x" * size, opaque=7)
        # The value arrives in pieces and the server never waits for all of it.
        responses = self.send(packet[:1000])
        self.assertEqual(len(responses), 1)
        self.assert_error(responses[0], SET, TOO_LARGE, 7)
        self.assertEqual(self.connection.bytes_needed, 0)
        self.assertEqual(self.send(packet[1000:500000]), [])
        responses = self.send(packet[500000:] + NOOP_PACKET)
        self.assertEqual([r.opcode for r in responses], [NOOP])
        self.assert_open()
        # memcached drops the old value when a set fails for size.
        self.assertIsNone(self.factory.store.get(b"k"))
        self.assertEqual(self.factory.stats.cmd_set, 1)

    def test_oversized_setq_reported(self) -> None:
        responses = self.send(request(SETQ, b"k", storage_extras(), b"x" * (self.settings.max_item_size + 1)) + NOOP_PACKET)
        self.assert_error(responses[0], SETQ, TOO_LARGE)
        self.assertEqual(responses[1].opcode, NOOP)

    def test_oversized_append_too_large_keeps_item(self) -> None:
        self.set_item(b"k", b"old")
        responses = self.send(request(APPEND, b"k", b"", b"x" * (self.settings.max_item_size + 1)) + NOOP_PACKET)
        self.assert_error(responses[0], APPEND, TOO_LARGE)
        self.assertEqual(responses[1].opcode, NOOP)
        self.assertEqual(self.factory.store.get(b"k").value, b"old")

    def test_oversized_add_keeps_item(self) -> None:
        self.set_item(b"k", b"old")
        responses = self.send(request(ADD, b"k", storage_extras(), b"x" * (self.settings.max_item_size + 1)))
        self.assert_error(responses[0], ADD, TOO_LARGE)
        self.assertEqual(self.factory.store.get(b"k").value, b"old")

    def value_too_large_with_flags(self) -> bytes:
        """A value for key ``k`` that fits the item size limit with flags 0 and not with other flags."""
        # memcached counts 59 bytes besides key and value, and 4 more for
        # non-zero flags.
        return b"x" * (self.settings.max_item_size - 59 - len(b"k") - 2)

    def test_set_too_large_with_flags(self) -> None:
        self.set_item(b"k", b"old")
        value = self.value_too_large_with_flags()
        responses = self.send(request(SET, b"k", storage_extras(flags=1), value, opaque=3) + NOOP_PACKET)
        self.assertEqual(len(responses), 2)
        self.assert_error(responses[0], SET, TOO_LARGE, 3)
        self.assertEqual(responses[1].opcode, NOOP)
        self.assertIsNone(self.factory.store.get(b"k"))
        self.assert_open()

    def test_set_with_cas_too_large_with_flags(self) -> None:
        cas = self.set_item(b"k", b"old")
        value = self.value_too_large_with_flags()
        response = self.send_one(request(SET, b"k", storage_extras(flags=1), value, cas=cas))
        self.assert_error(response, SET, TOO_LARGE)
        # memcached drops the old item of a set that is too large, CAS or not.
        self.assertIsNone(self.factory.store.get(b"k"))

    def test_add_too_large_with_flags_keeps_item(self) -> None:
        self.set_item(b"k", b"old")
        response = self.send_one(request(ADDQ, b"k", storage_extras(flags=1), self.value_too_large_with_flags()))
        self.assert_error(response, ADDQ, TOO_LARGE)
        self.assertEqual(self.factory.store.get(b"k").value, b"old")

    def test_set_at_limit_without_flags_stored(self) -> None:
        response = self.send_one(request(SET, b"k", storage_extras(flags=0), self.value_too_large_with_flags()))
        self.assertEqual(response.status, SUCCESS)

    def test_garbage_after_valid_request_never_raises(self) -> None:
        # Every byte value as an opcode with every small header shape: the
        # server replies or closes, and never reaches the connection's
        # unexpected-error handler.
        with capturedLogs() as events:
            for opcode in range(256):
                for key, extras, value in ((b"", b"", b""), (b"k", b"", b""), (b"k", b"12345678", b"v"), (b"k", b"1234", b"")):
                    self.setUp()
                    self.send(request(opcode, key, extras, value) + NOOP_PACKET)
        failures = [event for event in events if "log_failure" in event]
        self.assertEqual(failures, [])


class FramingTests(BinaryTestCase):
    PIPELINE = (
        request(SET, b"key", storage_extras(3, 0), b"value", opaque=1)
        + request(GETK, b"key", opaque=2)
        + request(SETQ, b"n", storage_extras(), b"5", opaque=3)
        + request(INCR, b"n", counter_extras(2), opaque=4)
        + request(GETQ, b"missing", opaque=5)
        + request(0x50, b"k", b"xx", b"yy", opaque=6)
        + request(APPEND, b"key", b"", b"!", opaque=7)
        + request(GET, b"key", opaque=8)
        + request(NOOP, opaque=9)
    )

    def fresh_responses(self, chunks: list[bytes]) -> bytes:
        self.setUp()
        for chunk in chunks:
            self.connection.dataReceived(chunk)
        return self.transport.value()

    def test_pipeline_replies_in_order(self) -> None:
        responses = parse(self.fresh_responses([self.PIPELINE]))
        self.assertEqual([r.opaque for r in responses], [1, 2, 4, 6, 7, 8, 9])
        self.assertEqual(responses[-2].value, b"value!")

    def test_split_at_every_byte_boundary(self) -> None:
        expected = self.fresh_responses([self.PIPELINE])
        for split in range(1, len(self.PIPELINE)):
            actual = self.fresh_responses([self.PIPELINE[:split], self.PIPELINE[split:]])
            self.assertEqual(actual, expected, "split at byte %d" % split)

    def test_one_byte_at_a_time(self) -> None:
        expected = self.fresh_responses([self.PIPELINE])
        pieces = [self.PIPELINE[i : i + 1] for i in range(len(self.PIPELINE))]
        self.assertEqual(self.fresh_responses(pieces), expected)

    def test_bytes_needed_covers_packet_after_header(self) -> None:
        packet = request(SET, b"key", storage_extras(), b"v" * 100)
        self.connection.dataReceived(packet[:10])
        # A partial header is simply reparsed, so the connection still
        # counts as between requests.
        self.assertEqual(self.connection.bytes_needed, 0)
        self.connection.dataReceived(packet[10:40])
        self.assertEqual(self.connection.bytes_needed, len(packet))
        self.connection.dataReceived(packet[40:])
        self.assertEqual(parse(self.transport.value())[0].status, SUCCESS)


class SaslExchangeTests(SynchronousTestCase):
    """kvdaemon._sasl on its own."""

    users = {b"alice": b"secret"}

    def test_parse_plain_needs_two_nuls(self) -> None:
        self.assertEqual(parse_plain(b"z\0u\0p"), (b"z", b"u", b"p"))
        self.assertIsNone(parse_plain(b"\0u"))
        self.assertIsNone(parse_plain(b"\0u\0p\0"))

    def test_start_with_credentials(self) -> None:
        outcome = PlainExchange(self.users).start(b"PLAIN", b"\0alice\0secret")
        self.assertEqual((outcome.result, outcome.user), (AuthResult.OK, b"alice"))

    def test_mechanism_case_insensitive(self) -> None:
        self.assertIs(PlainExchange(self.users).start(b"plain", b"\0alice\0secret").result, AuthResult.OK)

    def test_unsupported_mechanism_fails(self) -> None:
        self.assertIs(PlainExchange(self.users).start(b"CRAM-MD5", b"").result, AuthResult.FAILED)

    def test_authzid_must_match_user(self) -> None:
        exchange = PlainExchange(self.users)
        self.assertIs(exchange.start(b"PLAIN", b"alice\0alice\0secret").result, AuthResult.OK)
        self.assertIs(exchange.start(b"PLAIN", b"bob\0alice\0secret").result, AuthResult.FAILED)

    def test_wrong_password_and_unknown_user_fail(self) -> None:
        exchange = PlainExchange(self.users)
        self.assertIs(exchange.start(b"PLAIN", b"\0alice\0secre").result, AuthResult.FAILED)
        self.assertIs(exchange.start(b"PLAIN", b"\0bob\0secret").result, AuthResult.FAILED)

    def test_empty_start_then_steps(self) -> None:
        exchange = PlainExchange(self.users)
        self.assertIs(exchange.start(b"PLAIN", b"").result, AuthResult.CONTINUE)
        self.assertIs(exchange.step(b"\0alice\0wrong").result, AuthResult.FAILED)
        self.assertIs(exchange.step(b"\0alice\0secret").result, AuthResult.OK)
        self.assertIs(exchange.step(b"\0alice\0secret").result, AuthResult.FAILED)

    def test_step_without_start_fails(self) -> None:
        self.assertIs(PlainExchange(self.users).step(b"\0alice\0secret").result, AuthResult.FAILED)


class SaslTests(BinaryTestCase):
    settings = Settings(sasl_users={b"alice": b"secret"})

    GOOD = request(SASL_AUTH, b"PLAIN", b"", b"\0alice\0secret", opaque=1)
    BAD = request(SASL_AUTH, b"PLAIN", b"", b"\0alice\0hunter2", opaque=1)

    def test_list_mechanisms(self) -> None:
        self.assertEqual(self.send_one(request(SASL_LIST, opaque=3)), Response(SASL_LIST, SUCCESS, b"", b"", b"PLAIN", 3, 0))

    def test_unauthenticated_request_auth_error_and_closed(self) -> None:
        for opcode, key, extras in ((GET, b"k", b""), (SET, b"k", storage_extras()), (STAT, b"", b""), (NOOP, b"", b""), (0x50, b"", b"")):
            self.setUp()
            responses = self.send(request(opcode, key, extras, opaque=2) + NOOP_PACKET)
            self.assertEqual(len(responses), 1)
            self.assert_error(responses[0], opcode, AUTH_ERROR, 2)
            self.assert_closed()

    def test_version_allowed_before_auth(self) -> None:
        self.assertEqual(self.send_one(request(VERSION)).value, b"1.6.18")
        self.assert_open()

    def test_good_credentials_authenticate(self) -> None:
        responses = self.send(self.GOOD + request(GET, b"k", opaque=2))
        self.assertEqual(responses[0], Response(SASL_AUTH, SUCCESS, b"", b"", b"Authenticated", 1, 0))
        self.assert_error(responses[1], GET, NOT_FOUND, 2)
        self.assert_open()
        self.assertEqual((self.factory.stats.auth_cmds, self.factory.stats.auth_errors), (1, 0))

    def test_bad_credentials_fail_then_close_on_next_request(self) -> None:
        self.assert_error(self.send_one(self.BAD), SASL_AUTH, AUTH_ERROR, 1)
        self.assert_open()
        self.assert_error(self.send_one(request(GET, b"k")), GET, AUTH_ERROR)
        self.assert_closed()
        self.assertEqual((self.factory.stats.auth_cmds, self.factory.stats.auth_errors), (1, 1))

    def test_failure_logged_with_peer_without_password(self) -> None:
        with capturedLogs() as events:
            self.send(self.BAD)
        failures = [event for event in events if "SASL authentication failed" in event["log_format"]]
        self.assertEqual(len(failures), 1)
        self.assertEqual(failures[0]["peer"], "tcp:127.0.0.1:40000")
        self.assertEqual(failures[0]["user"], "alice")
        for event in events:
            for value in event.values():
                self.assertNotIn("hunter2", repr(value))

    def test_empty_auth_continues_then_step(self) -> None:
        responses = self.send(
            request(SASL_AUTH, b"PLAIN", opaque=1) + request(SASL_STEP, b"PLAIN", b"", b"\0alice\0secret", opaque=2)
        )
        self.assertEqual(responses[0], Response(SASL_AUTH, AUTH_CONTINUE, b"", b"", b"", 1, 0))
        self.assertEqual(responses[1], Response(SASL_STEP, SUCCESS, b"", b"", b"Authenticated", 2, 0))

    def test_step_without_auth_fails(self) -> None:
        self.assert_error(self.send_one(request(SASL_STEP, b"PLAIN", b"", b"\0alice\0secret")), SASL_STEP, AUTH_ERROR)

    def test_list_mechanisms_drops_authentication(self) -> None:
        responses = self.send(self.GOOD + request(SASL_LIST) + request(GET, b"k", opaque=3))
        self.assert_error(responses[2], GET, AUTH_ERROR, 3)
        self.assert_closed()

    def test_failed_reauth_drops_authentication(self) -> None:
        responses = self.send(self.GOOD + self.BAD + request(GET, b"k", opaque=3))
        self.assertEqual([r.status for r in responses], [SUCCESS, AUTH_ERROR, AUTH_ERROR])
        self.assert_closed()

    def test_long_mechanism_invalid_without_close(self) -> None:
        self.assert_error(self.send_one(request(SASL_AUTH, b"P" * 33, b"", b"\0alice\0secret")), SASL_AUTH, INVALID)
        self.assert_open()

    def test_auth_without_mechanism_invalid_and_closed(self) -> None:
        self.assert_error(self.send_one(request(SASL_AUTH, b"", b"", b"\0alice\0secret")), SASL_AUTH, INVALID)
        self.assert_closed()

    def test_oversized_auth_out_of_memory(self) -> None:
        responses = self.send(request(SASL_AUTH, b"PLAIN", b"", b"x" * (self.settings.max_item_size + 1)) + request(VERSION))
        self.assert_error(responses[0], SASL_AUTH, 0x82)
        self.assertEqual(responses[1].value, b"1.6.18")

    def test_text_request_gets_no_reply(self) -> None:
        self.connection.dataReceived(b"version\r\n")
        self.assertEqual(self.transport.value(), b"")
        self.assert_open()

    def test_text_request_closed_after_header_length(self) -> None:
        self.connection.dataReceived(b"get a b c d e f g h i j k\r\n")
        self.assertEqual(self.transport.value(), b"")
        self.assert_closed()
