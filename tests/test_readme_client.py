"""
Tests that the Twisted client example in README.rst runs against a real
kvdaemon and prints the output the README shows.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.support import start_server

README = Path(__file__).resolve().parent.parent / "README.rst"


def extract_client_example() -> str:
    """Return the client example from README.rst, without its indentation."""
    text = README.read_text()
    start = text.index("    from twisted.internet import defer, task\n")
    end = text.index("    task.react(main)\n", start) + len("    task.react(main)\n")
    return "\n".join(line[4:] for line in text[start:end].splitlines()) + "\n"


class ReadmeClientExampleTests(TestCase):
    @defer.inlineCallbacks
    def test_readme_client_example_prints_records(self) -> None:
        _, port = yield start_server(self)
        source = extract_client_example()
        self.assertIn('"tcp:127.0.0.1:11211"', source)
        source = source.replace('"tcp:127.0.0.1:11211"', '"tcp:127.0.0.1:%d"' % port)

        result = yield threads.deferToThread(
            subprocess.run, [sys.executable, "-c", source], capture_output=True, timeout=60
        )

        self.assertEqual(result.returncode, 0, result.stderr.decode(errors="replace"))
        lines = result.stdout.decode().splitlines()
        # The range get prints both users, then the scan prints them again.
        self.assertEqual(
            lines,
            [
                "b'user:1' b'alice'",
                "b'user:2' b'bob'",
                "b'user:1' b'alice'",
                "b'user:2' b'bob'",
                "2 records",
            ],
        )
