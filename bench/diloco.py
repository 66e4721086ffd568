"""Data parallel vs DiLoCo vs Streaming DiLoCo (fp32 and 4-bit parts), same tokens (DESIGN §1.2).

M whole-model replicas of the tiny preset (S = 1) train in one process on disjoint shards of the
embedded corpus. Every variant sees the same batches and the same inner schedule (AdamW, warm-up +
cosine); they differ only in how the replicas agree:

- ``data_parallel``    every step, the M gradients are averaged (one model, M× the batch)
- ``diloco``           H inner steps, then one outer step on the whole model (P = 1, τ = 0, α = 0,
                       outer lr 0.7, Nesterov 0.9)
- ``streaming_fp32``   P fragments, fragment p synced every H steps at offset p·H/P, overlap τ = 1,
                       mixing α = 0.5, outer lr 0.4 (swarm/diloco.py)
- ``streaming_e3m0``   the same with every replica's part sent as 4-bit E3M0 (4.125 bits a value)

Bytes are what one replica sends: its gradient (fp32) every step for data parallel, one encoded
copy of its outer-gradient part per sync for the others. ``peak_bytes_per_step`` is the most sent in
any one step. Validation loss is measured on the global (agreed) parameters.

    python bench/diloco.py --quick   # 4 replicas, 240 steps each, H=30, P=3
    python bench/diloco.py           # 4 replicas, 1200 steps each, H=100, P=4

Prints one JSON object as its last line and writes a PNG of the loss curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.config import load_config
from node.data import BatchSampler, load_corpus, validation_batches
from node.engine import StageChain, StageEngine, build_engine
from node.train_local import evaluate
from swarm.diloco import DilocoConfig, InProcessGroup, OuterLoop


class Run:
    """One variant: the replicas are production stage engines (node/engine.py) of the whole model (S = 1),
    all at the same seeded init; the inner step (AdamW, schedule, clipping) is the engine's."""

    def __init__(self, cfg, samplers, val, steps: int, eval_every: int):
        self.cfg, self.samplers, self.val = cfg, samplers, val
        self.steps, self.eval_every = steps, eval_every
        self.tokens_per_step = len(samplers) * cfg.train.batch_size * cfg.train.seq_len
        self.curve: list[tuple[int, float]] = []
        self.train_losses: list[float] = []
        self.bytes_per_step = [0] * (steps + 1)

    def engine(self, grad_accum: int = 1) -> StageEngine:
        cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, grad_accum=grad_accum))
        return build_engine(cfg, 0, "cpu", backward="stash")

    def record(self, step: int, engine: StageEngine) -> None:
        if step % self.eval_every == 0 or step == self.steps:
            self.curve.append((step * self.tokens_per_step, evaluate(StageChain([engine]), self.val)))
            print(f"  step {step}: val {self.curve[-1][1]:.4f}", file=sys.stderr, flush=True)

    def data_parallel(self) -> None:
        """One engine accumulating the M replicas' microbatches: the average of their gradients."""
        engine = self.engine(grad_accum=len(self.samplers))
        numel = sum(p.numel() for p in engine.module.parameters())
        for t in range(1, self.steps + 1):
            losses = [engine.forward_backward_last(sampler.batch(t - 1), None)[0] for sampler in self.samplers]
            self.train_losses.append(sum(losses) / len(losses))
            self.bytes_per_step[t] = 4 * numel  # each replica sends its fp32 gradient once
            self.record(t, engine)

    def diloco(self, settings: DilocoConfig, codec: str, corrupt=None) -> None:
        """Streaming DiLoCo among the replicas (swarm.diloco.InProcessGroup); ``corrupt``: a poisoner."""
        engines = [self.engine() for _ in self.samplers]
        group = InProcessGroup([OuterLoop(dict(e.module.named_parameters()), settings) for e in engines], settings,
                               codec, corrupt=corrupt)
        global_model = self.engine()
        for t in range(1, self.steps + 1):
            losses = [e.forward_backward_last(s.batch(t - 1), None)[0] for e, s in zip(engines, self.samplers, strict=True)]
            self.train_losses.append(sum(losses) / len(losses))
            self.bytes_per_step[t] += group.after_step(t)
            if t % self.eval_every == 0 or t == self.steps:
                self.load_global(global_model, group.loops[0])
                self.record(t, global_model)
        self.rejected = sum(len(r) for r in group.rejected)
        self.group = group

    @staticmethod
    @torch.no_grad()
    def load_global(engine: StageEngine, loop: OuterLoop) -> None:
        params = dict(engine.module.named_parameters())
        for layout, flat in zip(loop.layouts, loop.global_, strict=True):
            for name, value in layout.unflatten(flat).items():
                params[name].copy_(value)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for row in rows:
        tokens, losses = zip(*row["val_curve"], strict=True)
        ax.plot([x / 1e6 for x in tokens], losses, marker="o", ms=3, label=f"{row['label']} ({row['val_loss']:.3f})")
    ax.set_xlabel("tokens, all replicas (M)")
    ax.set_ylabel("validation loss of the global model (nats/byte)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    labels = [r["label"] for r in rows]
    bx.bar(labels, [r["bytes_sent_per_replica"] / 1e6 for r in rows], color="tab:blue")
    bx.set_yscale("log")
    bx.set_ylabel("MB sent per replica (log)")
    bx.tick_params(axis="x", labelrotation=25, labelsize=8)
    for i, r in enumerate(rows):
        bx.annotate(f"{r['bytes_ratio_vs_data_parallel']:.0f}×", (i, r["bytes_sent_per_replica"] / 1e6), ha="center",
                    va="bottom", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="240 steps, H=30, P=3 (the full run: 1200, 100, 4)")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--out", default="bench/out/diloco.png", help="where to write the PNG")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps, H, P = (240, 30, 3) if args.quick else (1200, 100, 4)
    cfg = load_config("local/tiny", [
        "pipeline.num_stages=1", f"train.steps={steps}", f"train.warmup_steps={max(10, steps // 20)}",
        "train.batch_size=4", "train.seq_len=64", "train.seed=0", "data.seed=0",
    ])
    corpus = load_corpus(cfg.data)
    samplers = [BatchSampler(corpus.train, cfg.train.seq_len, cfg.train.batch_size, 0, r, args.replicas)
                for r in range(args.replicas)]
    val = validation_batches(corpus.val, cfg.train.seq_len, 16, 8)
    numel = sum(p.numel() for p in build_engine(cfg, 0).module.parameters())
    variants = [
        ("data_parallel", None, None),
        ("diloco", DilocoConfig(inner_steps=H, fragments=1, overlap=0, alpha=0.0, outer_lr=0.7), "fp32"),
        ("streaming_fp32", DilocoConfig(inner_steps=H, fragments=P, overlap=1, alpha=0.5, outer_lr=0.4), "fp32"),
        ("streaming_e3m0", DilocoConfig(inner_steps=H, fragments=P, overlap=1, alpha=0.5, outer_lr=0.4), "e3m0"),
    ]
    t0 = time.time()
    rows = []
    for label, settings, codec in variants:
        print(f"training {label} ...", file=sys.stderr, flush=True)
        started = time.time()
        run = Run(cfg, samplers, val, steps, eval_every=max(1, H))
        if settings is None:
            run.data_parallel()
        else:
            run.diloco(settings, codec)
        rows.append({
            "label": label,
            "val_loss": run.curve[-1][1],
            "val_curve": run.curve,
            "train_loss_end": sum(run.train_losses[-20:]) / len(run.train_losses[-20:]),
            "bytes_sent_per_replica": sum(run.bytes_per_step),
            "peak_bytes_per_step": max(run.bytes_per_step),
            "syncs": sum(1 for b in run.bytes_per_step if b),
            "parts_rejected": getattr(run, "rejected", 0),
            "settings": None if settings is None else {**settings.__dict__, "codec": codec},
            "seconds": round(time.time() - started, 1),
        })
    dp = rows[0]
    for row in rows:
        row["bytes_ratio_vs_data_parallel"] = dp["bytes_sent_per_replica"] / row["bytes_sent_per_replica"]
        row["peak_ratio_vs_data_parallel"] = dp["peak_bytes_per_step"] / row["peak_bytes_per_step"]
    tokens = steps * args.replicas * cfg.train.batch_size * cfg.train.seq_len
    plot(rows, Path(args.out), f"tiny (S=1), {args.replicas} replicas, {tokens / 1e6:.2f}M tokens, H={H}, P={P}")
    by = {r["label"]: r for r in rows}
    summary = {
        "bench": "diloco",
        "replicas": args.replicas,
        "steps_per_replica": steps,
        "tokens": tokens,
        "params": numel,
        "H": H,
        "P": P,
        "val_loss": {r["label"]: round(r["val_loss"], 4) for r in rows},
        "bytes_sent_per_replica": {r["label"]: r["bytes_sent_per_replica"] for r in rows},
        "peak_bytes_per_step": {r["label"]: r["peak_bytes_per_step"] for r in rows},
        "bytes_ratio_vs_data_parallel": {r["label"]: round(r["bytes_ratio_vs_data_parallel"], 1) for r in rows},
        "streaming_e3m0_ratio_at_least_100x": by["streaming_e3m0"]["bytes_ratio_vs_data_parallel"] >= 100,
        "rows": [{k: v for k, v in r.items() if k != "val_curve"} for r in rows],
        "curves": {r["label"]: r["val_curve"] for r in rows},
        "plot": args.out,
        "quick": args.quick,
        "seconds": round(time.time() - t0, 1),
        "command": "python bench/diloco.py" + (" --quick" if args.quick else ""),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
