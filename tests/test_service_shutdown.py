"""
Tests that a program embedding KVDaemonService exits when its reactor
stops, even if it never calls stopService.
"""

from __future__ import annotations

import subprocess
import sys

from twisted.trial.unittest import TestCase

EMBEDDING_PROGRAM = """
from twisted.internet import reactor
from kvdaemon import KVDaemonService

service = KVDaemonService(listen=["tcp:0:interface=127.0.0.1"])
service.startService()
assert service.threadpool.started
reactor.callLater(0.2, reactor.stop)
reactor.run()
assert not service.threadpool.started
print("exited")
"""


class ReactorShutdownTests(TestCase):
    def test_reactor_stop_stops_worker_pool(self) -> None:
        result = subprocess.run(
            [sys.executable, "-c", EMBEDDING_PROGRAM],
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr.decode(errors="replace"))
        self.assertEqual(result.stdout.strip(), b"exited")
