"""
A ``twistd kvdaemon`` subprocess for tests that measure the server's own
memory: its resident set size is read from ``/proc/PID/status``.

The subprocess inherits ``PYTHONPATH``, so it runs the checkout's code, and
it logs to a file so that a long log can never block it on a full pipe.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support import free_port, send_and_read

REPOSITORY = Path(__file__).resolve().parent.parent

MiB = 1024 * 1024


class DaemonProcess:
    """
    A ``twistd -n kvdaemon`` process on a free port of 127.0.0.1, killed by
    its pid when ``testcase`` ends.

    :param plugin_arguments: options for the kvdaemon plugin.
    """

    def __init__(self, testcase: SynchronousTestCase, *plugin_arguments: str) -> None:
        self.port = free_port()
        log_directory = tempfile.mkdtemp(prefix="kvdaemon-test-")
        testcase.addCleanup(shutil.rmtree, log_directory)
        self.log_path = Path(log_directory, "twistd.log")
        command = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "--logfile=%s" % self.log_path,
            "kvdaemon",
            "--listen",
            "tcp:%d:interface=127.0.0.1" % self.port,
            *plugin_arguments,
        ]
        self.process = subprocess.Popen(command, cwd=REPOSITORY, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        testcase.addCleanup(self.kill)
        self._wait_until_listening()

    def _wait_until_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError("twistd kvdaemon exited with status %s: %s" % (self.process.returncode, self.log()))
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self) -> int:
        """Return the server's resident set size in bytes (``VmRSS``)."""
        with open("/proc/%d/status" % self.pid) as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line for pid %d: the server has exited" % self.pid)

    def connect(self, timeout: float = 30.0) -> socket.socket:
        """Open a blocking connection to the server."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def stats(self, group: bytes = b"") -> dict[bytes, bytes]:
        """Return the server's ``stats`` (or ``stats GROUP``) over a new connection."""
        with self.connect() as connection:
            request = b"stats %s\r\n" % group if group else b"stats\r\n"
            reply = send_and_read(connection, request, b"END\r\n")
        lines = reply.split(b"\r\n")[:-2]
        return {name: value for _, name, value in (line.split(b" ", 2) for line in lines)}

    def log(self) -> str:
        """Return what the server has logged so far."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text()

    def kill(self) -> None:
        """Stop the server by its pid, at once."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(30)
