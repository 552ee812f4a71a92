# -*- test-case-name: tests.test_ranges -*-
"""
Range operations over the store's bytewise key order: ``rget`` and
``rdelete`` (the memcached wiki's RangeOps text commands), and memcached's
key dumps ``lru_crawler metadump`` and ``lru_crawler mgdump``.

Each command runs as a streaming job (:mod:`kvdaemon._streaming`).  A job
step reads one short batch at a time through :meth:`Store.scan` on a
worker thread and remembers the last key it took, so that the next batch
starts just after it.  Store mutations (``rdelete``) happen on the reactor
thread in ``after_step``.

The jobs know nothing of the text protocol: :class:`RangeReadJob` takes a
function that formats one item and the bytes that end the reply, and
:class:`RangeDeleteJob` a function that formats the final count.  The
binary protocol builds the same jobs with formatters that frame packets.
"""

from __future__ import annotations

import base64
import bisect
import string
from typing import TYPE_CHECKING, Callable

import attrs
from twisted.logger import Logger

from kvdaemon._store import Item, Store
from kvdaemon._streaming import Spool
from kvdaemon._text import BAD_FORMAT, END, ERROR, ProtocolError, check_key, parse_uint

if TYPE_CHECKING:
    from kvdaemon._text import TextHandler

#: Items one :meth:`Store.scan` call copies while it holds the store lock.
BATCH_ITEMS = 256

#: Bytes of keys and values one :meth:`Store.scan` call copies at most
#: (plus one item), whatever the spool cap, so that the store lock is
#: held briefly.  ``rdelete`` needs only the keys, but the scan copies
#: whole items.
BATCH_BYTES = 256 * 1024

#: Items one ``rdelete`` step collects before the reactor thread deletes
#: them, so that a step holds the store lock in short pieces and returns
#: its thread soon.
DELETE_STEP_ITEMS = 4096

#: Items a read step may look at before it returns, whether or not it
#: wrote them; bounds a step whose formatter skips most items.
READ_STEP_ITEMS = 16384

_U32_MAX = 2**32 - 1

TOO_MANY_STREAMS = b"SERVER_ERROR too many concurrent streams\r\n"
RDELETE_NOT_ALLOWED = b"CLIENT_ERROR rdelete not allowed\r\n"
BAD_CLASS = b"BADCLASS invalid class id\r\n"

#: Slab class chunk sizes of memcached 1.6 with its defaults (``-n 48``,
#: ``-f 1.25``, 512 KiB largest chunk), as ``memcached -vv`` lists them.
#: kvdaemon has no slab classes; metadump reports the class memcached
#: would have put the item in.
_SLAB_CHUNK_SIZES: list[int] = []


def _build_slab_classes() -> None:
    size = 96
    largest = 512 * 1024
    while size < largest / 1.25:
        if size % 8:
            size += 8 - size % 8
        _SLAB_CHUNK_SIZES.append(size)
        size = int(size * 1.25)
    _SLAB_CHUNK_SIZES.append(largest)


_build_slab_classes()

#: The bytes metadump leaves unencoded in keys (as urllib's quote does).
_URL_SAFE_BYTES = (string.ascii_letters + string.digits + "-._~").encode("ascii")
_URL_ESCAPES = {byte: "%%%02X" % byte for byte in range(256) if byte not in _URL_SAFE_BYTES}

#: memcached accepts class ids 1 to 63 in ``lru_crawler metadump 1,2,...``.
_MAX_CLASS_ID = 63


@attrs.frozen
class KeyRange:
    """
    Keys between ``start`` and ``end`` in bytewise order.

    ``None`` as a bound means no bound on that side.  ``max_items`` caps
    the items taken; 0 means no cap.
    """

    start: bytes | None
    end: bytes | None
    start_inclusive: bool = True
    end_inclusive: bool = True
    max_items: int = 0


#: Every key in the store.
ALL_KEYS = KeyRange(None, None)


class RangeCursor:
    """
    A scan's position in a :class:`KeyRange`: each batch starts just after
    the last key taken.

    Used by one job's steps, one at a time, on worker threads.
    """

    def __init__(self, store: Store, key_range: KeyRange) -> None:
        self._store = store
        self._range = key_range
        self._last_key: bytes | None = None
        self._started = False
        #: Items taken so far (counted against ``max_items``).
        self.taken = 0

    @property
    def limit_reached(self) -> bool:
        """Whether ``max_items`` items have been taken."""
        return bool(self._range.max_items) and self.taken >= self._range.max_items

    def next_batch(self, max_items: int, max_bytes: int) -> list[tuple[bytes, Item]]:
        """
        Return the next live items after the last key passed to
        :meth:`take` or :meth:`skip`, at most ``max_items`` of them and
        about ``max_bytes`` of keys and values (at least one item).
        An empty list means the range is exhausted.
        """
        key_range = self._range
        if self._started:
            start, start_inclusive = self._last_key, False
        else:
            start, start_inclusive = key_range.start, key_range.start_inclusive
        if key_range.max_items:
            max_items = min(max_items, key_range.max_items - self.taken)
        return self._store.scan(
            start,
            key_range.end,
            (start_inclusive, key_range.end_inclusive),
            limit=max_items,
            max_bytes=max_bytes,
        )

    def take(self, key: bytes) -> None:
        """Record that ``key`` was taken (sent, or queued for deletion)."""
        self.skip(key)
        self.taken += 1

    def skip(self, key: bytes) -> None:
        """Move past ``key`` without counting it."""
        self._last_key = key
        self._started = True

    def advance(self, last_key: bytes, taken: int) -> None:
        """Move past a whole batch ending at ``last_key``, of which ``taken`` items count."""
        self._last_key = last_key
        self._started = True
        self.taken += taken


class RangeReadJob:
    """
    Stream every live item of a key range, in key order.

    :param format_item: turns one item into the bytes sent for it; runs on
        a worker thread.  It may return ``None`` to leave an item out,
        which then does not count against ``max_items``.
    :param trailer: the bytes that end the reply.
    """

    def __init__(
        self,
        store: Store,
        key_range: KeyRange,
        format_item: Callable[[bytes, Item], bytes | None],
        trailer: bytes,
    ) -> None:
        self.cursor = RangeCursor(store, key_range)
        self._format_item = format_item
        self._trailer = trailer

    def run_step(self, spool: Spool) -> bool:
        """Send items until the spool ends the step; return whether the range is done (worker thread)."""
        cursor = self.cursor
        looked_at = 0
        while looked_at < READ_STEP_ITEMS:
            if cursor.limit_reached:
                return True
            batch = cursor.next_batch(BATCH_ITEMS, min(spool.remaining, BATCH_BYTES))
            if not batch:
                return True
            # The formatted items go to the spool as one chunk: one spool
            # write (and lock) per batch instead of one per item.  The batch
            # stops once it contains the bytes the step may still send, so a
            # step still ends within one item of the spool cap, and at a
            # pause or cancellation the batch stops at the next item.
            # next_batch already stopped the batch at max_items.
            format_item = self._format_item
            budget = spool.remaining
            chunks = []
            produced = 0
            for key, item in batch:
                looked_at += 1
                last_key = key
                chunk = format_item(key, item)
                if chunk is None:
                    continue
                chunks.append(chunk)
                produced += len(chunk)
                if produced >= budget or spool.stopping:
                    break
            cursor.advance(last_key, len(chunks))
            if chunks and not spool.write(b"".join(chunks)):
                return cursor.limit_reached
        return False

    def after_step(self, done: bool) -> bytes | None:
        return self._trailer if done else None


class RangeDeleteJob:
    """
    Delete every live item of a key range.

    Steps collect keys on a worker thread; ``after_step`` deletes them on
    the reactor thread.  A key written again between the two is deleted
    anyway, as if the delete had come just after the write.

    :param format_reply: turns the number of items deleted into the reply.
    :param on_deleted: called on the reactor thread with the number of
        items each step deleted.
    """

    def __init__(
        self,
        store: Store,
        key_range: KeyRange,
        format_reply: Callable[[int], bytes],
        on_deleted: Callable[[int], None] | None = None,
    ) -> None:
        self._store = store
        self.cursor = RangeCursor(store, key_range)
        self._format_reply = format_reply
        self._on_deleted = on_deleted
        #: Items deleted so far.
        self.deleted = 0

    def run_step(self, spool: Spool) -> tuple[list[bytes], bool]:
        """Collect the next keys to delete; return them and whether the range is done (worker thread)."""
        cursor = self.cursor
        keys: list[bytes] = []
        while len(keys) < DELETE_STEP_ITEMS:
            if cursor.limit_reached or spool.cancelled:
                return keys, True
            batch = cursor.next_batch(min(BATCH_ITEMS, DELETE_STEP_ITEMS - len(keys)), BATCH_BYTES)
            if not batch:
                return keys, True
            for key, _ in batch:
                cursor.take(key)
                keys.append(key)
        return keys, cursor.limit_reached

    def after_step(self, result: tuple[list[bytes], bool]) -> bytes | None:
        keys, done = result
        deleted = self._store.delete_many(keys)
        self.deleted += deleted
        if self._on_deleted is not None:
            self._on_deleted(deleted)
        return self._format_reply(self.deleted) if done else None


# -- text formats --


def format_value(key: bytes, item: Item) -> bytes:
    """Format an item as ``get`` does: ``VALUE <key> <flags> <bytes>``, then the data."""
    return b"VALUE %s %d %d\r\n%s\r\n" % (key, item.flags, len(item.value), item.value)


def format_nothing(count: int) -> bytes:
    """Format ``rdelete ... noreply``'s reply: nothing."""
    return b""


def format_deleted(count: int) -> bytes:
    """Format ``rdelete``'s reply: ``DELETED <count>``."""
    return b"DELETED %d\r\n" % count


def memcached_item_size(key: bytes, item: Item) -> int:
    """
    Return the bytes memcached 1.6 would use for this item (its
    ``ITEM_ntotal``): a 48-byte header, an 8-byte CAS, the key and its
    NUL, the value and its CRLF, and 4 bytes for non-zero flags.
    """
    size = 48 + 8 + len(key) + 1 + len(item.value) + 2
    if item.flags:
        size += 4
    return size


def slab_class(size: int) -> int:
    """Return the memcached slab class id for an item of ``size`` bytes (items too big for any class: the largest)."""
    return min(bisect.bisect_left(_SLAB_CHUNK_SIZES, size) + 1, len(_SLAB_CHUNK_SIZES))


#: Slab class ids by item size for small items, so that metadump skips the
#: bisection for most items.
_CLASS_BY_SIZE = [slab_class(size) for size in range(4096)]


def url_encode_key(key: bytes) -> bytes:
    """Percent-encode ``key`` as metadump does, leaving letters, digits and ``-._~``."""
    if not key.translate(None, _URL_SAFE_BYTES):
        return key
    # str.translate maps each byte to its escape in C; quote_from_bytes
    # would loop in Python.
    return key.decode("latin-1").translate(_URL_ESCAPES).encode("ascii")


def format_metadump_line(key: bytes, item: Item) -> bytes:
    """
    Format one ``lru_crawler metadump`` line as memcached 1.6 does.

    The key is percent-encoded except for letters, digits and ``-._~``;
    ``exp`` is -1 for items that never expire, else a Unix time.
    """
    # memcached_item_size and slab_class, inlined: this runs for every key.
    size = 59 + len(key) + len(item.value) + (4 if item.flags else 0)
    class_id = _CLASS_BY_SIZE[size] if size < len(_CLASS_BY_SIZE) else slab_class(size)
    if key.translate(None, _URL_SAFE_BYTES):
        key = url_encode_key(key)
    return b"key=%s exp=%d la=%d cas=%d fetch=%s cls=%d size=%d\n" % (
        key,
        item.exptime or -1,
        item.last_access,
        item.cas,
        b"yes" if item.fetched else b"no",
        class_id,
        size,
    )


def _needs_base64(key: bytes) -> bool:
    return any(byte <= 0x20 or byte == 0x7F for byte in key)


def format_mgdump_line(key: bytes, item: Item) -> bytes:
    """
    Format one ``lru_crawler mgdump`` line: ``mg <key>``.

    memcached writes a key stored as binary (meta ``b`` flag) in base64
    followed by `` b``.  kvdaemon does so for a key containing a space,
    a control character or DEL (possible through the binary protocol),
    which would break the line otherwise.  A printable key stored with
    the ``b`` flag is written as it is.
    """
    if _needs_base64(key):
        return b"mg %s b\r\n" % base64.b64encode(key)
    return b"mg %s\r\n" % key


def _class_filter(
    format_line: Callable[[bytes, Item], bytes], class_ids: frozenset[int]
) -> Callable[[bytes, Item], bytes | None]:
    def format_if_in_class(key: bytes, item: Item) -> bytes | None:
        if slab_class(memcached_item_size(key, item)) in class_ids:
            return format_line(key, item)
        return None

    return format_if_in_class


def parse_class_ids(token: bytes) -> frozenset[int] | None:
    """
    Parse the class argument of ``lru_crawler metadump``: ``all`` or
    ``hash`` (every item, returned as ``None``), or comma-separated class
    ids from 1 to 63.

    :raise ProtocolError: with memcached's ``BADCLASS`` reply.
    """
    if token in (b"all", b"hash"):
        return None
    ids = set()
    for part in token.split(b","):
        if not part:
            continue
        if not part.isdigit() or not 1 <= int(part) <= _MAX_CLASS_ID:
            raise ProtocolError(BAD_CLASS)
        ids.add(int(part))
    if not ids:
        raise ProtocolError(BAD_CLASS)
    return frozenset(ids)


def parse_range(parts: list[bytes]) -> KeyRange:
    """
    Parse ``<cmd> <start inclusive> <end inclusive> <max items> <start key> [<end key>]``.

    :raise ProtocolError: ``ERROR`` for a wrong number of arguments,
        ``CLIENT_ERROR bad command line format`` for an inclusive flag
        other than 0 or 1, a bad item count or a key over 250 bytes.
    """
    if not 5 <= len(parts) <= 6:
        raise ProtocolError(ERROR)
    inclusive = []
    for token in parts[1:3]:
        if token not in (b"0", b"1"):
            raise ProtocolError(BAD_FORMAT)
        inclusive.append(token == b"1")
    max_items = parse_uint(parts[3], _U32_MAX)
    start = check_key(parts[4])
    end = check_key(parts[5]) if len(parts) == 6 else None
    return KeyRange(start, end, inclusive[0], inclusive[1], max_items)


class RangeCommands:
    """The range commands of one text connection (reactor thread only)."""

    log = Logger()

    def __init__(self, handler: TextHandler) -> None:
        self.handler = handler
        self.log = handler.connection.logger_for(self)

    def rget(self, parts: list[bytes]) -> None:
        key_range = parse_range(parts)
        job = RangeReadJob(self.handler.store, key_range, format_value, END)
        self._start(job)

    def rdelete(self, parts: list[bytes]) -> None:
        # As in memcached's commands, a last token "noreply" silences the
        # reply, errors included; it is never read as the end key.
        if len(parts) in (6, 7) and parts[-1] == b"noreply":
            self.handler.noreply = True
            parts = parts[:-1]
        if not 5 <= len(parts) <= 6:
            raise ProtocolError(ERROR)
        if not self.handler.settings.allow_destructive:
            raise ProtocolError(RDELETE_NOT_ALLOWED)
        key_range = parse_range(parts)
        format_reply = format_nothing if self.handler.noreply else format_deleted
        job = RangeDeleteJob(self.handler.store, key_range, format_reply, self._count_deleted)
        peer = self.handler.connection.peer

        def log_deleted() -> None:
            self.log.info(
                "rdelete from {peer} deleted {count} items",
                peer=peer,
                count=job.deleted,
            )

        self._start(job, log_deleted)

    def lru_crawler(self, parts: list[bytes]) -> None:
        # kvdaemon has no LRU crawler thread, so the forms that steer one
        # (crawl, tocrawl, sleep, enable, disable) get the ERROR that
        # memcached sends for an unknown form.
        if len(parts) != 3 or parts[1] not in (b"metadump", b"mgdump"):
            raise ProtocolError(ERROR)
        dump = parts[1]
        if not self.handler.settings.allow_dumps:
            # memcached 1.6 sends "ERROR metadump not allowed" when started
            # with -X; mgdump gets the same form.
            raise ProtocolError(b"ERROR %s not allowed\r\n" % dump)
        if self.handler.follows_reply:
            raise ProtocolError(b"ERROR cannot pipeline other commands before %s\r\n" % dump)
        class_ids = parse_class_ids(parts[2])
        if dump == b"metadump":
            format_line, trailer = format_metadump_line, END
        else:
            format_line, trailer = format_mgdump_line, b"EN\r\n"
        if class_ids is not None:
            format_line = _class_filter(format_line, class_ids)
        job = RangeReadJob(self.handler.store, ALL_KEYS, format_line, trailer)
        self._start(job)

    def _count_deleted(self, count: int) -> None:
        self.handler.stats.range_items_deleted += count

    def _start(self, job: RangeReadJob | RangeDeleteJob, on_done: Callable[[], None] | None = None) -> None:
        if not self.handler.connection.start_stream(job, on_done):
            # start_stream has logged the rejection, so this reply does not
            # go through ProtocolError, which the framing would log again.
            self.handler.reply(TOO_MANY_STREAMS)


def text_commands(handler: TextHandler) -> dict[bytes, Callable[[list[bytes]], None]]:
    """Return the range commands for ``handler``, by command name."""
    commands = RangeCommands(handler)
    return {
        b"rget": commands.rget,
        b"rdelete": commands.rdelete,
        b"lru_crawler": commands.lru_crawler,
    }
