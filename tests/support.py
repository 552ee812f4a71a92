"""
Helpers shared by the tests: an in-process kvdaemon on a real socket, a
real memcached subprocess as the reference, and fakes for stepping the
worker pool and the reactor by hand.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from kvdaemon import KVDaemonFactory, KVDaemonService, Settings
from kvdaemon.testing import SteppedReactor, SteppedThreadPool

MEMCACHED = shutil.which("memcached") or "/usr/bin/memcached"


@defer.inlineCallbacks
def start_server(testcase: TestCase, settings: Settings | None = None, listen: str = "tcp:0:interface=127.0.0.1"):
    """
    Start a kvdaemon service on the real reactor, listening on a free port
    of 127.0.0.1, and stop it when ``testcase`` ends.

    :return: a Deferred firing with ``(service, port number)``.
    """
    service = KVDaemonService(settings or Settings(threads=2), [listen], reactor=reactor)
    service.startService()
    testcase.addCleanup(service.stopService)
    yield defer.succeed(None)
    port = service.ports[0].getHost().port if listen.startswith("tcp") else 0
    return service, port


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """Block until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class MemcachedProcess:
    """A real memcached on 127.0.0.1, the reference that kvdaemon's replies are compared with."""

    def __init__(self, *args: str) -> None:
        if not os.path.exists(MEMCACHED):
            # A failure, not a skip: a missing reference server must not
            # let the comparison tests pass unnoticed.
            raise RuntimeError("memcached is not installed at %s; .ci/run installs the Debian package memcached" % MEMCACHED)
        self.port = free_port()
        command = [MEMCACHED, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", *args]
        if os.geteuid() == 0:
            command += ["-u", "root"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        """
        Stop this memcached by its pid and wait for it to exit.

        SIGKILL, because memcached takes up to a second to exit on SIGTERM
        and a reference server has nothing to save.
        """
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def exchange(port: int, request: bytes, expect_close: bool = False, timeout: float = 5.0) -> bytes:
    """
    Send ``request`` to 127.0.0.1:``port`` over a blocking socket and
    return everything received until the server closes the connection (when
    ``expect_close``) or stays quiet for 0.2 seconds.

    Blocking: call it from a thread (``threads.deferToThread``) when the
    server runs on this process's reactor.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        s.settimeout(timeout if expect_close else 0.2)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


# The fakes that step worker threads and the reactor by hand are part of
# kvdaemon's public testing module; the tests use them under these names.
FakeThreadPool = SteppedThreadPool
FakeReactor = SteppedReactor


class Client:
    """One connection to ``factory`` over a ``StringTransport``."""

    def __init__(self, factory: KVDaemonFactory, port: int = 40000) -> None:
        peer = IPv4Address("TCP", "127.0.0.1", port)
        self.protocol = factory.buildProtocol(peer)
        self.transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 11211))
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        """Deliver ``data`` as one read and return what the server wrote in reply."""
        self.protocol.dataReceived(data)
        output = self.transport.value()
        self.transport.clear()
        return output

    def send_chunks(self, chunks: list[bytes]) -> bytes:
        """Deliver ``chunks`` as separate reads and return all the replies."""
        return b"".join(self.send(chunk) for chunk in chunks)

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


def send_and_read(connection: socket.socket, data: bytes, terminator: bytes = b"\r\n") -> bytes:
    """Send ``data`` on a blocking socket and read until the reply ends with ``terminator`` or the server closes."""
    connection.sendall(data)
    received = b""
    while not received.endswith(terminator):
        chunk = connection.recv(65536)
        if not chunk:
            break
        received += chunk
    return received
