"""
Hypothesis strategies for valid binary protocol requests, the corruptions
the fuzz tests apply to them, and an oracle that splits a byte stream into
packets the way memcached 1.6 frames them.

The oracle (:func:`frame_binary`) is written from the binary protocol's
rules as memcached 1.6 applies them, not with kvdaemon's parser.  It
predicts, for each packet, the exact error response and whether the
connection closes, or that the packet is executed, in which case the
tests take the normal reply from a twin server and check its opcode,
opaque and status.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import attrs
from hypothesis import strategies as st

from tests.fuzz_support import ITEM_OVERHEAD, KEYS, MAX_ITEM_SIZE, MAX_KEY_LENGTH

HEADER = struct.Struct(">BBHBBHIIQ")
REQUEST_MAGIC = 0x80
RESPONSE_MAGIC = 0x81

GET, SET, ADD, REPLACE, DELETE, INCREMENT, DECREMENT, QUIT, FLUSH = range(9)
GETQ, NOOP, VERSION, GETK, GETKQ, APPEND, PREPEND, STAT = range(0x09, 0x11)
SETQ, ADDQ, REPLACEQ, DELETEQ, INCREMENTQ, DECREMENTQ, QUITQ, FLUSHQ, APPENDQ, PREPENDQ = range(0x11, 0x1B)
VERBOSITY, TOUCH, GAT, GATQ = range(0x1B, 0x1F)
GATK, GATKQ = 0x23, 0x24
RANGE_GET, RANGE_DELETE = 0x30, 0x37
SASL_LIST_MECHS, SASL_AUTH, SASL_STEP = 0x20, 0x21, 0x22
#: Opcodes whose replies the oracle cannot predict: statistics differ
#: between the fuzzed server and its twin, and scan ids are random.
UNPREDICTABLE = frozenset([STAT, 0xDA, 0xDB, 0xDC])

SUCCESS, KEY_ENOENT, KEY_EEXISTS, E2BIG, EINVAL, NOT_STORED, DELTA_BADVAL = range(7)
AUTH_ERROR, UNKNOWN_COMMAND, BUSY = 0x20, 0x81, 0x85
ERROR_TEXT = {
    E2BIG: b"Too large.",
    EINVAL: b"Invalid arguments",
    UNKNOWN_COMMAND: b"Unknown command",
}


class Rule(NamedTuple):
    """
    The lengths memcached requires of one opcode, and the statuses a
    well-formed request of it may get.
    """

    extras: tuple[int, ...]
    #: True if a key is required, False if it is forbidden, None if it is optional.
    key: bool | None
    value: bool
    statuses: frozenset[int]
    quiet: bool = False


def _rules() -> dict[int, Rule]:
    get = Rule((0,), True, False, frozenset([SUCCESS, KEY_ENOENT]))
    storage = Rule((8,), True, True, frozenset([SUCCESS, KEY_ENOENT, KEY_EEXISTS, NOT_STORED]))
    concatenate = Rule((0,), True, True, frozenset([SUCCESS, KEY_EEXISTS, NOT_STORED]))
    delete = Rule((0,), True, False, frozenset([SUCCESS, KEY_ENOENT, KEY_EEXISTS]))
    counter = Rule((20,), True, False, frozenset([SUCCESS, KEY_ENOENT, KEY_EEXISTS, NOT_STORED, DELTA_BADVAL]))
    # memcached does not check the body length of touch and gat.
    touch = Rule((4,), True, True, frozenset([SUCCESS, KEY_ENOENT]))
    bare = Rule((0,), False, False, frozenset([SUCCESS]))
    ranges = Rule(tuple(range(8, 256)), None, False, frozenset([SUCCESS, BUSY]))
    # With SASL off, memcached 1.6.18 checks the lengths of the SASL
    # opcodes and replies "Unknown command" to well-formed requests.
    sasl = Rule((0,), True, True, frozenset([UNKNOWN_COMMAND]))

    rules = {
        GET: get, GETK: get, SET: storage, ADD: storage, REPLACE: storage, APPEND: concatenate,
        PREPEND: concatenate, DELETE: delete, INCREMENT: counter, DECREMENT: counter, QUIT: bare,
        FLUSH: Rule((0, 4), False, False, frozenset([SUCCESS])), NOOP: bare, VERSION: bare,
        TOUCH: touch, GAT: touch, GATK: touch, VERBOSITY: Rule((4,), False, False, frozenset([SUCCESS])),
        RANGE_GET: ranges, RANGE_DELETE: ranges, SASL_LIST_MECHS: Rule((0,), False, False, frozenset([UNKNOWN_COMMAND])),
        SASL_AUTH: sasl, SASL_STEP: sasl,
    }  # fmt: skip

    quiet_variants = {
        GETQ: GET, GETKQ: GETK, SETQ: SET, ADDQ: ADD, REPLACEQ: REPLACE, APPENDQ: APPEND,
        PREPENDQ: PREPEND, DELETEQ: DELETE, INCREMENTQ: INCREMENT, DECREMENTQ: DECREMENT,
        QUITQ: QUIT, FLUSHQ: FLUSH, GATQ: GAT, GATKQ: GATK,
    }  # fmt: skip
    for quiet, loud in quiet_variants.items():
        rules[quiet] = rules[loud]._replace(quiet=True)
    return rules


RULES = _rules()
STORAGE_OPCODES = frozenset([SET, ADD, REPLACE, SETQ, ADDQ, REPLACEQ])
QUIET_GETS = frozenset([GETQ, GETKQ, GATQ, GATKQ])


def response(opcode: int, opaque: int, status: int) -> bytes:
    """Return the error response memcached sends for ``status``."""
    text = ERROR_TEXT[status]
    return HEADER.pack(RESPONSE_MAGIC, opcode, 0, 0, 0, status, len(text), opaque, 0) + text


# -- requests and their strategies --


@attrs.define
class Packet:
    """A request's header fields and body.  Lengths left as ``None`` are computed from the body."""

    opcode: int
    key: bytes = b""
    extras: bytes = b""
    value: bytes = b""
    opaque: int = 0
    cas: int = 0
    magic: int = REQUEST_MAGIC
    key_length: int | None = None
    extras_length: int | None = None
    body_length: int | None = None
    data_type: int = 0
    vbucket: int = 0

    def encode(self) -> bytes:
        key_length = len(self.key) if self.key_length is None else self.key_length
        extras_length = len(self.extras) if self.extras_length is None else self.extras_length
        body_length = len(self.extras) + len(self.key) + len(self.value)
        if self.body_length is not None:
            body_length = self.body_length
        header = HEADER.pack(
            self.magic,
            self.opcode,
            key_length,
            extras_length,
            self.data_type,
            self.vbucket,
            body_length,
            self.opaque,
            self.cas,
        )
        return header + self.extras + self.key + self.value


keys = st.sampled_from(KEYS)
#: Values up to the item size limit and a little past it, and bytes that
#: are no request magic, so that a misframed value never passes for a
#: header.
values = st.one_of(
    st.binary(max_size=16).map(lambda value: value.replace(b"\x80", b"\x7f")),
    st.integers(30, 45).map(lambda length: b"V" * length),
)
cas_values = st.one_of(st.just(0), st.just(0), st.integers(1, 12))
exptimes = st.sampled_from([0, 100, 3600])


@st.composite
def binary_requests(draw: st.DrawFn) -> Packet:
    """Draw one valid request of a generated kind.  The caller sets its opaque."""
    kind = draw(st.sampled_from(["get", "store", "concatenate", "delete", "counter", "touch", "bare", "range"]))
    if kind == "get":
        return Packet(draw(st.sampled_from([GET, GETQ, GETK, GETKQ])), draw(keys))
    if kind == "store":
        opcode = draw(st.sampled_from([SET, ADD, REPLACE, SETQ, ADDQ, REPLACEQ]))
        extras = struct.pack(">II", draw(st.sampled_from([0, 1, 2**32 - 1])), draw(exptimes))
        return Packet(opcode, draw(keys), extras, draw(values), cas=draw(cas_values))
    if kind == "concatenate":
        opcode = draw(st.sampled_from([APPEND, PREPEND, APPENDQ, PREPENDQ]))
        return Packet(opcode, draw(keys), value=draw(values), cas=draw(cas_values))
    if kind == "delete":
        return Packet(draw(st.sampled_from([DELETE, DELETEQ])), draw(keys), cas=draw(cas_values))
    if kind == "counter":
        opcode = draw(st.sampled_from([INCREMENT, DECREMENT, INCREMENTQ, DECREMENTQ]))
        delta = draw(st.sampled_from([0, 1, 7, 2**64 - 1]))
        exptime = draw(st.sampled_from([0, 100, 0xFFFFFFFF]))
        extras = struct.pack(">QQI", delta, draw(st.sampled_from([0, 5])), exptime)
        return Packet(opcode, draw(keys), extras, cas=draw(cas_values))
    if kind == "touch":
        opcode = draw(st.sampled_from([TOUCH, GAT, GATQ, GATK, GATKQ]))
        return Packet(opcode, draw(keys), struct.pack(">I", draw(exptimes)))
    if kind == "bare":
        return Packet(draw(st.sampled_from([NOOP, VERSION])))

    opcode = draw(st.sampled_from([RANGE_GET, RANGE_GET, RANGE_DELETE]))
    start = draw(st.one_of(st.just(b""), keys))
    end = draw(st.one_of(st.just(b""), keys))
    extras = struct.pack(">HBBI", len(end), 0, draw(st.integers(0, 3)), draw(st.integers(0, 4))) + end
    return Packet(opcode, start, extras)


# -- corruptions --

#: Opcodes a corrupted opcode may become: every kind the oracle models,
#: and some that no server implements.
OPCODE_CHOICES = sorted(RULES) + [0x25, 0x31, 0x40, 0xFF]


@st.composite
def corrupt(draw: st.DrawFn, packet: Packet) -> Packet:
    """Return a copy of ``packet`` with exactly one field corrupted."""
    packet = attrs.evolve(packet)
    choices = ["header bit", "opcode", "magic", "key length", "extras length", "body length", "cas", "opaque"]
    if packet.key:
        choices.append("key byte")
    if packet.extras:
        choices += ["extras byte", "extras byte"]
    choice = draw(st.sampled_from(choices))

    if choice == "header bit":
        encoded = bytearray(packet.encode())
        index = draw(st.integers(0, HEADER.size - 1))
        encoded[index] ^= 1 << draw(st.integers(0, 7))
        fields = HEADER.unpack_from(encoded)
        packet.magic, packet.opcode, packet.key_length, packet.extras_length = fields[:4]
        packet.data_type, packet.vbucket, packet.body_length, packet.opaque, packet.cas = fields[4:]
    elif choice == "opcode":
        packet.opcode = draw(st.sampled_from(OPCODE_CHOICES))
    elif choice == "magic":
        packet.magic = draw(st.sampled_from([0x81, 0x00, 0x18, 0xFF]))
    elif choice == "key length":
        length = len(packet.key) + draw(st.sampled_from([-3, -1, 1, 3, 251, 300, 65535]))
        packet.key_length = min(max(0, length), 65535)
    elif choice == "extras length":
        packet.extras_length = draw(st.sampled_from([0, 1, 4, 7, 8, 9, 20, 255]))
    elif choice == "body length":
        length = len(packet.extras) + len(packet.key) + len(packet.value)
        delta = draw(st.sampled_from([-3, -1, 1, 2, 5, MAX_ITEM_SIZE // 2, MAX_ITEM_SIZE]))
        packet.body_length = max(0, length + delta)
    elif choice == "cas":
        packet.cas = draw(st.integers(1, 2**64 - 1))
    elif choice == "opaque":
        packet.opaque ^= 0x1000
    elif choice == "key byte":
        index = draw(st.integers(0, len(packet.key) - 1))
        packet.key = packet.key[:index] + bytes([draw(st.integers(0, 255))]) + packet.key[index + 1 :]
    else:
        index = draw(st.integers(0, len(packet.extras) - 1))
        byte = draw(st.sampled_from([0x00, 0x01, 0x04, 0x80, 0xFF]))
        packet.extras = packet.extras[:index] + bytes([byte]) + packet.extras[index + 1 :]
    return packet


# -- the oracle --


class Unit(NamedTuple):
    """
    One packet of a stream as memcached frames it.

    ``outcome`` is ``execute``, ``reject`` or ``drop``.  For ``reject``,
    ``reply`` is the exact error response, and ``close`` is true if the
    connection closes after it.  ``drop`` is an invalid magic, after which
    the connection closes without a reply.
    """

    raw: bytes
    outcome: str
    opcode: int
    opaque: int
    reply: bytes = b""
    close: bool = False


class Framing(NamedTuple):
    """A stream split into units, whether the server closes the connection, and whether a reply cannot be predicted."""

    units: list[Unit]
    closed: bool
    unpredictable: bool


def _fits(key: bytes, value_length: int, flags: int) -> bool:
    return len(key) + value_length + ITEM_OVERHEAD + (4 if flags else 0) <= MAX_ITEM_SIZE


def frame_binary(stream: bytes) -> Framing:
    """Split ``stream`` into the packets memcached reads from it."""
    units: list[Unit] = []
    offset = 0
    while len(stream) - offset >= HEADER.size:
        magic, opcode, key_length, extras_length, _, _, body_length, opaque, _ = HEADER.unpack_from(stream, offset)
        if magic != REQUEST_MAGIC:
            units.append(Unit(stream[offset:], "drop", opcode, opaque, close=True))
            return Framing(units, True, False)

        key_start = offset + HEADER.size + extras_length
        value_start = key_start + key_length
        if value_start > len(stream):
            break

        rule = RULES.get(opcode)
        failure = _header_failure(rule, key_length, extras_length, body_length)
        if failure is not None:
            raw = stream[offset:value_start]
            units.append(Unit(raw, "reject", opcode, opaque, response(opcode, opaque, failure), close=True))
            return Framing(units, True, False)
        if opcode in UNPREDICTABLE:
            return Framing(units, False, True)
        if rule is None:
            end = min(offset + HEADER.size + body_length, len(stream))
            raw = stream[offset:end]
            units.append(Unit(raw, "reject", opcode, opaque, response(opcode, opaque, UNKNOWN_COMMAND)))
            offset = end
            continue

        packet_end = offset + HEADER.size + body_length
        key = stream[key_start:value_start]
        extras = stream[offset + HEADER.size : key_start]
        value_length = packet_end - value_start
        flags = struct.unpack_from(">I", extras)[0] if opcode in STORAGE_OPCODES else 0
        if value_length and not _fits(key, value_length, flags):
            # The value is skipped, however much of it has arrived.
            end = min(packet_end, len(stream))
            raw = stream[offset:end]
            units.append(Unit(raw, "reject", opcode, opaque, response(opcode, opaque, E2BIG)))
            offset = end
            continue
        if packet_end > len(stream):
            break

        raw = stream[offset:packet_end]
        unit = _range_unit(raw, opcode, opaque, extras) or Unit(raw, "execute", opcode, opaque)
        units.append(unit)
        offset = packet_end
        if unit.close or opcode in (QUIT, QUITQ):
            return Framing(units, True, False)
    return Framing(units, False, False)


def _header_failure(rule: Rule | None, key_length: int, extras_length: int, body_length: int) -> int | None:
    """Return the status of a header memcached rejects, closing the connection, or ``None``."""
    if key_length + extras_length > body_length:
        return UNKNOWN_COMMAND
    if key_length > MAX_KEY_LENGTH:
        return EINVAL
    if rule is None:
        return None
    if extras_length not in rule.extras:
        return EINVAL
    if rule.key is not None and bool(key_length) != rule.key:
        return EINVAL
    if not rule.value and body_length != key_length + extras_length:
        return EINVAL
    return None


def _range_unit(raw: bytes, opcode: int, opaque: int, extras: bytes) -> Unit | None:
    """Return the unit of a range request whose extras are invalid, or ``None``."""
    if opcode not in (RANGE_GET, RANGE_DELETE):
        return None
    end_length, reserved, flags, _ = struct.unpack_from(">HBBI", extras)
    if end_length + 8 != len(extras):
        return Unit(raw, "reject", opcode, opaque, response(opcode, opaque, EINVAL), close=True)
    if reserved or flags & ~3:
        return Unit(raw, "reject", opcode, opaque, response(opcode, opaque, EINVAL))
    return None


class Response(NamedTuple):
    """One response packet's header fields."""

    opcode: int
    status: int
    opaque: int


def parse_responses(data: bytes) -> list[Response]:
    """
    Split ``data`` into response packets.

    :raise AssertionError: a packet has the wrong magic or is cut short.
    """
    responses = []
    offset = 0
    while offset < len(data):
        assert len(data) - offset >= HEADER.size, "incomplete response header: %r" % (data[offset:],)
        magic, opcode, key_length, extras_length, _, status, body_length, opaque, _ = HEADER.unpack_from(data, offset)
        assert magic == RESPONSE_MAGIC, "response magic 0x%02x" % (magic,)
        assert key_length + extras_length <= body_length, "response lengths disagree"
        offset += HEADER.size + body_length
        assert offset <= len(data), "incomplete response body"
        responses.append(Response(opcode, status, opaque))
    return responses
