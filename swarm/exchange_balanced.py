"""The bandwidth-balanced fragment exchange: reduce-scatter and all-gather with a checker per slice.

The star exchange (swarm/exchange.py) sends every part to one leader, whose link carries 2(G−1)
parts a round. Here a group's fragment is cut into R contiguous slices, one per member that others
can dial (R = G without NAT), and slice j has a *reducer* (the j-th such member in the round's group
order) and a *checker* (the next one):

    member ──slice j of its part──▶ reducer j  ──mean of slice j + SliceSummary──▶ member
    member ──slice j of its part──▶ checker j  ──SliceSummary──────────────────────▶ member

Reducer and checker each average the slice's parts exactly as the star's leader does (robust mean in
FP32 over the 4-bit parts as decoded, then the mean rounded to 4 bits once), so from the same parts
they reach the same bits. Each answers with a :class:`SliceSummary`: every part it averaged (sender,
SHA-256 of the weight and values it received) and the SHA-256 of the mean. A member applies the round
only if, for every slice, the reducer's and the checker's summaries are identical, the mean it got
hashes to them, and its own part is in them as it sent it. Otherwise it skips the round, as a star
member does when its leader fails, so **no member applies a mean one reducer altered**.

Who is struck: a reducer whose mean does not hash to its own summary, by every member. When a
reducer and its checker summarise the same parts with different means, a member cannot tell which
lied; it notes the pair (:class:`Disputes`) and strikes a peer once it was in such disputes with two
different partners (a lone liar is in all of them). Every member sees the same summaries, so honest
replicas strike and ban the liar in the same round, and banned peers are left out of the round plan,
so they keep planning the same groups and commit again. (The reducer or checker of the slice knows
which of the two lied: it logs it, but strikes only by the shared rule, since a ban of its own would
split the replicas' views of the stage and stall the rounds.) A member whose own part is misreported
strikes the misreporting peer. A member that sends different values to a reducer and its checker only
makes the summaries differ: the round is skipped and nobody is struck.

Bytes per member and round, for a fragment of F values, G members, all dialable: it sends F·(G−1)/G
to the reducers and as much to the checkers and receives F·(G−1)/G of means; as a reducer and a
checker it receives 2·F·(G−1)/G of parts and sends F·(G−1)/G of means. Every member's link carries
about 3F each way whatever G; the star's leader carries (G−1)·F each way. The checker costs half
again over an unchecked reduce-scatter / all-gather (2F each way). With one dialable member there is
no checker, and it is trusted as the star's leader is.

Deadlines, strikes and bans work as in the star: reducers and checkers wait ``gather_s`` for parts,
a round is bounded by ``timeout_s``, a dead reducer skips it, malformed frames get a strike.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from typing import Any

import torch

from protocol.errors import ConnectionLost, MalformedMessage, ProtocolError, RemoteError, StreamIdle
from protocol.framing import PREFIX_BYTES, read_frame, write_frame
from protocol.messages import ErrorReply, FragmentPart, SliceSummary, decode_message, encode_message
from protocol.streams import linger
from swarm.diloco import MeanResult, quantized, robust_mean
from swarm.exchange import LINGER_S, FragmentExchange, RoundKey, RoundResult, _Gather, _Refuse, plan_groups

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


class BalancedExchange(FragmentExchange):
    """This replica's end of the balanced exchange (all methods on the event loop of ``p2p``). Same
    constructor, ``set_peers`` and ``run_round`` contract as :class:`FragmentExchange`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._disputes = Disputes(self.config.ban_s)

    async def register(self) -> None:
        await self.p2p.add_binary_stream_handler(HANDLER, self.handle_stream)

    # ----------------------------------------------------------------------------------------- a round

    async def run_round(self, key: RoundKey, part: torch.Tensor, weight: float = 1.0) -> RoundResult:
        started = time.monotonic()
        n = self.fragment_sizes[key.fragment]
        if part.dim() != 1 or part.numel() != n:
            raise ValueError(f"fragment {key.fragment} has {n} values, got a part of shape {list(part.shape)}")
        group = next(g for g in plan_groups(self.run_id, key, self._planned(), self.config.max_group,
                                            self.cannot_lead) if self.peer_id in g)
        slices = plan_slices(group, n, self.cannot_lead)
        per = self.config.max_values_per_part
        sent = torch.cat([wire_values(part[o:o + length], per, self.codec_name) for o, length, _, _ in slices])
        result = RoundResult(None, "member", slices[0][2], group=list(group), sent=sent)
        try:
            async with asyncio.timeout(self.config.timeout_s):
                answers = await asyncio.gather(*(self._slice(key, s, part, sent, weight, len(group), result)
                                                 for s in slices))
            result.mean, result.group_size, why = self._verify(slices, answers, sent, weight)
            if result.mean is None:
                result.reason, result.skip = why, why.split(":")[0]
        except TimeoutError:
            result.reason, result.skip = f"no verified mean within {self.config.timeout_s:.0f} s", "timeout"
        except Exception as exc:  # never let a round take the caller down
            logger.warning("round %s failed: %s", key, exc)
            result.reason, result.skip = f"error: {exc}", "error"
        result.role = "reducer" if any(s[2] == self.peer_id for s in slices) else "member"
        result.seconds = time.monotonic() - started
        self.stats["rounds_" + ("committed" if result.mean is not None else "skipped")] += 1
        self.stats["bytes_sent"] += result.bytes_sent
        self.stats["bytes_received"] += result.bytes_received
        return result

    async def _slice(self, key: RoundKey, spec: tuple[int, int, str, str | None], part: torch.Tensor,
                     sent: torch.Tensor, weight: float, group_size: int, result: RoundResult) -> dict[str, Any]:
        """This member's view of one slice: the mean (from the reducer or its own reduction) and the
        reducer's and checker's summaries (None where one failed; the reason under ``why``)."""
        offset, length, reducer, checker = spec
        tasks: dict[str, Any] = {}
        for role, peer in (("reduce", reducer), ("check", checker)):
            if peer is None:
                continue
            if peer == self.peer_id:
                tasks[role] = self._reduce(key, offset, length, role, sent[offset:offset + length], weight,
                                           group_size)
            else:
                tasks[role] = self._send(key, offset, length, role, peer, part[offset:offset + length], weight,
                                         result)
        done = dict(zip(tasks, await asyncio.gather(*tasks.values(), return_exceptions=True), strict=True))
        out: dict[str, Any] = {"mean": None, "reduce": None, "check": None, "why": ""}
        for role, value in done.items():
            if isinstance(value, BaseException):
                out["why"] = out["why"] or f"{'reducer' if role == 'reduce' else 'checker'}: {value}"
                continue
            mean, summary = value
            out[role] = summary
            if role == "reduce":
                out["mean"] = mean
        self._judge(out, reducer, checker)
        return out

    def _judge(self, view: dict[str, Any], reducer: str, checker: str | None) -> None:
        """When this node reduced or checked the slice itself and the other's summary covers the same parts
        with a different mean, it knows the other lied: said in the log and counted. It strikes only by the
        rule every member applies (:class:`Disputes`), so honest replicas ban the liar in the same round
        and keep planning the same groups (a ban of its own would split their views of the stage)."""
        a, b = view["reduce"], view["check"]
        if a is None or b is None or self.peer_id not in (reducer, checker):
            return
        if (a.peers, a.part_sha256) == (b.peers, b.part_sha256) and a.mean_sha256 != b.mean_sha256:
            self.stats["slices_disputed"] += 1
            logger.warning("exchange: %s sent a mean of the same parts that differs from ours",
                           checker if self.peer_id == reducer else reducer)

    def _verify(self, slices: list, answers: list[dict[str, Any]], sent: torch.Tensor,
                weight: float) -> tuple[torch.Tensor | None, int, str]:
        """The round's mean if every slice verifies, else (None, 0, why)."""
        out = torch.empty(sent.numel(), dtype=torch.float32)
        sizes = []
        for (offset, length, reducer, checker), view in zip(slices, answers, strict=True):
            a, b, mean = view["reduce"], view["check"], view["mean"]
            if a is None or mean is None or (checker is not None and b is None):
                return None, 0, f"slice_missing: slice at {offset}: {view['why'] or 'no answer'}"
            if mean_digest(mean) != a.mean_sha256:
                self._offence(reducer, "a mean that does not match its own summary")
                return None, 0, f"slice_mismatch: reducer {reducer} sent a mean that differs from its summary"
            if b is not None and (a.peers, a.part_sha256, a.mean_sha256) != (b.peers, b.part_sha256, b.mean_sha256):
                self.stats["slices_disagreed"] += 1
                if (a.peers, a.part_sha256) == (b.peers, b.part_sha256):
                    self._disputes.add(reducer, checker, self)
                return None, 0, f"slice_mismatch: reducer {reducer} and checker {checker} disagree on slice at {offset}"
            if self.peer_id not in a.peers:
                return None, 0, f"part_dropped: our part is not in the mean of slice at {offset}"
            own = part_digest(weight, sent[offset:offset + length])
            if a.part_sha256[a.peers.index(self.peer_id)] != own:
                self._offence(reducer, "misreported our part")
                return None, 0, f"slice_mismatch: reducer {reducer} misreports our part"
            out[offset:offset + length] = mean
            sizes.append(len(a.peers))
        return out, min(sizes), ""

    # ----------------------------------------------------------------------------------------- roles

    async def _reduce(self, key: RoundKey, offset: int, length: int, role: str, mine: torch.Tensor,
                      weight: float, group_size: int) -> tuple[torch.Tensor | None, SliceSummary]:
        """Reduce (or check) one slice here: gather the group's parts, average, settle the result."""
        gather = self._slice_gather((key, offset, role), length, expected=group_size, own=True)
        gather.expected = group_size
        gather.parts[self.peer_id], gather.weights[self.peer_id] = mine, weight
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.gather_s
        while len(gather.parts) < gather.expected and (left := deadline - loop.time()) > 0:
            gather.arrived.clear()
            try:
                await asyncio.wait_for(gather.arrived.wait(), left)
            except TimeoutError:
                break
        gather.closed = True
        self._gathers.pop((key, offset, role), None)
        self._closed[(key, offset, role)] = None
        while len(self._closed) > 8 * self.config.max_early_rounds:
            self._closed.popitem(last=False)
        peers = sorted(gather.parts)
        outcome = self._average(role, [gather.parts[p] for p in peers], [gather.weights[p] for p in peers])
        for i, why in outcome.rejected.items():
            if peers[i] != self.peer_id:
                self._offence(peers[i], f"part dropped from the average: {why}")
        if outcome.mean is None:
            gather.result.set_result(None)
            raise RuntimeError("no usable parts")
        mean = wire_values(outcome.mean, self.config.max_values_per_part, self.codec_name)
        kept = [peers[i] for i in outcome.kept]
        summary = SliceSummary(run_id=self.run_id, stage=key.stage, round_id=key.round, fragment_id=key.fragment,
                               offset=offset, length=length, peers=kept,
                               part_sha256=[part_digest(gather.weights[p], gather.parts[p]) for p in kept],
                               mean_sha256=mean_digest(mean))
        # Served: the unrounded mean (each part is rounded as it is encoded, to exactly ``mean``'s bits).
        gather.result.set_result((outcome.mean if role == "reduce" else None, summary))
        return (mean if role == "reduce" else None), summary

    def _average(self, role: str, parts: list[torch.Tensor], weights: list[float]) -> MeanResult:
        """The slice's robust FP32 mean of the parts (sorted by sender), as the star's leader computes it."""
        return robust_mean(parts, self.config.max_norm_ratio, weights, self.config.max_weight_ratio)

    async def _send(self, key: RoundKey, offset: int, length: int, role: str, peer: str, mine: torch.Tensor,
                    weight: float, result: RoundResult) -> tuple[torch.Tensor | None, SliceSummary]:
        """Send our slice to its reducer (or checker) and read its answer: the mean (reducer) and the summary."""
        from hivemind.p2p import PeerID

        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer), HANDLER)
        try:
            for body in self._encode_slice(key, offset, mine, weight):
                await write_frame(writer, body, timeout=self.config.timeout_s)
                result.bytes_sent += len(body) + PREFIX_BYTES
            mean = None
            if role == "reduce":
                mean, received, _, _, _ = await read_slice(self, reader, peer, key, offset, length)
                result.bytes_received += received
            raw = await read_frame(reader, self.limits, timeout=self.config.timeout_s)
            if raw is None:
                raise RemoteError("closed before its summary", remote_code="closed")
            result.bytes_received += len(raw) + PREFIX_BYTES
            summary = decode_message(raw, self.limits)
            if isinstance(summary, ErrorReply):
                raise RemoteError(f"[{summary.code}] {summary.message}", remote_code=summary.code)
            if not isinstance(summary, SliceSummary) or (summary.run_id, summary.stage, summary.round_id,
                                                         summary.fragment_id, summary.offset, summary.length) \
                    != (self.run_id, key.stage, key.round, key.fragment, offset, length):
                raise MalformedMessage("expected the SliceSummary of this slice")
            return mean, summary
        finally:
            writer.close()

    # ----------------------------------------------------------------------------------------- wire

    def _encode_slice(self, key: RoundKey, offset: int, values: torch.Tensor, weight: float) -> list[bytes]:
        """A slice as FragmentParts: offsets within the fragment, ``part`` / ``num_parts`` counting the
        slice's chunks. Reducer and checker copies look the same: the receiver knows its own role."""
        per = self.config.max_values_per_part
        pieces = [(o, values[o:o + per]) for o in range(0, values.numel(), per)]
        return [encode_message(FragmentPart(
            run_id=self.run_id, stage=key.stage, round_id=key.round, fragment_id=key.fragment, part=i,
            num_parts=len(pieces), offset=offset + o, total_values=self.fragment_sizes[key.fragment],
            values=piece.contiguous(), codec=self.codec_name, weight=weight), self.limits)
            for i, (o, piece) in enumerate(pieces)]

    def _slice_length(self, key: RoundKey, offset: int, peer: str) -> int:
        if not 0 <= key.fragment < len(self.fragment_sizes):
            raise MalformedMessage(f"fragment {key.fragment} does not exist here")
        for spec in self._my_slices(key, peer):
            if spec[0] == offset:
                return spec[1]
        raise _NotMine(f"no slice at {offset} of fragment {key.fragment} is ours to reduce or check for you")

    def _planned(self) -> set[str]:
        """The replicas rounds are planned over: the stage's ONLINE ones less those this node banned (a
        reducer that lies would otherwise keep every round it serves skipped for as long as it is listed)."""
        return {p for p in self.peers if p == self.peer_id or self.strikes.banned_for(p) <= 0}

    def _my_slices(self, key: RoundKey, peer: str) -> list[tuple[int, int, str, str | None]]:
        group = next((g for g in plan_groups(self.run_id, key, self._planned(), self.config.max_group,
                                             self.cannot_lead) if peer in g and self.peer_id in g), None)
        if group is None:
            return []
        return [s for s in plan_slices(group, self.fragment_sizes[key.fragment], self.cannot_lead)
                if self.peer_id in (s[2], s[3])]

    def _slice_gather(self, gkey: tuple, length: int, expected: int, own: bool = False) -> _Gather:
        """The collection of parts for one (round, slice, role): as the star's, keyed by the slice too."""
        now = asyncio.get_running_loop().time()
        for old in [k for k, g in self._gathers.items() if now - g.created > self.config.timeout_s]:
            stale = self._gathers.pop(old)
            if not stale.result.done():
                stale.result.set_result(None)
        gather = self._gathers.get(gkey)
        if gather is None:
            if gkey in self._closed:
                raise _Refuse("late", f"round {gkey[0].round}'s slice at {gkey[1]} is already averaged")
            if not own and len(self._gathers) >= 2 * self.config.max_early_rounds:
                raise _Refuse("busy", f"holding {len(self._gathers)} slices already")
            gather = self._gathers[gkey] = _Gather(length, expected, now)
        return gather

    # ----------------------------------------------------------------------------------------- serving

    async def handle_stream(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(info.peer_id)
        try:
            for body in await self._serve(peer, reader):
                await write_frame(writer, body, timeout=self.config.timeout_s)
                self.stats["bytes_sent"] += len(body) + PREFIX_BYTES
            await linger(reader, LINGER_S)
        except Exception as exc:  # a broken member stream must never reach the event loop
            logger.debug("exchange stream from %s ended: %s", peer, exc)
        finally:
            writer.close()

    async def _serve(self, peer: str, reader: asyncio.StreamReader) -> list[bytes]:
        if self.strikes.banned_for(peer) > 0:
            return [self._error("banned", "too many malformed parts; try later")]
        if peer not in self.peers:
            return [self._error("not_member", "not an ONLINE replica of this stage as far as this node knows")]
        try:
            values, received, key, offset, weight = await read_slice(self, reader, peer, None, None, None,
                                                                            timeout=self.config.timeout_s)
        except _NotMine as exc:
            return [self._error("not_leader", str(exc))]
        except (RemoteError, ConnectionLost, StreamIdle):
            return []
        except ProtocolError as exc:
            self._strike(peer, exc)
            return [self._error(exc.code, str(exc))]
        self.stats["bytes_received"] += received
        roles = [("reduce" if s[2] == self.peer_id else "check") for s in self._my_slices(key, peer) if s[0] == offset]
        # The same node may both reduce and check a slice only in a group of one dialable member: never here.
        role = roles[0]
        try:
            gather = self._slice_gather((key, offset, role), len(values), expected=self.config.max_group)
        except _Refuse as exc:
            return [self._error(exc.code, str(exc))]
        if gather.closed:
            return [self._error("late", f"slice at {offset} of round {key.round} is already averaged")]
        if peer in gather.parts or len(gather.parts) >= self.config.max_group:
            return [self._error("rejected", "duplicate part or full group")]
        gather.parts[peer], gather.weights[peer] = values, weight
        gather.arrived.set()
        try:
            outcome = await asyncio.wait_for(asyncio.shield(gather.result), self.config.timeout_s)
        except TimeoutError:
            return [self._error("timeout", "the round did not finish in time")]
        if outcome is None:
            return [self._error("skipped", "no usable parts in this slice")]
        mean, summary = outcome
        reply = self._encode_slice(key, offset, mean, float(len(summary.peers))) if mean is not None else []
        return [*reply, encode_message(summary, self.limits)]


class Disputes:
    """Reducer/checker pairs that averaged the same parts to different means (one of them lied). A peer in
    such disputes with two different partners within ``window_s`` gets a strike (module docstring); at
    most ``max_peers`` peers are remembered."""

    def __init__(self, window_s: float, max_peers: int = 4096) -> None:
        self.window_s, self.max_peers = window_s, max_peers
        self.seen: dict[str, dict[str, float]] = {}  # peer -> {dispute partner: when}

    def add(self, a: str, b: str, ex: BalancedExchange) -> None:
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


async def read_slice(ex: BalancedExchange, reader: asyncio.StreamReader, peer: str, key: RoundKey | None,
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


class _NotMine(Exception):
    """A slice this node neither reduces nor checks for that sender (views of the stage differ)."""
