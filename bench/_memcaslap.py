"""
Run memcaslap, the load generator of libmemcached, and parse its summary.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import _servers

# memcaslap prints this summary line at the end of a run, for example
# "Run time: 10.0s Ops: 1075218 TPS: 107497 Net_rate: 25.5M/s".
SUMMARY_PATTERN = re.compile(r"^Run time: ([\d.]+)s Ops: (\d+) TPS: (\d+)", re.MULTILINE)
COUNTER_PATTERN = re.compile(r"^(cmd_get|cmd_set|get_misses|read_bytes): (\d+)$", re.MULTILINE)


@dataclass
class RunSummary:
    """The figures that memcaslap prints at the end of one run."""

    seconds: float
    ops: int
    ops_per_second: int
    cmd_get: int
    cmd_set: int
    get_misses: int
    #: Bytes received from the server, which is 0 when the server never replied.
    read_bytes: int


def write_config(directory: Path, value_size: int, set_proportion: float) -> Path:
    """
    Write a memcaslap configuration file and return its path.

    In memcaslap's ``cmd`` section, command type 0 is set and 1 is get.
    """
    path = directory / "memcaslap.cnf"
    path.write_text(
        "key\n"
        "64 64 1\n"
        "value\n"
        f"{value_size} {value_size} 1\n"
        "cmd\n"
        f"0 {set_proportion:.3f}\n"
        f"1 {1 - set_proportion:.3f}\n"
    )
    return path


def parse_output(output: str) -> RunSummary:
    summaries = SUMMARY_PATTERN.findall(output)
    if not summaries:
        raise ValueError("memcaslap output has no 'Run time: ... TPS: ...' summary line")
    seconds, ops, ops_per_second = summaries[-1]
    counters = {name: int(value) for name, value in COUNTER_PATTERN.findall(output)}
    missing = {"cmd_get", "cmd_set", "get_misses", "read_bytes"} - counters.keys()
    if missing:
        raise ValueError(f"memcaslap output has no {', '.join(sorted(missing))} line")
    return RunSummary(
        seconds=float(seconds),
        ops=int(ops),
        ops_per_second=int(ops_per_second),
        cmd_get=counters["cmd_get"],
        cmd_set=counters["cmd_set"],
        get_misses=counters["get_misses"],
        read_bytes=counters["read_bytes"],
    )


def run(argv: list[str], server: _servers.RunningServer, timeout: float) -> RunSummary:
    try:
        completed = subprocess.run(
            argv, capture_output=True, text=True, errors="replace", timeout=timeout
        )
    except FileNotFoundError as error:
        raise _servers.BenchmarkError(
            f"memcaslap executable {argv[0]!r} not found. Install libmemcached-tools"
            " or pass its path with --memcaslap."
        ) from error
    except subprocess.TimeoutExpired as error:
        raise _servers.BenchmarkError(
            f"memcaslap against {server.name} timed out after {timeout:.0f} s:"
            f" {shlex.join(argv)}"
        ) from error
    output = completed.stdout + completed.stderr
    if server.process.poll() is not None:
        raise _servers.BenchmarkError(
            f"{server.name} exited with code {server.process.returncode} during"
            f" the memcaslap run. Server log:\n{server.log_tail()}"
        )
    if completed.returncode != 0:
        raise _servers.BenchmarkError(
            f"memcaslap against {server.name} failed with exit code"
            f" {completed.returncode}: {shlex.join(argv)}\n{output[-2000:]}"
        )
    try:
        return parse_output(output)
    except ValueError as error:
        raise _servers.BenchmarkError(
            f"could not parse memcaslap output for {server.name}: {error}\n{output[-2000:]}"
        ) from error
