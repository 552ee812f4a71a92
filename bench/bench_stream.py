"""
Benchmark kvdaemon's streaming range operations, with memcached beside it
where memcached has the same operation.

In one run:

1. The same keys are loaded into a fresh kvdaemon and a fresh memcached
   (``-m 2048``, so nothing is evicted).
2. ``lru_crawler metadump all`` on each: keys/s, MB/s and the ratio.
3. ``rget`` of every value on kvdaemon: MB/s, and the reactor hops
   (``callFromThread`` hand-offs) per MB, from kvdaemon's ``stats``.
4. Latency of single ``get`` requests from a second client, p50 and p99,
   while a full-value ``rget`` streams, against the same with no scan.
5. Memory over time for a large ``rget`` to a client that reads nothing
   for a while and then reads everything.  It runs with the spool cap on
   and, for contrast, with it disabled (a benchmark-only server option).
   Both runs are drawn in one PNG plot.

Run ``python bench/bench_stream.py --help`` for the sizes; ``--record``
writes the figures into ``bench/RESULTS.rst``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.synchronize
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _results  # noqa: E402
import _servers  # noqa: E402

HOST = _servers.HOST
BENCH_DIR = Path(__file__).resolve().parent
PLOT_PATH = BENCH_DIR / "stream_memory.png"

#: Bytes per ``recv`` call of the reading clients.
READ_SIZE = 256 * 1024


def connect(port: int) -> socket.socket:
    """Open a blocking connection to ``127.0.0.1:port``."""
    connection = socket.create_connection((HOST, port), timeout=120)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def load_items(port: int, items: int, value_size: int, prefix: bytes = b"key:") -> float:
    """
    Store ``items`` keys ``PREFIX%010d`` with ``value_size``-byte values
    through pipelined ``noreply`` sets; return the seconds it took.
    """
    value = b"v" * value_size
    started = time.monotonic()
    with connect(port) as connection:
        batch = []
        for number in range(items):
            batch.append(b"set %s%010d 0 0 %d noreply\r\n%s\r\n" % (prefix, number, value_size, value))
            if len(batch) == 1000:
                connection.sendall(b"".join(batch))
                batch = []
        batch.append(b"version\r\n")
        connection.sendall(b"".join(batch))
        read_until(connection, b"\r\n")
    return time.monotonic() - started


def read_until(connection: socket.socket, terminator: bytes) -> tuple[int, int, float]:
    """
    Read until the received bytes end with ``terminator``.

    :return: bytes read, newline count and seconds from the first byte
        received to the last.
    """
    total = 0
    newlines = 0
    first_byte_at = None
    tail = b""
    while True:
        chunk = connection.recv(READ_SIZE)
        if not chunk:
            raise ConnectionError("the server closed the connection after %d bytes" % total)
        if first_byte_at is None:
            first_byte_at = time.monotonic()
        total += len(chunk)
        newlines += chunk.count(b"\n")
        tail = (tail + chunk)[-len(terminator) - 8 :]
        if tail.endswith(terminator):
            return total, newlines, time.monotonic() - first_byte_at


def read_stats(port: int) -> dict[str, str]:
    """Return the general ``stats`` of the server on ``port``."""
    with connect(port) as connection:
        connection.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            data += connection.recv(65536)
    stats = {}
    for line in data.decode().splitlines():
        parts = line.split(" ", 2)
        if parts[0] == "STAT":
            stats[parts[1]] = parts[2]
    return stats


def time_request(port: int, request: bytes, terminator: bytes) -> tuple[int, int, float]:
    """Send ``request`` and read its whole reply; return bytes, lines and seconds (request sent to last byte)."""
    with connect(port) as connection:
        started = time.monotonic()
        connection.sendall(request)
        total, lines, _ = read_until(connection, terminator)
        return total, lines, time.monotonic() - started


def get_latencies(port: int, keys: int, count: int, stop: threading.Event | None = None) -> list[float]:
    """Time ``count`` single ``get`` requests on one connection, in seconds each."""
    latencies = []
    with connect(port) as connection:
        for number in range(count):
            if stop is not None and stop.is_set():
                break
            key = b"key:%010d" % ((number * 7919) % keys)
            started = time.monotonic()
            connection.sendall(b"get %s\r\n" % key)
            read_until(connection, b"END\r\n")
            latencies.append(time.monotonic() - started)
    return latencies


def percentile(samples: list[float], fraction: float) -> float:
    """Return the ``fraction`` quantile of ``samples`` (nearest rank)."""
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


def scan_until_stopped(port: int, stop: multiprocessing.synchronize.Event) -> None:
    """Run full-value ``rget`` requests back to back until ``stop`` is set (in a child process)."""
    while not stop.is_set():
        time_request(port, b"rget 1 1 0 !\r\n", b"END\r\n")


def measure_latency_during_scan(port: int, keys: int, count: int) -> dict[str, float]:
    """
    Return p50/p99 get latency (ms) idle and while full-value rgets stream
    to another client.

    The scanning client runs in its own process, so that reading the scan
    does not hold this process's interpreter lock while a get is timed.
    """
    idle = get_latencies(port, keys, count)

    stop = multiprocessing.Event()
    scanner = multiprocessing.Process(target=scan_until_stopped, args=(port, stop), daemon=True)
    scanner.start()
    time.sleep(0.5)
    busy = get_latencies(port, keys, count)
    stop.set()
    scanner.join(300)
    return {
        "idle_p50": percentile(idle, 0.50) * 1000,
        "idle_p99": percentile(idle, 0.99) * 1000,
        "scan_p50": percentile(busy, 0.50) * 1000,
        "scan_p99": percentile(busy, 0.99) * 1000,
    }


def sample_memory(server: _servers.RunningServer, stop: threading.Event, samples: list[tuple[float, int]], started: float) -> None:
    """Append (seconds since ``started``, RSS bytes) every 0.1 s until ``stop`` is set."""
    while not stop.is_set():
        samples.append((time.monotonic() - started, server.rss_bytes()))
        time.sleep(0.1)


def measure_stalled_reader(server: _servers.RunningServer, stall_seconds: float) -> dict[str, object]:
    """
    Start a full-value rget, read nothing for ``stall_seconds``, then read
    everything; return the RSS samples and the growth during the stall.
    """
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    started = time.monotonic()
    sampler = threading.Thread(target=sample_memory, args=(server, stop, samples, started), daemon=True)
    sampler.start()
    time.sleep(1.0)
    baseline = server.rss_bytes()
    with connect(server.port) as connection:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        connection.sendall(b"rget 1 1 0 !\r\n")
        stall_started = time.monotonic()
        time.sleep(stall_seconds)
        stalled_peak = max(rss for at, rss in samples if at >= stall_started - started)
        read_started = time.monotonic()
        total, _, _ = read_until(connection, b"END\r\n")
        read_seconds = time.monotonic() - read_started
    time.sleep(1.0)
    stop.set()
    sampler.join(10)
    return {
        "samples": samples,
        "baseline": baseline,
        "stall_growth": stalled_peak - baseline,
        "peak_growth": max(rss for _, rss in samples) - baseline,
        "bytes": total,
        "read_seconds": read_seconds,
        "stall_started": stall_started - started,
        "read_started": read_started - started,
    }


def draw_memory_plot(bounded: dict[str, object], unbounded: dict[str, object], path: Path) -> None:
    """Draw RSS over time for both runs into a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5))
    for label, run in (("spool cap on (default)", bounded), ("spool cap disabled", unbounded)):
        samples = run["samples"]
        baseline = run["baseline"]
        axes.plot([at for at, _ in samples], [(rss - baseline) / 2**20 for _, rss in samples], label=label)
    axes.axvline(bounded["stall_started"], color="grey", linestyle=":", label="rget sent, client stalls")
    axes.axvline(bounded["read_started"], color="grey", linestyle="--", label="client starts reading")
    axes.set_xlabel("seconds")
    axes.set_ylabel("server RSS growth (MiB)")
    axes.set_title("kvdaemon RSS during a %d MB rget to a stalled reader" % (int(bounded["bytes"]) // 10**6))
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000, help="keys loaded for metadump, rget and latency (default 1,000,000)")
    parser.add_argument("--value-size", type=int, default=100, help="value bytes for those keys (default 100)")
    parser.add_argument("--latency-gets", type=int, default=20_000, help="gets timed for each latency figure (default 20,000)")
    parser.add_argument("--stall-items", type=int, default=1_000_000, help="keys for the stalled-reader run (default 1,000,000)")
    parser.add_argument("--stall-value-size", type=int, default=1000, help="value bytes for the stalled-reader run (default 1000: about 1 GB)")
    parser.add_argument("--stall-seconds", type=float, default=10.0, help="seconds the stalled reader reads nothing (default 10)")
    parser.add_argument("--skip-stall", action="store_true", help="skip the stalled-reader runs and the plot")
    parser.add_argument("--kvdaemon-args", default="", help="extra twistd kvdaemon options, e.g. '--switch-interval 0.2'")
    parser.add_argument("--record", action="store_true", help="write the figures into bench/RESULTS.rst")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_arguments(argv)
    lines: list[str] = []

    kvdaemon = _servers.start_kvdaemon(max_memory_mib=4096, extra_args=args.kvdaemon_args)
    memcached = _servers.start_memcached()
    try:
        for server in (kvdaemon, memcached):
            seconds = load_items(server.port, args.items, args.value_size)
            print("loaded %d items into %s in %.1f s" % (args.items, server.name, seconds))

        dumps = {}
        for server in (kvdaemon, memcached, kvdaemon, memcached):
            total, keys, seconds = time_request(server.port, b"lru_crawler metadump all\r\n", b"END\r\n")
            dumps.setdefault(server.name, []).append((keys - 1, total, seconds))
        rows = []
        rates = {}
        for name, runs in dumps.items():
            keys, total, seconds = min(runs, key=lambda run: run[2])
            rates[name] = keys / seconds
            rows.append([name, "%d" % keys, "%.2f" % seconds, "%.0f" % (keys / seconds), "%.1f" % (total / seconds / 1e6)])
        lines += ["``lru_crawler metadump all`` (best of 2 each):", ""]
        lines += _results.format_table(["server", "lines", "seconds", "keys/s", "MB/s"], rows)
        metadump_ratio = rates["kvdaemon"] / rates["memcached"]
        lines += ["", "metadump keys/s ratio kvdaemon/memcached: %.2f (target >= 1.0)" % metadump_ratio, ""]

        before = read_stats(kvdaemon.port)
        total, _, seconds = time_request(kvdaemon.port, b"rget 1 1 0 !\r\n", b"END\r\n")
        after = read_stats(kvdaemon.port)
        hops = int(after["stream_reactor_hops"]) - int(before["stream_reactor_hops"])
        streamed = int(after["stream_bytes"]) - int(before["stream_bytes"])
        lines += [
            "``rget`` of all %d values on kvdaemon: %.1f MB in %.2f s, %.1f MB/s." % (args.items, total / 1e6, seconds, total / seconds / 1e6),
            "Reactor hops per MB streamed: %.2f (%d hops for %.1f MB; target <= 16)." % (hops / (streamed / 1e6), hops, streamed / 1e6),
            "",
        ]

        latency = measure_latency_during_scan(kvdaemon.port, args.items, args.latency_gets)
        lines += ["Single ``get`` latency from a second client (%d gets each, ms):" % args.latency_gets, ""]
        lines += _results.format_table(
            ["condition", "p50", "p99"],
            [
                ["no scan running", "%.3f" % latency["idle_p50"], "%.3f" % latency["idle_p99"]],
                ["full-value rget streaming", "%.3f" % latency["scan_p50"], "%.3f" % latency["scan_p99"]],
            ],
        )
        lines += ["", "p99 during scan / p99 idle: %.2f (target <= 3)" % (latency["scan_p99"] / latency["idle_p99"]), ""]
    finally:
        kvdaemon.stop()
        memcached.stop()

    if not args.skip_stall:
        runs = {}
        for label, extra in (("bounded", ""), ("unbounded", "--benchmark-unbounded-spool")):
            server = _servers.start_kvdaemon(max_memory_mib=8192, extra_args=" ".join((args.kvdaemon_args, extra)))
            try:
                load_items(server.port, args.stall_items, args.stall_value_size)
                runs[label] = measure_stalled_reader(server, args.stall_seconds)
            finally:
                server.stop()
        # Only a recorded run replaces the plot that RESULTS.rst links to.
        plot_path = PLOT_PATH if args.record else Path(tempfile.gettempdir()) / PLOT_PATH.name
        draw_memory_plot(runs["bounded"], runs["unbounded"], plot_path)
        print("memory plot written to %s" % plot_path)
        rows = [
            [
                label,
                "%.1f" % (runs[label]["bytes"] / 1e6),
                "%.1f" % (runs[label]["stall_growth"] / 2**20),
                "%.1f" % (runs[label]["peak_growth"] / 2**20),
            ]
            for label in ("bounded", "unbounded")
        ]
        lines += [
            "Server RSS growth during a ``rget`` to a client that reads nothing for %.0f s, then everything"
            " (plot: `stream_memory.png <stream_memory.png>`_):" % args.stall_seconds,
            "",
        ]
        lines += _results.format_table(["spool", "MB sent", "growth while stalled (MiB)", "peak growth (MiB)"], rows)
        lines += ["", "Target: growth while stalled <= 4 MiB with the spool cap on.", ""]

    report = "\n".join(lines)
    print(report)
    if args.record:
        command = "python bench/bench_stream.py " + " ".join(argv)
        body = "\n".join(
            [
                "Streaming",
                "---------",
                "",
                "Recorded %s on %s, %s." % (_results.utc_timestamp(), _results.describe_machine(), _results.describe_checkout()),
                "Command: ``%s``" % command.strip(),
                "",
                report,
            ]
        )
        _results.update_block("stream", body)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
