# -*- test-case-name: tests.test_binary -*-
"""
The server side of SASL PLAIN (RFC 4616) for the binary protocol's
authentication commands.

One :class:`PlainExchange` belongs to one connection.  Its state follows
what memcached 1.6.18 with Cyrus SASL does, checked against that server:

- ``start`` with an initial response verifies it at once; with an empty
  one it asks the client for the credentials (auth continue) and a later
  ``step`` verifies them;
- after a failed ``step`` the client may step again;
- a ``step`` with no exchange waiting for credentials fails, including
  one after a successful ``start``.
"""

from __future__ import annotations

import enum
import hmac

import attrs

#: The mechanisms offered, as the list-mechanisms reply spells them.
MECHANISMS = b"PLAIN"

#: memcached rejects longer mechanism names as invalid arguments.
MAX_MECHANISM_LENGTH = 32


class AuthResult(enum.Enum):
    """The outcome of one authentication request."""

    OK = "ok"
    CONTINUE = "continue"
    FAILED = "failed"


@attrs.frozen
class Outcome:
    """
    An authentication request's result, the authentication identity the
    client named (for logs; never the password) and why it failed.
    """

    result: AuthResult
    user: bytes = b""
    reason: str = ""


def parse_plain(message: bytes) -> tuple[bytes, bytes, bytes] | None:
    """
    Split a PLAIN message, ``authzid NUL authcid NUL passwd``, into its
    three parts; return ``None`` unless it has exactly two NULs.
    """
    parts = message.split(b"\0")
    if len(parts) != 3:
        return None
    authzid, authcid, password = parts
    return authzid, authcid, password


class PlainExchange:
    """
    One connection's SASL PLAIN exchange.

    :param users: the credentials, user name to password.
    """

    def __init__(self, users: dict[bytes, bytes]) -> None:
        self._users = users
        #: True after a ``start`` with an empty initial response, until a
        #: ``step`` succeeds or a new ``start`` begins.
        self._awaiting_credentials = False

    def start(self, mechanism: bytes, response: bytes) -> Outcome:
        """Begin an exchange with ``mechanism`` (case-insensitive) and the client's initial response."""
        self._awaiting_credentials = False
        if mechanism.upper() != MECHANISMS:
            return Outcome(AuthResult.FAILED, reason="unsupported mechanism %r" % (mechanism,))
        if not response:
            self._awaiting_credentials = True
            return Outcome(AuthResult.CONTINUE)
        return self._verify(response)

    def step(self, response: bytes) -> Outcome:
        """Continue an exchange that ``start`` left waiting for credentials."""
        if not self._awaiting_credentials:
            return Outcome(AuthResult.FAILED, reason="no authentication exchange in progress")
        outcome = self._verify(response)
        if outcome.result is AuthResult.OK:
            self._awaiting_credentials = False
        return outcome

    def _verify(self, message: bytes) -> Outcome:
        parts = parse_plain(message)
        if parts is None:
            return Outcome(AuthResult.FAILED, reason="malformed PLAIN message")
        authzid, user, password = parts
        if authzid and authzid != user:
            return Outcome(AuthResult.FAILED, user, "user may not act as %r" % (authzid,))
        expected = self._users.get(user)
        if expected is None:
            return Outcome(AuthResult.FAILED, user, "unknown user")
        if not hmac.compare_digest(password, expected):
            return Outcome(AuthResult.FAILED, user, "wrong password")
        return Outcome(AuthResult.OK, user)
