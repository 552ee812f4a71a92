# -*- test-case-name: tests.test_connection -*-
"""
One client connection: input buffering, protocol detection, reply order and
flow control, shared by the text, meta and binary protocols.

The connection owns the input buffer and hands it to a protocol handler
(:class:`kvdaemon._text.TextHandler` or
:class:`kvdaemon._binary.BinaryHandler`, picked from the first byte the
client sends).  A handler's ``process(buffer, offset)`` executes complete
requests from ``offset`` on and returns the offset of the first byte it did
not consume.  It stops early when :attr:`Connection.blocked` becomes true:

- a streaming job started (:meth:`Connection.start_stream`): later
  pipelined requests wait until the job's output has been written, so
  replies leave in request order;
- the transport paused us because its write buffer is full: like
  memcached, a connection whose output is backed up is not read.  A
  request with a long reply (a ``get`` of many keys) can stop there too,
  leaving the rest of its reply to :meth:`Connection.finish_later`;
- the connection is closing.

While blocked, received bytes accumulate; past
:attr:`Settings.max_pending_input` the connection stops reading from the
socket (``transport.pauseProducing``) until the backlog has been processed.

The connection is registered once, in ``connectionMade``, as the
transport's streaming producer, and routes pause, resume and stop to the
running stream, if any.

Twisted's ``LineReceiver`` is not used for framing: memcached requests mix
lines with length-prefixed data blocks and binary headers, and
``LineReceiver`` copies the rest of its buffer for every line it splits
off, which is quadratic in the number of pipelined requests per read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol as TypingProtocol, TypeVar

from twisted.internet import protocol
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kvdaemon._directwrite import direct_sender
from kvdaemon._logging import LimitedLogger, LogLimit, limited_logger
from kvdaemon._streaming import Stream, StreamJob, StreamStalled

if TYPE_CHECKING:
    from kvdaemon._factory import KVDaemonFactory

#: Replies produced while one read's requests execute are sent together.
#: Past this many bytes they are sent at once, so a pipeline of large
#: replies cannot pile up before the transport gets a chance to push back.
OUTPUT_BATCH_BYTES = 64 * 1024

#: The first byte of every binary protocol request.
BINARY_REQUEST_MAGIC = 0x80

_T = TypeVar("_T")


class Handler(TypingProtocol):
    """The interface the connection calls on a protocol handler."""

    def process(self, buffer: bytes, offset: int) -> int:
        """Execute complete requests in ``buffer`` from ``offset``; return the first unconsumed offset."""

    def connection_lost(self) -> None:
        """Release anything the handler holds for the connection."""


def describe_address(address: object) -> str:
    """Format a Twisted address as memcached does: ``tcp:HOST:PORT`` or ``unix:PATH``."""
    port = getattr(address, "port", None)
    if port is not None:
        kind = "tcp6" if getattr(address, "type", "") == "TCP" and ":" in address.host else "tcp"
        return "%s:%s:%d" % (kind, address.host, port)
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return "unix:%s" % (name or "")


@implementer(IPushProducer)
class Connection(protocol.Protocol):
    """
    A client connection to a :class:`kvdaemon.KVDaemonFactory`.

    Every method runs on the reactor thread.
    """

    log = Logger()
    factory: KVDaemonFactory

    def __init__(self) -> None:
        self._buffer = b""
        self._offset = 0
        #: Chunks received while waiting for ``bytes_needed`` bytes in all.
        self._chunks: list[bytes] = []
        self._chunks_length = 0
        #: Bytes from ``_offset`` the handler needs before it can progress.
        self.bytes_needed = 0
        self.handler: Handler | None = None
        self._send_now: Callable[[bytes], bool] | None = None
        #: True while requests execute: replies then wait in _output.
        self._collecting = False
        self._output: list[bytes] = []
        self._output_bytes = 0
        self.stream: Stream | None = None
        #: Produces the rest of a reply that stopped because the transport
        #: paused us; runs when the transport resumes.
        self._unfinished_reply: Callable[[], None] | None = None
        #: True while the transport's write buffer is over its limit.
        self.producer_paused = False
        self.reading_paused = False
        self.closing = False
        self.peer = "unknown"
        self.stats = None
        #: A number unique within the server, shown by ``stats conns``.
        self.connection_id = 0
        #: The client and local addresses as ``stats conns`` shows them.
        self.address = ""
        self.listen_address = ""
        self.last_request_time = 0.0
        #: The log budget that this connection's handlers share.
        self.log_limit: LogLimit | None = None

    # -- IProtocol --

    def connectionMade(self) -> None:
        self.stats = self.factory.stats
        self.peer = describe_address(self.transport.getPeer())
        self.address = self.peer
        self.listen_address = describe_address(self.transport.getHost())
        self._seconds = self.factory.reactor.seconds
        self.last_request_time = self._seconds()
        self.log_limit = LogLimit(self._seconds, self.peer, parent=self.factory.log_limit)
        self.transport.registerProducer(self, True)
        self._send_now = direct_sender(self.transport)
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            # Like memcached: a reply must not wait for the client's
            # acknowledgement of the previous one (Nagle's algorithm).
            try:
                set_no_delay(True)
            except OSError:
                pass
        self.factory.connection_opened(self)

    def dataReceived(self, data: bytes) -> None:
        self.stats.bytes_read += len(data)
        if self.bytes_needed:
            self._chunks.append(data)
            self._chunks_length += len(data)
            if len(self._buffer) - self._offset + self._chunks_length < self.bytes_needed:
                self._check_backlog()
                return
            data = b"".join(self._chunks)
            self._chunks = []
            self._chunks_length = 0
        if self._offset:
            self._buffer = self._buffer[self._offset :] + data
            self._offset = 0
        elif self._buffer:
            self._buffer += data
        else:
            self._buffer = data
        self.process_input()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if reason.check("OpenSSL.SSL.Error"):
            # Twisted's TLS layer closes the connection itself when OpenSSL
            # fails, for example on a client that sends plain text to an
            # ssl: endpoint, and reports the error only here.  The name is
            # a string so that pyOpenSSL stays optional.
            self.log.info("Closed {peer} after a TLS error: {error}", peer=self.peer, error=reason.value)
        self.closing = True
        self._unfinished_reply = None
        if self.log_limit is not None:
            self.log_limit.report()
        if self.stream is not None:
            self.stream.cancel()
        if self.handler is not None:
            self.handler.connection_lost()
        self.factory.connection_closed(self)

    def logger_for(self, source: object) -> LimitedLogger:
        """Return a logger for ``source``, one of this connection's handlers, drawing on its log budget."""
        return limited_logger(source, self.log_limit)

    # -- input processing --

    @property
    def blocked(self) -> bool:
        """Whether handlers must stop executing requests for now."""
        return self.stream is not None or self.producer_paused or self.closing or self._unfinished_reply is not None

    def process_input(self) -> None:
        """Execute buffered requests until the buffer runs dry or the connection blocks."""
        if self._unfinished_reply is not None and not self.producer_paused and not self.closing:
            self._finish_reply()
        if (
            self.stream is None
            and not self.producer_paused
            and not self.closing
            and self._unfinished_reply is None
            and self._offset < len(self._buffer)
        ):
            if self.handler is None:
                self.handler = self._detect_protocol(self._buffer[self._offset])
            self.bytes_needed = 0
            start = self._offset
            # Requests see their own time as the last request's time, as
            # in memcached's ``stats conns``.
            previous_request_time = self.last_request_time
            self.last_request_time = self._seconds()
            handler = self.handler
            offset = self._run_collecting(lambda: handler.process(self._buffer, start))
            if offset is None:
                return
            self._offset = offset
            if offset == start:
                # Like memcached, count requests, not reads: a client
                # that trickles in a partial request is still idle.
                self.last_request_time = previous_request_time
            if self._offset >= len(self._buffer):
                self._buffer = b""
                self._offset = 0
                if not self.reading_paused and not self._chunks_length:
                    # Nothing is pending, so there is no backlog to check.
                    return
        self._check_backlog()

    def finish_later(self, produce_rest: Callable[[], None]) -> None:
        """
        Call ``produce_rest`` to continue the reply being produced once the
        transport resumes, executing no later request before it.

        For a handler whose reply is too large to build at once, after it
        has written part of the reply and found :attr:`producer_paused`
        set.  ``produce_rest`` writes more of the reply and may call this
        again.
        """
        self._unfinished_reply = produce_rest

    def _finish_reply(self) -> None:
        produce_rest = self._unfinished_reply
        self._unfinished_reply = None
        self._run_collecting(produce_rest)

    def _run_collecting(self, call: Callable[[], _T]) -> _T | None:
        """
        Run ``call`` with its replies collected into one send, and send them.

        An unexpected error is logged and closes the connection, and then
        ``None`` is returned, so it never escapes ``dataReceived``.
        """
        self._collecting = True
        try:
            result = call()
        except Exception:
            self._collecting = False
            self.log.failure("Unexpected error serving {peer}; closing the connection", peer=self.peer)
            self.close()
            return None
        self._collecting = False
        self._flush_output()
        return result

    def _detect_protocol(self, first_byte: int) -> Handler:
        # With SASL on, memcached parses every connection as binary, so a
        # text request gets no reply, and the connection is closed once 24
        # bytes (a header with the wrong magic) have arrived.
        settings = self.factory.settings
        if settings.sasl_users is None and settings.auth_users is not None:
            # With an authentication file, memcached reads every connection
            # as text, so a binary request gets no reply.
            from kvdaemon._textauth import AuthenticationGate

            return AuthenticationGate(self, settings.auth_users)
        if first_byte == BINARY_REQUEST_MAGIC or settings.sasl_users is not None:
            from kvdaemon._binary import BinaryHandler

            return BinaryHandler(self)
        from kvdaemon._text import TextHandler

        return TextHandler(self)

    def _check_backlog(self) -> None:
        backlog = len(self._buffer) - self._offset + self._chunks_length
        limit = self.factory.settings.max_pending_input
        if backlog > limit and self.blocked and not self.reading_paused and not self.closing:
            self.reading_paused = True
            self.transport.pauseProducing()
        elif self.reading_paused and (backlog <= limit or not self.blocked):
            self.reading_paused = False
            self.transport.resumeProducing()

    @property
    def waiting_for_request(self) -> bool:
        """
        Whether the connection is between requests with nothing in progress:
        no stream, no output waiting to be sent, no request partly received
        and not closing.  memcached's idle timeout closes only connections
        in this state.
        """
        # A client that has not authenticated is closed even in the middle
        # of its login request, as memcached does, so that half-sent logins
        # cannot hold connection slots.
        partly_received = self.bytes_needed and not getattr(self.handler, "unauthenticated", False)
        if self.closing or self.stream is not None or self.producer_paused or partly_received:
            return False
        if self._unfinished_reply is not None:
            return False
        # TCP and UNIX socket transports queue unsent bytes in these two
        # attributes of twisted.internet.abstract.FileDescriptor.
        transport = self.transport
        return not (getattr(transport, "dataBuffer", b"") or getattr(transport, "_tempDataBuffer", None))

    @property
    def state_name(self) -> str:
        """The connection's state in memcached's ``stats conns`` words."""
        if self.closing:
            return "conn_closing"
        if self.stream is not None or self.producer_paused:
            return "conn_mwrite"
        if self.bytes_needed:
            return "conn_nread"
        return "conn_parse_cmd"

    # -- output --

    def write(self, data: bytes) -> None:
        """Send one reply (reactor thread only)."""
        self.stats.bytes_written += len(data)
        if self._collecting:
            self._output.append(data)
            self._output_bytes += len(data)
            if self._output_bytes >= OUTPUT_BATCH_BYTES:
                self._flush_output()
        else:
            self._send(data)

    def write_sequence(self, chunks: list[bytes]) -> None:
        """Send several replies at once (reactor thread only)."""
        if self._collecting:
            size = sum(map(len, chunks))
            self.stats.bytes_written += size
            self._output.extend(chunks)
            self._output_bytes += size
            if self._output_bytes >= OUTPUT_BATCH_BYTES:
                self._flush_output()
        elif self._send_now is None:
            self.stats.bytes_written += sum(map(len, chunks))
            self.transport.writeSequence(chunks)
        else:
            self.write(b"".join(chunks))

    def _write_stream_batch(self, chunks: list[bytes]) -> None:
        # A stream's batch goes to the transport's own queue in one
        # writeSequence call, not through the direct sender: batches are
        # large, so sending them a reactor iteration later costs nothing
        # that matters.  The direct sender checks that queue first, so the
        # order of replies is kept either way.
        size = sum(map(len, chunks))
        self.stats.bytes_written += size
        # Counted as sent, not when the stream ends, so that ``stats``
        # shows the progress of a long stream.
        self.stats.stream_bytes += size
        self.transport.writeSequence(chunks)

    def _send(self, data: bytes) -> None:
        if self._send_now is None or not self._send_now(data):
            self.transport.write(data)

    def _flush_output(self) -> None:
        if self._output:
            output = self._output
            self._output = []
            self._output_bytes = 0
            self._send(output[0] if len(output) == 1 else b"".join(output))

    def close(self) -> None:
        """
        Close the connection after the replies already written.

        The producer is unregistered first: a transport with a paused
        streaming producer never finishes closing.
        """
        if self.closing:
            return
        self._flush_output()
        self.closing = True
        if self.stream is not None:
            self.stream.cancel()
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def abort(self) -> None:
        """
        Drop the connection at once, discarding output not yet sent.

        For a stream that ended early: its client has a truncated reply
        that it cannot tell from a complete one, and ``loseConnection``
        would wait forever for a client that stopped reading.
        """
        if not self.closing:
            self.closing = True
            if self.stream is not None:
                self.stream.cancel()
            self.transport.unregisterProducer()
        self.transport.abortConnection()

    # -- streaming --

    def start_stream(self, job: StreamJob, on_done: Callable[[], None] | None = None) -> bool:
        """
        Run ``job`` on the worker pool, streaming its output to this client.

        Later requests wait until the job's output has been written.
        :return: False, after doing nothing, when the server already runs
            its maximum number of streams; the caller then replies with an
            error.
        """
        factory = self.factory
        if self.stats.streams_running >= factory.settings.max_streams:
            self.stats.streams_rejected += 1
            self.log.warn(
                "Rejected a stream for {peer}: {running} streams already running",
                peer=self.peer,
                running=self.stats.streams_running,
            )
            return False
        self.stats.streams_started += 1
        self.stats.streams_running += 1
        # Replies to earlier requests go out before the stream's output.
        self._flush_output()
        stream = Stream(
            job,
            reactor=factory.reactor,
            threadpool=factory.threadpool,
            write_sequence=self._write_stream_batch,
            spool_limit=factory.settings.stream_buffer,
            stall_timeout=factory.settings.stall_timeout,
            paused=self.producer_paused,
        )
        self.stream = stream
        factory.streams.add(stream)
        stream.start().addBoth(self._stream_ended, stream, on_done)
        return True

    def _stream_ended(self, result: object, stream: Stream, on_done: Callable[[], None] | None) -> None:
        self.stats.streams_running -= 1
        self.stats.stream_reactor_hops += stream.reactor_hops
        self.factory.streams.discard(stream)
        if self.stream is stream:
            self.stream = None
        if isinstance(result, Failure):
            # A job that keeps state beyond the stream (a resumable scan's
            # busy mark) learns that it will get no more after_step calls.
            release = getattr(stream.job, "release", None)
            if release is not None:
                release()
            if result.check(StreamStalled):
                self.stats.streams_stalled += 1
                self.log.warn(
                    "Closing {peer}: the client read nothing for {timeout} seconds during a stream",
                    peer=self.peer,
                    timeout=self.factory.settings.stall_timeout,
                )
                self.abort()
            elif result.check(CancelledError):
                self.stats.streams_cancelled += 1
                if not self.closing:
                    # Cancelled while the client still listens, for
                    # example because the server is stopping.
                    self.log.info("Closing {peer}: its stream was cancelled", peer=self.peer)
                    self.abort()
            else:
                self.log.failure("Stream for {peer} failed; closing the connection", result, peer=self.peer)
                self.abort()
            return
        if on_done is not None and not self.closing:
            on_done()
        self.process_input()

    # -- IPushProducer, called by the transport --

    def pauseProducing(self) -> None:
        if self.producer_paused:
            return
        self.producer_paused = True
        if self.stream is not None:
            self.stream.pause()

    def resumeProducing(self) -> None:
        if not self.producer_paused:
            return
        self.producer_paused = False
        if self.stream is not None:
            self.stream.resume()
        self.process_input()

    def stopProducing(self) -> None:
        self.closing = True
        if self.stream is not None:
            self.stream.cancel()
