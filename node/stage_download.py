"""Loading a stage from its other replicas: the whole state, or the consensus from several at once.

:class:`StageDownloader` reads the stage's ONLINE servers from the DHT and fills a
:class:`node.stage_store.StageStore` with what they serve (swarm/state_transfer.py: chunked, SHA-256
verified). With replica sync on it first takes the stage's agreed outer state from up to 8 replicas at
once (resuming from another when one leaves) and starts the local weights from its global copies;
otherwise, or when that fails, the whole state from the most advanced replica (up to 3 tried). A
resumed checkpoint that is behind the stage's outer rounds is caught up the same way (docs/node.md,
"Checkpoints and crashes").

Made for home links (docs/node.md, "Downloading a stage"): an attempt is cut only when it stalls for
``swarm.download_stall_s`` or trickles past a deadline sized from the state (swarm/transfer_pace.py);
its progress (bytes, rate, ETA) goes to the log, /health and the status line (``NodeMetrics.download``);
its verified chunks are kept under the stage's checkpoint directory (swarm/chunk_cache.py), so a
retried or restarted download fetches only what it lacks, and removed once the state is loaded.

:meth:`StageDownloader.load_from_swarm` loads a stage the node has no checkpoint of. It returns False
only when no peer serves the stage: then, and only then, the node starts it from the seeded
initialisation. Servers of an earlier read (``seen``: the one the stage was claimed on) count, and a read
that finds none is confirmed by a second one ``swarm.vacant_confirm_s`` later (unless the node founds the
run: nobody else can serve it). While peers serve it, failed rounds are retried with exponential back-off
(:class:`RetryPolicy`) and then :class:`StageUnavailable` names the peers and their errors (the
daemon exits with it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from node.context import NodeContext
from node.stage_store import StageStore
from protocol.messages import StageRecord
from swarm.chunk_cache import ChunkCache
from swarm.state_transfer import StateTransferError, download_from_replicas, download_stage_state
from swarm.transfer_pace import MBIT, TransferPace

logger = logging.getLogger(__name__)

DOWNLOAD_DIR = "download"  # under the stage's checkpoint directory: one folder of kept chunks per part


class StageUnavailable(RuntimeError):
    """Peers serve the stage, but its state could not be downloaded from them (or the node stopped)."""


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` rounds of downloads; after the n-th failure wait ``first_s`` × 2ⁿ⁻¹, at most ``max_s``."""

    attempts: int
    first_s: float
    max_s: float = 300.0

    @classmethod
    def from_config(cls, swarm: Any) -> RetryPolicy:
        return cls(attempts=swarm.download_attempts, first_s=swarm.download_backoff_s)

    def delay_s(self, failures: int) -> float:
        return min(self.max_s, self.first_s * 2.0 ** (failures - 1))


class StageDownloader:
    def __init__(self, ctx: NodeContext, wait: Callable[[float], bool] | None = None) -> None:
        """``wait(s)``: the back-off between attempts; True when the node stops meanwhile."""
        self.ctx = ctx
        self.wait = wait if wait is not None else ctx.stop.wait
        self.errors: dict[str, str] = {}  # peer id (or "consensus") → its last download error

    def _peers(self, stage: int) -> list[StageRecord]:
        ctx = self.ctx
        records, _ = ctx.dht.get_stage_records(ctx.run_id, ctx.cfg.pipeline.num_stages)
        return self._donors(stage, records.get(stage, []))

    def _donors(self, stage: int, records: Sequence[StageRecord]) -> list[StageRecord]:
        """The peers of ``records`` that can give ``stage``: online, not this node, dialable first."""
        online = [r for r in records if r.stage == stage and r.state == "online" and r.peer_id != self.ctx.peer_id]
        # Peers behind NAT are no donors (nobody can dial them); only when they alone serve the stage are
        # they tried, so that the stage is never started seeded while peers serve it.
        return [r for r in online if r.reachable != "private"] or online

    def load_from_swarm(self, store: StageStore, seen: Sequence[StageRecord] = (), confirm_vacant: bool = True) -> bool:
        """Load a stage this node holds no checkpoint of from the peers serving it, retrying with back-off.
        False: no peer serves it (start it from the seeded initialisation). Raises :class:`StageUnavailable`
        when peers serve it and every attempt failed, or when the node stops first. ``seen``: the stage's
        records from an earlier DHT read (the one the stage was claimed on): servers in it are tried when
        this read finds none, so two reads that disagree never make a served stage start seeded.
        ``confirm_vacant``: read once more before a seeded start (False for the run's founder)."""
        policy, stage, started = RetryPolicy.from_config(self.ctx.cfg.swarm), store.stage, time.monotonic()
        known = self._donors(stage, seen)
        for attempt in range(1, policy.attempts + 1):
            peers = self._peers(stage) or known  # servers seen once are tried again if a DHT read finds none
            if not peers and confirm_vacant and (confirm_s := self.ctx.cfg.swarm.vacant_confirm_s) > 0:
                logger.info("stage %d: no server found; reading the DHT again in %.3g s to confirm", stage, confirm_s)
                if self.wait(confirm_s) or self.ctx.stop.is_set():
                    raise StageUnavailable(f"stopped while looking for the servers of stage {stage}")
                peers = self._peers(stage)
            if not peers:
                logger.info("no peer serves stage %d: starting it from the seeded initialisation", stage)
                return False
            known = peers
            logger.info("stage %d: downloading its state from %d peer(s) (attempt %d of %d)", stage, len(peers),
                        attempt, policy.attempts)
            if self.download_into(store, peers=peers):
                return True
            if attempt < policy.attempts and not self.ctx.stop.is_set():
                delay = policy.delay_s(attempt)
                logger.warning("stage %d: download attempt %d of %d failed; trying again in %.3g s (verified "
                               "chunks are kept)", stage, attempt, policy.attempts, delay)
                self.wait(delay)
            if self.ctx.stop.is_set():
                raise StageUnavailable(f"stopped while downloading stage {stage}")
        raise StageUnavailable(self._give_up(store, known, policy.attempts, time.monotonic() - started))

    def _give_up(self, store: StageStore, peers: list[StageRecord], attempts: int, took_s: float) -> str:
        ids = ", ".join(r.peer_id for r in peers)
        errors = "; ".join(dict.fromkeys(self.errors.values())) or "no error recorded"
        if any("protocols not supported" in e for e in self.errors.values()):
            errors += " (they offer this node no state handler: a swarm key it lacks? docs/security.md)"
        return (f"stage {store.stage} is served by {len(peers)} peer(s) ({ids}), but its state could not be "
                f"downloaded in {attempts} attempt(s) over {took_s:.0f} s: {errors}. Not starting it from the "
                "seeded initialisation: that would serve untrained weights to a swarm that trains this stage. "
                f"Check this node's link to those peers and start it again: the verified chunks kept in "
                f"{store.checkpoint_dir / DOWNLOAD_DIR} are not fetched again (swarm.download_attempts, "
                "swarm.download_stall_s; docs/node.md, 'Downloading a stage').")

    def download_into(self, store: StageStore, prefer: list[str] | None = None,
                      peers: list[StageRecord] | None = None) -> bool:
        """One round: load ``store``'s stage from its servers (``peers``, default: read from the DHT; the
        most advanced first; ``prefer``: only those, if any serve). False when none could give it (the
        store keeps what it held; ``errors`` says why)."""
        peers = sorted(self._peers(store.stage) if peers is None else peers, key=lambda r: -r.progress)
        if prefer:
            peers = [r for r in peers if r.peer_id in prefer] or peers
        if store.outer is not None and peers and self._consensus(store, peers):
            return True
        for record in peers[:3]:
            if self.ctx.stop.is_set():
                return False
            if self._whole_state(store, record):
                return True
        if not peers:
            logger.info("stage %d: no other peer serves it; nothing to download", store.stage)
        return False

    def _pace(self) -> TransferPace:
        sw = self.ctx.cfg.swarm
        return TransferPace(stall_s=sw.download_stall_s, floor_bytes_s=sw.download_floor_mbit * MBIT,
                            on_progress=self.ctx.metrics.download.update)

    def _run(self, coro) -> Any:
        """Run a download on the P2P loop; it is cancelled when the node stops."""
        future = asyncio.run_coroutine_threadsafe(coro, self.ctx.services.loop)
        try:
            while not concurrent.futures.wait([future], timeout=0.5).done:
                if self.ctx.stop.is_set():
                    future.cancel()
                    raise StateTransferError("the node is stopping", peer="", reason="stopped")
            return future.result()
        except concurrent.futures.CancelledError:
            raise StateTransferError("the download was cancelled", peer="", reason="stopped") from None
        finally:
            self.ctx.metrics.download.finish()

    def _whole_state(self, store: StageStore, record: StageRecord) -> bool:
        from hivemind.p2p import PeerID

        ctx, started = self.ctx, time.monotonic()
        cache = ChunkCache(store.checkpoint_dir / DOWNLOAD_DIR / "all")
        try:
            snap = self._run(download_stage_state(
                ctx.services.p2p, PeerID.from_base58(record.peer_id), ctx.run_id, store.stage, ctx.cfg.wire.limits(),
                timeout=None, pace=self._pace(), cache=cache))
            store.check_compatible(snap)
        except (StateTransferError, ValueError) as exc:
            self._failed(record.peer_id, f"cannot download stage {store.stage} from {record.peer_id}", exc)
            return False
        store.load(snap)
        self._loaded(store, started)
        logger.info("loaded stage %d (step %d) from %s", store.stage, snap.step, record.peer_id)
        return True

    def _consensus(self, store: StageStore, peers: list[StageRecord]) -> bool:
        """The stage's agreed outer state from several replicas; False: use a full download."""
        from hivemind.p2p import PeerID

        ctx, started = self.ctx, time.monotonic()
        ids = [PeerID.from_base58(r.peer_id) for r in peers[:8]]
        cache = ChunkCache(store.checkpoint_dir / DOWNLOAD_DIR / "consensus")
        try:
            snap, served = self._run(download_from_replicas(
                ctx.services.p2p, ids, ctx.run_id, store.stage, ctx.cfg.wire.limits(), timeout=None,
                pace=self._pace(), cache=cache))
            store.load_consensus(snap)
        except (StateTransferError, ValueError) as exc:
            self._failed("consensus", f"cannot download stage {store.stage}'s consensus state; trying a full "
                         "download", exc)
            return False
        store.progress = max(r.progress for r in peers)  # the schedule's position for warm-up and decay
        self._loaded(store, started)
        logger.info("loaded stage %d's consensus state from %d peer(s) (chunks: %s)", store.stage, len(served), served)
        return True

    def _failed(self, key: str, what: str, exc: Exception) -> None:
        self.ctx.metrics.count_state_download("failed")
        self.errors[key] = str(exc)
        logger.warning("%s: %s", what, exc)

    def _loaded(self, store: StageStore, started: float) -> None:
        metrics = self.ctx.metrics
        metrics.count_state_download("ok")
        metrics.state_download_seconds.observe(time.monotonic() - started)
        shutil.rmtree(store.checkpoint_dir / DOWNLOAD_DIR, ignore_errors=True)  # the kept chunks served their turn

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
