"""Training cost of the subspace constraint: dense vs subspace models at equal tokens (DESIGN §1.1).

Every variant uses the same preset (``local/tiny``: d=256, 8 layers, 4 stages, byte vocabulary), the
same seed, the same data windows (the embedded stdlib corpus) and the same token budget:

- ``dense``              ordinary dense model, small embedding init (the naive baseline)
- ``dense+fixed_table``  dense model plus the same frozen high-rank token table the subspace model
                         carries: the fair baseline and the reference for ``gap_pct``
- ``subspace k=K``       boundaries confined to a K-dim subspace (d/K× fewer numbers per boundary)

    python bench/convergence.py --quick      # 3 k values, 614k tokens each (851 s measured on 2 CPU cores)
    python bench/convergence.py              # 5 k values, 4× the tokens (~1.5 hours)

Prints one JSON object as its last line and writes a PNG of the validation curves.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.config import load_config
from node.train_local import train_local


def run_variant(label: str, model_overrides: list[str], common: list[str]) -> dict:
    print(f"training {label} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("local/tiny", [*common, *model_overrides, f"train.checkpoint_dir='{tmp}'", "train.resume=false"])
        t0 = time.time()
        result = train_local(cfg)
    row = {
        "label": label,
        "subspace_rank": cfg.model.subspace_rank,
        "fixed_table": cfg.model.uses_fixed_table,
        "params": result.model.num_parameters(),
        "val_loss": result.final_val_loss,
        "val_curve": result.val_losses,
        "train_loss_end": sum(v for _, v in result.train_losses[-10:]) / len(result.train_losses[-10:]),
        "tokens": result.tokens,
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps({k: v for k, v in row.items() if k != "val_curve"}), file=sys.stderr, flush=True)
    return row


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        steps, losses = zip(*row["val_curve"], strict=True)
        style = "--" if row["subspace_rank"] is None else "-"
        ax.plot(steps, losses, style, marker="o", ms=3, label=f"{row['label']} ({row['val_loss']:.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 k values, short budget")
    parser.add_argument("--ks", type=int, nargs="+", help="subspace ranks to train (default 4 8 32 / 2 4 8 16 32)")
    parser.add_argument("--steps", type=int, help="optimizer steps per variant (default 300 quick / 1200)")
    parser.add_argument("--out", default="bench/out/convergence.png", help="where to write the PNG")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ks = args.ks or ([4, 8, 32] if args.quick else [2, 4, 8, 16, 32])
    steps = args.steps or (300 if args.quick else 1200)
    common = [
        f"train.steps={steps}", f"train.warmup_steps={max(10, steps // 20)}", f"train.eval_every={max(1, steps // 6)}",
        "train.eval_batches=16", "train.log_every=100000", "train.checkpoint_every=0", "train.seed=0",
        "data.seed=0",
    ]
    t0 = time.time()
    rows = [
        run_variant("dense", ["model.subspace_rank='none'", "model.fixed_table=false"], common),
        run_variant("dense+fixed_table", ["model.subspace_rank='none'", "model.fixed_table=true"], common),
    ]
    rows += [run_variant(f"subspace k={k}", [f"model.subspace_rank={k}"], common) for k in ks]
    dense, fair = rows[0]["val_loss"], rows[1]["val_loss"]
    sub = {str(r["subspace_rank"]): r["val_loss"] for r in rows[2:]}
    cfg = load_config("local/tiny", common)
    plot(rows, Path(args.out), f"tiny (d=256, 8 layers, 4 stages), {rows[0]['tokens'] / 1e6:.1f}M tokens each")
    summary = {
        "bench": "convergence",
        "dense_val_loss": dense,
        "dense_fixed_table_val_loss": fair,
        "subspace_val_loss": sub,
        "gap_pct": {k: 100 * (v - fair) / fair for k, v in sub.items()},
        "gap_pct_vs_naive_dense": {k: 100 * (v - dense) / dense for k, v in sub.items()},
        "boundary_ratio": {k: cfg.model.d_model / int(k) for k in sub},
        "tokens": rows[0]["tokens"],
        "steps": steps,
        "reference": "gap_pct is vs dense+fixed_table (the fair baseline); see DESIGN §1.1",
        "rows": [{k: v for k, v in r.items() if k != "val_curve"} for r in rows],
        "plot": args.out,
        "quick": args.quick,
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
