"""
Tests that the embedding example in README.rst runs: a kvdaemon service and
a twisted.web site in one twistd process, sharing one store.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.support import free_port, wait_for_port

README = Path(__file__).resolve().parent.parent / "README.rst"


def extract_example() -> str:
    """Return the ``.tac`` example from README.rst, without its indentation."""
    text = README.read_text()
    start = text.index("    # web_and_cache.tac")
    end = text.index("\n``tests/test_embedding.py``", start)
    lines = text[start:end].splitlines()
    return "\n".join(line[4:] for line in lines) + "\n"


class EmbeddingExampleTests(TestCase):
    def test_readme_example_serves_cache_and_web(self) -> None:
        cache_port = free_port()
        web_port = free_port()
        source = extract_example()
        self.assertIn("tcp:11211:interface=127.0.0.1", source)
        self.assertIn("tcp:8080:interface=127.0.0.1", source)
        source = source.replace("tcp:11211:", "tcp:%d:" % cache_port).replace("tcp:8080:", "tcp:%d:" % web_port)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        tac = Path(directory) / "web_and_cache.tac"
        tac.write_text(source)

        process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-ny", str(tac), "--pidfile="],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

        def stop() -> None:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
            process.communicate(timeout=20)

        self.addCleanup(stop)
        wait_for_port(cache_port)
        wait_for_port(web_port)

        url = "http://127.0.0.1:%d/" % web_port
        with urllib.request.urlopen(url, timeout=10) as response:
            self.assertEqual(response.read(), b"no greeting yet\n")

        from pymemcache.client.base import Client

        client = Client(("127.0.0.1", cache_port), timeout=10)
        self.addCleanup(client.close)
        self.assertTrue(client.set(b"greeting", b"hello from memcached\n"))

        with urllib.request.urlopen(url, timeout=10) as response:
            self.assertEqual(response.read(), b"hello from memcached\n")

    def test_readme_example_is_found(self) -> None:
        self.assertTrue(re.search(r"KVDaemonService\(", extract_example()))
