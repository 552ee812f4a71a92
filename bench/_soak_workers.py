"""
The client workers of the soak run, one thread and one connection each.

Every worker owns the keys under its own prefix (``soak:wNNN:``), so it
can record the last acknowledged value of each of them.  A write enters
the :class:`Ledger` only once the server has acknowledged it, and every
read of an owned key, during the run and at the end, must return that
value.  The bulk keys (``soak:bulk:NNNNNN``) are loaded before the run and
only read.

Roles:

text
    classic text commands (set, add, replace, append, prepend, get, gat,
    multi-key get, gets and cas, incr, decr, delete, touch), meta ``mg``,
    ``ms``, ``md`` and ``ma``, ``rget`` and ``rdelete`` over
    the worker's range sub-prefix, and pipelines that mix them.
binary
    binary get, set, add, replace, append, prepend, delete, increment,
    decrement, touch and quiet multi-get, range get
    (0x30) and range delete (0x37) over the worker's range sub-prefix, and
    resumable scans (0xDA to 0xDC) over it, completed or cancelled.
range
    full ``rget`` of the bulk keys, binary scans and range gets over them,
    and ``lru_crawler mgdump``, checking counts, order and values.
slow
    a large ``rget`` read a few bytes at a time, or not read at all,
    until the server's stall timeout closes the connection.
abort
    a connection closed, with a RST or a FIN, in the middle of a request
    line, a data block, a binary body, a pipeline, a stream or a scan
    continue.  A write cut off in its data block must leave the key's
    acknowledged value in place.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from _soak_wire import (
    BinaryClient,
    ProtocolMismatch,
    TextClient,
    connect,
    pack_request,
    uleb128,
)

BULK_PREFIX = b"soak:bulk:"
#: The byte after ``:`` ends the prefix, so ``[BULK_PREFIX, BULK_END)`` contains exactly the bulk keys.
BULK_END = b"soak:bulk;"

#: Every worker's own keys lie in ``[LIVE_START, LIVE_END)``.
LIVE_START = b"soak:w"
LIVE_END = b"soak:x"

#: Counter keys and keys under the range sub-prefix, per worker.  Each
#: role's ``keys`` attribute sets its number of plain keys.
COUNTER_KEYS = 10
RANGE_KEYS = 40

#: Socket timeout of client reads, in seconds, except the polling reads of
#: slow readers.  Longer than any reply takes on a loaded 2-core machine,
#: short enough to end a hung run.
READ_TIMEOUT = 60.0

#: Binary opcodes and statuses the workers use.
GET, SET, ADD, REPLACE, DELETE, INCREMENT, DECREMENT = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
NOOP, GETKQ, APPEND, PREPEND, TOUCH = 0x0A, 0x0D, 0x0E, 0x0F, 0x1C
RANGE_GET, RANGE_DELETE = 0x30, 0x37
SCAN_CREATE, SCAN_CONTINUE, SCAN_CANCEL = 0xDA, 0xDB, 0xDC
STATUS_OK, STATUS_NOT_FOUND, STATUS_EXISTS, STATUS_NOT_STORED = 0x00, 0x01, 0x02, 0x05
STATUS_MORE, STATUS_COMPLETE = 0xA6, 0xA7
JSON_DATATYPE = 0x01

SET_EXTRAS = struct.Struct(">II")
INCREMENT_EXTRAS = struct.Struct(">QQI")
RANGE_EXTRAS = struct.Struct(">HBBI")
CONTINUE_EXTRAS = struct.Struct(">16sIII")
#: Increment's expiry that makes a missing counter a miss instead of creating it.
NO_CREATE = 0xFFFFFFFF
START_INCLUSIVE = 0x01
DOCUMENT_HEADER_SIZE = 25


def bulk_value(index: int, size: int) -> bytes:
    """Return the value of bulk key *index*: its number, padded to *size* bytes."""
    head = b"%06d:" % index
    return head + b"b" * (size - len(head))


@dataclass
class RunState:
    """Settings shared by every worker: the server, the bulk keys and the stop signal."""

    port: int
    bulk_items: int
    bulk_value_size: int
    stall_timeout: float
    stop: threading.Event = field(default_factory=threading.Event)


class Ledger:
    """
    The acknowledged state of one worker's keys.

    A key maps to the set of values a read may return, ``None`` standing
    for "missing".  After an acknowledged write the set has one member.
    A write whose reply was lost to a connection error may or may not have
    happened, so its key then accepts both outcomes.
    """

    def __init__(self) -> None:
        self.expected: dict[bytes, set[bytes | None]] = {}

    def stored(self, key: bytes, value: bytes) -> None:
        self.expected[key] = {value}

    def deleted(self, key: bytes) -> None:
        self.expected[key] = {None}

    def unsure(self, key: bytes, value: bytes | None) -> None:
        self.expected.setdefault(key, {None}).add(value)

    def counted(self, key: bytes, old: bytes, number: int) -> None:
        """
        Record an acknowledged incr or decr of *key* from *old* to *number*.

        memcached 1.6 rewrites a counter in place when the new digits fit,
        padding them with spaces to the old length.  Its protocol.txt
        allows a padded value, so both forms are accepted until a read
        settles which one the server stored.
        """
        digits = b"%d" % number
        self.expected[key] = {digits, digits.ljust(len(old))}

    def current(self, key: bytes) -> bytes | None:
        """Return the key's value if the ledger is sure of it and it is present."""
        values = self.expected.get(key, {None})
        if len(values) == 1:
            return next(iter(values))
        return None

    def matches(self, key: bytes, actual: bytes | None) -> bool:
        """Return whether *actual* is an acceptable read of *key*.  A match settles an unsure key."""
        values = self.expected.get(key, {None})
        if actual not in values:
            return False
        if len(values) > 1:
            self.expected[key] = {actual}
        return True


class Worker(threading.Thread):
    """
    One client connection's loop: pick an operation, run it, count it.

    Subclasses list their operations in :attr:`operations` with weights.
    Any exception, mostly a :class:`ProtocolMismatch` or a connection
    error, is counted as an error of that operation, and the worker
    reconnects and goes on.
    """

    role = "worker"
    operations: dict[str, int] = {}

    def __init__(self, index: int, state: RunState, seed: int) -> None:
        super().__init__(name="soak-%s-%d" % (self.role, index), daemon=True)
        self.index = index
        self.state = state
        self.random = random.Random(seed * 1000 + index)
        self.prefix = b"soak:w%03d:" % index
        self.ledger = Ledger()
        self.ops: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.messages: list[str] = []
        self.sequence = 0
        self.client: TextClient | BinaryClient | None = None
        #: Writes sent but not yet acknowledged, as (key, value or None) pairs.
        self.pending: list[tuple[bytes, bytes | None]] = []
        self._names = list(self.operations)
        self._weights = [self.operations[name] for name in self._names]

    # -- keys and values --

    def plain_key(self, number: int) -> bytes:
        return self.prefix + b"k%03d" % number

    def counter_key(self, number: int) -> bytes:
        return self.prefix + b"n%02d" % number

    def range_key(self, number: int) -> bytes:
        return self.prefix + b"r:%03d" % number

    @property
    def range_start(self) -> bytes:
        return self.prefix + b"r:"

    @property
    def range_end(self) -> bytes:
        return self.prefix + b"r;"

    def range_keys_present(self) -> list[tuple[bytes, bytes]]:
        """Return the owned range keys that the ledger records as present, in key order."""
        present = []
        for key in sorted(self.ledger.expected):
            if key.startswith(self.range_start):
                value = self.ledger.current(key)
                if value is not None:
                    present.append((key, value))
        return present

    def new_value(self) -> bytes:
        """Return a value of random bytes, 1 byte to 64 KiB, most under 4 KiB, tagged with its write."""
        self.sequence += 1
        roll = self.random.random()
        if roll < 0.70:
            size = self.random.randint(1, 512)
        elif roll < 0.95:
            size = self.random.randint(513, 4096)
        else:
            size = self.random.randint(4097, 65536)
        head = b"%s%d:" % (self.prefix, self.sequence)
        return (head + self.random.randbytes(max(0, size - len(head))))[:size]

    # -- bookkeeping --

    def fail(self, operation: str, error: BaseException) -> None:
        self.errors["%s: %s" % (operation, type(error).__name__)] += 1
        if len(self.messages) < 20:
            self.messages.append("%s %s: %s: %s" % (self.name, operation, type(error).__name__, error))

    def check_read(self, operation: str, key: bytes, actual: bytes | None) -> None:
        if not self.ledger.matches(key, actual):
            expected = self.ledger.expected.get(key, {None})
            raise ProtocolMismatch(
                "%s %r returned %s, expected %s"
                % (operation, key, describe(actual), " or ".join(describe(value) for value in expected))
            )

    def settle_pending(self) -> None:
        """Mark writes whose replies were lost as possibly applied."""
        for key, value in self.pending:
            self.ledger.unsure(key, value)
        self.pending = []

    # -- the loop --

    def populate(self) -> None:
        """Write the worker's first values (before the run starts)."""

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def run(self) -> None:
        while not self.state.stop.is_set():
            name = self.random.choices(self._names, self._weights)[0]
            try:
                if self.client is None:
                    self.open()
                getattr(self, "op_" + name)()
                self.ops[name] += 1
            except Exception as error:  # noqa: BLE001 - a worker counts every failure and goes on
                self.fail(name, error)
                self.settle_pending()
                self.close()
        self.close()


def describe(value: bytes | None) -> str:
    if value is None:
        return "a miss"
    return "%d bytes %r" % (len(value), value[:24])


class TextWorker(Worker):
    """Classic and meta text commands, ``rget`` and ``rdelete`` on owned keys."""

    role = "text"
    keys = 100
    operations = {
        "set": 18,
        "set_noreply": 2,
        "get": 20,
        "multi_get": 5,
        "gets_cas": 8,
        "incr": 6,
        "delete": 5,
        "touch": 4,
        "append_prepend": 4,
        "add_replace": 4,
        "decr": 3,
        "gat": 3,
        "mg": 10,
        "ms": 8,
        "md": 3,
        "ma": 3,
        "rget": 4,
        "rdelete": 2,
        "pipeline": 3,
    }

    def open(self) -> None:
        self.client = TextClient(connect(self.state.port, READ_TIMEOUT))

    def populate(self) -> None:
        client = TextClient(connect(self.state.port, READ_TIMEOUT))
        try:
            self.write_first_values(client)
        finally:
            client.close()

    def write_first_values(self, client: TextClient) -> None:
        requests = []
        writes = []
        for number in range(self.keys):
            writes.append((self.plain_key(number), self.new_value()))
        for number in range(0, RANGE_KEYS, 2):
            writes.append((self.range_key(number), self.new_value()))
        for number in range(COUNTER_KEYS):
            writes.append((self.counter_key(number), b"0"))
        for key, value in writes:
            requests.append(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value))
        client.send(b"".join(requests))
        for key, value in writes:
            reply = client.read_line()
            if reply != b"STORED":
                raise ProtocolMismatch("populating %r: expected STORED, got %r" % (key, reply))
            self.ledger.stored(key, value)

    def write_key(self) -> bytes:
        if self.random.random() < 0.2:
            return self.range_key(self.random.randrange(RANGE_KEYS))
        return self.plain_key(self.random.randrange(self.keys))

    def read_key(self) -> bytes:
        return self.write_key()

    def op_set(self) -> None:
        key, value = self.write_key(), self.new_value()
        self.pending = [(key, value)]
        self.client.expect(b"set %s %d 0 %d" % (key, self.random.randrange(65536), len(value)), b"STORED", value)
        self.pending = []
        self.ledger.stored(key, value)

    def op_set_noreply(self) -> None:
        """Send a ``set ... noreply`` and a ``get`` of the same key together, and check that the get returns the new value."""
        key, value = self.write_key(), self.new_value()
        self.pending = [(key, value)]
        self.client.send(b"set %s 0 0 %d noreply\r\n%s\r\nget %s\r\n" % (key, len(value), value, key))
        values = self.client.read_values()
        self.pending = []
        if len(values) != 1 or values[0].key != key or values[0].value != value:
            self.ledger.unsure(key, value)
            raise ProtocolMismatch("get after set noreply of %r returned %r" % (key, [(v.key, describe(v.value)) for v in values]))
        self.ledger.stored(key, value)

    def get_values(self, keys: list[bytes], command: bytes = b"get") -> dict[bytes, bytes]:
        self.client.send(b"%s %s\r\n" % (command, b" ".join(keys)))
        return self.check_values(keys, self.client.read_values())

    def check_values(self, keys: list[bytes], values: list) -> dict[bytes, bytes]:
        found = {value.key: value.value for value in values}
        if len(found) != len(values) or not set(found) <= set(keys):
            raise ProtocolMismatch("get of %d keys returned keys %r" % (len(keys), [value.key for value in values][:10]))
        for key in keys:
            self.check_read("get", key, found.get(key))
        return found

    def op_get(self) -> None:
        self.get_values([self.read_key()])

    def op_multi_get(self) -> None:
        keys = list({self.read_key() for _ in range(10)})
        self.get_values(keys, b"get" if self.random.random() < 0.5 else b"gets")

    def op_gets_cas(self) -> None:
        key = self.write_key()
        self.client.send(b"gets %s\r\n" % key)
        values = self.client.read_values()
        self.check_read("gets", key, values[0].value if values else None)
        value = self.new_value()
        if not values:
            self.client.expect(b"cas %s 0 0 %d 1" % (key, len(value)), b"NOT_FOUND", value)
            return
        self.pending = [(key, value)]
        self.client.expect(b"cas %s 0 0 %d %d" % (key, len(value), values[0].cas), b"STORED", value)
        self.pending = []
        self.ledger.stored(key, value)

    def op_incr(self) -> None:
        key = self.counter_key(self.random.randrange(COUNTER_KEYS))
        delta = self.random.randint(1, 1000)
        current = self.ledger.current(key)
        if current is None:
            self.client.expect(b"incr %s %d" % (key, delta), b"NOT_FOUND")
            return
        number = (int(current) + delta) % 2**64
        self.pending = [(key, b"%d" % number), (key, (b"%d" % number).ljust(len(current)))]
        self.client.expect(b"incr %s %d" % (key, delta), b"%d" % number)
        self.pending = []
        self.ledger.counted(key, current, number)
        self.settle_counter(key)

    def settle_counter(self, key: bytes) -> None:
        """Read a counter after an incr or decr, settling whether it was padded."""
        self.get_values([key])

    def op_delete(self) -> None:
        key = self.write_key()
        present = self.ledger.current(key) is not None
        self.pending = [(key, None)]
        reply = self.client.command(b"delete %s" % key)
        self.pending = []
        expected = b"DELETED" if present else b"NOT_FOUND"
        if reply != expected:
            raise ProtocolMismatch("delete %r: expected %r, got %r" % (key, expected, reply))
        self.ledger.deleted(key)

    def op_touch(self) -> None:
        key = self.read_key()
        expected = b"TOUCHED" if self.ledger.current(key) is not None else b"NOT_FOUND"
        self.client.expect(b"touch %s 0" % key, expected)

    def op_append_prepend(self) -> None:
        key, data = self.write_key(), self.random.randbytes(self.random.randint(1, 64))
        command = self.random.choice((b"append", b"prepend"))
        current = self.ledger.current(key)
        if current is None:
            self.client.expect(b"%s %s 0 0 %d" % (command, key, len(data)), b"NOT_STORED", data)
            return
        value = current + data if command == b"append" else data + current
        self.pending = [(key, value)]
        self.client.expect(b"%s %s 0 0 %d" % (command, key, len(data)), b"STORED", data)
        self.pending = []
        self.ledger.stored(key, value)

    def op_add_replace(self) -> None:
        key, value = self.write_key(), self.new_value()
        command = self.random.choice((b"add", b"replace"))
        present = self.ledger.current(key) is not None
        if present != (command == b"replace"):
            self.client.expect(b"%s %s 0 0 %d" % (command, key, len(value)), b"NOT_STORED", value)
            return
        self.pending = [(key, value)]
        self.client.expect(b"%s %s 0 0 %d" % (command, key, len(value)), b"STORED", value)
        self.pending = []
        self.ledger.stored(key, value)

    def op_decr(self) -> None:
        key = self.counter_key(self.random.randrange(COUNTER_KEYS))
        delta = self.random.randint(1, 300)
        current = self.ledger.current(key)
        if current is None:
            self.client.expect(b"decr %s %d" % (key, delta), b"NOT_FOUND")
            return
        number = max(0, int(current) - delta)
        self.pending = [(key, b"%d" % number), (key, (b"%d" % number).ljust(len(current)))]
        self.client.expect(b"decr %s %d" % (key, delta), b"%d" % number)
        self.pending = []
        self.ledger.counted(key, current, number)
        self.settle_counter(key)

    def op_gat(self) -> None:
        key = self.read_key()
        self.client.send(b"gat 0 %s\r\n" % key)
        self.check_values([key], self.client.read_values())

    def op_md(self) -> None:
        key = self.write_key()
        expected = b"HD" if self.ledger.current(key) is not None else b"NF"
        self.pending = [(key, None)]
        self.client.expect(b"md %s" % key, expected)
        self.pending = []
        self.ledger.deleted(key)

    def op_ma(self) -> None:
        key = self.counter_key(self.random.randrange(COUNTER_KEYS))
        delta = self.random.randint(1, 1000)
        current = self.ledger.current(key)
        if current is not None:
            number = (int(current) + delta) % 2**64
            self.pending = [(key, b"%d" % number), (key, (b"%d" % number).ljust(len(current)))]
        reply = self.client.command(b"ma %s v D%d" % (key, delta))
        if current is None:
            if reply != b"NF":
                raise ProtocolMismatch("ma %r on a missing counter: expected NF, got %r" % (key, reply[:100]))
            return
        expected = b"%d" % number
        if reply != b"VA %d" % len(expected) or self.client.read_exact(len(expected) + 2) != expected + b"\r\n":
            raise ProtocolMismatch("ma %r: expected %r, got %r" % (key, expected, reply[:100]))
        self.pending = []
        self.ledger.counted(key, current, number)
        self.settle_counter(key)

    def op_mg(self) -> None:
        key = self.read_key()
        reply = self.client.command(b"mg %s s v" % key)
        if reply == b"EN":
            self.check_read("mg", key, None)
            return
        parts = reply.split(b" ")
        if parts[0] != b"VA" or len(parts) != 3 or parts[2] != b"s" + parts[1]:
            raise ProtocolMismatch("mg %r: expected 'VA <n> s<n>', got %r" % (key, reply[:100]))
        data = self.client.read_exact(int(parts[1]) + 2)
        self.check_read("mg", key, data[:-2])

    def op_ms(self) -> None:
        key, value = self.write_key(), self.new_value()
        self.pending = [(key, value)]
        self.client.expect(b"ms %s %d T0 F%d" % (key, len(value), self.random.randrange(65536)), b"HD", value)
        self.pending = []
        self.ledger.stored(key, value)

    def rget_request(self) -> bytes:
        return b"rget 1 0 0 %s %s\r\n" % (self.range_start, self.range_end)

    def check_range(self, operation: str, values: list[tuple[bytes, bytes]]) -> None:
        expected = self.range_keys_present()
        if [key for key, _ in values] != [key for key, _ in expected]:
            raise ProtocolMismatch(
                "%s returned keys %r, expected %r"
                % (operation, [key for key, _ in values][:8], [key for key, _ in expected][:8])
            )
        for key, value in values:
            self.check_read(operation, key, value)

    def op_rget(self) -> None:
        self.client.send(self.rget_request())
        self.check_range("rget", [(value.key, value.value) for value in self.client.read_values()])

    def op_rdelete(self) -> None:
        present = self.range_keys_present()
        self.pending = [(key, None) for key, _ in present]
        self.client.expect(b"rdelete 1 0 0 %s %s" % (self.range_start, self.range_end), b"DELETED %d" % len(present))
        self.pending = []
        for key, _ in present:
            self.ledger.deleted(key)

    def op_pipeline(self) -> None:
        """Send a set, a get, an rget and an mg in one write, then read the replies in order."""
        key, value = self.write_key(), self.new_value()
        other = self.read_key()
        self.pending = [(key, value)]
        self.client.send(
            b"set %s 0 0 %d\r\n%s\r\nget %s\r\n%smg %s v\r\n"
            % (key, len(value), value, key, self.rget_request(), other)
        )

        reply = self.client.read_line()
        if reply != b"STORED":
            raise ProtocolMismatch("pipelined set %r: expected STORED, got %r" % (key, reply[:100]))
        self.pending = []
        self.ledger.stored(key, value)
        self.check_values([key], self.client.read_values())
        self.check_range("pipelined rget", [(item.key, item.value) for item in self.client.read_values()])
        reply = self.client.read_line()
        if reply == b"EN":
            self.check_read("pipelined mg", other, None)
        elif reply.startswith(b"VA "):
            self.check_read("pipelined mg", other, self.client.read_exact(int(reply.split(b" ")[1]) + 2)[:-2])
        else:
            raise ProtocolMismatch("pipelined mg %r: got %r" % (other, reply[:100]))


class BinaryWorker(TextWorker):
    """Binary get, set, delete, increment, multi-get, range operations and scans on owned keys."""

    role = "binary"
    operations = {
        "bset": 25,
        "bget": 25,
        "bdelete": 5,
        "bincr": 6,
        "bmulti_get": 8,
        "badd_replace": 4,
        "bappend_prepend": 4,
        "bdecr": 3,
        "btouch": 3,
        "brget": 5,
        "brdelete": 2,
        "scan": 5,
        "scan_cancel": 2,
    }

    def open(self) -> None:
        self.client = BinaryClient(connect(self.state.port, READ_TIMEOUT))

    def expect_status(self, operation: str, response, expected: int) -> None:
        if response.status != expected:
            raise ProtocolMismatch(
                "%s: expected status 0x%02x, got 0x%02x %r" % (operation, expected, response.status, response.value[:80])
            )

    def op_bset(self) -> None:
        key, value = self.write_key(), self.new_value()
        self.pending = [(key, value)]
        response = self.client.request(SET, key, SET_EXTRAS.pack(self.random.randrange(65536), 0), value, opaque=self.sequence)
        self.expect_status("set %r" % key, response, STATUS_OK)
        self.pending = []
        self.ledger.stored(key, value)

    def op_bget(self) -> None:
        key = self.read_key()
        response = self.client.request(GET, key, opaque=7)
        if response.status == STATUS_NOT_FOUND:
            self.check_read("binary get", key, None)
            return
        self.expect_status("get %r" % key, response, STATUS_OK)
        self.check_read("binary get", key, response.value)

    def op_bdelete(self) -> None:
        key = self.write_key()
        present = self.ledger.current(key) is not None
        self.pending = [(key, None)]
        response = self.client.request(DELETE, key, opaque=8)
        self.pending = []
        self.expect_status("delete %r" % key, response, STATUS_OK if present else STATUS_NOT_FOUND)
        self.ledger.deleted(key)

    def op_bincr(self) -> None:
        self.change_counter(INCREMENT, self.random.randint(1, 1000))

    def op_bdecr(self) -> None:
        self.change_counter(DECREMENT, self.random.randint(1, 300))

    def change_counter(self, opcode: int, delta: int) -> None:
        """Send a binary increment or decrement that must not create a missing counter."""
        key = self.counter_key(self.random.randrange(COUNTER_KEYS))
        name = "increment" if opcode == INCREMENT else "decrement"
        current = self.ledger.current(key)
        expected = 0
        if current is not None:
            # Increments wrap at 2**64 and decrements stop at 0.
            expected = (int(current) + delta) % 2**64 if opcode == INCREMENT else max(0, int(current) - delta)
            self.pending = [(key, b"%d" % expected), (key, (b"%d" % expected).ljust(len(current)))]
        response = self.client.request(opcode, key, INCREMENT_EXTRAS.pack(delta, 0, NO_CREATE), opaque=9)
        self.pending = []
        if current is None:
            self.expect_status("%s %r" % (name, key), response, STATUS_NOT_FOUND)
            return
        self.expect_status("%s %r" % (name, key), response, STATUS_OK)
        (actual,) = struct.unpack(">Q", response.value)
        if actual != expected:
            raise ProtocolMismatch("%s %r: expected %d, got %d" % (name, key, expected, actual))
        self.ledger.counted(key, current, expected)
        self.settle_counter(key)

    def settle_counter(self, key: bytes) -> None:
        response = self.client.request(GET, key, opaque=20)
        self.expect_status("get %r" % key, response, STATUS_OK)
        self.check_read("binary get", key, response.value)

    def op_badd_replace(self) -> None:
        key, value = self.write_key(), self.new_value()
        opcode = self.random.choice((ADD, REPLACE))
        present = self.ledger.current(key) is not None
        self.pending = [(key, value)]
        response = self.client.request(opcode, key, SET_EXTRAS.pack(0, 0), value, opaque=17)
        self.pending = []
        if opcode == ADD and present:
            self.expect_status("add %r" % key, response, STATUS_EXISTS)
        elif opcode == REPLACE and not present:
            self.expect_status("replace %r" % key, response, STATUS_NOT_FOUND)
        else:
            self.expect_status("add or replace %r" % key, response, STATUS_OK)
            self.ledger.stored(key, value)

    def op_bappend_prepend(self) -> None:
        key, data = self.write_key(), self.random.randbytes(self.random.randint(1, 64))
        opcode = self.random.choice((APPEND, PREPEND))
        current = self.ledger.current(key)
        if current is None:
            value = None
        elif opcode == APPEND:
            value = current + data
        else:
            value = data + current
        self.pending = [] if value is None else [(key, value)]
        response = self.client.request(opcode, key, value=data, opaque=18)
        self.pending = []
        if value is None:
            self.expect_status("append or prepend %r" % key, response, STATUS_NOT_STORED)
            return
        self.expect_status("append or prepend %r" % key, response, STATUS_OK)
        self.ledger.stored(key, value)

    def op_btouch(self) -> None:
        key = self.read_key()
        response = self.client.request(TOUCH, key, struct.pack(">I", 0), opaque=21)
        self.expect_status("touch %r" % key, response, STATUS_OK if self.ledger.current(key) is not None else STATUS_NOT_FOUND)

    def op_bmulti_get(self) -> None:
        keys = list({self.read_key() for _ in range(10)})
        self.client.send(b"".join(pack_request(GETKQ, key, opaque=number) for number, key in enumerate(keys)) + pack_request(NOOP))
        found = {}
        while True:
            response = self.client.read_response()
            if response.opcode == NOOP:
                break
            if response.opcode != GETKQ or response.status != STATUS_OK:
                raise ProtocolMismatch("quiet multi-get: unexpected response 0x%02x status 0x%02x" % (response.opcode, response.status))
            found[response.key] = response.value
        for key in keys:
            self.check_read("binary multi-get", key, found.get(key))

    def range_extras(self, max_items: int = 0, end: bytes | None = None) -> bytes:
        end = self.range_end if end is None else end
        return RANGE_EXTRAS.pack(len(end), 0, START_INCLUSIVE, max_items) + end

    def op_brget(self) -> None:
        self.client.send(pack_request(RANGE_GET, self.range_start, self.range_extras(), opaque=10))
        values = []
        while True:
            response = self.client.read_response()
            self.expect_status("range get", response, STATUS_OK)
            if not response.key:
                break
            values.append((response.key, response.value))
        self.check_range("binary range get", values)

    def op_brdelete(self) -> None:
        present = self.range_keys_present()
        self.pending = [(key, None) for key, _ in present]
        response = self.client.request(RANGE_DELETE, self.range_start, self.range_extras(), opaque=11)
        self.pending = []
        self.expect_status("range delete", response, STATUS_OK)
        (count,) = struct.unpack(">Q", response.value)
        if count != len(present):
            raise ProtocolMismatch("range delete: deleted %d items, expected %d" % (count, len(present)))
        for key, _ in present:
            self.ledger.deleted(key)

    def create_scan(self, start: bytes, end: bytes, key_only: bool) -> tuple[int, bytes]:
        document = {
            "range": {"start": base64.b64encode(start).decode(), "excl_end": base64.b64encode(end).decode()},
            "key_only": key_only,
        }
        response = self.client.request(SCAN_CREATE, value=json.dumps(document).encode(), opaque=12, datatype=JSON_DATATYPE)
        return response.status, response.value

    def op_scan(self) -> None:
        key_only = self.random.random() < 0.5
        present = self.range_keys_present()
        status, scan_id = self.create_scan(self.range_start, self.range_end, key_only)
        if not present:
            if status != STATUS_NOT_FOUND:
                raise ProtocolMismatch("scan create over an empty range: expected status 0x01, got 0x%02x" % status)
            return
        if status != STATUS_OK:
            raise ProtocolMismatch("scan create: status 0x%02x %r" % (status, scan_id[:80]))
        records = continue_scan(self.client, scan_id, lambda: self.random.randint(1, 8))
        if key_only:
            if [key for key, _ in records] != [key for key, _ in present]:
                raise ProtocolMismatch("key-only scan returned %r, expected %r" % (records[:5], present[:5]))
        else:
            self.check_range("scan", records)

    def op_scan_cancel(self) -> None:
        status, scan_id = self.create_scan(self.range_start, self.range_end, False)
        if status == STATUS_NOT_FOUND and not self.range_keys_present():
            return
        if status != STATUS_OK:
            raise ProtocolMismatch("scan create: status 0x%02x %r" % (status, scan_id[:80]))
        self.client.send(pack_request(SCAN_CONTINUE, extras=CONTINUE_EXTRAS.pack(scan_id, 1, 0, 0), opaque=13))
        read_continue(self.client)
        response = self.client.request(SCAN_CANCEL, extras=scan_id, opaque=14)
        self.expect_status("scan cancel", response, STATUS_OK)
        response = self.client.request(SCAN_CONTINUE, extras=CONTINUE_EXTRAS.pack(scan_id, 0, 0, 0), opaque=15)
        self.expect_status("continue after cancel", response, STATUS_NOT_FOUND)


def read_continue(client: BinaryClient) -> tuple[int, list[tuple[bytes, bytes | None]]]:
    """Read one continue's frames, and return the last frame's status and the records."""
    records: list[tuple[bytes, bytes | None]] = []
    while True:
        response = client.read_response()
        if response.opcode != SCAN_CONTINUE:
            raise ProtocolMismatch("continue: response for opcode 0x%02x" % response.opcode)
        if response.status != STATUS_OK:
            return response.status, records
        documents = struct.unpack(">I", response.extras)[0] == 1
        records.extend(decode_records(response.value, documents))


def decode_records(data: bytes, documents: bool) -> list[tuple[bytes, bytes | None]]:
    records = []
    offset = 0
    while offset < len(data):
        if documents:
            offset += DOCUMENT_HEADER_SIZE
        length, offset = uleb128(data, offset)
        key = data[offset : offset + length]
        offset += length
        value = None
        if documents:
            length, offset = uleb128(data, offset)
            value = data[offset : offset + length]
            offset += length
        records.append((key, value))
    return records


def continue_scan(client: BinaryClient, scan_id: bytes, item_limit: Callable[[], int], byte_limit: int = 0) -> list:
    """Continue a scan until it completes, and return every record."""
    records = []
    while True:
        extras = CONTINUE_EXTRAS.pack(scan_id, item_limit(), 0, byte_limit)
        client.send(pack_request(SCAN_CONTINUE, extras=extras, opaque=16))
        status, batch = read_continue(client)
        records.extend(batch)
        if status == STATUS_COMPLETE:
            return records
        if status != STATUS_MORE:
            raise ProtocolMismatch("continue ended with status 0x%02x" % status)


class RangeWorker(Worker):
    """A client that reads the bulk keys through every range operation and checks counts, order and values."""

    role = "range"
    operations = {"rget_bulk": 4, "scan_bulk": 3, "brget_bulk": 3, "mgdump": 1, "rget_live": 2, "scan_live": 2}

    def open(self) -> None:
        pass

    def check_bulk(self, operation: str, records: list[tuple[bytes, bytes | None]], first: int = 0) -> None:
        expected_keys = [BULK_PREFIX + b"%06d" % index for index in range(first, first + len(records))]
        keys = [key for key, _ in records]
        if keys != expected_keys:
            mismatch = next(number for number, (a, b) in enumerate(zip(keys, expected_keys)) if a != b)
            raise ProtocolMismatch(
                "%s: record %d is %r, expected %r" % (operation, mismatch, keys[mismatch], expected_keys[mismatch])
            )
        for number, (_, value) in enumerate(records):
            if value is not None and value != bulk_value(first + number, self.state.bulk_value_size):
                raise ProtocolMismatch("%s: wrong value for bulk key %d" % (operation, first + number))

    def op_rget_bulk(self) -> None:
        with TextClientContext(self.state.port) as client:
            client.send(b"rget 1 0 0 %s %s\r\n" % (BULK_PREFIX, BULK_END))
            records = [(value.key, value.value) for value in client.read_values()]
        if len(records) != self.state.bulk_items:
            raise ProtocolMismatch("rget of the bulk keys returned %d items, expected %d" % (len(records), self.state.bulk_items))
        self.check_bulk("rget", records)

    def op_scan_bulk(self) -> None:
        key_only = self.random.random() < 0.5
        client = BinaryClient(connect(self.state.port, READ_TIMEOUT))
        try:
            document = {
                "range": {"start": base64.b64encode(BULK_PREFIX).decode(), "excl_end": base64.b64encode(BULK_END).decode()},
                "key_only": key_only,
            }
            response = client.request(SCAN_CREATE, value=json.dumps(document).encode(), opaque=1, datatype=JSON_DATATYPE)
            if response.status != STATUS_OK:
                raise ProtocolMismatch("scan create over the bulk keys: status 0x%02x %r" % (response.status, response.value[:80]))
            records = continue_scan(client, response.value, lambda: 0, byte_limit=256 * 1024)
        finally:
            client.close()
        if len(records) != self.state.bulk_items:
            raise ProtocolMismatch("scan of the bulk keys returned %d records, expected %d" % (len(records), self.state.bulk_items))
        self.check_bulk("scan", records)

    def op_brget_bulk(self) -> None:
        first = self.random.randrange(self.state.bulk_items)
        max_items = self.random.randint(1, 500)
        start = BULK_PREFIX + b"%06d" % first
        client = BinaryClient(connect(self.state.port, READ_TIMEOUT))
        try:
            extras = RANGE_EXTRAS.pack(len(BULK_END), 0, START_INCLUSIVE, max_items) + BULK_END
            client.send(pack_request(RANGE_GET, start, extras, opaque=2))
            records = []
            while True:
                response = client.read_response()
                if response.status != STATUS_OK:
                    raise ProtocolMismatch("binary range get: status 0x%02x" % response.status)
                if not response.key:
                    break
                records.append((response.key, response.value))
        finally:
            client.close()
        expected = min(max_items, self.state.bulk_items - first)
        if len(records) != expected:
            raise ProtocolMismatch("binary range get from %d returned %d items, expected %d" % (first, len(records), expected))
        self.check_bulk("binary range get", records, first)

    def check_live(self, operation: str, keys: list[bytes]) -> None:
        """
        Check a range read over the keys that other workers change while
        it runs.  Such keys may or may not appear, but the keys that do
        appear must be in the range, in order, and each only once.
        """
        for key in keys:
            if not LIVE_START <= key < LIVE_END:
                raise ProtocolMismatch("%s returned %r, outside the range" % (operation, key))
        for previous, key in zip(keys, keys[1:]):
            if previous >= key:
                raise ProtocolMismatch("%s returned %r after %r" % (operation, key, previous))

    def op_rget_live(self) -> None:
        with TextClientContext(self.state.port) as client:
            client.send(b"rget 1 0 0 %s %s\r\n" % (LIVE_START, LIVE_END))
            keys = [value.key for value in client.read_values()]
        self.check_live("rget over the workers' keys", keys)

    def op_scan_live(self) -> None:
        client = BinaryClient(connect(self.state.port, READ_TIMEOUT))
        try:
            document = {
                "range": {"start": base64.b64encode(LIVE_START).decode(), "excl_end": base64.b64encode(LIVE_END).decode()},
                "key_only": True,
            }
            response = client.request(SCAN_CREATE, value=json.dumps(document).encode(), opaque=1, datatype=JSON_DATATYPE)
            if response.status != STATUS_OK:
                raise ProtocolMismatch("scan create over the workers' keys: status 0x%02x %r" % (response.status, response.value[:80]))
            records = continue_scan(client, response.value, lambda: self.random.randint(1, 2000))
        finally:
            client.close()
        self.check_live("scan over the workers' keys", [key for key, _ in records])

    def op_mgdump(self) -> None:
        with TextClientContext(self.state.port) as client:
            client.send(b"lru_crawler mgdump all\r\n")
            bulk_lines = 0
            while True:
                line = client.read_line()
                if line == b"EN":
                    break
                if line.startswith(b"mg " + BULK_PREFIX):
                    bulk_lines += 1
        if bulk_lines != self.state.bulk_items:
            raise ProtocolMismatch("mgdump listed %d bulk keys, expected %d" % (bulk_lines, self.state.bulk_items))


class TextClientContext:
    """A :class:`TextClient` on a new connection, closed on leaving the block."""

    def __init__(self, port: int) -> None:
        self.client = TextClient(connect(port, READ_TIMEOUT))

    def __enter__(self) -> TextClient:
        return self.client

    def __exit__(self, *exc_info: object) -> None:
        self.client.close()


@dataclass
class SlowReaderResult:
    """One slow reader's ``rget``: how it ended and after how many seconds."""

    mode: str
    outcome: str
    seconds: float
    bytes_read: int


class SlowReaderWorker(Worker):
    """
    A client that starts an ``rget`` of every bulk key and reads it a few
    bytes per second (``trickle``) or not at all (``stalled``), until the
    server closes the connection.

    A reader that the server has not closed after :meth:`give_up_after`
    seconds counts as an error, because the stall timeout did not cut it.
    """

    role = "slow"
    operations = {"trickle": 1, "stalled": 1}
    #: Bytes a trickling reader takes per read, and seconds between reads.
    TRICKLE_BYTES = 16
    TRICKLE_INTERVAL = 0.5

    def __init__(self, index: int, state: RunState, seed: int) -> None:
        super().__init__(index, state, seed)
        self.results: list[SlowReaderResult] = []

    def open(self) -> None:
        pass

    def give_up_after(self) -> float:
        return 4 * self.state.stall_timeout + 30

    def op_trickle(self) -> None:
        self.read_slowly("trickle", self.TRICKLE_BYTES)

    def op_stalled(self) -> None:
        self.read_slowly("stalled", 0)

    def read_slowly(self, mode: str, read_size: int) -> None:
        connection = connect(self.state.port, READ_TIMEOUT, receive_buffer=4096)
        connection.settimeout(self.TRICKLE_INTERVAL)
        started = time.monotonic()
        total = 0
        tail = b""
        outcome = "not closed"

        try:
            connection.sendall(b"rget 1 0 0 %s %s\r\n" % (BULK_PREFIX, BULK_END))
            while time.monotonic() - started < self.give_up_after():
                time.sleep(self.TRICKLE_INTERVAL)
                # The TCP state shows a close even while received data is
                # still queued, which recv would return first.
                state = tcp_state(connection)
                if state != TCP_ESTABLISHED:
                    outcome = "reset by the server" if state == TCP_CLOSE else "closed by the server"
                    break
                if not read_size:
                    continue
                try:
                    chunk = connection.recv(read_size)
                except socket.timeout:
                    continue
                if not chunk:
                    outcome = "closed by the server"
                    break
                total += len(chunk)
                tail = (tail + chunk)[-8:]
                if tail.endswith(b"END\r\n"):
                    outcome = "read to the end"
                    break
        except ConnectionResetError:
            outcome = "reset by the server"
        finally:
            connection.close()

        seconds = time.monotonic() - started
        self.results.append(SlowReaderResult(mode, outcome, seconds, total))
        if outcome not in ("closed by the server", "reset by the server"):
            raise ProtocolMismatch("%s reader: %s after %.1f s and %d bytes" % (mode, outcome, seconds, total))


#: Linux TCP states from ``TCP_INFO``'s first byte.
TCP_ESTABLISHED = 1
TCP_CLOSE = 7


def tcp_state(connection: socket.socket) -> int:
    """Return the Linux TCP state of *connection* (``tcpi_state``)."""
    return connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


class AbortWorker(TextWorker):
    """
    A client that cuts connections short, with a RST or a FIN, in a request
    line, a data block, a binary body, a pipeline, a stream or a scan
    continue.

    A cut write follows an acknowledged write of the same key on the same
    connection, so a cut write that the server applied shows at the end as
    a value that differs from the ledger's.
    """

    role = "abort"
    keys = 20
    operations = {
        "cut_line": 2,
        "cut_data_block": 4,
        "cut_meta_block": 2,
        "cut_binary_body": 3,
        "cut_stream": 3,
        "cut_scan": 2,
        "cut_pipeline": 2,
    }

    def open(self) -> None:
        pass

    def close(self) -> None:
        self.client = None

    def cut(self, client: TextClient | BinaryClient) -> None:
        if self.random.random() < 0.7:
            client.reset()
        else:
            client.close()

    def acknowledged_set(self, client: TextClient) -> bytes:
        key, value = self.plain_key(self.random.randrange(self.keys)), self.new_value()
        self.pending = [(key, value)]
        client.expect(b"set %s 0 0 %d" % (key, len(value)), b"STORED", value)
        self.pending = []
        self.ledger.stored(key, value)
        return key

    def op_cut_line(self) -> None:
        with TextClientContext(self.state.port) as client:
            key = self.acknowledged_set(client)
            client.send(b"set %s 0 0 10" % key)
            self.cut(client)

    def op_cut_data_block(self) -> None:
        with TextClientContext(self.state.port) as client:
            key = self.acknowledged_set(client)
            value = self.new_value() + b"x" * 64
            client.send(b"set %s 0 0 %d\r\n%s" % (key, len(value), value[: self.random.randrange(len(value) - 1)]))
            self.cut(client)

    def op_cut_meta_block(self) -> None:
        with TextClientContext(self.state.port) as client:
            key = self.acknowledged_set(client)
            value = self.new_value() + b"x" * 64
            client.send(b"ms %s %d T0\r\n%s" % (key, len(value), value[: len(value) // 2]))
            self.cut(client)

    def op_cut_binary_body(self) -> None:
        key, value = self.plain_key(self.random.randrange(self.keys)), self.new_value()
        client = BinaryClient(connect(self.state.port, READ_TIMEOUT))
        try:
            self.pending = [(key, value)]
            response = client.request(SET, key, SET_EXTRAS.pack(0, 0), value, opaque=1)
            if response.status != STATUS_OK:
                raise ProtocolMismatch("binary set %r: status 0x%02x" % (key, response.status))
            self.pending = []
            self.ledger.stored(key, value)
            request = pack_request(SET, key, SET_EXTRAS.pack(0, 0), self.new_value() + b"y" * 64, opaque=2)
            client.send(request[: self.random.randrange(1, len(request) - 1)])
        finally:
            self.cut(client)

    def op_cut_stream(self) -> None:
        with TextClientContext(self.state.port) as client:
            client.send(b"rget 1 0 0 %s %s\r\n" % (BULK_PREFIX, BULK_END))
            client.read_exact(self.random.randint(1, 200_000))
            self.cut(client)

    def op_cut_pipeline(self) -> None:
        with TextClientContext(self.state.port) as client:
            key = self.acknowledged_set(client)
            client.send(b"get %s\r\n" % key * 200 + b"rget 1 0 0 %s %s\r\n" % (BULK_PREFIX, BULK_END))
            self.cut(client)

    def op_cut_scan(self) -> None:
        client = BinaryClient(connect(self.state.port, READ_TIMEOUT))
        try:
            document = {"range": {"start": base64.b64encode(BULK_PREFIX).decode(), "excl_end": base64.b64encode(BULK_END).decode()}}
            response = client.request(SCAN_CREATE, value=json.dumps(document).encode(), opaque=1, datatype=JSON_DATATYPE)
            if response.status != STATUS_OK:
                raise ProtocolMismatch("scan create: status 0x%02x %r" % (response.status, response.value[:80]))
            scan_id = response.value
            client.send(pack_request(SCAN_CONTINUE, extras=CONTINUE_EXTRAS.pack(scan_id, 0, 0, 0), opaque=2))
            client.read_exact(self.random.randint(1, 100_000))
        finally:
            self.cut(client)
        # A scan belongs to the server, not to the connection, so it
        # outlives the cut and another connection cancels it.
        client = BinaryClient(connect(self.state.port, READ_TIMEOUT))
        try:
            response = client.request(SCAN_CANCEL, extras=scan_id, opaque=3)
            if response.status != STATUS_OK:
                raise ProtocolMismatch("cancel of a cut scan: status 0x%02x %r" % (response.status, response.value[:80]))
        finally:
            client.close()


ROLES: dict[str, type[Worker]] = {
    worker.role: worker for worker in (TextWorker, BinaryWorker, RangeWorker, SlowReaderWorker, AbortWorker)
}

#: The roles of ten consecutive workers.  Runs with more workers repeat the pattern.
ROLE_PATTERN = ("text", "binary", "text", "abort", "text", "binary", "slow", "text", "range", "binary")


def make_workers(count: int, state: RunState, seed: int) -> list[Worker]:
    return [ROLES[ROLE_PATTERN[index % len(ROLE_PATTERN)]](index, state, seed) for index in range(count)]
