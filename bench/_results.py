"""
Describe the benchmark machine and update sections of ``bench/RESULTS.rst``.

Each recorded benchmark owns one block of the page, delimited by the reST
comments ``.. results:begin NAME`` and ``.. results:end NAME``.  Recording
replaces the text between them and leaves the rest of the page as written.
A block that is missing is appended at the end of the page.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.rst"


def describe_machine() -> str:
    """Return the CPU model, core count, kernel and Python version as one line."""
    cpu_model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu_model}, {os.cpu_count()} cores shared with other jobs,"
        f" Linux {platform.release()}, Python {platform.python_version()}"
    )


def describe_checkout(paths: tuple[str, ...] = ("kvdaemon", "twisted")) -> str:
    """
    Return the short commit of the repository, noting uncommitted changes
    under *paths*, which hold the server code.
    """
    root = RESULTS_PATH.parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--", *paths],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    if changes:
        return f"commit {commit} with uncommitted changes"
    return f"commit {commit}"


def utc_timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def format_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Render a reST simple table, which also reads as a plain-text table."""
    widths = [
        max(len(row[column]) for row in [header, *rows])
        for column in range(len(header))
    ]
    rule = "  ".join("=" * width for width in widths)

    def render(row: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()

    return [rule, render(header), rule, *(render(row) for row in rows), rule]


def _block_pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"^\.\. results:begin {re.escape(name)}\n.*?^\.\. results:end {re.escape(name)}\n",
        re.MULTILINE | re.DOTALL,
    )


def update_block(name: str, body: str, path: Path = RESULTS_PATH) -> None:
    """
    Replace the block *name* in *path* with *body*, or append it if missing.

    *body* is reST text, written between the block's begin and end comments
    with a blank line on each side.
    """
    block = (
        f".. results:begin {name}\n\n{body.strip()}\n\n.. results:end {name}\n"
    )
    text = path.read_text() if path.exists() else ""
    pattern = _block_pattern(name)
    if pattern.search(text):
        text = pattern.sub(lambda _match: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block if text else block
    path.write_text(text)
