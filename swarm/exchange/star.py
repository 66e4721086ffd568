"""The fragment exchange: replicas of a stage average one fragment's outer gradients over hivemind P2P.

One round is identified by ``(run, stage, fragment, round)``, a pure function of the shared progress
counter (swarm/diloco.py), so every replica knows which round it is in without talking. The replicas
it knows to be ONLINE on its stage (from the DHT records) are split into groups of at most
``max_group``: sorted by a hash of the round key and each peer id, dealt round-robin. The order is new
every round, so large stages mix gossip-style across rounds; the first peer of a group is its
*leader*. Every replica computes the same plan from the same peer list.

    member ──FragmentPart×n──▶ leader        (its part, 4-bit, in chunks; handler protoswarm.diloco.v1)
    member ◀──FragmentPart×n── leader        (the group's mean, 4-bit: the same values for everyone)

The leader takes its group's parts until all have arrived or ``gather_s`` after it reached the round
itself, drops parts that are non-finite, mis-sized or far larger than the group's (``robust_mean``),
averages the rest in FP32, quantizes the mean once and sends that same mean to every member whose
part it used. It uses the dequantized mean itself too, so all members apply identical values.

Faults end a round, never hang it:
- A member that dies or is late is left out; the others finish without it.
- A leader that dies, or answers with an error, makes its members skip the round. A skipped round
  changes nothing (``OuterLoop.apply(p, None)``), and the next round's outer gradient covers both.
- A member's whole wait is bounded by ``timeout_s``. A leader holds parts that arrive before it
  reached the round (it may be a little behind) for at most ``timeout_s``, and for at most
  ``max_early_rounds`` rounds.
- Malformed parts (undecodable frames, wrong run, stage, fragment size, codec, chunking) get an
  ErrorReply and a strike, and are passed to ``on_error`` (the node counts them). A peer with
  ``peer_strikes`` strikes within ``ban_s`` is refused for ``ban_s``. A stream that ends or stays
  silent for ``timeout_s`` before a whole fragment arrived is closed without a strike.

``max_group``, ``gather_s`` and the other limits named above are fields of the ``[exchange]`` config
section, :class:`ExchangeConfig`, which :class:`FragmentExchange` takes as it is; parts travel in the
codec ``wire.fragment_codec``.

The exchange is torch-free apart from the tensors it carries. The outer step itself stays with the
caller (``OuterLoop.begin`` / ``apply`` where the inner optimizer runs).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from protocol.codecs import get_codec
from protocol.errors import ConnectionLost, MalformedMessage, ProtocolError, RemoteError, StreamIdle
from protocol.framing import PREFIX_BYTES, write_frame
from protocol.messages import ErrorReply, FragmentPart, encode_message
from protocol.streams import LogLimiter, PeerStrikes, linger
from protocol.tensors import DEFAULT_LIMITS, WireLimits
from swarm.diloco import quantized, robust_mean
from swarm.exchange.config import ExchangeConfig
from swarm.exchange.groups import RoundKey, RoundResult, plan_groups
from swarm.exchange.transport import chunk, next_part

logger = logging.getLogger(__name__)
_refusal_log = LogLimiter(logger)  # a line per refusal code every 10 s at most (the counts are metrics)

HANDLER = "protoswarm.diloco.v1"
LINGER_S = 5.0  # how long a served stream waits for the member to close after the reply


class _Gather:
    """A leader's collection of parts for one round."""

    def __init__(self, numel: int, expected: int, created: float) -> None:
        self.numel, self.expected, self.created = numel, expected, created
        self.parts: dict[str, torch.Tensor] = {}
        self.weights: dict[str, float] = {}  # each part's weight as its sender gave it
        self.arrived = asyncio.Event()  # set whenever a part arrives
        self.result: asyncio.Future = asyncio.get_running_loop().create_future()
        self.closed = False  # True once the leader averaged: late parts are refused


class FragmentExchange:
    """This replica's end of the exchange (all methods on the event loop of ``p2p``)."""

    def __init__(self, p2p: Any, peer_id: str, run_id: str, stage: int, fragment_sizes: Sequence[int],
                 config: ExchangeConfig, codec: str, limits: WireLimits = DEFAULT_LIMITS,
                 on_error: Callable[[ProtocolError], None] | None = None) -> None:
        """``codec``: what parts travel as (``wire.fragment_codec``). ``on_error(exc)`` sees every
        malformed input a member sends (metrics)."""
        self.p2p, self.peer_id, self.run_id, self.stage = p2p, peer_id, run_id, stage
        self.fragment_sizes = [int(n) for n in fragment_sizes]
        self.config, self.limits = config, limits
        self.codec_name, self.codec = codec, get_codec(codec)
        if codec not in limits.codecs:
            raise ValueError(f"codec {codec!r} is not accepted by these wire limits")
        self.peers: set[str] = {peer_id}  # this stage's ONLINE replicas, self included
        self.cannot_lead: frozenset[str] = frozenset()  # replicas that never lead a group (unreachable)
        self._gathers: dict[RoundKey, _Gather] = {}
        self._closed: collections.OrderedDict[RoundKey, None] = collections.OrderedDict()  # recently averaged
        self.strikes = PeerStrikes(config.peer_strikes, config.ban_s, config.ban_s)  # bounded per peer
        self.on_error = on_error
        self.stats: collections.Counter[str] = collections.Counter()

    async def register(self) -> None:
        await self.p2p.add_binary_stream_handler(HANDLER, self.handle_stream)

    def set_peers(self, peers: Iterable[str], cannot_lead: Iterable[str] = ()) -> None:
        """The stage's ONLINE replicas from the DHT records (self is always included), and those of them
        that never lead a group (unreachable)."""
        self.peers = set(peers) | {self.peer_id}
        self.cannot_lead = frozenset(cannot_lead)

    # ----------------------------------------------------------------------------------------- a round

    async def run_round(self, key: RoundKey, part: torch.Tensor, weight: float = 1.0) -> RoundResult:
        """Average ``part`` (this replica's flat outer gradient of ``key.fragment``) with its group;
        ``weight``: how much it counts (this replica's inner steps since its last part of the fragment)."""
        started = time.monotonic()
        if part.dim() != 1 or part.numel() != self.fragment_sizes[key.fragment]:
            raise ValueError(f"fragment {key.fragment} has {self.fragment_sizes[key.fragment]} values, "
                             f"got a part of shape {list(part.shape)}")
        groups = plan_groups(self.run_id, key, self.peers, self.config.max_group, self.cannot_lead)
        group = next(g for g in groups if self.peer_id in g)
        try:
            if group[0] == self.peer_id:
                result = await self._lead(key, part, group, weight)
            else:
                result = await self._join(key, part, group[0], weight)
        except Exception as exc:  # never let a round take the caller down
            logger.warning("round %s failed: %s", key, exc)
            result = RoundResult(None, "leader" if group[0] == self.peer_id else "member", group[0],
                                 reason=f"error: {exc}", skip="error")
        result.seconds = time.monotonic() - started
        self.stats["rounds_" + ("committed" if result.mean is not None else "skipped")] += 1
        self.stats["bytes_sent"] += result.bytes_sent
        self.stats["bytes_received"] += result.bytes_received
        self.stats["parts_rejected"] += len(result.rejected)
        return result

    async def _lead(self, key: RoundKey, part: torch.Tensor, group: list[str], weight: float) -> RoundResult:
        gather = self._gather(key, expected=len(group), own=True)
        gather.expected = len(group)
        own = gather.parts[self.peer_id] = quantized(part, self.codec)[1]
        gather.weights[self.peer_id] = weight
        await self._collect(key, gather, 4 * self.config.max_early_rounds)
        peers = list(gather.parts)
        outcome = robust_mean([gather.parts[p] for p in peers], self.config.max_norm_ratio,
                              [gather.weights.get(p, 1.0) for p in peers], self.config.max_weight_ratio)
        rejected = {peers[i]: why for i, why in outcome.rejected.items()}
        for peer, why in rejected.items():
            logger.info("round %s: dropped %s's part (%s)", key, peer, why)
            # A part the robust mean drops (non-finite, wrong size, an outlier norm) is poison or a
            # broken replica either way: a strike, like a malformed frame.
            if peer != self.peer_id:
                self._offence(peer, f"part dropped from the average: {why}")
        if outcome.mean is None or self.peer_id in rejected:
            # Without our own part in it the mean is not ours to apply: skip, and tell the members so.
            gather.result.set_result(None)
            return RoundResult(None, "leader", self.peer_id, rejected=rejected, reason="no usable parts",
                               skip="no_usable_parts")
        mean = quantized(outcome.mean, self.codec)[1]
        kept = [peers[i] for i in outcome.kept]
        gather.result.set_result((mean, kept))
        return RoundResult(mean, "leader", self.peer_id, group=kept, group_size=len(kept), rejected=rejected,
                           sent=own)

    async def _collect(self, key: Any, gather: _Gather, remember: int) -> None:
        """Wait ``gather_s`` at most for the gather's expected parts, then close it (late parts are refused:
        its key is remembered among the last ``remember`` closed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.gather_s
        while len(gather.parts) < gather.expected and (left := deadline - loop.time()) > 0:
            gather.arrived.clear()
            try:
                await asyncio.wait_for(gather.arrived.wait(), left)
            except TimeoutError:
                break
        gather.closed = True
        self._gathers.pop(key, None)
        self._closed[key] = None
        while len(self._closed) > remember:
            self._closed.popitem(last=False)

    async def _join(self, key: RoundKey, part: torch.Tensor, leader: str, weight: float) -> RoundResult:
        from hivemind.p2p import PeerID

        timeout = self.config.timeout_s
        result = RoundResult(None, "member", leader, sent=quantized(part, self.codec)[1])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout(timeout):
                _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(leader), HANDLER)
                try:
                    for body in self._encode_parts(key, result.sent, weight=weight):
                        await write_frame(writer, body, timeout=max(0.1, deadline - loop.time()))
                        result.bytes_sent += len(body) + PREFIX_BYTES
                    mean, received, _, size = await self._read_parts(reader, key, leader)
                    result.bytes_received += received
                    result.group_size = int(size)
                finally:
                    writer.close()
        except TimeoutError:
            result.reason, result.skip = f"no mean from leader {leader} within {timeout:.0f} s", "timeout"
            return result
        except RemoteError as exc:
            result.reason, result.skip = f"leader refused: {exc}", f"refused_{exc.remote_code}"
            return result
        except (ProtocolError, OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
            result.reason, result.skip = f"leader {leader} unreachable or broken: {exc}", "unreachable"
            return result
        result.mean = mean
        return result

    # ----------------------------------------------------------------------------------------- wire

    def _encode_parts(self, key: RoundKey, values: torch.Tensor, weight: float = 1.0) -> list[bytes]:
        pieces = chunk(values, self.config.max_values_per_part)
        return [encode_message(FragmentPart(
            run_id=self.run_id, stage=key.stage, round_id=key.round, fragment_id=key.fragment, part=i,
            num_parts=len(pieces), offset=offset, total_values=values.numel(), values=piece.contiguous(),
            codec=self.codec_name, weight=weight), self.limits) for i, (offset, piece) in enumerate(pieces)]

    async def _read_parts(self, reader: asyncio.StreamReader, key: RoundKey | None, peer: str,
                          timeout: float | None = None) -> tuple[torch.Tensor, int, RoundKey, float]:
        """A whole fragment sent as FragmentParts; checked against ``key`` (None: taken from the first part).
        Returns the values, the bytes read, the key and the first part's weight."""
        received, out, expected_parts, got, weight = 0, None, None, 0, 1.0
        while expected_parts is None or got < expected_parts:
            msg, size = await next_part(reader, self.limits, timeout)
            received += size
            if key is None:
                key = RoundKey(msg.stage, msg.fragment_id, msg.round_id)
            self._check_part(msg, key, expected_parts, got)
            if out is None:
                out = torch.empty(msg.total_values, dtype=torch.float32)
                expected_parts, weight = msg.num_parts, msg.weight
            out[msg.offset:msg.offset + msg.values.numel()] = msg.values
            got += 1
        return out, received, key, weight

    def _check_part(self, msg: FragmentPart, key: RoundKey, expected_parts: int | None, index: int) -> None:
        if msg.run_id != self.run_id or msg.stage != self.stage:
            raise MalformedMessage(f"part for run {msg.run_id!r} stage {msg.stage}; this is {self.run_id!r} stage {self.stage}")
        if (msg.stage, msg.fragment_id, msg.round_id) != (key.stage, key.fragment, key.round):
            raise MalformedMessage(f"part for fragment {msg.fragment_id} round {msg.round_id} inside "
                                   f"fragment {key.fragment} round {key.round}")
        if not 0 <= msg.fragment_id < len(self.fragment_sizes) or msg.total_values != self.fragment_sizes[msg.fragment_id]:
            raise MalformedMessage(f"fragment {msg.fragment_id} of {msg.total_values} values does not exist here")
        if msg.codec != self.codec_name:
            raise MalformedMessage(f"parts travel as {self.codec_name}, got {msg.codec}")
        per = self.config.max_values_per_part
        want_parts = max(1, math.ceil(msg.total_values / per))
        if msg.num_parts != want_parts or (expected_parts is not None and msg.num_parts != expected_parts):
            raise MalformedMessage(f"a fragment of {msg.total_values} values travels in {want_parts} part(s), "
                                   f"got num_parts={msg.num_parts}")
        if msg.part != index or msg.offset != index * per or msg.values.numel() != min(per, msg.total_values - msg.offset):
            raise MalformedMessage(f"part {msg.part} at offset {msg.offset} with {msg.values.numel()} values is "
                                   f"out of order (expected part {index} at offset {index * per})")

    # ----------------------------------------------------------------------------------------- serving

    def _gather(self, key: RoundKey, expected: int, own: bool = False) -> _Gather:
        return self._open_gather(key, self.fragment_sizes[key.fragment], expected, own=own,
                                 limit=self.config.max_early_rounds,
                                 what=f"round {key.round} of fragment {key.fragment}")

    def _open_gather(self, key: Any, numel: int, expected: int, *, limit: int, what: str, own: bool = False) -> _Gather:
        """The open collection of parts under ``key`` (created if new; stale ones settled as skipped first).
        A key already averaged is refused as ``late``; past ``limit`` open ones, a peer's early part as ``busy``."""
        now = asyncio.get_running_loop().time()
        for old in [k for k, g in self._gathers.items() if now - g.created > self.config.timeout_s]:
            stale = self._gathers.pop(old)
            if not stale.result.done():
                stale.result.set_result(None)
        gather = self._gathers.get(key)
        if gather is None:
            if key in self._closed:
                raise _Refuse("late", f"{what} is already averaged")
            if not own and len(self._gathers) >= limit:
                raise _Refuse("busy", f"holding {len(self._gathers)} open already")
            gather = self._gathers[key] = _Gather(numel, expected, now)
        return gather

    async def handle_stream(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one member's stream (the P2P handler; the daemon dispatches to the current exchange)."""
        peer = str(info.peer_id)
        try:
            await self._write_all(writer, await self._serve(peer, reader))
            await linger(reader, LINGER_S)
        except Exception as exc:  # a broken member stream must never reach the event loop
            logger.debug("exchange stream from %s ended: %s", peer, exc)
        finally:
            writer.close()

    async def _write_all(self, writer: asyncio.StreamWriter, frames: list[bytes]) -> None:
        """Send a reply's frames on a served stream (counted as sent)."""
        for body in frames:
            await write_frame(writer, body, timeout=self.config.timeout_s)
            self.stats["bytes_sent"] += len(body) + PREFIX_BYTES

    async def _serve(self, peer: str, reader: asyncio.StreamReader) -> list[bytes]:
        if self.strikes.banned_for(peer) > 0:
            return [self._error("banned", "too many malformed parts; try later")]
        if peer not in self.peers:
            return [self._error("not_member", "not an ONLINE replica of this stage as far as this node knows")]
        try:
            values, received, key, weight = await self._read_parts(reader, None, peer, timeout=self.config.timeout_s)
        except (RemoteError, ConnectionLost, StreamIdle):  # the member left or went quiet: no offence
            return []
        except ProtocolError as exc:
            self._strike(peer, exc)
            return [self._error(exc.code, str(exc))]
        self.stats["bytes_received"] += received
        group = next((g for g in plan_groups(self.run_id, key, self.peers, self.config.max_group, self.cannot_lead)
                      if peer in g), [])
        if not group or group[0] != self.peer_id:
            # The sender's view of the stage differs from ours: tell it now rather than at its deadline.
            return [self._error("not_leader", "this node does not lead your group in this round (views differ)")]
        try:
            gather = self._gather(key, expected=self.config.max_group)
        except _Refuse as exc:
            return [self._error(exc.code, str(exc))]
        if gather.closed:
            return [self._error("late", f"round {key.round} of fragment {key.fragment} is already averaged")]
        if peer in gather.parts or len(gather.parts) >= self.config.max_group:
            return [self._error("rejected", "duplicate part or full group")]
        gather.parts[peer], gather.weights[peer] = values, weight
        gather.arrived.set()
        try:
            outcome = await asyncio.wait_for(asyncio.shield(gather.result), self.config.timeout_s)
        except TimeoutError:
            return [self._error("timeout", "the round did not finish in time")]
        if outcome is None:
            return [self._error("skipped", "the leader skipped this round")]
        mean, kept = outcome
        if peer not in kept:
            return [self._error("rejected", "your part was dropped from the average (non-finite or far too large)")]
        return self._encode_parts(key, mean, weight=float(len(kept)))  # the weight tells members the group size

    def _error(self, code: str, message: str) -> bytes:
        self.stats[f"refused_{code}"] += 1
        return encode_message(ErrorReply(code=code, message=message[:400]), self.limits)

    def _strike(self, peer: str, exc: ProtocolError) -> None:
        _refusal_log.info(f"exchange:{exc.code}", "exchange: refused input from %s [%s] %s", peer, exc.code, exc)
        if self.on_error is not None:
            self.on_error(exc)
        self._offence(peer, f"malformed parts: {exc.code}")

    def _offence(self, peer: str, why: str) -> None:
        """One strike against ``peer``; the ``peer_strikes``-th within ``ban_s`` bans it."""
        if self.strikes.strike(peer):
            self.stats["peers_banned"] += 1
            _refusal_log.warning("ban", "exchange: peer %s banned for %.0f s (%s)", peer, self.config.ban_s, why)


class _Refuse(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
