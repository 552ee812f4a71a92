"""
Tests for kvdaemon._options: the twistd command line, its validation and
the service and settings it builds.
"""

from __future__ import annotations

import os
import sys
import tempfile

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from kvdaemon import DEFAULT_LISTEN, KVDaemonService, Settings
from kvdaemon._options import Options, make_service
from kvdaemon._settings import MiB


def parse(*arguments: str) -> Options:
    options = Options()
    options.parseOptions(list(arguments))
    return options


class OptionsTests(SynchronousTestCase):
    def test_defaults_match_settings(self) -> None:
        options = parse()
        self.assertEqual(options["settings"], Settings())
        self.assertEqual(options["listen"], [DEFAULT_LISTEN])

    def test_values_reach_settings(self) -> None:
        options = parse(
            "--max-memory", "128",
            "--max-item-size", "2048",
            "--max-connections", "10",
            "--threads", "3",
            "--stream-buffer", "65536",
            "--stall-timeout", "2.5",
            "--max-streams", "7",
            "--max-scans", "5",
            "--scan-lifetime", "9",
            "--disable-flush-all",
            "--disable-dumps",
        )
        settings = options["settings"]
        self.assertEqual(settings.max_memory, 128 * MiB)
        self.assertEqual(settings.max_item_size, 2048)
        self.assertEqual(settings.max_connections, 10)
        self.assertEqual(settings.threads, 3)
        self.assertEqual(settings.stream_buffer, 65536)
        self.assertEqual(settings.stall_timeout, 2.5)
        self.assertEqual(settings.max_streams, 7)
        self.assertEqual(settings.max_scans, 5)
        self.assertEqual(settings.scan_lifetime, 9.0)
        self.assertFalse(settings.allow_destructive)
        self.assertFalse(settings.allow_dumps)

    def test_listen_repeatable(self) -> None:
        options = parse("--listen", "tcp:1:interface=127.0.0.1", "--listen", "unix:/tmp/kv.sock")
        self.assertEqual(options["listen"], ["tcp:1:interface=127.0.0.1", "unix:/tmp/kv.sock"])

    def test_invalid_values_name_option_and_range(self) -> None:
        cases = [
            ("--max-memory", "0", "--max-memory", "1 to 1048576"),
            ("--threads", "1000", "--threads", "1 to 256"),
            ("--stream-buffer", "12", "--stream-buffer", "4096 to"),
            ("--stall-timeout", "soon", "--stall-timeout", "0.1 to 86400"),
            ("--switch-interval", "0", "--switch-interval", "0.05 to 100"),
        ]
        for option, value, name, allowed in cases:
            with self.assertRaises(usage.UsageError) as raised:
                parse(option, value)
            message = str(raised.exception)
            self.assertIn(name, message)
            self.assertIn(allowed, message)

    def test_item_size_over_half_memory_rejected(self) -> None:
        with self.assertRaises(usage.UsageError) as raised:
            parse("--max-memory", "1", "--max-item-size", "1048576")
        message = str(raised.exception)
        self.assertIn("--max-item-size", message)
        self.assertIn("half of --max-memory", message)
        self.assertEqual(parse("--max-memory", "2", "--max-item-size", "1048576")["settings"].max_item_size, 1048576)

    def test_invalid_endpoint_rejected(self) -> None:
        with self.assertRaises(usage.UsageError) as raised:
            parse("--listen", "bogus:x")
        self.assertIn("--listen", str(raised.exception))

    def test_benchmark_switch_turns_spool_cap_off(self) -> None:
        self.assertEqual(parse("--benchmark-unbounded-spool")["settings"].stream_buffer, 0)

    def test_make_service_sets_switch_interval(self) -> None:
        previous = sys.getswitchinterval()
        self.addCleanup(sys.setswitchinterval, previous)

        service = make_service(parse("--switch-interval", "0.25", "--listen", "tcp:0:interface=127.0.0.1"))

        self.assertIsInstance(service, KVDaemonService)
        self.assertAlmostEqual(sys.getswitchinterval(), 0.00025)
        self.assertEqual(service.listen, ["tcp:0:interface=127.0.0.1"])


class AccessOptionsTests(SynchronousTestCase):
    def write_file(self, content: bytes) -> str:
        fd, path = tempfile.mkstemp()
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        self.addCleanup(os.remove, path)
        return path

    def test_switches_on_by_default(self) -> None:
        settings = parse()["settings"]
        self.assertTrue(settings.allow_destructive)
        self.assertTrue(settings.allow_dumps)
        self.assertIsNone(settings.auth_users)
        self.assertIsNone(settings.sasl_users)

    def test_short_flags_match_memcached(self) -> None:
        settings = parse("-F", "-X")["settings"]
        self.assertFalse(settings.allow_destructive)
        self.assertFalse(settings.allow_dumps)

    def test_disable_flush_alias(self) -> None:
        self.assertFalse(parse("--disable-flush")["settings"].allow_destructive)

    def test_auth_file_read(self) -> None:
        path = self.write_file(b"# users\nalice:secret\n\nbob:pw:with:colons\n")
        for option in ("--auth-file", "-Y"):
            settings = parse(option, path)["settings"]
            self.assertEqual(settings.auth_users, {b"alice": b"secret", b"bob": b"pw:with:colons"})

    def test_auth_file_keeps_spaces(self) -> None:
        path = self.write_file(b" dave : pw2 \n")
        settings = parse("--auth-file", path)["settings"]
        self.assertEqual(settings.auth_users, {b" dave ": b" pw2 "})

    def test_auth_file_bad_line_rejected(self) -> None:
        path = self.write_file(b"alice:secret\nnocolon\n")
        with self.assertRaises(usage.UsageError) as raised:
            parse("--auth-file", path)
        self.assertIn("Invalid line 2 in --auth-file", str(raised.exception))

    def test_auth_file_empty_rejected(self) -> None:
        path = self.write_file(b"# nobody\n")
        with self.assertRaises(usage.UsageError) as raised:
            parse("--auth-file", path)
        self.assertIn("contains no user:password lines", str(raised.exception))

    def test_auth_file_missing_rejected(self) -> None:
        with self.assertRaises(usage.UsageError) as raised:
            parse("--auth-file", "/nonexistent/kvdaemon.auth")
        self.assertIn("Cannot read --auth-file /nonexistent/kvdaemon.auth", str(raised.exception))

    def test_sasl_and_auth_file_rejected_together(self) -> None:
        path = self.write_file(b"alice:secret\n")
        with self.assertRaises(usage.UsageError) as raised:
            parse("--auth-file", path, "--sasl-file", path)
        self.assertIn("cannot be combined", str(raised.exception))


class DefaultExposureTests(SynchronousTestCase):
    def test_default_listens_on_loopback_tcp_only(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        memory_reactor = MemoryReactorClock()
        service = KVDaemonService(reactor=memory_reactor)
        service.startService()
        self.addCleanup(service.stopService)

        self.assertEqual(service.listen, [DEFAULT_LISTEN])
        self.assertEqual([(port, interface) for port, _, _, interface in memory_reactor.tcpServers], [(11211, "127.0.0.1")])
        self.assertEqual(memory_reactor.sslServers, [])
        self.assertEqual(memory_reactor.unixServers, [])

    def test_udp_listen_rejected(self) -> None:
        with self.assertRaises(usage.UsageError) as raised:
            parse("--listen", "udp:11211")
        self.assertIn("Invalid --listen endpoint 'udp:11211'", str(raised.exception))


class EndpointErrorTests(SynchronousTestCase):
    def test_missing_key_file_rejected(self) -> None:
        with self.assertRaises(usage.UsageError) as raised:
            parse("--listen", "ssl:0:interface=127.0.0.1:privateKey=/nonexistent/kvdaemon.key")
        message = str(raised.exception)
        self.assertIn("Invalid --listen endpoint", message)
        self.assertIn("/nonexistent/kvdaemon.key", message)

    def test_invalid_key_file_rejected(self) -> None:
        fd, path = tempfile.mkstemp(suffix=".key")
        with os.fdopen(fd, "wb") as f:
            f.write(b"not a key\n")
        self.addCleanup(os.remove, path)
        with self.assertRaises(usage.UsageError) as raised:
            parse("--listen", "ssl:0:privateKey=%s" % path)
        self.assertIn("Invalid --listen endpoint", str(raised.exception))

    def test_missing_pyopenssl_names_extra(self) -> None:
        # pyOpenSSL is installed here, so a child interpreter hides it.
        import subprocess

        script = (
            "import sys\n"
            "sys.modules['OpenSSL'] = None\n"
            "from twisted.python import usage\n"
            "from kvdaemon._options import Options\n"
            "try:\n"
            "    Options().parseOptions(['--listen', 'ssl:0:privateKey=server.pem'])\n"
            "except usage.UsageError as error:\n"
            "    sys.stdout.write(str(error))\n"
        )
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("pip install 'Twisted[tls]'", result.stdout)
