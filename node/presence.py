"""This node's place in the swarm's records: what it announces and what it reads back.

:class:`SwarmPresence` publishes the node's signed stage record (state, stage, throughput, progress,
tokens/s, loss, the replica schedule's fields) and the run record, reads every stage's records, feeds
the swarm view to the metrics, the pipeline router and the replica schedule, and counts the records the
DHT refused. Built by the daemon (node/daemon.py) once the run is known; the daemon decides *when*
(refresh period, stage moves, shutdown), this file decides *what*.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from node.context import NodeContext
from node.metrics import NodeMetrics
from node.stage_host import StageHost
from node.status_line import RateWindow
from protocol.codecs import CODECS
from protocol.messages import RunRecord, StageRecord
from swarm.access import SwarmAccess

logger = logging.getLogger(__name__)

RECORD_RATE_WINDOW_S = 30.0  # tokens/s announced in the stage record: the rate over this window


def count_rejected(metrics: NodeMetrics, counts: dict[str, int]) -> None:
    """Count records the swarm's reads refused, by reason."""
    for reason, n in counts.items():
        for _ in range(max(0, n)):
            metrics.count_record_rejected(reason)


class SwarmPresence:
    def __init__(self, ctx: NodeContext, access: SwarmAccess, recent_loss: Callable[[], float | None]):
        self.ctx, self.access, self._recent_loss = ctx, access, recent_loss
        self._record_rate = RateWindow(RECORD_RATE_WINDOW_S)
        self._reported: dict[str, int] = {}  # totals of refusals inside the DHT process, already exported
        self.peers_known: int | None = None

    def publish_run(self, record: RunRecord) -> None:
        self.ctx.dht.store_run_record(record, self.ctx.cfg.swarm.record_expiry_s)

    def announce(self, host: StageHost, state: str, linger: bool = False, stage: int | None = None) -> None:
        """Publish this node's stage record; a failed store is counted and retried at the next refresh.
        ``linger``: an "offline" record that nothing refreshes (the node stops) says "left on purpose" for
        longer; a stage move's "offline" record need only replace this node's record there. ``stage``: a
        stage this node is moving to (``host`` still serves another), announced with its throughput only:
        no schedule position, progress or measurement of the stage it leaves."""
        ctx, sync = self.ctx, self.ctx.services.sync
        moving = stage is not None and stage != host.stage
        record = StageRecord(
            peer_id=ctx.peer_id, run_id=ctx.run_id, stage=host.stage if stage is None else stage,
            num_stages=ctx.cfg.pipeline.num_stages, state=state, throughput=float(host.throughput),
            progress=0 if moving else host.store.progress, codecs=sorted(CODECS), timestamp=time.time(),
            addrs=ctx.dht.visible_maddrs()[:8], **(sync.record_fields() if sync is not None and not moving else {}),
            tokens_per_s=round(max(0.0, self._record_rate.update(ctx.metrics.totals()["tokens"])), 3),
            loss=round(self._recent_loss() or 0.0, 5), access=self.access.proof(ctx.run_id, ctx.peer_id),
            reachable=ctx.services.reachable(), **({} if moving else self._val_loss_fields(host)),
        )
        try:
            expiry = ctx.cfg.swarm.record_expiry_s
            if state == "offline" and linger:
                expiry = max(3 * expiry, 60.0)
            stored = ctx.dht.store_stage_record(record, expiry)
        except Exception as exc:  # counted by time_dht; retried at the next refresh
            logger.warning("cannot publish this node's record: %s", exc)
            return
        if not stored:  # hivemind reports "no peer accepted it" by returning False
            ctx.metrics.dht_failures_total.labels(op="store").inc()

    @staticmethod
    def _val_loss_fields(host: StageHost) -> dict[str, float]:
        """This node's latest validation measurement, for its record (1.4)."""
        latest = host.latest_val_loss()
        return {} if latest is None else {"val_loss": round(latest[1], 5), "val_loss_at": round(latest[0], 3)}

    def read(self) -> dict[int, list[StageRecord]]:
        """Every stage's records (refusals counted), without acting on them."""
        ctx = self.ctx
        records, rejected = ctx.dht.get_stage_records(ctx.run_id, ctx.cfg.pipeline.num_stages)
        count_rejected(ctx.metrics, rejected)
        return records

    def observe(self, host: StageHost) -> dict[int, list[StageRecord]]:
        """Read the swarm and pass the view on: metrics, the pipeline's router, the replica schedule."""
        ctx, metrics = self.ctx, self.ctx.metrics
        records = self.read()
        self._export_dht_refusals()
        serving = {s: [r for r in recs if r.state != "offline"] for s, recs in records.items()}
        everyone = [r for recs in serving.values() for r in recs]
        losses = [r.loss for r in everyone if r.loss > 0]
        measured = [r for r in everyone if r.val_loss > 0]  # the newest measurement is the swarm's figure
        self.peers_known = len({r.peer_id for r in everyone})
        metrics.set_swarm_view(
            peers_known=self.peers_known,
            stage_peers={s: len(recs) for s, recs in serving.items()},
            stage_throughput={s: sum(r.throughput for r in recs) for s, recs in serving.items()},
            tokens_per_second=sum(r.tokens_per_s for r in everyone),
            loss=sum(losses) / len(losses) if losses else math.nan,
            val_loss=max(measured, key=lambda r: r.val_loss_at).val_loss if measured else math.nan,
        )
        metrics.throughput.set(host.throughput)
        if ctx.services.pipeline is not None:
            ctx.services.pipeline.observe(records, host.stage)
        if ctx.services.sync is not None:
            ctx.services.sync.observe(records)
        return records

    def _export_dht_refusals(self) -> None:
        """The DHT process keeps running totals of what its validators refused: export the increase."""
        increase = {}
        for reason, total in self.ctx.dht.rejected_inside_dht().items():
            increase[reason], self._reported[reason] = total - self._reported.get(reason, 0), total
        count_rejected(self.ctx.metrics, increase)
