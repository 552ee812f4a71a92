"""
libmemcached's protocol conformance tool, ``memccapable -b``, against an
in-process kvdaemon: its 27 binary protocol tests must all pass.
"""

from __future__ import annotations

import shutil

from twisted.internet import defer, utils
from twisted.trial.unittest import TestCase

from tests.support import start_server

MEMCCAPABLE = shutil.which("memccapable") or "/usr/bin/memccapable"

#: The number of tests memccapable from libmemcached 1.1.4 runs in binary mode.
BINARY_TEST_COUNT = 27


class MemccapableBinaryTests(TestCase):
    timeout = 300

    @defer.inlineCallbacks
    def test_memccapable_binary_all_pass(self):
        if not shutil.which(MEMCCAPABLE):
            self.fail("memccapable is not installed; .ci/run installs the Debian package libmemcached-tools")
        _, port = yield start_server(self)
        output, errors, exit_code = yield utils.getProcessOutputAndValue(
            MEMCCAPABLE, ["-b", "-h", "127.0.0.1", "-p", str(port)]
        )
        report = (output + errors).decode("utf-8", "replace")
        results = [line for line in report.splitlines() if line.startswith("binary ")]
        self.assertEqual(len(results), BINARY_TEST_COUNT, report)
        failed = [line for line in results if not line.endswith("[pass]")]
        self.assertEqual(failed, [], report)
        self.assertIn("All tests passed", report)
        self.assertEqual(exit_code, 0, report)
