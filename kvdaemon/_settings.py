# -*- test-case-name: tests.test_options -*-
"""
The server's settings, shared by the service, the protocol factory and the
twistd plugin's command line.
"""

from __future__ import annotations

import attrs

MiB = 1024 * 1024


@attrs.frozen
class Settings:
    """
    Limits and switches for one kvdaemon server.

    Sizes are in bytes and times in seconds.
    """

    #: Item bytes kept before LRU eviction starts (memcached's ``-m``).
    max_memory: int = 64 * MiB
    #: The largest item accepted (memcached's ``-I``).
    max_item_size: int = 1 * MiB
    #: Connections served at once; more are closed on accept.
    max_connections: int = 1024
    #: Worker threads for streaming jobs.
    threads: int = 4
    #: Bytes a streaming job may hold per connection before the reactor
    #: has written them (the spool cap).  0 turns the cap and the streams'
    #: backpressure off, which only benchmarks do, to show what the cap
    #: prevents.
    stream_buffer: int = 256 * 1024
    #: A stream paused by a client that stopped reading for this long is
    #: cancelled and its connection closed.
    stall_timeout: float = 60.0
    #: Streaming jobs running at once across all connections.
    max_streams: int = 256
    #: Bytes of received but unprocessed input after which a connection
    #: stops reading from its socket.
    max_pending_input: int = 2 * MiB
    #: Seconds that stopping the service waits for clients to read the
    #: replies already written to them.  Connections still open then are
    #: aborted.
    shutdown_grace: float = 5.0
    #: Whether the text ``shutdown`` command stops the reactor, and with it
    #: the process (memcached's ``-A``).  When false, the command gets
    #: memcached's ``ERROR: shutdown not enabled``.
    enable_shutdown: bool = False
    #: Whether ``flush_all`` and range deletes are served; when false they
    #: get an error reply and no data is destroyed.
    allow_destructive: bool = True
    #: SASL PLAIN credentials (user name to password); ``None`` turns SASL off.
    sasl_users: dict[bytes, bytes] | None = None
    #: Credentials for text-protocol authentication (memcached's ``-Y``):
    #: a connection must send ``user password`` in a ``set`` before any
    #: other request.  ``None`` turns it off.  Ignored when ``sasl_users``
    #: is set, because SASL then makes every connection binary.
    auth_users: dict[bytes, bytes] | None = None
    #: Whether ``lru_crawler metadump`` and ``lru_crawler mgdump``, which
    #: list every key, are served.
    allow_dumps: bool = True
    #: Open resumable range scans allowed at once.
    max_scans: int = 64
    #: Seconds an idle resumable range scan lives before it is dropped.
    scan_lifetime: float = 60.0
    #: Seconds a connection waiting for a request may stay silent before
    #: it is closed, as with memcached's ``-o idle_timeout``.  0 turns
    #: this off.
    idle_timeout: int = 0
