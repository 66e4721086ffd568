"""Fault scripts for a local swarm: ``"20:kill:2,60:kill:s1,90:start:new"``, parsed and carried out.

:func:`parse_faults` reads a script into :class:`Fault` s sorted by time; :func:`apply_fault` carries
one out on a :class:`~swarm.sim.swarm.LocalSwarm` when it is due (swarm/sim/run.py keeps the clock).
Actions: ``kill`` (SIGKILL to the node's process group: a machine dying), ``kill-in-round`` (the same,
once the node has a fragment exchange in flight), ``term`` (a graceful exit), ``start``, ``pause`` /
``resume`` (SIGSTOP/SIGCONT), ``partition`` / ``heal`` (its network-namespace link down/up).
"""

from __future__ import annotations

import logging
import math
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
