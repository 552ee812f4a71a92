"""
Tests that kvdaemon serves over a TLS endpoint (``ssl:`` in ``--listen``).

Behind Twisted's TLS layer (``twisted.protocols.tls``) a connection's
transport is a ``TLSMemoryBIOProtocol`` wrapping the TCP transport.  The
TLS layer registers a stand-in for the connection as the TCP transport's
producer, so a full TCP buffer pauses the connection and its range stream
as it does without TLS.  The tests check this with a client that stops
reading.  They also check the certificates that real clients verify, and
run the README's ``twistd`` command.

The server runs in this process on 127.0.0.1 with the real reactor, and the
blocking clients (Python's ``ssl`` module, pymemcache) run in threads.
Certificates are made for each test with ``cryptography``: a root
authority, an intermediate authority it signed, and a server certificate
the intermediate signed for the IP address 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
import shlex
import shutil
import socket
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import OpenSSL.SSL
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pymemcache.client.base import Client as PymemcacheClient
from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from kvdaemon import Settings
from tests.support import free_port, send_and_read, start_server
from tests.test_ranges import (
    SMALL_RECEIVE_BUFFER,
    fill_store,
    parse_values,
    read_until,
    value_for,
    wait_until,
)
from tests.test_twistd import REPOSITORY, spawn_twistd, stop_twistd

MiB = 1024 * 1024

README = REPOSITORY / "README.rst"

#: The IP address the server certificates are issued for.
SERVER_ADDRESS = "127.0.0.1"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

#: The 2048-bit finite-field group ffdhe2048 of RFC 7919, as written by
#: ``openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048``.
FFDHE2048_PARAMETERS = b"""\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

#: A TLS 1.2 cipher suite with finite-field Diffie-Hellman key exchange.
DHE_CIPHER = "DHE-RSA-AES128-GCM-SHA256"


@attrs.frozen
class CertificateFiles:
    """PEM files for a TLS server and the clients that verify it."""

    #: The root authority's certificate, which clients trust.
    root: Path
    #: The intermediate authority's certificate (``extraCertChain=``).
    chain: Path
    #: The server's certificate, signed by the intermediate (``certKey=``).
    certificate: Path
    #: The server certificate's private key (``privateKey=``).
    key: Path


def issue_certificate(
    subject: str,
    key: PrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: PrivateKey,
    ip_address: str | None = None,
) -> x509.Certificate:
    """
    Sign a certificate for ``key``, valid from yesterday to tomorrow.

    Without ``issuer`` the certificate is self-signed.  Without
    ``ip_address`` it is a certificate authority, otherwise a server
    certificate whose subjectAltName is that IP address.
    """
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if ip_address is None:
        signing_only = x509.KeyUsage(
            digital_signature=False,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        )
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        builder = builder.add_extension(signing_only, critical=True)
    else:
        address = x509.IPAddress(ipaddress.ip_address(ip_address))
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(x509.SubjectAlternativeName([address]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_certificates(
    directory: Path,
    ip_address: str = SERVER_ADDRESS,
    server_key: PrivateKey | None = None,
) -> CertificateFiles:
    """
    Write a root authority, an intermediate and a server certificate for
    ``ip_address``, with the server's key (a new P-256 key by default).
    """
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = issue_certificate("kvdaemon test root", root_key, None, root_key)
    intermediate_key = ec.generate_private_key(ec.SECP256R1())
    intermediate = issue_certificate("kvdaemon test intermediate", intermediate_key, root, root_key)
    if server_key is None:
        server_key = ec.generate_private_key(ec.SECP256R1())
    server = issue_certificate(ip_address, server_key, intermediate, intermediate_key, ip_address)

    directory.mkdir(parents=True, exist_ok=True)
    files = CertificateFiles(
        root=directory / "root.crt",
        chain=directory / "intermediate.crt",
        certificate=directory / "server.crt",
        key=directory / "server.key",
    )
    files.root.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    files.chain.write_bytes(intermediate.public_bytes(serialization.Encoding.PEM))
    files.certificate.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


def temporary_directory(testcase: SynchronousTestCase) -> Path:
    """Return a new directory that is removed when ``testcase`` ends."""
    directory = Path(tempfile.mkdtemp())
    testcase.addCleanup(shutil.rmtree, directory)
    return directory


def ssl_listen(files: CertificateFiles) -> str:
    """Return an ``ssl:`` endpoint description serving ``files`` on a free port of 127.0.0.1."""
    return "ssl:0:interface=%s:privateKey=%s:certKey=%s:extraCertChain=%s" % (
        SERVER_ADDRESS,
        files.key,
        files.certificate,
        files.chain,
    )


def verifying_context(root: Path) -> ssl.SSLContext:
    """Return a client context that trusts only ``root`` and checks the server's address (check_hostname on)."""
    context = ssl.create_default_context(cafile=str(root))
    # create_default_context turns both on already, but setting them keeps
    # the test independent of that default.
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def connect_tls(port: int, context: ssl.SSLContext, receive_buffer: int | None = None) -> ssl.SSLSocket:
    """Connect to 127.0.0.1:``port`` and complete a TLS handshake.  The caller closes the socket."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        # Set before connecting, so that the TCP window is small from the
        # start.
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    raw.settimeout(30)
    try:
        raw.connect((SERVER_ADDRESS, port))
        return context.wrap_socket(raw, server_hostname=SERVER_ADDRESS)
    except BaseException:
        raw.close()
        raise


def tls_exchange(port: int, context: ssl.SSLContext, request: bytes, terminator: bytes) -> bytes:
    """Send ``request`` over TLS and read until the reply ends with ``terminator``."""
    with connect_tls(port, context) as connection:
        return send_and_read(connection, request, terminator)


def start_stalled_tls_scan(port: int, context: ssl.SSLContext, request: bytes) -> tuple[ssl.SSLSocket, bytes]:
    """
    Send ``request`` over TLS from a client with a small receive buffer,
    and read at least 64 KiB of the reply.  Return the socket, which then
    reads nothing more, and the bytes read.
    """
    client = connect_tls(port, context, SMALL_RECEIVE_BUFFER)
    client.sendall(request)
    first = bytearray()
    while len(first) < 64 * 1024:
        chunk = client.recv(64 * 1024)
        if not chunk:
            raise AssertionError("connection closed after %d bytes" % len(first))
        first += chunk
    return client, bytes(first)


def read_to_close(client: ssl.SSLSocket) -> tuple[int, bytes]:
    """
    Read until the server closes or resets the connection, and return the
    number of bytes read and the last 16 of them.

    :raise AssertionError: the connection stayed open with nothing to
        read for 30 seconds.
    """
    client.settimeout(30)
    received = 0
    tail = b""
    try:
        while True:
            chunk = client.recv(64 * 1024)
            if not chunk:
                break
            received += len(chunk)
            tail = (tail + chunk)[-16:]
    except (ConnectionResetError, ssl.SSLEOFError):
        pass
    except socket.timeout:
        raise AssertionError("the connection stayed open with nothing to read for 30 seconds")
    return received, tail


def buffered_below_connection(tls_transport: Any) -> int:
    """
    Return the bytes that a TLS connection's transports hold in this
    process: the TLS layer's write aggregator and pending writes, and the
    TCP transport's send buffer.

    These are private attributes of Twisted 26's ``BufferingTLSTransport``
    and ``FileDescriptor``.
    """
    tcp = tls_transport.transport
    aggregated = sum(map(len, tls_transport._aggregator._buffer))
    pending = sum(map(len, tls_transport._appSendBuffer))
    return aggregated + pending + len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen


@defer.inlineCallbacks
def wait_for_still_stream(service: Any, polls: int = 5, timeout: float = 30.0) -> Any:
    """
    Wait until the server's only stream is paused, uses no thread and has
    sent nothing new for ``polls`` polls 50 ms apart, and return the stream.

    A stream to a client that stops reading can pause and resume a few
    times at first, while Linux grows the server socket's send buffer.

    :raise AssertionError: no stream came to rest within ``timeout``
        seconds.
    """
    deadline = time.monotonic() + timeout
    still = 0
    last_sent = -1
    while True:
        streams = list(service.factory.streams)
        stream = streams[0] if len(streams) == 1 else None
        if stream is not None and stream.paused and not stream.stepping and stream.bytes_sent == last_sent:
            still += 1
            if still >= polls:
                return stream
        else:
            still = 0
        last_sent = stream.bytes_sent if stream is not None else -1
        if time.monotonic() > deadline:
            raise AssertionError("no stream came to rest within %s seconds" % timeout)
        yield deferLater(reactor, 0.05, lambda: None)


class TLSEndpointTests(TestCase):
    """Requests over an ``ssl:`` endpoint, from clients that check its certificate."""

    @defer.inlineCallbacks
    def test_tls_endpoint_serves_get_and_rget(self) -> None:
        files = write_certificates(temporary_directory(self))
        service, _ = yield start_server(self, Settings(threads=2, stream_buffer=16384), ssl_listen(files))
        port = service.ports[0].getHost().port
        context = verifying_context(files.root)

        values = [b"value-%05d" % number * 100 for number in range(300)]
        setup = b"".join(b"set k%05d 0 0 %d noreply\r\n%s\r\n" % (number, len(value), value) for number, value in enumerate(values))
        reply = yield threads.deferToThread(tls_exchange, port, context, setup + b"get k00007\r\n", b"END\r\n")
        self.assertEqual(reply, b"VALUE k00007 0 %d\r\n%s\r\nEND\r\n" % (len(values[7]), values[7]))

        # About 340 KB through a 16 KiB stream buffer takes many steps and
        # pauses, all behind the TLS layer.
        reply = yield threads.deferToThread(tls_exchange, port, context, b"rget 1 1 0 k\r\nversion\r\n", b"VERSION 1.6.18\r\n")
        expected = b"".join(b"VALUE k%05d 0 %d\r\n%s\r\n" % (number, len(value), value) for number, value in enumerate(values))
        self.assertEqual(reply, expected + b"END\r\nVERSION 1.6.18\r\n")

    @defer.inlineCallbacks
    def test_private_key_file_with_certificate(self) -> None:
        files = write_certificates(temporary_directory(self))
        combined = files.key.parent / "combined.pem"
        combined.write_bytes(files.key.read_bytes() + files.certificate.read_bytes())
        listen = "ssl:0:interface=%s:privateKey=%s:extraCertChain=%s" % (SERVER_ADDRESS, combined, files.chain)
        service, _ = yield start_server(self, Settings(threads=2), listen)
        port = service.ports[0].getHost().port

        reply = yield threads.deferToThread(tls_exchange, port, verifying_context(files.root), b"version\r\n", b"\r\n")

        self.assertEqual(reply, b"VERSION 1.6.18\r\n")

    @defer.inlineCallbacks
    def test_dh_parameters_enable_dhe(self) -> None:
        directory = temporary_directory(self)
        # TLS 1.2 defines DHE cipher suites for RSA and DSA server keys, not
        # for elliptic-curve ones.
        files = write_certificates(directory, server_key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
        parameters = directory / "dhparams.pem"
        parameters.write_bytes(FFDHE2048_PARAMETERS)
        with_parameters, _ = yield start_server(self, Settings(threads=2), ssl_listen(files) + ":dhParameters=%s" % parameters)
        without_parameters, _ = yield start_server(self, Settings(threads=2), ssl_listen(files))
        context = verifying_context(files.root)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(DHE_CIPHER)

        def negotiate(port: int) -> tuple[str, bytes] | ssl.SSLError:
            try:
                with connect_tls(port, context) as connection:
                    return connection.cipher()[0], send_and_read(connection, b"version\r\n")
            except ssl.SSLError as error:
                return error

        accepted = yield threads.deferToThread(negotiate, with_parameters.ports[0].getHost().port)
        rejected = yield threads.deferToThread(negotiate, without_parameters.ports[0].getHost().port)

        self.assertEqual(accepted, (DHE_CIPHER, b"VERSION 1.6.18\r\n"))
        self.assertIsInstance(rejected, ssl.SSLError)
        self.assertIn("HANDSHAKE_FAILURE", rejected.reason)

    @defer.inlineCallbacks
    def test_tls_versions_below_1_2_rejected(self) -> None:
        files = write_certificates(temporary_directory(self))
        service, _ = yield start_server(self, Settings(threads=2), ssl_listen(files))
        port = service.ports[0].getHost().port

        def negotiate(version: ssl.TLSVersion) -> str | ssl.SSLError:
            context = verifying_context(files.root)
            # Security level 0 lets this client offer TLS 1.1 at all, so a
            # failure comes from the server's refusal.
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            context.minimum_version = version
            context.maximum_version = version
            try:
                with connect_tls(port, context) as connection:
                    return connection.version()
            except ssl.SSLError as error:
                return error

        accepted = yield threads.deferToThread(negotiate, ssl.TLSVersion.TLSv1_2)
        rejected = yield threads.deferToThread(negotiate, ssl.TLSVersion.TLSv1_1)

        self.assertEqual(accepted, "TLSv1.2")
        self.assertIsInstance(rejected, ssl.SSLError)
        self.assertEqual(rejected.reason, "TLSV1_ALERT_PROTOCOL_VERSION")

    @defer.inlineCallbacks
    def test_plain_text_client_closed(self) -> None:
        files = write_certificates(temporary_directory(self))
        service, _ = yield start_server(self, Settings(threads=2), ssl_listen(files))
        port = service.ports[0].getHost().port
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def send_plain_text() -> tuple[int, bytes]:
            with socket.create_connection((SERVER_ADDRESS, port), timeout=30) as plain:
                plain.sendall(b"version\r\n")
                local_port = plain.getsockname()[1]
                received = b""
                try:
                    while chunk := plain.recv(4096):
                        received += chunk
                except ConnectionResetError:
                    pass
                return local_port, received

        local_port, received = yield threads.deferToThread(send_plain_text)
        yield wait_until(lambda: not service.factory.connections, what="the plain-text connection to close")

        # The server sends at most a TLS alert record, never
        # memcached's reply in plain text.
        self.assertNotIn(b"VERSION", received)
        self.assertEqual(service.factory.stats.curr_connections, 0)
        failures = [event for event in events if event.get("log_failure") is not None]
        self.assertEqual(failures, [])
        tls_errors = [event for event in events if event.get("log_format") == "Closed {peer} after a TLS error: {error}"]
        self.assertEqual(len(tls_errors), 1, events)
        self.assertEqual(tls_errors[0]["peer"], "tcp:%s:%d" % (SERVER_ADDRESS, local_port))
        self.assertIsInstance(tls_errors[0]["error"], OpenSSL.SSL.Error)

        reply = yield threads.deferToThread(tls_exchange, port, verifying_context(files.root), b"version\r\n", b"\r\n")
        self.assertEqual(reply, b"VERSION 1.6.18\r\n")


class TLSStreamingTests(TestCase):
    """A 20 MiB ``rget`` over TLS to a client that stops reading."""

    value_size = 64 * 1024
    #: 320 values of 64 KiB: a 20 MiB reply.
    item_count = 320

    @defer.inlineCallbacks
    def start_stalled_rget(self, settings: Settings) -> Any:
        """
        Start a server with ``settings``, store 20 MiB under keys starting
        with ``t``, and send ``rget`` for all of them from a TLS client that
        reads the first 64 KiB and then stops.

        :return: a Deferred firing with the service, its port, the client
            context, the keys, the reply's size, the client socket and the
            bytes it read.
        """
        files = write_certificates(temporary_directory(self))
        service, _ = yield start_server(self, settings, ssl_listen(files))
        port = service.ports[0].getHost().port
        keys = fill_store(service.factory.store, b"t", self.item_count, self.value_size)
        total = sum(len(b"VALUE %s 0 %d\r\n\r\n" % (key, self.value_size)) for key in keys)
        total += self.value_size * len(keys) + len(b"END\r\n")
        context = verifying_context(files.root)
        client, first = yield threads.deferToThread(start_stalled_tls_scan, port, context, b"rget 1 1 0 t\r\n")
        self.addCleanup(client.close)
        return service, port, context, keys, total, client, first

    @defer.inlineCallbacks
    def test_stalled_tls_reader_pauses_stream(self) -> None:
        value_size = self.value_size
        stream_buffer = 64 * 1024
        settings = Settings(threads=2, stream_buffer=stream_buffer, stall_timeout=600)
        service, port, context, keys, total, client, first = yield self.start_stalled_rget(settings)

        stream = yield wait_for_still_stream(service)
        connection = next(c for c in service.factory.connections if c.stream is stream)

        # The server stopped producing well short of the reply.  The rest of
        # what it sent sits in the kernel's socket buffers (Linux's default
        # tcp_wmem maximum is 4 MiB) and in the buffers measured below.
        self.assertLess(stream.bytes_sent, total // 2)
        # The TCP transport paused the TLS layer's stand-in producer, which
        # passed the pause on to the connection and from there to the
        # stream.
        self.assertTrue(connection.producer_paused)
        self.assertTrue(stream.paused)
        self.assertFalse(stream.stepping)
        spooled = []
        buffered = []
        for _ in range(10):
            yield deferLater(reactor, 0.05, lambda: None)
            spooled.append(stream._spooled_bytes)
            buffered.append(buffered_below_connection(connection.transport))
        self.assertLessEqual(max(spooled), stream_buffer)
        # Twisted's TCP transport pauses its producer above 64 KiB, and the
        # TLS layer aggregates writes up to 64,000 bytes.  A step running at
        # the pause adds at most one stream buffer and one item, and TLS
        # adds its record headers.
        self.assertLessEqual(max(buffered), 64 * 1024 + 64_000 + stream_buffer + value_size + 16 * 1024)

        # Another TLS connection is served while the stream waits.
        reply = yield threads.deferToThread(tls_exchange, port, context, b"get t000003\r\n", b"END\r\n")
        self.assertEqual(reply, b"VALUE t000003 0 %d\r\n%s\r\nEND\r\n" % (value_size, value_for(b"t000003", value_size)))
        self.assertEqual(service.factory.streams, {stream})
        self.assertLess(stream.bytes_sent, total // 2)

        reply = yield threads.deferToThread(read_until, client, b"END\r\n", bytearray(first))
        self.assertEqual(len(reply), total)
        self.assertEqual(stream.bytes_sent, total)
        items = parse_values(bytes(reply))
        self.assertEqual([key for key, _, _ in items], keys)
        for key, _, value in items:
            self.assertEqual(value, value_for(key, value_size), key)
        self.assertEqual(service.factory.stats.streams_stalled, 0)
        self.assertEqual(service.factory.streams, set())

    @defer.inlineCallbacks
    def test_stall_timeout_closes_tls_connection(self) -> None:
        settings = Settings(threads=2, stream_buffer=64 * 1024, stall_timeout=0.5)
        service, port, context, _, total, client, first = yield self.start_stalled_rget(settings)

        yield wait_until(lambda: service.factory.stats.streams_stalled == 1, what="the stall timeout")
        yield wait_until(lambda: not service.factory.connections, what="the connection to close")

        self.assertEqual(service.factory.streams, set())
        self.assertEqual(service.factory.stats.streams_running, 0)
        received, tail = yield threads.deferToThread(read_to_close, client)
        # The client gets part of the reply and then the end of the
        # connection, never the END that would make it look complete.
        self.assertLess(len(first) + received, total)
        self.assertFalse(tail.endswith(b"END\r\n"))

        reply = yield threads.deferToThread(tls_exchange, port, context, b"version\r\n", b"\r\n")
        self.assertEqual(reply, b"VERSION 1.6.18\r\n")


class PymemcacheTLSTests(TestCase):
    """pymemcache's own TLS support (``tls_context=``) against an ``ssl:`` endpoint."""

    @defer.inlineCallbacks
    def start(self) -> Any:
        files = write_certificates(temporary_directory(self))
        service, _ = yield start_server(self, Settings(threads=2), ssl_listen(files))
        return files, service.ports[0].getHost().port

    def connect(self, port: int, context: ssl.SSLContext) -> PymemcacheClient:
        client = PymemcacheClient(
            (SERVER_ADDRESS, port),
            tls_context=context,
            timeout=30,
            connect_timeout=30,
            default_noreply=False,
        )
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def test_pymemcache_set_get_delete(self) -> None:
        files, port = yield self.start()
        client = self.connect(port, verifying_context(files.root))
        large = value_for(b"large", 300 * 1024)

        def run() -> list[Any]:
            return [
                client.set("greeting", b"hello", expire=100),
                client.set("large", large),
                client.get("greeting"),
                client.get("large"),
                client.delete("greeting"),
                client.get("greeting"),
                client.version(),
            ]

        results = yield threads.deferToThread(run)

        self.assertEqual(results, [True, True, b"hello", large, True, None, b"1.6.18"])
        # pymemcache verified the certificate chain up to the root during
        # the handshake.  The socket shows the server certificate it
        # accepted.
        certificate = client.sock.getpeercert()
        self.assertEqual(certificate["subjectAltName"], (("IP Address", SERVER_ADDRESS),))

    @defer.inlineCallbacks
    def test_pymemcache_get_many_pipelined(self) -> None:
        files, port = yield self.start()
        client = self.connect(port, verifying_context(files.root))
        values = {"key%03d" % number: value_for(b"key%03d" % number, 50 + number * 1000) for number in range(120)}

        def run() -> tuple[list[str], dict]:
            # set_many sends every set before reading a reply, and
            # get_many sends one get with every key.
            failed = client.set_many(values, expire=100)
            return failed, client.get_many(list(values) + ["missing"])

        failed, fetched = yield threads.deferToThread(run)

        self.assertEqual(failed, [])
        # Comparing key lists and values one by one keeps a failure's
        # message short, where a diff of the dictionaries would not be.
        self.assertEqual(sorted(fetched), sorted(values))
        for key, value in values.items():
            self.assertEqual(fetched[key], value, key)

    @defer.inlineCallbacks
    def test_pymemcache_rejects_wrong_certificate(self) -> None:
        files, port = yield self.start()
        # A root the server's chain does not lead to.
        stranger = write_certificates(temporary_directory(self))
        # A server certificate from the right root but for another address.
        elsewhere = write_certificates(temporary_directory(self), "127.0.0.2")
        service, _ = yield start_server(self, Settings(threads=2), ssl_listen(elsewhere))
        elsewhere_port = service.ports[0].getHost().port

        def attempt(port: int, root: Path) -> BaseException | None:
            client = self.connect(port, verifying_context(root))
            try:
                client.version()
            except ssl.SSLCertVerificationError as error:
                return error
            return None

        unknown_root = yield threads.deferToThread(attempt, port, stranger.root)
        wrong_address = yield threads.deferToThread(attempt, elsewhere_port, elsewhere.root)
        accepted = yield threads.deferToThread(attempt, port, files.root)

        self.assertIsInstance(unknown_root, ssl.SSLCertVerificationError)
        self.assertIn("unable to get local issuer certificate", unknown_root.verify_message)
        self.assertIsInstance(wrong_address, ssl.SSLCertVerificationError)
        self.assertIn("IP address mismatch", wrong_address.verify_message)
        self.assertIsNone(accepted)


def readme_tls_command() -> str:
    """Return the ``twistd`` command of README.rst's TLS section."""
    for line in README.read_text().splitlines():
        if line.strip().startswith("twistd -n kvdaemon --listen ssl:"):
            return line.strip()
    raise AssertionError("README.rst has no 'twistd -n kvdaemon --listen ssl:' command")


class TwistdTLSTests(SynchronousTestCase):
    """The README's TLS command, run as a ``twistd`` subprocess."""

    def test_readme_tls_command_serves_version(self) -> None:
        directory = temporary_directory(self)
        files = write_certificates(directory)
        command = readme_tls_command()
        self.assertIn("ssl:11212:", command)
        self.assertIn("/etc/kvdaemon/", command)
        port = free_port()
        arguments = shlex.split(command.replace("ssl:11212:", "ssl:%d:" % port).replace("/etc/kvdaemon/", "%s/" % directory))
        self.assertEqual(arguments[:3], ["twistd", "-n", "kvdaemon"])
        process = spawn_twistd(self, port, *arguments[3:])

        reply = tls_exchange(port, verifying_context(files.root), b"version\r\n", b"\r\n")

        self.assertEqual(reply, b"VERSION 1.6.18\r\n")
        log = stop_twistd(self, process)
        self.assertIn("kvdaemon listening on ssl:%d:" % port, log)
