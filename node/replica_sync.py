"""Streaming DiLoCo between the replicas of the stage this node serves (DESIGN §1.2, §2).

:class:`ReplicaSync` ties three things together:

- **The shared schedule.** Boundaries are *epochs*: epoch ``k`` ends when the replicas of the stage
  have taken ``U = H/P`` inner steps between them since epoch ``k-1`` ended. Every replica publishes
  ``(outer_epoch, epoch_steps)`` in its DHT record; a replica adds its own live count to the other
  replicas' published counts for the same epoch, and crosses the boundary when the sum reaches ``U``.
  A replica that sees a peer in a later epoch moves there at once, so fast and slow volunteers meet
  at the same rounds. Boundary ``k`` syncs fragment ``k mod P`` in round ``k div P``: with the
  summed counter ``t = k·U`` that is exactly the schedule of swarm/diloco.py.
- **The outer step** (:class:`swarm.diloco.OuterLoop`, held by the stage's ``StageStore``). At a
  boundary the replica computes its outer gradient for the fragment, hands it to the exchange, keeps
  training, and applies the group's mean once it has arrived and ``overlap`` (τ) of its own steps
  have passed. A skipped round applies nothing.
- **The exchange** (:class:`swarm.exchange.FragmentExchange`) on the node's P2P event loop.

The schedule and the outer step run in the thread that trains (the S = 1 trainer, or the pipeline's
compute thread), between optimizer steps: :meth:`after_step`. The DHT view arrives from the daemon's
upkeep thread: :meth:`observe`. A replica that fell more than ``diloco.resync_rounds`` rounds behind
sets :attr:`resync_requested`; the daemon downloads the stage's state again.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from typing import Any

from node.config import RunConfig
from node.metrics import NodeMetrics
from node.stage_store import StageStore
from protocol.admission import Admission
from protocol.messages import StageRecord
from swarm.exchange import (
    BALANCED_HANDLER,
    EXCHANGE_STREAM_LIMITS,
    HANDLER,
    BalancedExchange,
    FragmentExchange,
    RoundKey,
)
from swarm.first_moment import FirstMoment, round_with_moment

logger = logging.getLogger(__name__)


def rounds_behind(history: list[str], mates: list[StageRecord]) -> str | None:
    """Whether a replica whose outer history is ``history`` (``OuterLoop.history()``) missed rounds the
    stage's other replicas applied: a description of the first such peer, else None.

    Every missed mean leaves this replica's global copy one outer step away from the stage's (and its
    history chain different), so a replica resumed from a checkpoint that is behind by even one round
    takes the stage's consensus state instead of contributing parts against a stale global copy.
    """
    mine = [_round_of(h) for h in history]
    for r in mates:
        if len(r.outer_history) != len(mine):
            continue
        theirs = [_round_of(h) for h in r.outer_history]
        if any(t > m for t, m in zip(theirs, mine, strict=True)):
            return f"{r.peer_id} applied rounds {theirs}, this state {mine}"
    return None


def drifted(mine: list[str], mates: list[StageRecord], peer_id: str) -> tuple[int, str, str, list[str]] | None:
    """The first fragment where more of ``mates`` that applied this replica's last round share another
    history than share ``mine`` (on a tie, the larger peer id gives way): (fragment, mine, theirs, their
    peers); None when this replica holds the stage's state."""
    for p, own in enumerate(mine):
        round_tag = own.split(":", 1)[0]
        if round_tag == "-1":
            continue
        others: dict[str, list[str]] = {}
        for r in mates:
            if len(r.outer_history) == len(mine) and r.outer_history[p].split(":", 1)[0] == round_tag:
                others.setdefault(r.outer_history[p], []).append(r.peer_id)
        agree = 1 + len(others.pop(own, []))
        for value, peers in others.items():
            if len(peers) > agree or (len(peers) == agree and max(peers) < peer_id):
                return p, own, value, peers
    return None


def _round_of(entry: str) -> int:
    try:
        return int(entry.split(":", 1)[0])
    except ValueError:
        return -1


class ReplicaSync:
    """Streaming DiLoCo for this node's stage; one per daemon, re-attached on every stage change."""

    def __init__(self, cfg: RunConfig, metrics: NodeMetrics, loop: asyncio.AbstractEventLoop, p2p: Any,
                 peer_id: str, run_id: str) -> None:
        self.cfg, self.metrics, self.loop, self.p2p = cfg, metrics, loop, p2p
        self.peer_id, self.run_id = peer_id, run_id
        self.work: StageStore | None = None
        self.exchange: FragmentExchange | None = None
        self.moments: FirstMoment | None = None  # diloco.first_moment
        self._lock = threading.Lock()  # the epoch state: trainer thread vs. upkeep thread
        self.epoch = 0
        self.epoch_steps = 0
        self.steps = 0  # this replica's inner steps since attach (for τ)
        self._peers: dict[str, tuple[int, int]] = {}  # peer -> (epoch, steps in it), from the records
        self._seen_peers = False
        self._verify_resumed = False  # attached to a state resumed from a checkpoint: compare it once
        self._pending: dict[int, tuple[concurrent.futures.Future, int, RoundKey, float]] = {}
        self._began_at: dict[int, int] = {}  # fragment -> self.steps at its last boundary (for the part's weight)
        self.resync_requested = False
        self.resync_from: list[str] = []  # peers to download from when resyncing (empty: any)
        self.stats: dict[str, int] = {"rounds_started": 0, "rounds_committed": 0, "rounds_skipped": 0,
                                      "rounds_alone": 0, "rounds_missed": 0, "resyncs": 0, "inner_steps": 0, "drift_detected": 0,
                                      "moments_merged": 0}
        self.skipped_by: dict[str, int] = {}  # skipped rounds by why (RoundResult.skip, superseded, ...)
        self.round_s = {"committed": 0.0, "alone": 0.0, "skipped": 0.0}  # summed boundary-to-end seconds
        self.last_group = 0
        # The last rounds that got a result: [unix time, outcome, exchange seconds, bytes sent, bytes
        # received, group size] (node sim's exchange round times and bytes per round).
        self.recent_rounds: collections.deque[list] = collections.deque(maxlen=64)
        self.wait_s = 0.0  # training stood still for a mean (diloco.blocking)
        self.stop: threading.Event | None = None  # the daemon's: a blocking wait ends at shutdown

    async def register(self) -> None:
        handler = BALANCED_HANDLER if self.cfg.exchange.mode == "balanced" else HANDLER
        # Streams per peer, checked before a byte is read; a peer the current exchange banned is refused there.
        self.admission = Admission(handler, EXCHANGE_STREAM_LIMITS, banned=self._banned, wire_limits=self.cfg.wire.limits())
        await self.p2p.add_binary_stream_handler(handler, self.admission.wrap(self._on_stream))

    def _banned(self, peer: str) -> float:
        exchange = self.exchange
        return exchange.strikes.banned_for(peer) if exchange is not None else 0.0

    async def _on_stream(self, info, reader, writer) -> None:
        exchange = self.exchange
        if exchange is None:
            writer.close()
            return
        await exchange.handle_stream(info, reader, writer)

    # ------------------------------------------------------------------------------------ attach

    def attach(self, work: StageStore) -> None:
        """Sync ``work``'s stage from now on (called on every stage change and after a resync)."""
        if work.outer is None:
            return
        wire, train = self.cfg.wire, self.cfg.train
        sizes = [layout.numel for layout in work.outer.layouts]
        # diloco.first_moment: fragment p's first moment is averaged as fragment P + p, in a round beside p's
        moments = FirstMoment(work.optimizer, work.outer.params, work.outer.layouts, train.beta1, train.beta2) \
            if self.cfg.diloco.first_moment else None
        if moments is not None:
            sizes = sizes * 2
        kind = BalancedExchange if self.cfg.exchange.mode == "balanced" else FragmentExchange
        exchange = kind(self.p2p, self.peer_id, self.run_id, work.stage, sizes, self.cfg.exchange,
                        wire.fragment_codec, wire.limits(),
                        on_error=lambda exc: self.metrics.count_protocol_error(exc.code))
        saved, work.resumed_schedule = work.resumed_schedule, None  # a checkpoint's position: taken once
        with self._lock:
            self._abandon_pending()
            self.work, self.exchange, self.moments = work, exchange, moments
            self.epoch_steps, self.steps = 0, 0
            self._began_at = {}
            if saved is not None:  # resumed from a checkpoint: continue the schedule where it stood
                self.epoch = max(0, int(saved.get("outer_epoch", 0)))
                self.epoch_steps = max(0, int(saved.get("epoch_steps", 0)))
            self._verify_resumed = saved is not None
            self._peers, self._seen_peers = {}, False
            self.resync_requested, self.resync_from = False, []
        work.schedule_state = lambda: self.schedule_position(work)
        self.metrics.outer_epoch.set(self.epoch)

    def schedule_position(self, work: StageStore) -> dict[str, int] | None:
        """Where ``work``'s stage is in the shared schedule (for its checkpoints); None once detached."""
        with self._lock:
            if self.work is not work:
                return None
            return {"outer_epoch": self.epoch, "epoch_steps": self.epoch_steps}

    @property
    def spacing(self) -> int:
        """U: summed inner steps between two boundaries."""
        s = self.work.outer.settings
        return s.inner_steps // s.fragments

    # ------------------------------------------------------------------------------------ the DHT view

    def observe(self, records: dict[int, list[StageRecord]]) -> None:
        """This round's records (upkeep thread): the stage's replicas and where they are in the schedule."""
        work, exchange = self.work, self.exchange
        if work is None or exchange is None:
            return
        mates = [r for r in records.get(work.stage, []) if r.state != "offline" and r.peer_id != self.peer_id]
        online = [r.peer_id for r in mates if r.state == "online"]
        # Replicas peers cannot dial (behind NAT, this one included) never lead a group.
        private = [r.peer_id for r in records.get(work.stage, []) if r.reachable == "private"]
        self.loop.call_soon_threadsafe(exchange.set_peers, [self.peer_id, *online], private)
        with self._lock:
            self._peers = {r.peer_id: (max(0, r.outer_epoch), max(0, r.epoch_steps)) for r in mates}
            if not self._seen_peers:
                # A joiner takes its schedule position from the stage before it contributes.
                self._seen_peers = True
                ahead = max((e for e, _ in self._peers.values()), default=0)
                if ahead > self.epoch:
                    logger.info("stage %d: joining the schedule at epoch %d", work.stage, ahead)
                    self.epoch, self.epoch_steps = ahead, 0
        lag = max((e for e, _ in self._peers.values()), default=self.epoch) - self.epoch
        self.metrics.outer_lag_epochs.set(max(0, lag))
        online = [r for r in mates if r.state == "online"]
        if self._verify_resumed and online:
            # A resumed checkpoint the daemon could not compare at start (no records yet): do it now.
            self._verify_resumed = False
            behind = rounds_behind(work.outer.history(), online)
            if behind is not None:
                logger.warning("stage %d: the resumed checkpoint is behind the stage (%s); downloading the "
                               "stage's state", work.stage, behind)
                self.resync_requested = True
                return
        self._check_history(work, online)

    def _check_history(self, work: StageStore, mates: list[StageRecord]) -> None:
        """Find out whether this replica's global copies drifted from the stage's (docs/diloco.md).

        For each fragment, the replicas that applied the same last round should hold the same hash
        chain of applied means. If more of them share another chain than share ours (on a tie, the
        larger peer id gives way), this replica downloads the stage's state from one of them.
        """
        found = drifted(work.outer.history(), mates, self.peer_id)
        if found is not None:
            p, own, value, peers = found
            logger.warning("stage %d fragment %d: this replica's history %s differs from %d peer(s)' %s; "
                           "downloading the stage's state again", work.stage, p, own, len(peers), value)
            self.resync_from = peers
            self.resync_requested = True
            self.stats["drift_detected"] += 1

    def record_fields(self) -> dict[str, Any]:
        """What this replica publishes in its StageRecord."""
        history = self.work.outer.history() if self.work is not None and self.work.outer is not None else []
        with self._lock:
            return {"outer_epoch": self.epoch, "epoch_steps": self.epoch_steps, "outer_history": history}

    # ------------------------------------------------------------------------------------ training thread

    def after_step(self) -> None:
        """After each inner optimizer step, in the thread that trains: apply, then maybe cross a boundary."""
        work = self.work
        if work is None or work.outer is None:
            return
        self.stats["inner_steps"] += 1
        with self._lock:
            self.epoch_steps += 1
            self.steps += 1
            target = self._target_epoch()
        self._apply_ready(work)
        if target > self.epoch:
            self._cross(work, target)
            if work.outer.settings.overlap == 0:  # no overlap: the mean is wanted before the next step
                self._apply_ready(work)

    def _target_epoch(self) -> int:
        ahead = max((e for e, _ in self._peers.values()), default=0)
        if ahead > self.epoch:
            return ahead
        summed = self.epoch_steps + sum(s for e, s in self._peers.values() if e == self.epoch)
        return self.epoch + 1 if summed >= self.spacing else self.epoch

    def _cross(self, work: StageStore, target: int) -> None:
        settings = work.outer.settings
        missed = target - self.epoch - 1
        with self._lock:
            self.epoch, self.epoch_steps = target, 0
        self.metrics.outer_epoch.set(target)
        if missed > 0:
            self.stats["rounds_missed"] += missed
            for k in range(self.epoch - missed, self.epoch):
                self.metrics.outer_rounds_total.labels(str(k % settings.fragments), "missed").inc()
            logger.info("stage %d: %d round(s) missed, now at epoch %d", work.stage, missed, target)
            if missed // settings.fragments >= self.cfg.diloco.resync_rounds:
                self.resync_requested = True
        fragment, round_id = target % settings.fragments, target // settings.fragments
        if fragment in self._pending:  # its previous round never came back: give it up
            self._finish(work, fragment, None, "superseded")
        key = RoundKey(work.stage, fragment, round_id)
        with work.lock:
            part = work.outer.begin(fragment, round_id)
            moment = self.moments.snapshot(fragment) if self.moments is not None else None
        # The part counts by this replica's inner steps since its last part of the fragment (since it
        # attached, for the first): a volunteer twice as fast moved the fragment twice as far.
        weight = float(max(1, self.steps - self._began_at.get(fragment, 0)))
        self._began_at[fragment] = self.steps
        future = asyncio.run_coroutine_threadsafe(round_with_moment(self.exchange, key, part, weight, moment), self.loop)
        self._pending[fragment] = (future, self.steps, key, time.monotonic())
        self.stats["rounds_started"] += 1
        self.metrics.outer_rounds_total.labels(str(fragment), "started").inc()

    def _apply_ready(self, work: StageStore) -> None:
        tau = work.outer.settings.overlap
        for fragment, (future, begun, _, _) in list(self._pending.items()):
            if self.cfg.diloco.blocking and self.steps - begun >= tau and not future.done():
                self._wait(future, self._pending[fragment][3])
            if future.done() and self.steps - begun >= tau:
                try:
                    result = future.result()
                except Exception as exc:
                    logger.warning("stage %d fragment %d: exchange failed: %s", work.stage, fragment, exc)
                    result = None
                self._finish(work, fragment, result, "")

    def _wait(self, future: concurrent.futures.Future, round_started: float) -> None:
        """diloco.blocking: stand still until the round ends, the node stops, or the round's own deadline
        (from its start, so a round that never ends is waited for once) has passed; timed."""
        started = time.monotonic()
        deadline = round_started + self.cfg.exchange.timeout_s + 5.0
        while not future.done() and time.monotonic() < deadline and not (self.stop and self.stop.is_set()):
            concurrent.futures.wait([future], timeout=min(0.5, max(0.0, deadline - time.monotonic())))
        waited = time.monotonic() - started
        self.wait_s += waited
        self.metrics.outer_wait_seconds_total.inc(waited)

    def _finish(self, work: StageStore, fragment: int, result, why: str) -> None:
        future, begun, key, started = self._pending.pop(fragment)
        if result is None and not future.done():
            future.cancel()
        mean = result.mean if result is not None else None
        with work.lock:
            try:
                applied = work.outer.apply(fragment, mean, sent=getattr(result, "sent", None))
            except RuntimeError as exc:  # the stage's state was replaced (resync) while the round was out
                logger.warning("stage %d fragment %d: round dropped (%s)", work.stage, fragment, exc)
                applied = False
            if self.moments is not None:
                self._merge_moment(work, fragment, result.moment if applied and result is not None else None, begun)
        outcome = "committed" if applied else "skipped"
        self.stats[f"rounds_{outcome}"] += 1
        self.metrics.outer_rounds_total.labels(str(fragment), outcome).inc()
        took = time.monotonic() - started
        self.metrics.outer_round_seconds.observe(took)
        self.round_s[outcome] += took
        if result is not None:
            self.recent_rounds.append([round(time.time(), 3), outcome, round(getattr(result, "seconds", 0.0), 3),
                                       result.bytes_sent, result.bytes_received, result.group_size])
            self.metrics.outer_bytes(result.bytes_sent, result.bytes_received)
            for reason in result.rejected.values():
                self.metrics.outer_parts_rejected_total.labels(reason).inc()
            if applied:
                self.last_group = result.group_size
                self.metrics.outer_group_size.set(result.group_size)
                if result.group_size <= 1:  # committed, but nothing was averaged: only our own part
                    self.stats["rounds_alone"] += 1
                    self.round_s["alone"] += took
                    self.metrics.outer_rounds_alone_total.inc()
        reason = why or (result.reason if result is not None else "no result")
        if not applied:
            code = why or (result.skip if result is not None and result.skip else "") or \
                ("no_result" if result is None else "not_applied")
            self.skipped_by[code] = self.skipped_by.get(code, 0) + 1
        log = logger.info if applied else logger.warning
        log("stage %d fragment %d round %d %s%s", key.stage, fragment, key.round, outcome,
            "" if applied else f" ({reason})")

    def _merge_moment(self, work: StageStore, fragment: int, moment, begun: int) -> None:
        """Take the stage's mean first moment of ``fragment`` (None: keep this replica's own)."""
        try:
            if self.moments.merge(fragment, moment, self.steps - begun):
                self.stats["moments_merged"] += 1
        except ValueError as exc:  # a leader's malformed mean: the optimizer state stays this replica's own
            logger.warning("stage %d fragment %d: first moment not merged (%s)", work.stage, fragment, exc)

    def _abandon_pending(self) -> None:
        for future, *_ in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self.moments is not None:
            self.moments.forget()

    # ------------------------------------------------------------------------------------ status

    def health(self) -> dict[str, Any]:
        exchange = self.exchange
        ex = dict(exchange.stats) if exchange is not None else {}
        return {**self.stats, "wait_s": round(self.wait_s, 3), "epoch": self.epoch, "epoch_steps": self.epoch_steps, "rounds_in_flight": len(self._pending),
                "bytes_sent": int(ex.get("bytes_sent", 0)), "bytes_received": int(ex.get("bytes_received", 0)),
                "parts_rejected": int(ex.get("parts_rejected", 0)), "group_size": self.last_group,
                "skipped_by": dict(self.skipped_by), "recent_rounds": list(self.recent_rounds), "round_s": {k: round(v, 3) for k, v in self.round_s.items()},
                "params": sum(layout.numel for layout in self.work.outer.layouts) if self.work and self.work.outer else 0}
