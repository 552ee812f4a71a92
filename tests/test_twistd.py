"""
``twistd kvdaemon`` as users run it: a subprocess serving real clients,
its help text, its option checks and a clean stop on SIGTERM.

twistd finds the plugin in the checkout's ``twisted/plugins`` because the
subprocess runs from the repository root.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheClientError
from twisted.trial.unittest import SynchronousTestCase

from tests.support import free_port, wait_for_port

REPOSITORY = Path(__file__).resolve().parent.parent

#: Runs twistd with this interpreter, whatever ``twistd`` on PATH is.
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def twistd_command(*plugin_arguments: str) -> list[str]:
    return [*TWISTD, "-n", "--pidfile=", "--logfile=-", "kvdaemon", *plugin_arguments]


def run_twistd(*plugin_arguments: str) -> subprocess.CompletedProcess:
    """Run twistd to completion (for --help and rejected options)."""
    return subprocess.run(
        twistd_command(*plugin_arguments),
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=60,
    )


def spawn_twistd(testcase: SynchronousTestCase, port: int, *plugin_arguments: str) -> subprocess.Popen:
    """
    Start ``twistd kvdaemon`` with ``plugin_arguments`` and wait until
    something accepts connections on ``port``.  The process is killed by
    its pid when ``testcase`` ends, unless it has exited.
    """
    process = subprocess.Popen(
        twistd_command(*plugin_arguments),
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def kill() -> None:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.communicate(timeout=20)

    testcase.addCleanup(kill)
    wait_for_port(port, timeout=30)
    return process


def stop_twistd(testcase: SynchronousTestCase, process: subprocess.Popen) -> str:
    """
    Send SIGTERM to ``process`` by its pid and check that twistd shut down
    cleanly; return its log.
    """
    os.kill(process.pid, signal.SIGTERM)
    log, _ = process.communicate(timeout=30)
    # kvdaemon's own SIGTERM handler keeps twistd from re-raising the
    # signal at exit, so the process exits 0, as memcached 1.6.18 does.
    testcase.assertEqual(process.returncode, 0, log)
    testcase.assertIn("Server Shut Down.", log)
    testcase.assertNotIn("Traceback", log)
    return log


class TwistdServerTests(SynchronousTestCase):
    """A ``twistd kvdaemon`` process on a free port of 127.0.0.1."""

    def start(self, *plugin_arguments: str) -> tuple[subprocess.Popen, int]:
        port = free_port()
        process = spawn_twistd(self, port, "--listen", "tcp:%d:interface=127.0.0.1" % port, *plugin_arguments)
        return process, port

    def stop(self, process: subprocess.Popen) -> str:
        return stop_twistd(self, process)

    def test_serves_clients_and_stops_cleanly(self) -> None:
        process, port = self.start()
        client = Client(("127.0.0.1", port), timeout=10, connect_timeout=10, default_noreply=False)
        try:
            self.assertTrue(client.set("greeting", b"hello", expire=100))
            self.assertEqual(client.get("greeting"), b"hello")
            self.assertEqual(client.incr("missing", 1), None)
            self.assertEqual(client.stats()[b"curr_items"], 1)
        finally:
            client.close()
        log = self.stop(process)
        self.assertIn("kvdaemon listening on tcp:%d:interface=127.0.0.1" % port, log)
        self.assertIn("kvdaemon started", log)
        self.assertIn(
            "kvdaemon access: authentication none; flush_all and range deletes enabled; key dumps enabled;"
            " shutdown command disabled",
            log,
        )
        self.assertIn("kvdaemon stopped", log)

    def test_options_reach_server(self) -> None:
        process, port = self.start("--max-memory", "2", "--threads", "3", "--max-item-size", "4096", "--disable-flush-all")
        client = Client(("127.0.0.1", port), timeout=10, connect_timeout=10, default_noreply=False)
        try:
            stats = client.stats()
            self.assertEqual(stats[b"limit_maxbytes"], 2 * 1024 * 1024)
            self.assertEqual(stats[b"threads"], 3)
            settings = client.stats("settings")
            self.assertEqual(settings[b"item_size_max"], 4096)
            with self.assertRaises(MemcacheClientError) as raised:
                client.flush_all(noreply=False)
            self.assertIn(b"flush_all not allowed", raised.exception.args[0])
        finally:
            client.close()
        log = self.stop(process)
        self.assertIn("flush_all and range deletes disabled;", log)

    def test_stops_with_client_connected(self) -> None:
        process, port = self.start()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
            idle.sendall(b"get partial")
            log = self.stop(process)
            self.assertEqual(idle.recv(100), b"")
        self.assertIn("kvdaemon stopped", log)

    def test_busy_port_exits_nonzero(self) -> None:
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen(1)
            port = holder.getsockname()[1]
            result = run_twistd("--listen", "tcp:%d:interface=127.0.0.1" % port)
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertIn("Could not listen on tcp:%d:interface=127.0.0.1" % port, output)


class TwistdOptionTests(SynchronousTestCase):
    """``twistd kvdaemon`` help and option validation, without serving."""

    def test_help_lists_options(self) -> None:
        result = run_twistd("--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        for option in [
            "--listen=",
            "--max-memory=",
            "--max-item-size=",
            "--max-connections=",
            "--threads=",
            "--stream-buffer=",
            "--stall-timeout=",
            "--max-streams=",
            "--max-scans=",
            "--scan-lifetime=",
            "--sasl-file=",
            "--disable-flush-all",
            "--disable-dumps",
            "--auth-file=",
            "--enable-shutdown",
            "--shutdown-grace=",
            "--idle-timeout=",
        ]:
            self.assertIn(option, result.stdout)
        self.assertIn("tcp:11211:interface=127.0.0.1", result.stdout)

    def test_invalid_values_rejected(self) -> None:
        cases = [
            (["--max-memory", "0"], "--max-memory", "from 1 to 1048576 MiB"),
            (["--max-memory", "lots"], "--max-memory", "from 1 to 1048576 MiB"),
            (["--threads", "1000"], "--threads", "from 1 to 256 threads"),
            (["--max-item-size", "10"], "--max-item-size", "from 1024 to 134217728 bytes"),
            (["--max-connections", "0"], "--max-connections", "from 1 to 1000000 connections"),
            (["--stall-timeout", "0"], "--stall-timeout", "from 0.1 to 86400 seconds"),
        ]
        for arguments, option, expected_range in cases:
            result = run_twistd(*arguments)
            output = result.stdout + result.stderr
            self.assertNotEqual(result.returncode, 0, arguments)
            self.assertIn("Invalid value %r for %s" % (arguments[1], option), output, arguments)
            self.assertIn(expected_range, output, arguments)

    def test_invalid_listen_rejected(self) -> None:
        result = run_twistd("--listen", "bogus:x")
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("Invalid --listen endpoint 'bogus:x'", output)
        self.assertIn("Unknown endpoint type: 'bogus'", output)
