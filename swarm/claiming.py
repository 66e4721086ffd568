"""Which stage a node serves: cover the weakest stage first, move only when it clearly helps.

Pure functions over the swarm's records, so the policy is testable without a network. A stage's
*load* is the summed measured throughput (microbatches/s) of the peers serving it that are joining
or online; the swarm's speed is bounded by its weakest stage (the *bottleneck*).

- A joiner claims the stage with the lowest load (ties broken by a per-peer random order, so
  joiners arriving together spread out instead of stampeding onto stage 0).
- A serving node moves to another stage only if that raises the bottleneck by at least the gain
  factor (hysteresis), or if it fills an empty stage without emptying its own. Nodes check at
  jittered intervals, so when one moves the others see it before they decide.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from protocol.messages import StageRecord

SERVING_STATES = ("joining", "online")


def stage_loads(
    records: dict[int, Sequence[StageRecord]], num_stages: int, exclude_peer: str | None = None
) -> list[float]:
    """Summed throughput per stage of serving peers (``exclude_peer`` left out, e.g. oneself)."""
    loads = [0.0] * num_stages
    for stage, recs in records.items():
        if 0 <= stage < num_stages:
            loads[stage] = sum(r.throughput for r in recs if r.state in SERVING_STATES and r.peer_id != exclude_peer)
    return loads


def stage_servers(records: dict[int, Sequence[StageRecord]], num_stages: int, exclude_peer: str | None = None) -> list[int]:
    """Number of serving peers per stage."""
    counts = [0] * num_stages
    for stage, recs in records.items():
        if 0 <= stage < num_stages:
            counts[stage] = sum(1 for r in recs if r.state in SERVING_STATES and r.peer_id != exclude_peer)
    return counts


def choose_stage(loads: Sequence[float], servers: Sequence[int], peer_id: str) -> int:
    """The stage a joiner should claim: no servers first, then lowest load; ties in a per-peer order."""
    order = list(range(len(loads)))
    random.Random(peer_id).shuffle(order)
    return min(order, key=lambda s: (servers[s] > 0, loads[s]))


def bottleneck(loads: Iterable[float]) -> float:
    return min(loads, default=0.0)


def rebalance_target(
    loads_without_me: Sequence[float],
    servers_without_me: Sequence[int],
    current: int,
    my_throughput: float,
    gain: float,
) -> int | None:
    """A better stage for this node, or None to stay.

    Move when some stage has no server and this node's stage keeps one without it; otherwise when
    moving raises the bottleneck by at least ``gain`` (≥ 1) times.
    """
    n = len(loads_without_me)
    if servers_without_me[current] > 0:
        empty = [s for s in range(n) if s != current and servers_without_me[s] == 0]
        if empty:
            return min(empty, key=lambda s: loads_without_me[s])

    def with_me(stage: int) -> list[float]:
        return [load + (my_throughput if s == stage else 0.0) for s, load in enumerate(loads_without_me)]

    now = bottleneck(with_me(current))
    best, best_value = None, now
    for stage in range(n):
        if stage == current:
            continue
        value = bottleneck(with_me(stage))
        if value > best_value:
            best, best_value = stage, value
    if best is not None and best_value >= gain * now and best_value > now:
        return best
    return None
