"""`node export` against a live swarm of real node processes: 2 pipeline stages × 2 Streaming DiLoCo replicas.

Once every stage has committed an outer round, `node export --join` (a separate process, a DHT client)
downloads each stage's consensus from its replicas and writes the model; `node eval` scores it below
the untrained model's loss. With both replicas of a stage stopped, the export is refused with the reason.
Deadlines, never sleeps; every process is reaped by LocalSwarm.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.sim.swarm import LocalSwarm, processes_mentioning

ROOT = Path(__file__).resolve().parents[2]
# 2 stages; outer rounds every 20 summed steps a fragment. Stages are pinned (nodes 0, 2 on stage 0; 1, 3 on
# stage 1): 2 replicas each from the start, and the refusal below needs stage 1 to stay unserved once its
# replicas stop (a pinned node never rebalances).
OVERRIDES = ["pipeline.num_stages=2", "diloco.inner_steps=40", "diloco.fragments=2", "train.batch_size=4",
             "train.seq_len=64", "train.log_every=1000"]
PINNED = {i: [f"swarm.stage={i % 2}"] for i in range(4)}


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", "--log-level", "INFO", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def _committed(swarm: LocalSwarm, stage: int) -> bool:
    return any((h := swarm.health(i)) is not None and h.get("stage") == stage
               and (h.get("outer") or {}).get("rounds_committed", 0) >= 1 for i in range(len(swarm.nodes)))


@pytest.mark.timeout(420)
def test_export_takes_each_stages_consensus_from_its_replicas_and_refuses_an_unserved_stage(tmp_path):
    with LocalSwarm(4, "swarm/pipeline-local", OVERRIDES, workdir=tmp_path / "swarm", node_overrides=PINNED) as swarm:
        swarm.start_all()
        swarm.wait_until(lambda: all(len(swarm.serving(s)) == 2 for s in range(2)), 150, "2 replicas on each stage")
        swarm.wait_until(lambda: _committed(swarm, 0) and _committed(swarm, 1), 180, "an outer round on each stage")

        out = tmp_path / "model"
        joins = [arg for a in swarm.join_addresses()[:2] for arg in ("--join", a)]
        done = _cli("export", *joins, "--run-id", "sim", "--out", str(out), "--json")
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert [s["stage"] for s in summary["stages"]] == [0, 1]
        for s in summary["stages"]:
            assert s["agreement"] == "consensus" and s["replicas"] == 2 and 1 <= len(s["donors"]) <= 2, s
            assert any(not h.startswith("-1:") for h in s["history"]), s  # an applied round is in it
        assert "downloaded" in done.stderr  # progress was shown

        scored = _cli("eval", "--model", str(out), "--device", "cpu", "--batches", "2")
        assert scored.returncode == 0, scored.stderr[-3000:]
        val = json.loads(scored.stdout.strip().splitlines()[-1])["val_loss"]
        assert math.isfinite(val) and val < math.log(256) - 0.5, val  # trained: well below uniform bytes

        for i in (1, 3):
            assert swarm.term(i) == 0  # OFFLINE records: stage 1 unserved at once
        refused = _cli("export", "--join", swarm.join_addresses()[0], "--run-id", "sim", "--out", str(tmp_path / "no"))
        assert refused.returncode == 2, refused.stdout + refused.stderr[-3000:]
        assert "stage(s) [1] have no ONLINE server" in refused.stderr, refused.stderr[-2000:]
        assert not (tmp_path / "no").exists()
    assert processes_mentioning(str(tmp_path)) == []
