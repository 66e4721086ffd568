"""The swarm pipeline on localhost: subspace boundaries vs dense ones vs one process, at equal tokens.

Three runs of the same model and data (``configs/swarm/pipeline-local.toml``: tiny, d=256, 3 stages,
byte vocabulary, the embedded stdlib corpus, batch 8 × 128 tokens a microbatch):

- ``swarm subspace``  real ``node start`` processes on 127.0.0.1, boundaries of k=8 bf16 coefficients
- ``swarm dense``     the same swarm with ``model.subspace_rank="none"``: d=256 values a token cross
                      each boundary; ``model.fixed_table`` is left at its default, so this dense model
                      has no frozen token table (it is the naive dense baseline, not the fair one)
- ``train-local``     one process, one torch thread, the subspace model, the same config (so the same
                      lr schedule and the same data windows), for as many optimizer steps as the
                      subspace swarm completed microbatches per stage replica

Losses are compared per stage replica: every stage replica steps once per microbatch it carries, so
the i-th loss scored by the last stage (in time order, over all its replicas) sits at about
(i+1) · batch_size · seq_len / R tokens of one replica's trajectory, which is what train-local's
step i+1 has seen. R is the number of live replicas per stage, averaged over the stages and over
the polls once losses flow (nodes / stages when the swarm stays whole); stages are not always
balanced, so the busiest stage's replicas have seen more than that and the idlest fewer
(``replicas_per_stage_mean`` in the JSON). Throughput and bytes are the swarm totals.

    python bench/pipeline.py --quick      # 6 nodes, 90 s per swarm variant (about 5 minutes)
    python bench/pipeline.py              # 6 nodes, 180 s per swarm variant

Prints one JSON object as its last line and writes a PNG of loss vs tokens, tokens/s and bytes/token.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.config import load_config
from node.train_local import train_local
from swarm.sim.monitor import PipelineMonitor
from swarm.sim.swarm import LocalSwarm

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/swarm/pipeline-local.toml"
SMOOTH = 10  # losses in the trailing moving average
POLL_S = 2.0  # /health keeps the last 512 losses; a stage scores far fewer than that in 2 s
REPORT_S = 10.0
DENSE = 'model.subspace_rank="none"'
SUMMARY_KEYS = ("tokens", "tokens_per_s", "bytes_per_token", "wire_compression_ratio", "bytes_forward",
                "bytes_backward", "loss_start", "loss_end", "loss_window", "losses_scored", "microbatches_ok",
                "microbatches_dropped", "microbatches_retried", "frames_refused")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_at(curve: dict, tokens: float | None) -> float | None:
    xs, ys = curve["tokens_per_replica"], curve["smoothed"]
    if tokens is None or not xs or not xs[0] <= tokens <= xs[-1]:
        return None
    return round(float(np.interp(tokens, xs, ys)), 4)


def progress_line(label: str, elapsed: float, duration: float, healths: list,
                  monitor: PipelineMonitor) -> str:
    up = sum(1 for h in healths if h)
    pipes = [h["pipeline"] for h in healths if h and "pipeline" in h]
    ok = sum(int(p.get("microbatches_ok", 0)) for p in pipes)
    dropped = sum(int(p.get("microbatches_dropped", 0)) for p in pipes)
    last = max(monitor.losses.items(), key=lambda kv: kv[0][1])[1] if monitor.losses else None
    stages = "".join("-" if not h else "?" if h.get("stage") is None else str(h["stage"]) for h in healths)
    loss = f", last loss {last:.3f}" if last is not None else ""
    return (f"[{label} {elapsed:5.0f}/{duration:.0f} s] up {up}/{len(healths)} (stages {stages}), "
            f"microbatches ok {ok} dropped {dropped}, losses {len(monitor.losses)}{loss}")


def run_swarm(label: str, nodes: int, duration: float, overrides: list[str], tokens_per_mb: int,
              num_stages: int) -> dict:
    """Run one swarm variant for ``duration`` seconds (startup included, as in ``node sim``)."""
    log(f"[{label}] starting {nodes} nodes for {duration:.0f} s, overrides {overrides or 'none'}")
    monitor = PipelineMonitor()
    start = time.monotonic()
    with LocalSwarm(nodes, str(ROOT / CONFIG), overrides, run_id=f"bench-{label.replace(' ', '-')}") as swarm:
        swarm.start_all()
        next_report = 0.0
        replica_counts: list[list[int]] = []  # per poll once losses flow: live replicas of each stage
        while (elapsed := time.monotonic() - start) < duration:
            healths = monitor.poll(swarm)
            if monitor.losses:
                stages_now = [h.get("stage") for h in healths if h]
                replica_counts.append([stages_now.count(s) for s in range(num_stages)])
            if elapsed >= next_report:
                log(progress_line(label, elapsed, duration, healths, monitor))
                next_report = elapsed + REPORT_S
            time.sleep(max(0.0, POLL_S - (time.monotonic() - start - elapsed)))
        healths = monitor.poll(swarm)
        end_time = time.time()
        ran_s = time.monotonic() - start
        log(progress_line(label, ran_s, duration, healths, monitor) + "; shutting down")
    # Stages need not stay balanced (a joining node takes whatever stage it sees short), so a stage's
    # replicas see more or fewer microbatches than the average; the x axis uses the average over time.
    per_stage = [round(sum(c[s] for c in replica_counts) / len(replica_counts), 2) if replica_counts else None
                 for s in range(num_stages)]
    replicas = sum(per_stage) / num_stages if replica_counts and sum(per_stage) else nodes / num_stages
    losses = [loss for _, loss in sorted((t, loss) for (_, t), loss in monitor.losses.items())]
    row = {"label": label, "overrides": overrides, "nodes": nodes,
           "stage_of_node": [h.get("stage") if h else None for h in healths],
           "progress_of_node": [h.get("progress") if h else None for h in healths],
           "replicas_per_stage_mean": per_stage, "replicas_per_stage": round(replicas, 3)}
    summary = monitor.summary(end_time) if monitor.seen else {}
    row.update({key: summary.get(key) for key in SUMMARY_KEYS})
    row["duration_s"] = round(ran_s, 1)
    row["wall_s"] = round(time.monotonic() - start, 1)  # with shutdown
    row["curve"] = {
        "tokens_per_replica": [(i + 1) * tokens_per_mb / replicas for i in range(len(losses))],
        "raw": losses,
        "smoothed": moving_average(losses, SMOOTH),
    }
    log(json.dumps({k: v for k, v in row.items() if k != "curve"}))
    return row


class _StepsReached(Exception):
    pass


def run_train_local(steps: int) -> dict:
    """train-local on the swarm config, stopped after ``steps`` so its lr schedule stays the swarm's."""
    log(f"[train-local] {steps} optimizer steps, one process, one torch thread")
    losses: list[float] = []
    stamps: list[float] = []
    start = time.monotonic()

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        stamps.append(time.perf_counter())
        if step % 50 == 0:
            log(f"[train-local {time.monotonic() - start:5.0f} s] step {step}/{steps} loss {loss:.3f}")
        if step >= steps:
            raise _StepsReached

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / CONFIG, [f"train.checkpoint_dir={json.dumps(tmp)}", "train.resume=false",
                                   "train.threads=1", "train.eval_every=0", "train.log_every=100000"])
        if steps >= cfg.train.steps:
            raise SystemExit(f"{steps} steps would finish {CONFIG}'s whole lr schedule "
                             f"({cfg.train.steps} steps)")
        try:
            train_local(cfg, on_step=on_step)
        except _StepsReached:
            pass
    t = cfg.train
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
    timed = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    row = {
        "label": "train-local",
        "steps": len(losses),
        "tokens": len(losses) * tokens_per_step,
        "tokens_per_s": round((len(stamps) - 1) * tokens_per_step / timed, 2) if timed > 0 else None,
        "loss_start": round(sum(losses[:SMOOTH]) / len(losses[:SMOOTH]), 4) if losses else None,
        "loss_end": round(sum(losses[-SMOOTH:]) / len(losses[-SMOOTH:]), 4) if losses else None,
        "wall_s": round(time.monotonic() - start, 1),
        "curve": {
            "tokens_per_replica": [(i + 1) * tokens_per_step for i in range(len(losses))],
            "raw": losses,
            "smoothed": moving_average(losses, SMOOTH),
        },
    }
    log(json.dumps({k: v for k, v in row.items() if k != "curve"}))
    return row


def plot(rows: list[dict], common: float | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_tps, ax_bytes) = plt.subplots(1, 3, figsize=(13, 4.8),
                                               gridspec_kw={"width_ratios": [2.4, 1, 1]})
    styles = {"swarm subspace": ("-", "C0"), "swarm dense": ("--", "C1"), "train-local": (":", "C2")}
    for row in rows:
        style, color = styles[row["label"]]
        xs = row["curve"]["tokens_per_replica"]
        if not xs:
            continue
        ax.plot(xs, row["curve"]["raw"], color=color, alpha=0.15, lw=0.8)
        at = row.get("loss_at_common_tokens")
        label = row["label"] + (f" ({at:.3f} at {common / 1e3:.0f}k)" if at is not None else "")
        ax.plot(xs, row["curve"]["smoothed"], style, color=color, lw=1.8, label=label)
    if common:
        ax.axvline(common, color="grey", lw=0.8, alpha=0.6)
    ax.set_xlabel("tokens per stage replica (swarm: scored tokens ÷ mean replicas per stage)")
    ax.set_ylabel("training loss (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    names = [r["label"] for r in rows]
    tps = [r.get("tokens_per_s") or 0.0 for r in rows]
    bars = ax_tps.bar(names, tps, color=[styles[n][1] for n in names])
    ax_tps.bar_label(bars, fmt="%.0f", fontsize=8)
    ax_tps.set_ylabel("tokens/s (swarm: all replicas)")
    ax_tps.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax_tps.grid(alpha=0.3, axis="y")

    swarms = [r for r in rows if r["label"].startswith("swarm")]
    bpt = [r.get("bytes_per_token") or 0.0 for r in swarms]
    bars = ax_bytes.bar([r["label"] for r in swarms], bpt, color=[styles[r["label"]][1] for r in swarms])
    ax_bytes.bar_label(bars, fmt="%.0f", fontsize=8)
    if all(v > 0 for v in bpt):
        ax_bytes.set_yscale("log")
    ax_bytes.set_ylabel("boundary bytes sent per token (fwd + bwd)")
    ax_bytes.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax_bytes.grid(alpha=0.3, axis="y", which="both")

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="90 s per swarm variant")
    parser.add_argument("--nodes", type=int, default=6, help="nodes per swarm (default 6: 3 stages × 2)")
    parser.add_argument("--duration", type=float,
                        help="seconds per swarm variant, startup included (90 quick / 180)")
    parser.add_argument("--out",
                        help="PNG path (default docs/img/pipeline-quick.png or bench/out/pipeline.png)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    duration = args.duration or (90.0 if args.quick else 180.0)
    out = Path(args.out or ("docs/img/pipeline-quick.png" if args.quick else "bench/out/pipeline.png"))
    torch.set_num_threads(1)

    t0 = time.time()
    cfg = load_config(ROOT / CONFIG)
    t = cfg.train
    tokens_per_mb = t.batch_size * t.seq_len
    stages = cfg.pipeline.num_stages
    subspace = run_swarm("swarm subspace", args.nodes, duration, [], tokens_per_mb, stages)
    dense = run_swarm("swarm dense", args.nodes, duration, [DENSE], tokens_per_mb, stages)
    per_replica = (subspace["microbatches_ok"] or 0) / subspace["replicas_per_stage"]
    steps = max(SMOOTH, round(per_replica / t.grad_accum))
    local = run_train_local(steps)
    rows = [subspace, dense, local]

    reached = [r["curve"]["tokens_per_replica"][-1] for r in rows if r["curve"]["tokens_per_replica"]]
    common = min(reached) if reached else None
    for row in rows:
        xs = row["curve"]["tokens_per_replica"]
        row["tokens_per_replica_reached"] = xs[-1] if xs else 0
        row["loss_at_common_tokens"] = loss_at(row["curve"], common)
    subspace["model"] = f"subspace k={cfg.model.subspace_rank} of d={cfg.model.d_model}, frozen token table"
    dense["model"] = (f"dense d={cfg.model.d_model} "
                      "(subspace_rank=none, fixed_table default: no frozen token table)")
    local["model"] = subspace["model"] + f", {stages} stages in one process"

    plot(rows, common, out, f"{CONFIG}: {args.nodes} nodes × {duration:.0f} s per swarm; "
                            f"losses smoothed (trailing moving average of {SMOOTH})")

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    summary = {
        "bench": "pipeline",
        "config": CONFIG,
        "nodes": args.nodes,
        "duration_s_per_swarm": duration,
        "tokens_per_microbatch": tokens_per_mb,
        "x_axis": "tokens per stage replica: swarm = (i+1)-th loss scored at the last stage × tokens per "
                  "microbatch ÷ replicas_per_stage (live replicas per stage, mean over stages and polls); "
                  "train-local = step × tokens per step",
        "smoothing": f"trailing moving average over {SMOOTH} losses (microbatches / steps)",
        "common_tokens_per_replica": common,
        "loss_at_common_tokens": {r["label"]: r["loss_at_common_tokens"] for r in rows},
        "tokens_per_s_subspace_over_dense": ratio(subspace["tokens_per_s"], dense["tokens_per_s"]),
        "bytes_per_token_dense_over_subspace": ratio(dense["bytes_per_token"], subspace["bytes_per_token"]),
        "dense_variant": "subspace_rank=none, fixed_table at its default (off): naive dense, no frozen table",
        "train_local_steps_rule": "swarm subspace microbatches_ok ÷ replicas_per_stage ÷ grad_accum",
        "rows": [{k: v for k, v in r.items() if k != "curve"} for r in rows],
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads_per_process": 1},
        "command": shlex.join(["python", *sys.argv]),
        "plot": str(out),
        "quick": args.quick,
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
