"""
Compare kvdaemon with memcached on the same load, in one run.

Two benchmarks run against a fresh memcached and a fresh kvdaemon each, both
on 127.0.0.1:

throughput
    ``memcaslap -T 1 -c 16 -t 10s -X 100`` with 90% get and 10% set, against
    each server in turn.  The get/set proportion and the 64-byte keys come
    from a configuration file passed with ``-F``, so a ``~/.memaslap.cnf``
    cannot change them.  With ``--rounds N`` the servers take turns N times,
    in alternating order, and the median ops/s of each server is compared.
    ``--binary`` runs memcaslap with ``-B`` (binary protocol).

bulk load
    1,000,000 ``set KEY 0 0 100 noreply`` commands pipelined over one socket
    in chunks, followed by one ``version`` round trip so that the clock stops
    only after the server has processed every set.  The wall time and the
    server's RSS (``VmRSS``) after the load are compared.

The machine is shared, so only the ratios between servers measured in one
run are meaningful, not the absolute figures.  ``--record`` writes the
figures, the command line, the date and the machine into bench/RESULTS.rst.

A quick smoke run::

    python bench/bench_text.py --duration 2s --rounds 1 --items 10000
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import _bulk_load
import _memcaslap
import _results
import _servers

MiB = 1024 * 1024
THROUGHPUT_TARGET = 0.5
RSS_TARGET = 1.25
SERVER_NAMES = ("memcached", "kvdaemon")

DURATION_PATTERN = re.compile(r"^\d+[smhd]$")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

ResultT = TypeVar("ResultT")


@dataclass
class ThroughputResult:
    """All memcaslap runs against one server."""

    server: str
    runs: list[_memcaslap.RunSummary] = field(default_factory=list)

    @property
    def median_ops_per_second(self) -> float:
        return statistics.median(run.ops_per_second for run in self.runs)


# --- throughput: memcaslap ---------------------------------------------------


def build_memcaslap_argv(args: argparse.Namespace, address: str, config: Path) -> list[str]:
    argv = [
        args.memcaslap,
        "-s", address,
        "-T", str(args.client_threads),
        "-c", str(args.concurrency),
        "-t", args.duration,
        "-X", str(args.value_size),
        "-F", str(config),
    ]
    if args.binary:
        argv.append("-B")
    return argv


def duration_seconds(duration: str) -> int:
    return int(duration[:-1]) * DURATION_UNITS[duration[-1]]


def measure_throughput(
    args: argparse.Namespace, servers: list[_servers.RunningServer]
) -> list[ThroughputResult]:
    """
    Run memcaslap against each server, *args.rounds* times in alternating order.
    """
    results = {server.name: ThroughputResult(server.name) for server in servers}
    timeout = duration_seconds(args.duration) + 60
    with tempfile.TemporaryDirectory(prefix="bench-memcaslap-") as directory:
        config = _memcaslap.write_config(Path(directory), args.value_size, args.set_proportion)
        for round_index in range(args.rounds):
            order = servers if round_index % 2 == 0 else list(reversed(servers))
            for server in order:
                argv = build_memcaslap_argv(args, server.address, config)
                run = _memcaslap.run(argv, server, timeout)
                results[server.name].runs.append(run)
                print(
                    f"  round {round_index + 1}/{args.rounds} {server.name}:"
                    f" {run.ops_per_second} ops/s, {run.get_misses} get misses",
                    flush=True,
                )
    return [results[server.name] for server in servers]


# --- bulk load: pipelined noreply sets ---------------------------------------


def measure_bulk_load(
    args: argparse.Namespace, servers: list[_servers.RunningServer]
) -> list[_bulk_load.Result]:
    started = time.perf_counter()
    chunks = _bulk_load.build_chunks(args.items, args.value_size, args.chunk)
    size = sum(len(chunk) for chunk in chunks)
    print(
        f"  built {args.items} set commands ({size / MiB:.1f} MiB) in"
        f" {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    results = []
    for server in servers:
        result = _bulk_load.load(server, chunks, args.items, args.bulk_timeout)
        print(f"  {server.name}: {result.seconds:.2f} s", flush=True)
        results.append(result)
    return results


# --- servers -----------------------------------------------------------------


def start_servers(args: argparse.Namespace) -> list[_servers.RunningServer]:
    """Start the selected servers, and stop those already started if one fails."""
    started: list[_servers.RunningServer] = []
    try:
        for name in args.servers:
            if name == "memcached":
                server = _servers.start_memcached(
                    args.memcached_command,
                    args.memcached_port,
                    args.max_memory,
                    args.memcached_threads,
                )
            else:
                server = _servers.start_kvdaemon(
                    args.kvdaemon_command,
                    args.kvdaemon_port,
                    args.max_memory,
                    args.kvdaemon_args,
                    args.kvdaemon_pythonpath,
                )
            print(
                f"  started {describe_server(server)}, pid {server.pid},"
                f" on {server.address}: {server.command_line()}",
                flush=True,
            )
            started.append(server)
    except BaseException:
        stop_servers(started)
        raise
    return started


def stop_servers(servers: list[_servers.RunningServer]) -> None:
    for server in servers:
        server.stop()


# --- reports -----------------------------------------------------------------


def ratio_line(label: str, ratio: float, target: float, higher_is_better: bool) -> str:
    met = ratio >= target if higher_is_better else ratio <= target
    comparison = ">=" if higher_is_better else "<="
    verdict = "met" if met else "NOT met"
    return f"{label}: {ratio:.2f} (target {comparison} {target}: {verdict})"


def throughput_table(results: list[ThroughputResult]) -> list[str]:
    rounds = len(results[0].runs)
    header = ["Server", *(f"Round {i + 1} ops/s" for i in range(rounds)), "Median ops/s", "Get misses"]
    rows = [
        [
            result.server,
            *(str(run.ops_per_second) for run in result.runs),
            f"{result.median_ops_per_second:.0f}",
            str(sum(run.get_misses for run in result.runs)),
        ]
        for result in results
    ]
    return _results.format_table(header, rows)


def throughput_ratio(results: list[ThroughputResult]) -> float | None:
    by_name = {result.server: result for result in results}
    if set(by_name) != set(SERVER_NAMES):
        return None
    return by_name["kvdaemon"].median_ops_per_second / by_name["memcached"].median_ops_per_second


def bulk_table(results: list[_bulk_load.Result]) -> list[str]:
    header = ["Server", "Wall s", "Sets/s", "RSS idle MiB", "RSS loaded MiB", "curr_items", "Error replies"]
    rows = [
        [
            result.server,
            f"{result.seconds:.2f}",
            f"{result.items / result.seconds:.0f}",
            f"{result.rss_idle / MiB:.1f}",
            f"{result.rss_loaded / MiB:.1f}",
            "n/a" if result.stored_items is None else str(result.stored_items),
            f"{len(result.unexpected_output)} bytes",
        ]
        for result in results
    ]
    return _results.format_table(header, rows)


def bulk_ratios(results: list[_bulk_load.Result]) -> tuple[float, float] | None:
    """Return kvdaemon/memcached for wall time and loaded RSS, if both ran."""
    by_name = {result.server: result for result in results}
    if set(by_name) != set(SERVER_NAMES):
        return None
    kvdaemon, memcached = by_name["kvdaemon"], by_name["memcached"]
    return kvdaemon.seconds / memcached.seconds, kvdaemon.rss_loaded / memcached.rss_loaded


def bulk_warnings(results: list[_bulk_load.Result]) -> list[str]:
    warnings = []
    for result in results:
        if result.unexpected_output:
            warnings.append(
                f"WARNING: {result.server} sent {len(result.unexpected_output)} bytes"
                f" of replies to noreply sets, starting {result.unexpected_output[:80]!r}"
            )
        if result.stored_items is not None and result.stored_items != result.items:
            warnings.append(
                f"WARNING: {result.server} stores {result.stored_items} items"
                f" after {result.items} sets"
            )
    return warnings


def throughput_warnings(results: list[ThroughputResult]) -> list[str]:
    warnings = []
    for result in results:
        silent_runs = sum(1 for run in result.runs if run.read_bytes == 0)
        if silent_runs:
            warnings.append(
                f"WARNING: {result.server} sent no reply to memcaslap in"
                f" {silent_runs} of {len(result.runs)} rounds"
            )
    return warnings


def report_throughput(
    args: argparse.Namespace, results: list[ThroughputResult], log_warnings: list[str]
) -> list[str]:
    protocol = "binary" if args.binary else "text"
    lines = [
        f"memcaslap, {protocol} protocol, {1 - args.set_proportion:.0%} get /"
        f" {args.set_proportion:.0%} set, {args.value_size}-byte values,"
        f" -T {args.client_threads} -c {args.concurrency} -t {args.duration},"
        f" {args.rounds} round(s) in alternating order",
        "",
        *throughput_table(results),
    ]
    ratio = throughput_ratio(results)
    if ratio is not None:
        lines += ["", ratio_line("Median ops/s kvdaemon/memcached", ratio, THROUGHPUT_TARGET, True)]
    warnings = throughput_warnings(results) + log_warnings
    if warnings:
        lines += ["", *warnings]
    return lines


def report_bulk(
    args: argparse.Namespace, results: list[_bulk_load.Result], log_warnings: list[str]
) -> list[str]:
    lines = [
        f"Bulk load, {args.items} 'set KEY 0 0 {args.value_size} noreply' commands"
        f" over one connection in chunks of {args.chunk}, then one 'version' round trip",
        "",
        *bulk_table(results),
    ]
    ratios = bulk_ratios(results)
    if ratios is not None:
        time_ratio, rss_ratio = ratios
        lines += [
            "",
            f"Wall time kvdaemon/memcached: {time_ratio:.2f}",
            ratio_line("Loaded RSS kvdaemon/memcached", rss_ratio, RSS_TARGET, False),
        ]
    warnings = bulk_warnings(results) + log_warnings
    if warnings:
        lines += ["", *warnings]
    return lines


def record_block(
    name: str,
    args: argparse.Namespace,
    report: list[str],
    server_commands: list[tuple[str, str]],
    details: str = "",
) -> None:
    """
    Write *report* into the results page as block *name*, with the command
    line, date, machine and the servers' descriptions and commands.
    *details* is reST text placed before the list of servers.
    """
    body = [
        f"Recorded {_results.utc_timestamp()} on {_results.describe_machine()}.",
        "",
        "Command, run from the repository root::",
        "",
        f"    {args.command_line}",
        "",
        *(details.splitlines() + [""] if details else []),
        "Servers:",
        "",
        *(f"- {description}: ``{command}``" for description, command in server_commands),
        "",
        "Output::",
        "",
        *(f"    {line}" if line else "" for line in report),
    ]
    _results.update_block(name, "\n".join(body), args.results)


# --- command line ------------------------------------------------------------


def duration_argument(value: str) -> str:
    if not DURATION_PATTERN.match(value):
        raise argparse.ArgumentTypeError(
            f"invalid duration {value!r}: expected a number and a unit s, m, h or d, such as 10s"
        )
    return value


def servers_argument(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in SERVER_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"invalid server list {value!r}: use memcached, kvdaemon or both, comma-separated"
        )
    return names


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    load = parser.add_argument_group("load")
    load.add_argument("--duration", type=duration_argument, default="10s",
                      help="memcaslap run time per round (memcaslap -t)")
    load.add_argument("--rounds", type=int, default=3,
                      help="memcaslap runs per server, taken in turns")
    load.add_argument("--concurrency", type=int, default=16,
                      help="memcaslap concurrent clients (memcaslap -c)")
    load.add_argument("--client-threads", type=int, default=1,
                      help="memcaslap threads (memcaslap -T)")
    load.add_argument("--set-proportion", type=float, default=0.1,
                      help="fraction of memcaslap commands that are sets, the rest being gets")
    load.add_argument("--value-size", type=int, default=100,
                      help="value size in bytes, for memcaslap (-X) and the bulk load")
    load.add_argument("--binary", action="store_true",
                      help="run memcaslap with the binary protocol (memcaslap -B)")
    load.add_argument("--items", type=int, default=1_000_000,
                      help="number of sets in the bulk load")
    load.add_argument("--chunk", type=int, default=1000,
                      help="bulk load sets per send call")
    load.add_argument("--bulk-timeout", type=float, default=600.0,
                      help="seconds to wait for a server to process the bulk load")
    load.add_argument("--no-throughput", action="store_true", help="skip the memcaslap benchmark")
    load.add_argument("--no-bulk", action="store_true", help="skip the bulk load benchmark")

    servers = parser.add_argument_group("servers")
    servers.add_argument("--servers", type=servers_argument, default=list(SERVER_NAMES),
                         help="comma-separated servers to run (ratios need both)")
    servers.add_argument("--max-memory", type=int, default=_servers.DEFAULT_MAX_MEMORY_MIB,
                         help="item memory limit of both servers in MiB")
    servers.add_argument("--memcached-command", default=_servers.DEFAULT_MEMCACHED_COMMAND,
                         help="memcached executable and fixed options, to which"
                              " -l, -p, -U, -m and -t are appended")
    servers.add_argument("--memcached-threads", type=int,
                         default=_servers.DEFAULT_MEMCACHED_THREADS,
                         help="memcached worker threads (memcached -t)")
    servers.add_argument("--memcached-port", type=int, default=None,
                         help="memcached port on 127.0.0.1 (None picks a free port)")
    servers.add_argument("--kvdaemon-command", default=_servers.DEFAULT_KVDAEMON_COMMAND,
                         help="kvdaemon start command, run from the repository root, to"
                              " which --listen and --max-memory are appended")
    servers.add_argument("--kvdaemon-args", default="",
                         help="extra kvdaemon options, such as '--threads 2'")
    servers.add_argument("--kvdaemon-pythonpath", default=str(_servers.REPO_ROOT),
                         help="directory put first on kvdaemon's PYTHONPATH, so that the"
                              " checkout's code runs rather than an installed copy"
                              " (an empty string leaves PYTHONPATH as it is)")
    servers.add_argument("--kvdaemon-port", type=int, default=None,
                         help="kvdaemon port on 127.0.0.1 (None picks a free port)")
    servers.add_argument("--memcaslap", default="memcaslap",
                         help="memcaslap executable (Debian's name for libmemcached's memaslap)")

    output = parser.add_argument_group("output")
    output.add_argument("--record", action="store_true",
                        help="write the figures into the results page")
    output.add_argument("--results", type=Path, default=_results.RESULTS_PATH,
                        help="results page that --record updates")

    args = parser.parse_args(argv)
    for name in ("rounds", "concurrency", "client_threads", "value_size", "items", "chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.set_proportion <= 1:
        parser.error(f"--set-proportion must be between 0 and 1, got {args.set_proportion}")
    if args.no_throughput and args.no_bulk:
        parser.error("--no-throughput and --no-bulk together leave nothing to run")
    if args.record and set(args.servers) != set(SERVER_NAMES):
        parser.error("--record needs both servers, because the page records ratios")

    args.command_line = shlex.join(["python", "bench/bench_text.py", *argv])
    return args


def describe_server(server: _servers.RunningServer) -> str:
    if server.name == "kvdaemon":
        return (
            f"kvdaemon {kvdaemon_version()} ({_results.describe_checkout()}),"
            f" which reports version {server.version}"
        )
    return f"{server.name} {server.version}"


def kvdaemon_version() -> str:
    try:
        return importlib.metadata.version("kvdaemon")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def server_log_warnings(servers: list[_servers.RunningServer]) -> list[str]:
    warnings = []
    for server in servers:
        errors = server.logged_errors()
        if errors:
            warnings.append(
                f"WARNING: {server.name} logged {len(errors)} distinct exception(s),"
                f" such as {errors[0]!r}"
            )
    return warnings


@dataclass
class PhaseOutcome(Generic[ResultT]):
    """The results of one benchmark, with its servers' log warnings and commands."""

    results: list[ResultT]
    #: Warnings about exceptions in the servers' logs.
    log_warnings: list[str]
    #: Each server's description and its command with the port as ``PORT``.
    server_commands: list[tuple[str, str]]


def run_phase(
    args: argparse.Namespace,
    title: str,
    measure: Callable[[argparse.Namespace, list[_servers.RunningServer]], list[ResultT]],
) -> PhaseOutcome[ResultT]:
    """Start fresh servers, run *measure* on them and stop them again."""
    print(f"{title}:", flush=True)
    servers = start_servers(args)
    try:
        results = measure(args, servers)
        return PhaseOutcome(
            results=results,
            log_warnings=server_log_warnings(servers),
            server_commands=[
                (describe_server(server), server.command_template()) for server in servers
            ],
        )
    finally:
        stop_servers(servers)


def run_throughput(args: argparse.Namespace) -> list[str]:
    """Run the memcaslap benchmark, record it if requested and return the report."""
    outcome = run_phase(args, "Throughput", measure_throughput)
    report = report_throughput(args, outcome.results, outcome.log_warnings)
    if args.record:
        protocol = "binary" if args.binary else "text"
        memcaslap_argv = build_memcaslap_argv(args, f"{_servers.HOST}:PORT", Path("CONFIG"))
        details = (
            "memcaslap command per server and round, where CONFIG sets 64-byte"
            f" keys, {args.value_size}-byte values and the get/set proportion::\n"
            f"\n    {shlex.join(memcaslap_argv)}\n"
        )
        name = f"throughput-{protocol}"
        if args.memcached_threads != _servers.DEFAULT_MEMCACHED_THREADS:
            # Runs against memcached with other thread counts keep their
            # own block, beside the default comparison.
            name += f"-memcached-t{args.memcached_threads}"
        record_block(name, args, report, outcome.server_commands, details)
    return report


def run_bulk_load(args: argparse.Namespace) -> list[str]:
    """Run the bulk load benchmark, record it if requested and return the report."""
    outcome = run_phase(args, "Bulk load", measure_bulk_load)
    report = report_bulk(args, outcome.results, outcome.log_warnings)
    if args.record:
        record_block("bulk-load", args, report, outcome.server_commands)
    return report


def main(argv: list[str]) -> int:
    args = parse_arguments(argv)
    reports = []
    try:
        if not args.no_throughput:
            reports.append(run_throughput(args))
        if not args.no_bulk:
            reports.append(run_bulk_load(args))
    except (_servers.ServerStartError, _servers.BenchmarkError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    for report in reports:
        print()
        print("\n".join(report))
    if args.record:
        print(f"\nRecorded in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
