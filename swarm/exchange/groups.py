"""Who averages with whom in a round: the round's key, the groups every replica plans alike from the
same peer list (``plan_groups``), the balanced exchange's slices and their reducers and checkers
(``plan_slices``), and what a round gives its caller (:class:`RoundResult`)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RoundKey:
    stage: int
    fragment: int
    round: int


@dataclass
class RoundResult:
    """What one replica got out of a round. ``mean`` None: the round was skipped (``reason`` says why)."""

    mean: torch.Tensor | None
    role: str  # "leader" or "member"
    leader: str
    group: list[str] = field(default_factory=list)  # peers whose parts are in the mean (leader's view)
    group_size: int = 0  # parts in the mean (members learn it from the leader's reply)
    rejected: dict[str, str] = field(default_factory=dict)  # peer -> reason (leader only)
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    reason: str = ""
    skip: str = ""  # why there is no mean, as a short code: timeout, refused_<code>, unreachable, ...
    sent: torch.Tensor | None = None  # this replica's part as the others decode it (error feedback)
    moment: torch.Tensor | None = None  # the group's mean first moment (diloco.first_moment; None: none)


def plan_groups(run_id: str, key: RoundKey, peers: Iterable[str], max_group: int,
                cannot_lead: Iterable[str] = ()) -> list[list[str]]:
    """The round's groups, leader first; the same on every replica that knows the same peers.

    Peers in ``cannot_lead`` (those others cannot dial: behind NAT) never lead a group; members dial
    their leader, so they still take part. With fewer possible leaders than groups, the groups grow."""
    order = round_order(run_id, key, peers)
    if not order:
        return []
    barred = set(cannot_lead)
    able = [p for p in order if p not in barred] or order  # nobody can lead: the rounds fail, as they must
    count = min(math.ceil(len(order) / max_group), len(able))
    leaders = able[:count]
    groups = [[leader] for leader in leaders]
    for i, peer in enumerate(p for p in order if p not in leaders):
        groups[i % count].append(peer)
    return groups


def round_order(run_id: str, key: RoundKey, peers: Iterable[str]) -> list[str]:
    """``peers`` in the round's order: sorted by a hash of the round key and each peer id (new every round)."""
    tag = f"{run_id}/{key.stage}/{key.fragment}/{key.round}/"
    return sorted(set(peers), key=lambda p: hashlib.sha256((tag + p).encode()).digest())


def plan_slices(group: list[str], numel: int, cannot_lead: frozenset[str] | set[str] = frozenset()) \
        -> list[tuple[int, int, str, str | None]]:
    """The round's slices for ``group`` (in the round's order): ``(offset, length, reducer, checker)``.
    Members in ``cannot_lead`` reduce and check nothing; without two able members there is no checker."""
    able = [p for p in group if p not in cannot_lead] or list(group)
    r = max(1, min(len(able), numel))
    bounds = [j * numel // r for j in range(r + 1)]
    return [(bounds[j], bounds[j + 1] - bounds[j], able[j], able[(j + 1) % r] if r > 1 else None)
            for j in range(r)]
