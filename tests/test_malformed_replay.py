"""
Malformed requests replayed against kvdaemon and a real memcached 1.6.18.

:data:`CASES` is a table of malformed requests, each sent on a fresh
connection to an in-process kvdaemon and to a memcached subprocess.  A row
states the exact reply, whether the server then closes the connection, and
how many requests in it the server rejects.  Both servers must send that
reply, except on the few rows that carry a ``difference``.  Such a row
explains what kvdaemon does on purpose that memcached does not, and carries
memcached's own reply, which is checked too.

kvdaemon must log every rejected request once, with the peer address, at
info or warn level, and must keep the data stored before the replay.

Every connection of a replay runs at once, so the module takes about as
long as its slowest row.  A connection ends when the server closes it or,
once the expected reply has arrived, after :data:`QUIET_SECONDS` without
further bytes.
"""

from __future__ import annotations

import struct

import attrs
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.binary_packets import counter_extras, request, storage_extras, u32
from tests.support import MemcachedProcess, start_server

#: Seconds without new bytes after which a connection that has sent the
#: expected reply counts as finished and not closed by the server.
QUIET_SECONDS = 0.3

#: Seconds a connection may take in all.  Only a server that sends less
#: than the expected reply, or does not close when it should, takes this long.
DEADLINE_SECONDS = 10.0

KEY_251 = b"k" * 251

#: A value over the 1 MiB item size limit that both servers run with.
OVERSIZED_VALUE = b"x" * 1_100_000

#: Binary protocol response statuses.
STATUS_SUCCESS = 0x00
STATUS_NOT_FOUND = 0x01
STATUS_TOO_LARGE = 0x03
STATUS_INVALID = 0x04
STATUS_NON_NUMERIC = 0x06
STATUS_UNKNOWN_COMMAND = 0x81

#: The text memcached sends with each binary error status.
STATUS_TEXT = {
    STATUS_NOT_FOUND: b"Not found",
    STATUS_TOO_LARGE: b"Too large.",
    STATUS_INVALID: b"Invalid arguments",
    STATUS_NON_NUMERIC: b"Non-numeric server-side value for incr or decr",
    STATUS_UNKNOWN_COMMAND: b"Unknown command",
}

_RESPONSE_HEADER = struct.Struct(">BBHBBHIIQ")


def response(opcode: int, status: int = STATUS_SUCCESS, opaque: int = 0, value: bytes | None = None) -> bytes:
    """Build a binary response without key or extras.  An error status gets memcached's text as its value."""
    if value is None:
        value = STATUS_TEXT.get(status, b"")
    header = _RESPONSE_HEADER.pack(0x81, opcode, 0, 0, 0, status, len(value), opaque, 0)
    return header + value


def range_extras(end_key: bytes = b"", reserved: int = 0, flags: int = 0, max_items: int = 0) -> bytes:
    """Build the extras of a kvdaemon range request (0x30, 0x37)."""
    return struct.pack(">HBBI", len(end_key), reserved, flags, max_items) + end_key


@attrs.frozen
class Case:
    """
    One malformed request and the reply to it.

    :ivar request: the bytes sent on a fresh connection, in one write.
    :ivar reply: kvdaemon's exact reply.
    :ivar closes: whether kvdaemon closes the connection after ``reply``.
    :ivar rejections: how many requests in ``request`` kvdaemon rejects,
        each of which it must log once.
    :ivar difference: why kvdaemon's reply differs from memcached's, or
        ``None`` when both servers must send ``reply``.
    :ivar memcached_reply: memcached's reply where there is a difference.
    :ivar memcached_closes: whether memcached closes where there is a difference.
    """

    name: str
    protocol: str
    request: bytes
    reply: bytes
    closes: bool = False
    rejections: int = 1
    difference: str | None = None
    memcached_reply: bytes | None = None
    memcached_closes: bool = False

    @property
    def label(self) -> str:
        """The row's name and protocol, unique in :data:`CASES`."""
        return "[%s] %s" % (self.protocol, self.name)

    def expected(self, server: str) -> tuple[bytes, bool]:
        """Return the reply and close that ``server`` ("kvdaemon" or "memcached") must send."""
        if server == "memcached" and self.difference is not None:
            return self.memcached_reply, self.memcached_closes
        return self.reply, self.closes


def text(name: str, request: bytes, reply: bytes, **options) -> Case:
    return Case(name, "text", request, reply, **options)


def binary(name: str, request: bytes, reply: bytes, **options) -> Case:
    return Case(name, "binary", request, reply, **options)


BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
BAD_CHUNK = b"CLIENT_ERROR bad data chunk\r\n"
BAD_DELTA = b"CLIENT_ERROR invalid numeric delta argument\r\n"
BAD_EXPTIME = b"CLIENT_ERROR invalid exptime argument\r\n"
NON_NUMERIC = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"

#: The difference on every row for a kvdaemon range command.
RANGE_COMMAND = "memcached 1.6.18 has no range commands, so it replies ERROR as to any unknown command"

#: The difference on every row for a kvdaemon range or scan opcode.
#: memcached 1.6.18 replies Unknown command to an opcode it does not know,
#: but only after it has skipped body-length bytes counted from the end of
#: the key.  So these rows send as many bytes after the request as it has
#: extras and key, and kvdaemon takes them for a header that never completes.
NO_RANGE_OPCODES = "memcached 1.6.18 has no range or scan opcodes, so it replies Unknown command"

TEXT_CASES = [
    text("unknown command", b"bogus a b\r\n", b"ERROR\r\n"),
    text("empty line", b"\r\n", b"ERROR\r\n"),
    text("line of spaces", b"   \r\n", b"ERROR\r\n"),
    text("nul byte before command", b"\x00get k\r\n", b"ERROR\r\n"),
    text("high bytes as command", b"\xff\xfe\r\n", b"ERROR\r\n"),
    text("line over 2048 bytes", b"x" * 3000, b"", closes=True),
    text("set line over 2048 bytes", b"set " + b"k" * 3000, b"", closes=True),
    text(
        "line over 2048 bytes after set",
        b"set t-long 0 0 1\r\nx\r\n" + b"x" * 3000,
        b"STORED\r\n",
        closes=True,
        difference=(
            "memcached 1.6.18 closes without sending the replies it still holds for the same read, "
            "so whether a client learns that its set was stored depends on how TCP split its "
            "requests.  kvdaemon sends every earlier reply before it closes"
        ),
        memcached_reply=b"",
        memcached_closes=True,
    ),
    text("http request line", b"GET / HTTP/1.1\r\n", b"", closes=True),
    text("set key over 250 bytes", b"set " + KEY_251 + b" 0 0 1\r\n", BAD_FORMAT),
    text("get key over 250 bytes", b"get a " + KEY_251 + b"\r\n", BAD_FORMAT),
    text(
        "get key over 250 after set",
        b"set t-wipe 0 0 1\r\nx\r\nget t-wipe " + KEY_251 + b"\r\n",
        b"STORED\r\n" + BAD_FORMAT,
        difference=(
            "memcached 1.6.18 drops every reply still queued on the connection when a get names a "
            "key over 250 bytes, the earlier set's STORED included.  kvdaemon sends one reply per "
            "request, so a client's replies stay in step with its requests"
        ),
        memcached_reply=BAD_FORMAT,
    ),
    text("get control bytes over 250", b"get " + b"\x01" * 251 + b"\r\n", BAD_FORMAT),
    text("set key with nul byte", b"set a\x00b 0 0 1\r\n", b"ERROR\r\n"),
    # memcached 1.6.18 accepts control bytes in a text key.
    text("set key with control bytes", b"set t-ctl\x01\x7f 0 0 1\r\nx\r\n", b"STORED\r\n", rejections=0),
    text("set negative flags", b"set k -1 0 1\r\n", BAD_FORMAT),
    text("set non-numeric flags", b"set k abc 0 1\r\n", BAD_FORMAT),
    text(
        "set flags over 32 bits",
        b"set t-flags 4294967296 0 1\r\nx\r\n",
        # The rejected line leaves its data block to be read as a command.
        BAD_FORMAT + b"ERROR\r\n",
        rejections=2,
        difference=(
            "memcached 1.6.18 stores flags 2**32 as 0, so the client's flags are lost without an error. "
            "kvdaemon rejects flags that do not fit in 32 bits"
        ),
        memcached_reply=b"STORED\r\n",
    ),
    text("set non-numeric exptime", b"set k 0 abc 1\r\n", BAD_FORMAT),
    text("set exptime over 64 bits", b"set k 0 99999999999999999999 1\r\n", BAD_FORMAT),
    text(
        "set exptime over 32 bits",
        b"set t-exptime 0 4294967297 1\r\nx\r\n",
        BAD_FORMAT + b"ERROR\r\n",
        rejections=2,
        difference=(
            "memcached 1.6.18 truncates exptime 2**32 + 1 to 1 second without an error. "
            "kvdaemon rejects an exptime that does not fit in 32 bits"
        ),
        memcached_reply=b"STORED\r\n",
    ),
    text("set negative length", b"set k 0 0 -1\r\n", BAD_FORMAT),
    text("set non-numeric length", b"set k 0 0 abc\r\n", BAD_FORMAT),
    text("set length over 64 bits", b"set k 0 0 99999999999999999999\r\n", BAD_FORMAT),
    text("set data longer than length", b"set k 0 0 1\r\nxyz", BAD_CHUNK),
    text("set data shorter than length", b"set k 0 0 3\r\nab\r\nX", BAD_CHUNK),
    text("set data over item limit", b"set k 0 0 %d\r\n%s\r\n" % (len(OVERSIZED_VALUE), OVERSIZED_VALUE), TOO_LARGE),
    text("set missing length", b"set k 0 0\r\n", b"ERROR\r\n"),
    text("incr missing delta", b"incr k\r\n", b"ERROR\r\n"),
    text("incr non-numeric value", b"set t-incr 0 0 3\r\nabc\r\nincr t-incr 1\r\n", b"STORED\r\n" + NON_NUMERIC),
    text("decr non-numeric value", b"set t-decr 0 0 2\r\n1x\r\ndecr t-decr 1\r\n", b"STORED\r\n" + NON_NUMERIC),
    text("incr non-numeric delta", b"incr k abc\r\n", BAD_DELTA),
    text("decr negative delta", b"decr k -1\r\n", BAD_DELTA),
    text("incr delta over 64 bits", b"incr k 18446744073709551616\r\n", BAD_DELTA),
    text("cas non-numeric unique", b"cas k 0 0 1 abc\r\n", BAD_FORMAT),
    text("cas negative unique", b"cas k 0 0 1 -1\r\n", BAD_FORMAT),
    text("cas missing unique", b"cas k 0 0 1\r\n", b"ERROR\r\n"),
    text("verbosity non-numeric", b"verbosity abc\r\n", BAD_FORMAT),
    text("verbosity missing level", b"verbosity\r\n", b"ERROR\r\n"),
    text("verbosity junk noreply", b"verbosity abc noreply\r\n", b""),
    text("flush_all non-numeric", b"flush_all abc\r\n", BAD_EXPTIME),
    text("flush_all junk noreply", b"flush_all abc noreply\r\n", b""),
    text("flush_all too many tokens", b"flush_all 1 2 3\r\n", b"ERROR\r\n"),
    text("noreply before key", b"set noreply k 0 0 1\r\n", BAD_FORMAT),
    text("noreply as exptime", b"set k 0 noreply 1\r\n", BAD_FORMAT),
    text("noreply as delta", b"incr k noreply\r\n", b""),
    text(
        "delete with hold time",
        b"delete k 5\r\n",
        b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n",
    ),
    text("touch non-numeric exptime", b"touch k abc\r\n", BAD_EXPTIME),
    text("gat non-numeric exptime", b"gat abc k\r\n", BAD_EXPTIME),
    text("get without key", b"get\r\n", b"ERROR\r\n"),
    text("stats unknown group", b"stats bogus\r\n", b"ERROR\r\n"),
    text("lru_crawler unknown form", b"lru_crawler bogus\r\n", b"ERROR\r\n"),
    text("metadump class out of range", b"lru_crawler metadump 0\r\n", b"BADCLASS invalid class id\r\n"),
    # Meta commands.
    text("mg without key", b"mg\r\n", b"ERROR\r\n"),
    text("mg invalid flag", b"mg k !\r\n", b"CLIENT_ERROR invalid flag\r\n"),
    text("mg control byte flag", b"mg k \x01\r\n", b"CLIENT_ERROR invalid flag\r\n"),
    text("mg duplicate flag", b"mg k v v\r\n", b"CLIENT_ERROR duplicate flag\r\n"),
    text("mg non-numeric ttl", b"mg k Tabc\r\n", b"CLIENT_ERROR bad token in command line format\r\n"),
    text("mg key over 250 bytes", b"mg " + KEY_251 + b" v\r\n", BAD_FORMAT),
    text("mg base64 key invalid", b"mg a*b b\r\n", b"CLIENT_ERROR error decoding key\r\n"),
    text("mg base64 key truncated", b"mg abc b\r\n", b"CLIENT_ERROR error decoding key\r\n"),
    text("mg base64 key over 250", b"mg " + b"QUFB" * 84 + b" b\r\n", BAD_FORMAT),
    text("mg opaque over 32 bytes", b"mg k O" + b"x" * 32 + b"\r\n", b"CLIENT_ERROR opaque token too long\r\n"),
    text(
        "mg too many flags",
        b"mg k " + b" ".join(b"O%d" % i for i in range(20)) + b"\r\n",
        b"CLIENT_ERROR options flags are too long\r\n",
    ),
    text("ms missing length", b"ms k\r\n", BAD_FORMAT),
    text("ms non-numeric length", b"ms k abc\r\n", BAD_FORMAT),
    text("ms negative length", b"ms k -1\r\n", BAD_FORMAT),
    text("ms length over int max", b"ms k 2147483647\r\n", BAD_FORMAT),
    text("ms duplicate flag", b"ms k 1 T1 T2\r\nx\r\n", b"CLIENT_ERROR duplicate flag\r\n"),
    text("ms invalid mode", b"ms k 1 MZ\r\nx\r\n", b"CLIENT_ERROR invalid mode for ms M token\r\n"),
    text("ms empty mode", b"ms k 1 M\r\nx\r\n", b"CLIENT_ERROR incorrect length for M token\r\n"),
    text("ms non-numeric flags", b"ms k 1 Fabc\r\nx\r\n", BAD_FORMAT),
    text(
        "ms non-numeric new cas",
        b"ms k 1 Eabc\r\nx\r\n",
        b"CLIENT_ERROR bad token in command line format\r\n",
        difference=(
            "kvdaemon serves the E flag (give the stored item this CAS value), so it rejects a "
            "non-numeric E token as a bad token.  memcached 1.6.18 has no E flag"
        ),
        memcached_reply=b"CLIENT_ERROR invalid flag\r\n",
    ),
    text("ms base64 key invalid", b"ms a*b 1 b\r\nx\r\n", b"CLIENT_ERROR error decoding key\r\n"),
    text("ms data longer than length", b"ms k 1\r\nxyz", BAD_CHUNK),
    text("ms data over item limit", b"ms k %d\r\n%s\r\n" % (len(OVERSIZED_VALUE), OVERSIZED_VALUE), TOO_LARGE),
    text("md invalid flag", b"md k !\r\n", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    text("md duplicate flag", b"md k q q\r\n", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    text("ma non-numeric value", b"ms t-ma 3\r\nabc\r\nma t-ma\r\n", b"HD\r\n" + NON_NUMERIC),
    text("ma non-numeric delta", b"ma k Dabc\r\n", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    text("ma invalid mode", b"ma k MX\r\n", b"CLIENT_ERROR invalid mode for ma M token\r\n"),
    text("me without key", b"me\r\n", BAD_FORMAT),
    text("me base64 key invalid", b"me a*b b\r\n", BAD_FORMAT),
    # kvdaemon's range commands, which memcached reads as unknown commands.
    text("rget missing arguments", b"rget 0 0\r\n", b"ERROR\r\n"),
    text(
        "rget inclusive flag 2",
        b"rget 2 0 10 a\r\n",
        BAD_FORMAT,
        difference=RANGE_COMMAND,
        memcached_reply=b"ERROR\r\n",
    ),
    text(
        "rget start key over 250",
        b"rget 1 1 0 " + KEY_251 + b"\r\n",
        BAD_FORMAT,
        difference=RANGE_COMMAND,
        memcached_reply=b"ERROR\r\n",
    ),
    text(
        "rdelete non-numeric max items",
        b"rdelete 0 0 abc a z\r\n",
        BAD_FORMAT,
        difference=RANGE_COMMAND,
        memcached_reply=b"ERROR\r\n",
    ),
    text(
        "rdelete end key over 250",
        b"rdelete 1 1 0 a " + KEY_251 + b"\r\n",
        BAD_FORMAT,
        difference=RANGE_COMMAND,
        memcached_reply=b"ERROR\r\n",
    ),
]

NOOP = 0x0A

BINARY_CASES = [
    binary(
        "invalid magic after request",
        request(NOOP, opaque=1) + request(NOOP, magic=0x00, opaque=2),
        response(NOOP, opaque=1),
        closes=True,
    ),
    binary(
        "response magic after request",
        request(NOOP, opaque=1) + request(NOOP, magic=0x81, opaque=2),
        response(NOOP, opaque=1),
        closes=True,
    ),
    # A first byte other than 0x80 makes a text connection.  The NUL byte in
    # the header ends the request line there.
    binary("response magic first", request(0x00, key=b"k", magic=0x81) + b"\r\n", b"ERROR\r\n"),
    binary("unknown opcode", request(0x7F, opaque=3), response(0x7F, STATUS_UNKNOWN_COMMAND, 3)),
    binary(
        "unknown opcode with body",
        request(0x7F, key=b"abc", value=b"xyz", opaque=3) + request(NOOP, opaque=4),
        response(0x7F, STATUS_UNKNOWN_COMMAND, 3) + response(NOOP, opaque=4),
        difference=(
            "memcached 1.6.18 skips body-length bytes counted from the end of the key, so it "
            "also skips the first 3 bytes of the next request and loses step with the client. "
            "kvdaemon skips exactly the request's body"
        ),
        memcached_reply=response(0x7F, STATUS_UNKNOWN_COMMAND, 3),
    ),
    binary("sasl auth with sasl off", request(0x21, key=b"PLAIN", value=b"\0a\0b", opaque=6), response(0x21, STATUS_UNKNOWN_COMMAND, 6)),
    binary(
        "get with extras",
        request(0x00, key=b"k", extras=b"\0" * 4, opaque=4),
        response(0x00, STATUS_INVALID, 4),
        closes=True,
    ),
    binary(
        "set without extras",
        request(0x01, key=b"k", value=b"x", opaque=5),
        response(0x01, STATUS_INVALID, 5),
        closes=True,
    ),
    binary(
        "set with 4 bytes of extras",
        request(0x01, key=b"k", extras=b"\0" * 4, value=b"x", opaque=5),
        response(0x01, STATUS_INVALID, 5),
        closes=True,
    ),
    binary(
        "incr with 8 bytes of extras",
        request(0x05, key=b"k", extras=b"\0" * 8, opaque=6),
        response(0x05, STATUS_INVALID, 6),
        closes=True,
    ),
    binary(
        "touch without extras",
        request(0x1C, key=b"k", opaque=16),
        response(0x1C, STATUS_INVALID, 16),
        closes=True,
    ),
    binary(
        "flush with 8 bytes of extras",
        request(0x08, extras=b"\0" * 8, opaque=1),
        response(0x08, STATUS_INVALID, 1),
        closes=True,
    ),
    binary(
        "key length over body length",
        request(0x00, key=b"abc", body_length=2, opaque=7),
        response(0x00, STATUS_UNKNOWN_COMMAND, 7),
        closes=True,
    ),
    binary(
        "body length near 2 GiB",
        request(0x00, key=b"k", body_length=2**31, opaque=6),
        response(0x00, STATUS_INVALID, 6),
        closes=True,
    ),
    binary("noop with key", request(NOOP, key=b"k", opaque=8), response(NOOP, STATUS_INVALID, 8), closes=True),
    binary("version with key", request(0x0B, key=b"k", opaque=8), response(0x0B, STATUS_INVALID, 8), closes=True),
    binary("flush with key", request(0x08, key=b"k", opaque=8), response(0x08, STATUS_INVALID, 8), closes=True),
    binary("quit with value", request(0x07, value=b"x", opaque=14), response(0x07, STATUS_INVALID, 14), closes=True),
    binary(
        "get with value",
        request(0x00, key=b"k", value=b"x", opaque=14),
        response(0x00, STATUS_INVALID, 14),
        closes=True,
    ),
    binary(
        "stat with extras",
        request(0x10, extras=b"\0" * 4, opaque=19),
        response(0x10, STATUS_INVALID, 19),
        closes=True,
    ),
    binary("get without key", request(0x00, opaque=9), response(0x00, STATUS_INVALID, 9), closes=True),
    binary("delete without key", request(0x04, opaque=9), response(0x04, STATUS_INVALID, 9), closes=True),
    binary(
        "set without key",
        request(0x01, extras=storage_extras(), value=b"x", opaque=9),
        response(0x01, STATUS_INVALID, 9),
        closes=True,
    ),
    binary(
        "incr without key",
        request(0x05, extras=counter_extras(1), opaque=9),
        response(0x05, STATUS_INVALID, 9),
        closes=True,
    ),
    binary("get key over 250 bytes", request(0x00, key=KEY_251, opaque=10), response(0x00, STATUS_INVALID, 10), closes=True),
    binary(
        "incr non-numeric value",
        request(0x11, key=b"b-incr", extras=storage_extras(), value=b"abc", opaque=11)
        + request(0x05, key=b"b-incr", extras=counter_extras(1), opaque=12),
        response(0x05, STATUS_NON_NUMERIC, 12),
    ),
    binary(
        "decr non-numeric value",
        request(0x11, key=b"b-decr", extras=storage_extras(), value=b"1x", opaque=11)
        + request(0x06, key=b"b-decr", extras=counter_extras(1), opaque=12),
        response(0x06, STATUS_NON_NUMERIC, 12),
    ),
    binary(
        "set value over item limit",
        request(0x01, key=b"k", extras=storage_extras(), value=OVERSIZED_VALUE, opaque=13) + request(NOOP, opaque=14),
        response(0x01, STATUS_TOO_LARGE, 13) + response(NOOP, opaque=14),
    ),
    binary(
        "setq value over item limit",
        request(0x11, key=b"k", extras=storage_extras(), value=OVERSIZED_VALUE, opaque=13),
        response(0x11, STATUS_TOO_LARGE, 13),
    ),
    # kvdaemon's range and scan opcodes.
    binary(
        "range get short extras",
        request(0x30, key=b"a", extras=b"\0" * 4, opaque=17) + b"\x80" * 5,
        response(0x30, STATUS_INVALID, 17),
        closes=True,
        difference=NO_RANGE_OPCODES,
        memcached_reply=response(0x30, STATUS_UNKNOWN_COMMAND, 17),
    ),
    binary(
        "range get end key length wrong",
        request(0x30, key=b"a", extras=range_extras(b"z")[:8] + b"zz", opaque=17) + b"\x80" * 11,
        response(0x30, STATUS_INVALID, 17),
        closes=True,
        difference=NO_RANGE_OPCODES,
        memcached_reply=response(0x30, STATUS_UNKNOWN_COMMAND, 17),
    ),
    binary(
        "range get unknown flag bits",
        request(0x30, key=b"a", extras=range_extras(flags=0x80), opaque=17) + b"\x80" * 9,
        response(0x30, STATUS_INVALID, 17),
        difference=NO_RANGE_OPCODES,
        memcached_reply=response(0x30, STATUS_UNKNOWN_COMMAND, 17),
    ),
    binary(
        "range delete reserved byte set",
        request(0x37, key=b"a", extras=range_extras(reserved=1), opaque=17) + b"\x80" * 9,
        response(0x37, STATUS_INVALID, 17),
        difference=NO_RANGE_OPCODES,
        memcached_reply=response(0x37, STATUS_UNKNOWN_COMMAND, 17),
    ),
    binary(
        "scan create invalid json",
        request(0xDA, value=b"notjson", opaque=18),
        response(0xDA, STATUS_INVALID, 18),
        difference=NO_RANGE_OPCODES,
        memcached_reply=response(0xDA, STATUS_UNKNOWN_COMMAND, 18),
    ),
    binary(
        "scan cancel unknown id",
        request(0xDC, extras=b"\0" * 16, opaque=18) + b"\x80" * 16,
        response(0xDC, STATUS_NOT_FOUND, 18),
        difference=NO_RANGE_OPCODES,
        memcached_reply=response(0xDC, STATUS_UNKNOWN_COMMAND, 18),
    ),
]

CASES = TEXT_CASES + BINARY_CASES


@attrs.define
class Reply:
    """What a server sent on one connection, and whether it closed it."""

    data: bytes
    closed: bool
    #: The client's port, which kvdaemon logs as part of the peer address.
    local_port: int


class ReplyReader(Protocol):
    """
    Send one request and collect the reply until the server closes the
    connection, or until the server is quiet after ``expected_length``
    bytes when no close is expected.
    """

    def __init__(self, request: bytes, expected_length: int, expect_close: bool) -> None:
        self.request = request
        self.expected_length = expected_length
        self.expect_close = expect_close
        self.received: list[bytes] = []
        self.received_length = 0
        self.ended_by_client = False
        self.local_port = 0
        self.finished: defer.Deferred[Reply] = defer.Deferred()
        self._quiet_timer = None
        self._deadline_timer = None

    def connectionMade(self) -> None:
        self.local_port = self.transport.getHost().port
        self._deadline_timer = reactor.callLater(DEADLINE_SECONDS, self._end)
        self.transport.write(self.request)
        self._restart_quiet_timer()

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        self.received_length += len(data)
        self._restart_quiet_timer()

    def _restart_quiet_timer(self) -> None:
        if self.expect_close or self.received_length < self.expected_length:
            return
        if self._quiet_timer is not None and self._quiet_timer.active():
            self._quiet_timer.reset(QUIET_SECONDS)
        else:
            self._quiet_timer = reactor.callLater(QUIET_SECONDS, self._end)

    def _end(self) -> None:
        self.ended_by_client = True
        self.transport.abortConnection()

    def connectionLost(self, reason: object = None) -> None:
        for timer in (self._quiet_timer, self._deadline_timer):
            if timer is not None and timer.active():
                timer.cancel()
        reply = Reply(b"".join(self.received), not self.ended_by_client, self.local_port)
        self.finished.callback(reply)


@defer.inlineCallbacks
def send_case(port: int, case: Case, server: str):
    """Send ``case`` to 127.0.0.1:``port`` on a new connection, and fire with the :class:`Reply`."""
    reply, closes = case.expected(server)
    reader = ReplyReader(case.request, len(reply), closes)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), reader)
    result = yield reader.finished
    return result


def replay(port: int, server: str) -> defer.Deferred:
    """Send every row of :data:`CASES` at once, and fire with a list of :class:`Reply` in row order."""
    return defer.gatherResults([send_case(port, case, server) for case in CASES], consumeErrors=True)


def describe_mismatches(replies: list[Reply], server: str) -> list[str]:
    """Return one line for each row whose reply from ``server`` differs from the table."""
    mismatches = []
    for case, reply in zip(CASES, replies):
        expected = case.expected(server)
        if (reply.data, reply.closed) != expected:
            mismatches.append(
                "%s: %s sent %r%s, expected %r%s"
                % (
                    case.label,
                    server,
                    reply.data[:200],
                    " and closed" if reply.closed else "",
                    expected[0][:200],
                    " and closed" if expected[1] else "",
                )
            )
    return mismatches


class CaseTableTests(SynchronousTestCase):
    """The shape of :data:`CASES`."""

    def test_table_covers_both_protocols(self) -> None:
        self.assertGreaterEqual(len(TEXT_CASES), 30)
        self.assertGreaterEqual(len(BINARY_CASES), 20)

    def test_names_unique(self) -> None:
        names = [(case.protocol, case.name) for case in CASES]
        self.assertEqual(len(names), len(set(names)))

    def test_difference_rows_carry_memcached_reply(self) -> None:
        for case in CASES:
            if case.difference is None:
                self.assertIsNone(case.memcached_reply, case.name)
            else:
                self.assertIsNotNone(case.memcached_reply, case.name)
                self.assertNotEqual((case.reply, case.closes), case.expected("memcached"), case.name)

    def test_binary_rows_open_binary_connections(self) -> None:
        # Except the row that checks what a wrong first byte does.
        for case in BINARY_CASES:
            if case.name != "response magic first":
                self.assertEqual(case.request[0], 0x80, case.name)


class MalformedReplayTests(TestCase):
    """:data:`CASES` against an in-process kvdaemon and a memcached subprocess."""

    timeout = 60
    maxDiff = None

    @defer.inlineCallbacks
    def setUp(self):
        self.memcached = MemcachedProcess()
        self.addCleanup(self.memcached.stop)
        _, self.port = yield start_server(self)

    @defer.inlineCallbacks
    def test_replies_match_table_and_memcached(self):
        ours, reference = yield defer.gatherResults(
            [replay(self.port, "kvdaemon"), replay(self.memcached.port, "memcached")], consumeErrors=True
        )
        self.assertEqual(describe_mismatches(ours, "kvdaemon"), [])
        self.assertEqual(describe_mismatches(reference, "memcached"), [])

    @defer.inlineCallbacks
    def test_each_rejection_logged_once_with_peer(self):
        with capturedLogs() as events:
            replies = yield replay(self.port, "kvdaemon")
        wrong_counts = []
        for case, reply in zip(CASES, replies):
            peer = "tcp:127.0.0.1:%d" % (reply.local_port,)
            logged = [event.get("log_format") for event in events if event.get("peer") == peer]
            if len(logged) != case.rejections:
                wrong_counts.append("%s: expected %d events, got %r" % (case.label, case.rejections, logged))
        self.assertEqual(wrong_counts, [])

    @defer.inlineCallbacks
    def test_rejections_logged_below_error(self):
        with capturedLogs() as events:
            yield replay(self.port, "kvdaemon")
        too_severe = [
            event.get("log_format")
            for event in events
            if event["log_level"] not in (LogLevel.debug, LogLevel.info, LogLevel.warn) or "log_failure" in event
        ]
        self.assertEqual(too_severe, [])
        levels = {event["log_level"] for event in events if "peer" in event}
        self.assertLessEqual(levels, {LogLevel.info, LogLevel.warn})

    @defer.inlineCallbacks
    def test_stored_value_survives_replay(self):
        stored = yield send_case(self.port, text("store", b"set survivor 7 0 4\r\nkept\r\n", b"STORED\r\n"), "kvdaemon")
        self.assertEqual(stored.data, b"STORED\r\n")
        yield replay(self.port, "kvdaemon")
        read_back = yield send_case(
            self.port, text("read", b"get survivor\r\n", b"VALUE survivor 7 4\r\nkept\r\nEND\r\n"), "kvdaemon"
        )
        self.assertEqual(read_back.data, b"VALUE survivor 7 4\r\nkept\r\nEND\r\n")
