"""`node sim`'s kill-and-restart waves and its watch (crashes, hangs, joins, coverage, rounds), on a
stand-in swarm: the logic that turns /health polls into the scale report, without processes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from swarm.sim.faults import WaveRunner, Waves
from swarm.sim.swarm import SimError
from swarm.sim.watch import SwarmWatch, percentiles


class FakeProc:
    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None

    def poll(self):
        return self.returncode


@dataclass
class FakeNode:
    index: int
    proc: FakeProc | None = None
    started_at: float = 0.0
    stopped: bool = False
    held: bool = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class FakeSwarm:
    def __init__(self, n: int) -> None:
        self.nodes = [FakeNode(i, FakeProc(10_000 + i), 1000.0) for i in range(n)]
        self.log: list[tuple[str, int]] = []

    def kill(self, index: int) -> None:
        self.nodes[index].stopped = True
        self.nodes[index].proc.returncode = -9
        self.log.append(("kill", index))

    def start(self, index: int) -> None:
        node = self.nodes[index]
        node.proc, node.stopped, node.started_at = FakeProc(20_000 + index), False, node.started_at + 100
        self.log.append(("start", index))


def test_waves_parse_and_refuse_bad_scripts():
    assert Waves.parse("60,4,20") == Waves(60.0, 4, 20.0, 60.0, 0)
    assert Waves.parse("30,2,10,5", seed=3) == Waves(30.0, 2, 10.0, 5.0, 3)
    for bad in ("60,4", "60,4,20,1,2", "0,4,20", "60,0,20", "60,2.5,20", "60,4,-1", "a,b,c", "60,4,inf"):
        with pytest.raises(SimError, match="--waves"):
            Waves.parse(bad)


def test_wave_victims_spare_node_0_and_each_stages_last_node():
    swarm = FakeSwarm(7)  # node 0 and 1 on stage 0, 2..5 on stage 1, 6 on stage 2 (its only node)
    stage_of = {0: 0, 1: 0, 2: 1, 3: 1, 4: 1, 5: 1, 6: 2}
    runner = WaveRunner(Waves(10, 5, 5, 10, seed=1), duration=1000)
    victims = runner.victims(swarm, stage_of)
    assert 0 not in victims and 6 not in victims
    assert sorted(victims) == [1, 2, 3, 4]  # stage 1 keeps one node, stage 0 keeps node 0
    assert victims[0] in (2, 3, 4, 5)  # the fullest stage first
    assert WaveRunner(Waves(10, 5, 5, 10, seed=1), 1000).victims(swarm, stage_of) == victims  # seeded


def test_waves_kill_then_restart_after_the_down_time_and_stop_before_the_end():
    swarm = FakeSwarm(5)
    stage_of = {i: i % 2 for i in range(5)}
    runner = WaveRunner(Waves(every=50, count=2, down=20, first=10), duration=120)
    events = runner.step(swarm, 10.0, stage_of)
    killed = [e["node"] for e in events if e["action"] == "kill"]
    assert len(killed) == 2 and all(not swarm.nodes[i].alive for i in killed)
    assert runner.step(swarm, 29.0, stage_of) == []
    events = runner.step(swarm, 30.5, stage_of)
    assert sorted(e["node"] for e in events if e["action"] == "start") == sorted(killed)
    assert runner.restarts_at == [30.5, 30.5]
    # Waves begin up to duration - down - 30 = 70 s: the one due at 60 runs, none at 110.
    assert any(e["action"] == "kill" for e in runner.step(swarm, 60.0, stage_of))
    runner.finish(swarm)
    assert all(n.alive for n in swarm.nodes)
    assert [e for e in runner.step(swarm, 110.0, stage_of) if e["action"] == "kill"] == []


def health(stage, progress, state="online", **extra):
    return {"state": state, "stage": stage, "progress": progress, **extra}


def test_the_watch_counts_crashes_not_deliberate_kills_and_times_joins():
    swarm = FakeSwarm(3)
    watch = SwarmWatch(swarm, stages=1, hang_s=60, join_hang_s=300)
    watch.observe(0.0, [health(0, 0), health(0, 0), None])
    watch.observe(2.0, [health(0, 1, first_step_at=1012.5), health(0, 1, first_step_at=1030.0), None])
    swarm.kill(1)  # by the harness
    swarm.nodes[2].proc.returncode = 1  # by itself
    watch.observe(4.0, [health(0, 2), None, None])
    watch.observe(6.0, [health(0, 3), None, None])  # counted once
    swarm.start(1)
    watch.observe(8.0, [health(0, 4), health(0, 5, first_step_at=swarm.nodes[1].started_at + 7.0), None])
    s = watch.summary([])
    assert s["survivor_crashes"] == 1 and s["crash_details"][0]["node"] == 2
    assert s["join_to_first_step_s"]["n"] == 2 and s["join_to_first_step_s"]["max"] == 30.0
    assert s["rejoin_to_first_step_s"] == {"n": 1, "p50": 7.0, "p95": 7.0, "max": 7.0}


def test_the_watch_reports_silence_and_stalls_as_hangs_but_not_a_paused_node():
    swarm = FakeSwarm(2)
    watch = SwarmWatch(swarm, stages=1, hang_s=10, join_hang_s=300)
    swarm.nodes[1].held = True  # paused on purpose: its silence is no hang
    for t in range(0, 30, 2):
        watch.observe(float(t), [None, None])
    assert [h["node"] for h in watch.hangs if "node" in h] == [0, 0]
    swarm2 = FakeSwarm(1)
    watch2 = SwarmWatch(swarm2, stages=1, hang_s=10, join_hang_s=300)
    for t in range(0, 30, 2):
        watch2.observe(float(t), [health(0, 5)])  # online, answering, never stepping
    assert any("no optimizer step on stage 0" in h["what"] for h in watch2.hangs)


def test_coverage_restoration_rounds_and_percentiles():
    swarm = FakeSwarm(4)
    watch = SwarmWatch(swarm, stages=2, hang_s=60, join_hang_s=300)  # 2 replicas a stage
    rounds = {"outer": {"recent_rounds": [[500.0, "committed", 1.5, 100, 200, 2], [501.0, "skipped", 9.0, 10, 0, 0]]}}
    watch.observe(0.0, [health(0, 1), health(0, 1), health(1, 1), None])
    watch.observe(5.0, [health(0, 2, **rounds), health(0, 2), health(1, 2), health(1, 1)])
    watch.observe(9.0, [health(0, 3, **rounds), health(0, 3), health(1, 3), None])
    watch.observe(20.0, [health(0, 4), health(0, 4), health(1, 4), health(1, 3)])
    s = watch.summary(restarts_at=[10.0, 21.0])
    assert s["stages_replicated_s"] == 5.0
    assert s["replicas_restored_after_restart_s"] == [10.0, 0.0]
    assert s["exchange_round_s"]["n"] == 1 and s["exchange_round_s"]["p50"] == 1.5  # deduplicated
    assert s["exchange_rounds_seen"] == {"averaged": 1, "alone": 0, "skipped": 1}
    assert s["bytes_per_round_per_node"]["p50"] == 300
    assert percentiles([]) == {"n": 0, "p50": None, "p95": None, "max": None}
    assert percentiles(list(range(1, 101)))["p95"] == 95
