# -*- test-case-name: tests.test_textauth -*-
"""
Password authentication for text-protocol clients, as memcached's ``-Y``
(``--auth-file``) option does it.

A client that cannot speak SASL authenticates with a ``set`` request whose
key, flags and expiry time are ignored and whose data block is
``user password``.  Until it succeeds, every other request gets
``CLIENT_ERROR unauthenticated`` and touches no data.  After that, the
connection is an ordinary text connection.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from twisted.logger import Logger

from kvdaemon._text import MAX_LINE_LENGTH, TextHandler, read_number

if TYPE_CHECKING:
    from kvdaemon._connection import Connection

UNAUTHENTICATED = b"CLIENT_ERROR unauthenticated\r\n"
BAD_TERMINATION = b"CLIENT_ERROR bad command line termination\r\n"
BAD_TOKEN_FORMAT = b"CLIENT_ERROR bad authentication token format\r\n"
AUTH_FAILURE = b"CLIENT_ERROR authentication failure\r\n"
STORED = b"STORED\r\n"

#: The largest data block accepted in an authentication ``set``.  memcached
#: accepts any length and buffers the whole block, so an anonymous client
#: could make it hold gigabytes.  kvdaemon closes the connection instead.
MAX_CREDENTIALS_LENGTH = MAX_LINE_LENGTH


def credentials_match(users: dict[bytes, bytes], user: bytes, password: bytes) -> bool:
    """Return whether ``user`` exists in ``users`` with ``password``, comparing passwords in constant time."""
    expected = users.get(user)
    if expected is None:
        # Compare anyway, so the time taken does not tell whether the user
        # name exists.
        hmac.compare_digest(password, password)
        return False
    return hmac.compare_digest(expected, password)


class AuthenticationGate:
    """
    The handler of a text connection before it has authenticated.

    On success it hands the connection to a :class:`TextHandler` and lets
    that handler execute the requests that followed in the same read.
    Runs on the reactor thread only.
    """

    log = Logger()

    #: Tells the idle timeout to close this connection even while its
    #: login request is partly received.
    unauthenticated = True

    def __init__(self, connection: Connection, users: dict[bytes, bytes]) -> None:
        self.connection = connection
        self.log = connection.logger_for(self)
        self.users = users
        self.stats = connection.factory.stats

    def connection_lost(self) -> None:
        pass

    def process(self, buffer: bytes, offset: int) -> int:
        """Execute requests from ``offset`` until one authenticates; return the first unconsumed offset."""
        connection = self.connection
        end = len(buffer)
        while offset < end and not connection.blocked:
            eol = buffer.find(b"\n", offset)
            if eol < 0:
                if end - offset > MAX_LINE_LENGTH:
                    self.log.info(
                        "Closing {peer}: an unauthenticated request line exceeded {limit} bytes",
                        peer=connection.peer,
                        limit=MAX_LINE_LENGTH,
                    )
                    connection.close()
                return offset
            parts = [part for part in buffer[offset:eol].rstrip(b"\r").split(b" ") if part]
            length = read_number(parts[4]) if len(parts) >= 5 and parts[0] == b"set" else None
            if length is None or length < 0:
                self.log.info(
                    "Rejected {command!r} from {peer}: not authenticated",
                    command=parts[0][:32] if parts else b"",
                    peer=connection.peer,
                )
                connection.write(UNAUTHENTICATED)
                offset = eol + 1
                continue
            if length > MAX_CREDENTIALS_LENGTH:
                self.log.info(
                    "Closing {peer}: its authentication request declared {length} bytes, more than {limit}",
                    peer=connection.peer,
                    length=length,
                    limit=MAX_CREDENTIALS_LENGTH,
                )
                connection.close()
                return eol + 1
            data_end = eol + 1 + length + 2
            if data_end > end:
                connection.bytes_needed = data_end - offset
                return offset
            block = buffer[eol + 1 : data_end]
            offset = data_end
            if self._authenticate(block):
                handler = TextHandler(connection)
                connection.handler = handler
                return handler.process(buffer, offset)
        return offset

    def _authenticate(self, block: bytes) -> bool:
        """Check one authentication data block (with its CRLF) and send the reply."""
        connection = self.connection
        if not block.endswith(b"\r\n"):
            self.log.info("Rejected an authentication request from {peer}: bad data chunk", peer=connection.peer)
            connection.write(BAD_TERMINATION)
            return False

        tokens = [token for token in block[:-2].split(b" ") if token]
        if len(tokens) < 2:
            self.log.info("Rejected an authentication request from {peer}: no user and password", peer=connection.peer)
            connection.write(BAD_TOKEN_FORMAT)
            return False

        # Like memcached, tokens after the password are ignored.
        user, password = tokens[0], tokens[1]
        self.stats.auth_cmds += 1
        if not credentials_match(self.users, user, password):
            self.stats.auth_errors += 1
            self.log.warn(
                "Authentication failed for {peer} as user {user!r}",
                peer=connection.peer,
                user=user[:64].decode("utf-8", "backslashreplace"),
            )
            connection.write(AUTH_FAILURE)
            return False

        self.log.info(
            "Authenticated {peer} as user {user!r}",
            peer=connection.peer,
            user=user.decode("utf-8", "backslashreplace"),
        )
        connection.write(STORED)
        return True
