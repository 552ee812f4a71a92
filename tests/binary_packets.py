"""
Build binary protocol requests and parse responses for the tests, written
from the protocol description (not with kvdaemon's own code), so the tests
do not check the server against itself.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

_HEADER = struct.Struct(">BBHBBHIIQ")


def request(
    opcode: int,
    key: bytes = b"",
    extras: bytes = b"",
    value: bytes = b"",
    *,
    opaque: int = 0,
    cas: int = 0,
    magic: int = 0x80,
    key_length: int | None = None,
    body_length: int | None = None,
) -> bytes:
    """
    Build one request packet.  ``key_length`` and ``body_length`` override
    the header fields, for malformed requests.
    """
    if key_length is None:
        key_length = len(key)
    if body_length is None:
        body_length = len(extras) + len(key) + len(value)
    header = _HEADER.pack(magic, opcode, key_length, len(extras), 0, 0, body_length, opaque, cas)
    return header + extras + key + value


def storage_extras(flags: int = 0, exptime: int = 0) -> bytes:
    """The extras of set, add and replace."""
    return struct.pack(">II", flags, exptime)


def counter_extras(delta: int, initial: int = 0, exptime: int = 0) -> bytes:
    """The extras of incr and decr."""
    return struct.pack(">QQI", delta, initial, exptime)


def u32(number: int) -> bytes:
    """A big-endian 32-bit number: the extras of touch, gat, flush and verbosity."""
    return struct.pack(">I", number)


class Response(NamedTuple):
    """One parsed response packet."""

    opcode: int
    status: int
    key: bytes
    extras: bytes
    value: bytes
    opaque: int
    cas: int


def parse(data: bytes) -> list[Response]:
    """
    Split ``data`` into response packets.

    :raise ValueError: a packet has the wrong magic or is incomplete.
    """
    responses = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _HEADER.size:
            raise ValueError("incomplete response header: %r" % (data[offset:],))
        magic, opcode, key_length, extras_length, _, status, body_length, opaque, cas = _HEADER.unpack_from(
            data, offset
        )
        if magic != 0x81:
            raise ValueError("response magic 0x%02x, expected 0x81" % (magic,))
        body_start = offset + _HEADER.size
        body = data[body_start : body_start + body_length]
        if len(body) != body_length:
            raise ValueError("incomplete response body")
        key_start = extras_length
        value_start = extras_length + key_length
        responses.append(
            Response(
                opcode, status, body[key_start:value_start], body[:extras_length], body[value_start:], opaque, cas
            )
        )
        offset = body_start + body_length
    return responses


def converse(
    port: int,
    data: bytes,
    until_opaque: int | None = None,
    quiet_time: float = 0.3,
    timeout: float = 5.0,
) -> tuple[bytes, bool]:
    """
    Send ``data`` to 127.0.0.1:``port`` and return what came back, and
    whether the server closed the connection.

    Reading stops when the server closes, when a complete response with
    opaque ``until_opaque`` has arrived, or, without ``until_opaque``, when
    the server stays quiet for ``quiet_time`` seconds.  Blocking: call it
    from a thread when the server runs on this process's reactor.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        connection.settimeout(timeout if until_opaque is not None else quiet_time)
        received = b""
        while True:
            try:
                chunk = connection.recv(65536)
            except socket.timeout:
                return received, False
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += chunk
            if until_opaque is not None and _has_opaque(received, until_opaque):
                return received, False


def _has_opaque(data: bytes, opaque: int) -> bool:
    """Return whether the complete packets at the start of ``data`` include one with ``opaque``."""
    offset = 0
    while len(data) - offset >= _HEADER.size:
        fields = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + fields[6]
        if end > len(data):
            return False
        if fields[7] == opaque:
            return True
        offset = end
    return False
