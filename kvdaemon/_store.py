# -*- test-case-name: tests.test_store -*-
"""
The in-memory item store: ordered by key bytes, lazily expired, LRU-evicted.

Threading: every mutation happens on the reactor thread.  Worker threads
only read, through :meth:`Store.scan`, which holds :attr:`Store.lock` for
one short batch at a time; mutations take the same lock, so a worker never
sees a half-applied change.  Reads on the reactor thread take the lock too
(it is uncontended unless a worker batch is running).

Each item is kept as one ``bytes`` record, a fixed header followed by the
value, because a Python object per field would cost several times the
value's own size for small items.  The records live in a ``dict`` whose
insertion order is the LRU order: using an item deletes and re-inserts
it, and eviction takes items from the front.  (An ``OrderedDict`` would
give the same order for about 50 more bytes per item.)  A ``SortedList``
of the keys gives range scans their bytewise order.
"""

from __future__ import annotations

import re
import struct
import threading
from typing import Callable, Iterator, NamedTuple

from sortedcontainers import SortedList

#: memcached treats an expiry time above 30 days as an absolute Unix time.
MAX_RELATIVE_EXPIRY = 60 * 60 * 24 * 30

#: Bytes that memcached 1.6 adds to every item for its header.  They count
#: against the memory limit, so ``limit_maxbytes`` means about the same
#: number of items here as in memcached.
ITEM_OVERHEAD = 48

#: Bytes memcached 1.6 counts on top of key and value when it checks an
#: item against the item size limit: a 48-byte header, an 8-byte CAS, the
#: key's NUL and the value's CRLF.  Non-zero flags add ``_FLAGS_SIZE``.
_LIMIT_OVERHEAD = 48 + 8 + 1 + 2
_FLAGS_SIZE = 4

#: A store with a memory limit of at least EVICTION_BATCH_MIN_MEMORY bytes
#: evicts down to the limit minus 1/EVICTION_SLACK_DIVISOR of it, in one
#: batch.
EVICTION_SLACK_DIVISOR = 256
EVICTION_BATCH_MIN_MEMORY = 1024 * 1024

#: The maximum key length, in bytes, that memcached accepts.
MAX_KEY_LENGTH = 250

#: Marks that meta commands keep per item (see :meth:`Store.marks`): the
#: item is stale (``md`` with ``I``), a client has been sent the win token
#: for it (``W``), its key was given base64-encoded (``b``).
MARK_STALE = 1
MARK_WIN_SENT = 2
MARK_BINARY_KEY = 4

#: An item is bumped to the LRU head at most once per this many seconds,
#: like memcached's ``ITEM_UPDATE_INTERVAL``.  The last-access time that
#: metadump reports has the same granularity.
BUMP_INTERVAL = 60

# flags u32, absolute expiry u32 (0 = never), CAS u64, last access u32,
# fetched u8.
_HEADER = struct.Struct("<IIQIB")
_HEADER_SIZE = _HEADER.size


class Item(NamedTuple):
    """
    A decoded item: the value, its client flags, the absolute expiry time
    (Unix seconds, 0 for never), the CAS unique, the last access time (Unix
    seconds) and whether it has been fetched since it was stored.
    """

    value: bytes
    flags: int
    exptime: int
    cas: int
    last_access: int
    fetched: bool


def _decode(record: bytes) -> Item:
    flags, exptime, cas, last_access, fetched = _HEADER.unpack_from(record)
    return Item(record[_HEADER_SIZE:], flags, exptime, cas, last_access, bool(fetched))


def absolute_expiry(exptime: int, now: float) -> int:
    """
    Convert a protocol expiry time to an absolute Unix time.

    0 means never (returned as 0).  Up to 30 days is relative to ``now``;
    larger is already absolute.  Negative values, and absolute times not
    after ``now``, mean "already expired" and return -1.
    """
    if exptime == 0:
        return 0
    if exptime < 0:
        return -1
    if exptime <= MAX_RELATIVE_EXPIRY:
        return int(now) + exptime
    if exptime <= now:
        return -1
    return exptime


class StoreResult:
    """The outcome names of conditional store operations."""

    STORED = "stored"
    NOT_STORED = "not_stored"
    EXISTS = "exists"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    NON_NUMERIC = "non_numeric"


class Store:
    """
    Items keyed by byte strings, in bytewise order.

    :param clock: returns the current Unix time in seconds (for example
        ``reactor.seconds``); called on the reactor thread and, from
        :meth:`scan`, on worker threads.
    :param max_memory: bytes of items (key, value and ``ITEM_OVERHEAD``
        each) kept before the least recently used items are evicted.
    :param max_item_size: the largest item, counted the same way, that the
        store accepts.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        max_memory: int = 64 * 1024 * 1024,
        max_item_size: int = 1024 * 1024,
    ) -> None:
        self.clock = clock
        self.max_memory = max_memory
        self.max_item_size = max_item_size
        self.lock = threading.Lock()
        self._records: dict[bytes, bytes] = {}
        self._keys = SortedList()
        self._next_cas = 1
        self.bytes_used = 0
        self.evictions = 0
        self.expired_unfetched = 0
        self.evicted_unfetched = 0
        self.reclaimed = 0
        self.total_items = 0
        #: Lookups, by any command, that found an item past its expiry time
        #: or invalidated by ``flush_all`` (memcached's ``get_expired`` and
        #: ``get_flushed``).
        self.get_expired = 0
        self.get_flushed = 0
        #: Items with a last-access time before this are treated as gone
        #: (``flush_all`` with a delay sets it in the future).
        self.flushed_before = 0.0
        #: Meta-command marks by key, each with the CAS unique of the item
        #: it belongs to: a new item under the key gets a new CAS unique,
        #: which voids the entry.
        self._marks: dict[bytes, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self._records)

    # -- internal helpers (lock held by the caller) --

    def _size(self, key: bytes, record: bytes) -> int:
        return len(key) + len(record) - _HEADER_SIZE + ITEM_OVERHEAD

    def _is_live(self, record: bytes, now: float) -> bool:
        exptime = _HEADER.unpack_from(record)[1]
        if exptime and exptime <= now:
            return False
        if self.flushed_before and self.flushed_before <= now:
            stored_at = _HEADER.unpack_from(record)[3]
            if stored_at <= self.flushed_before:
                return False
        return True

    def _unlink(self, key: bytes) -> bytes:
        record = self._records.pop(key)
        self._keys.remove(key)
        self.bytes_used -= self._size(key, record)
        return record

    def _lookup(self, key: bytes, now: float) -> bytes | None:
        record = self._records.get(key)
        if record is None:
            return None
        if not self._is_live(record, now):
            # memcached checks for a flush before it checks the expiry time.
            if self.flushed_before and _HEADER.unpack_from(record)[3] <= self.flushed_before <= now:
                self.get_flushed += 1
            else:
                self.get_expired += 1
            if not record[_HEADER_SIZE - 1]:
                self.expired_unfetched += 1
            self.reclaimed += 1
            self._unlink(key)
            return None
        return record

    def _link(self, key: bytes, record: bytes) -> None:
        old = self._records.get(key)
        if old is not None:
            self.bytes_used -= self._size(key, old)
            self._bump(key, record)
        else:
            self._records[key] = record
            self._keys.add(key)
        self.bytes_used += self._size(key, record)
        self.total_items += 1
        self._evict()

    def _bump(self, key: bytes, record: bytes) -> None:
        """Store ``record`` under ``key`` (present already) as the most recently used item."""
        records = self._records
        del records[key]
        records[key] = record

    def _evict(self) -> None:
        if self.bytes_used <= self.max_memory:
            return
        # Reaching the dict's oldest item means skipping the slots of items
        # deleted since the dict last compacted, up to about one slot per
        # item.  So a large store evicts down to a little below its limit,
        # in one batch, and the next few stores need no eviction.  A small
        # store (under 1 MiB) evicts exactly what exceeds the limit.
        slack = self.max_memory // EVICTION_SLACK_DIVISOR if self.max_memory >= EVICTION_BATCH_MIN_MEMORY else 0
        target = self.max_memory - slack
        excess = self.bytes_used - target
        victims = []
        for key, record in self._records.items():
            victims.append((key, record))
            excess -= self._size(key, record)
            if excess <= 0:
                break
        now = self.clock()
        for key, record in victims:
            del self._records[key]
            self._keys.remove(key)
            self.bytes_used -= self._size(key, record)
            if self._is_live(record, now):
                self.evictions += 1
                if not record[_HEADER_SIZE - 1]:
                    self.evicted_unfetched += 1
            else:
                self.reclaimed += 1

    def _new_cas(self) -> int:
        cas = self._next_cas
        self._next_cas += 1
        return cas

    # -- reactor-thread API --

    def fits(self, key: bytes, value_length: int, flags: int = 0) -> bool:
        """
        Return whether an item with this key, value length and flags fits
        the item size limit, counted the way memcached 1.6 counts it.
        """
        size = len(key) + value_length + _LIMIT_OVERHEAD
        if flags:
            size += _FLAGS_SIZE
        return size <= self.max_item_size

    def get(self, key: bytes, bump: bool = True) -> Item | None:
        """
        Return the live item stored under ``key``, or ``None``.

        With ``bump`` the item is marked fetched and, at most once per
        ``BUMP_INTERVAL``, moved to the head of the LRU.
        """
        now = self.clock()
        with self.lock:
            record = self._records.get(key)
            if record is None:
                return None
            # The commonest request in a cache, so the header is unpacked
            # once here; _lookup handles an item that is no longer live.
            flags, exptime, cas, last_access, fetched = _HEADER.unpack_from(record)
            if (exptime and exptime <= now) or (self.flushed_before and last_access <= self.flushed_before <= now):
                self._lookup(key, now)
                return None
            if bump and (not fetched or now - last_access >= BUMP_INTERVAL):
                value = record[_HEADER_SIZE:]
                last_access = int(now)
                self._bump(key, _HEADER.pack(flags, exptime, cas, last_access, True) + value)
                return Item(value, flags, exptime, cas, last_access, True)
        return Item(record[_HEADER_SIZE:], flags, exptime, cas, last_access, bool(fetched))

    def store(
        self,
        mode: str,
        key: bytes,
        value: bytes,
        flags: int,
        exptime: int,
        cas: int = 0,
    ) -> tuple[str, int]:
        """
        Store an item the way memcached's storage commands do.

        :param mode: one of ``set add replace append prepend cas``.
        :param exptime: the protocol expiry time (see :func:`absolute_expiry`).
        :param cas: the unique a ``cas`` command compares against.
        :return: a :class:`StoreResult` name and the new CAS unique (0
            unless stored).  An item over the size limit is not stored, and
            ``set`` then removes the old item under the key, as memcached
            does.  An append or prepend whose result would exceed the limit
            returns ``NOT_STORED``, as in memcached.
        """
        now = self.clock()
        with self.lock:
            if not self.fits(key, len(value), flags):
                if mode == "set" and key in self._records:
                    self._unlink(key)
                return StoreResult.TOO_LARGE, 0
            old = self._lookup(key, now)
            if mode == "add" and old is not None:
                # memcached bumps the existing item on a failed add.
                self._bump(key, old)
                return StoreResult.NOT_STORED, 0
            if mode in ("replace", "append", "prepend") and old is None:
                return StoreResult.NOT_STORED, 0
            if mode == "cas":
                if old is None:
                    return StoreResult.NOT_FOUND, 0
                if _HEADER.unpack_from(old)[2] != cas:
                    return StoreResult.EXISTS, 0
            if mode in ("append", "prepend"):
                assert old is not None
                old_flags, old_exptime, _, _, _ = _HEADER.unpack_from(old)
                if mode == "append":
                    value = old[_HEADER_SIZE:] + value
                else:
                    value = value + old[_HEADER_SIZE:]
                if not self.fits(key, len(value), old_flags):
                    # memcached cannot allocate the combined item and
                    # reports that as a plain failure.
                    return StoreResult.NOT_STORED, 0
                flags, expires = old_flags, old_exptime
            else:
                expires = absolute_expiry(exptime, now)
                if expires < 0:
                    # Stored and at once expired: the old item is gone.
                    if old is not None:
                        self._unlink(key)
                    return StoreResult.STORED, self._new_cas()
            new_cas = self._new_cas()
            self._link(key, _HEADER.pack(flags, expires, new_cas, int(now), False) + value)
            return StoreResult.STORED, new_cas

    def delete(self, key: bytes, cas: int = 0) -> str:
        """Delete ``key``; with a non-zero ``cas`` only if it matches.  Return a :class:`StoreResult` name."""
        now = self.clock()
        with self.lock:
            record = self._lookup(key, now)
            if record is None:
                return StoreResult.NOT_FOUND
            if cas and _HEADER.unpack_from(record)[2] != cas:
                return StoreResult.EXISTS
            self._unlink(key)
            return StoreResult.STORED

    def delete_many(self, keys: list[bytes]) -> int:
        """Delete the live items among ``keys``; return how many were deleted."""
        now = self.clock()
        deleted = 0
        with self.lock:
            for key in keys:
                if self._lookup(key, now) is not None:
                    self._unlink(key)
                    deleted += 1
        return deleted

    def incr(self, key: bytes, delta: int, incr: bool = True, cas: int = 0) -> tuple[str, int, int]:
        """
        Add ``delta`` to, or subtract it from, a decimal value.

        Increments wrap at 2**64 and decrements stop at 0, as in memcached.
        :return: a :class:`StoreResult` name, the new value and the new CAS.
        """
        now = self.clock()
        with self.lock:
            record = self._lookup(key, now)
            if record is None:
                return StoreResult.NOT_FOUND, 0, 0
            flags, exptime, old_cas, _, fetched = _HEADER.unpack_from(record)
            if cas and cas != old_cas:
                return StoreResult.EXISTS, 0, 0
            digits = record[_HEADER_SIZE:]
            current = parse_counter(digits)
            if current is None:
                return StoreResult.NON_NUMERIC, 0, 0
            if incr:
                current = (current + delta) % (1 << 64)
            else:
                current = max(current - delta, 0)
            new_cas = self._new_cas()
            header = _HEADER.pack(flags, exptime, new_cas, int(now), fetched)
            new_digits = b"%d" % current
            if len(new_digits) <= len(digits):
                # memcached rewrites the value in place when the new number
                # fits, padding it with spaces to the old length, and does
                # not count that as a newly linked item.
                self._bump(key, header + new_digits.ljust(len(digits)))
            else:
                self._link(key, header + new_digits)
            return StoreResult.STORED, current, new_cas

    def touch(self, key: bytes, exptime: int) -> Item | None:
        """Set a new expiry time on ``key``; return the updated item, or ``None`` when missing."""
        now = self.clock()
        with self.lock:
            record = self._lookup(key, now)
            if record is None:
                return None
            expires = absolute_expiry(exptime, now)
            if expires < 0:
                self._unlink(key)
                return _decode(record)
            flags, _, cas, _, _ = _HEADER.unpack_from(record)
            record = _HEADER.pack(flags, expires, cas, int(now), True) + record[_HEADER_SIZE:]
            self._bump(key, record)
            return _decode(record)

    def flush(self, delay: int = 0) -> None:
        """
        Invalidate every item stored up to now, or up to ``delay`` seconds
        from now, as ``flush_all`` does.

        ``delay`` is read like an expiry time: above 30 days it is an
        absolute Unix time, and one already past flushes now.
        """
        now = self.clock()
        flush_at = absolute_expiry(delay, now) if delay > 0 else -1
        with self.lock:
            if flush_at > 0:
                self.flushed_before = flush_at - 1
                return
            self._records.clear()
            self._keys.clear()
            self.bytes_used = 0
            self.flushed_before = 0.0

    def new_cas(self) -> int:
        """Allocate a CAS unique without storing anything."""
        with self.lock:
            return self._new_cas()

    def modify(self, key: bytes, expires: int | None = None, cas: int | None = None) -> Item | None:
        """
        Give the live item under ``key`` a new absolute expiry time (0 for
        never, -1 to remove it now) or CAS unique, or both, without bumping
        it in the LRU or changing its last access time.

        :return: the updated item, or ``None`` when it is missing or was
            removed.
        """
        now = self.clock()
        with self.lock:
            record = self._lookup(key, now)
            if record is None:
                return None
            if expires is not None and expires < 0:
                self._unlink(key)
                return None
            flags, old_expires, old_cas, last_access, fetched = _HEADER.unpack_from(record)
            if expires is None:
                expires = old_expires
            if cas is None:
                cas = old_cas
            record = _HEADER.pack(flags, expires, cas, last_access, fetched) + record[_HEADER_SIZE:]
            self._records[key] = record
            return _decode(record)

    def marks(self, key: bytes) -> int:
        """
        Return the ``MARK_*`` bits of the item under ``key``: 0 when it has
        none, or when no item is stored under the key.
        """
        entry = self._marks.get(key)
        if entry is None:
            return 0
        record = self._records.get(key)
        if record is None or _HEADER.unpack_from(record)[2] != entry[0]:
            del self._marks[key]
            return 0
        return entry[1]

    def set_marks(self, key: bytes, marks: int) -> None:
        """Set the ``MARK_*`` bits of the item now stored under ``key``."""
        record = self._records.get(key)
        if record is None or not marks:
            self._marks.pop(key, None)
            return
        self._marks[key] = (_HEADER.unpack_from(record)[2], marks)
        # Entries of deleted, evicted and replaced items are dropped only
        # here, so that the hot paths never touch this dictionary.
        if len(self._marks) > len(self._records) + 1024:
            records = self._records
            self._marks = {
                marked_key: entry
                for marked_key, entry in self._marks.items()
                if marked_key in records and _HEADER.unpack_from(records[marked_key])[2] == entry[0]
            }

    # -- worker-thread API --

    def scan(
        self,
        start: bytes | None,
        end: bytes | None,
        inclusive: tuple[bool, bool] = (True, True),
        limit: int = 0,
        max_bytes: int = 0,
    ) -> list[tuple[bytes, Item]]:
        """
        Return up to ``limit`` live items (0 for no limit) with keys between
        ``start`` and ``end`` in bytewise order.

        Either bound may be ``None`` for none.  With ``max_bytes`` the batch
        ends once its keys and values add up to that many bytes, and it
        always contains at least one item when one is in range.  Safe to call
        from any thread: it holds :attr:`lock` while it copies the batch, so
        callers should keep the batch small and call again from the last
        key returned.
        """
        now = self.clock()
        found = []
        size = 0
        unpack = _HEADER.unpack_from
        with self.lock:
            keys: Iterator[bytes] = self._keys.irange(start, end, inclusive)
            records = self._records
            flushed_before = self.flushed_before if self.flushed_before and self.flushed_before <= now else None
            # The liveness test of _is_live, inlined: this loop runs for
            # every item a range operation sends, while the reactor thread
            # may be waiting for the lock.  Records are immutable, so they
            # are decoded after the lock is released.
            for key in keys:
                record = records[key]
                _, exptime, _, last_access, _ = unpack(record)
                if exptime and exptime <= now:
                    continue
                if flushed_before is not None and last_access <= flushed_before:
                    continue
                found.append((key, record))
                if len(found) == limit:
                    break
                if max_bytes:
                    size += len(key) + len(record) - _HEADER_SIZE
                    if size >= max_bytes:
                        break
        return [(key, _decode(record)) for key, record in found]


#: A counter as memcached's ``safe_strtoull`` reads it: optional C
#: whitespace, an optional sign, decimal digits, then the end of the value
#: or a whitespace or NUL byte (anything after that is ignored).
_COUNTER = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-9]+)(?:[ \t\n\v\f\r\0]|\Z)")


def parse_counter(digits: bytes) -> int | None:
    """
    Parse a stored value as an ``incr``/``decr`` counter the way memcached
    1.6 does; return ``None`` when it is not a number below 2**64.

    ``"5"``, ``" 5"`` and ``"5 apples"`` are 5; ``""``, ``"5x"`` and ``"-5"``
    are not numbers.
    """
    if digits.isdigit():
        value = int(digits)
    else:
        match = _COUNTER.match(digits)
        if match is None:
            return None
        value = int(match.group(2))
        if match.group(1) == b"-" and value:
            return None
    if value >= 1 << 64:
        return None
    return value
