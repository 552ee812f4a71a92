"""
Blocking socket clients for the soak run, for the text protocol (classic
and meta commands share it) and the binary protocol.  Both are framed by
hand, so that the soak controls exactly what is sent, can stop in the
middle of a request, and reads every reply byte.  The framing is written from the
protocol description, not taken from ``kvdaemon.client``, so that the soak
does not check the server against the server's own code.

Every read has a socket timeout, so a server that stops replying makes
the client raise :class:`socket.timeout` instead of hanging the run.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

HOST = "127.0.0.1"

#: The binary protocol's 24-byte header: magic, opcode, key length, extras
#: length, data type, vbucket or status, body length, opaque, CAS.
BINARY_HEADER = struct.Struct(">BBHBBHIIQ")
REQUEST_MAGIC = 0x80
RESPONSE_MAGIC = 0x81

READ_SIZE = 64 * 1024


class ProtocolMismatch(Exception):
    """The server's reply differs from what the soak expected."""


def connect(port: int, timeout: float, receive_buffer: int | None = None) -> socket.socket:
    """
    Open a blocking TCP connection to ``127.0.0.1:port``.

    *receive_buffer*, when given, sets ``SO_RCVBUF`` before connecting, so
    that the kernel advertises a small window from the start.
    """
    connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if receive_buffer is not None:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        connection.settimeout(timeout)
        connection.connect((HOST, port))
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        connection.close()
        raise
    return connection


def reset(connection: socket.socket) -> None:
    """Close *connection* with a TCP RST (``SO_LINGER`` on with a zero timeout)."""
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    connection.close()


class BufferedSocket:
    """A socket with a receive buffer, for reading lines and exact byte counts."""

    def __init__(self, connection: socket.socket) -> None:
        self.socket = connection
        self._buffer = bytearray()

    def send(self, data: bytes) -> None:
        self.socket.sendall(data)

    def _fill(self) -> None:
        chunk = self.socket.recv(READ_SIZE)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self._buffer += chunk

    def read_line(self) -> bytes:
        """Return the next line without its ``\\r\\n``."""
        start = 0
        while True:
            end = self._buffer.find(b"\r\n", start)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                return line
            start = max(0, len(self._buffer) - 1)
            self._fill()

    def read_exact(self, length: int) -> bytes:
        while len(self._buffer) < length:
            self._fill()
        data = bytes(self._buffer[:length])
        del self._buffer[:length]
        return data

    def close(self) -> None:
        self.socket.close()

    def reset(self) -> None:
        reset(self.socket)


@dataclass
class Value:
    """One ``VALUE`` block of a ``get``, ``gets`` or ``rget`` reply."""

    key: bytes
    flags: int
    value: bytes
    cas: int | None


class TextClient(BufferedSocket):
    """A text protocol connection: classic commands, meta commands and ``rget``."""

    def command(self, line: bytes, data: bytes | None = None) -> bytes:
        """Send one command (and its data block) and return the reply line."""
        if data is None:
            self.send(line + b"\r\n")
        else:
            self.send(b"%s\r\n%s\r\n" % (line, data))
        return self.read_line()

    def read_values(self, end: bytes = b"END") -> list[Value]:
        """Read ``VALUE`` blocks up to the *end* line."""
        values = []
        while True:
            line = self.read_line()
            if line == end:
                return values
            parts = line.split(b" ")
            if parts[0] != b"VALUE" or len(parts) not in (4, 5):
                raise ProtocolMismatch("expected VALUE or %r, got %r" % (end, line[:200]))
            length = int(parts[3])
            value = self.read_exact(length + 2)
            if value[-2:] != b"\r\n":
                raise ProtocolMismatch("data block of %r does not end with \\r\\n" % (parts[1],))
            cas = int(parts[4]) if len(parts) == 5 else None
            values.append(Value(parts[1], int(parts[2]), value[:-2], cas))

    def expect(self, line: bytes, expected: bytes, data: bytes | None = None) -> None:
        reply = self.command(line, data)
        if reply != expected:
            raise ProtocolMismatch("%r: expected %r, got %r" % (line[:80], expected, reply[:200]))


@dataclass
class Response:
    """One binary protocol response."""

    opcode: int
    status: int
    opaque: int
    cas: int
    extras: bytes
    key: bytes
    value: bytes


def pack_request(
    opcode: int,
    key: bytes = b"",
    extras: bytes = b"",
    value: bytes = b"",
    opaque: int = 0,
    cas: int = 0,
    datatype: int = 0,
) -> bytes:
    body_length = len(extras) + len(key) + len(value)
    header = BINARY_HEADER.pack(REQUEST_MAGIC, opcode, len(key), len(extras), datatype, 0, body_length, opaque, cas)
    return header + extras + key + value


class BinaryClient(BufferedSocket):
    """A binary protocol connection."""

    def read_response(self) -> Response:
        header = self.read_exact(BINARY_HEADER.size)
        magic, opcode, key_length, extras_length, _, status, body_length, opaque, cas = BINARY_HEADER.unpack(header)
        if magic != RESPONSE_MAGIC:
            raise ProtocolMismatch("binary response with magic 0x%02x" % magic)
        body = self.read_exact(body_length)
        extras = body[:extras_length]
        key = body[extras_length : extras_length + key_length]
        value = body[extras_length + key_length :]
        return Response(opcode, status, opaque, cas, extras, key, value)

    def request(self, opcode: int, key: bytes = b"", extras: bytes = b"", value: bytes = b"", opaque: int = 0, datatype: int = 0) -> Response:
        """Send one request and return its response, checking opcode and opaque."""
        self.send(pack_request(opcode, key, extras, value, opaque, datatype=datatype))
        response = self.read_response()
        if response.opcode != opcode or response.opaque != opaque:
            raise ProtocolMismatch(
                "request 0x%02x opaque %d got a response for 0x%02x opaque %d"
                % (opcode, opaque, response.opcode, response.opaque)
            )
        return response


def uleb128(data: bytes, offset: int) -> tuple[int, int]:
    """Decode one unsigned LEB128 number at *offset*, and return it and the next offset."""
    result = 0
    shift = 0
    while True:
        byte = data[offset]
        offset += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, offset
        shift += 7
