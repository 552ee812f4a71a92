"""
Tests for kvdaemon._store: item storage, memcached's expiry rules, CAS
uniques, counters, LRU eviction and the ordered, thread-safe scan.
"""

from __future__ import annotations

import threading

from hypothesis import given, settings as hypothesis_settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from kvdaemon._store import (
    BUMP_INTERVAL,
    ITEM_OVERHEAD,
    MAX_RELATIVE_EXPIRY,
    Store,
    StoreResult,
    absolute_expiry,
    parse_counter,
)

#: A realistic Unix time, so that relative and absolute expiry times differ.
NOW = 1_700_000_000


def make_store(**kwargs) -> tuple[Store, Clock]:
    clock = Clock()
    clock.advance(NOW)
    return Store(clock.seconds, **kwargs), clock


def item_size(key: bytes, value: bytes) -> int:
    """The bytes one item counts against ``max_memory``."""
    return len(key) + len(value) + ITEM_OVERHEAD


class AbsoluteExpiryTests(SynchronousTestCase):
    """memcached's reading of a protocol expiry time."""

    def test_zero_never_expires(self) -> None:
        self.assertEqual(absolute_expiry(0, NOW), 0)

    def test_relative_up_to_thirty_days(self) -> None:
        self.assertEqual(absolute_expiry(1, NOW), NOW + 1)
        self.assertEqual(absolute_expiry(MAX_RELATIVE_EXPIRY, NOW), NOW + MAX_RELATIVE_EXPIRY)

    def test_absolute_past_thirty_days(self) -> None:
        self.assertEqual(absolute_expiry(MAX_RELATIVE_EXPIRY + 1, NOW), -1)
        self.assertEqual(absolute_expiry(NOW + 5, NOW), NOW + 5)

    def test_absolute_in_past_expired(self) -> None:
        self.assertEqual(absolute_expiry(NOW - 5, NOW), -1)
        self.assertEqual(absolute_expiry(NOW, NOW), -1)

    def test_negative_expired(self) -> None:
        self.assertEqual(absolute_expiry(-1, NOW), -1)
        self.assertEqual(absolute_expiry(-(2**31), NOW), -1)


class ParseCounterTests(SynchronousTestCase):
    """Stored values read as incr/decr counters, as memcached's strtoull check does."""

    def test_numbers(self) -> None:
        cases = {
            b"0": 0,
            b"5": 5,
            b" 5": 5,
            b"\t5": 5,
            b"5 ": 5,
            b"5 apples": 5,
            b"5\x00x": 5,
            b"+7": 7,
            b"-0": 0,
            b"007": 7,
            b"18446744073709551615": 2**64 - 1,
        }
        for digits, expected in cases.items():
            self.assertEqual(parse_counter(digits), expected, digits)

    def test_not_numbers(self) -> None:
        for digits in [b"", b" ", b"x", b"5x", b"-5", b"--5", b"0x10", b"1.5", b"18446744073709551616"]:
            self.assertIsNone(parse_counter(digits), digits)


class StoreModeTests(SynchronousTestCase):
    """The storage modes: set, add, replace, append, prepend, cas."""

    def setUp(self) -> None:
        self.store, self.clock = make_store()

    def test_set_then_get(self) -> None:
        result, cas = self.store.store("set", b"k", b"value", 42, 0)
        self.assertEqual(result, StoreResult.STORED)
        item = self.store.get(b"k")
        self.assertEqual(item.value, b"value")
        self.assertEqual(item.flags, 42)
        self.assertEqual(item.cas, cas)
        self.assertEqual(item.exptime, 0)

    def test_flags_full_32_bits(self) -> None:
        self.store.store("set", b"k", b"v", 2**32 - 1, 0)
        self.assertEqual(self.store.get(b"k").flags, 2**32 - 1)

    def test_get_missing(self) -> None:
        self.assertIsNone(self.store.get(b"missing"))

    def test_add_only_when_missing(self) -> None:
        self.assertEqual(self.store.store("add", b"k", b"one", 0, 0)[0], StoreResult.STORED)
        self.assertEqual(self.store.store("add", b"k", b"two", 0, 0)[0], StoreResult.NOT_STORED)
        self.assertEqual(self.store.get(b"k").value, b"one")

    def test_add_over_expired_item(self) -> None:
        self.store.store("set", b"k", b"old", 0, 10)
        self.clock.advance(10)
        self.assertEqual(self.store.store("add", b"k", b"new", 0, 0)[0], StoreResult.STORED)
        self.assertEqual(self.store.get(b"k").value, b"new")

    def test_replace_only_when_present(self) -> None:
        self.assertEqual(self.store.store("replace", b"k", b"x", 0, 0)[0], StoreResult.NOT_STORED)
        self.assertIsNone(self.store.get(b"k"))
        self.store.store("set", b"k", b"old", 1, 0)
        self.assertEqual(self.store.store("replace", b"k", b"new", 2, 0)[0], StoreResult.STORED)
        item = self.store.get(b"k")
        self.assertEqual(item.value, b"new")
        self.assertEqual(item.flags, 2)

    def test_append_prepend_keep_flags_and_expiry(self) -> None:
        self.store.store("set", b"k", b"mid", 7, 100)
        self.assertEqual(self.store.store("append", b"k", b">", 9, 0)[0], StoreResult.STORED)
        self.assertEqual(self.store.store("prepend", b"k", b"<", 9, 5000)[0], StoreResult.STORED)
        item = self.store.get(b"k")
        self.assertEqual(item.value, b"<mid>")
        self.assertEqual(item.flags, 7)
        self.assertEqual(item.exptime, NOW + 100)

    def test_append_prepend_missing(self) -> None:
        self.assertEqual(self.store.store("append", b"k", b"x", 0, 0)[0], StoreResult.NOT_STORED)
        self.assertEqual(self.store.store("prepend", b"k", b"x", 0, 0)[0], StoreResult.NOT_STORED)
        self.assertEqual(len(self.store), 0)

    def test_cas_uniques_increase(self) -> None:
        uniques = [self.store.store("set", b"k%d" % i, b"v", 0, 0)[1] for i in range(5)]
        self.assertEqual(uniques, sorted(set(uniques)))
        self.assertNotIn(0, uniques)

    def test_cas_match_stores(self) -> None:
        _, cas = self.store.store("set", b"k", b"old", 0, 0)
        result, new_cas = self.store.store("cas", b"k", b"new", 3, 0, cas)
        self.assertEqual(result, StoreResult.STORED)
        self.assertGreater(new_cas, cas)
        self.assertEqual(self.store.get(b"k").value, b"new")
        self.assertEqual(self.store.get(b"k").cas, new_cas)

    def test_cas_mismatch_exists(self) -> None:
        _, cas = self.store.store("set", b"k", b"old", 0, 0)
        self.assertEqual(self.store.store("cas", b"k", b"new", 0, 0, cas + 1), (StoreResult.EXISTS, 0))
        self.assertEqual(self.store.get(b"k").value, b"old")

    def test_cas_missing_not_found(self) -> None:
        self.assertEqual(self.store.store("cas", b"k", b"new", 0, 0, 1), (StoreResult.NOT_FOUND, 0))
        self.assertIsNone(self.store.get(b"k"))

    def test_every_change_new_cas(self) -> None:
        _, first = self.store.store("set", b"k", b"1", 0, 0)
        _, second = self.store.store("append", b"k", b"2", 0, 0)
        _, _, third = self.store.incr(b"k", 1)
        self.assertLess(first, second)
        self.assertLess(second, third)
        self.assertEqual(self.store.get(b"k").cas, third)

    def test_touch_keeps_cas(self) -> None:
        _, cas = self.store.store("set", b"k", b"v", 0, 0)
        self.store.touch(b"k", 100)
        self.assertEqual(self.store.get(b"k").cas, cas)

    def test_new_cas_allocates_unique(self) -> None:
        _, cas = self.store.store("set", b"k", b"v", 0, 0)
        self.assertEqual(self.store.new_cas(), cas + 1)
        self.assertEqual(self.store.store("set", b"k", b"v", 0, 0)[1], cas + 2)

    def test_delete(self) -> None:
        self.store.store("set", b"k", b"v", 0, 0)
        self.assertEqual(self.store.delete(b"k"), StoreResult.STORED)
        self.assertIsNone(self.store.get(b"k"))
        self.assertEqual(self.store.delete(b"k"), StoreResult.NOT_FOUND)

    def test_delete_with_cas(self) -> None:
        _, cas = self.store.store("set", b"k", b"v", 0, 0)
        self.assertEqual(self.store.delete(b"k", cas + 1), StoreResult.EXISTS)
        self.assertIsNotNone(self.store.get(b"k"))
        self.assertEqual(self.store.delete(b"k", cas), StoreResult.STORED)
        self.assertIsNone(self.store.get(b"k"))

    def test_delete_many(self) -> None:
        for key in [b"a", b"b", b"c"]:
            self.store.store("set", key, b"v", 0, 0)
        self.assertEqual(self.store.delete_many([b"a", b"c", b"missing"]), 2)
        self.assertEqual(len(self.store), 1)
        self.assertIsNotNone(self.store.get(b"b"))

    def test_bytes_used_returns_to_zero(self) -> None:
        self.store.store("set", b"k", b"value", 0, 0)
        self.assertEqual(self.store.bytes_used, item_size(b"k", b"value"))
        self.store.store("set", b"k", b"longer value", 0, 0)
        self.assertEqual(self.store.bytes_used, item_size(b"k", b"longer value"))
        self.store.store("append", b"k", b"!", 0, 0)
        self.assertEqual(self.store.bytes_used, item_size(b"k", b"longer value!"))
        self.store.delete(b"k")
        self.assertEqual(self.store.bytes_used, 0)

    def test_total_items_counts_links(self) -> None:
        self.store.store("set", b"k", b"1", 0, 0)
        self.store.store("add", b"k", b"2", 0, 0)
        self.store.store("replace", b"k", b"3", 0, 0)
        self.assertEqual(self.store.total_items, 2)


class ItemSizeLimitTests(SynchronousTestCase):
    """The item size limit, counted as memcached 1.6 counts it."""

    def setUp(self) -> None:
        self.store, self.clock = make_store(max_item_size=1024 * 1024)

    def test_fits_boundary_matches_memcached(self) -> None:
        # memcached 1.6.18 with -I 1m stores at most 1048516 value bytes
        # under a one-byte key with flags 0, 1048512 with non-zero flags.
        self.assertTrue(self.store.fits(b"a", 1048516))
        self.assertFalse(self.store.fits(b"a", 1048517))
        self.assertTrue(self.store.fits(b"a", 1048512, flags=1))
        self.assertFalse(self.store.fits(b"a", 1048513, flags=1))
        self.assertTrue(self.store.fits(b"k" * 250, 1048267))
        self.assertFalse(self.store.fits(b"k" * 250, 1048268))

    def test_too_large_set_removes_old(self) -> None:
        self.store.store("set", b"k", b"old", 0, 0)
        result = self.store.store("set", b"k", b"x" * 1048517, 0, 0)
        self.assertEqual(result, (StoreResult.TOO_LARGE, 0))
        self.assertIsNone(self.store.get(b"k"))

    def test_too_large_add_keeps_old(self) -> None:
        self.store.store("set", b"k", b"old", 0, 0)
        self.assertEqual(self.store.store("add", b"k", b"x" * 1048517, 0, 0)[0], StoreResult.TOO_LARGE)
        self.assertEqual(self.store.get(b"k").value, b"old")

    def test_append_past_limit_not_stored(self) -> None:
        self.store.store("set", b"a", b"x" * 1048000, 0, 0)
        self.assertEqual(self.store.store("append", b"a", b"y" * 1000, 0, 0)[0], StoreResult.NOT_STORED)
        self.assertEqual(self.store.store("prepend", b"a", b"y" * 1000, 0, 0)[0], StoreResult.NOT_STORED)
        self.assertEqual(self.store.get(b"a").value, b"x" * 1048000)

    def test_append_limit_uses_old_flags(self) -> None:
        self.store.store("set", b"a", b"x" * 1048500, 1, 0)
        self.assertEqual(self.store.store("append", b"a", b"y" * 12, 0, 0)[0], StoreResult.STORED)
        self.assertEqual(self.store.store("append", b"a", b"y", 0, 0)[0], StoreResult.NOT_STORED)


class ExpiryTests(SynchronousTestCase):
    """Relative, absolute and negative expiry times, applied lazily."""

    def setUp(self) -> None:
        self.store, self.clock = make_store()

    def test_relative_expiry(self) -> None:
        self.store.store("set", b"k", b"v", 0, 10)
        self.clock.advance(9)
        self.assertIsNotNone(self.store.get(b"k"))
        self.clock.advance(1)
        self.assertIsNone(self.store.get(b"k"))

    def test_thirty_days_still_relative(self) -> None:
        self.store.store("set", b"k", b"v", 0, MAX_RELATIVE_EXPIRY)
        self.assertEqual(self.store.get(b"k").exptime, NOW + MAX_RELATIVE_EXPIRY)
        self.clock.advance(MAX_RELATIVE_EXPIRY - 1)
        self.assertIsNotNone(self.store.get(b"k"))
        self.clock.advance(1)
        self.assertIsNone(self.store.get(b"k"))

    def test_absolute_expiry(self) -> None:
        self.store.store("set", b"k", b"v", 0, NOW + 100)
        self.assertEqual(self.store.get(b"k").exptime, NOW + 100)
        self.clock.advance(99)
        self.assertIsNotNone(self.store.get(b"k"))
        self.clock.advance(1)
        self.assertIsNone(self.store.get(b"k"))

    def test_absolute_past_not_stored_live(self) -> None:
        self.store.store("set", b"k", b"old", 0, 0)
        result, cas = self.store.store("set", b"k", b"new", 0, NOW - 1)
        self.assertEqual(result, StoreResult.STORED)
        self.assertGreater(cas, 0)
        self.assertIsNone(self.store.get(b"k"))

    def test_negative_expiry_removes_old(self) -> None:
        self.store.store("set", b"k", b"old", 0, 0)
        self.assertEqual(self.store.store("set", b"k", b"new", 0, -1)[0], StoreResult.STORED)
        self.assertIsNone(self.store.get(b"k"))
        self.assertEqual(len(self.store), 0)

    def test_zero_never_expires(self) -> None:
        self.store.store("set", b"k", b"v", 0, 0)
        self.clock.advance(10 * MAX_RELATIVE_EXPIRY)
        self.assertIsNotNone(self.store.get(b"k"))

    def test_expiry_is_lazy(self) -> None:
        self.store.store("set", b"k", b"v", 0, 1)
        self.clock.advance(5)
        self.assertEqual(len(self.store), 1)
        self.assertIsNone(self.store.get(b"k"))
        self.assertEqual(len(self.store), 0)
        self.assertEqual(self.store.bytes_used, 0)

    def test_expired_lookup_counters(self) -> None:
        self.store.store("set", b"fetched", b"v", 0, 1)
        self.store.store("set", b"unfetched", b"v", 0, 1)
        self.store.get(b"fetched")
        self.clock.advance(5)
        self.assertIsNone(self.store.get(b"fetched"))
        self.assertIsNone(self.store.get(b"unfetched"))
        self.assertEqual(self.store.get_expired, 2)
        self.assertEqual(self.store.expired_unfetched, 1)
        self.assertEqual(self.store.reclaimed, 2)
        self.assertEqual(self.store.get_flushed, 0)

    def test_touch_sets_new_expiry(self) -> None:
        self.store.store("set", b"k", b"v", 0, 10)
        item = self.store.touch(b"k", 100)
        self.assertEqual(item.exptime, NOW + 100)
        self.clock.advance(50)
        self.assertIsNotNone(self.store.get(b"k"))

    def test_touch_zero_removes_expiry(self) -> None:
        self.store.store("set", b"k", b"v", 0, 10)
        self.store.touch(b"k", 0)
        self.clock.advance(100)
        self.assertIsNotNone(self.store.get(b"k"))

    def test_touch_negative_expires(self) -> None:
        self.store.store("set", b"k", b"v", 0, 0)
        self.assertEqual(self.store.touch(b"k", -1).value, b"v")
        self.assertIsNone(self.store.get(b"k"))

    def test_touch_missing(self) -> None:
        self.assertIsNone(self.store.touch(b"k", 10))
        self.store.store("set", b"k", b"v", 0, 1)
        self.clock.advance(1)
        self.assertIsNone(self.store.touch(b"k", 10))

    def test_incr_keeps_expiry(self) -> None:
        self.store.store("set", b"k", b"1", 0, 10)
        self.store.incr(b"k", 100)
        self.assertEqual(self.store.get(b"k").exptime, NOW + 10)
        self.clock.advance(10)
        self.assertEqual(self.store.incr(b"k", 1)[0], StoreResult.NOT_FOUND)


class FlushTests(SynchronousTestCase):
    """flush_all, immediate and delayed."""

    def setUp(self) -> None:
        self.store, self.clock = make_store()

    def test_flush_now(self) -> None:
        for key in [b"a", b"b"]:
            self.store.store("set", key, b"v", 0, 0)
        self.store.flush()
        self.assertEqual(len(self.store), 0)
        self.assertEqual(self.store.bytes_used, 0)
        self.assertIsNone(self.store.get(b"a"))
        self.store.store("set", b"a", b"new", 0, 0)
        self.assertEqual(self.store.get(b"a").value, b"new")

    def test_flush_delayed(self) -> None:
        self.store.store("set", b"old", b"v", 0, 0)
        self.store.flush(10)
        self.clock.advance(8)
        self.assertIsNotNone(self.store.get(b"old", bump=False))
        self.clock.advance(2)
        self.assertIsNone(self.store.get(b"old"))
        self.assertEqual(self.store.get_flushed, 1)
        self.clock.advance(1)
        self.store.store("set", b"new", b"v", 0, 0)
        self.assertIsNotNone(self.store.get(b"new"))

    def test_flush_absolute_time(self) -> None:
        self.store.store("set", b"k", b"v", 0, 0)
        self.store.flush(NOW + 10)
        self.clock.advance(8)
        self.assertIsNotNone(self.store.get(b"k", bump=False))
        self.clock.advance(1)
        self.assertIsNone(self.store.get(b"k"))

    def test_flush_absolute_past_flushes_now(self) -> None:
        self.store.store("set", b"k", b"v", 0, 0)
        self.store.flush(NOW - 10)
        self.assertEqual(len(self.store), 0)
        self.assertIsNone(self.store.get(b"k"))

    def test_flush_now_cancels_delayed(self) -> None:
        self.store.flush(10)
        self.store.flush(0)
        self.clock.advance(20)
        self.store.store("set", b"k", b"v", 0, 0)
        self.assertIsNotNone(self.store.get(b"k"))

    def test_delayed_flush_hidden_from_scan(self) -> None:
        self.store.store("set", b"a", b"v", 0, 0)
        self.store.flush(5)
        self.clock.advance(6)
        self.assertEqual(self.store.scan(None, None), [])


class CounterTests(SynchronousTestCase):
    """incr and decr on stored decimal values."""

    def setUp(self) -> None:
        self.store, self.clock = make_store()

    def test_incr_decr(self) -> None:
        self.store.store("set", b"k", b"10", 0, 0)
        self.assertEqual(self.store.incr(b"k", 5)[:2], (StoreResult.STORED, 15))
        self.assertEqual(self.store.incr(b"k", 3, incr=False)[:2], (StoreResult.STORED, 12))
        self.assertEqual(self.store.get(b"k").value, b"12")

    def test_incr_wraps_at_2_64(self) -> None:
        self.store.store("set", b"k", b"18446744073709551615", 0, 0)
        self.assertEqual(self.store.incr(b"k", 1)[1], 0)
        self.store.store("set", b"k", b"18446744073709551610", 0, 0)
        self.assertEqual(self.store.incr(b"k", 2**64 - 1)[1], 18446744073709551609)

    def test_decr_stops_at_zero(self) -> None:
        self.store.store("set", b"k", b"5", 0, 0)
        self.assertEqual(self.store.incr(b"k", 6, incr=False)[1], 0)
        self.assertEqual(self.store.incr(b"k", 1, incr=False)[1], 0)

    def test_shorter_result_padded_in_place(self) -> None:
        self.store.store("set", b"k", b"100", 0, 0)
        self.store.get(b"k")
        total_items = self.store.total_items
        self.assertEqual(self.store.incr(b"k", 1, incr=False)[1], 99)
        self.assertEqual(self.store.get(b"k").value, b"99 ")
        self.assertEqual(self.store.total_items, total_items)
        self.assertEqual(self.store.incr(b"k", 1)[1], 100)
        self.assertEqual(self.store.get(b"k").value, b"100")

    def test_longer_result_grows(self) -> None:
        self.store.store("set", b"k", b"99", 0, 0)
        total_items = self.store.total_items
        self.assertEqual(self.store.incr(b"k", 1)[1], 100)
        self.assertEqual(self.store.get(b"k").value, b"100")
        self.assertEqual(self.store.total_items, total_items + 1)
        self.assertEqual(self.store.bytes_used, item_size(b"k", b"100"))

    def test_incr_keeps_flags(self) -> None:
        self.store.store("set", b"k", b"1", 77, 0)
        self.store.incr(b"k", 1000)
        self.assertEqual(self.store.get(b"k").flags, 77)

    def test_incr_new_cas(self) -> None:
        _, cas = self.store.store("set", b"k", b"1", 0, 0)
        result, value, new_cas = self.store.incr(b"k", 1)
        self.assertGreater(new_cas, cas)
        self.assertEqual(self.store.get(b"k").cas, new_cas)

    def test_incr_missing(self) -> None:
        self.assertEqual(self.store.incr(b"k", 1), (StoreResult.NOT_FOUND, 0, 0))

    def test_incr_non_numeric(self) -> None:
        for value in [b"abc", b"", b"-1", b"1.5", b"18446744073709551616"]:
            self.store.store("set", b"k", value, 0, 0)
            self.assertEqual(self.store.incr(b"k", 1)[0], StoreResult.NON_NUMERIC, value)
            self.assertEqual(self.store.get(b"k").value, value)

    def test_incr_with_cas(self) -> None:
        _, cas = self.store.store("set", b"k", b"1", 0, 0)
        self.assertEqual(self.store.incr(b"k", 1, cas=cas + 1)[0], StoreResult.EXISTS)
        self.assertEqual(self.store.incr(b"k", 1, cas=cas)[:2], (StoreResult.STORED, 2))


class EvictionTests(SynchronousTestCase):
    """LRU eviction at the memory limit."""

    def setUp(self) -> None:
        self.value = b"v" * 50
        self.size = item_size(b"k00", self.value)
        self.store, self.clock = make_store(max_memory=10 * self.size)

    def fill(self, count: int) -> None:
        for i in range(count):
            self.store.store("set", b"k%02d" % i, self.value, 0, 0)

    def test_evicts_oldest_at_limit(self) -> None:
        self.fill(10)
        self.assertEqual(self.store.evictions, 0)
        self.store.store("set", b"new", self.value, 0, 0)
        self.assertEqual(self.store.evictions, 1)
        self.assertIsNone(self.store.get(b"k00"))
        self.assertIsNotNone(self.store.get(b"k01"))
        self.assertLessEqual(self.store.bytes_used, self.store.max_memory)

    def test_recently_used_survives(self) -> None:
        self.fill(10)
        for key in [b"k00", b"k01", b"k02"]:
            self.assertIsNotNone(self.store.get(key))
        for i in range(10, 15):
            self.store.store("set", b"k%02d" % i, self.value, 0, 0)
        self.assertEqual(self.store.evictions, 5)
        for key in [b"k00", b"k01", b"k02"]:
            self.assertIsNotNone(self.store.get(key), key)
        for i in range(3, 8):
            self.assertIsNone(self.store.get(b"k%02d" % i), i)
        for i in range(8, 15):
            self.assertIsNotNone(self.store.get(b"k%02d" % i), i)

    def test_evicted_unfetched_counted(self) -> None:
        self.fill(10)
        self.store.get(b"k00")
        self.clock.advance(BUMP_INTERVAL)
        self.store.get(b"k01")
        for i in range(10, 20):
            self.store.store("set", b"k%02d" % i, self.value, 0, 0)
        self.assertEqual(self.store.evictions, 10)
        self.assertEqual(self.store.evicted_unfetched, 8)

    def test_bump_once_per_interval(self) -> None:
        store, clock = make_store(max_memory=3 * self.size)
        for key in [b"k01", b"k02", b"k03"]:
            store.store("set", key, self.value, 0, 0)
        store.get(b"k01")
        store.get(b"k02")
        clock.advance(BUMP_INTERVAL - 1)
        # k1 was fetched less than BUMP_INTERVAL ago, so it stays where it is.
        store.get(b"k01")
        store.store("set", b"k04", self.value, 0, 0)
        store.store("set", b"k05", self.value, 0, 0)
        self.assertIsNone(store.get(b"k03", bump=False))
        self.assertIsNone(store.get(b"k01", bump=False))
        self.assertIsNotNone(store.get(b"k02", bump=False))

    def test_bump_after_interval(self) -> None:
        store, clock = make_store(max_memory=3 * self.size)
        for key in [b"k01", b"k02", b"k03"]:
            store.store("set", key, self.value, 0, 0)
        store.get(b"k01")
        store.get(b"k02")
        clock.advance(BUMP_INTERVAL)
        store.get(b"k01")
        store.store("set", b"k04", self.value, 0, 0)
        store.store("set", b"k05", self.value, 0, 0)
        self.assertIsNotNone(store.get(b"k01", bump=False))
        self.assertIsNone(store.get(b"k02", bump=False))

    def test_expired_items_not_counted_as_evictions(self) -> None:
        for i in range(10):
            self.store.store("set", b"k%02d" % i, self.value, 0, 1)
        self.clock.advance(2)
        for i in range(10, 15):
            self.store.store("set", b"k%02d" % i, self.value, 0, 0)
        self.assertEqual(self.store.evictions, 0)
        self.assertEqual(self.store.reclaimed, 5)

    def test_failed_add_bumps_existing(self) -> None:
        self.fill(10)
        self.store.store("add", b"k00", self.value, 0, 0)
        self.store.store("set", b"new", self.value, 0, 0)
        self.assertIsNotNone(self.store.get(b"k00"))
        self.assertIsNone(self.store.get(b"k01"))


class ScanTests(SynchronousTestCase):
    """Ordered range reads, the only store API for worker threads."""

    def setUp(self) -> None:
        self.store, self.clock = make_store()

    def keys(self, batch) -> list[bytes]:
        return [key for key, _ in batch]

    def test_bytewise_order(self) -> None:
        keys = [b"b", b"a\x00", b"a", b"\xff", b"A", b"aa", b"\x01", b"ab"]
        for key in keys:
            self.store.store("set", key, b"v", 0, 0)
        self.assertEqual(self.keys(self.store.scan(None, None)), sorted(keys))

    def test_bounds_and_inclusion(self) -> None:
        for key in [b"a", b"b", b"c", b"d"]:
            self.store.store("set", key, key.upper(), 0, 0)
        self.assertEqual(self.keys(self.store.scan(b"b", b"c")), [b"b", b"c"])
        self.assertEqual(self.keys(self.store.scan(b"b", b"c", (False, True))), [b"c"])
        self.assertEqual(self.keys(self.store.scan(b"b", b"c", (True, False))), [b"b"])
        self.assertEqual(self.keys(self.store.scan(b"b", b"c", (False, False))), [])
        self.assertEqual(self.keys(self.store.scan(b"bb", None)), [b"c", b"d"])
        self.assertEqual(self.keys(self.store.scan(None, b"b")), [b"a", b"b"])

    def test_items_carry_fields(self) -> None:
        _, cas = self.store.store("set", b"k", b"value", 9, 100)
        [(key, item)] = self.store.scan(None, None)
        self.assertEqual(key, b"k")
        self.assertEqual(item.value, b"value")
        self.assertEqual(item.flags, 9)
        self.assertEqual(item.exptime, NOW + 100)
        self.assertEqual(item.cas, cas)

    def test_limit(self) -> None:
        for i in range(10):
            self.store.store("set", b"k%d" % i, b"v", 0, 0)
        self.assertEqual(self.keys(self.store.scan(None, None, limit=3)), [b"k0", b"k1", b"k2"])

    def test_skips_expired(self) -> None:
        self.store.store("set", b"a", b"v", 0, 0)
        self.store.store("set", b"b", b"v", 0, 1)
        self.store.store("set", b"c", b"v", 0, 0)
        self.clock.advance(1)
        self.assertEqual(self.keys(self.store.scan(None, None)), [b"a", b"c"])
        self.assertEqual(self.keys(self.store.scan(None, None, limit=2)), [b"a", b"c"])

    def test_scan_does_not_bump(self) -> None:
        size = item_size(b"k0", b"v")
        store, _ = make_store(max_memory=2 * size)
        store.store("set", b"k0", b"v", 0, 0)
        store.store("set", b"k1", b"v", 0, 0)
        store.scan(None, None)
        store.store("set", b"k2", b"v", 0, 0)
        self.assertIsNone(store.get(b"k0"))

    def test_scan_thread_safe(self) -> None:
        """
        A worker thread scanning in batches while another thread writes
        returns every key that stays unchanged exactly once, in order.
        """
        stable = [b"s%05d" % i for i in range(0, 4000, 2)]
        for key in stable:
            self.store.store("set", key, b"stable", 0, 0)
        errors: list[BaseException] = []
        scans: list[list[bytes]] = []
        done = threading.Event()

        def scan_repeatedly() -> None:
            try:
                while not done.is_set() or not scans:
                    seen: list[bytes] = []
                    batch = self.store.scan(None, None, limit=37)
                    while batch:
                        seen.extend(key for key, _ in batch)
                        batch = self.store.scan(batch[-1][0], None, (False, True), limit=37)
                    scans.append(seen)
            except BaseException as error:
                errors.append(error)

        worker = threading.Thread(target=scan_repeatedly)
        worker.start()
        try:
            for round_number in range(20):
                for i in range(1, 4000, 2):
                    key = b"s%05d" % i
                    if (i + round_number) % 3:
                        self.store.store("set", key, b"volatile", 0, 0)
                    else:
                        self.store.delete(key)
        finally:
            done.set()
            worker.join(30)
        self.assertFalse(worker.is_alive())
        self.assertEqual(errors, [])
        self.assertTrue(scans)
        for seen in scans:
            self.assertEqual(seen, sorted(set(seen)))
            self.assertEqual([key for key in seen if int(key[1:]) % 2 == 0], stable)


class ModelItem:
    """The model's view of one item."""

    def __init__(self, value: bytes, flags: int, expires: int, cas: int) -> None:
        self.value = value
        self.flags = flags
        self.expires = expires
        self.cas = cas


class StoreModel:
    """
    A plain-dict model of the store's documented rules, without eviction,
    to check :class:`Store` against.
    """

    def __init__(self, max_item_size: int) -> None:
        self.max_item_size = max_item_size
        self.items: dict[bytes, ModelItem] = {}
        self.next_cas = 1
        self.now = NOW

    def fits(self, key: bytes, value: bytes, flags: int) -> bool:
        return len(key) + len(value) + 59 + (4 if flags else 0) <= self.max_item_size

    def live(self, key: bytes) -> ModelItem | None:
        item = self.items.get(key)
        if item is not None and item.expires and item.expires <= self.now:
            del self.items[key]
            return None
        return item

    def take_cas(self) -> int:
        self.next_cas += 1
        return self.next_cas - 1

    def store(self, mode: str, key: bytes, value: bytes, flags: int, exptime: int, cas: int) -> tuple[str, int]:
        if not self.fits(key, value, flags):
            if mode == "set":
                self.items.pop(key, None)
            return StoreResult.TOO_LARGE, 0
        old = self.live(key)
        if mode == "add" and old is not None:
            return StoreResult.NOT_STORED, 0
        if mode in ("replace", "append", "prepend") and old is None:
            return StoreResult.NOT_STORED, 0
        if mode == "cas":
            if old is None:
                return StoreResult.NOT_FOUND, 0
            if old.cas != cas:
                return StoreResult.EXISTS, 0
        if mode in ("append", "prepend"):
            value = old.value + value if mode == "append" else value + old.value
            if not self.fits(key, value, old.flags):
                return StoreResult.NOT_STORED, 0
            flags, expires = old.flags, old.expires
        else:
            expires = absolute_expiry(exptime, self.now)
            if expires < 0:
                self.items.pop(key, None)
                return StoreResult.STORED, self.take_cas()
        new_cas = self.take_cas()
        self.items[key] = ModelItem(value, flags, expires, new_cas)
        return StoreResult.STORED, new_cas

    def incr(self, key: bytes, delta: int, incr: bool) -> tuple[str, int]:
        item = self.live(key)
        if item is None:
            return StoreResult.NOT_FOUND, 0
        current = parse_counter(item.value)
        if current is None:
            return StoreResult.NON_NUMERIC, 0
        current = (current + delta) % 2**64 if incr else max(current - delta, 0)
        digits = b"%d" % current
        item.value = digits.ljust(len(item.value)) if len(digits) <= len(item.value) else digits
        item.cas = self.take_cas()
        return StoreResult.STORED, current

    def touch(self, key: bytes, exptime: int) -> bool:
        item = self.live(key)
        if item is None:
            return False
        expires = absolute_expiry(exptime, self.now)
        if expires < 0:
            del self.items[key]
        else:
            item.expires = expires
        return True


_MODEL_KEYS = st.sampled_from([b"a", b"\xff"])
_MODEL_VALUES = st.sampled_from([b"", b"0", b"7", b"99", b"100", b" 5", b"abc", b"x" * 60, b"18446744073709551615"])
_MODEL_EXPTIMES = st.sampled_from([0, 1, 5, -1, NOW + 3, NOW - 3, MAX_RELATIVE_EXPIRY + 1])
_MODEL_OPERATIONS = st.one_of(
    st.tuples(
        st.sampled_from(["set", "add", "replace", "append", "prepend", "cas"]),
        _MODEL_KEYS,
        _MODEL_VALUES,
        st.sampled_from([0, 1, 2**32 - 1]),
        _MODEL_EXPTIMES,
        st.booleans(),
    ),
    st.tuples(st.just("incr"), _MODEL_KEYS, st.sampled_from([0, 1, 5, 2**64 - 1]), st.booleans()),
    st.tuples(st.just("delete"), _MODEL_KEYS),
    st.tuples(st.just("touch"), _MODEL_KEYS, _MODEL_EXPTIMES),
    st.tuples(st.just("get"), _MODEL_KEYS),
    st.tuples(st.just("advance"), st.integers(0, 4)),
    st.tuples(st.just("flush")),
)


class StoreModelTests(SynchronousTestCase):
    """Random operation sequences: the store agrees with a plain-dict model."""

    @hypothesis_settings(max_examples=500, deadline=None)
    @given(st.lists(_MODEL_OPERATIONS, max_size=40))
    def test_store_matches_model(self, operations) -> None:
        store, clock = make_store(max_item_size=200)
        model = StoreModel(max_item_size=200)
        for operation in operations:
            name = operation[0]
            if name == "advance":
                clock.advance(operation[1])
                model.now += operation[1]
            elif name == "flush":
                store.flush()
                model.items.clear()
            elif name == "get":
                item = store.get(operation[1])
                expected = model.live(operation[1])
                if expected is None:
                    self.assertIsNone(item, operation)
                else:
                    self.assertEqual(
                        (item.value, item.flags, item.exptime, item.cas),
                        (expected.value, expected.flags, expected.expires, expected.cas),
                        operation,
                    )
            elif name == "delete":
                expected = StoreResult.STORED if model.live(operation[1]) is not None else StoreResult.NOT_FOUND
                model.items.pop(operation[1], None)
                self.assertEqual(store.delete(operation[1]), expected, operation)
            elif name == "incr":
                _, key, delta, incr = operation
                self.assertEqual(store.incr(key, delta, incr)[:2], model.incr(key, delta, incr), operation)
            elif name == "touch":
                _, key, exptime = operation
                self.assertEqual(store.touch(key, exptime) is not None, model.touch(key, exptime), operation)
            else:
                mode, key, value, flags, exptime, use_current_cas = operation
                current = model.live(key)
                cas = current.cas if use_current_cas and current is not None else 10**9
                result = store.store(mode, key, value, flags, exptime, cas)
                self.assertEqual(result, model.store(mode, key, value, flags, exptime, cas), operation)
            live = {key: item for key, item in model.items.items() if not item.expires or item.expires > model.now}
            scanned = store.scan(None, None)
            self.assertEqual([key for key, _ in scanned], sorted(live))
            for key, item in scanned:
                self.assertEqual((item.value, item.flags, item.cas), (live[key].value, live[key].flags, live[key].cas))


class BatchEvictionTests(SynchronousTestCase):
    """A store with a limit of 1 MiB or more evicts in batches, oldest first."""

    def test_large_store_evicts_batch_below_limit(self) -> None:
        from kvdaemon._store import EVICTION_SLACK_DIVISOR, ITEM_OVERHEAD

        clock = Clock()
        clock.advance(1_700_000_000)
        store = Store(clock.seconds, max_memory=1024 * 1024)
        value = b"v" * 1000
        count = 0
        while store.evictions == 0:
            store.store("set", b"key%06d" % count, value, 0, 0)
            count += 1

        item_size = len(b"key000000") + len(value) + ITEM_OVERHEAD
        slack = store.max_memory // EVICTION_SLACK_DIVISOR
        self.assertLessEqual(store.bytes_used, store.max_memory - slack)
        self.assertGreater(store.bytes_used, store.max_memory - slack - item_size)
        self.assertEqual(store.evictions, (slack + item_size - 1) // item_size + 1)
        # The oldest keys went first and the newest is kept.
        for number in range(store.evictions):
            self.assertIsNone(store.get(b"key%06d" % number), number)
        self.assertIsNotNone(store.get(b"key%06d" % store.evictions))
        self.assertIsNotNone(store.get(b"key%06d" % (count - 1)))

    def test_large_store_keeps_recently_used(self) -> None:
        clock = Clock()
        clock.advance(1_700_000_000)
        store = Store(clock.seconds, max_memory=1024 * 1024)
        value = b"v" * 1000
        for number in range(900):
            store.store("set", b"key%06d" % number, value, 0, 0)
        self.assertEqual(store.evictions, 0)
        self.assertIsNotNone(store.get(b"key000000"))

        for number in range(900, 1100):
            store.store("set", b"key%06d" % number, value, 0, 0)

        self.assertGreater(store.evictions, 0)
        self.assertIsNotNone(store.get(b"key000000"))
        self.assertIsNone(store.get(b"key000001"))
