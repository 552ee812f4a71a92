"""Version numbers."""

#: This package's release.
__version__ = "0.1.0"

#: The version reported by ``version`` and ``stats``: the memcached release
#: whose behaviour kvdaemon follows, so that clients which check the
#: version for features find the ones kvdaemon has.
PROTOCOL_VERSION = b"1.6.18"
