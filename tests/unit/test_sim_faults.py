"""swarm/sim/faults.py: which node a stage-targeted fault acts on."""

from __future__ import annotations

from pathlib import Path

from swarm.sim.faults import parse_faults, resolve_target
from swarm.sim.swarm import SimNode


class FakeSwarm:
    def __init__(self, serving: dict[int, list[int]], n: int = 6) -> None:
        self.nodes = [SimNode(i, Path(f"/nonexistent/node{i}")) for i in range(n)]
        self._serving = serving

    def serving(self, stage: int) -> list[int]:
        return [i for i in self._serving.get(stage, []) if not self.nodes[i].held]  # a held node answers nothing


def test_resume_of_a_stage_resumes_the_node_its_pause_held() -> None:
    pause, resume, other = parse_faults("60:pause:s1,90:resume:s1,95:resume:s2")
    swarm = FakeSwarm({1: [1, 4], 2: [2, 5]})
    target = resolve_target(swarm, pause)
    assert target == 4  # the last server of stage 1 other than node 0
    swarm.nodes[target].held, swarm.nodes[target].held_for_stage = True, 1  # what apply_fault records
    assert swarm.serving(1) == [1]  # not seen serving while paused: "a node serving s1" would be node 1
    assert resolve_target(swarm, resume) == 4
    assert resolve_target(swarm, other) is None  # nothing of stage 2 was paused
