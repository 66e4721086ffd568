"""Loading a stage from its other replicas: the whole state, or the consensus from several at once.

:class:`StageDownloader` reads the stage's ONLINE servers from the DHT and fills a
:class:`node.stage_store.StageStore` with what they serve (swarm/state_transfer.py: chunked, SHA-256
verified). With replica sync on it first takes the stage's agreed outer state from up to 8 replicas at
once (resuming from another when one leaves) and starts the local weights from its global copies;
otherwise, or when that fails, the whole state from the most advanced replica (up to 3 tried). A
resumed checkpoint that is behind the stage's outer rounds is caught up the same way (docs/node.md,
"Checkpoints and crashes").
"""

from __future__ import annotations

import logging
import time

from node.context import NodeContext
from node.stage_store import StageStore
from protocol.messages import StageRecord
from swarm.state_transfer import StateTransferError, download_from_replicas, download_stage_state

logger = logging.getLogger(__name__)


class StageDownloader:
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    def _peers(self, stage: int) -> list[StageRecord]:
        ctx = self.ctx
        records, _ = ctx.dht.get_stage_records(ctx.run_id, ctx.cfg.pipeline.num_stages)
        return [r for r in records.get(stage, []) if r.state == "online" and r.peer_id != ctx.peer_id]

    def download_into(self, store: StageStore, prefer: list[str] | None = None) -> bool:
        """Load ``store``'s stage from a peer (the most advanced first; ``prefer``: only those, if any
        serve). False when no peer could give it (the store keeps what it held)."""
        peers = sorted(self._peers(store.stage), key=lambda r: -r.progress)
        if prefer:
            peers = [r for r in peers if r.peer_id in prefer] or peers
        if store.outer is not None and peers and self._consensus(store, peers):
            return True
        for record in peers[:3]:
            if self.ctx.stop.is_set():
                return False
            if self._whole_state(store, record):
                return True
        logger.info("no peer serves stage %d: starting it from the seeded initialisation", store.stage)
        return False

    def _whole_state(self, store: StageStore, record: StageRecord) -> bool:
        from hivemind.p2p import PeerID

        ctx, started = self.ctx, time.monotonic()
        try:
            snap = ctx.services.run(download_stage_state(
                ctx.services.p2p, PeerID.from_base58(record.peer_id), ctx.run_id, store.stage, ctx.cfg.wire.limits(),
                timeout=100), timeout=120)
            store.check_compatible(snap)
        except (StateTransferError, TimeoutError, ValueError) as exc:
            ctx.metrics.count_state_download("failed")
            logger.warning("cannot download stage %d from %s: %s", store.stage, record.peer_id, exc)
            return False
        store.load(snap)
        self._count(snap, started)
        logger.info("loaded stage %d (step %d) from %s", store.stage, snap.step, record.peer_id)
        return True

    def _consensus(self, store: StageStore, peers: list[StageRecord]) -> bool:
        """The stage's agreed outer state from several replicas; False: use a full download."""
        from hivemind.p2p import PeerID

        ctx, started = self.ctx, time.monotonic()
        ids = [PeerID.from_base58(r.peer_id) for r in peers[:8]]
        try:
            snap, served = ctx.services.run(download_from_replicas(
                ctx.services.p2p, ids, ctx.run_id, store.stage, ctx.cfg.wire.limits(), timeout=100), timeout=120)
            store.load_consensus(snap)
        except (StateTransferError, TimeoutError, ValueError) as exc:
            ctx.metrics.count_state_download("failed")
            logger.warning("cannot download stage %d's consensus state (%s); trying a full download", store.stage, exc)
            return False
        store.progress = max(r.progress for r in peers)  # the schedule's position for warm-up and decay
        self._count(snap, started)
        logger.info("loaded stage %d's consensus state from %d peer(s) (chunks: %s)", store.stage, len(served), served)
        return True

    def _count(self, snap, started: float) -> None:
        metrics = self.ctx.metrics
        metrics.count_state_download("ok")
        metrics.state_download_seconds.observe(time.monotonic() - started)
        metrics.state_download_bytes_total.inc(sum(t.numel() * t.element_size() for t in snap.tensors.values()))

    def catch_up_resumed(self, store: StageStore) -> None:
        """Resumed from a checkpoint: if the stage's other replicas applied outer rounds since it was
        written, take the stage's consensus state instead of its stale global copies. The inner
        optimizer state and the progress stay the checkpoint's (the progress never goes back). With no
        records to compare yet, ReplicaSync compares at its first view of the stage."""
        from node.replica_sync import rounds_behind

        sync = self.ctx.services.sync
        if store.outer is None or sync is None:
            return
        behind = rounds_behind(store.outer.history(), self._peers(store.stage))
        if behind is None:
            return
        logger.warning("stage %d: the checkpoint of step %d is behind the stage (%s); downloading the stage's state",
                       store.stage, store.progress, behind)
        sync.stats["resyncs"] += 1
        progress, history = store.progress, store.outer.history()
        self.download_into(store)
        if store.outer.history() != history:  # downloaded: the schedule position comes from the records
            store.resumed_schedule = None
        with store.lock:
            store.progress = max(store.progress, progress)
