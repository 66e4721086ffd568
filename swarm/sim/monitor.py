"""What `node sim` reads from a running local swarm: every node incarnation's /health, summed up.

:class:`PipelineMonitor` keeps the losses, pipeline counters and replica-sync counters of each
(node, pid) and turns them into the summary `node sim --json` prints; :func:`progress_line` is the
one-line view of the swarm it prints every 10 s.
"""

from __future__ import annotations

from typing import Any

from swarm.sim.swarm import LocalSwarm


class PipelineMonitor:
    """Collects training losses, pipeline counters and replica-sync counters of every node incarnation
    from /health.

    Counters restart with a process, so each (node, pid) is kept apart and summed at the end; losses
    (the last stage's in a pipeline, every replica's with one stage) are merged by wall-clock time.
    """

    COUNTERS = ("microbatches_ok", "microbatches_dropped", "microbatches_retried", "tokens_ok", "served",
                "refused", "bytes_forward_sent", "bytes_backward_sent", "dense_forward_sent",
                "dense_backward_sent")
    OUTER_COUNTERS = ("rounds_started", "rounds_committed", "rounds_alone", "rounds_skipped", "rounds_missed",
                      "resyncs", "bytes_sent", "bytes_received", "parts_rejected", "inner_steps", "moments_merged")

    def __init__(self) -> None:
        self.latest: dict[tuple[int, int], dict[str, Any]] = {}  # (node, pid) → last pipeline stats
        self.outer: dict[tuple[int, int], dict[str, Any]] = {}  # (node, pid) → last replica-sync stats
        self.losses: dict[tuple[int, float], float] = {}  # (node, unix time) → loss
        self.val_losses: dict[tuple[int, float], float] = {}  # (stage-0 node, unix time) → validation loss
        self.last_loss_t: dict[tuple[int, int], float] = {}  # (node, pid) → time of its last loss seen
        self.trained: dict[tuple[int, int], int] = {}  # (node, pid) → tokens of its local steps (S = 1)
        self.devices: dict[tuple[int, int], dict[str, Any]] = {}  # (node, pid) → its device and memory
        self.completed: set[float] = set()  # unix times at which a stage-0 driver completed a microbatch
        self.seen = False
        self.listeners: list = []  # also called with (node index, /health) for each health read

    def poll(self, swarm: LocalSwarm) -> list[dict[str, Any] | None]:
        """Read every node's /health into the monitor; returns them (None for nodes that are down)."""
        healths = []
        for node in swarm.nodes:
            pid = node.proc.pid if node.proc is not None else None
            # Only the losses this incarnation scored since the last poll: small replies (with link
            # emulation the polls cross the nodes' shaped links too).
            health = swarm.health(node.index, since=self.last_loss_t.get((node.index, pid)))
            if health is not None and pid is not None:
                self.observe(node.index, pid, health)
                for listener in self.listeners:
                    listener(node.index, health)
            healths.append(health)
        return healths

    def observe(self, index: int, pid: int, health: dict[str, Any] | None) -> None:
        """One /health of node ``index`` while it runs as process ``pid`` (one incarnation)."""
        if not health:
            return
        if "outer" in health:
            self.seen = True
            self.outer[(index, pid)] = {**health["outer"], "stage": health.get("stage")}
        if isinstance(health.get("device"), dict):
            self.devices[(index, pid)] = health["device"]
        if "train" in health:
            self.trained[(index, pid)] = int(health["train"].get("tokens", 0))
        for source in ("pipeline", "train"):
            if source not in health:
                continue
            self.seen = True
            if source == "pipeline":
                self.latest[(index, pid)] = {**health["pipeline"], "stage": health.get("stage")}
                self.completed.update(health["pipeline"].get("completed_at", []))
            for t, loss in health[source].get("recent_losses", []):
                self.losses[(index, t)] = loss
                self.last_loss_t[(index, pid)] = max(t, self.last_loss_t.get((index, pid), 0.0))
            for t, loss, *_ in health[source].get("val_losses", []):
                self.val_losses[(index, t)] = loss

    def summary(self, end_time: float, start_time: float | None = None) -> dict[str, Any]:
        """The run's totals; ``start_time`` (unix) adds ``loss_first_s``, where the loss curve's 0 lies in the run."""
        out = self._loss_summary()
        if start_time is not None and self.losses:
            out["loss_first_s"] = round(min(t for (_, t) in self.losses) - start_time, 1)
        if self.val_losses:  # the swarm's validation measurements (stage-0 drivers, agreed weights)
            curve = sorted((t, loss) for (_, t), loss in self.val_losses.items())
            out.update(val_loss_start=curve[0][1], val_loss_end=curve[-1][1], val_measurements=len(curve),
                       val_loss_curve=[[round(t - (start_time or curve[0][0]), 1), v] for t, v in curve])
        if self.latest:
            out.update(self._pipeline_summary(end_time))
            out.update(self._progress_gap(end_time, start_time))
        elif self.trained:
            out.update(self._replica_summary(end_time))
        if self.devices:
            peaks = [int(d.get("peak_bytes", 0)) for d in self.devices.values()]
            out["devices"] = sorted({str(d.get("device")) for d in self.devices.values()})
            out["peak_memory_bytes_max"] = max(peaks)
        if self.outer:
            out.update(self._outer_summary())
        return out

    def _replica_summary(self, end_time: float) -> dict[str, Any]:
        """One stage: every replica trains the whole model; tokens/s over the swarm since the first loss."""
        tokens = sum(self.trained.values())
        first = min((t for (_, t) in self.losses), default=None)
        elapsed = end_time - first if first is not None else 0.0
        return {"tokens": tokens, "tokens_per_s": round(tokens / elapsed, 2) if elapsed > 0 else 0.0}

    def _loss_summary(self) -> dict[str, Any]:
        curve = sorted((t, loss) for (_, t), loss in self.losses.items())
        window = max(5, len(curve) // 10)
        first, last = curve[:window], curve[-window:]
        buckets: dict[int, list[float]] = {}
        for t, loss in curve:
            buckets.setdefault(int((t - curve[0][0]) // 10), []).append(loss)
        return {
            "loss_start": round(sum(v for _, v in first) / len(first), 4) if curve else None,
            "loss_end": round(sum(v for _, v in last) / len(last), 4) if curve else None,
            "loss_window": window if curve else 0,
            "losses_scored": len(curve),
            "loss_curve_10s": [[10 * b, round(sum(v) / len(v), 4)] for b, v in sorted(buckets.items())],
        }

    def _pipeline_summary(self, end_time: float) -> dict[str, Any]:
        totals = {name: sum(int(p.get(name, 0)) for p in self.latest.values()) for name in self.COUNTERS}
        curve = sorted(t for (_, t) in self.losses)
        sent = totals["bytes_forward_sent"] + totals["bytes_backward_sent"]
        dense = totals["dense_forward_sent"] + totals["dense_backward_sent"]
        elapsed = end_time - curve[0] if curve else 0.0
        served: dict[int, int] = {}
        driven: dict[int, int] = {}
        for (index, _), p in self.latest.items():
            served[index] = served.get(index, 0) + int(p.get("served", 0))
            driven[index] = driven.get(index, 0) + int(p.get("microbatches_ok", 0))
        return {
            "tokens": totals["tokens_ok"],
            "tokens_per_s": round(totals["tokens_ok"] / elapsed, 2) if elapsed > 0 else 0.0,
            "bytes_forward": totals["bytes_forward_sent"],
            "bytes_backward": totals["bytes_backward_sent"],
            "bytes_per_token": round(sent / totals["tokens_ok"], 2) if totals["tokens_ok"] else None,
            "dense_bf16_bytes": dense,
            "wire_compression_ratio": round(dense / sent, 2) if sent else None,
            "microbatches_ok": totals["microbatches_ok"],
            "microbatches_dropped": totals["microbatches_dropped"],
            "microbatches_retried": totals["microbatches_retried"],
            "dropped_by_reason": self._dropped_by_reason(totals["microbatches_dropped"]),
            "frames_refused": totals["refused"],
            "refused_by_code": self._summed("refused_"),
            "served_per_node": {str(i): n for i, n in sorted(served.items())},
            "driven_per_node": {str(i): n for i, n in sorted(driven.items())},
        }

    def _progress_gap(self, end_time: float, start_time: float | None) -> dict[str, Any]:
        """The longest time no stage-0 driver completed a microbatch, from the first completion to the end of
        the run (``max_progress_gap_s``), and when it began (seconds into the run, with ``start_time``)."""
        times = sorted(self.completed)
        if not times:
            return {"max_progress_gap_s": None}
        gaps = [(b - a, a) for a, b in zip(times, [*times[1:], max(end_time, times[-1])], strict=True)]
        gap, at = max(gaps)
        return {"max_progress_gap_s": round(gap, 2),
                "max_progress_gap_at_s": round(at - start_time, 1) if start_time is not None else None}

    def _summed(self, prefix: str) -> dict[str, int]:
        """The nodes' pipeline counters named ``prefix + X``, summed per X."""
        out: dict[str, int] = {}
        for p in self.latest.values():
            for key, value in p.items():
                if key.startswith(prefix) and isinstance(value, int | float):
                    out[key[len(prefix):]] = out.get(key[len(prefix):], 0) + int(value)
        return dict(sorted(out.items()))

    def _dropped_by_reason(self, dropped: int) -> dict[str, int]:
        """Why stage 0 dropped its microbatches (swarm.dataplane.DROP_REASONS); what no reason covers, should a
        node's counters lag its total, is ``unattributed``."""
        reasons = self._summed("drop_reason_")
        if dropped > sum(reasons.values()):
            reasons["unattributed"] = dropped - sum(reasons.values())
        return reasons

    def _outer_summary(self) -> dict[str, Any]:
        totals = {name: sum(int(o.get(name, 0)) for o in self.outer.values()) for name in self.OUTER_COUNTERS}
        per_stage: dict[str, int] = {}
        skipped: dict[str, int] = {}
        per_node: dict[str, int] = {}
        moments: dict[str, int] = {}  # diloco.first_moment: means of the first moment merged, per node
        for (index, _), o in self.outer.items():
            moments[str(index)] = moments.get(str(index), 0) + int(o.get("moments_merged", 0))
            if o.get("stage") is not None:
                per_stage[str(o["stage"])] = per_stage.get(str(o["stage"]), 0) + int(o.get("rounds_committed", 0))
                skipped[str(o["stage"])] = skipped.get(str(o["stage"]), 0) + int(o.get("rounds_skipped", 0))
            per_node[str(index)] = per_node.get(str(index), 0) + int(o.get("rounds_committed", 0))
        params = max((int(o.get("params", 0)) for o in self.outer.values()), default=0)
        steps = totals["inner_steps"]
        return {
            "outer_rounds_committed": totals["rounds_committed"],
            "outer_rounds_alone": totals["rounds_alone"],  # committed with only the replica's own part
            "outer_rounds_skipped": totals["rounds_skipped"],
            "outer_rounds_missed": totals["rounds_missed"],
            "outer_rounds_committed_per_stage": dict(sorted(per_stage.items())),
            "rounds_committed_per_stage": dict(sorted(per_stage.items())),  # the scale report's name for it
            "rounds_skipped_per_stage": dict(sorted(skipped.items())),
            "outer_rounds_committed_per_node": dict(sorted(per_node.items())),
            "outer_parts_rejected": totals["parts_rejected"],
            "outer_moments_merged_per_node": dict(sorted(moments.items())),
            "resyncs": totals["resyncs"],
            "inner_steps_total": steps,
            "bytes_sent_total": totals["bytes_sent"],
            # Exchange bytes per parameter of a stage per inner step, summed over replicas. Data parallel
            # with fp32 gradients sends 4 bytes per parameter per step from every replica.
            "bytes_per_param_per_step": round(totals["bytes_sent"] / (params * steps), 6) if params and steps else None,
        }


def progress_line(healths: list[dict[str, Any] | None]) -> str:
    """``0:online/s0/p12/ok40/loss5.123  1:down …``: each node's state, stage and progress; on stage 0
    the microbatches it drove, and the last loss a pipeline node scored."""
    rows = []
    for i, h in enumerate(healths):
        if not h:
            rows.append(f"{i}:down")
            continue
        row = f"{i}:{h['state']}/s{h['stage']}/p{h['progress']}"
        if "pipeline" in h:
            losses = h["pipeline"].get("recent_losses") or []
            row += f"/ok{h['pipeline'].get('microbatches_ok', 0)}" if h["stage"] == 0 else ""
            row += f"/loss{losses[-1][1]:.3f}" if losses else ""
        rows.append(row)
    return "  ".join(rows)
