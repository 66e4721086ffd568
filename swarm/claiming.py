"""Which stage a node serves: cover the weakest stage first, move only when it clearly helps.

Pure functions over the swarm's records, so the policy is testable without a network. A stage's
*load* is the summed measured throughput (microbatches/s) of the peers serving it that are joining
or online; the swarm's speed is bounded by its weakest stage (the *bottleneck*).

- Coverage comes before speed: a stage with no server stalls the whole pipeline, and a stage with
  fewer than ``min_replicas`` servers dies with its next dropout and has no partner for DiLoCo
  averaging. Throughput estimates are noisy (they are measured on shared machines), so they may
  only decide between placements that are equally well covered.
- A joiner claims an empty stage, else one below ``min_replicas``, else the one with the lowest
  load (ties broken by a per-peer random order, so joiners arriving together spread out instead
  of stampeding onto stage 0; loads within the rebalancing gain factor of the lowest count as ties,
  so measurement noise does not send them all to one stage either).
- A serving node moves when that covers the stages better (fewer empty stages, then fewer missing
  replicas), or, coverage equal, to a stage whose load is at least the gain factor below what its
  own stage keeps without it (hysteresis: the reverse move is then never taken). Nodes check at
  jittered intervals, and of a stage's servers only one, elected per round by a hash of its peer id
  and the round (``mover_of_round``), may move in that round, so the others see the move before
  they decide.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Iterable, Sequence

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


def _serves(record: StageRecord, dialable: bool) -> bool:
    """``record`` shows a peer serving its stage (joining or online); ``dialable``: one others can dial too (not
    behind NAT, ``reachable == "private"``)."""
    return record.state in SERVING_STATES and not (dialable and record.reachable == "private")


def stage_servers(records: dict[int, Sequence[StageRecord]], num_stages: int, exclude_peer: str | None = None) -> list[int]:
    """Number of serving peers per stage that others can dial: a peer behind NAT (``reachable ==
    "private"``) adds throughput, not coverage (nobody can download the stage from it, or route to it)."""
    counts = [0] * num_stages
    for stage, recs in records.items():
        if 0 <= stage < num_stages:
            counts[stage] = sum(1 for r in recs if _serves(r, dialable=True) and r.peer_id != exclude_peer)
    return counts


def stage_server_ids(records: dict[int, Sequence[StageRecord]], stage: int, dialable: bool = False) -> frozenset[str]:
    """The peers ``records`` show serving ``stage`` (joining or online), dialable or not (``dialable``: only
    those others can dial; in a pipeline a peer behind NAT serves stage 0 only, so it never moves)."""
    return frozenset(r.peer_id for r in records.get(stage, []) if _serves(r, dialable))


def choose_stage(loads: Sequence[float], servers: Sequence[int], peer_id: str, min_replicas: int = 1,
                 tolerance: float = 1.0) -> int:
    """The stage a joiner should claim: no servers first, then fewer than ``min_replicas``, then
    lowest load; ties in a per-peer order.

    ``tolerance`` (≥ 1, the swarm's ``rebalance_gain``): among the best-covered stages, every one whose
    load is within ``tolerance`` × the lowest counts as tied. Joiners arriving together cannot see one
    another; with loads that differ by measurement noise only (3.0 against 2.9), a strict minimum would
    send them all to the same stage, and rebalancing, which ignores gains below that factor, would
    leave them there."""
    if tolerance < 1.0:
        raise ValueError(f"tolerance must be >= 1, got {tolerance!r}")
    order = list(range(len(loads)))
    random.Random(peer_id).shuffle(order)
    def coverage(s: int) -> tuple[bool, bool]:
        return servers[s] > 0, servers[s] >= min_replicas

    tier = min(map(coverage, order))
    candidates = [s for s in order if coverage(s) == tier]
    lowest = min(loads[s] for s in candidates)
    return next(s for s in candidates if loads[s] <= lowest * tolerance)


def prefer_own_stage(chosen: int, own: int | None, servers: Sequence[int]) -> int:
    """A restarted node returns to ``own``, the stage of its newest checkpoint (resuming is cheaper than
    downloading and keeps its optimizer state), unless ``chosen`` is a stage nobody serves: covering
    every stage comes first. Rebalancing moves it later if the swarm gains by it."""
    if own is None or not 0 <= own < len(servers) or servers[chosen] <= 0:
        return chosen
    return own


def coverage_gap(servers: Sequence[int], min_replicas: int) -> tuple[int, int]:
    """(stages without a server, replicas missing below ``min_replicas``): smaller is better."""
    return sum(1 for c in servers if c <= 0), sum(max(0, min_replicas - c) for c in servers)


def bottleneck(loads: Iterable[float]) -> float:
    return min(loads, default=0.0)


def rebalance_target(
    loads_without_me: Sequence[float],
    servers_without_me: Sequence[int],
    current: int,
    my_throughput: float,
    gain: float,
    min_replicas: int = 1,
    allowed: Collection[int] | None = None,
) -> int | None:
    """A better stage for this node, or None to stay; ``allowed``: the stages it may move to (None: any),
    e.g. those that fit its device, so a lighter stage it cannot take does not hide one it can.

    Move when that lowers the coverage gap (empty stages first, then replicas missing below
    ``min_replicas``). With the gap unchanged, move to the least-loaded stage that is clearly lighter
    than this node's stage would be without it: its load times ``gain`` (≥ 1) at most what stays
    behind. Such a move never widens the gap, never lowers the swarm's bottleneck (what stays behind
    is above the target's load, which only grows) and always narrows the spread of the loads, so a
    swarm that follows the rule settles; the reverse move is never allowed (no flapping). The rule
    before it, "raise the swarm's bottleneck by ``gain``", moved nobody while two stages tied at the
    bottom, so a stage that a wave of joiners crowded kept them (bench/claiming.py measures both);
    asking that the lighter stage itself gain the factor would freeze too once a stage holds more
    than a handful of nodes (one node's share of its load is then below the factor).
    """
    n = len(loads_without_me)

    def with_me(values: Sequence, stage: int, mine) -> list:
        return [v + (mine if s == stage else 0) for s, v in enumerate(values)]

    gap_now = coverage_gap(with_me(servers_without_me, current, 1), min_replicas)
    others = [s for s in range(n) if s != current and (allowed is None or s in allowed)]
    gaps = {s: coverage_gap(with_me(servers_without_me, s, 1), min_replicas) for s in others}
    better_covered = [s for s in others if gaps[s] < gap_now]
    if better_covered:
        return min(better_covered, key=lambda s: (gaps[s], loads_without_me[s]))

    left_behind = loads_without_me[current]  # this node's stage after it left
    if my_throughput <= 0:
        return None  # nothing to even out with
    lighter = [s for s in others if gaps[s] == gap_now
               and left_behind >= gain * loads_without_me[s] and left_behind > loads_without_me[s]]
    return min(lighter, key=lambda s: loads_without_me[s], default=None)


def mover_of_round(server_ids: Iterable[str], round_index: int) -> str | None:
    """The one server of a stage that may move in rebalancing round ``round_index`` (None: no servers).

    Every server of a stage sees the same improvement at about the same time; if each moved, the swarm would
    overshoot (two into a one-server stage, one then moves back). Drawing to move with probability 1/k each
    still let two or more go in a quarter of the rounds (k = 2: 1/4; k = 3: 0.26). Here every server that reads
    the same records elects the same peer: the lowest hash of (peer id, round). A new round elects another,
    each peer about one round in k, so a peer that cannot move (its device, its cooldown, a stale record)
    holds the stage's moves for one round only."""
    def rank(peer_id: str) -> bytes:
        return hashlib.blake2b(f"{peer_id}/{round_index}".encode(), digest_size=8).digest()
    return min(server_ids, key=rank, default=None)
