# -*- test-case-name: tests.test_streaming -*-
"""
The streaming core: run a job on worker threads and stream its output to
one connection, with bounded memory and backpressure.

Only the reactor thread touches the transport.  A job runs as a series of
bounded *steps* on the service's thread pool; each step writes its output
into the connection's *spool* and returns.  The spool is the only state the
two threads share, and it is guarded by a lock.

Who does what
=============

Worker thread (inside ``job.run_step``):
    calls ``spool.write(chunk)`` for each piece of output.  When the bytes
    spooled since the last hand-off reach half the spool cap, ``write``
    schedules one flush with ``reactor.callFromThread`` (never more than one
    pending per stream).  ``write`` returns False when the step must end:
    the step has produced a spool's worth of bytes, or the stream was
    paused or cancelled.  The job then returns, keeping a cursor (for a
    scan: the last key written) so the next step continues from there.

Reactor thread:
    flushes the spool with ``write_sequence`` (one call per batch), runs
    ``job.after_step`` when a step's thread returns, and decides whether to
    start another step.

States
======

::

    start() ──► STEPPING ──(step returns)──► WAITING ──(not paused)──► STEPPING
                   │                            │
              pause() ends the step        pause(): stay WAITING; no thread held
              at its next write            resume(): start the next step
                   │                            │
                   └─► DONE   job.after_step returned its final bytes
                   └─► CANCELLED   cancel(), connection lost, or paused
                                   longer than the stall timeout

STEPPING
    A step runs on a pool thread.  At most one step per stream runs at once.
WAITING
    No thread is held.  If the transport has not paused us, the next step
    is scheduled at once; otherwise the stream waits for ``resume``, and a
    stall timer runs.  A paused stream thus costs a cursor, not a thread.
DONE
    The job's output, including its final bytes, went to the transport and
    the Deferred from :meth:`Stream.start` fired with ``None``.
CANCELLED
    No step starts again; a running step stops at its next ``write``; any
    flush that arrives later is dropped.  The Deferred failed with
    ``CancelledError`` or, after a stall, :class:`StreamStalled`.

Memory per stream is bounded by the spool cap plus one chunk (a chunk is
never split, so a value larger than the cap passes whole), plus whatever
the transport buffers before it pauses us.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool


class StreamStalled(Exception):
    """The client read nothing for longer than the stall timeout."""


class StreamJob(Protocol):
    """
    Work whose output is streamed to a client.

    ``run_step`` runs on a worker thread and must not touch the transport,
    Deferreds or store mutations; ``after_step`` runs on the reactor thread.
    """

    def run_step(self, spool: Spool) -> Any:
        """Produce the next piece of output through ``spool.write`` until it returns False or the job ends."""

    def after_step(self, result: Any) -> bytes | None:
        """
        Apply what the step found (store mutations belong here).

        :return: ``None`` while more steps are needed; once the job is
            complete, the bytes to send after everything spooled (may be
            empty).
        """


class Spool:
    """The worker-side view of a stream: where a job step writes its output."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    def write(self, chunk: bytes) -> bool:
        """
        Queue ``chunk`` for the client (worker thread).

        :return: whether the step may go on producing.
        """
        return self._stream._spool_write(chunk)

    @property
    def cancelled(self) -> bool:
        """Whether the stream was cancelled; a long step should check it between writes."""
        return self._stream.cancelled


class Stream:
    """
    One job's output on its way to one connection.

    Every method except the spool's runs on the reactor thread.

    :param write_sequence: sends a list of byte strings to the transport.
    :param spool_limit: the spool cap in bytes; a step ends once it has
        produced this many bytes.
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
        self._handoff_size = max(spool_limit // 2, 1)
        self._stall_timeout = stall_timeout
        self._spool = Spool(self)

        # Shared with the worker; guarded by _lock.
        self._lock = threading.Lock()
        self._chunks: list[bytes] = []
        self._spooled_bytes = 0
        self._flush_pending = False

        # Read by the worker, written by the reactor thread only.
        self.paused = paused
        self.cancelled = False

        # Worker-only: bytes produced by the running step.
        self._step_bytes = 0

        # Reactor-only.
        self.stepping = False
        self.done = False
        self._stall_call: IDelayedCall | None = None
        self._deferred: Deferred[None] = Deferred(lambda d: self.cancel())
        #: ``callFromThread`` calls made for this stream (hand-offs and step ends).
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
        if self.paused or self._finished():
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
        self.stepping = True
        self.reactor_hops += 1
        d = deferToThreadPool(self._reactor, self._threadpool, self._run_step)
        d.addCallbacks(self._step_returned, self._step_failed)

    def _step_returned(self, result: Any) -> None:
        self.stepping = False
        if self.cancelled:
            return
        try:
            tail = self.job.after_step(result)
        except Exception:
            self._fail(Failure())
            return
        self._flush()
        if self.cancelled:
            return
        if tail is not None:
            if tail:
                self._send([tail])
            self.done = True
            self._disarm_stall_timer()
            self._deferred.callback(None)
        elif not self.paused:
            self._start_step()

    def _step_failed(self, failure: Failure) -> None:
        self.stepping = False
        self._fail(failure)

    def _flush(self) -> None:
        with self._lock:
            chunks = self._chunks
            self._chunks = []
            self._spooled_bytes = 0
            self._flush_pending = False
        if chunks and not self.cancelled:
            self._send(chunks)

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
        if self.cancelled:
            return None
        return self.job.run_step(self._spool)

    def _spool_write(self, chunk: bytes) -> bool:
        if self.cancelled:
            return False
        self._step_bytes += len(chunk)
        step_over = self.paused or self._step_bytes >= self.spool_limit
        with self._lock:
            self._chunks.append(chunk)
            self._spooled_bytes += len(chunk)
            # The end of a step flushes anyway, so hand off early only when
            # the step goes on.
            hand_off = not step_over and not self._flush_pending and self._spooled_bytes >= self._handoff_size
            if hand_off:
                self._flush_pending = True
        if hand_off:
            self.reactor_hops += 1
            self._reactor.callFromThread(self._flush)
        return not step_over and not self.cancelled
