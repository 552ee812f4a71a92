# -*- test-case-name: tests.test_streaming -*-
"""
The streaming core: run a job on worker threads and stream its output to
one connection, with bounded memory and backpressure.

Only the reactor thread touches the transport.  A job runs as a series of
bounded *steps* on the service's thread pool.  Each step writes its output
into the stream's *spool* and returns its thread to the pool.  The spool,
the step's outcome and the "hand-off pending" flag are the only state the
two threads share, and a lock guards them.

Who does what
=============

Worker thread, inside ``job.run_step``:
    calls ``spool.write(chunk)`` for each piece of output.  Once the bytes
    spooled since the last hand-off reach half the spool cap, ``write``
    schedules a hand-off with ``reactor.callFromThread``.  ``write``
    returns False when the step must end: the step has produced a spool's
    worth of bytes, or the stream was paused or cancelled.  The job then
    returns, keeping a cursor (for a scan: the last key written) so that
    the next step continues from there.  When the step returns, its
    outcome joins the pending hand-off, or schedules one if none is
    pending.  So each stream has at most one ``callFromThread`` call
    waiting at any time.

Reactor thread, in the hand-off:
    sends the spooled chunks with one ``write_sequence`` call.  If the step
    has ended, it runs ``job.after_step`` and decides whether to start
    another step.

Steps are not run with ``deferToThreadPool``: it hands each step's result
back with a ``callFromThread`` of its own, so a step ending while a
hand-off is queued would leave two calls pending for one stream.  The
stream uses the call ``deferToThreadPool`` is built on,
``ThreadPool.callInThreadWithCallback``, on the service's own pool, and
folds the step's result into the pending hand-off.

States
======

::

                 start(), not paused
    WAITING ─────────────────────────────► STEPPING
       ▲  ▲                                   │
       │  └───── step ended, paused ──────────┤
       │                                      │ step ended, not paused:
       └── resume() starts a step ◄───────────┘ next step starts at once

    Any state ── job complete ──────────────────────► DONE
    Any state ── cancel(), connection lost, stall ──► CANCELLED

STEPPING
    A step is queued on or running on a pool thread.  At most one step per
    stream exists at once.  ``pause()`` makes the running step end at its
    next ``write``; a step that starts while the stream is paused returns
    at once without producing anything.
WAITING
    The stream uses no thread and no pool work item.  Only the job's
    cursor remains.  It waits for ``resume()``, and a stall timer runs.
DONE
    Everything the job produced, including the final bytes from
    ``after_step``, went to the transport, and the Deferred from
    :meth:`Stream.start` fired with ``None``.
CANCELLED
    No step starts again, a running step stops at its next ``write``, and a
    hand-off that arrives later is dropped.  The Deferred failed with
    ``CancelledError`` or, after a stall, :class:`StreamStalled`.

Memory per stream is bounded by the spool cap plus one chunk (a chunk is
never split, so a value larger than the cap passes whole), plus whatever
the transport buffers before it pauses the stream.  A step starts only
while the transport is not paused, and it produces at most a spool's
worth, so the transport buffer stays under its pause threshold (64 KiB in
Twisted) plus one spool cap plus one chunk.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool


#: Bytes handed over at a time when the spool cap is off.
UNBOUNDED_HANDOFF_BYTES = 128 * 1024


class StreamStalled(Exception):
    """The client read nothing for longer than the stall timeout."""


class StreamJob(Protocol):
    """
    Work whose output is streamed to a client.

    ``run_step`` runs on a worker thread and must not touch the transport,
    Deferreds or store mutations.  ``after_step`` runs on the reactor
    thread.  Steps never overlap, and ``after_step`` for one step runs
    before the next step starts.
    """

    def run_step(self, spool: Spool) -> Any:
        """
        Produce the next piece of output through ``spool.write``.

        Return as soon as ``write`` returns False or the job has nothing
        more to produce.  The return value is passed to ``after_step``.
        """

    def after_step(self, result: Any) -> bytes | None:
        """
        Apply what the step found (store mutations belong here).

        :return: ``None`` while more steps are needed.  Once the job is
            complete, the bytes to send after everything spooled (may be
            empty).
        """


#: The result of a step that started while the stream was paused.
_SKIPPED = object()


class Spool:
    """The worker-side view of a stream: where a job step writes its output."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    def write(self, chunk: bytes) -> bool:
        """
        Queue ``chunk`` for the client (worker thread).

        The chunk is always kept, so the job must count it as sent.
        :return: whether the step may go on producing.
        """
        return self._stream._spool_write(chunk)

    @property
    def remaining(self) -> int:
        """Bytes the current step may still produce before ``write`` ends it (at least 1)."""
        stream = self._stream
        if not stream.bounded:
            return UNBOUNDED_HANDOFF_BYTES
        return max(stream.spool_limit - stream._step_bytes, 1)

    @property
    def stopping(self) -> bool:
        """Whether the next ``write`` will end the step because the stream was paused or cancelled."""
        stream = self._stream
        return stream.cancelled or (stream.paused and stream.bounded)

    @property
    def cancelled(self) -> bool:
        """Whether the stream was cancelled; a long step should check it between writes."""
        return self._stream.cancelled


class Stream:
    """
    One job's output on its way to one connection.

    Every method except the spool's runs on the reactor thread.

    :param threadpool: the pool that runs the steps; anything with
        ``ThreadPool.callInThreadWithCallback``.
    :param write_sequence: sends a list of byte strings to the transport.
    :param spool_limit: the spool cap in bytes; a step ends once it has
        produced this many bytes.  0 turns the cap and backpressure off
        (the benchmarks' contrast case only): steps then never end early
        and pauses are ignored, so a stalled client's reply piles up in
        memory.
    :param stall_timeout: seconds the stream may stay paused before it is
        cancelled with :class:`StreamStalled`; 0 disables the timer.
    :param paused: whether the transport is paused when the stream starts.
    """

    def __init__(
        self,
        job: StreamJob,
        *,
        reactor: Any,
        threadpool: ThreadPool,
        write_sequence: Callable[[list[bytes]], None],
        spool_limit: int,
        stall_timeout: float,
        paused: bool = False,
    ) -> None:
        self.job = job
        self._reactor = reactor
        self._threadpool = threadpool
        self._write_sequence = write_sequence
        self.spool_limit = spool_limit
        self.bounded = spool_limit > 0
        self._handoff_size = max(spool_limit // 2, 1) if self.bounded else UNBOUNDED_HANDOFF_BYTES
        self._stall_timeout = stall_timeout
        self._spool = Spool(self)

        # Shared with the worker, guarded by _lock.
        self._lock = threading.Lock()
        self._chunks: list[bytes] = []
        self._spooled_bytes = 0
        #: Whether a callFromThread to _take_handoff is queued.
        self._handoff_pending = False
        #: (succeeded, result) of a step that ended, until the reactor takes it.
        self._step_outcome: tuple[bool, Any] | None = None

        # Written by the reactor thread only; the worker reads them.
        self.paused = paused
        self.cancelled = False

        # Worker only: bytes produced by the running step.
        self._step_bytes = 0

        # Reactor thread only.
        self.stepping = False
        self.done = False
        self._stall_call: IDelayedCall | None = None
        self._deferred: Deferred[None] = Deferred(lambda d: self.cancel())
        #: Hand-offs from a worker thread that the reactor thread ran
        #: (each is one ``callFromThread`` call).
        self.reactor_hops = 0
        #: Bytes handed to the transport.
        self.bytes_sent = 0

    # -- reactor thread --

    def start(self) -> Deferred[None]:
        """Start the job; the Deferred fires when it is done or cancelled."""
        if self.paused:
            self._arm_stall_timer()
        else:
            self._start_step()
        return self._deferred

    def pause(self) -> None:
        """Stop producing after the current write (idempotent)."""
        if self.paused or self._finished() or not self.bounded:
            return
        self.paused = True
        self._arm_stall_timer()

    def resume(self) -> None:
        """Produce again (idempotent)."""
        if not self.paused or self._finished():
            return
        self.paused = False
        self._disarm_stall_timer()
        if not self.stepping:
            self._start_step()

    def cancel(self) -> None:
        """Stop the job: no step starts again and the running one stops at its next write."""
        self._fail(Failure(CancelledError()))

    # -- internals, reactor thread --

    def _finished(self) -> bool:
        return self.done or self.cancelled

    def _start_step(self) -> None:
        if getattr(self._threadpool, "joined", False):
            # A stopped ThreadPool drops new work without a word, which
            # would leave this stream waiting forever.
            self._fail(Failure(CancelledError("the worker pool is stopped")))
            return
        self.stepping = True
        # The pool's callback runs on the worker thread: it merges the
        # step's end into a pending hand-off instead of adding a second
        # callFromThread, which deferToThreadPool would do.
        self._threadpool.callInThreadWithCallback(self._step_finished, self._run_step)

    def _take_handoff(self) -> None:
        self.reactor_hops += 1
        with self._lock:
            chunks = self._chunks
            self._chunks = []
            self._spooled_bytes = 0
            outcome = self._step_outcome
            self._step_outcome = None
            self._handoff_pending = False
        if self._finished():
            # The connection is gone or the job was cancelled: drop the data.
            return
        if chunks:
            self._send(chunks)
        if outcome is not None:
            self._step_ended(*outcome)

    def _step_ended(self, succeeded: bool, result: Any) -> None:
        self.stepping = False
        if self._finished():
            return
        if not succeeded:
            self._fail(result)
            return
        if result is _SKIPPED:
            tail = None
        else:
            try:
                tail = self.job.after_step(result)
            except Exception:
                self._fail(Failure())
                return
            if self._finished():
                return
        if tail is not None:
            self.done = True
            self._disarm_stall_timer()
            if tail:
                self._send([tail])
            self._deferred.callback(None)
        elif not self.paused:
            self._start_step()

    def _send(self, chunks: list[bytes]) -> None:
        self.bytes_sent += sum(map(len, chunks))
        # The transport may call pause() from inside this call.
        self._write_sequence(chunks)

    def _fail(self, failure: Failure) -> None:
        if self._finished():
            return
        self.cancelled = True
        self._disarm_stall_timer()
        with self._lock:
            self._chunks = []
            self._spooled_bytes = 0
        self._deferred.errback(failure)

    def _arm_stall_timer(self) -> None:
        if self._stall_timeout > 0 and self._stall_call is None:
            self._stall_call = self._reactor.callLater(self._stall_timeout, self._stalled)

    def _disarm_stall_timer(self) -> None:
        if self._stall_call is not None:
            if self._stall_call.active():
                self._stall_call.cancel()
            self._stall_call = None

    def _stalled(self) -> None:
        self._stall_call = None
        self._fail(Failure(StreamStalled()))

    # -- worker thread --

    def _run_step(self) -> Any:
        self._step_bytes = 0
        if self.cancelled or self.paused:
            return _SKIPPED
        return self.job.run_step(self._spool)

    def _step_finished(self, succeeded: bool, result: Any) -> None:
        with self._lock:
            self._step_outcome = (succeeded, result)
            schedule = not self._handoff_pending
            self._handoff_pending = True
        if schedule:
            self._reactor.callFromThread(self._take_handoff)

    def _spool_write(self, chunk: bytes) -> bool:
        if self.cancelled:
            return False
        self._step_bytes += len(chunk)
        go_on = not self.bounded or (not self.paused and self._step_bytes < self.spool_limit)
        with self._lock:
            self._chunks.append(chunk)
            self._spooled_bytes += len(chunk)
            # The step's end hands the spool over anyway, so hand off early
            # only while the step goes on.
            schedule = go_on and not self._handoff_pending and self._spooled_bytes >= self._handoff_size
            if schedule:
                self._handoff_pending = True
        if schedule:
            self._reactor.callFromThread(self._take_handoff)
        return go_on and not self.cancelled
