"""The pipeline in a real localhost swarm: `node sim` with 6 node processes, 3 stages × 2 replicas.

One run with the issue's fault script (a middle-stage replica SIGKILLed, a new node started later);
everything is read from the JSON summary `node sim --json` prints, which sums every node's /health.
"""

from __future__ import annotations

import statistics

import pytest
from p2p_util import run_sim

from swarm.sim.faults import parse_faults
from swarm.sim.monitor import PipelineMonitor
from swarm.sim.swarm import SimError, processes_mentioning


@pytest.mark.timeout(600)
def test_pipeline_swarm_trains_compresses_and_survives_a_dead_middle_replica(tmp_path):
    duration, kill_at, start_at = 130, 50, 70
    s = run_sim(6, "configs/swarm/pipeline-local.toml", duration, f"{kill_at}:kill:s1,{start_at}:start:new", tmp_path, timeout=540)
    assert s["ok"], s
    assert [(e["action"], e["target"]) for e in s["events"]] == [("kill", "s1"), ("start", "new")]
    killed, new = s["events"][0]["node"], s["events"][1]["node"]
    assert killed is not None and new == 6

    # It trains: the last stages' loss falls clearly.
    assert s["loss_end"] < s["loss_start"] - 1.0, s
    # And keeps training through the kill and the join: losses are scored to the end, and the level
    # they reach holds (a stage replica lost, reset or corrupted for good would lift it by far more
    # than 0.2). Medians of 3 buckets: the joiner starts from the stage's agreed weights, which early
    # in a run lag its peers' by up to inner_steps (fragments not yet averaged are still the seeded
    # init), so one bucket after it joins can spike (+0.5 seen) until it has trained. By then the tiny
    # model is on a slow slope (~0.1 a minute) that 10 s buckets of ~10 losses (noise ~0.07 each)
    # cannot resolve in 130 s, so "still falling after the kill" is not asserted.
    curve = [(s["loss_first_s"] + t, loss) for t, loss in s["loss_curve_10s"]]  # on the run's clock
    after = [loss for t, loss in curve if t >= s["events"][0]["t"]]
    assert len(after) >= 6 and curve[-1][0] >= duration - 30, (s["loss_first_s"], s["loss_curve_10s"])
    level_after_kill, level_end = statistics.median(after[:3]), statistics.median(after[-3:])
    assert level_end <= level_after_kill + 0.2, (level_after_kill, level_end, s["loss_first_s"], s["loss_curve_10s"])

    # It compresses: k = 8 of d = 256 in bf16 with one byte of id a token, headers included.
    assert s["wire_compression_ratio"] >= 30.0, s
    assert s["bytes_forward"] > 0 and s["bytes_backward"] > 0 and s["tokens"] > 0 and s["tokens_per_s"] > 0
    assert s["microbatches_ok"] >= 50
    # Every completed microbatch was scored by a last stage (killed nodes are stage 1, not last):
    # counters are summed once per node process, never twice.
    assert s["microbatches_ok"] <= s["losses_scored"] + 10 and s["tokens"] == 1024 * s["microbatches_ok"], s

    # The faults: nothing hung (the run ended on time, every process is gone), and the new node serves
    # traffic. Drops and retries are counted in the summary; their counting is pinned down
    # deterministically in test_swarm_pipeline.py (a SIGKILL may cost a retry, a drop, or nothing).
    assert s["duration_s"] < duration + 60
    # It serves frames from the previous stage, or, if it claimed stage 0, drives microbatches through.
    in_use = s["served_per_node"].get(str(new), 0) + s["driven_per_node"].get(str(new), 0)
    assert in_use > 0, (s["stage_of_node"], s["served_per_node"], s["driven_per_node"])
    assert processes_mentioning(str(tmp_path)) == []

    # Replica sync runs inside the pipeline stages: every stage's replicas committed outer rounds.
    per_stage = s["outer_rounds_committed_per_stage"]
    assert all(per_stage.get(str(stage), 0) >= 1 for stage in range(3)), per_stage

    # The swarm's validation loss (every 15 s per stage-0 driver in this config, on the agreed weights):
    # measured, and lower once outer rounds have moved the agreed weights off the init. How many measurements
    # fit in 130 s depends on the machine's load (3 in one loaded CI run, the first at 64 s, before any fault),
    # so only a first and a later one are asserted.
    assert s["val_measurements"] >= 2, s.get("val_loss_curve")
    assert s["val_loss_end"] < s["val_loss_start"] - 0.3, s["val_loss_curve"]


def test_the_monitor_sums_each_node_process_once():
    monitor = PipelineMonitor()
    health = {"stage": 0, "uptime_s": 1.0, "pipeline": {"microbatches_ok": 3, "tokens_ok": 30,
                                                       "recent_losses": [[100.0, 2.0], [101.0, 1.5]]}}
    for _ in range(3):  # polled again and again: the latest value counts, once
        monitor.observe(0, 111, health)
    later = {**health, "pipeline": {**health["pipeline"], "microbatches_ok": 5, "tokens_ok": 50}}
    monitor.observe(0, 111, later)
    monitor.observe(0, 222, health)  # the same node restarted: a new process, its own counters
    summary = monitor.summary(end_time=110.0)
    assert summary["microbatches_ok"] == 8 and summary["tokens"] == 80
    assert summary["losses_scored"] == 2 and summary["tokens_per_s"] == 8.0
    assert "loss_first_s" not in summary and monitor.summary(110.0, start_time=96.0)["loss_first_s"] == 4.0


def test_fault_targets_name_nodes_stages_or_new_nodes():
    faults = parse_faults("90:start:new, 60:kill:s1,10:pause:3")
    assert [str(f) for f in faults] == ["10:pause:3", "60:kill:s1", "90:start:new"]
    assert faults[1].stage == 1 and faults[1].node is None and faults[2].new
    for bad in ("5:kill:new", "5:kill:sx", "5:explode:1", "5:kill", "-1:kill:1", "5:kill:s-1"):
        with pytest.raises(SimError):
            parse_faults(bad)
