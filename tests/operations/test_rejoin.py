"""Restarting is resuming: `node start` twice with the same identity and no flags is one run, not two.

A real node founds a run, trains, stops (SIGTERM: checkpoint); started again with the same command
(and the model's init changed, as a preset change since the run began would) it says it resumes that
run as its founder with the run's own parameters, and comes back with the same run id and its
checkpoint's progress. The choices between rejoining, resuming and a new swarm are unit-tested in
tests/unit/test_last_run.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from node.last_run import load_last_run
from swarm.sim.swarm import processes_mentioning

REPO = Path(__file__).resolve().parents[2]


class NodeProcess:
    """One `node start` with its stdout collected on a thread (waited on with deadlines, never sleeps)."""

    def __init__(self, home: Path, *extra: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "--log-level", "WARNING", "start", "--identity", str(home / "id.key"),
             "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
             "--threads", "1", "--status", "off", "--set", f"train.checkpoint_dir='{home / 'ckpt'}'",
             "--set", "swarm.refresh_s=1", *extra],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self.lines: list[str] = []
        self._ended = False
        self._grew = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._grew:
                self.lines.append(line)
                self._grew.notify_all()
        with self._grew:
            self._ended = True
            self._grew.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        with self._grew:
            while (match := re.search(pattern, "".join(self.lines))) is None:
                if self._ended or time.monotonic() >= deadline:
                    raise AssertionError(f"no {pattern!r}; output:\n{''.join(self.lines)[-3000:]}")
                self._grew.wait(deadline - time.monotonic())
        return match

    def health(self, port: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return json.load(response)

    def wait_health(self, port: str, predicate, timeout: float) -> dict:
        deadline, health = time.monotonic() + timeout, None
        while time.monotonic() < deadline and self.proc.poll() is None:
            health = self.health(port)
            if predicate(health):
                return health
            time.sleep(0.5)  # polling /health, with the deadline above
        raise AssertionError(f"/health never matched; last: {health}; output:\n{''.join(self.lines)[-3000:]}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.mark.timeout(300)
def test_a_restarted_founder_resumes_its_run_with_its_checkpoint(tmp_path):
    nodes = []
    try:
        first = NodeProcess(tmp_path)
        nodes.append(first)
        port = first.wait_for(r"metrics: http://127\.0\.0\.1:(\d+)/", 60).group(1)
        run_id = first.wait_for(r"\nrun (\S+): model", 120).group(1)
        trained = first.wait_health(port, lambda h: h["progress"] >= 2, 120)["progress"]
        assert first.stop() == 0
        memory = load_last_run(tmp_path / "id.key")
        assert memory.run_id == run_id and memory.founder and memory.peers == ()
        assert memory.params["model"]["init_std"] == 0.06  # the run's parameters, kept for a founder's resume

        # The same command, with the model's init changed as a preset change would: the run keeps its own.
        second = NodeProcess(tmp_path, "--set", "model.init_std=0.03")
        nodes.append(second)
        second.wait_for(rf"resuming run {re.escape(run_id)} as its founder \(no other peer known\); `--new` starts "
                        r"a new swarm", 30)
        second.wait_for(r"the run keeps its own parameters where this config differs: model\.init_std=0\.06 \(this "
                        r"config: 0\.03\); ignoring model\.init_std=0\.03", 30)
        port = second.wait_for(r"metrics: http://127\.0\.0\.1:(\d+)/", 60).group(1)
        assert second.wait_for(r"\nrun (\S+): model", 120).group(1) == run_id
        health = second.health(port)
        assert health["run_id"] == run_id and health["resumed_from"] >= trained
        assert second.stop() == 0
    finally:
        for node in nodes:
            node.kill()
    assert processes_mentioning(str(tmp_path)) == []
