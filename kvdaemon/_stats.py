# -*- test-case-name: tests.test_text -*-
"""
Server-wide counters reported by ``stats``, with memcached's names.
"""

from __future__ import annotations

import os
import resource
import sys
import time

import attrs

from kvdaemon._store import StoreResult
from kvdaemon._version import PROTOCOL_VERSION


@attrs.define
class Stats:
    """Counters that connections update on the reactor thread."""

    started: float = attrs.field(factory=time.time)
    curr_connections: int = 0
    total_connections: int = 0
    rejected_connections: int = 0
    cmd_get: int = 0
    cmd_set: int = 0
    cmd_flush: int = 0
    cmd_touch: int = 0
    get_hits: int = 0
    get_misses: int = 0
    delete_misses: int = 0
    delete_hits: int = 0
    incr_misses: int = 0
    incr_hits: int = 0
    decr_misses: int = 0
    decr_hits: int = 0
    cas_misses: int = 0
    cas_hits: int = 0
    cas_badval: int = 0
    touch_hits: int = 0
    touch_misses: int = 0
    store_too_large: int = 0
    auth_cmds: int = 0
    auth_errors: int = 0
    idle_kicks: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    streams_started: int = 0
    streams_running: int = 0
    streams_cancelled: int = 0
    streams_stalled: int = 0
    streams_rejected: int = 0
    range_items_deleted: int = 0
    stream_bytes: int = 0
    stream_reactor_hops: int = 0
    scans_created: int = 0
    scans_open: int = 0
    scans_expired: int = 0
    scans_cancelled: int = 0
    scans_completed: int = 0

    def count_cas(self, result: str) -> None:
        """Count a compare-and-swap store by its :class:`kvdaemon._store.StoreResult` name."""
        if result == StoreResult.STORED:
            self.cas_hits += 1
        elif result == StoreResult.EXISTS:
            self.cas_badval += 1
        elif result == StoreResult.NOT_FOUND:
            self.cas_misses += 1


def general_stats(stats: Stats, store, settings, now: float, threads: int) -> list[tuple[str, object]]:
    """Return the ``stats`` lines, in memcached's order, as (name, value) pairs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return [
        ("pid", os.getpid()),
        ("uptime", int(now - stats.started)),
        ("time", int(now)),
        ("version", PROTOCOL_VERSION.decode()),
        ("libevent", "twisted"),
        ("pointer_size", 64 if sys.maxsize > 2**32 else 32),
        ("rusage_user", "%.6f" % usage.ru_utime),
        ("rusage_system", "%.6f" % usage.ru_stime),
        ("max_connections", settings.max_connections),
        ("curr_connections", stats.curr_connections),
        ("total_connections", stats.total_connections),
        ("rejected_connections", stats.rejected_connections),
        ("connection_structures", stats.curr_connections),
        ("cmd_get", stats.cmd_get),
        ("cmd_set", stats.cmd_set),
        ("cmd_flush", stats.cmd_flush),
        ("cmd_touch", stats.cmd_touch),
        ("get_hits", stats.get_hits),
        ("get_misses", stats.get_misses),
        ("get_expired", store.get_expired),
        ("get_flushed", store.get_flushed),
        ("delete_misses", stats.delete_misses),
        ("delete_hits", stats.delete_hits),
        ("incr_misses", stats.incr_misses),
        ("incr_hits", stats.incr_hits),
        ("decr_misses", stats.decr_misses),
        ("decr_hits", stats.decr_hits),
        ("cas_misses", stats.cas_misses),
        ("cas_hits", stats.cas_hits),
        ("cas_badval", stats.cas_badval),
        ("touch_hits", stats.touch_hits),
        ("touch_misses", stats.touch_misses),
        ("store_too_large", stats.store_too_large),
        ("auth_cmds", stats.auth_cmds),
        ("auth_errors", stats.auth_errors),
        ("idle_kicks", stats.idle_kicks),
        ("bytes_read", stats.bytes_read),
        ("bytes_written", stats.bytes_written),
        ("limit_maxbytes", settings.max_memory),
        ("threads", threads),
        ("bytes", store.bytes_used),
        ("curr_items", len(store)),
        ("total_items", store.total_items),
        ("expired_unfetched", store.expired_unfetched),
        ("evicted_unfetched", store.evicted_unfetched),
        ("evictions", store.evictions),
        ("reclaimed", store.reclaimed),
        ("streams_started", stats.streams_started),
        ("streams_running", stats.streams_running),
        ("streams_cancelled", stats.streams_cancelled),
        ("streams_stalled", stats.streams_stalled),
        ("streams_rejected", stats.streams_rejected),
        ("range_items_deleted", stats.range_items_deleted),
        ("stream_bytes", stats.stream_bytes),
        ("stream_reactor_hops", stats.stream_reactor_hops),
        ("scans_created", stats.scans_created),
        ("scans_open", stats.scans_open),
        ("scans_expired", stats.scans_expired),
        ("scans_cancelled", stats.scans_cancelled),
        ("scans_completed", stats.scans_completed),
    ]


def settings_stats(settings, listen: list[str], verbosity: int, tcp_port: int = 0) -> list[tuple[str, object]]:
    """Return the ``stats settings`` lines as (name, value) pairs."""
    return [
        ("maxbytes", settings.max_memory),
        ("maxconns", settings.max_connections),
        ("tcpport", tcp_port),
        ("udpport", 0),
        ("listen", ",".join(listen) or "none"),
        ("verbosity", verbosity),
        ("evictions", "on"),
        ("shutdown_command", "yes" if settings.enable_shutdown else "no"),
        ("cas_enabled", "yes"),
        ("item_size_max", settings.max_item_size),
        ("flush_enabled", "yes" if settings.allow_destructive else "no"),
        ("sasl", "yes" if settings.sasl_users is not None else "no"),
        ("auth_enabled_ascii", "yes" if settings.auth_users is not None else "no"),
        ("dump_enabled", "yes" if settings.allow_dumps else "no"),
        ("idle_timeout", settings.idle_timeout),
        ("num_threads", settings.threads),
        ("stream_buffer", settings.stream_buffer),
        ("stall_timeout", settings.stall_timeout),
        ("shutdown_grace", settings.shutdown_grace),
        ("max_streams", settings.max_streams),
        ("max_scans", settings.max_scans),
        ("scan_lifetime", settings.scan_lifetime),
    ]
