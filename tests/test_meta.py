"""
Tests for kvdaemon._meta, the meta commands (mg, ms, md, ma, mn, me), on an
in-memory transport with a fake clock, and for the Store methods they use
(modify, marks).

The expected replies are the ones memcached 1.6.18 sends for the same
requests; test_meta_reference checks them against a real memcached.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from kvdaemon import Settings
from kvdaemon._factory import KVDaemonFactory
from kvdaemon._meta import decode_key, item_size, parse_int32, parse_unsigned, slab_class
from kvdaemon._store import MARK_BINARY_KEY, MARK_STALE, MARK_WIN_SENT, Store
from tests.support import FakeReactor, FakeThreadPool

#: A realistic Unix time, so that relative and absolute expiry times differ.
NOW = 1_700_000_000

CLIENT = IPv4Address("TCP", "127.0.0.1", 40000)

BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
INVALID_OR_DUPLICATE = b"CLIENT_ERROR invalid or duplicate flag\r\n"


class MetaTestCase(SynchronousTestCase):
    """One client connection to a fresh server whose clock starts at ``NOW``."""

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.reactor.advance(NOW)
        self.factory = KVDaemonFactory(Settings(), reactor=self.reactor, threadpool=FakeThreadPool())
        self.store = self.factory.store
        self.stats = self.factory.stats
        self.transport = StringTransport(peerAddress=CLIENT)
        self.protocol = self.factory.buildProtocol(CLIENT)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        """Feed ``data`` to the connection; return what it wrote back."""
        self.transport.clear()
        self.protocol.dataReceived(data)
        return self.transport.value()

    def set_value(self, key: bytes, value: bytes, flags: bytes = b"") -> bytes:
        line = b"ms %s %d" % (key, len(value))
        if flags:
            line += b" " + flags
        return self.send(line + b"\r\n" + value + b"\r\n")

    def cas_of(self, key: bytes) -> int:
        item = self.store.get(key, bump=False)
        assert item is not None
        return item.cas


class GetTests(MetaTestCase):
    """mg and its flags."""

    def test_miss_replies_en(self) -> None:
        self.assertEqual(self.send(b"mg nokey\r\n"), b"EN\r\n")
        self.assertEqual(self.send(b"mg nokey v\r\n"), b"EN\r\n")

    def test_hit_without_value_replies_hd(self) -> None:
        self.set_value(b"k", b"hello")
        self.assertEqual(self.send(b"mg k\r\n"), b"HD\r\n")

    def test_value_flag_sends_data_block(self) -> None:
        self.set_value(b"k", b"hello")
        self.assertEqual(self.send(b"mg k v\r\n"), b"VA 5\r\nhello\r\n")

    def test_return_flags_in_request_order(self) -> None:
        self.set_value(b"k", b"hello", b"F5 T100")
        cas = self.cas_of(b"k")
        reply = self.send(b"mg k s v f t c k O123 h l\r\n")
        self.assertEqual(reply, b"VA 5 s5 f5 t100 c%d kk O123 h0 l0\r\nhello\r\n" % cas)
        reply = self.send(b"mg k O9 l h c t f\r\n")
        self.assertEqual(reply, b"HD O9 l0 h1 c%d t100 f5\r\n" % cas)

    def test_ttl_without_expiry_minus_one(self) -> None:
        self.set_value(b"k", b"v")
        self.assertEqual(self.send(b"mg k t\r\n"), b"HD t-1\r\n")

    def test_ttl_counts_down(self) -> None:
        self.set_value(b"k", b"v", b"T100")
        self.reactor.advance(30)
        self.assertEqual(self.send(b"mg k t\r\n"), b"HD t70\r\n")

    def test_hit_and_access_before_request(self) -> None:
        self.set_value(b"k", b"v")
        self.reactor.advance(5)
        self.assertEqual(self.send(b"mg k h l\r\n"), b"HD h0 l5\r\n")
        self.assertEqual(self.send(b"mg k h l\r\n"), b"HD h1 l0\r\n")

    def test_no_bump_leaves_item_unfetched(self) -> None:
        self.set_value(b"k", b"v")
        self.reactor.advance(5)
        self.assertEqual(self.send(b"mg k u v\r\n"), b"VA 1\r\nv\r\n")
        self.assertEqual(self.send(b"mg k h l u\r\n"), b"HD h0 l5\r\n")
        self.assertEqual(self.send(b"mg k v\r\n"), b"VA 1\r\nv\r\n")
        self.assertEqual(self.send(b"mg k h u\r\n"), b"HD h1\r\n")

    def test_touch_applies_in_flag_order(self) -> None:
        self.set_value(b"k", b"v", b"T100")
        self.assertEqual(self.send(b"mg k t T60\r\n"), b"HD t100\r\n")
        self.assertEqual(self.send(b"mg k t\r\n"), b"HD t60\r\n")
        self.assertEqual(self.send(b"mg k T70 t\r\n"), b"HD t70\r\n")
        self.assertEqual(self.send(b"mg k T0 t\r\n"), b"HD t-1\r\n")

    def test_touch_with_negative_ttl_expires_item(self) -> None:
        self.set_value(b"k", b"v")
        self.assertEqual(self.send(b"mg k T-1\r\n"), b"HD\r\n")
        self.assertEqual(self.send(b"mg k\r\n"), b"EN\r\n")

    def test_miss_echoes_key_and_opaque(self) -> None:
        self.assertEqual(self.send(b"mg nokey k O12 c v\r\n"), b"EN knokey O12\r\n")

    def test_quiet_hides_miss_only(self) -> None:
        self.set_value(b"k", b"v")
        reply = self.send(b"mg nokey q k\r\nmg k q\r\nmg k q v\r\nmn\r\n")
        self.assertEqual(reply, b"HD\r\nVA 1\r\nv\r\nMN\r\n")

    def test_opaque_up_to_32_bytes(self) -> None:
        self.set_value(b"k", b"v")
        opaque = b"O" + b"x" * 31
        self.assertEqual(self.send(b"mg k %s\r\n" % opaque), b"HD %s\r\n" % opaque)

    def test_opaque_over_32_bytes_rejected(self) -> None:
        self.set_value(b"k", b"v")
        opaque = b"O" + b"x" * 32
        for request in (b"mg k %s\r\n", b"mg nokey %s\r\n", b"mg nokey q %s\r\n"):
            self.assertEqual(self.send(request % opaque), b"CLIENT_ERROR opaque token too long\r\n")

    def test_empty_opaque_echoed(self) -> None:
        self.set_value(b"k", b"v")
        self.assertEqual(self.send(b"mg k O\r\n"), b"HD O\r\n")

    def test_proxy_tokens_ignored(self) -> None:
        self.set_value(b"k", b"v")
        self.assertEqual(self.send(b"mg k P/path Lhint v\r\n"), b"VA 1\r\nv\r\n")

    def test_counts_after_stats_reset(self) -> None:
        self.send(b"stats reset\r\n")
        self.send(b"mg nokey\r\n")
        self.assertEqual(self.factory.stats.get_misses, 1)

    def test_counts_gets_and_touches(self) -> None:
        self.set_value(b"k", b"v")
        self.send(b"mg k\r\nmg nokey\r\nmg k T30\r\n")
        self.assertEqual(self.stats.cmd_get, 2)
        self.assertEqual(self.stats.get_hits, 1)
        self.assertEqual(self.stats.get_misses, 1)
        self.assertEqual(self.stats.cmd_touch, 1)
        self.assertEqual(self.stats.touch_hits, 1)

    def test_key_of_250_bytes_accepted(self) -> None:
        key = b"k" * 250
        self.set_value(key, b"v")
        self.assertEqual(self.send(b"mg %s k\r\n" % key), b"HD k%s\r\n" % key)

    def test_key_of_251_bytes_rejected(self) -> None:
        self.assertEqual(self.send(b"mg %s v\r\n" % (b"k" * 251)), BAD_FORMAT)

    def test_missing_key_is_unknown_command(self) -> None:
        self.assertEqual(self.send(b"mg\r\n"), b"ERROR\r\n")


class FlagErrorTests(MetaTestCase):
    """memcached's replies to malformed flags, through mg and ms."""

    def test_repeated_flag(self) -> None:
        self.assertEqual(self.send(b"mg k s v s\r\n"), b"CLIENT_ERROR duplicate flag\r\n")
        self.assertEqual(self.send(b"mg k T1 T2\r\n"), b"CLIENT_ERROR duplicate flag\r\n")

    def test_non_ascii_flag_reported_as_duplicate(self) -> None:
        self.assertEqual(self.send(b"mg k \xff\r\n"), b"CLIENT_ERROR duplicate flag\r\n")

    def test_unknown_flag(self) -> None:
        self.assertEqual(self.send(b"mg k x\r\n"), b"CLIENT_ERROR invalid flag\r\n")

    def test_bad_numeric_tokens(self) -> None:
        for request in (b"mg k Tabc\r\n", b"mg k T\r\n", b"mg k N\r\n", b"mg k Rx\r\n", b"mg k C-1\r\n"):
            self.assertEqual(self.send(request), b"CLIENT_ERROR bad token in command line format\r\n", request)

    def test_unknown_flag_wins_over_bad_token(self) -> None:
        self.assertEqual(self.send(b"mg k Tx x\r\n"), b"CLIENT_ERROR invalid flag\r\n")
        self.assertEqual(self.send(b"mg k x Tx\r\n"), b"CLIENT_ERROR invalid flag\r\n")

    def test_last_bad_token_names_error(self) -> None:
        self.assertEqual(self.send(b"mg !!!! Tx b\r\n"), b"CLIENT_ERROR error decoding key\r\n")
        self.assertEqual(self.send(b"mg !!!! b Tx\r\n"), b"CLIENT_ERROR bad token in command line format\r\n")

    def test_bad_client_flags_keep_generic_error(self) -> None:
        self.assertEqual(self.send(b"mg k Fx\r\n"), BAD_FORMAT)
        self.assertEqual(self.send(b"mg k Tx Fx\r\n"), b"CLIENT_ERROR bad token in command line format\r\n")

    def test_mode_of_wrong_length(self) -> None:
        self.assertEqual(self.send(b"mg k MSS\r\n"), b"CLIENT_ERROR incorrect length for M token\r\n")
        self.assertEqual(self.send(b"mg k M\r\n"), b"CLIENT_ERROR incorrect length for M token\r\n")

    def test_bad_delta_and_initial_value(self) -> None:
        self.assertEqual(self.send(b"mg k Dx\r\n"), b"CLIENT_ERROR invalid numeric delta value\r\n")
        self.assertEqual(self.send(b"mg k Jx\r\n"), b"CLIENT_ERROR invalid numeric initial value\r\n")

    def test_too_many_tokens(self) -> None:
        flags = b" ".join(b"%c" % letter for letter in b"abcdefghijklmnopq")
        self.assertEqual(self.send(b"mg k %s r\r\n" % flags), b"CLIENT_ERROR options flags are too long\r\n")
        # 19 tokens are allowed, so the parser reaches the repeated flag.
        self.assertEqual(self.send(b"mg k" + b" t" * 17 + b"\r\n"), b"CLIENT_ERROR duplicate flag\r\n")

    def test_rejection_logged_with_peer(self) -> None:
        with capturedLogs() as events:
            self.send(b"mg k x\r\n")
        rejections = [event for event in events if event.get("command") == b"mg"]
        self.assertEqual(len(rejections), 1)
        self.assertEqual(rejections[0]["peer"], "tcp:127.0.0.1:40000")
        self.assertEqual(rejections[0]["reply"], b"CLIENT_ERROR invalid flag\r\n")


class Base64KeyTests(MetaTestCase):
    """The b flag: keys sent base64-encoded."""

    def test_stored_under_decoded_key(self) -> None:
        self.assertEqual(self.set_value(b"Zm9v", b"bar", b"b"), b"HD\r\n")
        self.assertEqual(self.send(b"mg foo v\r\n"), b"VA 3\r\nbar\r\n")

    def test_key_returned_encoded(self) -> None:
        self.set_value(b"AAEC", b"x", b"b")
        self.assertEqual(self.send(b"mg AAEC b k v\r\n"), b"VA 1 kAAEC b\r\nx\r\n")

    def test_item_remembers_encoding(self) -> None:
        self.set_value(b"Zm9v", b"bar", b"b")
        self.assertEqual(self.send(b"mg foo k\r\n"), b"HD kZm9v b\r\n")
        self.assertEqual(self.store.marks(b"foo"), MARK_BINARY_KEY)

    def test_plain_set_forgets_encoding(self) -> None:
        self.set_value(b"Zm9v", b"bar", b"b")
        self.set_value(b"foo", b"baz")
        self.assertEqual(self.send(b"mg foo k\r\n"), b"HD kfoo\r\n")

    def test_miss_returns_encoded_key(self) -> None:
        self.assertEqual(self.send(b"mg Zm9v b k\r\n"), b"EN kZm9v b\r\n")

    def test_set_returns_encoded_key(self) -> None:
        reply = self.set_value(b"AAEC", b"x", b"b k O1")
        self.assertEqual(reply, b"HD kAAEC b O1\r\n")

    def test_delete_and_arithmetic_return_encoded_key(self) -> None:
        self.set_value(b"AAEC", b"5", b"b")
        self.assertEqual(self.send(b"ma AAEC b k v\r\n"), b"VA 1 kAAEC b\r\n6\r\n")
        self.assertEqual(self.send(b"md AAEC b k\r\n"), b"HD kAAEC b\r\n")
        self.assertEqual(self.send(b"md AAEC b k\r\n"), b"NF kAAEC b\r\n")

    def test_undecodable_key_rejected(self) -> None:
        for key in (b"Zm9", b"!!!!", b"Zm9v=", b"Zg", b"===="):
            self.assertEqual(self.send(b"mg %s b v\r\n" % key), b"CLIENT_ERROR error decoding key\r\n", key)
        self.assertEqual(self.send(b"md Zm9 b\r\n"), INVALID_OR_DUPLICATE)

    def test_decoding_follows_memcached(self) -> None:
        cases = {
            b"Zm9v": b"foo",
            b"Zg==": b"f",
            b"Zm8=": b"fo",
            b"Zg==Zm9v": b"f",
            b"Zh==": b"f",
            b"Zm=v": b"f`",
            b"Zm9v!!": b"foo",
            b"Zm+/": b"fo\xbf",
        }
        for encoded, decoded in cases.items():
            self.assertEqual(decode_key(encoded), decoded, encoded)
        for encoded in (b"Zm9v====", b"A===", b"Zm-_", b"", b"===="):
            self.assertIsNone(decode_key(encoded), encoded)

    def test_vivified_item_not_marked_encoded(self) -> None:
        self.assertEqual(self.send(b"mg AAEC b k N30\r\n"), b"HD k\x00\x01\x02 W\r\n")


class VivifyTests(MetaTestCase):
    """mg's N flag: create an empty item on a miss and hand out a win token."""

    def test_miss_creates_empty_item_and_wins(self) -> None:
        self.assertEqual(self.send(b"mg k N30 t v s f\r\n"), b"VA 0 t30 s0 f0 W\r\n\r\n")
        self.assertEqual(self.store.get(b"k", bump=False).value, b"")

    def test_later_requests_see_token_sent(self) -> None:
        self.send(b"mg k N30\r\n")
        self.assertEqual(self.send(b"mg k N30 t\r\n"), b"HD t30 Z\r\n")

    def test_ttl_set_in_flag_order(self) -> None:
        self.assertEqual(self.send(b"mg k t N30\r\n"), b"HD t-1 W\r\n")
        self.assertEqual(self.send(b"mg k t\r\n"), b"HD t30 Z\r\n")

    def test_zero_ttl_never_expires(self) -> None:
        self.assertEqual(self.send(b"mg k N0 t\r\n"), b"HD t-1 W\r\n")

    def test_negative_ttl_item_gone_after_reply(self) -> None:
        self.assertEqual(self.send(b"mg k N-1\r\n"), b"HD W\r\n")
        self.assertEqual(self.send(b"mg k\r\n"), b"EN\r\n")

    def test_existing_item_not_replaced(self) -> None:
        self.set_value(b"k", b"abc")
        self.assertEqual(self.send(b"mg k N30 t v\r\n"), b"VA 3 t-1\r\nabc\r\n")

    def test_vivified_item_fetched_unless_no_bump(self) -> None:
        self.send(b"mg a N30\r\nmg b N30 u\r\n")
        self.assertTrue(self.store.get(b"a", bump=False).fetched)
        self.assertFalse(self.store.get(b"b", bump=False).fetched)

    def test_explicit_cas_for_vivified_item(self) -> None:
        self.assertEqual(self.send(b"mg k N30 E777 c\r\n"), b"HD c777 W\r\n")
        self.assertEqual(self.cas_of(b"k"), 777)


class RecacheTests(MetaTestCase):
    """mg's R flag: win the right to recache an item that expires soon."""

    def test_wins_when_ttl_below_token(self) -> None:
        self.set_value(b"k", b"v", b"T10")
        self.assertEqual(self.send(b"mg k R30 t\r\n"), b"HD t10 W\r\n")

    def test_second_client_sees_token_sent(self) -> None:
        self.set_value(b"k", b"v", b"T10")
        self.send(b"mg k R30\r\n")
        self.assertEqual(self.send(b"mg k R30 t\r\n"), b"HD t10 Z\r\n")
        self.assertEqual(self.send(b"mg k t\r\n"), b"HD t10 Z\r\n")

    def test_ttl_above_token_does_not_win(self) -> None:
        self.set_value(b"k", b"v", b"T100")
        self.assertEqual(self.send(b"mg k R30\r\n"), b"HD\r\n")
        self.reactor.advance(80)
        self.assertEqual(self.send(b"mg k R30\r\n"), b"HD W\r\n")

    def test_item_without_expiry_never_wins(self) -> None:
        self.set_value(b"k", b"v")
        self.assertEqual(self.send(b"mg k R30\r\n"), b"HD\r\n")

    def test_new_value_clears_token(self) -> None:
        self.set_value(b"k", b"v", b"T10")
        self.send(b"mg k R30\r\n")
        self.set_value(b"k", b"v2", b"T10")
        self.assertEqual(self.send(b"mg k R30\r\n"), b"HD W\r\n")


class StaleTests(MetaTestCase):
    """Invalidation: md with I, and ms with I and an older CAS value."""

    def test_invalidated_item_served_stale(self) -> None:
        self.set_value(b"k", b"hi", b"T100")
        old_cas = self.cas_of(b"k")
        self.assertEqual(self.send(b"md k I T30\r\n"), b"HD\r\n")
        new_cas = self.cas_of(b"k")
        self.assertNotEqual(new_cas, old_cas)
        self.assertEqual(self.send(b"mg k v c t\r\n"), b"VA 2 c%d t30 X W\r\nhi\r\n" % new_cas)
        self.assertEqual(self.send(b"mg k v c t\r\n"), b"VA 2 c%d t30 Z X\r\nhi\r\n" % new_cas)

    def test_invalidation_keeps_ttl_without_token(self) -> None:
        self.set_value(b"k", b"hi", b"T100")
        self.send(b"md k I\r\n")
        self.assertEqual(self.send(b"mg k t\r\n"), b"HD t100 X W\r\n")

    def test_invalidating_again_hands_out_new_win(self) -> None:
        self.set_value(b"k", b"hi")
        self.send(b"md k I\r\nmg k\r\n")
        self.assertEqual(self.send(b"md k I q\r\nmn\r\n"), b"MN\r\n")
        self.assertEqual(self.send(b"mg k\r\n"), b"HD X W\r\n")

    def test_older_cas_stores_stale_value(self) -> None:
        self.set_value(b"k", b"hi", b"T100")
        self.send(b"md k I T30\r\nmg k\r\n")
        stale_cas = self.cas_of(b"k")
        reply = self.set_value(b"k", b"new", b"C%d I c" % (stale_cas - 1))
        new_cas = self.cas_of(b"k")
        self.assertEqual(reply, b"HD c%d\r\n" % new_cas)
        # The old expiry time and the sent win token are kept.
        self.assertEqual(self.send(b"mg k v t\r\n"), b"VA 3 t30 Z X\r\nnew\r\n")

    def test_newer_cas_rejected(self) -> None:
        self.set_value(b"k", b"hi")
        cas = self.cas_of(b"k")
        self.assertEqual(self.set_value(b"k", b"new", b"C%d I c" % (cas + 1)), b"EX c0\r\n")

    def test_matching_cas_stores_fresh_value(self) -> None:
        self.set_value(b"k", b"hi", b"T100")
        self.send(b"md k I\r\n")
        cas = self.cas_of(b"k")
        self.set_value(b"k", b"new", b"C%d I" % cas)
        self.assertEqual(self.send(b"mg k v t\r\n"), b"VA 3 t-1\r\nnew\r\n")

    def test_plain_set_clears_stale(self) -> None:
        self.set_value(b"k", b"hi")
        self.send(b"md k I\r\n")
        self.set_value(b"k", b"new")
        self.assertEqual(self.send(b"mg k\r\n"), b"HD\r\n")
        self.assertEqual(self.store.marks(b"k"), 0)

    def test_invalidation_with_explicit_cas(self) -> None:
        self.set_value(b"k", b"hi")
        self.send(b"md k I E4242\r\n")
        self.assertEqual(self.send(b"mg k c\r\n"), b"HD c4242 X W\r\n")

    def test_invalidation_of_missing_item(self) -> None:
        self.assertEqual(self.send(b"md k I T30\r\n"), b"NF\r\n")

    def test_invalidation_with_negative_ttl_removes_item(self) -> None:
        self.set_value(b"k", b"hi")
        self.assertEqual(self.send(b"md k I T-1\r\n"), b"HD\r\n")
        self.assertEqual(self.send(b"mg k\r\n"), b"EN\r\n")


class SetTests(MetaTestCase):
    """ms, its modes and flags."""

    def test_stores_value_flags_and_ttl(self) -> None:
        self.assertEqual(self.set_value(b"k", b"hello", b"F7 T100"), b"HD\r\n")
        item = self.store.get(b"k", bump=False)
        self.assertEqual(item.value, b"hello")
        self.assertEqual(item.flags, 7)
        self.assertEqual(item.exptime, NOW + 100)

    def test_reply_flags_in_request_order(self) -> None:
        reply = self.set_value(b"k", b"v", b"c k O9")
        self.assertEqual(reply, b"HD c%d kk O9\r\n" % self.cas_of(b"k"))

    def test_ignored_flags(self) -> None:
        self.assertEqual(self.set_value(b"k", b"abc", b"t f s h l u N0 R0 v J1 D1 P1 L2 I"), b"HD\r\n")
        self.assertEqual(self.store.get(b"k", bump=False).value, b"abc")

    def test_empty_value(self) -> None:
        self.assertEqual(self.send(b"ms k 0\r\n\r\n"), b"HD\r\n")
        self.assertEqual(self.send(b"mg k v s\r\n"), b"VA 0 s0\r\n\r\n")

    def test_add_mode(self) -> None:
        self.assertEqual(self.set_value(b"k", b"a", b"ME"), b"HD\r\n")
        self.assertEqual(self.set_value(b"k", b"b", b"ME c"), b"NS c0\r\n")
        self.assertEqual(self.store.get(b"k", bump=False).value, b"a")

    def test_add_mode_ignores_compare_cas(self) -> None:
        self.assertEqual(self.set_value(b"k", b"a", b"ME C1"), b"HD\r\n")

    def test_append_prepend_keep_flags(self) -> None:
        self.set_value(b"k", b"hi", b"F3 T100")
        self.assertEqual(self.set_value(b"k", b"XX", b"MA F5 T0"), b"HD\r\n")
        self.assertEqual(self.set_value(b"k", b"ZZ", b"MP"), b"HD\r\n")
        self.assertEqual(self.send(b"mg k v f t\r\n"), b"VA 6 f3 t100\r\nZZhiXX\r\n")

    def test_append_and_prepend_to_missing_item(self) -> None:
        self.assertEqual(self.set_value(b"k", b"YY", b"MA"), b"NS\r\n")
        self.assertEqual(self.set_value(b"k", b"YY", b"MP C5"), b"NS\r\n")

    def test_append_compares_nonzero_cas(self) -> None:
        self.set_value(b"k", b"hi")
        cas = self.cas_of(b"k")
        self.assertEqual(self.set_value(b"k", b"X", b"MA C%d" % (cas + 1)), b"EX\r\n")
        self.assertEqual(self.set_value(b"k", b"X", b"MA C0"), b"HD\r\n")
        self.assertEqual(self.set_value(b"k", b"Y", b"MA C%d" % self.cas_of(b"k")), b"HD\r\n")
        self.assertEqual(self.store.get(b"k", bump=False).value, b"hiXY")

    def test_replace_mode(self) -> None:
        self.assertEqual(self.set_value(b"k", b"a", b"MR"), b"NS\r\n")
        self.set_value(b"k", b"a")
        self.assertEqual(self.set_value(b"k", b"b", b"MR"), b"HD\r\n")

    def test_set_mode_explicit(self) -> None:
        self.assertEqual(self.set_value(b"k", b"a", b"MS"), b"HD\r\n")

    def test_invalid_mode(self) -> None:
        for mode in (b"MX", b"Ms", b"Ma"):
            reply = self.set_value(b"k", b"hi", mode)
            self.assertEqual(reply, b"CLIENT_ERROR invalid mode for ms M token\r\n", mode)

    def test_compare_cas(self) -> None:
        self.assertEqual(self.set_value(b"k", b"a", b"C1 c"), b"NF c0\r\n")
        self.assertEqual(self.set_value(b"k", b"a", b"C1 c MR"), b"NF c0\r\n")
        self.set_value(b"k", b"a")
        cas = self.cas_of(b"k")
        self.assertEqual(self.set_value(b"k", b"b", b"C%d c" % (cas + 1)), b"EX c0\r\n")
        reply = self.set_value(b"k", b"b", b"C%d c" % cas)
        self.assertEqual(reply, b"HD c%d\r\n" % self.cas_of(b"k"))
        self.assertEqual(self.stats.cas_misses, 2)
        self.assertEqual(self.stats.cas_badval, 1)
        self.assertEqual(self.stats.cas_hits, 1)

    def test_compare_cas_zero_never_matches(self) -> None:
        self.set_value(b"k", b"a")
        self.assertEqual(self.set_value(b"k", b"b", b"C0"), b"EX\r\n")
        self.assertEqual(self.set_value(b"k", b"b", b"C-0"), b"EX\r\n")

    def test_explicit_cas(self) -> None:
        self.assertEqual(self.set_value(b"k", b"a", b"E12345 c"), b"HD c12345\r\n")
        self.assertEqual(self.cas_of(b"k"), 12345)
        self.assertEqual(self.set_value(b"k", b"b", b"C12345 E99 c"), b"HD c99\r\n")

    def test_explicit_cas_invalid_token(self) -> None:
        self.assertEqual(self.set_value(b"k", b"a", b"Ex"), b"CLIENT_ERROR bad token in command line format\r\n")

    def test_quiet_hides_stored_only(self) -> None:
        self.set_value(b"k", b"a")
        reply = self.send(
            b"ms k 1 q\r\nb\r\nms k 1 q ME O1 k\r\nb\r\nms new 1 q MR\r\nb\r\nms k 1 q C1\r\nb\r\nmn\r\n"
        )
        self.assertEqual(reply, b"NS O1 kk\r\nNS\r\nEX\r\nMN\r\n")

    def test_client_flags_truncated_to_32_bits(self) -> None:
        self.set_value(b"k", b"v", b"F4294967295")
        self.assertEqual(self.send(b"mg k f\r\n"), b"HD f4294967295\r\n")
        self.set_value(b"k", b"v", b"F4294967296")
        self.assertEqual(self.send(b"mg k f\r\n"), b"HD f0\r\n")
        self.set_value(b"k", b"v", b"F+7")
        self.assertEqual(self.send(b"mg k f\r\n"), b"HD f7\r\n")

    def test_negative_client_flags_rejected(self) -> None:
        self.assertEqual(self.set_value(b"k", b"v", b"F-1"), BAD_FORMAT)

    def test_ttl_truncated_to_32_bits(self) -> None:
        self.assertEqual(self.set_value(b"k", b"v", b"T2147483648"), b"HD\r\n")
        self.assertEqual(self.send(b"mg k\r\n"), b"EN\r\n")

    def test_negative_ttl_stores_nothing(self) -> None:
        self.assertEqual(self.set_value(b"k", b"v", b"T-1"), b"HD\r\n")
        self.assertEqual(self.send(b"mg k\r\n"), b"EN\r\n")

    def test_counts_sets(self) -> None:
        self.set_value(b"k", b"v")
        self.set_value(b"k", b"v", b"ME")
        self.assertEqual(self.stats.cmd_set, 2)


class SetErrorTests(MetaTestCase):
    """ms requests memcached rejects, and whether it skips their data."""

    def test_line_errors_do_not_skip_data(self) -> None:
        cases = [
            (b"ms\r\nhi\r\n", b"ERROR\r\n"),
            (b"ms k\r\nhi\r\n", BAD_FORMAT),
            (b"ms k abc\r\nhi\r\n", BAD_FORMAT),
            (b"ms k -1\r\nhi\r\n", BAD_FORMAT),
            (b"ms k 2147483646\r\nhi\r\n", BAD_FORMAT),
            (b"ms %s 2\r\nhi\r\n" % (b"k" * 251), BAD_FORMAT),
            (b"ms k 2 a b c d e f g h i j k l m n o p q\r\nhi\r\n", b"CLIENT_ERROR options flags too long\r\n"),
        ]
        for request, error in cases:
            # The data line is then read as a command line, and memcached
            # replies ERROR to it.
            self.assertEqual(self.send(request), error + b"ERROR\r\n", request)

    def test_flag_errors_skip_data(self) -> None:
        cases = [
            (b"x", b"CLIENT_ERROR invalid flag\r\n"),
            (b"Fx", BAD_FORMAT),
            (b"Tx", b"CLIENT_ERROR bad token in command line format\r\n"),
            (b"c c", b"CLIENT_ERROR duplicate flag\r\n"),
            (b"S5", b"CLIENT_ERROR invalid flag\r\n"),
            (b"MSS", b"CLIENT_ERROR incorrect length for M token\r\n"),
            (b"MX", b"CLIENT_ERROR invalid mode for ms M token\r\n"),
            (b"O" + b"x" * 32, b"CLIENT_ERROR opaque token too long\r\n"),
            (b"O" + b"x" * 32 + b" MX", b"CLIENT_ERROR invalid mode for ms M token\r\n"),
            (b"b", b"CLIENT_ERROR error decoding key\r\n"),
            (b"q x", b"CLIENT_ERROR invalid flag\r\n"),
        ]
        for flags, error in cases:
            self.assertEqual(self.send(b"ms k 2 %s\r\nhi\r\nmn\r\n" % flags), error + b"MN\r\n", flags)
        self.assertIsNone(self.store.get(b"k"))

    def test_bad_data_chunk(self) -> None:
        self.assertEqual(self.send(b"ms k 2\r\nhello\r\n"), b"CLIENT_ERROR bad data chunk\r\nERROR\r\n")
        self.assertEqual(self.send(b"ms k 2 q\r\nhello\r\n"), b"CLIENT_ERROR bad data chunk\r\nERROR\r\n")
        self.assertIsNone(self.store.get(b"k"))

    def test_data_in_pieces(self) -> None:
        self.assertEqual(self.send(b"ms k 5 c\r\nhe"), b"")
        self.assertEqual(self.send(b"llo\r\n"), b"HD c%d\r\n" % self.cas_of(b"k"))

    def test_too_large_removes_old_item(self) -> None:
        size = Settings().max_item_size + 10
        for mode in (b"", b"MA", b"q"):
            self.set_value(b"k", b"old")
            request = b"ms k %d %s\r\n" % (size, mode) + b"x" * size + b"\r\nmn\r\n"
            self.assertEqual(self.send(request), b"SERVER_ERROR object too large for cache\r\nMN\r\n", mode)
            self.assertIsNone(self.store.get(b"k"))
        self.assertEqual(self.stats.store_too_large, 3)

    def test_append_past_size_limit_not_stored(self) -> None:
        half = Settings().max_item_size // 2 + 100
        self.set_value(b"k", b"x" * half)
        self.assertEqual(self.set_value(b"k", b"x" * half, b"MA c"), b"NS c0\r\n")
        self.assertEqual(len(self.store.get(b"k").value), half)


class DeleteTests(MetaTestCase):
    """md."""

    def test_deletes_item(self) -> None:
        self.set_value(b"k", b"v")
        self.assertEqual(self.send(b"md k\r\n"), b"HD\r\n")
        self.assertIsNone(self.store.get(b"k"))
        self.assertEqual(self.stats.delete_hits, 1)

    def test_missing_item(self) -> None:
        self.assertEqual(self.send(b"md k\r\n"), b"NF\r\n")
        self.assertEqual(self.stats.delete_misses, 1)

    def test_echoes_key_and_opaque_only(self) -> None:
        self.assertEqual(self.send(b"md k k O5 c\r\n"), b"NF kk O5\r\n")

    def test_quiet_hides_deleted_only(self) -> None:
        self.set_value(b"k", b"v")
        reply = self.send(b"md k q\r\nmd k q\r\nmn\r\n")
        self.assertEqual(reply, b"NF\r\nMN\r\n")

    def test_compare_cas(self) -> None:
        self.set_value(b"k", b"v")
        cas = self.cas_of(b"k")
        self.assertEqual(self.send(b"md k C%d k q\r\n" % (cas + 1)), b"EX kk\r\n")
        self.assertEqual(self.send(b"md k C0\r\n"), b"EX\r\n")
        self.assertEqual(self.send(b"md k C%d\r\n" % cas), b"HD\r\n")

    def test_ttl_without_invalidate_still_deletes(self) -> None:
        self.set_value(b"k", b"v")
        self.assertEqual(self.send(b"md k T5\r\n"), b"HD\r\n")
        self.assertIsNone(self.store.get(b"k"))

    def test_every_flag_error_has_one_reply(self) -> None:
        for flags in (b"x", b"k k", b"Cx", b"Zm9 b"):
            self.assertEqual(self.send(b"md k %s\r\n" % flags), INVALID_OR_DUPLICATE, flags)

    def test_line_errors(self) -> None:
        self.assertEqual(self.send(b"md\r\n"), b"ERROR\r\n")
        self.assertEqual(self.send(b"md %s\r\n" % (b"k" * 251)), BAD_FORMAT)
        self.assertEqual(self.send(b"md k O%s\r\n" % (b"x" * 32)), b"CLIENT_ERROR opaque token too long\r\n")
        flags = b" ".join(b"%c" % letter for letter in b"abcdefghijklmnopqr")
        self.assertEqual(self.send(b"md k %s\r\n" % flags), b"CLIENT_ERROR options flags too long\r\n")


class ArithmeticTests(MetaTestCase):
    """ma."""

    def test_missing_item(self) -> None:
        self.assertEqual(self.send(b"ma k\r\n"), b"NF\r\n")
        self.assertEqual(self.send(b"ma k q k O1\r\n"), b"NF kk O1\r\n")
        self.assertEqual(self.stats.incr_misses, 2)

    def test_increments_by_one_by_default(self) -> None:
        self.set_value(b"k", b"5")
        self.assertEqual(self.send(b"ma k\r\n"), b"HD\r\n")
        self.assertEqual(self.send(b"ma k v\r\n"), b"VA 1\r\n7\r\n")
        self.assertEqual(self.stats.incr_hits, 2)

    def test_modes_and_delta(self) -> None:
        self.set_value(b"k", b"50")
        self.assertEqual(self.send(b"ma k v D10 MD\r\n"), b"VA 2\r\n40\r\n")
        self.assertEqual(self.send(b"ma k v D5 M-\r\n"), b"VA 2\r\n35\r\n")
        self.assertEqual(self.send(b"ma k v D5 M+\r\n"), b"VA 2\r\n40\r\n")
        self.assertEqual(self.send(b"ma k v MI\r\n"), b"VA 2\r\n41\r\n")
        self.assertEqual(self.stats.decr_hits, 2)

    def test_decrement_stops_at_zero(self) -> None:
        self.set_value(b"k", b"5")
        self.assertEqual(self.send(b"ma k v D100 MD\r\n"), b"VA 1\r\n0\r\n")

    def test_increment_wraps_at_64_bits(self) -> None:
        self.set_value(b"k", b"18446744073709551615")
        self.assertEqual(self.send(b"ma k v\r\n"), b"VA 1\r\n0\r\n")
        self.assertEqual(self.send(b"ma k v D18446744073709551615\r\n"), b"VA 20\r\n18446744073709551615\r\n")

    def test_shorter_number_padded_in_place(self) -> None:
        self.set_value(b"k", b"10")
        self.assertEqual(self.send(b"ma k MD v\r\n"), b"VA 1\r\n9\r\n")
        self.assertEqual(self.send(b"mg k v\r\n"), b"VA 2\r\n9 \r\n")

    def test_reply_flags_in_request_order(self) -> None:
        self.set_value(b"k", b"1", b"T100")
        reply = self.send(b"ma k v c t k O1\r\n")
        self.assertEqual(reply, b"VA 1 c%d t100 kk O1\r\n2\r\n" % self.cas_of(b"k"))

    def test_ttl_update_in_flag_order(self) -> None:
        self.set_value(b"k", b"1", b"T100")
        self.assertEqual(self.send(b"ma k t T50\r\n"), b"HD t100\r\n")
        self.assertEqual(self.send(b"ma k T40 t\r\n"), b"HD t40\r\n")

    def test_quiet_hides_applied_delta(self) -> None:
        self.set_value(b"k", b"1")
        reply = self.send(b"ma k q\r\nma k q v\r\nma nokey q\r\nma k q C1\r\nmn\r\n")
        self.assertEqual(reply, b"NF\r\nEX\r\nMN\r\n")
        self.assertEqual(self.store.get(b"k").value, b"3")

    def test_vivify_with_initial_value(self) -> None:
        self.assertEqual(self.send(b"ma k N0 J5 v\r\n"), b"VA 1\r\n5\r\n")
        self.assertEqual(self.send(b"ma k v\r\n"), b"VA 1\r\n6\r\n")

    def test_vivify_reply_not_quiet(self) -> None:
        self.assertEqual(self.send(b"ma k N30 q t\r\n"), b"HD t30\r\n")
        self.assertEqual(self.send(b"ma k q\r\nmn\r\n"), b"MN\r\n")

    def test_vivify_ttl_in_flag_order(self) -> None:
        self.assertEqual(self.send(b"ma k t N100 c\r\n"), b"HD t-1 c%d\r\n" % self.cas_of(b"k"))
        self.assertEqual(self.send(b"mg k t\r\n"), b"HD t100\r\n")

    def test_initial_value_without_vivify_ignored(self) -> None:
        self.assertEqual(self.send(b"ma k J5 v\r\n"), b"NF\r\n")

    def test_compare_cas(self) -> None:
        self.set_value(b"k", b"1")
        cas = self.cas_of(b"k")
        self.assertEqual(self.send(b"ma k C%d\r\n" % (cas + 1)), b"EX\r\n")
        self.assertEqual(self.send(b"ma k C%d v\r\n" % cas), b"VA 1\r\n2\r\n")
        self.assertEqual(self.send(b"ma k C0 v\r\n"), b"VA 1\r\n3\r\n")

    def test_explicit_cas(self) -> None:
        self.set_value(b"k", b"1")
        self.assertEqual(self.send(b"ma k E500 c\r\n"), b"HD c500\r\n")
        self.assertEqual(self.send(b"ma nokey N0 E600 c\r\n"), b"HD c600\r\n")

    def test_non_numeric_value(self) -> None:
        for value in (b"abc", b"", b"-12", b"1234567890123456789012"):
            self.set_value(b"k", value)
            reply = self.send(b"ma k q\r\n")
            self.assertEqual(reply, b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n", value)

    def test_stale_mark_kept_in_place(self) -> None:
        self.set_value(b"k", b"10")
        self.send(b"md k I\r\nma k\r\n")
        self.assertEqual(self.store.marks(b"k"), MARK_STALE)
        self.set_value(b"k", b"99")
        self.send(b"md k I\r\nma k\r\n")
        self.assertEqual(self.store.marks(b"k"), 0)

    def test_errors(self) -> None:
        cases = [
            (b"ma\r\n", b"ERROR\r\n"),
            (b"ma %s\r\n" % (b"k" * 251), BAD_FORMAT),
            (b"ma k MX\r\n", b"CLIENT_ERROR invalid mode for ma M token\r\n"),
            (b"ma k MII\r\n", INVALID_OR_DUPLICATE),
            (b"ma k Dx\r\n", INVALID_OR_DUPLICATE),
            (b"ma k D-1\r\n", INVALID_OR_DUPLICATE),
            (b"ma k D18446744073709551616\r\n", INVALID_OR_DUPLICATE),
            (b"ma k x\r\n", INVALID_OR_DUPLICATE),
            (b"ma k a b c d e f g h i j k l m n o p q r\r\n", b"CLIENT_ERROR options flags too long\r\n"),
        ]
        for request, error in cases:
            self.assertEqual(self.send(request), error, request)

    def test_long_opaque_rejected_after_delta_applied(self) -> None:
        self.set_value(b"k", b"1")
        reply = self.send(b"ma k O%s v\r\n" % (b"x" * 32))
        self.assertEqual(reply, b"CLIENT_ERROR opaque token too long\r\n")
        self.assertEqual(self.store.get(b"k").value, b"2")


class NoopAndDebugTests(MetaTestCase):
    """mn and me."""

    def test_noop(self) -> None:
        self.assertEqual(self.send(b"mn\r\n"), b"MN\r\n")
        self.assertEqual(self.send(b"mn extra tokens\r\n"), b"MN\r\n")

    def test_debug_miss(self) -> None:
        self.assertEqual(self.send(b"me k\r\n"), b"EN\r\n")

    def test_debug_fields(self) -> None:
        self.set_value(b"fl", b"hi", b"F7 T100")
        cas = self.cas_of(b"fl")
        self.reactor.advance(3)
        expected = b"ME fl exp=-97 la=3 cas=%d fetch=no cls=1 size=67\r\n" % cas
        self.assertEqual(self.send(b"me fl\r\n"), expected)
        self.send(b"mg fl\r\n")
        expected = b"ME fl exp=-97 la=0 cas=%d fetch=yes cls=1 size=67\r\n" % cas
        self.assertEqual(self.send(b"me fl\r\n"), expected)

    def test_debug_item_without_expiry(self) -> None:
        self.set_value(b"foo", b"bar")
        expected = b"ME foo exp=-1 la=0 cas=%d fetch=no cls=1 size=65\r\n" % self.cas_of(b"foo")
        self.assertEqual(self.send(b"me foo\r\n"), expected)

    def test_debug_base64_key(self) -> None:
        self.set_value(b"Zm9v", b"bar", b"b")
        cas = self.cas_of(b"foo")
        expected = b"ME Zm9v exp=-1 la=0 cas=%d fetch=no cls=1 size=65\r\n" % cas
        self.assertEqual(self.send(b"me Zm9v b\r\n"), expected)
        self.assertEqual(self.send(b"me foo\r\n"), expected)
        self.assertEqual(self.send(b"me Zm9v\r\n"), b"EN\r\n")

    def test_debug_errors(self) -> None:
        for request in (b"me\r\n", b"me %s\r\n" % (b"k" * 251), b"me foo b\r\n", b"me a b c\r\n"):
            self.assertEqual(self.send(request), BAD_FORMAT, request)
        self.assertEqual(self.send(b"me a x\r\n"), b"EN\r\n")

    def test_sizes_and_classes_match_memcached(self) -> None:
        # Sizes and classes as memcached 1.6.18 (default settings) shows
        # them in me for values of these lengths under a 3-byte key.
        cases = {0: (62, 1), 40: (102, 2), 60: (122, 3), 200: (262, 6), 1000: (1062, 12), 5000: (5062, 19)}
        for length, (size, cls) in cases.items():
            self.set_value(b"key", b"x" * length)
            item = self.store.get(b"key", bump=False)
            self.assertEqual(item_size(b"key", item), size, length)
            self.assertEqual(slab_class(size), cls, length)
        for size, cls in {20066: 25, 100067: 32, 300067: 37, 500067: 39, 600067: 39, 1048068: 39}.items():
            self.assertEqual(slab_class(size), cls, size)


class NumberParsingTests(SynchronousTestCase):
    """The C library readings of numeric tokens that memcached 1.6.18 uses."""

    def test_int32(self) -> None:
        cases = {
            b"5": 5,
            b"+5": 5,
            b"-5": -5,
            b"5\tjunk": 5,
            b"2147483647": 2147483647,
            b"2147483648": -2147483648,
            b"99999999999": 1215752191,
            b"-2147483649": 2147483647,
        }
        for text, value in cases.items():
            self.assertEqual(parse_int32(text), value, text)
        for text in (b"", b"x", b"5x", b"-", b"9223372036854775808"):
            self.assertIsNone(parse_int32(text), text)

    def test_unsigned(self) -> None:
        cases = {
            (b"4294967295", 32): 4294967295,
            (b"4294967296", 32): 0,
            (b"-0", 32): 0,
            (b"18446744073709551615", 64): 2**64 - 1,
            (b"-18446744073709551615", 64): 1,
        }
        for (text, bits), value in cases.items():
            self.assertEqual(parse_unsigned(text, bits), value, text)
        for text in (b"-1", b"-5", b"18446744073709551616", b"", b"1x"):
            self.assertIsNone(parse_unsigned(text, 64), text)
            self.assertIsNone(parse_unsigned(text, 32), text)


class StoreMetaTests(SynchronousTestCase):
    """The Store methods that only meta commands use: modify and marks."""

    def setUp(self) -> None:
        self.clock = FakeReactor()
        self.clock.advance(NOW)
        self.store = Store(self.clock.seconds)

    def test_modify_without_bump(self) -> None:
        self.store.store("set", b"a", b"1", 0, 0)
        self.clock.advance(10)
        item = self.store.modify(b"a", expires=NOW + 100, cas=77)
        self.assertEqual((item.exptime, item.cas, item.last_access, item.fetched), (NOW + 100, 77, NOW, False))
        self.assertEqual(self.store.get(b"a", bump=False), item)

    def test_modify_keeps_unnamed_fields(self) -> None:
        self.store.store("set", b"a", b"1", 5, 100)
        item = self.store.modify(b"a", cas=9)
        self.assertEqual((item.flags, item.exptime, item.cas), (5, NOW + 100, 9))

    def test_modify_negative_expiry_removes_item(self) -> None:
        self.store.store("set", b"a", b"1", 0, 0)
        self.assertIsNone(self.store.modify(b"a", expires=-1))
        self.assertIsNone(self.store.get(b"a"))
        self.assertEqual(self.store.bytes_used, 0)

    def test_modify_missing_item(self) -> None:
        self.assertIsNone(self.store.modify(b"a", expires=0))

    def test_marks_follow_item(self) -> None:
        self.store.store("set", b"a", b"1", 0, 0)
        self.store.set_marks(b"a", MARK_STALE | MARK_WIN_SENT)
        self.assertEqual(self.store.marks(b"a"), MARK_STALE | MARK_WIN_SENT)
        self.store.set_marks(b"a", 0)
        self.assertEqual(self.store.marks(b"a"), 0)

    def test_new_item_has_no_marks(self) -> None:
        self.store.store("set", b"a", b"1", 0, 0)
        self.store.set_marks(b"a", MARK_STALE)
        self.store.store("set", b"a", b"2", 0, 0)
        self.assertEqual(self.store.marks(b"a"), 0)

    def test_marks_of_missing_item(self) -> None:
        self.store.set_marks(b"a", MARK_STALE)
        self.assertEqual(self.store.marks(b"a"), 0)

    def test_marks_survive_touch(self) -> None:
        self.store.store("set", b"a", b"1", 0, 0)
        self.store.set_marks(b"a", MARK_STALE)
        self.store.touch(b"a", 100)
        self.assertEqual(self.store.marks(b"a"), MARK_STALE)

    def test_marks_of_deleted_items_pruned(self) -> None:
        for number in range(1100):
            key = b"k%d" % number
            self.store.store("set", key, b"v", 0, 0)
            self.store.set_marks(key, MARK_STALE)
            self.store.delete(key)
        self.assertLess(len(self.store._marks), 1100)
