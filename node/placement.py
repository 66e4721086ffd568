"""Which stage this node serves: the claim at start, hosting a stage, and the rebalancing moves.

The policy is swarm/claiming.py's (pure functions); this is the node's side of it:

- **Claim** (node/claim.py ``pick_stage``): the stages that fit the device (and, behind NAT in a
  pipeline, stage 0 only), the node's throughput measured once, the swarm read once.
- **Host** (node/stage_host.py ``StageHost.open``): own checkpoint, else the stage's servers, else the
  seeded init for a stage nobody serves. When its servers cannot give it, the node never seeds it: it
  claims another stage (the same choice over a fresh read among the stages not tried), so a peer that
  announces a stage it cannot serve, broken or hostile, does not keep joiners out. Only when none is
  left, or the node is pinned (``swarm.stage``), does it stop with the download's reason.
- **Rebalance**: a move to ``rebalance_target``'s stage among those this device can take, by one of the
  stage's servers a round (``mover_of_round``: elected by a hash of peer id and round), never within two periods of the last move, never to a stage
  whose download failed while the same peers serve it (each try stops training for a checkpoint and a
  failed download); a target ruled out so leaves the next qualifying stage as the move.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from node.claim import own_checkpoint_stage, pick_stage, stages_that_fit
from node.context import NodeContext
from node.presence import SwarmPresence
from node.reachability import stages_for
from node.stage_host import StageHost, StageUnavailable
from node.stage_store import StageStore
from protocol.messages import StageRecord
from swarm.claiming import mover_of_round, rebalance_target, stage_loads, stage_server_ids, stage_servers

logger = logging.getLogger(__name__)

Records = dict[int, list[StageRecord]]


class StagePlacement:
    """The stage this node hosts (``host``) and how it got and changes it. ``fail``: the daemon's
    user-facing error (prints it and stops the node)."""

    def __init__(self, ctx: NodeContext, presence: SwarmPresence, *, create: bool, fail: Callable[[str], None]):
        self.ctx, self.cfg, self.presence, self.create, self._fail = ctx, ctx.cfg, presence, create, fail
        self.host: StageHost | None = None
        self.fit: list[int] = []  # stages whose estimated memory fits this node's device (at claim time)
        self.last_move = 0.0
        self.unavailable = ""  # why the last stage this node tried to host could not be downloaded
        self._throughput = 0.0
        self._probe: StageStore | None = None
        self._claim_records: Records = {}  # handed to the download of the stage claimed, once
        self._claim_read: Records = {}  # the read the latest claim was made on
        # stage → the peers that served it when its download failed: no move there while they are the same
        self._undownloadable: dict[int, frozenset[str]] = {}
        self._told: set[int] = set()

    # joining --------------------------------------------------------------------------------------

    def join(self) -> bool:
        """Claim a stage and host it (another one if the claimed one cannot be downloaded). False: stop."""
        stage = self.claim()
        if stage is None or self.ctx.stop.is_set():
            return False
        tried: list[int] = []
        while not self.host_stage(stage, fail=False):
            if self.ctx.stop.is_set():
                return False
            tried.append(stage)
            self._undownloadable[stage] = stage_server_ids(self._claim_read, stage)
            stage = self.claim_another(tried)
            if stage is None:
                others = f" (stages tried: {', '.join(map(str, tried))})" if len(tried) > 1 else ""
                self._fail(f"{self.unavailable}{others}")
                return False
            logger.warning("stage %d is served but its state could not be downloaded from its servers; "
                           "claiming stage %d instead (stages tried: %s)", tried[-1], stage, tried)
        return not self.ctx.stop.is_set()

    def claim(self) -> int | None:
        """The stage to host first (None: the node stops, the reason printed)."""
        cfg, ctx = self.cfg, self.ctx
        fit, failure = stages_that_fit(cfg, ctx.device, ctx.run_id)
        if failure is not None:
            self._fail(failure)
            return None
        fit, failure = stages_for(ctx.services.reachability, fit, cfg.pipeline.num_stages, cfg.swarm.stage,
                                  wait_s=0 if self.create else 30.0)
        if failure is not None:
            self._fail(failure)
            return None
        self.fit = fit
        probe_stage = cfg.swarm.stage if cfg.swarm.stage is not None else fit[0]
        probe = StageStore.fresh(cfg, ctx.run_id, probe_stage, ctx.checkpoint_dir(probe_stage), ctx.device)
        # Measured once: a node's speed, not a stage's (stages are balanced). Re-measuring on every move
        # would feed timing noise into the rebalancing decisions and make nodes oscillate.
        self._throughput = probe.engine.measure_throughput(cfg.train.batch_size, cfg.train.seq_len)
        self._probe = probe  # reused by host_stage if this is the stage claimed (still at its seeded init)
        if cfg.swarm.stage is not None:
            try:  # only a help for the download (servers to try): a pinned node does not fail on it
                self._claim_records = self.presence.read()
            except Exception as exc:  # a DHT lookup: timeouts, a closed daemon
                logger.warning("reading the swarm before hosting stage %d failed (%s); going on", cfg.swarm.stage, exc)
            return cfg.swarm.stage
        own = own_checkpoint_stage({s: ctx.checkpoint_dir(s) for s in range(cfg.pipeline.num_stages)})
        return self._pick(fit, own)

    def claim_another(self, tried: list[int]) -> int | None:
        """The stage to claim after the servers of every stage in ``tried`` failed to give it. None: the
        node is pinned to its stage, or no other stage fits."""
        fit = [s for s in self.fit if s not in tried]
        if self.cfg.swarm.stage is not None or not fit:
            return None
        return self._pick(fit, None)

    def _pick(self, fit: list[int], own: int | None) -> int:
        cfg, me, n = self.cfg, self.ctx.dht.peer_id, self.cfg.pipeline.num_stages
        records = self._claim_records = self._claim_read = self.presence.read()  # tried if the download's read misses
        return pick_stage(stage_loads(records, n, exclude_peer=me), stage_servers(records, n, exclude_peer=me), me,
                          cfg.swarm.min_replicas, fit, own, cfg.swarm.rebalance_gain)

    def host_stage(self, stage: int, fail: bool = True, records: Records | None = None) -> bool:
        """Become a server of ``stage`` (node/stage_host.py) and say so. False: its servers could not give it
        (why: ``unavailable``). ``records``: the DHT read the stage was chosen on (default: the claim's)."""
        probe, self._probe = self._probe, None
        seen = (records if records is not None else self._claim_records).get(stage, [])
        self._claim_records = {}  # the claim's read serves the claim only
        try:
            self.host = StageHost.open(self.ctx, stage, self._throughput, probe, seen, confirm_vacant=not self.create)
        except StageUnavailable as exc:  # peers serve it but it could not be downloaded: stop (``fail``), never seed
            self.unavailable = str(exc)
            if fail and not self.ctx.stop.is_set():
                self._fail(str(exc))
            return False
        self.last_move = time.monotonic()
        self.presence.announce(self.host, "joining")
        return True

    # moving ---------------------------------------------------------------------------------------

    def _round(self) -> int:
        """The rebalancing round now: wall-clock periods, so every node of the swarm counts the same ones."""
        return int(time.time() // self.cfg.swarm.rebalance_period_s)

    def rebalance(self, records: Records | None = None) -> None:
        """One rebalancing check. ``records``: the swarm as just read by this round's refresh, if there was one."""
        cfg = self.cfg
        # After a move, let the swarm see it (records refresh) before deciding again.
        if time.monotonic() - self.last_move < 2 * cfg.swarm.rebalance_period_s:
            return
        if records is None:
            records = self.presence.observe(self.host)
        me, n, here_stage = self.ctx.dht.peer_id, cfg.pipeline.num_stages, self.host.stage
        loads, servers = stage_loads(records, n, exclude_peer=me), stage_servers(records, n, exclude_peer=me)

        def target_among(stages) -> int | None:
            return rebalance_target(loads, servers, here_stage, self.host.throughput, cfg.swarm.rebalance_gain,
                                    cfg.swarm.min_replicas, stages)

        # Never a stage this device cannot hold, nor one whose download failed while the same peers serve it.
        blocked = {s for s, ids in self._undownloadable.items() if ids == stage_server_ids(records, s)}
        target = target_among(self.fit)
        if target in blocked:
            if target not in self._told:  # once per failure, not every period
                self._told.add(target)
                logger.info("stage %d would be better served, but its servers (the same peers) could not give it "
                            "before", target)
            target = target_among([s for s in self.fit if s not in blocked])
        if target is None:
            return
        # Every server of this stage sees the same improvement at about the same time; if all of them
        # moved, the swarm would overshoot and oscillate. One of them, elected by this round (the wall
        # clock's rebalancing period, the same on every node), moves; the next round sees the result. Peers
        # behind NAT are not candidates: they serve stage 0 only, and would hold its moves for their rounds.
        mover = mover_of_round(stage_server_ids(records, here_stage, dialable=True) | {me}, self._round())
        if mover != me:
            logger.debug("stage %d would be better served; this round's move is %s's", target, mover)
            return
        logger.info("moving from stage %d to stage %d (loads %s)", here_stage, target, stage_loads(records, n))
        self.presence.announce(self.host, "offline")
        # Counted on the target while it downloads (for swarm.expiry_s: nothing refreshes it meanwhile), so peers
        # deciding then see the stage covered and do not follow (two movers at once overshoot, one moves back).
        self.presence.announce(self.host, "joining", stage=target)
        self.host.stop(save=True)
        if not self.host_stage(target, fail=False, records=records):
            self.presence.announce(self.host, "offline", stage=target)
            # Not tried again while the same peers serve it: each try stops training for a checkpoint.
            self._undownloadable[target] = stage_server_ids(records, target)
            self._told.discard(target)
            logger.warning("stage %d could not be downloaded from its servers; back to stage %d, and no move to "
                           "stage %d until its servers change", target, here_stage, target)
            if self.ctx.stop.is_set() or not self.host_stage(here_stage, records=records):
                return  # (from the checkpoint just written)
        self.host.start()
        self.presence.announce(self.host, "online")
