"""
Tests that kvdaemon serves over a TLS endpoint (``ssl:`` in ``--listen``),
including a range stream, whose producer then sits behind Twisted's TLS
layer.
"""

from __future__ import annotations

import datetime
import shutil
import socket
import ssl
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from kvdaemon import KVDaemonService, Settings
from tests.support import send_and_read


def write_self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1 and its key; return both paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_path = directory / "key.pem"
    certificate_path = directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, certificate_path


def tls_exchange(port: int, request: bytes, terminator: bytes) -> bytes:
    """Send ``request`` over TLS (certificate not checked) and read until the reply ends with ``terminator``."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(raw) as connection:
            return send_and_read(connection, request, terminator)


class TLSEndpointTests(TestCase):
    @defer.inlineCallbacks
    def test_tls_endpoint_serves_get_and_rget(self) -> None:
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory)
        key_path, certificate_path = write_self_signed_certificate(directory)
        listen = "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (key_path, certificate_path)
        service = KVDaemonService(Settings(threads=2, stream_buffer=16384), [listen], reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.ports[0].getHost().port

        values = [b"value-%05d" % number * 100 for number in range(300)]
        setup = b"".join(b"set k%05d 0 0 %d noreply\r\n%s\r\n" % (number, len(value), value) for number, value in enumerate(values))
        reply = yield threads.deferToThread(tls_exchange, port, setup + b"get k00007\r\n", b"END\r\n")
        self.assertEqual(reply, b"VALUE k00007 0 %d\r\n%s\r\nEND\r\n" % (len(values[7]), values[7]))

        # About 350 KB through a 16 KiB stream buffer: many steps and
        # pauses, all behind the TLS layer.
        reply = yield threads.deferToThread(tls_exchange, port, b"rget 1 1 0 k\r\nversion\r\n", b"VERSION 1.6.18\r\n")
        expected = b"".join(b"VALUE k%05d 0 %d\r\n%s\r\n" % (number, len(value), value) for number, value in enumerate(values))
        self.assertEqual(reply, expected + b"END\r\nVERSION 1.6.18\r\n")
