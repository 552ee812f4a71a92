"""
Soak kvdaemon with many clients doing mixed work for a bounded time, then
check that the server lost no acknowledged write and leaked no thread,
file descriptor or memory.

One run:

1. Starts ``twistd -n kvdaemon`` on a free 127.0.0.1 port with a log file
   and small limits (``--max-memory 64 --threads 4 --stall-timeout 5``).
2. Loads the bulk keys that the range operations read, and lets every
   worker write the first values of its own keys.  The data stays well
   under ``--max-memory``, so nothing may be evicted.
3. Runs one connection per worker for ``--duration`` seconds: text and meta
   commands, binary commands, range operations and scans, slow readers
   that the stall timeout must cut, and connections cut short with a RST
   or a FIN (see ``_soak_workers.py``).  The server's thread count, open
   file descriptors and RSS are sampled every ``--sample-interval``
   seconds from ``/proc/PID``.
4. Reads back every key the workers own and compares it with the last
   acknowledged write, and waits for the server's file descriptors to
   return to their figure before the run.
5. Starts a few ``rget`` requests that it never reads, stops the server by
   pid (SIGTERM, then SIGKILL only if it does not exit in time) and scans
   its log.

It prints the operations and errors per kind, the samples and each check
with PASS or FAIL, and exits with status 1 if any check fails.
``--record`` writes the summary into ``bench/RESULTS.rst``.

A short run::

    python bench/soak.py --duration 10
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _results  # noqa: E402
import _servers  # noqa: E402
from _soak_wire import TextClient, connect  # noqa: E402
from _soak_workers import (  # noqa: E402
    BULK_END,
    BULK_PREFIX,
    READ_TIMEOUT,
    RunState,
    SlowReaderWorker,
    Worker,
    bulk_value,
    make_workers,
)

MiB = 1024 * 1024

#: Threads allowed beyond the count after warm-up plus the pool size.  The
#: pool size is added because Twisted starts pool threads on demand, so the
#: warm-up may not have started them all.  The slack is a tolerance that
#: the recorded runs did not need.
THREAD_SLACK = 2
#: File descriptors allowed beyond the count after warm-up, once every
#: client has closed.  It is a tolerance that the recorded runs did not need.
FD_SLACK = 2
#: Seconds to wait for the server to close the sockets of clients that
#: have gone, before the file descriptor check reads its final figure.
FD_SETTLE_SECONDS = 15
#: Seconds the server has to exit after SIGTERM before it gets SIGKILL.
STOP_TIMEOUT = 15

#: Unread ``rget`` streams open when the server gets SIGTERM.  The stop
#: must cancel them rather than wait for their clients.
STALLED_AT_STOP = 3

#: Keys per ``get`` request when the ledger is read back.
VERIFY_BATCH = 100

#: Log lines at warn level or above that the soak provokes on purpose,
#: by name.  Every other such line, and every traceback, fails the run.
EXPECTED_WARNINGS = {
    "stall closure": re.compile(
        r"^Closing tcp:127\.0\.0\.1:\d+: the client read nothing for [\d.]+ seconds during a stream$"
    ),
}
#: Text that marks an unexpected error wherever it appears in the log.
ERROR_MARKERS = re.compile(r"Traceback|Unhandled|Unexpected error|Exception|\w+Error\b|failed; closing")
#: One event of Twisted's text log: time, ``[namespace#level]``, message.
LOG_LINE = re.compile(r"^\S+ \[(?P<system>[^\]]*)\] (?P<message>.*)$")
FLAGGED_LEVELS = ("warn", "error", "critical")
#: Messages that a clean shutdown logs, kvdaemon's and then twistd's.
SHUTDOWN_LINES = ("kvdaemon stopped", "Server Shut Down.")

#: The service's closing line, which counts the streams the stop cancelled.
STOPPED_LINE = re.compile(r"^kvdaemon stopped: closed \d+ connections and cancelled (?P<streams>\d+) streams$")


@dataclass
class Sample:
    """The server's thread count, open file descriptors and RSS at one moment."""

    seconds: float
    threads: int
    fds: int
    rss: int


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class LogScan:
    """Line counts and unexpected lines from the server's log."""

    levels: Counter = field(default_factory=Counter)
    expected: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    shutdown_lines: int = 0
    #: Number of "its stream was cancelled" lines, one per stream that the stop cancelled.
    cancelled_streams: int = 0
    #: Streams that the stop cancelled, as counted by the service's closing line.
    streams_cancelled_at_stop: int = -1


def read_process(pid: int, started: float) -> Sample:
    """Sample ``Threads`` and ``VmRSS`` from ``/proc/PID/status`` and count ``/proc/PID/fd``."""
    threads = rss = 0
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("Threads:"):
            threads = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    fds = len(os.listdir("/proc/%d/fd" % pid))
    return Sample(time.monotonic() - started, threads, fds, rss)


class Sampler(threading.Thread):
    """Samples the server every *interval* seconds until :attr:`stop` is set."""

    def __init__(self, pid: int, interval: float, started: float) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.pid = pid
        self.interval = interval
        self.started = started
        self.samples: list[Sample] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.samples.append(read_process(self.pid, self.started))


def read_stats(port: int) -> dict[str, str]:
    client = TextClient(connect(port, READ_TIMEOUT))
    try:
        client.send(b"stats\r\n")
        stats = {}
        while True:
            line = client.read_line()
            if line == b"END":
                return stats
            _, name, value = line.decode().split(" ", 2)
            stats[name] = value
    finally:
        client.close()


def load_bulk(port: int, items: int, value_size: int) -> None:
    """Store the bulk keys with acknowledged sets, pipelined 500 at a time."""
    client = TextClient(connect(port, READ_TIMEOUT))
    try:
        for first in range(0, items, 500):
            numbers = range(first, min(items, first + 500))
            client.send(
                b"".join(
                    b"set %s%06d 0 0 %d\r\n%s\r\n" % (BULK_PREFIX, number, value_size, bulk_value(number, value_size))
                    for number in numbers
                )
            )
            for number in numbers:
                reply = client.read_line()
                if reply != b"STORED":
                    raise _servers.BenchmarkError("loading bulk key %d: expected STORED, got %r" % (number, reply))
    finally:
        client.close()


def populate(workers: list[Worker]) -> None:
    """Let every worker write its first values, all workers in parallel."""
    failures: list[str] = []

    def run(worker: Worker) -> None:
        try:
            worker.populate()
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append("%s: %s: %s" % (worker.name, type(error).__name__, error))

    threads = [threading.Thread(target=run, args=(worker,)) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise _servers.BenchmarkError("populating the workers' keys failed:\n" + "\n".join(failures))


def warm_up(state: RunState) -> None:
    """Run each kind of range operation once, so that the worker pool has started threads."""
    warm = make_workers(10, state, seed=0)
    range_worker = next(worker for worker in warm if worker.role == "range")
    for name in ("rget_bulk", "scan_bulk", "brget_bulk", "mgdump"):
        getattr(range_worker, "op_" + name)()


def verify_ledgers(port: int, workers: list[Worker]) -> tuple[int, int, list[str]]:
    """
    Read every owned key back and compare it with its ledger.

    :return: keys checked, keys present, and a description of each key
        that differs.
    """
    expected: dict[bytes, set[bytes | None]] = {}
    for worker in workers:
        expected.update(worker.ledger.expected)
    keys = sorted(expected)
    present = 0
    mismatches: list[str] = []
    client = TextClient(connect(port, READ_TIMEOUT))
    try:
        for first in range(0, len(keys), VERIFY_BATCH):
            batch = keys[first : first + VERIFY_BATCH]
            client.send(b"get %s\r\n" % b" ".join(batch))
            found = {value.key: value.value for value in client.read_values()}
            for key in batch:
                actual = found.get(key)
                present += actual is not None
                if actual not in expected[key]:
                    mismatches.append(
                        "%r: read %s, last acknowledged %s"
                        % (key, describe_value(actual), " or ".join(describe_value(value) for value in expected[key]))
                    )
    finally:
        client.close()
    return len(keys), present, mismatches


def describe_value(value: bytes | None) -> str:
    return "a miss" if value is None else "%d bytes %r" % (len(value), value[:20])


def wait_for_fds(pid: int, target: int, started: float) -> Sample:
    """Sample the server until its fd count is at most *target* or :data:`FD_SETTLE_SECONDS` pass."""
    deadline = time.monotonic() + FD_SETTLE_SECONDS
    while True:
        sample = read_process(pid, started)
        if sample.fds <= target or time.monotonic() >= deadline:
            return sample
        time.sleep(0.5)


def open_stalled_streams(port: int, count: int) -> list:
    """
    Start *count* ``rget`` requests of every bulk key that are never read,
    so that the server has paused streams when it gets SIGTERM.
    """
    connections = []
    for _ in range(count):
        connection = connect(port, READ_TIMEOUT, receive_buffer=4096)
        connection.sendall(b"rget 1 0 0 %s %s\r\n" % (BULK_PREFIX, BULK_END))
        connections.append(connection)
    return connections


def stop_server(server: _servers.RunningServer) -> tuple[int | None, bool, float]:
    """
    Stop the server by pid: SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT` s.

    :return: the exit code, whether SIGKILL was needed, and the seconds
        the process took to exit.
    """
    started = time.monotonic()
    killed = False
    if server.process.poll() is None:
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            killed = True
            os.kill(server.pid, signal.SIGKILL)
            server.process.wait(STOP_TIMEOUT)
    return server.process.returncode, killed, time.monotonic() - started


def scan_log(paths: list[Path]) -> LogScan:
    """
    Sort the log's lines: tracebacks and lines at warn level or above are
    unexpected unless :data:`EXPECTED_WARNINGS` names them.
    """
    scan = LogScan()
    for path in paths:
        if not path.exists():
            continue
        scan.files.append(path)
        for line in path.read_text(errors="replace").splitlines():
            match = LOG_LINE.match(line)
            if match is None:
                # A continuation line: a traceback or a multi-line message.
                if ERROR_MARKERS.search(line):
                    scan.unexpected.append(line.strip())
                continue
            system, message = match.group("system"), match.group("message")
            level = system.rpartition("#")[2] if "#" in system else "legacy"
            scan.levels[level] += 1

            stopped = STOPPED_LINE.match(message)
            if stopped is not None:
                scan.shutdown_lines += 1
                scan.streams_cancelled_at_stop = int(stopped.group("streams"))
            elif message in SHUTDOWN_LINES:
                scan.shutdown_lines += 1
            elif message.endswith(": its stream was cancelled"):
                scan.cancelled_streams += 1

            for name, pattern in EXPECTED_WARNINGS.items():
                if pattern.match(message):
                    scan.expected[name] += 1
                    break
            else:
                if level in FLAGGED_LEVELS or ERROR_MARKERS.search(message):
                    scan.unexpected.append(line.strip())
    return scan


def log_files(log_path: Path) -> list[Path]:
    """Return the log and the files twistd rotated it into (``PATH.1``, ``PATH.2``...), oldest first."""
    rotated = sorted(
        (path for path in log_path.parent.glob(log_path.name + ".*") if path.suffix[1:].isdigit()),
        key=lambda path: -int(path.suffix[1:]),
    )
    return [*rotated, log_path]


def merge_counts(workers: list[Worker]) -> tuple[Counter, Counter, list[str]]:
    ops: Counter = Counter()
    errors: Counter = Counter()
    messages: list[str] = []
    for worker in workers:
        ops.update({"%s %s" % (worker.role, name): count for name, count in worker.ops.items()})
        errors.update({"%s %s" % (worker.role, name): count for name, count in worker.errors.items()})
        messages.extend(worker.messages)
    return ops, errors, messages


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60, help="seconds of load (default 60)")
    parser.add_argument("--connections", type=int, default=50, help="client workers, one connection each at a time (default 50)")
    parser.add_argument("--threads", type=int, default=4, help="the server's --threads, its worker pool size (default 4)")
    parser.add_argument("--max-memory", type=int, default=64, help="the server's --max-memory in MiB (default 64)")
    parser.add_argument("--stall-timeout", type=float, default=5, help="the server's --stall-timeout in seconds (default 5)")
    parser.add_argument("--bulk-items", type=int, default=10_000, help="bulk keys that range operations read (default 10,000)")
    parser.add_argument(
        "--bulk-value-size", type=int, default=1000,
        help="bytes per bulk value (default 1000).  The bulk keys must outweigh the socket buffers for slow readers to stall",
    )
    parser.add_argument("--sample-interval", type=float, default=5, help="seconds between server samples (default 5)")
    parser.add_argument(
        "--max-rss-growth", type=float, default=32,
        help="allowed RSS growth after warm-up in MiB (default 32, measured with 50 connections; more connections need more)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the workers' random choices (default 1)")
    parser.add_argument("--kvdaemon-args", default="", help="extra twistd kvdaemon options")
    parser.add_argument("--keep-log", action="store_true", help="keep the server's log even when every check passes")
    parser.add_argument("--record", action="store_true", help="write the summary into bench/RESULTS.rst")
    return parser.parse_args(argv)


def start_server(args: argparse.Namespace, log_path: Path) -> _servers.RunningServer:
    command = "twistd -n --pidfile= -l %s kvdaemon" % shlex.quote(str(log_path))
    extra = "--threads %d --stall-timeout %s %s" % (args.threads, args.stall_timeout, args.kvdaemon_args)
    return _servers.start_kvdaemon(command=command, max_memory_mib=args.max_memory, extra_args=extra)


@dataclass
class Outcome:
    """Everything the summary reports."""

    args: argparse.Namespace
    server_command: str
    roles: Counter
    start: Sample
    samples: list[Sample]
    final: Sample
    ops: Counter
    errors: Counter
    messages: list[str]
    slow_results: list
    keys_checked: int
    keys_present: int
    mismatches: list[str]
    stats_before_stop: dict[str, str]
    exit_code: int | None
    killed: bool
    stop_seconds: float
    log: LogScan
    checks: list[Check]
    elapsed: float


def run_checks(outcome: Outcome) -> list[Check]:
    args = outcome.args
    stats = outcome.stats_before_stop
    checks = []

    total_errors = sum(outcome.errors.values())
    checks.append(Check("client errors", total_errors == 0, "%d errors in %d operations" % (total_errors, sum(outcome.ops.values()))))

    checks.append(
        Check(
            "acknowledged writes readable",
            not outcome.mismatches and outcome.keys_checked > 0,
            "%d owned keys read back (%d present, %d deleted or never written), %d differ from the last acknowledged write"
            % (outcome.keys_checked, outcome.keys_present, outcome.keys_checked - outcome.keys_present, len(outcome.mismatches)),
        )
    )

    evictions = int(stats.get("evictions", "-1"))
    checks.append(
        Check(
            "nothing evicted",
            evictions == 0,
            "evictions %d, item bytes %s of limit %s" % (evictions, stats.get("bytes"), stats.get("limit_maxbytes")),
        )
    )

    peak_threads = max(sample.threads for sample in [outcome.start, *outcome.samples, outcome.final])
    thread_limit = outcome.start.threads + args.threads + THREAD_SLACK
    checks.append(
        Check(
            "threads bounded",
            peak_threads <= thread_limit,
            "peak %d, after warm-up %d, limit %d (warm-up + pool %d + %d)"
            % (peak_threads, outcome.start.threads, thread_limit, args.threads, THREAD_SLACK),
        )
    )

    fd_limit = outcome.start.fds + FD_SLACK
    checks.append(
        Check(
            "file descriptors released",
            outcome.final.fds <= fd_limit,
            "%d after the clients closed, %d after warm-up, limit %d" % (outcome.final.fds, outcome.start.fds, fd_limit),
        )
    )

    peak_rss = max(sample.rss for sample in [*outcome.samples, outcome.final])
    growth = (peak_rss - outcome.start.rss) / MiB
    checks.append(
        Check(
            "RSS growth bounded",
            growth <= args.max_rss_growth,
            "peak %.1f MiB, after warm-up %.1f MiB, growth %.1f MiB, limit %.0f MiB"
            % (peak_rss / MiB, outcome.start.rss / MiB, growth, args.max_rss_growth),
        )
    )

    cut = [result for result in outcome.slow_results if "by the server" in result.outcome]
    checks.append(
        Check(
            "slow readers cut by the stall timeout",
            bool(outcome.slow_results) and len(cut) == len(outcome.slow_results),
            "%d of %d slow readers closed by the server; log has %d stall closures"
            % (len(cut), len(outcome.slow_results), outcome.log.expected["stall closure"]),
        )
    )

    streams = stats.get("streams_running")
    checks.append(
        Check(
            "streams finished",
            streams == "0",
            "streams_running %s, scans_open %s after the clients closed" % (streams, stats.get("scans_open")),
        )
    )

    # kvdaemon replaces twistd's SIGTERM handler, so a clean stop exits 0
    # instead of twistd re-raising the signal.
    stopped_cleanly = (
        outcome.exit_code == 0
        and not outcome.killed
        and outcome.log.shutdown_lines == len(SHUTDOWN_LINES)
        and outcome.log.cancelled_streams == STALLED_AT_STOP
        and outcome.log.streams_cancelled_at_stop == STALLED_AT_STOP
    )
    checks.append(
        Check(
            "clean stop on SIGTERM",
            stopped_cleanly,
            "%d of %d unread streams cancelled; exit code %s after %.1f s%s, %d of %d shutdown lines logged"
            % (
                outcome.log.cancelled_streams,
                STALLED_AT_STOP,
                outcome.exit_code,
                outcome.stop_seconds,
                ", needed SIGKILL" if outcome.killed else "",
                outcome.log.shutdown_lines,
                len(SHUTDOWN_LINES),
            ),
        )
    )

    checks.append(
        Check(
            "no unexpected log lines",
            not outcome.log.unexpected and bool(outcome.log.files),
            "%d unexpected in %d file(s); expected: %s"
            % (
                len(outcome.log.unexpected),
                len(outcome.log.files),
                ", ".join("%s %d" % item for item in outcome.log.expected.items()) or "none",
            ),
        )
    )
    return checks


def format_summary(outcome: Outcome) -> list[str]:
    args = outcome.args
    lines = [
        "Soak: %.0f s of load (%.0f s with start, checks and stop), %d connections (%s), seed %d"
        % (
            args.duration,
            outcome.elapsed,
            args.connections,
            ", ".join("%d %s" % (count, role) for role, count in sorted(outcome.roles.items())),
            args.seed,
        ),
        "Data: %d bulk keys of %d bytes; owned keys per worker: 100 plain (20 for abort workers), 10 counters, 40 range keys;"
        " values 1 byte to 64 KiB" % (args.bulk_items, args.bulk_value_size),
        "",
        "Operations:",
        "",
    ]
    rows = [[name, str(count), str(outcome.errors.get(name, 0))] for name, count in sorted(outcome.ops.items())]
    rows += [[name, "0", str(count)] for name, count in sorted(outcome.errors.items()) if name not in outcome.ops]
    rows.append(["total", str(sum(outcome.ops.values())), str(sum(outcome.errors.values()))])
    lines += _results.format_table(["worker operation", "completed", "errors"], rows)
    if outcome.messages:
        lines += ["", "First errors:", ""] + ["  " + message for message in outcome.messages[:20]]

    lines += ["", "Server samples (/proc/PID):", ""]
    sample_rows = [["after warm-up", str(outcome.start.threads), str(outcome.start.fds), "%.1f" % (outcome.start.rss / MiB)]]
    sample_rows += [
        ["%.0f s" % sample.seconds, str(sample.threads), str(sample.fds), "%.1f" % (sample.rss / MiB)] for sample in outcome.samples
    ]
    sample_rows.append(["clients closed", str(outcome.final.threads), str(outcome.final.fds), "%.1f" % (outcome.final.rss / MiB)])
    lines += _results.format_table(["when", "threads", "fds", "RSS MiB"], sample_rows)

    if outcome.slow_results:
        seconds = [result.seconds for result in outcome.slow_results]
        outcomes = Counter("%s %s" % (result.mode, result.outcome) for result in outcome.slow_results)
        lines += [
            "",
            "Slow readers: %s; seconds from rget to close: min %.1f, median %.1f, max %.1f (stall timeout %s s)"
            % (
                ", ".join("%d %s" % (count, name) for name, count in sorted(outcomes.items())),
                min(seconds),
                statistics.median(seconds),
                max(seconds),
                args.stall_timeout,
            ),
        ]
    stats = outcome.stats_before_stop
    lines += [
        "Server stats at the end: curr_items %s, bytes %s, total_connections %s, streams_started %s,"
        " streams_stalled %s, streams_cancelled %s, scans_created %s, scans_cancelled %s, range_items_deleted %s"
        % tuple(
            stats.get(name)
            for name in (
                "curr_items", "bytes", "total_connections", "streams_started", "streams_stalled",
                "streams_cancelled", "scans_created", "scans_cancelled", "range_items_deleted",
            )
        ),
        "Server log lines by level: %s" % ", ".join("%s %d" % item for item in sorted(outcome.log.levels.items())),
    ]
    if outcome.mismatches:
        lines += ["", "Keys that differ from the ledger (first 20):", ""] + ["  " + line for line in outcome.mismatches[:20]]
    if outcome.log.unexpected:
        lines += ["", "Unexpected log lines (first 20):", ""] + ["  " + line for line in outcome.log.unexpected[:20]]

    lines += ["", "Checks:", ""]
    lines += ["  %s  %s: %s" % ("PASS" if check.passed else "FAIL", check.name, check.detail) for check in outcome.checks]
    return lines


def record(outcome: Outcome, summary: list[str], argv: list[str]) -> None:
    command = " ".join(["python bench/soak.py", *map(shlex.quote, argv)])
    body = [
        "Recorded %s on %s, %s." % (_results.utc_timestamp(), _results.describe_machine(), _results.describe_checkout()),
        "",
        "Command, run from the repository root::",
        "",
        "    " + command,
        "",
        "Server::",
        "",
        "    " + outcome.server_command,
        "",
        "Output::",
        "",
        *("    " + line if line else "" for line in summary),
    ]
    _results.update_block("soak", "\n".join(body))


def run_load(args: argparse.Namespace, state: RunState, workers: list[Worker], pid: int, started: float) -> list[Sample]:
    """Run *workers* for ``args.duration`` seconds, sampling the server, and return the samples."""
    sampler = Sampler(pid, args.sample_interval, started)
    sampler.start()
    for worker in workers:
        worker.start()
    state.stop.wait(args.duration)
    state.stop.set()
    # A slow reader may be waiting for the stall timeout when the run ends.
    join_seconds = 4 * args.stall_timeout + 2 * READ_TIMEOUT
    join_deadline = time.monotonic() + join_seconds
    for worker in workers:
        worker.join(max(0.0, join_deadline - time.monotonic()))
    sampler.stop.set()
    sampler.join()
    hung = [worker.name for worker in workers if worker.is_alive()]
    if hung:
        raise _servers.BenchmarkError(
            "workers still running %.0f s after the end of the run: %s" % (join_seconds, ", ".join(hung))
        )
    return sampler.samples


def main(argv: list[str]) -> int:
    args = parse_arguments(argv)
    began = time.monotonic()
    log_directory = Path(tempfile.mkdtemp(prefix="kvdaemon-soak-"))
    log_path = log_directory / "kvdaemon.log"
    server = start_server(args, log_path)
    server_command = server.command_template().replace(str(log_path), "LOGFILE")
    print("started %s (pid %d), log %s" % (server.command_line(), server.pid, log_path), flush=True)
    try:
        state = RunState(server.port, args.bulk_items, args.bulk_value_size, args.stall_timeout)
        load_bulk(server.port, args.bulk_items, args.bulk_value_size)
        workers = make_workers(args.connections, state, args.seed)
        populate(workers)
        warm_up(state)
        time.sleep(1)
        started = time.monotonic()
        start = read_process(server.pid, started)
        print("warm-up done: %d threads, %d fds, %.1f MiB RSS; running %d workers for %.0f s"
              % (start.threads, start.fds, start.rss / MiB, len(workers), args.duration), flush=True)

        samples = run_load(args, state, workers, server.pid, started)
        print("load done after %.0f s; reading back the owned keys" % (time.monotonic() - started), flush=True)

        keys_checked, keys_present, mismatches = verify_ledgers(server.port, workers)
        final = wait_for_fds(server.pid, start.fds, started)
        stats = read_stats(server.port)
        stalled = open_stalled_streams(server.port, STALLED_AT_STOP)
        # Long enough for the replies to fill the socket buffers and pause
        # the streams, well short of the stall timeout.
        time.sleep(min(1.0, args.stall_timeout / 2))
    except BaseException:
        stop_server(server)
        server.stop()
        print("server log: %s" % log_path, file=sys.stderr)
        raise
    exit_code, killed, stop_seconds = stop_server(server)
    for connection in stalled:
        connection.close()
    log = scan_log([server.log_path, *log_files(log_path)])
    server.stop()

    ops, errors, messages = merge_counts(workers)
    slow_results = [result for worker in workers if isinstance(worker, SlowReaderWorker) for result in worker.results]
    outcome = Outcome(
        args=args,
        server_command=server_command,
        roles=Counter(worker.role for worker in workers),
        start=start,
        samples=samples,
        final=final,
        ops=ops,
        errors=errors,
        messages=messages,
        slow_results=slow_results,
        keys_checked=keys_checked,
        keys_present=keys_present,
        mismatches=mismatches,
        stats_before_stop=stats,
        exit_code=exit_code,
        killed=killed,
        stop_seconds=stop_seconds,
        log=log,
        checks=[],
        elapsed=0.0,
    )
    outcome.checks = run_checks(outcome)
    outcome.elapsed = time.monotonic() - began
    summary = format_summary(outcome)
    print("\n".join(summary))
    passed = all(check.passed for check in outcome.checks)
    if passed and not args.keep_log:
        for path in log.files:
            if path.parent == log_directory:
                path.unlink()
        log_directory.rmdir()
    else:
        print("server log kept in %s" % log_directory)
    if args.record:
        record(outcome, summary, argv)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
