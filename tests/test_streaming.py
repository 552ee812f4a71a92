"""
Tests for kvdaemon._streaming: the stream state machine, stepped by hand
with a fake thread pool and a fake reactor, alone and behind a
Connection on a StringTransport.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from kvdaemon import KVDaemonFactory, Settings, Store
from kvdaemon._ranges import RangeReadJob, KeyRange, format_value
from kvdaemon._streaming import Spool, Stream, StreamStalled
from tests.support import FakeReactor, FakeThreadPool

#: A Unix time for the fake clock, so that stored items get real-looking times.
NOW = 1_700_000_000


class ListJob:
    """
    A job that sends ``chunks`` in order, keeping its place between steps.

    ``on_write`` is called (on the "worker", which is the test's thread)
    after each chunk is queued, with the chunk's index.
    """

    def __init__(self, chunks: list[bytes], trailer: bytes = b"END\r\n") -> None:
        self.chunks = chunks
        self.trailer = trailer
        self.position = 0
        self.steps = 0
        self.after_steps = 0
        self.on_write: Callable[[int], None] = lambda index: None

    def run_step(self, spool: Spool) -> bool:
        self.steps += 1
        while self.position < len(self.chunks):
            index = self.position
            self.position += 1
            go_on = spool.write(self.chunks[index])
            self.on_write(index)
            if not go_on:
                break
        return self.position >= len(self.chunks)

    def after_step(self, done: bool) -> bytes | None:
        self.after_steps += 1
        return self.trailer if done else None


def make_chunks(count: int, size: int) -> list[bytes]:
    """Return ``count`` distinct chunks of ``size`` bytes each."""
    return [(b"%08d" % i).ljust(size, b".") for i in range(count)]


class StreamHarness:
    """A Stream over a list of sent chunk lists, with a fake pool and reactor."""

    def __init__(self, job: Any, spool_limit: int = 1000, stall_timeout: float = 10.0, paused: bool = False) -> None:
        self.reactor = FakeReactor()
        self.pool = FakeThreadPool()
        self.writes: list[list[bytes]] = []
        self.stream = Stream(
            job,
            reactor=self.reactor,
            threadpool=self.pool,
            write_sequence=self.writes.append,
            spool_limit=spool_limit,
            stall_timeout=stall_timeout,
            paused=paused,
        )
        self.results: list[Any] = []
        self.stream.start().addBoth(self.results.append)

    @property
    def sent(self) -> bytes:
        return b"".join(b"".join(chunks) for chunks in self.writes)

    def run_all(self, limit: int = 10000) -> None:
        """Run queued work and hand-offs until nothing is left."""
        for _ in range(limit):
            if self.pool.pending:
                self.pool.run_next()
            elif self.reactor.thread_calls:
                self.reactor.run_thread_calls()
            else:
                return
        raise AssertionError("the stream did not settle")


class StreamStepTests(SynchronousTestCase):
    """Steps, hand-offs and completion of a Stream."""

    def test_stream_sends_all_chunks_then_trailer(self) -> None:
        chunks = make_chunks(50, 100)
        harness = StreamHarness(ListJob(chunks), spool_limit=1000)

        harness.run_all()

        self.assertEqual(harness.sent, b"".join(chunks) + b"END\r\n")
        self.assertEqual(harness.results, [None])
        self.assertTrue(harness.stream.done)

    def test_step_ends_at_spool_limit(self) -> None:
        job = ListJob(make_chunks(50, 100))
        harness = StreamHarness(job, spool_limit=1000)

        harness.pool.run_next()

        self.assertEqual(job.position, 10)
        self.assertEqual(harness.pool.pending, [])

    def test_chunk_larger_than_spool_passes_whole(self) -> None:
        big = b"x" * 5000
        harness = StreamHarness(ListJob([big, b"after"]), spool_limit=1000)

        harness.run_all()

        self.assertEqual(harness.writes[0], [big])
        self.assertEqual(harness.sent, big + b"after" + b"END\r\n")

    def test_next_step_waits_for_handoff(self) -> None:
        job = ListJob(make_chunks(50, 100))
        harness = StreamHarness(job, spool_limit=1000)

        harness.pool.run_next()

        # The step's end travels with the hand-off: no second step is
        # queued before the reactor thread took the first step's output.
        self.assertEqual(harness.pool.pending, [])
        harness.reactor.run_thread_calls()
        self.assertEqual(len(harness.pool.pending), 1)

    def test_after_step_runs_once_per_step(self) -> None:
        job = ListJob(make_chunks(50, 100))
        harness = StreamHarness(job, spool_limit=1000)

        harness.run_all()

        self.assertEqual(job.after_steps, job.steps)
        self.assertEqual(job.steps, 5)

    def test_at_most_one_pending_thread_call(self) -> None:
        job = ListJob(make_chunks(50, 100))
        harness = StreamHarness(job, spool_limit=1000)
        pending_counts = []
        job.on_write = lambda index: pending_counts.append(len(harness.reactor.thread_calls))

        harness.pool.run_next()
        pending_counts.append(len(harness.reactor.thread_calls))
        harness.run_all()

        self.assertLessEqual(max(pending_counts), 1)
        self.assertEqual(pending_counts[-1], 1)

    def test_handoff_before_step_end(self) -> None:
        job = ListJob(make_chunks(50, 100))
        harness = StreamHarness(job, spool_limit=1000)
        seen_during_step = []

        def flush_during_step(index: int) -> None:
            # Half the spool cap is spooled after the fifth chunk; the
            # reactor thread takes it while the step goes on.
            if index == 4:
                seen_during_step.append(len(harness.reactor.thread_calls))
                harness.reactor.run_thread_calls()

        job.on_write = flush_during_step
        harness.pool.run_next()

        self.assertEqual(seen_during_step, [1])
        self.assertEqual(harness.sent, b"".join(job.chunks[:5]))
        harness.reactor.run_thread_calls()
        self.assertEqual(harness.sent, b"".join(job.chunks[:10]))

    def test_hops_counted(self) -> None:
        chunk_count = 4 * 1024
        job = ListJob(make_chunks(chunk_count, 1024))
        harness = StreamHarness(job, spool_limit=256 * 1024)
        thread_calls_run = 0

        while harness.pool.pending or harness.reactor.thread_calls:
            if harness.pool.pending:
                harness.pool.run_next()
            else:
                thread_calls_run += harness.reactor.run_thread_calls()

        self.assertEqual(harness.stream.reactor_hops, thread_calls_run)
        # 4 MiB with a 256 KiB spool: one hand-off per step, because the
        # fake reactor takes nothing until the step has ended.
        self.assertEqual(harness.stream.reactor_hops, 16)
        self.assertEqual(harness.stream.bytes_sent, chunk_count * 1024 + len(b"END\r\n"))

    def test_hops_within_target_when_reactor_keeps_up(self) -> None:
        chunk_count = 4 * 1024
        job = ListJob(make_chunks(chunk_count, 1024))
        harness = StreamHarness(job, spool_limit=256 * 1024)
        # A reactor that takes each hand-off as soon as it is scheduled.
        job.on_write = lambda index: harness.reactor.run_thread_calls()

        harness.run_all()

        # Two hand-offs per step (one at half the cap, one at the end):
        # 8 per MiB, under the target of 16.
        self.assertLessEqual(harness.stream.reactor_hops, 16 * 4)
        self.assertEqual(harness.stream.reactor_hops, 32)

    def test_step_failure_fails_stream(self) -> None:
        class BrokenJob(ListJob):
            def run_step(self, spool: Spool) -> bool:
                raise ValueError("broken step")

        harness = StreamHarness(BrokenJob([]))

        harness.run_all()

        self.assertEqual(len(harness.results), 1)
        harness.results[0].trap(ValueError)
        self.assertTrue(harness.stream.cancelled)

    def test_after_step_failure_fails_stream(self) -> None:
        class BrokenJob(ListJob):
            def after_step(self, done: bool) -> bytes | None:
                raise ValueError("broken after_step")

        harness = StreamHarness(BrokenJob(make_chunks(3, 10)))

        harness.run_all()

        harness.results[0].trap(ValueError)
        self.assertEqual(harness.pool.pending, [])

    def test_stopped_pool_fails_stream(self) -> None:
        reactor = FakeReactor()
        pool = FakeThreadPool()
        pool.joined = True  # type: ignore[attr-defined]
        stream = Stream(
            ListJob([b"a"]),
            reactor=reactor,
            threadpool=pool,  # type: ignore[arg-type]
            write_sequence=lambda chunks: None,
            spool_limit=1000,
            stall_timeout=0,
        )

        failure = self.failureResultOf(stream.start(), CancelledError)

        self.assertIn("stopped", str(failure.value))
        self.assertEqual(pool.pending, [])


class StreamPauseTests(SynchronousTestCase):
    """Pause, resume and the stall timer of a Stream."""

    def test_pause_mid_step_ends_step_at_next_write(self) -> None:
        job = ListJob(make_chunks(50, 10))
        harness = StreamHarness(job, spool_limit=100000)
        job.on_write = lambda index: harness.stream.pause() if index == 6 else None

        harness.pool.run_next()
        harness.reactor.run_thread_calls()

        # The write after the pause ends the step; its chunk is kept
        # because the job has already moved past it.
        self.assertEqual(harness.sent, b"".join(job.chunks[:8]))
        self.assertEqual(harness.pool.pending, [])

    def test_paused_stream_holds_no_work_item(self) -> None:
        job = ListJob(make_chunks(50, 10))
        harness = StreamHarness(job, spool_limit=100000)
        job.on_write = lambda index: harness.stream.pause() if index == 6 else None

        harness.run_all()

        self.assertEqual(harness.pool.pending, [])
        self.assertEqual(harness.reactor.thread_calls, [])
        self.assertFalse(harness.stream.stepping)
        self.assertFalse(harness.stream.done)

    def test_step_started_while_paused_produces_nothing(self) -> None:
        job = ListJob(make_chunks(50, 10))
        harness = StreamHarness(job, spool_limit=100000)

        # Paused after the step was queued but before a thread ran it.
        harness.stream.pause()
        harness.run_all()

        self.assertEqual(harness.sent, b"")
        self.assertEqual(job.steps, 0)
        self.assertEqual(job.after_steps, 0)
        self.assertEqual(harness.pool.pending, [])

    def test_resume_continues_after_last_chunk(self) -> None:
        job = ListJob(make_chunks(50, 10))
        harness = StreamHarness(job, spool_limit=100000)
        job.on_write = lambda index: harness.stream.pause() if index == 6 else None
        harness.run_all()

        harness.stream.resume()
        harness.run_all()

        self.assertEqual(harness.sent, b"".join(job.chunks) + b"END\r\n")
        self.assertEqual(harness.results, [None])

    def test_repeated_pause_and_resume(self) -> None:
        job = ListJob(make_chunks(50, 10))
        harness = StreamHarness(job, spool_limit=100000)
        job.on_write = lambda index: harness.stream.pause() if index == 6 else None
        harness.run_all()

        harness.stream.pause()
        harness.stream.pause()
        self.assertEqual(len(harness.reactor.getDelayedCalls()), 1)
        harness.stream.resume()
        harness.stream.resume()

        self.assertEqual(len(harness.pool.pending), 1)
        self.assertEqual(harness.reactor.getDelayedCalls(), [])

    def test_resume_while_stepping_starts_no_second_step(self) -> None:
        job = ListJob(make_chunks(50, 10))
        harness = StreamHarness(job, spool_limit=100000)
        harness.stream.pause()
        harness.stream.resume()

        self.assertEqual(len(harness.pool.pending), 1)
        harness.run_all()
        self.assertEqual(harness.sent, b"".join(job.chunks) + b"END\r\n")

    def test_resume_after_skipped_step_starts_step(self) -> None:
        job = ListJob(make_chunks(50, 10))
        harness = StreamHarness(job, spool_limit=100000)
        harness.stream.pause()
        harness.pool.run_next()
        # The skipped step's hand-off is still queued when the transport
        # resumes the stream: the hand-off must start the next step.
        harness.stream.resume()
        self.assertEqual(harness.pool.pending, [])

        harness.run_all()

        self.assertEqual(harness.sent, b"".join(job.chunks) + b"END\r\n")

    def test_stall_timeout_cancels_paused_stream(self) -> None:
        job = ListJob(make_chunks(50, 10))
        harness = StreamHarness(job, spool_limit=100000, stall_timeout=5.0)
        harness.stream.pause()
        harness.run_all()

        harness.reactor.advance(4.9)
        self.assertEqual(harness.results, [])
        harness.reactor.advance(0.2)

        self.assertEqual(len(harness.results), 1)
        harness.results[0].trap(StreamStalled)
        self.assertTrue(harness.stream.cancelled)

    def test_resume_disarms_stall_timer(self) -> None:
        job = ListJob(make_chunks(50, 10))
        harness = StreamHarness(job, spool_limit=100000, stall_timeout=5.0)
        harness.stream.pause()
        harness.reactor.advance(4.0)
        harness.stream.resume()

        harness.reactor.advance(10.0)
        harness.run_all()

        self.assertEqual(harness.results, [None])

    def test_stall_timer_zero_disabled(self) -> None:
        harness = StreamHarness(ListJob(make_chunks(5, 10)), stall_timeout=0)

        harness.stream.pause()

        self.assertEqual(harness.reactor.getDelayedCalls(), [])

    def test_started_paused_arms_timer_and_queues_nothing(self) -> None:
        harness = StreamHarness(ListJob(make_chunks(5, 10)), paused=True)

        self.assertEqual(harness.pool.pending, [])
        self.assertEqual(len(harness.reactor.getDelayedCalls()), 1)


class StreamCancelTests(SynchronousTestCase):
    """Cancellation of a Stream."""

    def test_cancel_before_handoff_drops_data(self) -> None:
        job = ListJob(make_chunks(50, 10))
        harness = StreamHarness(job, spool_limit=100000)
        harness.pool.run_next()

        harness.stream.cancel()
        harness.reactor.run_thread_calls()

        self.assertEqual(harness.writes, [])
        harness.results[0].trap(CancelledError)
        self.assertEqual(job.after_steps, 0)

    def test_cancel_during_step_stops_at_next_write(self) -> None:
        job = ListJob(make_chunks(50, 10))
        harness = StreamHarness(job, spool_limit=100000)
        job.on_write = lambda index: harness.stream.cancel() if index == 3 else None

        harness.run_all()

        self.assertEqual(job.position, 5)
        self.assertEqual(harness.writes, [])
        self.assertEqual(harness.pool.pending, [])

    def test_cancel_twice_fails_once(self) -> None:
        harness = StreamHarness(ListJob(make_chunks(5, 10)))

        harness.stream.cancel()
        harness.stream.cancel()

        self.assertEqual(len(harness.results), 1)
        harness.results[0].trap(CancelledError)

    def test_cancel_after_done_is_ignored(self) -> None:
        harness = StreamHarness(ListJob(make_chunks(5, 10)))
        harness.run_all()

        harness.stream.cancel()

        self.assertEqual(harness.results, [None])
        self.assertFalse(harness.stream.cancelled)

    def test_cancel_disarms_stall_timer(self) -> None:
        harness = StreamHarness(ListJob(make_chunks(5, 10)))
        harness.stream.pause()

        harness.stream.cancel()

        self.assertEqual(harness.reactor.getDelayedCalls(), [])


class ConnectionHarness:
    """A factory with a fake pool and reactor, and connections to it on StringTransports."""

    def __init__(self, **settings: Any) -> None:
        self.reactor = FakeReactor()
        self.reactor.advance(NOW)
        self.pool = FakeThreadPool()
        self.store = Store(self.reactor.seconds, 64 * 1024 * 1024)
        self.factory = KVDaemonFactory(
            Settings(**settings),
            reactor=self.reactor,
            threadpool=self.pool,  # type: ignore[arg-type]
            store=self.store,
        )
        self.connections: list[tuple[Any, StringTransport]] = []

    def connect(self) -> tuple[Any, StringTransport]:
        address = IPv4Address("TCP", "127.0.0.1", 40000 + len(self.connections))
        protocol = self.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return protocol, transport

    def fill(self, count: int, size: int) -> list[bytes]:
        keys = [b"key%06d" % i for i in range(count)]
        for key in keys:
            self.store.store("set", key, key.ljust(size, b"-"), 0, 0)
        return keys

    def run_all(self, limit: int = 100000) -> None:
        for _ in range(limit):
            if self.pool.pending:
                self.pool.run_next()
            elif self.reactor.thread_calls:
                self.reactor.run_thread_calls()
            else:
                return
        raise AssertionError("the streams did not settle")


def expected_values(store: Store, keys: list[bytes]) -> bytes:
    return b"".join(format_value(key, store.get(key, bump=False)) for key in keys)


class ConnectionStreamTests(SynchronousTestCase):
    """Streams behind a Connection: routing, ordering and teardown."""

    def test_range_stream_through_connection(self) -> None:
        harness = ConnectionHarness(stream_buffer=4096)
        keys = harness.fill(200, 100)
        protocol, transport = harness.connect()

        protocol.dataReceived(b"rget 1 1 0 key\r\nget key000001\r\n")
        harness.run_all()

        expected = expected_values(harness.store, keys) + b"END\r\n"
        expected += b"VALUE key000001 0 100\r\n" + keys[1].ljust(100, b"-") + b"\r\nEND\r\n"
        self.assertEqual(transport.value(), expected)
        self.assertIsNone(protocol.stream)
        self.assertEqual(harness.factory.stats.streams_running, 0)

    def test_pause_mid_batch_resumes_at_cursor(self) -> None:
        harness = ConnectionHarness(stream_buffer=1024 * 1024)
        keys = harness.fill(100, 20)
        protocol, transport = harness.connect()
        job_seen = []

        def pause_after_tenth(key: bytes, item: Any) -> bytes:
            # Runs on the "worker": the transport pauses the connection
            # while the step is in the middle of a 100-item batch.
            job_seen.append(key)
            if len(job_seen) == 10:
                protocol.pauseProducing()
            return format_value(key, item)

        job = RangeReadJob(harness.store, KeyRange(b"key", None), pause_after_tenth, b"END\r\n")
        self.assertTrue(protocol.start_stream(job))
        harness.run_all()

        self.assertEqual(transport.value(), expected_values(harness.store, keys[:10]))
        self.assertEqual(harness.pool.pending, [])

        protocol.resumeProducing()
        harness.run_all()

        self.assertEqual(transport.value(), expected_values(harness.store, keys) + b"END\r\n")
        self.assertEqual(job_seen, keys)

    def test_pipelined_request_waits_for_stream(self) -> None:
        harness = ConnectionHarness(stream_buffer=4096)
        keys = harness.fill(100, 100)
        protocol, transport = harness.connect()

        protocol.dataReceived(b"rget 1 1 0 key\r\nversion\r\n")
        harness.pool.run_next()
        harness.reactor.run_thread_calls()

        self.assertNotIn(b"VERSION", transport.value())
        harness.run_all()
        self.assertTrue(transport.value().endswith(b"END\r\nVERSION 1.6.18\r\n"))
        self.assertEqual(transport.value().count(b"VALUE "), len(keys))

    def test_connection_lost_while_handoff_queued(self) -> None:
        harness = ConnectionHarness(stream_buffer=4096)
        harness.fill(100, 100)
        protocol, transport = harness.connect()
        protocol.dataReceived(b"rget 1 1 0 key\r\n")
        harness.pool.run_next()
        self.assertEqual(len(harness.reactor.thread_calls), 1)

        protocol.connectionLost()
        harness.reactor.run_thread_calls()

        self.assertEqual(transport.value(), b"")
        self.assertEqual(harness.pool.pending, [])
        self.assertEqual(harness.factory.stats.streams_cancelled, 1)
        self.assertEqual(harness.factory.streams, set())

    def test_stop_producing_while_step_runs(self) -> None:
        harness = ConnectionHarness(stream_buffer=1024 * 1024)
        keys = harness.fill(100, 20)
        protocol, transport = harness.connect()
        written = []

        def stop_after_fifth(key: bytes, item: Any) -> bytes:
            written.append(key)
            if len(written) == 5:
                protocol.stopProducing()
            return format_value(key, item)

        job = RangeReadJob(harness.store, KeyRange(b"key", None), stop_after_fifth, b"END\r\n")
        protocol.start_stream(job)
        harness.run_all()

        # The fifth item's write, the first after the cancellation, ended
        # the step.
        self.assertEqual(written, keys[:5])
        self.assertEqual(transport.value(), b"")
        self.assertEqual(harness.factory.stats.streams_cancelled, 1)
        self.assertIsNone(protocol.stream)

    def test_stall_timeout_aborts_connection(self) -> None:
        harness = ConnectionHarness(stream_buffer=4096, stall_timeout=30.0)
        harness.fill(100, 100)
        protocol, transport = harness.connect()
        protocol.dataReceived(b"rget 1 1 0 key\r\n")
        harness.pool.run_next()
        protocol.pauseProducing()
        harness.run_all()

        harness.reactor.advance(29)
        self.assertFalse(transport.disconnecting)
        harness.reactor.advance(2)

        self.assertTrue(transport.disconnected)
        self.assertIsNone(transport.producer)
        self.assertEqual(harness.factory.stats.streams_stalled, 1)
        self.assertEqual(harness.factory.streams, set())

    def test_repeated_pause_resume_calls_from_transport(self) -> None:
        harness = ConnectionHarness(stream_buffer=4096)
        keys = harness.fill(100, 100)
        protocol, transport = harness.connect()
        protocol.dataReceived(b"rget 1 1 0 key\r\n")

        for _ in range(3):
            harness.pool.run_next()
            protocol.pauseProducing()
            protocol.pauseProducing()
            harness.run_all()
            self.assertEqual(harness.pool.pending, [])
            protocol.resumeProducing()
            protocol.resumeProducing()
            self.assertEqual(len(harness.pool.pending), 1)
        harness.run_all()

        self.assertEqual(transport.value(), expected_values(harness.store, keys) + b"END\r\n")

    def test_factory_cancel_streams_with_paused_streams(self) -> None:
        harness = ConnectionHarness(stream_buffer=4096)
        harness.fill(100, 100)
        pairs = [harness.connect() for _ in range(3)]
        for protocol, _ in pairs:
            protocol.dataReceived(b"rget 1 1 0 key\r\n")
            harness.pool.run_next()
            protocol.pauseProducing()
        harness.run_all()
        self.assertEqual(len(harness.factory.streams), 3)

        harness.factory.cancel_streams()

        self.assertEqual(harness.factory.streams, set())
        self.assertEqual(harness.factory.stats.streams_running, 0)
        self.assertEqual(harness.pool.pending, [])
        self.assertEqual(harness.reactor.getDelayedCalls(), [])
        for _, transport in pairs:
            self.assertTrue(transport.disconnected)

    def test_too_many_streams_rejected(self) -> None:
        harness = ConnectionHarness(stream_buffer=4096, max_streams=1)
        harness.fill(100, 100)
        first, _ = harness.connect()
        second, second_transport = harness.connect()
        first.dataReceived(b"rget 1 1 0 key\r\n")

        second.dataReceived(b"rget 1 1 0 key\r\nversion\r\n")

        self.assertEqual(second_transport.value(), b"SERVER_ERROR too many concurrent streams\r\nVERSION 1.6.18\r\n")
        self.assertEqual(harness.factory.stats.streams_rejected, 1)

    def test_too_many_streams_logged_once(self) -> None:
        harness = ConnectionHarness(stream_buffer=4096, max_streams=1)
        harness.fill(100, 100)
        first, _ = harness.connect()
        second, _ = harness.connect()
        first.dataReceived(b"rget 1 1 0 key\r\n")

        with capturedLogs() as events:
            second.dataReceived(b"rget 1 1 0 key\r\n")

        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["peer"], second.peer)

    def test_stream_stats_recorded(self) -> None:
        harness = ConnectionHarness(stream_buffer=4096)
        harness.fill(100, 100)
        protocol, transport = harness.connect()

        protocol.dataReceived(b"rget 1 1 0 key\r\n")
        harness.run_all()

        stats = harness.factory.stats
        self.assertEqual(stats.streams_started, 1)
        self.assertEqual(stats.stream_bytes, len(transport.value()))
        self.assertGreater(stats.stream_reactor_hops, 0)

    def test_stream_bytes_counted_while_running(self) -> None:
        harness = ConnectionHarness(stream_buffer=4096)
        harness.fill(100, 100)
        protocol, transport = harness.connect()

        protocol.dataReceived(b"rget 1 1 0 key\r\n")
        harness.pool.run_next()
        harness.reactor.run_thread_calls()

        stats = harness.factory.stats
        self.assertEqual(stats.streams_running, 1)
        self.assertGreater(len(transport.value()), 0)
        self.assertEqual(stats.stream_bytes, len(transport.value()))

    def test_pipelined_input_bound_pauses_reading(self) -> None:
        harness = ConnectionHarness(stream_buffer=4096, max_pending_input=10000)
        harness.fill(100, 100)
        protocol, transport = harness.connect()
        protocol.dataReceived(b"rget 1 1 0 key\r\n")

        # A client that pipelines while the stream runs: the connection
        # stops reading once more than max_pending_input bytes wait.
        for _ in range(4):
            protocol.dataReceived(b"version\r\n" * 250)
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"version\r\n" * 250)
        self.assertEqual(transport.producerState, "paused")

        harness.run_all()

        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(transport.value().count(b"VERSION 1.6.18\r\n"), 250 * 5)


class UnboundedStreamTests(SynchronousTestCase):
    """A spool limit of 0, the benchmarks' contrast case, turns the cap and backpressure off."""

    def test_unbounded_step_runs_to_the_end(self) -> None:
        job = ListJob(make_chunks(50, 100))
        harness = StreamHarness(job, spool_limit=0)

        harness.pool.run_next()

        self.assertEqual(job.position, 50)
        self.assertEqual(job.steps, 1)

    def test_unbounded_stream_ignores_pause(self) -> None:
        chunks = make_chunks(50, 100)
        job = ListJob(chunks)
        harness = StreamHarness(job, spool_limit=0)

        harness.stream.pause()
        harness.run_all()

        self.assertFalse(harness.stream.paused)
        self.assertEqual(harness.sent, b"".join(chunks) + b"END\r\n")
        self.assertEqual(harness.results, [None])
