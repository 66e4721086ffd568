"""What a balanced-exchange member checks before it applies a round (``verify``), what a reducer or
checker concludes from the other's summary (``judge``), and the dispute rule that strikes a liar that
members cannot single out by themselves (:class:`Disputes`). swarm/exchange/balanced.py says why."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from swarm.exchange.transport import mean_digest, part_digest

logger = logging.getLogger(__name__)


class Disputes:
    """Reducer/checker pairs that averaged the same parts to different means (one of them lied). A peer in
    such disputes with two different partners within ``window_s`` gets a strike (module docstring); at
    most ``max_peers`` peers are remembered."""

    def __init__(self, window_s: float, max_peers: int = 4096) -> None:
        self.window_s, self.max_peers = window_s, max_peers
        self.seen: dict[str, dict[str, float]] = {}  # peer -> {dispute partner: when}

    def add(self, a: str, b: str, ex: Any) -> None:
        now = time.monotonic()
        for peer, partner in ((a, b), (b, a)):
            if peer == ex.peer_id:
                continue
            seen = self.seen.setdefault(peer, {})
            seen[partner] = now
            for other in [o for o, t in seen.items() if now - t > self.window_s]:
                del seen[other]
            if len(seen) >= 2:
                self.seen.pop(peer, None)
                ex._offence(peer, "disputed reduced slices with several partners")
        while len(self.seen) > self.max_peers:  # forget the longest-known suspect first
            self.seen.pop(next(iter(self.seen)))


def judge(ex: Any, view: dict[str, Any], reducer: str, checker: str | None) -> None:
    """When ``ex``'s node reduced or checked the slice itself and the other's summary covers the same parts
    with a different mean, it knows the other lied: said in the log and counted. It strikes only by the
    rule every member applies (:class:`Disputes`), so honest replicas ban the liar in the same round
    and keep planning the same groups (a ban of its own would split their views of the stage)."""
    a, b = view["reduce"], view["check"]
    if a is None or b is None or ex.peer_id not in (reducer, checker):
        return
    if (a.peers, a.part_sha256) == (b.peers, b.part_sha256) and a.mean_sha256 != b.mean_sha256:
        ex.stats["slices_disputed"] += 1
        logger.warning("exchange: %s sent a mean of the same parts that differs from ours",
                       checker if ex.peer_id == reducer else reducer)


def verify(ex: Any, slices: list, answers: list[dict[str, Any]], sent: torch.Tensor,
            weight: float) -> tuple[torch.Tensor | None, int, str]:
    """The round's mean if every slice verifies, else (None, 0, why)."""
    out = torch.empty(sent.numel(), dtype=torch.float32)
    sizes = []
    for (offset, length, reducer, checker), view in zip(slices, answers, strict=True):
        a, b, mean, source = view["reduce"], view["check"], view["mean"], view["source"]
        if a is None or mean is None:
            return None, 0, f"slice_missing: slice at {offset}: {view['why'] or 'no answer'}"
        if mean_digest(mean) != a.mean_sha256:
            ex._offence(source, "a mean that does not match its own summary")
            return None, 0, f"slice_mismatch: {source} sent a mean that differs from its summary"
        if checker is not None and (b is None or source == checker):
            ex.stats["slices_unchecked"] += 1  # one of the pair failed: trusted alone, as a star leader
        if b is not None and (a.peers, a.part_sha256, a.mean_sha256) != (b.peers, b.part_sha256, b.mean_sha256):
            ex.stats["slices_disagreed"] += 1
            if (a.peers, a.part_sha256) == (b.peers, b.part_sha256):
                ex._disputes.add(reducer, checker, ex)
            return None, 0, f"slice_mismatch: reducer {reducer} and checker {checker} disagree on slice at {offset}"
        if ex.peer_id not in a.peers:
            return None, 0, f"part_dropped: our part is not in the mean of slice at {offset}"
        own = part_digest(weight, sent[offset:offset + length])
        if a.part_sha256[a.peers.index(ex.peer_id)] != own:
            ex._offence(reducer, "misreported our part")
            return None, 0, f"slice_mismatch: reducer {reducer} misreports our part"
        out[offset:offset + length] = mean
        sizes.append(len(a.peers))
    return out, min(sizes), ""
