"""Shared fixtures and the suite's layout rules.

- tests/unit: one process, no network; tests/swarm: real hivemind DHT/P2P, real ``node`` processes;
  tests/operations: what an operator runs (CLI, containers, Prometheus, Grafana, the status line).
  Every test under swarm/ and operations/ is marked ``slow`` here; unit tests that take more than a
  few seconds carry the mark themselves. ``make test-fast`` runs ``-m "not slow"``.
- The reaper (autouse): a test that leaves a process behind fails. This process is made a child
  subreaper, so a grandchild whose parent died (a libp2p daemon whose DHT process was killed) is
  reparented here rather than to init and is seen too. Leftovers get a grace period to exit, then are
  killed, and the test errors naming them.
- Per-test timeouts come from pytest-timeout (pyproject: timeout = 300).
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path

import pytest
import torch

# Two cores on the CI machine: one test process may use both, child processes set their own.
torch.set_num_threads(min(2, os.cpu_count() or 1))

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent
SLOW_DIRS = ("swarm", "operations")
REAP_GRACE_S = 15.0  # a process tree shutting down (a DHT, its libp2p daemon) exits within this
# Helpers Python (and torch, for tensors shared with a DHT process) starts once and keeps for the interpreter's life (not a test's leftovers).
LONG_LIVED = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "torch_shm_manager")

_PR_SET_CHILD_SUBREAPER = 36
try:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
except (OSError, AttributeError):  # not Linux: descendants still are checked, orphans are not
    pass


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if Path(item.fspath).resolve().relative_to(TESTS).parts[0] in SLOW_DIRS:
            item.add_marker(pytest.mark.slow)


def _processes() -> dict[int, tuple[int, str, int]]:
    """pid → (parent pid, state, start time) from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                table[int(entry)] = (int(fields[1]), fields[0], int(fields[19]))
            except (OSError, ValueError, IndexError):
                continue
    return table


def _descendants(table: dict[int, tuple[int, str, int]]) -> dict[tuple[int, int], str]:
    """(pid, start time) → state, for every live descendant of this process."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = {}, [os.getpid()]
    while stack:
        for child in children.get(stack.pop(), []):
            found[(child, table[child][2])] = table[child][1]
            stack.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _reap_zombies(table: dict[int, tuple[int, str, int]]) -> None:
    """Collect exited direct children (reparented orphans have no Popen to wait for them)."""
    for pid, (ppid, state, _) in table.items():
        if ppid == os.getpid() and state == "Z":
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def _leftovers(before: set[tuple[int, int]]) -> dict[int, str]:
    table = _processes()
    _reap_zombies(table)
    new = {pid: _cmdline(pid) for (pid, start), state in _descendants(table).items()
           if (pid, start) not in before and state != "Z"}
    return {pid: cmd for pid, cmd in new.items() if not any(name in cmd for name in LONG_LIVED)}


@pytest.fixture(autouse=True)
def reaper():
    """Fail a test that leaves a child process (or an orphaned grandchild) running."""
    before = set(_descendants(_processes()))
    yield
    deadline = time.monotonic() + REAP_GRACE_S
    left = _leftovers(before)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _leftovers(before)
    if left:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail(f"the test left {len(left)} process(es) running (killed now): "
                    + "; ".join(f"{pid}: {cmd[:120]}" for pid, cmd in sorted(left.items())))


@pytest.fixture
def small_data_overrides(tmp_path) -> list[str]:
    """Config overrides for a fast local run on a 1 MB slice of the embedded corpus."""
    return [
        "data.max_bytes=1000000", "train.batch_size=4", "train.seq_len=64", "train.eval_batches=2",
        "train.log_every=1000", f"train.checkpoint_dir='{tmp_path / 'ckpt'}'",
    ]
