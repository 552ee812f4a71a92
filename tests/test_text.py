"""
Unit tests for kvdaemon._text: every classic text command, its replies and
error paths, noreply, and request framing split at every byte boundary.

Connections run on ``StringTransport`` against a factory whose reactor is a
fake clock, so every test is synchronous and deterministic.
"""

from __future__ import annotations

from hypothesis import given, settings as hypothesis_settings, strategies as st
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from kvdaemon import KVDaemonFactory, Settings
from kvdaemon._version import PROTOCOL_VERSION
from tests.support import Client, FakeReactor, FakeThreadPool

#: A realistic Unix time, so that relative and absolute expiry times differ.
NOW = 1_700_000_000

TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
BAD_CHUNK = b"CLIENT_ERROR bad data chunk\r\n"
INVALID_EXPTIME = b"CLIENT_ERROR invalid exptime argument\r\n"
INVALID_DELTA = b"CLIENT_ERROR invalid numeric delta argument\r\n"
NON_NUMERIC = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
DELETE_USAGE = b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"


def make_factory(**settings) -> KVDaemonFactory:
    """Return a factory on a fake reactor whose clock reads ``NOW``."""
    settings.setdefault("threads", 1)
    reactor = FakeReactor()
    reactor.advance(NOW)
    return KVDaemonFactory(Settings(**settings), reactor=reactor, threadpool=FakeThreadPool())


class TextTestCase(SynchronousTestCase):
    """A factory and one connected client per test."""

    settings: dict = {}

    def setUp(self) -> None:
        self.factory = make_factory(**self.settings)
        self.reactor = self.factory.reactor
        self.client = Client(self.factory)

    def send(self, data: bytes) -> bytes:
        return self.client.send(data)

    def stats(self, client: Client | None = None) -> dict[bytes, bytes]:
        """Return ``stats`` as a name-to-value mapping."""
        output = (client or self.client).send(b"stats\r\n")
        self.assertTrue(output.endswith(b"END\r\n"), output)
        values = {}
        for line in output.split(b"\r\n")[:-2]:
            stat, name, value = line.split(b" ", 2)
            self.assertEqual(stat, b"STAT")
            values[name] = value
        return values


class StorageCommandTests(TextTestCase):
    """set, add, replace, append, prepend and cas."""

    def test_set_get(self) -> None:
        self.assertEqual(self.send(b"set k 5 0 3\r\nabc\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"get k\r\n"), b"VALUE k 5 3\r\nabc\r\nEND\r\n")

    def test_set_empty_value(self) -> None:
        self.assertEqual(self.send(b"set k 0 0 0\r\n\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"get k\r\n"), b"VALUE k 0 0\r\n\r\nEND\r\n")

    def test_value_with_crlf_inside(self) -> None:
        self.assertEqual(self.send(b"set k 0 0 8\r\nab\r\ncd\r\n\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"get k\r\n"), b"VALUE k 0 8\r\nab\r\ncd\r\n\r\nEND\r\n")

    def test_long_value_in_pieces(self) -> None:
        # A data block is read by its length, so its lack of newlines never
        # trips the 2048-byte line limit.
        chunks = [b"set k 0 0 5000\r\n" + b"v" * 100, b"v" * 2900, b"v" * 2000, b"\r\n"]
        self.assertEqual(self.client.send_chunks(chunks), b"STORED\r\n")
        self.assertFalse(self.client.closed)
        self.assertEqual(self.send(b"get k\r\n"), b"VALUE k 0 5000\r\n" + b"v" * 5000 + b"\r\nEND\r\n")

    def test_binary_value(self) -> None:
        value = bytes(range(256))
        self.assertEqual(self.send(b"set k 0 0 256\r\n" + value + b"\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"get k\r\n"), b"VALUE k 0 256\r\n" + value + b"\r\nEND\r\n")

    def test_flags_32_bits(self) -> None:
        self.assertEqual(self.send(b"set k 4294967295 0 1\r\nx\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"get k\r\n"), b"VALUE k 4294967295 1\r\nx\r\nEND\r\n")

    def test_flags_over_32_bits_rejected(self) -> None:
        # The data line is then read as a command, as memcached does.
        self.assertEqual(self.send(b"set k 4294967296 0 1\r\nx\r\n"), BAD_FORMAT + b"ERROR\r\n")
        self.assertEqual(self.send(b"get k\r\n"), b"END\r\n")

    def test_numbers_read_like_strtol(self) -> None:
        self.assertEqual(self.send(b"set k +7 +0 +1\r\nx\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"set j 0 0 1\r\r\ny\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"get k j\r\n"), b"VALUE k 7 1\r\nx\r\nVALUE j 0 1\r\ny\r\nEND\r\n")

    def test_negative_flags_and_cas_wrap_like_strtoull(self) -> None:
        # "-18446744073709551615" is 1 modulo 2**64.  "-1" wraps to 2**64 - 1,
        # which memcached 1.6.18 rejects because of its minus sign.
        self.assertEqual(self.send(b"set k -18446744073709551615 0 1\r\nx\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"gets k\r\n"), b"VALUE k 1 1 1\r\nx\r\nEND\r\n")
        self.assertEqual(self.send(b"cas k 0 0 1 -18446744073709551615\r\ny\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"set k -1 0 1\r\nx\r\n"), BAD_FORMAT + b"ERROR\r\n")
        self.assertEqual(self.send(b"cas k 0 0 1 -1\r\nx\r\n"), BAD_FORMAT + b"ERROR\r\n")

    def test_add(self) -> None:
        self.assertEqual(self.send(b"add k 0 0 1\r\na\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"add k 0 0 1\r\nb\r\n"), b"NOT_STORED\r\n")
        self.assertEqual(self.send(b"get k\r\n"), b"VALUE k 0 1\r\na\r\nEND\r\n")

    def test_replace(self) -> None:
        self.assertEqual(self.send(b"replace k 0 0 1\r\na\r\n"), b"NOT_STORED\r\n")
        self.send(b"set k 0 0 1\r\na\r\n")
        self.assertEqual(self.send(b"replace k 3 0 1\r\nb\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"get k\r\n"), b"VALUE k 3 1\r\nb\r\nEND\r\n")

    def test_append_prepend(self) -> None:
        self.assertEqual(self.send(b"append k 0 0 1\r\na\r\n"), b"NOT_STORED\r\n")
        self.assertEqual(self.send(b"prepend k 0 0 1\r\na\r\n"), b"NOT_STORED\r\n")
        self.send(b"set k 9 0 3\r\nmid\r\n")
        self.assertEqual(self.send(b"append k 1 0 1\r\n>\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"prepend k 2 0 1\r\n<\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"get k\r\n"), b"VALUE k 9 5\r\n<mid>\r\nEND\r\n")

    def test_cas(self) -> None:
        self.assertEqual(self.send(b"cas k 0 0 1 1\r\na\r\n"), b"NOT_FOUND\r\n")
        self.send(b"set k 0 0 1\r\na\r\n")
        header = self.send(b"gets k\r\n").split(b"\r\n")[0]
        unique = int(header.split()[4])
        self.assertEqual(self.send(b"cas k 0 0 1 %d\r\nb\r\n" % (unique + 1)), b"EXISTS\r\n")
        self.assertEqual(self.send(b"cas k 0 0 1 %d\r\nb\r\n" % unique), b"STORED\r\n")
        self.assertEqual(self.send(b"cas k 0 0 1 %d\r\nc\r\n" % unique), b"EXISTS\r\n")
        self.assertEqual(self.send(b"get k\r\n"), b"VALUE k 0 1\r\nb\r\nEND\r\n")

    def test_cas_unique_changes_on_every_store(self) -> None:
        uniques = []
        for value in [b"1", b"2", b"3"]:
            self.send(b"set k 0 0 1\r\n" + value + b"\r\n")
            uniques.append(int(self.send(b"gets k\r\n").split(b"\r\n")[0].split()[4]))
        self.assertEqual(len(set(uniques)), 3)
        self.assertEqual(uniques, sorted(uniques))

    def test_cas_unique_over_64_bits_rejected(self) -> None:
        self.assertEqual(self.send(b"cas k 0 0 1 18446744073709551616\r\nx\r\n"), BAD_FORMAT + b"ERROR\r\n")
        self.assertEqual(self.send(b"cas k 0 0 1 18446744073709551615\r\nx\r\n"), b"NOT_FOUND\r\n")

    def test_wrong_token_count_error(self) -> None:
        for line in [
            b"set k 0 0",
            b"set k 0 0 1 noreply extra",
            b"add k",
            b"replace",
            b"append k 0",
            b"prepend k 0 0 1 x y",
            b"cas k 0 0 1",
            b"cas k 0 0 1 1 noreply x",
        ]:
            self.assertEqual(self.send(line + b"\r\n"), b"ERROR\r\n", line)

    def test_malformed_numbers_bad_format(self) -> None:
        for line in [
            b"set k x 0 1",
            b"set k -1 0 1",
            b"set k 1.5 0 1",
            b"set k 0 x 1",
            b"set k 0 2147483648 1",
            b"set k 0 0 x",
            b"set k 0 0 -1",
            b"set k 0 0 2147483646",
            b"cas k 0 0 1 x",
            b"cas k 0 0 1 -1",
        ]:
            self.assertEqual(self.send(line + b"\r\n"), BAD_FORMAT, line)
        self.assertEqual(self.send(b"get k\r\n"), b"END\r\n")

    def test_unknown_last_token_ignored(self) -> None:
        self.assertEqual(self.send(b"set k 0 0 1 norepl\r\nx\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"cas k 0 0 1 999 whatever\r\nx\r\n"), b"EXISTS\r\n")

    def test_extra_spaces_ignored(self) -> None:
        self.assertEqual(self.send(b"  set   k  0 0 1  \r\nx\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"get  k \r\n"), b"VALUE k 0 1\r\nx\r\nEND\r\n")

    def test_bare_newline_accepted(self) -> None:
        self.assertEqual(self.send(b"set k 0 0 1\nx\r\nget k\n"), b"STORED\r\nVALUE k 0 1\r\nx\r\nEND\r\n")

    def test_noreply(self) -> None:
        self.send(b"set k 0 0 1\r\n1\r\n")
        for request in [
            b"set k 0 0 1 noreply\r\n2\r\n",
            b"add k 0 0 1 noreply\r\nx\r\n",
            b"add n 0 0 1 noreply\r\nn\r\n",
            b"replace k 0 0 1 noreply\r\n3\r\n",
            b"replace missing 0 0 1 noreply\r\nx\r\n",
            b"append k 0 0 1 noreply\r\n4\r\n",
            b"prepend k 0 0 1 noreply\r\n5\r\n",
            b"cas k 0 0 1 1 noreply\r\nx\r\n",
            b"cas missing 0 0 1 1 noreply\r\nx\r\n",
        ]:
            self.assertEqual(self.send(request), b"", request)
        self.assertEqual(self.send(b"get k n\r\n"), b"VALUE k 0 3\r\n534\r\nVALUE n 0 1\r\nn\r\nEND\r\n")

    def test_noreply_suppresses_errors(self) -> None:
        # memcached checks the last token first and then suppresses every
        # reply, errors included; the data line is then read as a command.
        self.assertEqual(self.send(b"set k x 0 1 noreply\r\n"), b"")
        self.assertEqual(self.send(b"set k 0 0 noreply\r\n"), b"")
        self.assertEqual(self.send(b"set k 0 0 1 noreply\r\nxyz"), b"")
        self.assertEqual(self.send(b"get k\r\n"), b"END\r\n")

    def test_stored_data_stats(self) -> None:
        self.send(b"set a 0 0 1\r\n1\r\nadd a 0 0 1\r\n2\r\nset b 0 0 2\r\n22\r\n")
        self.send(b"cas a 0 0 1 12345\r\nx\r\ncas z 0 0 1 1\r\nx\r\n")
        stats = self.stats()
        self.assertEqual(stats[b"cmd_set"], b"5")
        self.assertEqual(stats[b"curr_items"], b"2")
        self.assertEqual(stats[b"total_items"], b"2")
        self.assertEqual(stats[b"cas_badval"], b"1")
        self.assertEqual(stats[b"cas_misses"], b"1")
        self.assertEqual(stats[b"cas_hits"], b"0")


class ItemSizeLimitTests(TextTestCase):
    """Values over the item size limit."""

    settings = {"max_item_size": 2048}

    def test_too_large_swallows_data(self) -> None:
        value = b"x" * 3000
        self.assertEqual(self.send(b"set k 0 0 3000\r\n" + value + b"\r\nget k\r\n"), TOO_LARGE + b"END\r\n")

    def test_too_large_set_removes_old(self) -> None:
        self.send(b"set k 0 0 3\r\nold\r\n")
        self.assertEqual(self.send(b"set k 0 0 3000\r\n" + b"x" * 3000 + b"\r\n"), TOO_LARGE)
        self.assertEqual(self.send(b"get k\r\n"), b"END\r\n")

    def test_too_large_other_modes_keep_old(self) -> None:
        self.send(b"set k 0 0 3\r\nold\r\n")
        for command in [b"add", b"replace", b"append", b"prepend"]:
            request = command + b" k 0 0 3000\r\n" + b"x" * 3000 + b"\r\n"
            self.assertEqual(self.send(request), TOO_LARGE, command)
        self.assertEqual(self.send(b"cas k 0 0 3000 1\r\n" + b"x" * 3000 + b"\r\n"), TOO_LARGE)
        self.assertEqual(self.send(b"get k\r\n"), b"VALUE k 0 3\r\nold\r\nEND\r\n")

    def test_too_large_swallow_split_across_reads(self) -> None:
        chunks = [b"set k 0 0 3000\r\n", b"x" * 1000, b"x" * 1000, b"x" * 1000 + b"\r", b"\nget k\r\n"]
        self.assertEqual(self.client.send_chunks(chunks), TOO_LARGE + b"END\r\n")

    def test_too_large_swallow_long_read_kept_open(self) -> None:
        # The swallowed block has no newline for far more than 2048 bytes.
        self.assertEqual(self.send(b"set k 0 0 5000\r\n"), TOO_LARGE)
        self.assertEqual(self.send(b"x" * 5000), b"")
        self.assertFalse(self.client.closed)
        self.assertEqual(self.send(b"\r\nget k\r\n"), b"END\r\n")

    def test_too_large_noreply(self) -> None:
        self.send(b"set k 0 0 3\r\nold\r\n")
        self.assertEqual(self.send(b"set k 0 0 3000 noreply\r\n" + b"x" * 3000 + b"\r\n"), b"")
        self.assertEqual(self.send(b"get k\r\n"), b"END\r\n")

    def test_limit_counts_key_and_flags(self) -> None:
        # 2048 - 59 bytes of memcached's item overhead - 1 key byte.
        self.assertEqual(self.send(b"set k 0 0 1988\r\n" + b"x" * 1988 + b"\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"set k 0 0 1989\r\n" + b"x" * 1989 + b"\r\n"), TOO_LARGE)
        self.assertEqual(self.send(b"set k 1 0 1985\r\n" + b"x" * 1985 + b"\r\n"), TOO_LARGE)

    def test_append_past_limit_not_stored(self) -> None:
        self.send(b"set k 0 0 1900\r\n" + b"x" * 1900 + b"\r\n")
        self.assertEqual(self.send(b"append k 0 0 100\r\n" + b"y" * 100 + b"\r\n"), b"NOT_STORED\r\n")
        self.assertEqual(len(self.send(b"get k\r\n")), len(b"VALUE k 0 1900\r\n\r\nEND\r\n") + 1900)

    def test_too_large_counted(self) -> None:
        self.send(b"set k 0 0 3000\r\n" + b"x" * 3000 + b"\r\n")
        stats = self.stats()
        self.assertEqual(stats[b"store_too_large"], b"1")
        self.assertEqual(stats[b"cmd_set"], b"0")


class KeyLengthTests(TextTestCase):
    """Keys of up to 250 bytes."""

    def test_250_byte_key(self) -> None:
        key = b"k" * 250
        self.assertEqual(self.send(b"set " + key + b" 0 0 1\r\nx\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"get " + key + b"\r\n"), b"VALUE " + key + b" 0 1\r\nx\r\nEND\r\n")
        self.assertEqual(self.send(b"delete " + key + b"\r\n"), b"DELETED\r\n")

    def test_251_byte_key_rejected(self) -> None:
        key = b"k" * 251
        for request in [
            b"get " + key,
            b"gets a " + key,
            b"gat 0 " + key,
            b"gats 0 a " + key,
            b"delete " + key,
            b"incr " + key + b" 1",
            b"decr " + key + b" 1",
            b"touch " + key + b" 1",
        ]:
            self.assertEqual(self.send(request + b"\r\n"), BAD_FORMAT, request[:8])
        for command in [b"set", b"add", b"replace", b"append", b"prepend"]:
            request = command + b" " + key + b" 0 0 1\r\nx\r\n"
            self.assertEqual(self.send(request), BAD_FORMAT + b"ERROR\r\n", command)
        self.assertEqual(self.send(b"cas " + key + b" 0 0 1 1\r\nx\r\n"), BAD_FORMAT + b"ERROR\r\n")

    def test_long_key_in_get_drops_partial_reply(self) -> None:
        self.send(b"set a 0 0 1\r\nx\r\n")
        self.assertEqual(self.send(b"get a " + b"k" * 251 + b" a\r\n"), BAD_FORMAT)

    def test_key_bytes_kept_verbatim(self) -> None:
        key = b"\xff\x01k\ttab"
        self.assertEqual(self.send(b"set " + key + b" 0 0 1\r\nx\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"get " + key + b"\r\n"), b"VALUE " + key + b" 0 1\r\nx\r\nEND\r\n")

    def test_nul_ends_request_line(self) -> None:
        self.assertEqual(self.send(b"set a\x00b 0 0 1\r\nx\r\n"), b"ERROR\r\nERROR\r\n")
        self.send(b"set a 0 0 1\r\nx\r\n")
        self.assertEqual(self.send(b"get a\x00 b\r\n"), b"VALUE a 0 1\r\nx\r\nEND\r\n")


class RetrievalCommandTests(TextTestCase):
    """get, gets, gat and gats."""

    def setUp(self) -> None:
        super().setUp()
        self.send(b"set a 1 0 1\r\nA\r\nset b 2 100 2\r\nBB\r\n")

    def test_get_many_keys_in_request_order(self) -> None:
        self.assertEqual(
            self.send(b"get b missing a b\r\n"),
            b"VALUE b 2 2\r\nBB\r\nVALUE a 1 1\r\nA\r\nVALUE b 2 2\r\nBB\r\nEND\r\n",
        )

    def test_get_miss(self) -> None:
        self.assertEqual(self.send(b"get missing\r\n"), b"END\r\n")

    def test_get_without_key_error(self) -> None:
        self.assertEqual(self.send(b"get\r\n"), b"ERROR\r\n")
        self.assertEqual(self.send(b"gets \r\n"), b"ERROR\r\n")
        self.assertEqual(self.send(b"gat\r\n"), b"ERROR\r\n")

    def test_get_hundreds_of_keys(self) -> None:
        keys = [b"k%d" % i for i in range(500)]
        self.send(b"set k7 0 0 1\r\n7\r\nset k499 0 0 1\r\n9\r\n")
        self.assertEqual(
            self.send(b"get " + b" ".join(keys) + b"\r\n"),
            b"VALUE k7 0 1\r\n7\r\nVALUE k499 0 1\r\n9\r\nEND\r\n",
        )

    def test_gets_returns_cas(self) -> None:
        output = self.send(b"gets a b\r\n")
        lines = output.split(b"\r\n")
        self.assertEqual(lines[0].split()[:4], [b"VALUE", b"a", b"1", b"1"])
        self.assertEqual(lines[2].split()[:4], [b"VALUE", b"b", b"2", b"2"])
        self.assertNotEqual(lines[0].split()[4], lines[2].split()[4])
        self.assertTrue(output.endswith(b"END\r\n"))

    def test_gat_touches_and_returns(self) -> None:
        self.assertEqual(self.send(b"gat 10 a missing b\r\n"), b"VALUE a 1 1\r\nA\r\nVALUE b 2 2\r\nBB\r\nEND\r\n")
        self.reactor.advance(10)
        self.assertEqual(self.send(b"get a b\r\n"), b"END\r\n")

    def test_gats_returns_cas(self) -> None:
        gets = self.send(b"gets a\r\n")
        self.assertEqual(self.send(b"gats 0 a\r\n"), gets)

    def test_gat_without_key(self) -> None:
        self.assertEqual(self.send(b"gat 10\r\n"), b"END\r\n")

    def test_gat_bad_exptime(self) -> None:
        self.assertEqual(self.send(b"gat a\r\n"), INVALID_EXPTIME)
        self.assertEqual(self.send(b"gats x a\r\n"), INVALID_EXPTIME)

    def test_gat_negative_expires(self) -> None:
        self.assertEqual(self.send(b"gat -1 a\r\n"), b"VALUE a 1 1\r\nA\r\nEND\r\n")
        self.assertEqual(self.send(b"get a\r\n"), b"END\r\n")

    def test_retrieval_stats(self) -> None:
        self.send(b"get a missing\r\ngets b\r\ngat 0 a missing\r\ngats 0 b\r\n")
        stats = self.stats()
        self.assertEqual(stats[b"cmd_get"], b"3")
        self.assertEqual(stats[b"get_hits"], b"2")
        self.assertEqual(stats[b"get_misses"], b"1")
        self.assertEqual(stats[b"cmd_touch"], b"3")
        self.assertEqual(stats[b"touch_hits"], b"2")
        self.assertEqual(stats[b"touch_misses"], b"1")


class ExpiryTests(TextTestCase):
    """Relative, absolute and negative expiry times."""

    def test_relative(self) -> None:
        self.send(b"set k 0 10 1\r\nx\r\n")
        self.reactor.advance(9)
        self.assertEqual(self.send(b"get k\r\n"), b"VALUE k 0 1\r\nx\r\nEND\r\n")
        self.reactor.advance(1)
        self.assertEqual(self.send(b"get k\r\n"), b"END\r\n")

    def test_thirty_days_relative(self) -> None:
        self.send(b"set k 0 2592000 1\r\nx\r\n")
        self.reactor.advance(2592000 - 1)
        self.assertEqual(self.send(b"get k\r\n"), b"VALUE k 0 1\r\nx\r\nEND\r\n")

    def test_absolute_past_thirty_days(self) -> None:
        self.send(b"set k 0 %d 1\r\nx\r\n" % (NOW + 100))
        self.send(b"set old 0 2592001 1\r\nx\r\n")
        self.assertEqual(self.send(b"get k old\r\n"), b"VALUE k 0 1\r\nx\r\nEND\r\n")
        self.reactor.advance(100)
        self.assertEqual(self.send(b"get k\r\n"), b"END\r\n")

    def test_negative_expires_now(self) -> None:
        self.send(b"set k 0 0 3\r\nold\r\n")
        self.assertEqual(self.send(b"set k 0 -1 1\r\nx\r\n"), b"STORED\r\n")
        self.assertEqual(self.send(b"get k\r\n"), b"END\r\n")

    def test_expired_lookups_counted(self) -> None:
        self.send(b"set k 0 1 1\r\nx\r\n")
        self.reactor.advance(1)
        self.send(b"get k\r\n")
        self.assertEqual(self.stats()[b"get_expired"], b"1")


class DeleteTests(TextTestCase):
    """delete and its old forms."""

    def setUp(self) -> None:
        super().setUp()
        self.send(b"set k 0 0 1\r\nx\r\n")

    def test_delete(self) -> None:
        self.assertEqual(self.send(b"delete k\r\n"), b"DELETED\r\n")
        self.assertEqual(self.send(b"delete k\r\n"), b"NOT_FOUND\r\n")
        self.assertEqual(self.send(b"get k\r\n"), b"END\r\n")

    def test_delete_zero_hold(self) -> None:
        self.assertEqual(self.send(b"delete k 0\r\n"), b"DELETED\r\n")

    def test_delete_noreply(self) -> None:
        self.assertEqual(self.send(b"delete k noreply\r\n"), b"")
        self.assertEqual(self.send(b"delete k 0 noreply\r\n"), b"")
        self.assertEqual(self.send(b"get k\r\n"), b"END\r\n")

    def test_delete_bad_forms(self) -> None:
        for line in [b"delete k 1", b"delete k x", b"delete k noreply 0", b"delete k 0 0"]:
            self.assertEqual(self.send(line + b"\r\n"), DELETE_USAGE, line)
        self.assertEqual(self.send(b"delete k 1 noreply\r\n"), b"")
        self.assertEqual(self.send(b"delete\r\n"), b"ERROR\r\n")
        self.assertEqual(self.send(b"delete k 0 noreply x\r\n"), b"ERROR\r\n")
        self.assertEqual(self.send(b"get k\r\n"), b"VALUE k 0 1\r\nx\r\nEND\r\n")

    def test_delete_stats(self) -> None:
        self.send(b"delete k\r\ndelete k\r\n")
        stats = self.stats()
        self.assertEqual(stats[b"delete_hits"], b"1")
        self.assertEqual(stats[b"delete_misses"], b"1")


class ArithmeticTests(TextTestCase):
    """incr and decr."""

    def test_incr_decr(self) -> None:
        self.send(b"set n 0 0 2\r\n10\r\n")
        self.assertEqual(self.send(b"incr n 5\r\n"), b"15\r\n")
        self.assertEqual(self.send(b"decr n 3\r\n"), b"12\r\n")
        self.assertEqual(self.send(b"get n\r\n"), b"VALUE n 0 2\r\n12\r\nEND\r\n")

    def test_incr_wraps_at_2_64(self) -> None:
        self.send(b"set n 0 0 20\r\n18446744073709551615\r\n")
        self.assertEqual(self.send(b"incr n 1\r\n"), b"0\r\n")
        self.assertEqual(self.send(b"get n\r\n"), b"VALUE n 0 20\r\n0" + b" " * 19 + b"\r\nEND\r\n")
        self.assertEqual(self.send(b"incr n 18446744073709551615\r\n"), b"18446744073709551615\r\n")

    def test_decr_stops_at_zero(self) -> None:
        self.send(b"set n 0 0 1\r\n5\r\n")
        self.assertEqual(self.send(b"decr n 100\r\n"), b"0\r\n")
        self.assertEqual(self.send(b"decr n 1\r\n"), b"0\r\n")

    def test_shorter_result_padded(self) -> None:
        self.send(b"set n 7 0 3\r\n100\r\n")
        self.assertEqual(self.send(b"decr n 1\r\n"), b"99\r\n")
        self.assertEqual(self.send(b"get n\r\n"), b"VALUE n 7 3\r\n99 \r\nEND\r\n")
        self.assertEqual(self.send(b"incr n 901\r\n"), b"1000\r\n")
        self.assertEqual(self.send(b"get n\r\n"), b"VALUE n 7 4\r\n1000\r\nEND\r\n")

    def test_missing_key(self) -> None:
        self.assertEqual(self.send(b"incr n 1\r\n"), b"NOT_FOUND\r\n")
        self.assertEqual(self.send(b"decr n 1\r\n"), b"NOT_FOUND\r\n")

    def test_non_numeric_value(self) -> None:
        for value in [b"abc", b"", b"-1", b"1x", b"18446744073709551616"]:
            self.send(b"set n 0 0 %d\r\n%s\r\n" % (len(value), value))
            self.assertEqual(self.send(b"incr n 1\r\n"), NON_NUMERIC, value)
            self.assertEqual(self.send(b"decr n 1\r\n"), NON_NUMERIC, value)

    def test_non_numeric_value_logged_with_peer(self) -> None:
        self.send(b"set n 0 0 3\r\nabc\r\n")
        with capturedLogs() as events:
            self.send(b"incr n 1\r\n")
        logged = [event for event in events if event.get("peer") == "tcp:127.0.0.1:40000"]
        self.assertEqual([event["command"] for event in logged], ["incr"])

    def test_value_read_like_strtoull(self) -> None:
        self.send(b"set n 0 0 8\r\n 5 apple\r\n")
        self.assertEqual(self.send(b"incr n 1\r\n"), b"6\r\n")
        self.assertEqual(self.send(b"get n\r\n"), b"VALUE n 0 8\r\n6       \r\nEND\r\n")

    def test_invalid_delta(self) -> None:
        self.send(b"set n 0 0 1\r\n5\r\n")
        for delta in [b"x", b"-1", b"1.5", b"18446744073709551616"]:
            self.assertEqual(self.send(b"incr n " + delta + b"\r\n"), INVALID_DELTA, delta)
        self.assertEqual(self.send(b"incr n +2\r\n"), b"7\r\n")

    def test_negative_delta_wraps_like_strtoull(self) -> None:
        # memcached 1.6.18 reads a minus sign as C's strtoull does, modulo
        # 2**64, and rejects the result only from 2**63 up.
        self.send(b"set n 0 0 1\r\n5\r\n")
        self.assertEqual(self.send(b"incr n -18446744073709551615\r\n"), b"6\r\n")
        self.assertEqual(self.send(b"decr n -18446744073709551614\r\n"), b"4\r\n")
        self.assertEqual(self.send(b"incr n -9223372036854775808\r\n"), INVALID_DELTA)
        self.assertEqual(self.send(b"incr n -18446744073709551616\r\n"), INVALID_DELTA)
        self.assertEqual(self.send(b"decr n -9223372036854775809\r\n"), b"0\r\n")

    def test_token_count(self) -> None:
        self.send(b"set n 0 0 1\r\n5\r\n")
        self.assertEqual(self.send(b"incr n\r\n"), b"ERROR\r\n")
        self.assertEqual(self.send(b"decr n 1 noreply x\r\n"), b"ERROR\r\n")
        self.assertEqual(self.send(b"incr n 1 x\r\n"), b"6\r\n")

    def test_noreply(self) -> None:
        self.send(b"set n 0 0 1\r\n5\r\n")
        self.assertEqual(self.send(b"incr n 10 noreply\r\n"), b"")
        self.assertEqual(self.send(b"decr n 1 noreply\r\n"), b"")
        self.assertEqual(self.send(b"incr missing 1 noreply\r\n"), b"")
        self.assertEqual(self.send(b"incr n x noreply\r\n"), b"")
        self.assertEqual(self.send(b"get n\r\n"), b"VALUE n 0 2\r\n14\r\nEND\r\n")

    def test_arithmetic_stats(self) -> None:
        self.send(b"set n 0 0 1\r\n5\r\nincr n 1\r\nincr m 1\r\ndecr n 1\r\ndecr m 1\r\ndecr m 1\r\n")
        stats = self.stats()
        self.assertEqual(stats[b"incr_hits"], b"1")
        self.assertEqual(stats[b"incr_misses"], b"1")
        self.assertEqual(stats[b"decr_hits"], b"1")
        self.assertEqual(stats[b"decr_misses"], b"2")


class TouchTests(TextTestCase):
    """touch."""

    def test_touch(self) -> None:
        self.send(b"set k 0 10 1\r\nx\r\n")
        self.assertEqual(self.send(b"touch k 100\r\n"), b"TOUCHED\r\n")
        self.reactor.advance(50)
        self.assertEqual(self.send(b"get k\r\n"), b"VALUE k 0 1\r\nx\r\nEND\r\n")
        self.assertEqual(self.send(b"touch missing 10\r\n"), b"NOT_FOUND\r\n")

    def test_touch_noreply(self) -> None:
        self.send(b"set k 0 0 1\r\nx\r\n")
        self.assertEqual(self.send(b"touch k -1 noreply\r\n"), b"")
        self.assertEqual(self.send(b"get k\r\n"), b"END\r\n")

    def test_touch_errors(self) -> None:
        self.assertEqual(self.send(b"touch k\r\n"), b"ERROR\r\n")
        self.assertEqual(self.send(b"touch k x\r\n"), INVALID_EXPTIME)
        self.assertEqual(self.send(b"touch k 1 2 3\r\n"), b"ERROR\r\n")
        self.assertEqual(self.send(b"touch k 1 x\r\n"), b"NOT_FOUND\r\n")


class FlushAllTests(TextTestCase):
    """flush_all [delay] [noreply]."""

    def setUp(self) -> None:
        super().setUp()
        self.send(b"set k 0 0 1\r\nx\r\n")

    def test_flush_now(self) -> None:
        self.assertEqual(self.send(b"flush_all\r\n"), b"OK\r\n")
        self.assertEqual(self.send(b"get k\r\n"), b"END\r\n")

    def test_flush_noreply(self) -> None:
        self.assertEqual(self.send(b"flush_all noreply\r\n"), b"")
        self.assertEqual(self.send(b"get k\r\n"), b"END\r\n")

    def test_flush_delayed(self) -> None:
        # Like memcached, "flush_all N" invalidates items from N - 1 seconds on.
        self.assertEqual(self.send(b"flush_all 10\r\n"), b"OK\r\n")
        self.reactor.advance(8)
        self.assertEqual(self.send(b"get k\r\n"), b"VALUE k 0 1\r\nx\r\nEND\r\n")
        self.reactor.advance(1)
        self.assertEqual(self.send(b"get k\r\n"), b"END\r\n")
        self.assertEqual(self.stats()[b"get_flushed"], b"1")

    def test_flush_delayed_noreply(self) -> None:
        self.assertEqual(self.send(b"flush_all 10 noreply\r\n"), b"")
        self.reactor.advance(10)
        self.assertEqual(self.send(b"get k\r\n"), b"END\r\n")

    def test_flush_bad_delay(self) -> None:
        self.assertEqual(self.send(b"flush_all x\r\n"), INVALID_EXPTIME)
        self.assertEqual(self.send(b"flush_all x noreply\r\n"), b"")
        self.assertEqual(self.send(b"flush_all noreply x\r\n"), INVALID_EXPTIME)
        self.assertEqual(self.send(b"flush_all 1 2 3\r\n"), b"ERROR\r\n")
        self.assertEqual(self.send(b"get k\r\n"), b"VALUE k 0 1\r\nx\r\nEND\r\n")

    def test_flush_counted(self) -> None:
        self.send(b"flush_all\r\nflush_all x\r\n")
        self.assertEqual(self.stats()[b"cmd_flush"], b"2")


class DisabledFlushTests(TextTestCase):
    """flush_all when destructive commands are turned off."""

    settings = {"allow_destructive": False}

    def test_flush_rejected(self) -> None:
        self.send(b"set k 0 0 1\r\nx\r\n")
        self.assertEqual(self.send(b"flush_all\r\n"), b"CLIENT_ERROR flush_all not allowed\r\n")
        self.assertEqual(self.send(b"flush_all noreply\r\n"), b"")
        self.assertEqual(self.send(b"get k\r\n"), b"VALUE k 0 1\r\nx\r\nEND\r\n")
        self.assertEqual(self.stats()[b"cmd_flush"], b"2")


class ServerCommandTests(TextTestCase):
    """version, verbosity, quit and stats."""

    def test_version(self) -> None:
        self.assertEqual(self.send(b"version\r\n"), b"VERSION " + PROTOCOL_VERSION + b"\r\n")
        self.assertEqual(self.send(b"version x\r\n"), b"VERSION " + PROTOCOL_VERSION + b"\r\n")

    def test_verbosity(self) -> None:
        self.assertEqual(self.send(b"verbosity 1\r\n"), b"OK\r\n")
        self.assertEqual(self.factory.verbosity, 1)
        self.assertEqual(self.send(b"verbosity 9 noreply\r\n"), b"")
        self.assertEqual(self.factory.verbosity, 2)
        self.assertEqual(self.send(b"verbosity 0 x\r\n"), b"OK\r\n")
        self.assertEqual(self.factory.verbosity, 0)

    def test_verbosity_errors(self) -> None:
        self.assertEqual(self.send(b"verbosity\r\n"), b"ERROR\r\n")
        self.assertEqual(self.send(b"verbosity 1 2 3\r\n"), b"ERROR\r\n")
        self.assertEqual(self.send(b"verbosity x\r\n"), BAD_FORMAT)
        self.assertEqual(self.send(b"verbosity -1\r\n"), BAD_FORMAT)
        self.assertEqual(self.send(b"verbosity noreply\r\n"), b"")

    def test_quit_closes(self) -> None:
        self.send(b"set k 0 0 1\r\nx\r\n")
        self.assertEqual(self.send(b"get k\r\nquit\r\nget k\r\n"), b"VALUE k 0 1\r\nx\r\nEND\r\n")
        self.assertTrue(self.client.closed)

    def test_stats_general(self) -> None:
        self.send(b"set k 0 0 5\r\nvalue\r\n")
        stats = self.stats()
        names = list(stats)
        self.assertEqual(names[:4], [b"pid", b"uptime", b"time", b"version"])
        self.assertEqual(stats[b"time"], b"%d" % NOW)
        self.assertEqual(stats[b"version"], PROTOCOL_VERSION)
        for name in [
            b"curr_connections",
            b"total_connections",
            b"cmd_get",
            b"cmd_set",
            b"get_hits",
            b"get_misses",
            b"get_expired",
            b"get_flushed",
            b"store_too_large",
            b"bytes_read",
            b"bytes_written",
            b"limit_maxbytes",
            b"threads",
            b"bytes",
            b"curr_items",
            b"total_items",
            b"evictions",
            b"reclaimed",
        ]:
            self.assertIn(name, stats)
        self.assertEqual(stats[b"curr_connections"], b"1")
        self.assertEqual(stats[b"curr_items"], b"1")
        self.assertEqual(stats[b"bytes_read"], b"%d" % len(b"set k 0 0 5\r\nvalue\r\nstats\r\n"))
        self.assertEqual(stats[b"bytes_written"], b"%d" % len(b"STORED\r\n"))

    def test_stats_uptime(self) -> None:
        self.reactor.advance(42)
        self.assertEqual(self.stats()[b"uptime"], b"42")

    def test_stats_settings(self) -> None:
        output = self.send(b"stats settings\r\n")
        self.assertIn(b"STAT maxbytes %d\r\n" % self.factory.settings.max_memory, output)
        self.assertIn(b"STAT item_size_max %d\r\n" % self.factory.settings.max_item_size, output)
        self.assertIn(b"STAT cas_enabled yes\r\n", output)
        self.assertTrue(output.endswith(b"END\r\n"))

    def test_stats_conns(self) -> None:
        other = Client(self.factory, port=40001)
        self.reactor.advance(5)
        other.send(b"version\r\n")
        output = self.send(b"stats conns\r\n")
        self.assertEqual(
            output,
            b"STAT 1:addr tcp:127.0.0.1:40000\r\n"
            b"STAT 1:listen_addr tcp:127.0.0.1:11211\r\n"
            b"STAT 1:state conn_parse_cmd\r\n"
            b"STAT 1:secs_since_last_cmd 0\r\n"
            b"STAT 2:addr tcp:127.0.0.1:40001\r\n"
            b"STAT 2:listen_addr tcp:127.0.0.1:11211\r\n"
            b"STAT 2:state conn_parse_cmd\r\n"
            b"STAT 2:secs_since_last_cmd 0\r\n"
            b"END\r\n",
        )

    def test_stats_reset(self) -> None:
        self.send(b"set k 0 0 1\r\nx\r\nget k\r\nget m\r\n")
        self.assertEqual(self.send(b"stats reset\r\n"), b"RESET\r\n")
        stats = self.stats()
        for name in [b"cmd_get", b"cmd_set", b"get_hits", b"get_misses", b"total_items", b"total_connections"]:
            self.assertEqual(stats[name], b"0", name)
        self.assertEqual(stats[b"curr_items"], b"1")
        self.assertEqual(stats[b"curr_connections"], b"1")

    def test_stats_unknown_error(self) -> None:
        self.assertEqual(self.send(b"stats nonsense\r\n"), b"ERROR\r\n")


class EvictionStatsTests(TextTestCase):
    """LRU eviction seen through the protocol."""

    settings = {"max_memory": 10 * (3 + 10 + 48)}

    def test_evictions_counted(self) -> None:
        for i in range(10):
            self.send(b"set k%02d 0 0 10\r\n0123456789\r\n" % i)
        self.send(b"get k00\r\n")
        for i in range(10, 13):
            self.send(b"set k%02d 0 0 10\r\n0123456789\r\n" % i)
        self.assertEqual(self.stats()[b"evictions"], b"3")
        self.assertEqual(self.send(b"get k00 k01\r\n"), b"VALUE k00 0 10\r\n0123456789\r\nEND\r\n")


class BadInputTests(TextTestCase):
    """Malformed requests: memcached's error replies and closes."""

    def test_unknown_command(self) -> None:
        for line in [b"foo", b"GET k", b"x", b"sets k 0 0 1", b"\x80\x01"]:
            self.assertEqual(self.send(line + b"\r\n"), b"ERROR\r\n", line)
        self.assertFalse(self.client.closed)

    def test_empty_lines(self) -> None:
        self.assertEqual(self.send(b"\r\n\n   \r\n"), b"ERROR\r\nERROR\r\nERROR\r\n")

    def test_bad_data_chunk(self) -> None:
        self.assertEqual(self.send(b"set k 0 0 1\r\nxy\r\n"), BAD_CHUNK + b"ERROR\r\n")
        self.assertEqual(self.send(b"set k 0 0 3\r\nx\r\n"), b"")
        self.assertEqual(self.send(b"yz"), BAD_CHUNK)
        self.assertEqual(self.send(b"get k\r\n"), b"END\r\n")

    def test_bad_data_chunk_counted_as_set(self) -> None:
        self.send(b"set k 0 0 1\r\nxyz\r\n")
        self.assertEqual(self.stats()[b"cmd_set"], b"1")

    def test_long_line_closes(self) -> None:
        self.assertEqual(self.send(b"set k 0 0 1 " + b"x" * 2100), b"")
        self.assertTrue(self.client.closed)

    def test_long_line_across_reads_closes(self) -> None:
        for _ in range(4):
            self.send(b"y" * 600)
        self.assertTrue(self.client.closed)

    def test_2048_bytes_without_newline_kept(self) -> None:
        self.send(b"y" * 2048)
        self.assertFalse(self.client.closed)

    def test_long_line_replies_before_close(self) -> None:
        self.assertEqual(self.send(b"version\r\n" + b"z" * 3000), b"VERSION " + PROTOCOL_VERSION + b"\r\n")
        self.assertTrue(self.client.closed)

    def test_long_get_line_allowed(self) -> None:
        self.send(b"set k1 0 0 1\r\nx\r\n")
        keys = b" ".join(b"k%d" % i for i in range(1000))
        output = self.client.send_chunks([b"get " + keys[:2500], keys[2500:] + b"\r\n"])
        self.assertEqual(output, b"VALUE k1 0 1\r\nx\r\nEND\r\n")
        self.assertFalse(self.client.closed)

    def test_long_gets_line_after_spaces_allowed(self) -> None:
        self.send(b" " * 100 + b"gets " + b"k " * 1500)
        self.assertFalse(self.client.closed)

    def test_long_get_line_after_101_spaces_closes(self) -> None:
        self.send(b" " * 101 + b"get " + b"k " * 1500)
        self.assertTrue(self.client.closed)

    def test_get_line_over_pending_input_limit_closes(self) -> None:
        factory = make_factory(max_pending_input=4096)
        client = Client(factory)
        client.send(b"get " + b"k " * 3000)
        self.assertTrue(client.closed)

    def test_http_request_closes(self) -> None:
        self.assertEqual(self.send(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"), b"")
        self.assertTrue(self.client.closed)

    def test_each_rejection_logged_once_at_info(self) -> None:
        requests = [b"\r\n", b"   \r\n", b"foo\r\n", b"get\r\n", b"verbosity x noreply\r\n", b"rget 2 0 1 a\r\n"]
        for line in requests:
            with capturedLogs() as events:
                self.send(line)
            logged = [event for event in events if event.get("peer") == "tcp:127.0.0.1:40000"]
            self.assertEqual([event["log_level"] for event in logged], [LogLevel.info], line)

    def test_bad_input_logged_with_peer(self) -> None:
        with capturedLogs() as events:
            self.send(b"set k 0 0 1\r\nxy\r\n")
        chunk_events = [event for event in events if "data chunk" in event["log_format"]]
        self.assertEqual(len(chunk_events), 1)
        self.assertEqual(chunk_events[0]["peer"], "tcp:127.0.0.1:40000")
        with capturedLogs() as events:
            self.send(b"q" * 3000)
        close_events = [event for event in events if "exceeded" in event["log_format"]]
        self.assertEqual(len(close_events), 1)
        self.assertEqual(close_events[0]["peer"], "tcp:127.0.0.1:40000")

    def test_errors_do_not_affect_other_connection(self) -> None:
        self.send(b"set keep 0 0 4\r\ndata\r\n")
        attacker = Client(self.factory, port=40001)
        garbage = [
            b"foo\r\n",
            b"set k x 0 1\r\nx\r\n",
            b"set k 0 0 1\r\nxyz\r\n",
            b"set keep 0 0 4\r\n",
            b"12",
            b"incr keep 1\r\n",
            b"delete keep 1\r\n",
            b"get " + b"k" * 300 + b"\r\n",
            b"\x00\xff\r\n",
            b"z" * 5000,
        ]
        attacker.send_chunks(garbage)
        self.assertTrue(attacker.closed)
        self.assertFalse(self.client.closed)
        self.assertEqual(self.send(b"get keep\r\n"), b"VALUE keep 0 4\r\ndata\r\nEND\r\n")
        self.assertEqual(self.send(b"set k 0 0 1\r\n1\r\nincr k 1\r\n"), b"STORED\r\n2\r\n")
        self.assertEqual(self.flushLoggedErrors(), [])


#: A pipeline that uses every classic command, noreply and error path.
#: :func:`run_pipeline` serves it with a 1024-byte item size limit, so the
#: 1100-byte value is too large.
PIPELINE = b"".join(
    [
        b"set a 1 0 3\r\none\r\n",
        b"set b 2 100 3 noreply\r\ntwo\r\n",
        b"add a 0 0 1\r\nx\r\n",
        b"add c 3 0 5\r\nthree\r\n",
        b"replace c 4 0 4\r\nfour\r\n",
        b"replace missing 0 0 1\r\nx\r\n",
        b"append a 0 0 2\r\n!!\r\n",
        b"prepend a 0 0 2 noreply\r\n<<\r\n",
        b"gets a b c\r\n",
        b"cas a 0 0 3 1\r\nnew\r\n",
        b"cas a 0 0 3 5\r\nnew\r\n",
        b"cas nothere 0 0 1 1\r\nz\r\n",
        b"get a b missing c\r\n",
        b"gat 50 a b\r\n",
        b"gats 0 c\r\n",
        b"set n 0 0 3\r\n100\r\n",
        b"incr n 5\r\n",
        b"decr n 10\r\n",
        b"decr n 1000 noreply\r\n",
        b"incr n 18446744073709551615\r\n",
        b"incr a 1\r\n",
        b"incr n x\r\n",
        b"get n\r\n",
        b"touch a 10\r\n",
        b"touch missing 10\r\n",
        b"touch a x\r\n",
        b"delete c\r\n",
        b"delete c noreply\r\n",
        b"delete b 0\r\n",
        b"delete a 5\r\n",
        b"set big 0 0 1100\r\n" + b"B" * 1100 + b"\r\n",
        b"set bad 0 0 2\r\nxyz\r\n",
        b"set k 0 0\r\n",
        b"set k x 0 1\r\n",
        b"bogus command\r\n",
        b"\r\n",
        b"get " + b"k" * 251 + b"\r\n",
        b"verbosity 1\r\n",
        b"verbosity x\r\n",
        b"version\r\n",
        b"stats settings\r\n",
        b"stats conns\r\n",
        b"stats nonsense\r\n",
        b"flush_all 10 noreply\r\n",
        b"flush_all x\r\n",
        b"get a\n",
        b"flush_all\r\n",
        b"get a n\r\n",
        b"quit\r\n",
        b"get after quit\r\n",
    ]
)


def run_pipeline(chunks: list[bytes]) -> tuple[bytes, bool]:
    """Send ``chunks`` to a fresh server; return the replies and whether it closed."""
    client = Client(make_factory(max_item_size=1024))
    output = client.send_chunks(chunks)
    return output, client.closed


class PipelineSplitTests(SynchronousTestCase):
    """Requests split across reads at any byte get the same replies as when sent whole."""

    def setUp(self) -> None:
        self.expected = run_pipeline([PIPELINE])

    def test_pipeline_reply_whole(self) -> None:
        output, closed = self.expected
        self.assertTrue(closed)
        self.assertTrue(output.startswith(b"STORED\r\nNOT_STORED\r\nSTORED\r\nSTORED\r\nNOT_STORED\r\n"), output[:80])
        self.assertIn(b"SERVER_ERROR object too large for cache\r\nCLIENT_ERROR bad data chunk\r\n", output)
        self.assertTrue(output.endswith(b"OK\r\nEND\r\n"), output[-80:])

    def test_split_at_every_byte(self) -> None:
        for cut in range(1, len(PIPELINE)):
            result = run_pipeline([PIPELINE[:cut], PIPELINE[cut:]])
            if result != self.expected:
                self.fail("Split at byte %d changed the replies: %r" % (cut, PIPELINE[cut - 20 : cut + 20]))

    def test_one_byte_per_read(self) -> None:
        self.assertEqual(run_pipeline([PIPELINE[i : i + 1] for i in range(len(PIPELINE))]), self.expected)

    @hypothesis_settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(min_value=1, max_value=len(PIPELINE) - 1), max_size=40))
    def test_split_at_random_points(self, cuts: list[int]) -> None:
        points = [0, *sorted(set(cuts)), len(PIPELINE)]
        chunks = [PIPELINE[start:end] for start, end in zip(points, points[1:])]
        self.assertEqual(run_pipeline(chunks), self.expected)


#: Requests a generated pipeline is built from.
_KEYS = st.sampled_from([b"a", b"b", b"n", b"k" * 250])
_VALUES = st.sampled_from([b"", b"1", b"99", b"value", b"x\r\ny", b"V" * 1100])
_REQUESTS = st.one_of(
    st.builds(
        lambda command, key, flags, exptime, value, noreply: b"%s %s %d %d %d%s\r\n%s\r\n"
        % (command, key, flags, exptime, len(value), noreply, value),
        st.sampled_from([b"set", b"add", b"replace", b"append", b"prepend"]),
        _KEYS,
        st.integers(0, 2**32 - 1),
        st.sampled_from([0, 10, -1]),
        _VALUES,
        st.sampled_from([b"", b" noreply"]),
    ),
    st.builds(
        lambda key, unique, value: b"cas %s 0 0 %d %d\r\n%s\r\n" % (key, len(value), unique, value),
        _KEYS,
        st.integers(0, 20),
        _VALUES,
    ),
    st.builds(lambda command, keys: command + b" " + b" ".join(keys) + b"\r\n", st.sampled_from([b"get", b"gets"]), st.lists(_KEYS, min_size=1, max_size=3)),
    st.builds(lambda command, key: b"%s 10 %s\r\n" % (command, key), st.sampled_from([b"gat", b"gats"]), _KEYS),
    st.builds(lambda command, key, delta: b"%s %s %d\r\n" % (command, key, delta), st.sampled_from([b"incr", b"decr"]), _KEYS, st.integers(0, 2**64 - 1)),
    st.builds(lambda key, noreply: b"delete %s%s\r\n" % (key, noreply), _KEYS, st.sampled_from([b"", b" noreply", b" 0", b" 1"])),
    st.builds(lambda key: b"touch %s 5\r\n" % key, _KEYS),
    st.sampled_from(
        [
            b"version\r\n",
            b"verbosity 1\r\n",
            b"flush_all\r\n",
            b"flush_all 0 noreply\r\n",
            b"bogus\r\n",
            b"\r\n",
            b"set k 0 0 2\r\nxyz\r\n",
            b"set k 0 0 x\r\n",
            b"get " + b"k" * 251 + b"\r\n",
            b"stats settings\r\n",
        ]
    ),
)


class GeneratedPipelineTests(SynchronousTestCase):
    """Generated pipelines give the same replies however they are split."""

    @hypothesis_settings(max_examples=150, deadline=None)
    @given(st.lists(_REQUESTS, min_size=1, max_size=25), st.lists(st.floats(0, 1), max_size=10))
    def test_generated_pipeline_split(self, requests: list[bytes], fractions: list[float]) -> None:
        data = b"".join(requests)
        points = sorted({0, len(data), *(int(fraction * len(data)) for fraction in fractions)})
        chunks = [data[start:end] for start, end in zip(points, points[1:])]
        self.assertEqual(run_pipeline(chunks), run_pipeline([data]))
