"""Lighter nodes (issue 20): what keeps a node's process tree small, and the bench that measures it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def test_hivemind_futures_share_memory_by_file_descriptor_so_no_shm_manager_starts():
    # A fresh interpreter: the order of imports is what matters (node, then hivemind).
    code = ("import node, hivemind, torch.multiprocessing as m; from hivemind.utils.mpfuture import MPFuture; "
            "f = MPFuture(); print(m.get_sharing_strategy())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "file_descriptor"


def test_the_footprint_bench_sees_a_process_and_its_descendants():
    from footprint import sample, session_pids

    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                               "subprocess.run([sys.executable, '-c', 'import time; time.sleep(30)'])"])
    try:
        deadline = time.monotonic() + 30
        while len(session_pids(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        tree = session_pids(parent.pid)
        assert len(tree) == 2 and tree[0] == parent.pid
        s = sample(tree[1])
        assert s is not None and s["rss"] > 0 and s["pss"] > 0 and s["uss"] > 0 and s["cpu_s"] >= 0
    finally:
        subprocess.run(["pkill", "-P", str(parent.pid)])
        parent.kill()
        parent.wait()
