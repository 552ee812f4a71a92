"""
libmemcached's protocol conformance tool, ``memccapable``, against an
in-process kvdaemon: every test of a mode must pass.

Each mode is one :class:`MemccapableMode` and one test method, so a new
mode (``-b`` for the binary protocol) is a constant and a three-line test.
"""

from __future__ import annotations

import shutil

import attrs
from twisted.internet import defer, utils
from twisted.trial.unittest import TestCase

from tests.support import start_server

MEMCCAPABLE = shutil.which("memccapable") or "/usr/bin/memccapable"


@attrs.frozen
class MemccapableMode:
    """One memccapable run mode and what its report looks like."""

    #: The command-line flag that selects the mode.
    flag: str
    #: The word that starts each of the mode's result lines.
    prefix: str
    #: The number of tests libmemcached 1.1.4's memccapable runs in the mode.
    test_count: int


ASCII = MemccapableMode(flag="-a", prefix="ascii", test_count=27)


def parse_report(report: str, mode: MemccapableMode) -> tuple[list[str], list[str]]:
    """
    Split memccapable's report into the mode's result lines and those of
    them that did not pass.
    """
    results = [line for line in report.splitlines() if line.startswith(mode.prefix + " ")]
    failed = [line for line in results if not line.rstrip().endswith("[pass]")]
    return results, failed


class ParseReportTests(TestCase):
    """The report parser, on memccapable's own output format."""

    def test_counts_results_and_failures(self) -> None:
        report = (
            "ascii version                           [pass]\n"
            "ascii quit                              [FAIL]\n"
            "binary noop                             [pass]\n"
            "All tests passed\n"
        )
        results, failed = parse_report(report, ASCII)
        self.assertEqual(len(results), 2)
        self.assertEqual(failed, ["ascii quit                              [FAIL]"])


class MemccapableTests(TestCase):
    """memccapable against a fresh in-process server per mode."""

    timeout = 300

    @defer.inlineCallbacks
    def assert_all_pass(self, mode: MemccapableMode):
        if not shutil.which(MEMCCAPABLE):
            self.fail("memccapable is not installed; .ci/run installs the Debian package libmemcached-tools")
        _, port = yield start_server(self)
        output, errors, exit_code = yield utils.getProcessOutputAndValue(
            MEMCCAPABLE, [mode.flag, "-h", "127.0.0.1", "-p", str(port)]
        )
        report = (output + errors).decode("utf-8", "replace")
        results, failed = parse_report(report, mode)
        self.assertEqual(len(results), mode.test_count, report)
        self.assertEqual(failed, [], report)
        self.assertIn("All tests passed", report)
        self.assertEqual(exit_code, 0, report)

    def test_ascii_all_pass(self):
        return self.assert_all_pass(ASCII)
