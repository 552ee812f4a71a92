"""
kvdaemon's binary protocol against a real memcached: the same raw packets
go to both servers and the responses must match, with CAS values reduced
to "zero or not" and statistics values compared only where both servers
count the same thing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from kvdaemon import Settings
from tests.binary_packets import converse, counter_extras, parse, request, storage_extras, u32
from tests.support import MemcachedProcess, start_server

GET, SET, ADD, REPLACE, DELETE, INCR, DECR, QUIT, FLUSH = range(9)
GETQ, NOOP, VERSION, GETK, GETKQ, APPEND, PREPEND, STAT = range(9, 17)
SETQ, ADDQ, REPLACEQ, DELETEQ, INCRQ, DECRQ, QUITQ, FLUSHQ, APPENDQ, PREPENDQ = range(0x11, 0x1B)
TOUCH, GAT, GATQ, GATK, GATKQ = 0x1C, 0x1D, 0x1E, 0x23, 0x24
SASL_LIST, SASL_AUTH, SASL_STEP = 0x20, 0x21, 0x22

#: The opaque of the NOOP that ends each exchange which keeps its connection.
SENTINEL = 0x5E5E5E5E

#: Larger than the 1 MiB item size limit both servers run with.
OVERSIZED = b"x" * (1024 * 1024 + 10)

#: Exchanges after which both servers keep the connection open, run in
#: order, so each finds the items that earlier exchanges stored.
OPEN_EXCHANGES = [
    ("version", request(VERSION, opaque=7)),
    ("set", request(SET, b"k", storage_extras(5, 0), b"val", opaque=9)),
    (
        "get family",
        request(GET, b"k", opaque=1)
        + request(GETK, b"k", opaque=2)
        + request(GETK, b"nokey", opaque=3)
        + request(GETQ, b"nokey", opaque=4)
        + request(GETKQ, b"k", opaque=5)
        + request(GET, b"nokey", opaque=6),
    ),
    (
        "add",
        request(ADD, b"k", storage_extras(1, 0), b"1", opaque=1)
        + request(ADDQ, b"k", storage_extras(), b"1", opaque=2)
        + request(ADD, b"fresh", storage_extras(), b"1", opaque=3)
        + request(ADDQ, b"fresh2", storage_extras(), b"1", opaque=4),
    ),
    (
        "replace",
        request(REPLACE, b"zz", storage_extras(1, 0), b"1", opaque=1)
        + request(REPLACEQ, b"zz", storage_extras(), b"1", opaque=2)
        + request(REPLACE, b"fresh", storage_extras(8, 0), b"2", opaque=3)
        + request(REPLACEQ, b"fresh", storage_extras(9, 0), b"3", opaque=4)
        + request(GET, b"fresh", opaque=5),
    ),
    (
        "cas",
        request(SET, b"k", storage_extras(1, 0), b"1", opaque=1, cas=123456)
        + request(SET, b"nope", storage_extras(1, 0), b"1", opaque=2, cas=123456)
        + request(ADD, b"new1", storage_extras(1, 0), b"1", opaque=3, cas=123456)
        + request(SETQ, b"k", storage_extras(), b"1", opaque=4, cas=123456),
    ),
    (
        "append and prepend",
        request(APPEND, b"k", b"", b"X", opaque=1)
        + request(APPENDQ, b"k", b"", b"Y", opaque=2)
        + request(PREPEND, b"k", b"", b"P", opaque=3)
        + request(PREPENDQ, b"k", b"", b"Q", opaque=4)
        + request(GET, b"k", opaque=5)
        + request(APPEND, b"miss", b"", b"X", opaque=6)
        + request(PREPENDQ, b"miss", b"", b"Y", opaque=7)
        + request(APPEND, b"k", b"", b"X", opaque=8, cas=999),
    ),
    (
        "incr and decr",
        request(INCR, b"ctr", counter_extras(5, 10, 0), opaque=1)
        + request(INCR, b"ctr", counter_extras(5, 10, 0), opaque=2)
        + request(DECR, b"ctr", counter_extras(100, 10, 0), opaque=3)
        + request(INCRQ, b"ctr", counter_extras(7, 10, 0), opaque=4)
        + request(DECRQ, b"ctr", counter_extras(1, 10, 0), opaque=5)
        + request(GET, b"ctr", opaque=6)
        + request(DECR, b"ctr2", counter_extras(1, 42, 0), opaque=7)
        + request(INCR, b"ctr", counter_extras(1), opaque=8, cas=3),
    ),
    (
        "incr without create",
        request(INCR, b"ctr3", counter_extras(5, 10, 0xFFFFFFFF), opaque=1)
        + request(INCRQ, b"ctr3", counter_extras(5, 10, 0xFFFFFFFF), opaque=2)
        + request(DECR, b"ctr3", counter_extras(5, 10, 0xFFFFFFFF), opaque=3),
    ),
    (
        "incr non-numeric",
        request(INCR, b"k", counter_extras(5, 10, 0), opaque=1)
        + request(DECRQ, b"k", counter_extras(5, 10, 0), opaque=2),
    ),
    (
        "delete",
        request(SET, b"d", storage_extras(), b"v", opaque=1)
        + request(DELETE, b"d", opaque=2)
        + request(DELETE, b"d", opaque=3)
        + request(DELETEQ, b"d", opaque=4)
        + request(SETQ, b"d", storage_extras(), b"v", opaque=5)
        + request(DELETEQ, b"d", opaque=6)
        + request(DELETE, b"k", opaque=7, cas=77),
    ),
    (
        "touch and gat",
        request(TOUCH, b"k", u32(100), opaque=1)
        + request(TOUCH, b"zzz", u32(100), opaque=2)
        + request(GAT, b"k", u32(100), opaque=3)
        + request(GATQ, b"k", u32(100), opaque=4)
        + request(GATK, b"k", u32(100), opaque=5)
        + request(GATKQ, b"k", u32(100), opaque=6)
        + request(GAT, b"m", u32(100), opaque=7)
        + request(GATQ, b"m", u32(100), opaque=8)
        + request(GATK, b"m", u32(100), opaque=9)
        + request(GATKQ, b"m", u32(100), opaque=10),
    ),
    (
        "too large",
        request(SET, b"big", storage_extras(), OVERSIZED, opaque=1)
        + request(SETQ, b"big", storage_extras(), OVERSIZED, opaque=2)
        + request(APPEND, b"k", b"", OVERSIZED, opaque=3)
        + request(GET, b"k", opaque=4),
    ),
    (
        "too large set removes the old item",
        request(SET, b"old", storage_extras(), b"v", opaque=1)
        + request(SET, b"old", storage_extras(), OVERSIZED, opaque=2)
        + request(GET, b"old", opaque=3),
    ),
    ("unknown opcodes", request(0x50, opaque=3) + request(0x1F, opaque=4) + request(0x25, opaque=5)),
    ("SASL opcodes with SASL off", request(SASL_LIST, opaque=5) + request(SASL_AUTH, b"PLAIN", b"", b"\0u\0p", opaque=6)),
    (
        "stat groups",
        request(STAT, b"reset", opaque=1)
        + request(STAT, b"bogus", opaque=2)
        + request(STAT, b"detail x", opaque=3)
        + request(STAT, b"conns", opaque=4),
    ),
    ("noop", request(NOOP, opaque=0xFFFFFFFF)),
    ("flush", request(FLUSH, opaque=1) + request(GET, b"k", opaque=2) + request(FLUSHQ, opaque=3)),
    ("flush with delay", request(SET, b"f", storage_extras(), b"v", opaque=1) + request(FLUSH, b"", u32(100), opaque=2) + request(GET, b"f", opaque=3)),
]

#: Exchanges after which both servers close the connection.
CLOSING_EXCHANGES = [
    ("quit", request(QUIT, opaque=5) + request(NOOP, opaque=6)),
    ("quitq", request(QUITQ, opaque=5) + request(NOOP, opaque=6)),
    ("key and extras longer than body", request(GET, b"k", key_length=5, body_length=1) + request(NOOP, opaque=4)),
    ("key over 250 bytes, get", request(GET, b"a" * 251, opaque=1) + request(NOOP, opaque=4)),
    ("key over 250 bytes, set", request(SET, b"a" * 251, storage_extras(), b"v", opaque=1)),
    ("get with extras", request(GET, b"k", b"xxxx", opaque=1) + request(NOOP, opaque=4)),
    ("incr with short extras", request(INCR, b"k", b"x" * 16, opaque=1)),
    ("append with extras", request(APPEND, b"k", b"xxxx", b"X", opaque=1)),
    ("touch without extras", request(TOUCH, b"k", opaque=1)),
    ("flush with key", request(FLUSH, b"k", opaque=1)),
    ("set without key", request(SET, b"", storage_extras(), b"x", opaque=5)),
    ("get without key", request(GET, b"", opaque=5)),
    ("noop with a value", request(NOOP, b"", b"", b"x", opaque=2)),
    ("version with a key", request(VERSION, b"k", opaque=5)),
    ("wrong magic after a request", request(NOOP, opaque=1) + request(GET, b"k", magic=0x81) + request(NOOP, opaque=2)),
]

#: Counters both servers keep the same way.
COUNTERS = [
    "cmd_get",
    "cmd_set",
    "cmd_flush",
    "cmd_touch",
    "get_hits",
    "get_misses",
    "delete_misses",
    "delete_hits",
    "incr_misses",
    "incr_hits",
    "decr_misses",
    "decr_hits",
    "cas_misses",
    "cas_hits",
    "cas_badval",
    "touch_hits",
    "touch_misses",
    "auth_cmds",
    "auth_errors",
]


def normalize(data: bytes, closed: bool) -> tuple[list[tuple], bool]:
    """Reduce an exchange's result to what both servers must agree on."""
    responses = [response._replace(cas=bool(response.cas)) for response in parse(data)]
    return [tuple(response) for response in responses], closed


def run_exchanges(port: int, exchanges: list[tuple[str, bytes]], closing: bool) -> list[tuple[str, object]]:
    """Run ``exchanges`` in order on fresh connections (blocking)."""
    results = []
    for name, data in exchanges:
        if closing:
            received, closed = converse(port, data, quiet_time=3.0)
        else:
            received, closed = converse(port, data + request(NOOP, opaque=SENTINEL), until_opaque=SENTINEL)
        results.append((name, normalize(received, closed)))
    return results


def read_stats(port: int, group: bytes = b"") -> list[tuple[bytes, bytes]]:
    """Return the (name, value) pairs of a stat request, terminator excluded (blocking)."""
    received, _ = converse(port, request(STAT, group, opaque=SENTINEL), until_opaque=None, quiet_time=0.5)
    responses = parse(received)
    assert responses[-1].key == b"", responses[-1]
    assert responses[-1].value == b"", responses[-1]
    return [(response.key, response.value) for response in responses[:-1]]


class ReferenceTestCase(TestCase):
    """A kvdaemon and a memcached, both fresh, on 127.0.0.1."""

    timeout = 120
    memcached_arguments: tuple[str, ...] = ()
    settings = Settings(threads=2)

    @defer.inlineCallbacks
    def setUp(self):
        self.memcached = self.start_memcached()
        self.addCleanup(self.memcached.stop)
        _, self.port = yield start_server(self, self.settings)

    def start_memcached(self) -> MemcachedProcess:
        return MemcachedProcess(*self.memcached_arguments)

    def on_both(self, function, *args) -> defer.Deferred:
        """Run a blocking ``function(port, *args)`` against both servers at once; fire with (memcached, kvdaemon)."""
        reference = threads.deferToThread(function, self.memcached.port, *args)
        ours = threads.deferToThread(function, self.port, *args)
        return defer.gatherResults([reference, ours])


class BinaryReferenceTests(ReferenceTestCase):
    @defer.inlineCallbacks
    def test_open_exchanges_match_memcached(self):
        reference, ours = yield self.on_both(run_exchanges, OPEN_EXCHANGES, False)
        for (name, expected), (_, actual) in zip(reference, ours):
            self.assertEqual(actual, expected, name)

    @defer.inlineCallbacks
    def test_closing_exchanges_match_memcached(self):
        reference, ours = yield self.on_both(run_exchanges, CLOSING_EXCHANGES, True)
        for (name, expected), (_, actual) in zip(reference, ours):
            self.assertEqual(actual, expected, name)
            self.assertTrue(actual[1], "%s: connection not closed" % name)

    @defer.inlineCallbacks
    def test_counters_match_memcached(self):
        yield self.on_both(run_exchanges, OPEN_EXCHANGES, False)
        reference, ours = yield self.on_both(read_stats)
        reference, ours = dict(reference), dict(ours)
        for name in COUNTERS:
            self.assertEqual(ours[name.encode()], reference[name.encode()], name)

    @defer.inlineCallbacks
    def test_stat_packets_shaped_like_memcached(self):
        expected_names = {
            b"": [b"pid", b"version", b"curr_connections", b"cmd_get", b"limit_maxbytes"],
            b"settings": [b"maxbytes", b"maxconns", b"item_size_max", b"cas_enabled"],
        }
        for group, names in expected_names.items():
            reference, ours = yield self.on_both(read_stats, group)
            reference_names = {name for name, _ in reference}
            our_names = {name for name, _ in ours}
            for name in names:
                self.assertIn(name, reference_names)
                self.assertIn(name, our_names)


def make_sasl_database(directory: str, user: str, password: str) -> str:
    """
    Write a Cyrus SASL configuration for memcached -S in ``directory`` and
    return it, for SASL_CONF_PATH.
    """
    saslpasswd2 = shutil.which("saslpasswd2") or "/usr/sbin/saslpasswd2"
    if not os.path.exists(saslpasswd2):
        raise RuntimeError("saslpasswd2 is not installed; .ci/run installs the Debian package sasl2-bin")
    database = os.path.join(directory, "sasldb2")
    subprocess.run(
        [saslpasswd2, "-p", "-c", "-a", "memcached", "-f", database, user],
        input=password.encode(),
        check=True,
    )
    with open(os.path.join(directory, "memcached.conf"), "w") as conf:
        conf.write("mech_list: plain\nsasldb_path: %s\n" % database)
    return directory


#: SASL exchanges, each on a fresh connection.
SASL_EXCHANGES = [
    ("list mechanisms", request(SASL_LIST, opaque=1) + request(NOOP, opaque=99)),
    ("version before auth", request(VERSION, opaque=1) + request(NOOP, opaque=99)),
    ("get before auth", request(GET, b"k", opaque=1) + request(NOOP, opaque=99)),
    ("stat before auth", request(STAT, opaque=1)),
    ("unknown opcode before auth", request(0x50, opaque=1)),
    ("body length error before auth", request(GET, b"k", key_length=5, body_length=1)),
    ("good credentials", request(SASL_AUTH, b"PLAIN", b"", b"\0alice\0secret", opaque=1) + request(GET, b"k", opaque=2) + request(NOOP, opaque=99)),
    ("wrong password", request(SASL_AUTH, b"PLAIN", b"", b"\0alice\0wrong", opaque=1) + request(NOOP, opaque=99)),
    ("unknown user", request(SASL_AUTH, b"PLAIN", b"", b"\0bob\0secret", opaque=1) + request(NOOP, opaque=99)),
    ("matching authzid", request(SASL_AUTH, b"PLAIN", b"", b"alice\0alice\0secret", opaque=1) + request(NOOP, opaque=99)),
    ("other authzid", request(SASL_AUTH, b"PLAIN", b"", b"bob\0alice\0secret", opaque=1) + request(NOOP, opaque=99)),
    ("lower-case mechanism", request(SASL_AUTH, b"plain", b"", b"\0alice\0secret", opaque=1) + request(NOOP, opaque=99)),
    ("three NULs", request(SASL_AUTH, b"PLAIN", b"", b"\0alice\0secret\0", opaque=1) + request(NOOP, opaque=99)),
    ("other mechanism", request(SASL_AUTH, b"CRAM-MD5", b"", b"", opaque=2) + request(NOOP, opaque=99)),
    (
        "empty auth then steps",
        request(SASL_AUTH, b"PLAIN", b"", b"", opaque=1)
        + request(SASL_STEP, b"PLAIN", b"", b"\0alice\0x", opaque=2)
        + request(SASL_STEP, b"PLAIN", b"", b"\0alice\0secret", opaque=3)
        + request(NOOP, opaque=99),
    ),
    ("step without auth", request(SASL_STEP, b"PLAIN", b"", b"\0alice\0secret", opaque=2) + request(NOOP, opaque=99)),
    (
        "step after success",
        request(SASL_AUTH, b"PLAIN", b"", b"\0alice\0secret", opaque=1)
        + request(SASL_STEP, b"PLAIN", b"", b"\0alice\0secret", opaque=2)
        + request(NOOP, opaque=99),
    ),
    (
        "list mechanisms after success",
        request(SASL_AUTH, b"PLAIN", b"", b"\0alice\0secret", opaque=1) + request(SASL_LIST, opaque=2) + request(GET, b"k", opaque=3),
    ),
    ("long mechanism name", request(SASL_AUTH, b"P" * 40, b"", b"\0alice\0secret", opaque=2) + request(NOOP, opaque=99)),
    ("no mechanism name", request(SASL_AUTH, b"", b"", b"\0alice\0secret", opaque=2) + request(NOOP, opaque=99)),
    ("oversized auth", request(SASL_AUTH, b"PLAIN", b"", OVERSIZED, opaque=1) + request(NOOP, opaque=99)),
    (
        "authenticated then flush and stat reset",
        request(SASL_AUTH, b"PLAIN", b"", b"\0alice\0secret", opaque=1)
        + request(FLUSH, opaque=2)
        + request(STAT, b"reset", opaque=3)
        + request(NOOP, opaque=99),
    ),
    ("text version", b"version\r\n"),
    ("text set", b"set foo 0 0 1\r\nx\r\n"),
    ("text get of 24 bytes or more", b"get foo bar baz qux quux corge\r\n"),
]


def run_sasl_exchanges(port: int) -> list[tuple[str, object]]:
    """Run :data:`SASL_EXCHANGES` on fresh connections (blocking)."""
    return [(name, normalize(*converse(port, data, quiet_time=0.5))) for name, data in SASL_EXCHANGES]


class SaslReferenceTests(ReferenceTestCase):
    memcached_arguments = ("-S",)
    settings = Settings(threads=2, sasl_users={b"alice": b"secret"})

    def start_memcached(self) -> MemcachedProcess:
        directory = make_sasl_database(tempfile.mkdtemp(), "alice", "secret")
        self.addCleanup(shutil.rmtree, directory)
        # memcached inherits this process's environment when it starts.
        previous = os.environ.get("SASL_CONF_PATH")
        os.environ["SASL_CONF_PATH"] = directory
        try:
            return MemcachedProcess(*self.memcached_arguments)
        finally:
            if previous is None:
                del os.environ["SASL_CONF_PATH"]
            else:
                os.environ["SASL_CONF_PATH"] = previous

    @defer.inlineCallbacks
    def test_sasl_exchanges_match_memcached(self):
        reference, ours = yield self.on_both(run_sasl_exchanges)
        for (name, expected), (_, actual) in zip(reference, ours):
            self.assertEqual(actual, expected, name)

    @defer.inlineCallbacks
    def test_sasl_counters_match_memcached(self):
        yield self.on_both(run_sasl_exchanges)
        authenticate = request(SASL_AUTH, b"PLAIN", b"", b"\0alice\0secret", opaque=1)
        reference, ours = yield self.on_both(
            lambda port: parse(converse(port, authenticate + request(STAT, opaque=2), quiet_time=0.5)[0])
        )
        reference = {r.key: r.value for r in reference[1:]}
        ours = {r.key: r.value for r in ours[1:]}
        for name in (b"auth_cmds", b"auth_errors"):
            self.assertEqual(ours[name], reference[name], name)
