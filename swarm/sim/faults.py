"""Fault scripts for a local swarm: ``"20:kill:2,60:kill:s1,90:start:new"``, parsed and carried out.

:func:`parse_faults` reads a script into :class:`Fault` s sorted by time; :func:`apply_fault` carries
one out on a :class:`~swarm.sim.swarm.LocalSwarm` when it is due (swarm/sim/run.py keeps the clock).
Actions: ``kill`` (SIGKILL to the node's process group: a machine dying), ``kill-in-round`` (the same,
once the node has a fragment exchange in flight), ``term`` (a graceful exit), ``start``, ``pause`` /
``resume`` (SIGSTOP/SIGCONT), ``partition`` / ``heal`` (its network-namespace link down/up).

:class:`Waves` (``node sim --waves EVERY,COUNT,DOWN[,FIRST]``) kills several nodes at once at a period
and restarts them later; :class:`WaveRunner` picks the victims as the run goes.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

from swarm.sim.swarm import LocalSwarm, SimError

logger = logging.getLogger(__name__)

ACTIONS = ("kill", "kill-in-round", "term", "start", "pause", "resume", "partition", "heal")
IN_ROUND_WAIT_S = 15.0  # kill-in-round: how long to wait for the node to have a fragment exchange in flight


@dataclass
class Fault:
    at: float
    action: str
    node: int | None = None  # a node index; None with ``stage`` or ``new``
    stage: int | None = None  # "sS": one node serving stage S at that moment
    new: bool = False  # "start:new": a node that was not in the swarm before

    def __str__(self) -> str:
        target = "new" if self.new else f"s{self.stage}" if self.stage is not None else str(self.node)
        return f"{self.at:g}:{self.action}:{target}"


def parse_faults(text: str) -> list[Fault]:
    """``"20:kill:2,40:start:2"`` → faults sorted by time.

    The target is a node index, ``sS`` (one node serving stage S at that moment, e.g. ``60:kill:s1``),
    or, for ``start``, ``new`` (a fresh node joining the swarm, e.g. ``90:start:new``).
    """
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            at, action, target = item.split(":")
            fault = Fault(float(at), action)
            if target == "new":
                fault.new = True
            elif target.startswith("s"):
                fault.stage = int(target[1:])
            else:
                fault.node = int(target)
        except ValueError:
            raise SimError(f"bad fault {item!r}: expected SECONDS:ACTION:TARGET, e.g. 20:kill:2, 60:kill:s1, "
                           "90:start:new") from None
        if fault.action not in ACTIONS:
            raise SimError(f"bad fault {item!r}: action must be one of {', '.join(ACTIONS)}")
        if fault.new and fault.action != "start":
            raise SimError(f"bad fault {item!r}: only start can take a new node")
        numbers = [v for v in (fault.node, fault.stage) if v is not None]
        if not (math.isfinite(fault.at) and fault.at >= 0 and all(v >= 0 for v in numbers)):
            raise SimError(f"bad fault {item!r}: time, node and stage must be non-negative numbers")
        faults.append(fault)
    return sorted(faults, key=lambda f: f.at)



def resolve_target(swarm: LocalSwarm, fault: Fault) -> int | None:
    """The node index a fault acts on now; None when no node fits (e.g. no live server of the stage)."""
    if fault.new:
        return swarm.add_node()
    if fault.stage is not None and fault.action in ("resume", "heal"):
        # The node "pause:sS" (or "partition:sS") held: a held node answers no /health, so it serves nothing
        # that the harness can see.
        held = [i for i, node in enumerate(swarm.nodes) if node.held and node.held_for_stage == fault.stage]
        return held[0] if held else None
    if fault.stage is not None:
        candidates = [i for i in swarm.serving(fault.stage) if i != 0] or swarm.serving(fault.stage)
        return candidates[-1] if candidates else None
    return fault.node


def apply_fault(swarm: LocalSwarm, fault: Fault) -> tuple[int | None, bool | None]:
    """Carry out ``fault`` now: the node index it acted on (None: nothing fitted, logged) and, for
    kill-in-round, whether that node had a fragment exchange in flight when it was killed (else None)."""
    index = resolve_target(swarm, fault)
    if index is None:
        logger.warning("fault %s ignored: no live node serves stage %s", fault, fault.stage)
        return None, None
    if fault.action not in ("start", "heal") and not swarm.nodes[index].alive:
        logger.warning("fault %s on node %d ignored: it is not running", fault.action, index)
        return index, None
    if fault.action == "kill-in-round":
        in_round = _wait_in_round(swarm, index)
        swarm.kill(index)
        return index, in_round
    if fault.action == "term":
        swarm.resume(index)  # a paused node cannot handle SIGTERM
    getattr(swarm, fault.action)(index)
    if fault.action in ("pause", "partition"):
        swarm.nodes[index].held_for_stage = fault.stage
    return index, None


def _wait_in_round(swarm: LocalSwarm, index: int) -> bool:
    """Wait (up to IN_ROUND_WAIT_S) until node ``index`` reports a fragment exchange in flight."""
    deadline = time.monotonic() + IN_ROUND_WAIT_S
    while time.monotonic() < deadline:
        health = swarm.health(index) or {}
        if health.get("outer", {}).get("rounds_in_flight", 0) > 0:
            return True
        time.sleep(0.1)
    logger.warning("node %d had no fragment exchange in flight within %.0f s; killing it anyway", index,
                   IN_ROUND_WAIT_S)
    return False


@dataclass
class Waves:
    """Kill-and-restart waves: from ``first`` s, every ``every`` s, SIGKILL ``count`` live nodes (never
    node 0, the run's founder; spread over the stages, the fullest first, and never a stage's last
    online node), and start each again ``down`` s later with its identity and checkpoints. Victims are
    drawn with ``seed``. No wave begins in the last ``down`` + 30 s of a run, so every node is back
    for the final reading."""

    every: float
    count: int
    down: float
    first: float
    seed: int = 0

    @classmethod
    def parse(cls, text: str, seed: int = 0) -> Waves:
        """``"EVERY,COUNT,DOWN[,FIRST]"``, e.g. ``"60,4,20"`` (FIRST defaults to EVERY)."""
        try:
            parts = [float(p) for p in text.split(",")]
            if len(parts) not in (3, 4):
                raise ValueError
            every, count, down = parts[:3]
            first = parts[3] if len(parts) == 4 else every
        except ValueError:
            raise SimError(f"bad --waves {text!r}: expected EVERY,COUNT,DOWN[,FIRST] in seconds and nodes, "
                           "e.g. 60,4,20") from None
        if not (every > 0 and count >= 1 and count == int(count) and down >= 0 and first >= 0
                and all(math.isfinite(v) for v in parts)):
            raise SimError(f"bad --waves {text!r}: EVERY > 0, COUNT a whole number >= 1, DOWN and FIRST >= 0")
        return cls(every, int(count), down, first, seed)


class WaveRunner:
    """Carries out :class:`Waves` on a swarm as the run's clock passes (swarm/sim/run.py calls :meth:`step`)."""

    def __init__(self, waves: Waves, duration: float) -> None:
        self.waves, self.duration = waves, duration
        self.rng = random.Random(waves.seed)
        self.next_wave = waves.first
        self.back: list[tuple[float, int]] = []  # (when, node) restarts due
        self.restarts_at: list[float] = []

    def step(self, swarm: LocalSwarm, elapsed: float, stage_of: dict[int, int | None]) -> list[dict]:
        """Kills and restarts due at ``elapsed``; ``stage_of``: each live node's stage from its last /health.
        Returns the events."""
        events = []
        for when, index in [b for b in self.back if b[0] <= elapsed]:
            self.back.remove((when, index))
            swarm.start(index)
            self.restarts_at.append(round(elapsed, 1))
            events.append({"t": round(elapsed, 1), "action": "start", "target": "wave", "node": index})
        w = self.waves
        if elapsed >= self.next_wave and elapsed <= self.duration - w.down - 30:
            for index in self.victims(swarm, stage_of):
                swarm.kill(index)
                self.back.append((elapsed + w.down, index))
                events.append({"t": round(elapsed, 1), "action": "kill", "target": "wave", "node": index})
            self.next_wave = elapsed + w.every
        return events

    def victims(self, swarm: LocalSwarm, stage_of: dict[int, int | None]) -> list[int]:
        """Up to ``count`` live nodes other than node 0, taken from the stage with the most live nodes
        each time, never leaving a stage without one."""
        by_stage: dict[int, list[int]] = {}  # stage (-1: not known yet) -> candidates
        alive: dict[int, int] = {}  # stage -> live nodes
        for node in swarm.nodes:
            stage = stage_of.get(node.index)
            stage = -1 if stage is None else stage
            if node.alive:
                alive[stage] = alive.get(stage, 0) + 1
            if node.index != 0 and node.alive and not node.held:
                by_stage.setdefault(stage, []).append(node.index)
        for nodes in by_stage.values():
            self.rng.shuffle(nodes)
        chosen = []
        for _ in range(self.waves.count):
            open_ = [s for s, nodes in by_stage.items() if nodes and (s == -1 or alive[s] > 1)]
            if not open_:
                break
            stage = max(open_, key=lambda s: (alive[s], s))
            chosen.append(by_stage[stage].pop())
            alive[stage] -= 1
        return chosen

    def finish(self, swarm: LocalSwarm) -> None:
        """Start every node still down from a wave (the run ends)."""
        for _, index in self.back:
            swarm.start(index)
        self.back.clear()
