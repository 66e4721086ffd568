"""The bandwidth-balanced fragment exchange: reduce-scatter and all-gather with a checker per slice.

The star exchange (swarm/exchange/star.py) sends every part to one leader, whose link carries 2(G−1)
parts a round. Here the group is first agreed (swarm/exchange/roster.py: the group's leader answers
every member that joins with one roster, a few hundred bytes), then the fragment is cut into R
contiguous slices, one per roster member that others can dial (R = G without NAT), and slice j has a
*reducer* (the j-th such member in the round's order) and a *checker* (the next one):

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
a round is bounded by ``timeout_s``, malformed frames get a strike. A slice whose reducer or checker
failed (dead, unreachable, refused) is taken from the other alone, unchecked, as a star member trusts
its leader: the member asks the checker for the mean on the stream its summary came by
(FragmentRequest). Only a slice that lost both fails the round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from protocol.errors import ConnectionLost, MalformedMessage, ProtocolError, RemoteError, StreamIdle
from protocol.framing import PREFIX_BYTES, read_frame, write_frame
from protocol.messages import (
    ErrorReply,
    FragmentPart,
    FragmentRequest,
    SliceSummary,
    decode_message,
    encode_message,
)
from protocol.streams import linger
from swarm.diloco import MeanResult, robust_mean
from swarm.exchange.checks import Disputes, judge, verify
from swarm.exchange.groups import RoundKey, RoundResult, plan_groups, plan_slices
from swarm.exchange.roster import HANDLER, RosterAgreement, Rosters, Skip
from swarm.exchange.star import LINGER_S, FragmentExchange, _Refuse
from swarm.exchange.transport import _NotMine, mean_digest, part_digest, read_slice, wire_values

logger = logging.getLogger(__name__)

class BalancedExchange(RosterAgreement, FragmentExchange):
    """This replica's end of the balanced exchange (all methods on the event loop of ``p2p``). Same
    constructor, ``set_peers`` and ``run_round`` contract as :class:`FragmentExchange`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._disputes = Disputes(self.config.ban_s)
        self.rosters = Rosters(8 * self.config.max_early_rounds)

    async def register(self) -> None:
        await self.p2p.add_binary_stream_handler(HANDLER, self.handle_stream)

    # ----------------------------------------------------------------------------------------- a round

    async def run_round(self, key: RoundKey, part: torch.Tensor, weight: float = 1.0) -> RoundResult:
        started = time.monotonic()
        n = self.fragment_sizes[key.fragment]
        if part.dim() != 1 or part.numel() != n:
            raise ValueError(f"fragment {key.fragment} has {n} values, got a part of shape {list(part.shape)}")
        group = next(g for g in self._groups(key) if self.peer_id in g)
        result = RoundResult(None, "member", group[0], group=list(group))
        slices: list = []
        try:
            async with asyncio.timeout(self.config.timeout_s):
                roster, unable = await self._agree(key, group, result)  # swarm/exchange/roster.py
                slices = plan_slices(roster, n, unable)
                per = self.config.max_values_per_part
                result.sent = sent = torch.cat([wire_values(part[o:o + length], per, self.codec_name)
                                                for o, length, _, _ in slices])
                result.leader, result.group = slices[0][2], list(roster)
                answers = await asyncio.gather(*(self._slice(key, s, part, sent, weight, len(roster), result)
                                                 for s in slices))
            result.mean, result.group_size, why = verify(self, slices, answers, sent, weight)
            if result.mean is None:
                result.reason, result.skip = why, why.split(":")[0]
        except Skip as exc:
            result.reason, result.skip = str(exc), exc.code
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
        frames: list[bytes] | None = None  # encoded once, sent to the reducer and the checker alike
        for role, peer in (("reduce", reducer), ("check", checker)):
            if peer is None:
                continue
            if peer == self.peer_id:
                tasks[role] = self._reduce(key, offset, length, role, sent[offset:offset + length], weight,
                                           group_size)
            else:
                frames = frames or self._encode_slice(key, offset, part[offset:offset + length], weight)
                tasks[role] = self._send(key, offset, length, role, peer, frames, result)
        done = dict(zip(tasks, await asyncio.gather(*tasks.values(), return_exceptions=True), strict=True))
        out: dict[str, Any] = {"mean": None, "reduce": None, "check": None, "why": "", "source": reducer}
        means, stream = {}, None
        for role, value in done.items():
            if isinstance(value, BaseException):
                out["why"] = out["why"] or f"{'reducer' if role == 'reduce' else 'checker'}: {value}"
                continue
            means[role], out[role], *rest = value
            stream = rest[0] if rest else stream
        try:
            if out["reduce"] is not None:
                out["mean"] = means["reduce"]
            elif out["check"] is not None:  # the reducer failed: the checker's mean keeps the slice
                out["mean"] = means["check"] if stream is None else \
                    await self._ask_checker(key, offset, length, checker, stream, result)
                out["reduce"], out["why"], out["source"] = out["check"], "", checker
                self.stats["slices_from_checker"] += 1
        except Exception as exc:
            out["why"] = f"checker: {exc}"
        finally:
            if stream is not None:
                stream[1].close()
        judge(self, out, reducer, checker)
        return out

    async def _ask_checker(self, key: RoundKey, offset: int, length: int, checker: str, stream: tuple,
                           result: RoundResult) -> torch.Tensor:
        """The slice's mean from its checker (on the stream its summary came by), for a failed reducer."""
        reader, writer = stream
        ask = encode_message(FragmentRequest(run_id=self.run_id, stage=key.stage, round_id=key.round,
                                             fragment_id=key.fragment), self.limits)
        await write_frame(writer, ask, timeout=self.config.timeout_s)
        result.bytes_sent += len(ask) + PREFIX_BYTES
        mean, received, _, _, _ = await read_slice(self, reader, checker, key, offset, length, self.config.timeout_s)
        result.bytes_received += received
        return mean

    # ----------------------------------------------------------------------------------------- roles

    async def _reduce(self, key: RoundKey, offset: int, length: int, role: str, mine: torch.Tensor,
                      weight: float, group_size: int) -> tuple[torch.Tensor | None, SliceSummary]:
        """Reduce (or check) one slice here: gather the group's parts, average, settle the result."""
        gather = self._open_gather((key, offset, role), length, group_size, own=True, limit=2 * self.config.max_early_rounds,
                                   what=f"round {key.round}'s slice at {offset}")
        gather.expected = group_size
        gather.parts[self.peer_id], gather.weights[self.peer_id] = mine, weight
        await self._collect((key, offset, role), gather, 8 * self.config.max_early_rounds)
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
        gather.result.set_result((outcome.mean, summary))
        return mean, summary

    def _average(self, role: str, parts: list[torch.Tensor], weights: list[float]) -> MeanResult:
        """The slice's robust FP32 mean of the parts (sorted by sender), as the star's leader computes it."""
        return robust_mean(parts, self.config.max_norm_ratio, weights, self.config.max_weight_ratio)

    async def _send(self, key: RoundKey, offset: int, length: int, role: str, peer: str, frames: list[bytes],
                    result: RoundResult) -> tuple:
        """Send our slice (its encoded ``frames``) to its reducer (or checker) and read its answer: ``(mean, summary)`` from a reducer,
        ``(None, summary, (reader, writer))`` from a checker, whose stream stays open (the caller closes it)
        in case the reducer fails and its mean is asked for."""
        from hivemind.p2p import PeerID

        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer), HANDLER)
        keep = False
        try:
            for body in frames:
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
            keep = role == "check"
            return (mean, summary, (reader, writer)) if keep else (mean, summary)
        finally:
            if not keep:
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

    def _groups(self, key: RoundKey) -> list[list[str]]:
        return plan_groups(self.run_id, key, self._planned(), self.config.max_group, self.cannot_lead)

    def _my_slices(self, key: RoundKey, peer: str) -> list[tuple[int, int, str, str | None]]:
        """The slices this node reduces or checks in the round, by its agreed roster ([] without one)."""
        roster = self.rosters.known(key)
        if roster is None or peer not in roster[0]:
            return []
        return [s for s in plan_slices(roster[0], self.fragment_sizes[key.fragment], roster[1])
                if self.peer_id in (s[2], s[3])]

    # ----------------------------------------------------------------------------------------- serving

    async def handle_stream(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(info.peer_id)
        try:
            frames, on_request = await self._serve(peer, reader)
            await self._write_all(writer, frames)
            if on_request:  # a checker: the member may ask for the mean (its reducer failed)
                raw = await read_frame(reader, self.limits, timeout=self.config.timeout_s)
                if raw is not None and isinstance(decode_message(raw, self.limits), FragmentRequest):
                    await self._write_all(writer, on_request())
            await linger(reader, LINGER_S)
        except Exception as exc:  # a broken member stream must never reach the event loop
            logger.debug("exchange stream from %s ended: %s", peer, exc)
        finally:
            writer.close()

    async def _serve(self, peer: str, reader: asyncio.StreamReader) -> tuple[list[bytes], Callable[[], list[bytes]] | None]:
        """The frames to answer with, and (a checker's) the mean's frames if the member asks for them."""
        if self.strikes.banned_for(peer) > 0:
            return [self._error("banned", "too many malformed parts; try later")], None
        if peer not in self.peers:
            return [self._error("not_member", "not an ONLINE replica of this stage as far as this node knows")], None
        try:
            raw = await read_frame(reader, self.limits, timeout=self.config.timeout_s, idle_timeout=self.config.timeout_s)
            if raw is None:
                return [], None
            first = decode_message(raw, self.limits)
            if isinstance(first, FragmentRequest):  # a member joins the round's group (this node leads it)
                return [await self._serve_join(peer, first)], None
            if not isinstance(first, FragmentPart):
                raise MalformedMessage(f"expected a FragmentPart or a join, got {type(first).__name__}")
            if first.run_id != self.run_id or first.stage != self.stage or \
                    not 0 <= first.fragment_id < len(self.fragment_sizes):
                raise MalformedMessage("a part for another run, stage or fragment")
            if first.codec != self.codec_name or first.total_values != self.fragment_sizes[first.fragment_id]:
                raise MalformedMessage(f"parts travel as {self.codec_name} of the whole fragment's size")
            await self._roster_for(RoundKey(first.stage, first.fragment_id, first.round_id), peer)
            values, received, key, offset, weight = await read_slice(
                self, reader, peer, None, None, None, timeout=self.config.timeout_s, first=(first, len(raw) + PREFIX_BYTES))
        except (_NotMine, Skip, _Refuse) as exc:
            return [self._error(getattr(exc, "code", "not_leader"), str(exc))], None
        except (RemoteError, ConnectionLost, StreamIdle):
            return [], None
        except ProtocolError as exc:
            self._strike(peer, exc)
            return [self._error(exc.code, str(exc))], None
        self.stats["bytes_received"] += received
        roles = [("reduce" if s[2] == self.peer_id else "check") for s in self._my_slices(key, peer) if s[0] == offset]
        # The same node may both reduce and check a slice only in a group of one dialable member: never here.
        role = roles[0]
        try:
            gather = self._open_gather((key, offset, role), len(values), self.config.max_group,
                                       limit=2 * self.config.max_early_rounds, what=f"round {key.round}'s slice at {offset}")
        except _Refuse as exc:
            return [self._error(exc.code, str(exc))], None
        if gather.closed:
            return [self._error("late", f"slice at {offset} of round {key.round} is already averaged")], None
        if peer in gather.parts or len(gather.parts) >= self.config.max_group:
            return [self._error("rejected", "duplicate part or full group")], None
        gather.parts[peer], gather.weights[peer] = values, weight
        gather.arrived.set()
        try:
            outcome = await asyncio.wait_for(asyncio.shield(gather.result), self.config.timeout_s)
        except TimeoutError:
            return [self._error("timeout", "the round did not finish in time")], None
        if outcome is None:
            return [self._error("skipped", "no usable parts in this slice")], None
        mean, summary = outcome
        serve = lambda: self._encode_slice(key, offset, mean, float(len(summary.peers)))  # noqa: E731
        if role == "check":  # the mean is encoded only if a member asks for it
            return [encode_message(summary, self.limits)], serve
        return [*serve(), encode_message(summary, self.limits)], None
