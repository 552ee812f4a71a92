"""
Start, probe and stop the servers that the benchmarks compare.

Every server listens on 127.0.0.1 only, on a free port picked here, and is
stopped by its process id.  memcached runs with one worker thread (``-t 1``)
by default, because kvdaemon serves requests from one reactor thread.  On a
2-core machine that also runs the load generator, more memcached worker
threads would mostly compete with the client for the same cores.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent

#: The kvdaemon start command without per-run options.  :func:`start_kvdaemon`
#: appends ``--listen`` and ``--max-memory``.
DEFAULT_KVDAEMON_COMMAND = "twistd -n --pidfile= kvdaemon"
DEFAULT_MEMCACHED_COMMAND = "memcached -u root"
DEFAULT_MAX_MEMORY_MIB = 2048
DEFAULT_MEMCACHED_THREADS = 1

# The last line of a Python traceback, as Twisted logs it with a tab indent.
EXCEPTION_LINE_PATTERN = re.compile(r"^\s*((?:\w+\.)*\w*(?:Error|Exception|Failure)\b.*)$", re.MULTILINE)


class BenchmarkError(RuntimeError):
    """A benchmark step failed.  The message names the step and the cause."""


class ServerStartError(BenchmarkError):
    """A server process exited or did not reply to ``version`` in time."""


@dataclass
class RunningServer:
    """A server subprocess listening on ``HOST:port``, with its output log."""

    name: str
    argv: list[str]
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    version: str = field(default="")

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def command_line(self) -> str:
        return shlex.join(self.argv)

    def command_template(self) -> str:
        """Return the command line with the port number shown as ``PORT``."""
        port = str(self.port)
        argv = [
            "PORT" if arg == port else arg.replace(f"tcp:{port}:", "tcp:PORT:")
            for arg in self.argv
        ]
        return shlex.join(argv)

    def rss_bytes(self) -> int:
        return read_rss_bytes(self.pid)

    def logged_errors(self) -> list[str]:
        """
        Return the distinct exception lines in the log, such as
        ``builtins.KeyError: 'x'`` from a Twisted traceback.
        """
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        errors: dict[str, None] = {}
        for match in EXCEPTION_LINE_PATTERN.finditer(text):
            errors.setdefault(match.group(1).strip())
        return list(errors)

    def log_tail(self, max_lines: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as error:
            return f"(log {self.log_path} could not be read: {error})"
        return "\n".join(lines[-max_lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """
        Stop the process by pid with SIGTERM, then SIGKILL after *timeout*
        seconds, and delete its log.  Read :meth:`log_tail` before stopping.
        """
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(timeout)
        self.log_path.unlink(missing_ok=True)


def pick_free_port() -> int:
    """
    Return a TCP port on 127.0.0.1 that was free a moment ago.

    Another process may take the port before the server binds it, in which
    case the server fails to start and :func:`wait_until_ready` reports it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def read_rss_bytes(pid: int) -> int:
    """Return the resident set size (``VmRSS``) of process *pid* in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"unexpected VmRSS unit {unit!r} for pid {pid}")
            return int(value) * 1024
    raise ValueError(
        f"/proc/{pid}/status has no VmRSS line, which happens when the process"
        " has exited but was not reaped yet"
    )


def request_version(port: int, timeout: float = 2.0) -> str:
    """Send ``version`` to the text protocol port and return the version string."""
    with socket.create_connection((HOST, port), timeout=timeout) as connection:
        connection.sendall(b"version\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = connection.recv(4096)
            if not chunk:
                raise ConnectionError(f"connection closed after {reply!r}")
            reply += chunk
    if not reply.startswith(b"VERSION "):
        raise ConnectionError(f"expected 'VERSION ...', got {reply!r}")
    return reply[len(b"VERSION "):].strip().decode("ascii", "replace")


def wait_until_ready(server: RunningServer, timeout: float = 30.0) -> None:
    """
    Poll *server* with ``version`` until it replies, and store its version.

    Raises :class:`ServerStartError` with the end of the server's log when the
    process exits first or *timeout* seconds pass.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        exit_code = server.process.poll()
        if exit_code is not None:
            message = (
                f"{server.name} exited with code {exit_code} during startup;"
                f" command: {server.command_line()}\n{server.log_tail()}"
            )
            server.stop()
            raise ServerStartError(message)
        try:
            server.version = request_version(server.port)
            return
        except OSError as error:
            last_error = error
            time.sleep(0.1)
    message = (
        f"{server.name} did not reply to 'version' on {server.address} within"
        f" {timeout:.0f} s (last error: {last_error}); command:"
        f" {server.command_line()}\n{server.log_tail()}"
    )
    server.stop()
    raise ServerStartError(message)


def _launch(
    name: str,
    argv: list[str],
    port: int,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> RunningServer:
    log_file = tempfile.NamedTemporaryFile(
        prefix=f"bench-{name}-", suffix=".log", delete=False
    )
    with log_file:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = RunningServer(name, argv, port, process, Path(log_file.name))
    wait_until_ready(server)
    return server


def start_memcached(
    command: str = DEFAULT_MEMCACHED_COMMAND,
    port: int | None = None,
    max_memory_mib: int = DEFAULT_MAX_MEMORY_MIB,
    threads: int = DEFAULT_MEMCACHED_THREADS,
) -> RunningServer:
    """
    Start memcached on ``127.0.0.1:port`` with UDP off and wait until it replies.

    *command* is the executable with any fixed options.  memcached needs
    ``-u root`` when it runs as root.
    """
    port = pick_free_port() if port is None else port
    argv = shlex.split(command) + [
        "-l", HOST,
        "-p", str(port),
        "-U", "0",
        "-m", str(max_memory_mib),
        "-t", str(threads),
    ]
    return _launch("memcached", argv, port)


def start_kvdaemon(
    command: str = DEFAULT_KVDAEMON_COMMAND,
    port: int | None = None,
    max_memory_mib: int = DEFAULT_MAX_MEMORY_MIB,
    extra_args: str = "",
    python_path: str = str(REPO_ROOT),
) -> RunningServer:
    """
    Start kvdaemon from the repository root and wait until it replies.

    *extra_args* is appended as-is, for options such as ``--threads 2`` or
    ``--stream-buffer 65536``.  *python_path*, unless empty, goes first on
    the server's ``PYTHONPATH``.  The twistd script (Twisted 26.10) does not
    put its working directory on ``sys.path``, so without this a kvdaemon
    installed in site-packages would run instead of the checkout.
    """
    port = pick_free_port() if port is None else port
    argv = (
        shlex.split(command)
        + ["--listen", f"tcp:{port}:interface={HOST}", "--max-memory", str(max_memory_mib)]
        + shlex.split(extra_args)
    )
    env = dict(os.environ)
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join(
            path for path in (python_path, env.get("PYTHONPATH", "")) if path
        )
    return _launch("kvdaemon", argv, port, cwd=REPO_ROOT, env=env)
