"""
The ``twistd kvdaemon`` plugin.

It imports kvdaemon only when twistd requests the options or the service,
so that listing plugins stays fast and the reactor is not installed here.
"""

from twisted.application.service import ServiceMaker

kvdaemon = ServiceMaker(
    "kvdaemon",
    "kvdaemon._plugin_entry",
    "A memcached-compatible key-value server with ordered range operations.",
    "kvdaemon",
)
