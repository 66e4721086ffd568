"""Crash safety of node/checkpoint.py: a writer SIGKILLed at random moments never leaves a torn checkpoint.

A harness process imports torch once and forks one writer per round; the writer saves checkpoints of
a few MB in a loop (as a node does) until the test SIGKILLs it after a seeded random delay. After every
kill each ``ckpt-*.pt`` must load completely and hold exactly what was saved, ``load_latest`` must
return the newest of them (None before the first), the newest step never goes back, and the
temporary files the killed writers left are gone after the next writer's first save.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from node.checkpoint import list_checkpoints, load_latest

REPO = Path(__file__).resolve().parents[2]
NUMEL = 1 << 20  # 4 MiB of float32 per checkpoint
ROUNDS = 20

# Forking from a process that imported torch but ran no torch op is safe (no thread pools yet).
HARNESS = r"""
import os, sys
import torch
from node.checkpoint import list_checkpoints, save_checkpoint

directory, numel = sys.argv[1], int(sys.argv[2])

def writer():
    torch.set_num_threads(1)
    found = list_checkpoints(directory)
    step = found[-1][0] + 1 if found else 1
    while True:
        state = {"step": step, "payload": torch.arange(numel, dtype=torch.float32) + step,
                 "meta": {"name": f"s{step}", "sizes": [step, numel]}}
        save_checkpoint(directory, step, state, keep=2)
        os.write(1, f"saved {os.getpid()} {step}\n".encode())
        step += 1

os.write(1, b"ready\n")
child = None
while line := sys.stdin.readline():
    if line.strip() == "go":
        child = os.fork()
        if child == 0:
            try:
                writer()
            finally:
                os._exit(1)
        os.write(1, f"pid {child}\n".encode())
    elif line.strip() == "wait":
        _, status = os.waitpid(child, 0)
        os.write(1, f"reaped {status}\n".encode())
"""


def _check_complete(directory: Path) -> list[int]:
    """Every checkpoint file loads fully and holds what its writer saved; returns their steps."""
    steps = []
    for step, path in list_checkpoints(directory):
        state = torch.load(path, weights_only=True)  # a torn file raises here
        assert state["step"] == step and state["meta"] == {"name": f"s{step}", "sizes": [step, NUMEL]}
        assert torch.equal(state["payload"], torch.arange(NUMEL, dtype=torch.float32) + step), path
        steps.append(step)
    return steps


@pytest.mark.timeout(120)
def test_sigkill_at_random_moments_never_leaves_a_torn_checkpoint(tmp_path):
    rng = random.Random(20240609)
    delays = [0.0] + [rng.uniform(0.0, 0.3) for _ in range(ROUNDS - 1)]  # the first may die before any save
    proc = subprocess.Popen([sys.executable, "-c", HARNESS, str(tmp_path), str(NUMEL)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()

    def expect(prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} line from the harness within {timeout} s") from None
            if line.startswith(prefix):
                return line

    def send(command: str) -> None:
        proc.stdin.write(command + "\n")
        proc.stdin.flush()

    started, newest, mid_write, cleaned = time.monotonic(), 0, 0, 0
    try:
        expect("ready", 90)
        for delay in delays:
            stale = set(tmp_path.glob(".ckpt-*.tmp"))
            send("go")
            pid = int(expect("pid").split()[1])
            if stale:  # the new writer's first save removes what the killed ones left
                expect(f"saved {pid} ")
                assert not stale & set(tmp_path.glob(".ckpt-*.tmp")), stale
                cleaned += 1
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            send("wait")
            assert expect("reaped").split()[1] == str(signal.SIGKILL)  # waitpid status: killed by the signal

            steps = _check_complete(tmp_path)
            state = load_latest(tmp_path)
            if state is None:
                assert steps == [] and newest == 0
            else:
                assert state["step"] == steps[-1] >= newest  # a completed save is never lost
                newest = state["step"]
            mid_write += bool(list(tmp_path.glob(".ckpt-*.tmp")))
            assert len(steps) <= 3  # keep=2, plus one if killed between the rename and the pruning
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait(10)
    assert newest > ROUNDS // 2, newest  # the writers did make progress between kills
    assert mid_write >= 1 and cleaned >= 1, (mid_write, cleaned)  # some kills did land inside a write
    assert time.monotonic() - started < 60
