"""
Load a server with pipelined ``set ... noreply`` commands over one connection
and time it, measuring the server's RSS before and after.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass

import _servers


@dataclass
class Result:
    """The outcome of the pipelined ``set ... noreply`` load on one server."""

    server: str
    items: int
    seconds: float
    rss_idle: int
    rss_loaded: int
    #: ``curr_items`` from ``stats`` after the load, or None when the server
    #: sent no such statistic.
    stored_items: int | None
    #: Bytes the server sent before the ``VERSION`` reply.  ``noreply`` sets
    #: produce no output, so anything here is an error reply.
    unexpected_output: bytes


def build_chunks(items: int, value_size: int, chunk_size: int) -> list[bytes]:
    """
    Return the bulk load as ``set`` commands joined into chunks of *chunk_size*.

    Keys are ``bulk:`` and a 10-digit index, so every item is distinct.
    """
    value = b"x" * value_size
    header_tail = f" 0 0 {value_size} noreply\r\n".encode()
    command_tail = value + b"\r\n"
    chunks = []
    for start in range(0, items, chunk_size):
        stop = min(start + chunk_size, items)
        chunks.append(
            b"".join(
                b"set bulk:%010d" % index + header_tail + command_tail
                for index in range(start, stop)
            )
        )
    return chunks


class ReplyCollector(threading.Thread):
    """
    Read from a socket until a ``VERSION ...`` line arrives, keeping what came
    before it.

    Reading runs on its own thread so that error replies to the pipelined
    sets cannot fill the socket buffers and block both sides.
    """

    def __init__(self, connection: socket.socket) -> None:
        super().__init__(daemon=True)
        self.connection = connection
        self.received = bytearray()
        self.error: Exception | None = None
        self.version_seen = False

    def run(self) -> None:
        try:
            while True:
                chunk = self.connection.recv(65536)
                if not chunk:
                    return
                self.received += chunk
                if re.search(rb"(^|\r\n)VERSION [^\r\n]*\r\n$", self.received):
                    self.version_seen = True
                    return
        except OSError as error:
            self.error = error

    def output_before_version(self) -> bytes:
        end = self.received.rfind(b"VERSION ")
        return bytes(self.received[:end])


def read_stats(port: int, timeout: float = 10.0) -> dict[str, str]:
    """Return the ``stats`` reply as a dict, or an empty dict on an error reply."""
    with socket.create_connection((_servers.HOST, port), timeout=timeout) as connection:
        connection.sendall(b"stats\r\n")
        reply = b""
        while not (reply.endswith(b"END\r\n") or reply.endswith(b"ERROR\r\n")):
            chunk = connection.recv(65536)
            if not chunk:
                break
            reply += chunk
    stats = {}
    for line in reply.decode("ascii", "replace").splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == "STAT":
            stats[parts[1]] = parts[2]
    return stats


def load(
    server: _servers.RunningServer, chunks: list[bytes], items: int, timeout: float
) -> Result:
    """Send *chunks* to *server* over one connection and time it to the ``version`` reply."""
    rss_idle = server.rss_bytes()
    with socket.create_connection((_servers.HOST, server.port), timeout=timeout) as connection:
        collector = ReplyCollector(connection)
        collector.start()
        started = time.perf_counter()
        for chunk in chunks:
            connection.sendall(chunk)
        connection.sendall(b"version\r\n")
        collector.join(timeout)
        seconds = time.perf_counter() - started
    rss_loaded = server.rss_bytes()

    if not collector.version_seen:
        reason = collector.error or "connection closed or timed out"
        raise _servers.BenchmarkError(
            f"bulk load on {server.name} failed because no VERSION reply followed"
            f" the sets ({reason}). Server log:\n{server.log_tail()}"
        )
    stored = read_stats(server.port).get("curr_items")
    return Result(
        server=server.name,
        items=items,
        seconds=seconds,
        rss_idle=rss_idle,
        rss_loaded=rss_loaded,
        stored_items=int(stored) if stored is not None else None,
        unexpected_output=collector.output_before_version(),
    )
