"""The balanced exchange's first step: agree on the round's group before slicing the fragment.

Slices, reducers and checkers are a function of the group (``plan_slices``). If every member planned
the group from its own view of the stage, one replica that some see ONLINE and others do not (a
node killed moments ago, a joiner whose record has not reached everyone) would give the members
different slices, and the round would be skipped by all of them. So the group is fixed by one peer:

    member ──FragmentRequest(round)──▶ leader   (handler protoswarm.diloco.balanced.v2)
    member ◀──GroupRoster──────────── leader   (the members that joined, in the round's order)

The leader is the first dialable peer of the member's planned group (``plan_groups``, as in the
star). It takes joins until every peer of its own planned group joined or ``gather_s`` after it
reached the round, then answers every joiner with the same :class:`GroupRoster`. Every member then
slices by that list, so differing views cost only the members whose leader differs, not the round.
A leader that cannot be dialled (dead, its record not yet expired) is replaced by the next dialable
peer of the group, once: a member that failed to reach the first asks the second, and the second,
failing too, leads itself.

A member checks the roster before it uses it: itself and the leader in it, at most ``max_group``
peers, every peer one it counts as an ONLINE, unbanned replica, in the round's order. A leader can
therefore choose only *which* of those replicas average together (leaving some out: a skipped round
for them, as a star leader can), not their order, so it cannot place two colluders as a slice's
reducer and checker at will (docs/security.md). Parts reach a reducer only from the members of its
own roster for the round; a part that arrives before the reducer has its roster waits for it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

import torch

from protocol.errors import MalformedMessage, RemoteError
from protocol.framing import PREFIX_BYTES, read_frame, write_frame
from protocol.messages import ErrorReply, FragmentRequest, GroupRoster, decode_message, encode_message
from swarm.exchange.groups import RoundKey, round_order

logger = logging.getLogger(__name__)

_JOINED = torch.empty(0)  # what a roster's gather holds for each peer that joined
Roster = tuple[list[str], frozenset[str]]  # the group in the round's order, and who reduces nothing


class Skip(Exception):
    """The round cannot go on: ``code`` is its short skip reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Rosters:
    """The rosters this node holds by round (its own group, once agreed); at most ``limit`` rounds."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._by_key: collections.OrderedDict[RoundKey, asyncio.Future] = collections.OrderedDict()

    def future(self, key: RoundKey, pending_limit: int | None = None) -> asyncio.Future:
        """The roster future of ``key`` (created if new; ``Skip('busy')`` past ``pending_limit`` unsettled)."""
        fut = self._by_key.get(key)
        if fut is None:
            if pending_limit is not None and sum(not f.done() for f in self._by_key.values()) >= pending_limit:
                raise Skip("busy", f"holding {pending_limit} rounds without a group already")
            fut = self._by_key[key] = asyncio.get_running_loop().create_future()
            while len(self._by_key) > self.limit:
                _, old = self._by_key.popitem(last=False)
                if not old.done():
                    old.set_result(None)
        return fut

    def settle(self, key: RoundKey, roster: Roster | None) -> None:
        fut = self.future(key)
        if not fut.done():
            fut.set_result(roster)

    def known(self, key: RoundKey) -> Roster | None:
        fut = self._by_key.get(key)
        return fut.result() if fut is not None and fut.done() else None


class RosterAgreement:
    """The roster half of :class:`~swarm.exchange.balanced.BalancedExchange` (a mixin over its state:
    ``rosters``, gathers, strikes, config, peers)."""

    async def _agree(self, key: RoundKey, group: list[str], result: Any) -> Roster:
        """This round's roster: from the group's leader, or led here; ``Skip`` if there is none."""
        able = [p for p in group if p not in self.cannot_lead] or list(group)
        tried: list[str] = []
        try:
            for leader in able[:2]:
                if leader == self.peer_id:
                    roster = await self._lead_roster(key, [p for p in group if p not in tried])
                    break
                try:
                    roster = await self._ask_roster(key, leader, result)
                    break
                except RemoteError as exc:
                    raise Skip(f"refused_{exc.remote_code}", f"leader {leader} refused: {exc}") from exc
                except (Skip, MalformedMessage):
                    raise
                except Exception as exc:  # not dialable (dead, or its record outlived it): the next one leads
                    logger.info("round %s: leader %s unreachable (%s)", key, leader, exc)
                    tried.append(leader)
            else:
                raise Skip("unreachable", f"no leader of the group answered ({', '.join(tried)})")
        except BaseException:
            self.rosters.settle(key, None)
            raise
        finally:
            self._drop_held_joins(key)
        self.rosters.settle(key, roster)
        return roster

    async def _lead_roster(self, key: RoundKey, group: list[str]) -> Roster:
        """Take joins until all of ``group`` joined or ``gather_s`` passed; answer them all alike."""
        gather = self._open_gather((key, "roster"), 0, len(group), own=True, limit=2 * self.config.max_early_rounds,
                                   what=f"round {key.round}'s group")
        gather.expected = len(group)
        gather.parts[self.peer_id] = _JOINED
        await self._collect((key, "roster"), gather, 8 * self.config.max_early_rounds)
        peers = [p for p in group if p in gather.parts]
        roster = (peers, frozenset(p for p in peers if p in self.cannot_lead))
        gather.result.set_result(roster)
        return roster

    def _drop_held_joins(self, key: RoundKey) -> None:
        """Joins held here for a round this node did not lead: answered ``not_leader``, later ones refused."""
        held = self._gathers.get((key, "roster"))
        if held is not None and not held.closed:
            held.closed = True
            self._gathers.pop((key, "roster"), None)
            self._closed[(key, "roster")] = None
            if not held.result.done():
                held.result.set_result(None)

    async def _ask_roster(self, key: RoundKey, leader: str, result: Any) -> Roster:
        from hivemind.p2p import PeerID

        dial = self.p2p.call_binary_stream_handler(PeerID.from_base58(leader), HANDLER)
        _, reader, writer = await asyncio.wait_for(dial, self.config.gather_s)
        try:
            ask = encode_message(FragmentRequest(run_id=self.run_id, stage=key.stage, round_id=key.round,
                                                 fragment_id=key.fragment), self.limits)
            await write_frame(writer, ask, timeout=self.config.timeout_s)
            result.bytes_sent += len(ask) + PREFIX_BYTES
            raw = await read_frame(reader, self.limits, timeout=self.config.timeout_s)
            if raw is None:
                raise RemoteError("closed before the group was sent", remote_code="closed")
            result.bytes_received += len(raw) + PREFIX_BYTES
            msg = decode_message(raw, self.limits)
        finally:
            writer.close()
        if isinstance(msg, ErrorReply):
            raise RemoteError(f"[{msg.code}] {msg.message}", remote_code=msg.code)
        if not isinstance(msg, GroupRoster) or (msg.run_id, msg.stage, msg.round_id, msg.fragment_id) != \
                (self.run_id, key.stage, key.round, key.fragment):
            raise MalformedMessage("expected the GroupRoster of this round")
        return self._checked_roster(key, msg, leader)

    def _checked_roster(self, key: RoundKey, msg: GroupRoster, leader: str) -> Roster:
        """``msg`` as a roster this node may use, or ``Skip``: see the module docstring."""
        planned = self._planned()
        if self.peer_id not in msg.peers or leader not in msg.peers:
            raise Skip("roster", f"leader {leader} left us (or itself) out of the group")
        if len(msg.peers) > self.config.max_group:
            raise Skip("roster", f"leader {leader} sent a group of {len(msg.peers)} (max_group {self.config.max_group})")
        unknown = [p for p in msg.peers if p not in planned]
        if unknown:
            raise Skip("roster", f"the group has {len(unknown)} peer(s) this node does not count as ONLINE replicas")
        if msg.peers != [p for p in round_order(self.run_id, key, planned) if p in msg.peers]:
            raise Skip("roster", f"leader {leader} sent the group out of the round's order")
        return list(msg.peers), frozenset(msg.unable)

    async def _serve_join(self, peer: str, req: FragmentRequest) -> bytes:
        """A member's join (its FragmentRequest): held until this node closes the round's group."""
        if req.run_id != self.run_id or req.stage != self.stage or not 0 <= req.fragment_id < len(self.fragment_sizes):
            raise MalformedMessage("a join for another run, stage or fragment")
        key = RoundKey(req.stage, req.fragment_id, req.round_id)
        group = next((g for g in self._groups(key) if peer in g), [])
        able = [p for p in group if p not in self.cannot_lead] or group
        if self.peer_id not in able[:2]:
            return self._error("not_leader", "this node does not lead your group in this round (views differ)")
        gather = self._open_gather((key, "roster"), 0, len(group), limit=2 * self.config.max_early_rounds,
                                   what=f"round {key.round}'s group")
        if gather.closed:
            return self._error("late", f"round {key.round}'s group is already closed")
        if peer in gather.parts or len(gather.parts) >= self.config.max_group:
            return self._error("rejected", "duplicate join or full group")
        gather.parts[peer] = _JOINED
        gather.arrived.set()
        try:
            roster = await asyncio.wait_for(asyncio.shield(gather.result), self.config.timeout_s)
        except TimeoutError:
            return self._error("timeout", "the group did not close in time")
        if roster is None:
            return self._error("not_leader", "this node does not lead this round's group")
        if peer not in roster[0]:
            return self._error("late", "joined after the group closed")
        return encode_message(GroupRoster(run_id=self.run_id, stage=key.stage, round_id=key.round,
                                          fragment_id=key.fragment, peers=roster[0],
                                          unable=sorted(roster[1])), self.limits)

    async def _roster_for(self, key: RoundKey, peer: str) -> Roster:
        """This node's roster for a round a member sent a part of (waiting for it if not agreed yet);
        ``Skip`` (as a refusal) if the member is not in it."""
        fut = self.rosters.future(key, pending_limit=2 * self.config.max_early_rounds)
        try:
            roster = await asyncio.wait_for(asyncio.shield(fut), self.config.timeout_s)
        except TimeoutError:
            roster = None
        if roster is None:
            raise Skip("late", f"no group of round {key.round} here")
        if peer not in roster[0]:
            raise Skip("not_member", f"not in this node's group of round {key.round}")
        return roster


HANDLER = "protoswarm.diloco.balanced.v2"
