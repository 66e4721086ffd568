"""The balanced exchange's slices: how a group's fragment is cut and who reduces and checks each piece,
how a slice travels (FragmentParts rounded part by part, so a sender knows the bits its receiver
decodes), the digests reducers and checkers summarise with, and the dispute rule that strikes a liar
(swarm/exchange_balanced.py has the exchange and the protocol)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from typing import Any

import torch

from protocol.errors import MalformedMessage, RemoteError
from protocol.framing import PREFIX_BYTES, read_frame
from protocol.messages import ErrorReply, FragmentPart, decode_message
from swarm.diloco import quantized
from swarm.exchange import RoundKey

logger = logging.getLogger(__name__)

HANDLER = "protoswarm.diloco.balanced.v1"


def plan_slices(group: list[str], numel: int, cannot_lead: frozenset[str] | set[str] = frozenset()) \
        -> list[tuple[int, int, str, str | None]]:
    """The round's slices for ``group`` (in the round's order): ``(offset, length, reducer, checker)``.
    Members in ``cannot_lead`` reduce and check nothing; without two able members there is no checker."""
    able = [p for p in group if p not in cannot_lead] or list(group)
    r = max(1, min(len(able), numel))
    bounds = [j * numel // r for j in range(r + 1)]
    return [(bounds[j], bounds[j + 1] - bounds[j], able[j], able[(j + 1) % r] if r > 1 else None)
            for j in range(r)]


def wire_values(values: torch.Tensor, per: int, codec: str) -> torch.Tensor:
    """What a receiver decodes of ``values`` (a slice of a fragment) sent in
    FragmentParts of at most ``per`` values: each part is quantized alone (blockwise codecs' blocks
    start at each part), so the sender knows the exact bits without a round trip."""
    out = torch.empty(values.numel(), dtype=torch.float32)
    for o in range(0, values.numel(), per):
        out[o:o + per] = quantized(values[o:o + per], codec)[1]
    return out


def part_digest(weight: float, values: torch.Tensor) -> str:
    """SHA-256 of a part as a reducer received it (its weight and its decoded fp32 values)."""
    h = hashlib.sha256(repr(float(weight)).encode())
    h.update(values.to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def mean_digest(values: torch.Tensor) -> str:
    return hashlib.sha256(values.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


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


async def read_slice(ex: Any, reader: asyncio.StreamReader, peer: str, key: RoundKey | None,
                     offset: int | None, length: int | None,
                     timeout: float | None = None) -> tuple[torch.Tensor, int, RoundKey, int, float]:
    """A slice sent to ``ex`` as FragmentParts (key and slice from the first part when None). Returns
    the values, the bytes read, the key, the slice's offset and the first part's weight."""
    received, out, got, weight, num_parts = 0, None, 0, 1.0, None
    per = ex.config.max_values_per_part
    while num_parts is None or got < num_parts:
        raw = await read_frame(reader, ex.limits, timeout=timeout, idle_timeout=timeout)
        if raw is None:
            raise RemoteError("peer closed the stream mid-slice", remote_code="closed")
        received += len(raw) + PREFIX_BYTES
        msg = decode_message(raw, ex.limits)
        if isinstance(msg, ErrorReply):
            raise RemoteError(f"[{msg.code}] {msg.message}", remote_code=msg.code)
        if not isinstance(msg, FragmentPart):
            raise MalformedMessage(f"expected a FragmentPart, got {type(msg).__name__}")
        if key is None:
            key, offset = RoundKey(msg.stage, msg.fragment_id, msg.round_id), msg.offset
            length = ex._slice_length(key, offset, peer)
            if msg.num_parts != max(1, math.ceil(length / per)):  # the sender planned other slices
                raise _NotMine(f"our slice at {offset} has {length} values; the sender's has other bounds "
                               "(views of the stage differ)")
        if msg.run_id != ex.run_id or (msg.stage, msg.fragment_id, msg.round_id) != (key.stage, key.fragment,
                                                                                     key.round):
            raise MalformedMessage("a part of another run, stage, fragment or round inside a slice")
        if msg.codec != ex.codec_name or msg.total_values != ex.fragment_sizes[key.fragment]:
            raise MalformedMessage(f"parts travel as {ex.codec_name} of the whole fragment's size")
        want = max(1, math.ceil(length / per))
        at = offset + got * per
        if msg.num_parts != want or msg.part != got or msg.offset != at or \
                msg.values.numel() != min(per, offset + length - at):
            raise MalformedMessage(f"part {msg.part} at {msg.offset} ({msg.values.numel()} values) is not part "
                                   f"{got} of the {length}-value slice at {offset}")
        if out is None:
            out, num_parts, weight = torch.empty(length, dtype=torch.float32), msg.num_parts, msg.weight
        out[at - offset:at - offset + msg.values.numel()] = msg.values
        got += 1
    return out, received, key, offset, weight


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



class _NotMine(Exception):
    """A slice this node neither reduces nor checks for that sender (views of the stage differ)."""
