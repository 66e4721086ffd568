"""The reaper fixture (tests/conftest.py) fails a test that leaves a process running, orphans included."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

LEAKS = '''
import os
import subprocess
import sys


def test_leaves_a_child():
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_leaves_an_orphan():
    # the middle process exits at once: its sleeping child is reparented (to the subreaper)
    subprocess.run([sys.executable, "-c",
                    "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])"],
                   check=True)


def test_cleans_up():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    proc.kill()
    proc.wait()
'''


@pytest.mark.slow
def test_the_reaper_fails_tests_that_leave_processes(pytester) -> None:
    pytester.makeconftest(CONFTEST.read_text().replace("REAP_GRACE_S = 15.0", "REAP_GRACE_S = 1.0"))
    pytester.makepyfile(test_leaks=LEAKS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines(["*ERROR test_leaks.py::test_leaves_a_child - *",
                                 "*ERROR test_leaks.py::test_leaves_an_orphan - *"])
    # one failure report per leaking test (the short summary may repeat the message, width permitting)
    reports = [line for line in result.stdout.lines
               if line.startswith("E ") and "left 1 process(es) running (killed now)" in line]
    assert len(reports) == 2
