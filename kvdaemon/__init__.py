"""
kvdaemon: a memcached-compatible key-value server on Twisted, with ordered
key-range operations streamed from worker threads.

Public API: :class:`KVDaemonService` (embed a server in a Twisted
application), :class:`KVDaemonFactory` (the protocol factory beneath it),
:class:`Settings` and :class:`Store`; and a Twisted client for range
operations, :class:`KVClientProtocol` (with :func:`connect`, the
:class:`Record` it delivers and its errors).
"""

from kvdaemon._factory import KVDaemonFactory
from kvdaemon._service import DEFAULT_LISTEN, KVDaemonService
from kvdaemon._settings import Settings
from kvdaemon._store import Store
from kvdaemon._version import __version__
from kvdaemon.client import KVClientProtocol, KVProtocolError, KVStatusError, Record, ResponseStatus, connect

__all__ = [
    "DEFAULT_LISTEN",
    "KVClientProtocol",
    "KVDaemonFactory",
    "KVDaemonService",
    "KVProtocolError",
    "KVStatusError",
    "Record",
    "ResponseStatus",
    "Settings",
    "Store",
    "__version__",
    "connect",
]
