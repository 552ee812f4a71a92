# -*- test-case-name: tests.test_client -*-
"""
A Twisted client for kvdaemon's binary protocol, built for range
operations: range get (opcode 0x30), range delete (0x37) and resumable
range scans (0xDA create, 0xDB continue, 0xDC cancel, as Couchbase's
kv_engine defines them), plus get, set and delete.

Requests are pipelined and matched to their responses by opaque.  Range
operations deliver each :class:`Record` to a callable as soon as its
packet has arrived, and the Deferred of the operation fires after the
last record.

Flow control
============

:class:`KVClientProtocol` is an ``IPushProducer`` of records.  A consumer
that cannot keep up calls :meth:`~KVClientProtocol.pauseProducing` (or
registers the protocol as the streaming producer of a transport it writes
the records to, and lets Twisted call it).  While paused:

- no record is delivered and no Deferred fires.  Records that have
  already arrived wait in memory: the rest of the current packet and
  whatever the last socket read brought in.
- the protocol stops reading its own transport
  (``transport.pauseProducing``), so the server's send buffer fills and
  the server pauses its stream.
- :meth:`~KVClientProtocol.scan` sends no further continue request.

:meth:`~KVClientProtocol.resumeProducing` delivers what waited, in order,
then reads from the transport again.  Both calls are idempotent.

Connection loss fails every request that has not received its last
response, but only once everything received before the loss has been
delivered.  So a client that is paused when its connection drops sees its
Deferreds fail when it resumes.

Everything here runs on the reactor thread.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.error import ConnectionAborted, ConnectionClosed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kvdaemon._client_wire import (
    CONTINUE_LIMITS,
    DATATYPE_JSON,
    HEADER,
    RESPONSE_MAGIC,
    STORAGE_EXTRAS,
    U32,
    KVProtocolError,
    KVStatusError,
    Opcode,
    Record,
    Response,
    ResponseStatus,
    check_key,
    check_scan_id,
    check_u32,
    decode_scan_documents,
    decode_scan_keys,
    pack_request,
    parse_delete,
    parse_get,
    parse_range_delete,
    parse_scan_create,
    parse_set,
    parse_success,
    range_extras,
    scan_create_body,
)

__all__ = [
    "KVClientProtocol",
    "KVProtocolError",
    "KVStatusError",
    "Opcode",
    "Record",
    "RecordCallback",
    "ResponseStatus",
    "connect",
]

#: The type of the callable that range operations deliver records to.  An
#: exception it raises stops delivery for that operation and fails its
#: Deferred.
RecordCallback = Callable[[Record], object]


# -- requests waiting for their responses --


class _Request:
    """
    A request whose Deferred has not fired yet.

    :meth:`response_received` runs when a packet arrives.  It may not touch
    the caller: it appends what the caller must see (records, the result)
    to ``actions``, which the protocol runs in order while not paused.
    """

    def __init__(self, opcode: int) -> None:
        self.opcode = opcode
        self.deferred: Deferred = Deferred()
        #: Whether the last response has arrived.
        self.last_response_received = False

    def response_received(self, response: Response, actions: deque[Callable[[], None]]) -> bool:
        """Handle one response packet; return whether it was the last for this request."""
        raise NotImplementedError()

    def finish(self, result: object) -> None:
        """Fire the Deferred, unless the caller cancelled it."""
        if self.deferred.called:
            return
        if isinstance(result, (Failure, BaseException)):
            self.deferred.errback(result)
        else:
            self.deferred.callback(result)


class _SingleResponse(_Request):
    """A request with a single response packet, which ``parse`` turns into the result."""

    def __init__(self, opcode: int, parse: Callable[[Response], object]) -> None:
        super().__init__(opcode)
        self._parse = parse

    def response_received(self, response: Response, actions: deque[Callable[[], None]]) -> bool:
        try:
            result = self._parse(response)
        except KVStatusError as error:
            result = error
        actions.append(lambda: self.finish(result))
        return True


class _RecordStream(_Request):
    """
    A request whose responses carry records for a callback.

    The Deferred fires with the number of records delivered (range get) or
    the scan's completion flag (continue).  When the callback raises,
    later records are dropped and the Deferred fails with its exception.
    """

    def __init__(self, opcode: int, on_record: RecordCallback) -> None:
        super().__init__(opcode)
        self._on_record = on_record
        self.delivered = 0
        self._callback_failure: Failure | None = None

    def deliver(self, record: Record) -> None:
        if self._callback_failure is not None or self.deferred.called:
            return
        try:
            self._on_record(record)
        except Exception:
            self._callback_failure = Failure()
        else:
            self.delivered += 1

    def finish(self, result: object) -> None:
        if self._callback_failure is not None:
            result = self._callback_failure
        super().finish(result)

    def queue_records(self, records: list[Record], actions: deque[Callable[[], None]]) -> None:
        for record in records:
            actions.append(lambda record=record: self.deliver(record))


class _RangeGet(_RecordStream):
    """Range get: one GETK-shaped response per item, then a response with an empty key."""

    def response_received(self, response: Response, actions: deque[Callable[[], None]]) -> bool:
        if response.status != ResponseStatus.SUCCESS:
            error = response.error()
            actions.append(lambda: self.finish(error))
            return True
        if not response.key:
            actions.append(lambda: self.finish(self.delivered))
            return True
        if len(response.extras) != U32.size:
            raise KVProtocolError("range get item with %d bytes of extras; expected 4 (flags)" % len(response.extras))
        (flags,) = U32.unpack(response.extras)
        record = Record(response.key, response.value, flags=flags, cas=response.cas, datatype=response.datatype)
        self.queue_records([record], actions)
        return False


class _ScanContinue(_RecordStream):
    """
    Range scan continue: frames of packed records with status 0, then a
    last frame (which may carry records too) with status "more" or
    "complete".  The Deferred fires with True when the scan is complete.
    """

    def __init__(self, on_record: RecordCallback) -> None:
        super().__init__(Opcode.RANGE_SCAN_CONTINUE, on_record)

    def response_received(self, response: Response, actions: deque[Callable[[], None]]) -> bool:
        status = response.status
        if status not in (ResponseStatus.SUCCESS, ResponseStatus.RANGE_SCAN_MORE, ResponseStatus.RANGE_SCAN_COMPLETE):
            error = response.error()
            actions.append(lambda: self.finish(error))
            return True
        if response.value:
            self.queue_records(self._decode(response), actions)
        if status == ResponseStatus.SUCCESS:
            return False
        complete = status == ResponseStatus.RANGE_SCAN_COMPLETE
        actions.append(lambda: self.finish(complete))
        return True

    def _decode(self, response: Response) -> list[Record]:
        if len(response.extras) != U32.size:
            raise KVProtocolError(
                "range scan frame with %d bytes of extras; expected 4 (keys or documents)" % len(response.extras)
            )
        (content,) = U32.unpack(response.extras)
        if content == 0:
            return decode_scan_keys(response.value)
        if content == 1:
            return decode_scan_documents(response.value)
        raise KVProtocolError("range scan frame with content flags %d; expected 0 (keys) or 1 (documents)" % content)


# -- the protocol --


@implementer(IPushProducer)
class KVClientProtocol(Protocol):
    """
    A client connection speaking kvdaemon's binary protocol.

    Every method returns a Deferred and may be called again before earlier
    ones fire: requests are pipelined.  A request whose Deferred the caller
    cancels still gets its response from the server, which is discarded.

    Keys are bytes of at most 250 bytes.  Methods raise ``TypeError`` or
    ``ValueError`` at once for arguments the wire format cannot carry.

    The protocol is also the ``IPushProducer`` of the records that range
    operations deliver; the module documentation describes pausing.
    ``stopProducing`` aborts the connection.
    """

    log = Logger()

    def __init__(self) -> None:
        self._buffer = bytearray()
        #: Where the first unread response starts in ``_buffer``.
        self._offset = 0
        #: Requests by opaque, from sending until their Deferred has fired.
        self._pending: dict[int, _Request] = {}
        self._last_opaque = 0
        #: Record deliveries and results waiting to reach the caller.
        self._actions: deque[Callable[[], None]] = deque()
        self._paused = False
        self._draining = False
        self._connected = False
        self._closing = False
        #: Why the connection ended or must end: set on connection loss, a
        #: protocol error or ``stopProducing``.
        self._lost: Failure | None = None
        self._close_waiters: list[Deferred[None]] = []
        #: The server's address, for log lines.
        self.peer = "unconnected"

    @property
    def paused(self) -> bool:
        """Whether record delivery is paused."""
        return self._paused

    # -- IProtocol --

    def connectionMade(self) -> None:
        self._connected = True
        address = self.transport.getPeer()
        host = getattr(address, "host", None)
        self.peer = "%s:%s" % (host, address.port) if host is not None else str(address)

    def dataReceived(self, data: bytes) -> None:
        if self._lost is not None:
            return
        self._buffer += data
        self._drain()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connected = False
        if self._lost is None:
            self._lost = reason
        self._drain()
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def close(self) -> Deferred[None]:
        """
        Close the connection once the requests already written are sent.

        :return: a Deferred that fires when the connection is closed.
        """
        if not self._connected:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._close_waiters.append(waiter)
        if not self._closing:
            self._closing = True
            self.transport.loseConnection()
        return waiter

    # -- IPushProducer --

    def pauseProducing(self) -> None:
        """Stop delivering records and results, and stop reading from the server."""
        if self._paused:
            return
        self._paused = True
        if self._transport_usable:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """Deliver what has waited, then read from the server again."""
        if not self._paused:
            return
        self._paused = False
        self._drain()
        if self._paused:
            return
        if self._transport_usable:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """
        Drop every record and result not yet delivered, fail every request
        with ``ConnectionAborted`` and abort the connection.
        """
        if self._lost is None:
            self._lost = Failure(ConnectionAborted("the record consumer stopped the client"))
        self._buffer.clear()
        self._offset = 0
        self._paused = False
        self._fail_pending(self._lost)
        self._actions.clear()
        if self._connected and not self._closing:
            self._closing = True
            self.transport.abortConnection()

    @property
    def _transport_usable(self) -> bool:
        return self._connected and not self._closing and self._lost is None

    # -- requests --

    def get(self, key: bytes) -> Deferred[Record | None]:
        """
        Fetch one item.

        :return: a Deferred firing with a :class:`Record` (``expiry`` and
            ``seqno`` 0), or ``None`` when the key is not stored.
        """
        check_key(key, allow_empty=False)
        return self._send(_SingleResponse(Opcode.GET, parse_get(key)), key=key)

    def set(self, key: bytes, value: bytes, flags: int = 0, exptime: int = 0) -> Deferred[int]:
        """
        Store an item; ``exptime`` follows memcached (0 never, up to 30
        days relative seconds, else a Unix time).

        :return: a Deferred firing with the new CAS unique.
        """
        check_key(key, allow_empty=False)
        check_u32(flags, "flags")
        check_u32(exptime, "exptime")
        extras = STORAGE_EXTRAS.pack(flags, exptime)
        return self._send(_SingleResponse(Opcode.SET, parse_set), key=key, extras=extras, value=value)

    def delete(self, key: bytes) -> Deferred[bool]:
        """
        Delete one item.

        :return: a Deferred firing with True, or False when the key was not
            stored.
        """
        check_key(key, allow_empty=False)
        return self._send(_SingleResponse(Opcode.DELETE, parse_delete), key=key)

    def range_get(
        self,
        start: bytes | None,
        end: bytes | None,
        on_record: RecordCallback,
        *,
        start_inclusive: bool = True,
        end_inclusive: bool = False,
        max_items: int = 0,
    ) -> Deferred[int]:
        """
        Fetch the items from ``start`` to ``end`` in bytewise key order
        (RangeOps opcode 0x30), calling ``on_record`` with each as it
        arrives.

        :param start: the lower bound; ``None`` or empty for none.
        :param end: the upper bound, at most 247 bytes (the wire format
            carries it in the one-byte-length extras); ``None`` or empty
            for none.
        :param max_items: at most this many items; 0 for no limit.
        :return: a Deferred that fires after the last record with the
            number of records delivered, or fails with
            :class:`KVStatusError`.
        """
        start = start or b""
        check_key(start, "start key")
        extras = range_extras(end, start_inclusive, end_inclusive, max_items)
        return self._send(_RangeGet(Opcode.RANGE_GET, on_record), key=start, extras=extras)

    def range_delete(
        self,
        start: bytes | None,
        end: bytes | None,
        *,
        start_inclusive: bool = True,
        end_inclusive: bool = False,
        max_items: int = 0,
    ) -> Deferred[int]:
        """
        Delete the items from ``start`` to ``end`` (RangeOps opcode 0x37).
        The bounds are as for :meth:`range_get`.

        :return: a Deferred firing with the number of items deleted.
        """
        start = start or b""
        check_key(start, "start key")
        extras = range_extras(end, start_inclusive, end_inclusive, max_items)
        return self._send(_SingleResponse(Opcode.RANGE_DELETE, parse_range_delete), key=start, extras=extras)

    def create_scan(
        self,
        start: bytes | None = None,
        end: bytes | None = None,
        *,
        exclusive_start: bool = False,
        exclusive_end: bool = False,
        key_only: bool = False,
    ) -> Deferred[bytes]:
        """
        Create a resumable range scan (opcode 0xDA) from ``start`` to
        ``end``, both inclusive unless marked exclusive.  ``None`` means no
        bound; ``exclusive_end`` then has no effect.

        :return: a Deferred firing with the 16-byte scan id.
        """
        value = scan_create_body(start, end, exclusive_start, exclusive_end, key_only)
        request = _SingleResponse(Opcode.RANGE_SCAN_CREATE, parse_scan_create)
        return self._send(request, value=value, datatype=DATATYPE_JSON)

    def continue_scan(
        self,
        scan_id: bytes,
        on_record: RecordCallback,
        *,
        item_limit: int = 0,
        time_limit_ms: int = 0,
        byte_limit: int = 0,
    ) -> Deferred[bool]:
        """
        Continue a range scan (opcode 0xDB), calling ``on_record`` with each
        record as it arrives.  A limit of 0 means no limit.  The byte limit
        is soft: the server sends at least one record.

        :return: a Deferred firing after the last record.  It fires with
            True when the scan is complete (the server has dropped it) and
            with False when more records may remain.  It fails with
            :class:`KVStatusError` on an error status, for example
            ``NOT_FOUND`` (no such scan), ``BUSY`` or
            ``RANGE_SCAN_CANCELLED``.
        """
        check_scan_id(scan_id)
        check_u32(item_limit, "item_limit")
        check_u32(time_limit_ms, "time_limit_ms")
        check_u32(byte_limit, "byte_limit")
        extras = scan_id + CONTINUE_LIMITS.pack(item_limit, time_limit_ms, byte_limit)
        return self._send(_ScanContinue(on_record), extras=extras)

    def cancel_scan(self, scan_id: bytes) -> Deferred[None]:
        """
        Cancel a range scan (opcode 0xDC).

        :return: a Deferred firing with None, or failing with
            :class:`KVStatusError` ``NOT_FOUND`` when there is no such scan.
        """
        check_scan_id(scan_id)
        return self._send(_SingleResponse(Opcode.RANGE_SCAN_CANCEL, parse_success), extras=scan_id)

    def scan(
        self,
        start: bytes | None,
        end: bytes | None,
        on_record: RecordCallback,
        *,
        exclusive_start: bool = False,
        exclusive_end: bool = False,
        key_only: bool = False,
        item_limit: int = 0,
        time_limit_ms: int = 0,
        byte_limit: int = 0,
    ) -> Deferred[int]:
        """
        Create a range scan and continue it until it is complete, calling
        ``on_record`` with each record.  The bounds are as for
        :meth:`create_scan`; the limits apply to each continue request.

        No continue request is sent while the protocol is paused.
        Cancelling the returned Deferred, or an exception from
        ``on_record``, cancels the scan on the server once the request in
        flight has ended.

        :return: a Deferred firing with the number of records delivered,
            0 when the server finds no key in the range.
        """
        check_u32(item_limit, "item_limit")
        check_u32(time_limit_ms, "time_limit_ms")
        check_u32(byte_limit, "byte_limit")
        driver = _ScanDriver(self, on_record, item_limit, time_limit_ms, byte_limit)
        created = self.create_scan(
            start, end, exclusive_start=exclusive_start, exclusive_end=exclusive_end, key_only=key_only
        )
        return driver.start(created)

    # -- sending and receiving --

    def _send(self, request: _Request, **fields: object) -> Deferred:
        if self._lost is not None:
            return fail(self._lost)
        if not self._connected or self._closing:
            return fail(ConnectionClosed("the connection to the kvdaemon server is closed or closing"))
        opaque = self._allocate_opaque()
        self._pending[opaque] = request
        self.transport.write(pack_request(request.opcode, opaque, **fields))
        return request.deferred

    def _allocate_opaque(self) -> int:
        while True:
            self._last_opaque = (self._last_opaque + 1) & 0xFFFFFFFF
            if self._last_opaque not in self._pending:
                return self._last_opaque

    def _drain(self) -> None:
        """
        Deliver waiting records and results and parse buffered responses,
        in order, until paused or out of input.

        Callers' callbacks run inside this loop and may pause, resume or
        send requests; the ``_draining`` flag keeps the loop from nesting.
        """
        if self._draining:
            return
        self._draining = True
        try:
            while not self._paused:
                if self._actions:
                    self._actions.popleft()()
                elif not self._read_response():
                    break
            if not self._paused and not self._actions and self._lost is not None:
                self._fail_pending(self._lost)
        finally:
            self._draining = False

    def _read_response(self) -> bool:
        """Parse the next complete response in the buffer; return False when there is none."""
        buffer = self._buffer
        offset = self._offset
        if len(buffer) - offset < HEADER.size:
            self._compact()
            return False
        magic, opcode, key_length, extras_length, datatype, status, body_length, opaque, cas = HEADER.unpack_from(
            buffer, offset
        )

        if magic != RESPONSE_MAGIC:
            self._protocol_error(KVProtocolError("invalid magic 0x%02x in a response header" % magic))
            return False
        if extras_length + key_length > body_length:
            self._protocol_error(
                KVProtocolError(
                    "response header with %d bytes of extras and %d of key in a %d-byte body"
                    % (extras_length, key_length, body_length)
                )
            )
            return False

        end = offset + HEADER.size + body_length
        if end > len(buffer):
            self._compact()
            return False
        body = bytes(buffer[offset + HEADER.size : end])
        self._offset = end

        key_end = extras_length + key_length
        response = Response(
            opcode, status, datatype, opaque, cas, body[:extras_length], body[extras_length:key_end], body[key_end:]
        )

        try:
            self._dispatch(response)
        except KVProtocolError as error:
            self._protocol_error(error)
            return False
        return True

    def _dispatch(self, response: Response) -> None:
        opaque = response.opaque
        request = self._pending.get(opaque)
        if request is None or request.last_response_received:
            raise KVProtocolError("response (opcode 0x%02x) with opaque %d, which matches no request" % (response.opcode, opaque))
        if response.opcode != request.opcode:
            raise KVProtocolError(
                "response with opcode 0x%02x to a request with opcode 0x%02x" % (response.opcode, request.opcode)
            )
        if request.response_received(response, self._actions):
            request.last_response_received = True
            self._actions.append(lambda: self._pending.pop(opaque, None))

    def _compact(self) -> None:
        if self._offset:
            del self._buffer[: self._offset]
            self._offset = 0

    def _protocol_error(self, error: KVProtocolError) -> None:
        self.log.error("Closing the connection to {peer}: {error}", peer=self.peer, error=str(error))
        self._buffer.clear()
        self._offset = 0
        if self._lost is None:
            self._lost = Failure(error)
        if self._connected and not self._closing:
            self._closing = True
            self.transport.abortConnection()

    def _fail_pending(self, reason: Failure) -> None:
        pending = list(self._pending.values())
        self._pending.clear()
        for request in pending:
            request.finish(reason)


class _ScanDriver:
    """
    Runs :meth:`KVClientProtocol.scan`: waits for the scan id, then sends
    one continue request after another until the scan is complete.

    ``result`` fails at once when the caller cancels it or ``on_record``
    raises.  The scan is then cancelled on the server after the request in
    flight has ended, and records that still arrive are dropped.
    """

    log = Logger()

    def __init__(
        self, client: KVClientProtocol, on_record: RecordCallback, item_limit: int, time_limit_ms: int, byte_limit: int
    ) -> None:
        self._client = client
        self._on_record = on_record
        self._limits = {"item_limit": item_limit, "time_limit_ms": time_limit_ms, "byte_limit": byte_limit}
        self._scan_id = b""
        self._records = 0
        self.result: Deferred[int] = Deferred()

    def start(self, created: Deferred[bytes]) -> Deferred[int]:
        created.addCallbacks(self._created, self._create_failed)
        return self.result

    def _created(self, scan_id: bytes) -> None:
        self._scan_id = scan_id
        self._next()

    def _create_failed(self, failure: Failure) -> None:
        if self.result.called:
            return
        if failure.check(KVStatusError) and failure.value.status == ResponseStatus.NOT_FOUND:
            # kvdaemon, like newer kv_engine versions, rejects a create over
            # a range without keys with "not found".
            self.result.callback(0)
        else:
            self.result.errback(failure)

    def _next(self) -> None:
        # This runs from the Deferred of the create or of the previous
        # continue, which fires inside the protocol's delivery loop, and
        # that loop runs only while the protocol is not paused.  So no
        # continue is sent while paused.
        if self.result.called:
            self._client.cancel_scan(self._scan_id).addErrback(self._cancel_failed)
            return
        continued = self._client.continue_scan(self._scan_id, self._deliver, **self._limits)
        continued.addCallbacks(self._continued, self._continue_failed)

    def _deliver(self, record: Record) -> None:
        if self.result.called:
            return
        try:
            self._on_record(record)
        except Exception:
            self.result.errback(Failure())
            return
        self._records += 1

    def _continued(self, complete: bool) -> None:
        if not complete:
            self._next()
        elif not self.result.called:
            self.result.callback(self._records)

    def _continue_failed(self, failure: Failure) -> None:
        if not self.result.called:
            self.result.errback(failure)

    def _cancel_failed(self, failure: Failure) -> None:
        self.log.info(
            "Could not cancel range scan {scan_id} on {peer}: {error}",
            scan_id=self._scan_id.hex(),
            peer=self._client.peer,
            error=failure.getErrorMessage(),
        )


def connect(reactor: object, description: str) -> Deferred[KVClientProtocol]:
    """
    Connect to a kvdaemon server.

    :param description: a Twisted client endpoint description, such as
        ``"tcp:127.0.0.1:11211"`` or ``"unix:/run/kvdaemon.sock"``.
    :return: a Deferred firing with the connected :class:`KVClientProtocol`.
    """
    return connectProtocol(clientFromString(reactor, description), KVClientProtocol())
