"""Training cost of the subspace constraint: dense vs subspace models at equal tokens (DESIGN §1.1).

Every variant uses the same preset (``local/tiny``: d=256, 8 layers, 4 stages, byte vocabulary) with the
model settings it had before it took the measured recipe (``bench.resume.KEPT_TINY``: init 0.02, table 0.1,
3 dense final layers; the preset's recipe since then is the knob ``k=8 tail4 init0.06 T0.3``), the same
seed, the same data windows (the embedded stdlib corpus) and the same token budget:

- ``dense``              ordinary dense model, small embedding init (the naive baseline)
- ``dense+fixed_table``  dense model plus the same frozen high-rank token table the subspace model
                         carries: the fair baseline and the reference for ``gap_pct``
- ``subspace k=K``       boundaries confined to a K-dim subspace (d/K× fewer numbers per boundary); dense
                         writers in the last stage of the split by parameters alone (2 of the 8 layers at
                         S = 4, ``model.min_dense_tail_layers = 0``: the recipe the k sweep was measured
                         with; the global default gives the last stage 3 layers, the ``k=8 tail3`` variant)

    python bench/convergence.py --quick      # 3 k values, 614k tokens each (851 s measured on 2 CPU cores)
    python bench/convergence.py              # 5 k values, 4× the tokens (~1.5 hours)
    python bench/convergence.py --seeds 3 --ks 8 --variant "k=8 lr2x:model.subspace_rank=8,train.lr=2e-3"
    python bench/convergence.py --set model.n_layers=12 --state bench/out/conv-12l   # another model under all

``--seeds N`` trains every variant at seeds 0..N-1 (init and data order) and reports mean ± std.
``--variant "LABEL:key=value,key=value"`` adds a variant of config overrides (repeatable): a knob
study needs no code. Resumable (bench/resume.py): each variant at each seed is kept under
``--state`` when it finishes, keyed by its label and a hash of its whole resolved config; rerunning the
same command continues (``--fresh`` starts over, mid-unit checkpoints too). A unit checkpoints every twelfth of
its steps under ``--state``'s ``.partial/`` until it finishes, so one cut off mid-way (a killed run, a session's
end) continues from there, to the same result at one torch thread (its row says
``resumed_from_step``). ``--jobs N`` trains N units at a time, each in a process of its own (``--jobs 2`` on a
2-core machine); ``--device cuda`` trains on a GPU (bf16 autocast there, so its units are kept apart from the
CPU's: use a state directory of their own; bench/gpu_long.sh runs issue 19's long runs on a lent GPU, untested
there so far).

The JSON's ``gap_pct`` is against ``dense+fixed_table``; ``gap_pct_vs_best_dense`` against the best dense row
of the run, a dense knob's (another init, say) included (rows compared on the seeds they share), and
``gap_pct_vs_best_dense_same_seeds`` the same on the seeds both rows have; ``--reference LABEL`` adds every row's same-seeds gap to that variant.

Prints one JSON object as its last line and writes a PNG of the validation curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.resume import (
    TRAINING_SECTIONS,
    ResultStore,
    UnitClock,
    config_digest,
    in_progress,
    kept_units,
    load_kept_tiny,
    mean_over_seeds,
    run_units,
    set_aside_unit,
)
from node.checkpoint import CheckpointError
from node.config import ConfigError
from node.train_local import train_local


def run_variant(label: str, model_overrides: list[str], common: list[str], device: str = "cpu",
                checkpoint_dir: str | None = None) -> dict:
    """Train one variant at one seed (``common`` holds the seed) on ``device``; its row (JSON-able).

    ``checkpoint_dir`` (the unit's :meth:`ResultStore.partial`): checkpoints every twelfth of the run go there and
    the unit continues from the newest one found (a unit cut off mid-way, say at a session's end), its row saying
    from which step. On the CPU at one torch thread (a ``--jobs`` worker's) the resumed unit ends exactly where an
    uncut one would (tests/unit/test_bench_unit_resume.py); at more threads a validation pass can differ in the last
    bits, and on a GPU (bf16 autocast) training is not bit for bit either. The
    row's commit is the finishing part's. Checkpoints that cannot be resumed (made before a config field was added,
    on another machine's corpus, unreadable) are set aside with a warning and the unit starts over. None: a
    temporary directory, nothing kept. Either way a line on stderr every twelfth of the run says where the unit is;
    ``seconds`` is the whole unit's (noted at each checkpoint), or this part's with ``seconds_this_part_only``."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_kept_tiny([*common, *model_overrides, f"train.checkpoint_dir='{checkpoint_dir or tmp}'",
                              f"train.resume={'true' if checkpoint_dir else 'false'}", f"train.device='{device}'"])
        every = max(1, cfg.train.steps // 12)
        if checkpoint_dir:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint_every=every, checkpoint_keep=2))
        unit, clock = f"{label} (seed {cfg.train.seed})", UnitClock(checkpoint_dir)

        def progress(step: int, loss: float) -> None:
            clock.saw(step)
            if step % every == 0:
                clock.note(step)
                if step < cfg.train.steps:
                    print(f"{unit}: step {step}/{cfg.train.steps}, train loss {loss:.3f}, "
                          f"{time.time() - clock.started:.0f} s", file=sys.stderr, flush=True)
        try:
            result = train_local(cfg, on_step=progress)
        except CheckpointError as exc:  # raised before any step: the checkpoints are not this unit's to resume
            if not checkpoint_dir:
                raise
            set_aside_unit(checkpoint_dir, unit, exc)
            clock.restart()
            result = train_local(cfg, on_step=progress)
    seconds = clock.total(result.resumed_from)
    row = {
        "label": label,
        "subspace_rank": cfg.model.subspace_rank,
        "fixed_table": cfg.model.uses_fixed_table,
        "params": result.model.num_parameters(),
        "val_loss": result.final_val_loss,
        "val_curve": result.val_losses,
        "train_loss_end": sum(v for _, v in result.train_losses[-10:]) / len(result.train_losses[-10:]),
        "tokens": cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum,  # resumed or not
        "seconds": seconds if seconds is not None else round(time.time() - clock.started, 1),
        "device": device,  # an explicit device, never a fall-back (train.device)
        **({"resumed_from_step": result.resumed_from} if result.resumed_from else {}),
        **({"seconds_this_part_only": True} if seconds is None else {}),
    }
    print(json.dumps({k: v for k, v in row.items() if k != "val_curve"}), file=sys.stderr, flush=True)
    return row


def plot(rows: list[dict], path: Path, title: str, best: float) -> None:
    """Left: each variant's validation curve (its mean over seeds). Right: its final loss, mean ± std over the
    seeds it has, each seed a dot (the error bars the table gives in numbers); ``best`` is the best dense model's
    loss (the JSON's ``best_dense_val_loss``), drawn with the goal above it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(rows) > 12  # the legend goes below the curves, or it hides them
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(16 if many else 13 if len(rows) > 6 else 11, 9 if many else 4.8),
                                 gridspec_kw={"width_ratios": [3, 2]})
    colours = plt.get_cmap("tab20").colors
    for i, row in enumerate(rows):
        steps, losses = zip(*row["val_curve"], strict=True)
        style = "--" if row["subspace_rank"] is None else "-"
        ax.plot(steps, losses, style, marker="o", ms=3, color=colours[i % len(colours)],
                label=f"{row['label']} ({row['val_loss']:.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=6, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    else:
        ax.legend(fontsize=7 if len(rows) > 6 else 8)
    for i, row in enumerate(rows):
        seeds = row.get("val_loss_per_seed") or [row["val_loss"]]
        bx.errorbar([i], [row["val_loss"]], yerr=[row.get("val_loss_std") or 0.0], fmt="s", ms=6, capsize=4,
                    color=colours[i % len(colours)])
        bx.scatter([i] * len(seeds), seeds, s=10, color="black", zorder=3)
    bx.axhline(best, color="grey", lw=0.8, ls="--")
    bx.axhline(best * 1.02, color="grey", lw=0.8, ls=":")
    bx.set_xticks(range(len(rows)), [f"{r['label']} (n={len(r.get('val_loss_per_seed') or [1])})" for r in rows],
                  rotation=35, ha="right", fontsize=7)
    bx.set_ylabel("final validation loss: mean ± std, dots = seeds")
    bx.set_title("dashed: best dense; dotted: +2% (the goal)", fontsize=9)
    bx.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# Issue 19's subspace knobs (BENCHMARKS.md "Training cost of the constraint", steps 2 and 3) at the full budget,
# on top of the global defaults (3 dense final layers since 931e6a6; "k=8 tail3" is that model; the tiny preset's
# own since it took the recipe: "k=8 tail4 init0.06 T0.5", T0.3 until 2026-12-07), and the dense
# baseline a knob that changes all training needs: ``--knobs``, here and in bench/gpu_long.sh.
KNOBS = (
    "k=8 tail0:model.subspace_rank=8,model.dense_tail_layers=0",
    "k=8 tail1:model.subspace_rank=8,model.dense_tail_layers=1",
    "k=8 tail3:model.subspace_rank=8,model.dense_tail_layers=3",
    "k=8 tail4:model.subspace_rank=8,model.dense_tail_layers=4",
    "k=8 S=1:model.subspace_rank=8,pipeline.num_stages=1",
    "k=8 Zlr3:model.subspace_rank=8,train.subspace_lr_mult=3",
    "k=8 emblr3:model.subspace_rank=8,train.embedding_lr_mult=3",
    "k=8 gain:model.subspace_rank=8,model.table_gain=true",
    "k=8 T0.3:model.subspace_rank=8,model.fixed_table_std=0.3",
    "k=8 T0.05:model.subspace_rank=8,model.fixed_table_std=0.05",
    "k=8 rank64:model.subspace_rank=8,model.fixed_table_rank=64",
    "k=8 init0.04:model.subspace_rank=8,model.init_std=0.04",
    # the best dense model at that init (a knob that helps dense training too is no gain of the subspace's)
    "dense+table init0.04:model.subspace_rank='none',model.fixed_table=true,model.init_std=0.04",
    "k=8 tail4 init0.04:model.subspace_rank=8,model.dense_tail_layers=4,model.init_std=0.04",
    # the init sweep: the dense baseline's best init, and the span(U) parts' init apart from the dense parts'
    "dense+table init0.06:model.subspace_rank='none',model.fixed_table=true,model.init_std=0.06",
    "dense+table init0.08:model.subspace_rank='none',model.fixed_table=true,model.init_std=0.08",
    # plain dense (no table) at that init: the best dense model must be looked for without the table too
    "dense init0.06:model.subspace_rank='none',model.fixed_table=false,model.init_std=0.06",
    # the best dense model's learning rate (train.lr 1e-3 everywhere else): the baseline tuned on both axes
    "dense+table init0.06 lr2e-3:model.subspace_rank='none',model.fixed_table=true,model.init_std=0.06,train.lr=2e-3",
    "dense+table init0.06 lr5e-4:model.subspace_rank='none',model.fixed_table=true,model.init_std=0.06,train.lr=5e-4",
    "k=8 init0.06:model.subspace_rank=8,model.init_std=0.06",
    "k=8 init0.06 c0.02:model.subspace_rank=8,model.init_std=0.06,model.constrained_init_std=0.02",
    "k=8 init0.06 c0.04:model.subspace_rank=8,model.init_std=0.06,model.constrained_init_std=0.04",
    "k=8 tail4 init0.06 c0.04:model.subspace_rank=8,model.dense_tail_layers=4,model.init_std=0.06,"
    "model.constrained_init_std=0.04",
    # span(U) at the stage boundaries only (every writer and the embedding dense, a rank-k bottleneck at each
    # boundary): the dense model's best init is the first to try
    "k=8 boundary:model.subspace_rank=8,model.subspace_param='boundary'",
    "k=8 boundary init0.04:model.subspace_rank=8,model.subspace_param='boundary',model.init_std=0.04",
    "k=8 boundary init0.06:model.subspace_rank=8,model.subspace_param='boundary',model.init_std=0.06",
    # and with MAPL-style learned per-stage maps and anchor embeddings (at 0.04: 0.06 was worse for both forms)
    "k=8 boundary init0.04 learned anchor64:model.subspace_rank=8,model.subspace_param='boundary',"
    "model.init_std=0.04,model.boundary_learned=true,model.boundary_anchor_rank=64",
    "k=8 boundary init0.04 anchor64:model.subspace_rank=8,model.subspace_param='boundary',model.init_std=0.04,"
    "model.boundary_anchor_rank=64",
    "k=8 boundary init0.04 learned:model.subspace_rank=8,model.subspace_param='boundary',model.init_std=0.04,"
    "model.boundary_learned=true",
    # the table's scale with the init's (5× both at the default): is 0.06 worse for the subspace models because
    # T_fixed, which carries each token's identity across the boundaries, is then relatively small?
    "k=8 init0.06 T0.3:model.subspace_rank=8,model.init_std=0.06,model.fixed_table_std=0.3",
    "k=8 tail4 init0.06 T0.3:model.subspace_rank=8,model.dense_tail_layers=4,model.init_std=0.06,"
    "model.fixed_table_std=0.3",
    "dense+table init0.06 T0.3:model.subspace_rank='none',model.fixed_table=true,model.init_std=0.06,"
    "model.fixed_table_std=0.3",
    # the rank at the recipe (the tiny preset's model since 57541ee): does 64× (k = 4) also meet the goal?
    "k=4 tail4 init0.06 T0.3:model.subspace_rank=4,model.dense_tail_layers=4,model.init_std=0.06,"
    "model.fixed_table_std=0.3",
    "k=16 tail4 init0.06 T0.3:model.subspace_rank=16,model.dense_tail_layers=4,model.init_std=0.06,"
    "model.fixed_table_std=0.3",
    "k=32 tail4 init0.06 T0.3:model.subspace_rank=32,model.dense_tail_layers=4,model.init_std=0.06,"
    "model.fixed_table_std=0.3",
    # the tiny preset's recipe at S = 1, the model `node start` trains by default (a rank-8 embedding + the table)
    "k=8 S=1 init0.06 T0.3:model.subspace_rank=8,pipeline.num_stages=1,model.init_std=0.06,model.fixed_table_std=0.3",
    # Why is a larger k worse at the recipe (k = 4 < 8 < 16 < 32)? Adam moves each entry of Z by about the learning
    # rate whatever k, so a factored writer's step in W = U·Z space grows as sqrt(k) (its init norm does not):
    # k = 32 at half Z's rate takes k = 8's W-space steps (it did not help k = 32: BENCHMARKS.md).
    "k=8 tail4 init0.06 T0.3 Zlr0.5:model.subspace_rank=8,model.dense_tail_layers=4,model.init_std=0.06,"
    "model.fixed_table_std=0.3,train.subspace_lr_mult=0.5",
    "k=32 tail4 init0.06 T0.3 Zlr0.5:model.subspace_rank=32,model.dense_tail_layers=4,model.init_std=0.06,"
    "model.fixed_table_std=0.3,train.subspace_lr_mult=0.5",
    # ... or is it the table's share of the stream again (it had to follow the init): a larger table at k = 32 and 8
    "k=8 tail4 init0.06 T0.5:model.subspace_rank=8,model.dense_tail_layers=4,model.init_std=0.06,"
    "model.fixed_table_std=0.5",
    "k=32 tail4 init0.06 T0.5:model.subspace_rank=32,model.dense_tail_layers=4,model.init_std=0.06,"
    "model.fixed_table_std=0.5",
    # the dense baseline at that table (k = 8 was +1.7% at 0.5 against +2.0% at 0.3: a gain of the subspace's, or
    # of the table's for every model?)
    "dense+table init0.06 T0.5:model.subspace_rank='none',model.fixed_table=true,model.init_std=0.06,"
    "model.fixed_table_std=0.5",
    "k=8 projected:model.subspace_rank=8,model.subspace_param='projected'",
    "k=8 bf16 wire:model.subspace_rank=8,train.wire_boundaries=true",
    "k=16 int8 wire:model.subspace_rank=16,train.wire_boundaries=true,wire.activation_codec='int8',"
    "wire.gradient_codec='int8'",
)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"LABEL:key=value,key=value"`` → (label, overrides)."""
    label, sep, body = text.partition(":")
    overrides = [o.strip() for o in body.split(",") if o.strip()]
    if not sep or not label.strip() or not overrides or any("=" not in o for o in overrides):
        raise ValueError(f"a variant is LABEL:key=value[,key=value...], got {text!r}")
    return label.strip(), overrides


def first_in_order(units: list[tuple], first: list[str]) -> list[tuple]:
    """The units of the ``--first`` labels before the rest, label by label in the order given (each label's seeds
    in seed order), then the others as they were. Each unit's label is its fourth field."""
    rank = {label: first.index(label) for label in first}  # a repeated label keeps its first place
    return sorted(units, key=lambda unit: rank.get(unit[3], len(first)))  # stable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 k values, short budget")
    parser.add_argument("--ks", type=int, nargs="+", help="subspace ranks to train (default 4 8 32 / 2 4 8 16 32)")
    parser.add_argument("--steps", type=int, help="optimizer steps per variant (default 300 quick / 1200)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 of the init and data order")
    parser.add_argument("--variant", action="append", default=[], help="LABEL:key=value,... (repeatable)")
    parser.add_argument("--knobs", action="store_true",
                        help="add issue 19's knob variants (KNOBS in this file: dense tails, S = 1, learning rates, "
                        "table scale, gain and rank, init, projected, wire codecs), after any --variant")
    parser.add_argument("--state", help="where finished variants are kept (default bench/out/convergence-state)")
    parser.add_argument("--fresh", action="store_true", help="ignore finished variants under --state")
    parser.add_argument("--out", default="bench/out/convergence.png", help="where to write the PNG")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG (where matplotlib is missing)")
    parser.add_argument("--device", default="cpu", help="cpu (the default), cuda or cuda:N: a GPU's units are kept "
                        "apart from the CPU's (bf16 autocast there, so not the same experiment)")
    parser.add_argument("--deadline-s", type=float, help="start no unit this many seconds after the start (the "
                        "running ones finish; exits non-zero naming the units left): for a lease of fixed length")
    parser.add_argument("--jobs", type=int, default=1, help="units trained at a time, each in its own process "
                        "(one torch thread each; default 1: in this process, torch's default threads)")
    parser.add_argument("--first", action="append", default=[], metavar="LABEL",
                        help="train this variant's units before the others' (repeatable: in the order given; "
                        "e.g. 'k=8 tail4' to get its seeds before the baselines'); the table is the same")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override under every variant (repeatable), e.g. --set model.d_model=384 "
                        "--set model.ffn_hidden=1536 for a second model size; give that run a --state of its own")
    parser.add_argument("--reference", metavar="LABEL",
                        help="also report each variant's gap to this variant on the seeds both have "
                        "(gap_pct_vs_reference_same_seeds), e.g. 'k=8 tail3' (the node's default model)")
    parser.add_argument("--kept", action="store_true",
                        help="train nothing: the table from the units kept under --state, each variant's mean over "
                        "the seeds it has (listed in the JSON's seeds_per_variant; the missing units in 'missing', and in "
                        "'in_progress' those a cut-off run left checkpoints of, with the step it continues from)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ks = args.ks or ([4, 8, 32] if args.quick else [2, 4, 8, 16, 32])
    steps = args.steps or (300 if args.quick else 1200)
    try:
        extra = [parse_variant(v) for v in [*args.variant, *(KNOBS if args.knobs else ())]]
    except ValueError as exc:
        parser.error(str(exc))
    common = common_settings(steps, args.set)
    try:
        load_kept_tiny(common)
    except ConfigError as exc:
        parser.error(f"--set: {exc}")
    variants = [("dense", ["model.subspace_rank='none'", "model.fixed_table=false"]),
                ("dense+fixed_table", ["model.subspace_rank='none'", "model.fixed_table=true"]),
                *[(f"subspace k={k}", [f"model.subspace_rank={k}", "model.min_dense_tail_layers=0"]) for k in ks], *extra]
    store = ResultStore(args.state or "bench/out/convergence-state", {"common": common}, fresh=args.fresh,
                        device=args.device)
    t0 = time.time()
    units = [(store.key(unit_key(label, overrides, common, seed)), f"{label} (seed {seed})",
              (label, overrides, [*common, f"train.seed={seed}", f"data.seed={seed}"], args.device, None), label, seed)
             for seed in range(args.seeds) for label, overrides in variants]
    units = [(key, what, (*work[:-1], str(store.partial(key))), label, seed) for key, what, work, label, seed in units]
    unknown = sorted((set(args.first) | ({args.reference} if args.reference else set()))
                     - {label for label, _ in variants})
    if unknown:
        parser.error(f"--first/--reference name no variant of this run: {unknown} "
                     f"(variants: {[label for label, _ in variants]})")
    units = first_in_order(units, args.first)
    if args.kept:
        done, missing = kept_units(store, units)
        if not done:
            parser.error(f"--kept: no unit of this run is kept under {store.directory}")
    else:
        done = run_units(store, [u[:3] for u in units], run_variant, jobs=args.jobs, deadline_s=args.deadline_s)
        missing = []
    # the missing units that a cut-off run left checkpoints of: the step the next run continues from
    progress = in_progress(store, units, done)
    runs: dict[str, list[dict]] = {label: [] for label, _ in variants}
    for key, _, _, label, seed in units:
        if key in done:
            runs[label].append({**done[key], "seed": seed, **(store.commit_of(key) or {})})
    for label in ("dense", "dense+fixed_table"):
        if not runs[label]:
            parser.error(f"--kept: no unit of the {label} baseline is kept under {store.directory}")
    variants = [(label, overrides) for label, overrides in variants if runs[label]]
    rows = [mean_over_seeds(label, runs[label]) for label, _ in variants]
    by = {r["label"]: r for r in rows}
    dense, fair = by["dense"]["val_loss"], by["dense+fixed_table"]["val_loss"]
    seed_losses = {label: {r["seed"]: r["val_loss"] for r in runs[label]} for label, _ in variants}
    best_row = best_dense_row(rows, seed_losses)
    best = best_row["val_loss"]
    if args.reference and args.reference not in by:
        parser.error(f"--reference: no unit of {args.reference!r} is kept under {store.directory}")
    sub = {str(r["subspace_rank"]) if r["label"].startswith("subspace k=") else r["label"]: r
           for r in rows[2:]}
    cfg = load_kept_tiny(common)
    if not args.no_plot:
        plot(rows, Path(args.out), best=best, title=f"d={cfg.model.d_model}, {cfg.model.n_layers} layers, {cfg.pipeline.num_stages} "
             f"stages{' + --set' if args.set else ''}, {rows[0]['tokens'] / 1e6:.1f}M tokens each, "
             f"{args.seeds} seed(s)")
    summary = {
        "bench": "convergence",
        "dense_val_loss": dense,
        "dense_fixed_table_val_loss": fair,
        "subspace_val_loss": {k: r["val_loss"] for k, r in sub.items()},
        "gap_pct": {k: 100 * (r["val_loss"] - fair) / fair for k, r in sub.items()},
        "gap_pct_vs_naive_dense": {k: 100 * (r["val_loss"] - dense) / dense for k, r in sub.items()},
        "gap_pct_vs_best_dense": {k: 100 * (r["val_loss"] - best) / best for k, r in sub.items()},
        "best_dense": best_row["label"],
        "best_dense_val_loss": best,
        "gap_pct_vs_best_dense_same_seeds": {k: same_seeds_gap(seed_losses[r["label"]], seed_losses[best_row["label"]])
                                             for k, r in sub.items()},
        "reference": args.reference,
        "gap_pct_vs_reference_same_seeds": None if not args.reference else {
            r["label"]: same_seeds_gap(seed_losses[r["label"]], seed_losses[args.reference]) for r in rows},
        "val_loss_std": {r["label"]: r["val_loss_std"] for r in rows},
        "per_seed": {r["label"]: r["val_loss_per_seed"] for r in rows},
        "boundary_ratio": {k: cfg.model.d_model / r["subspace_rank"] for k, r in sub.items() if r["subspace_rank"]},
        "tokens": rows[0]["tokens"],
        "steps": steps,
        "seeds": args.seeds,
        "set": args.set,
        "seeds_per_variant": {label: [r["seed"] for r in runs[label]] for label, _ in variants},
        "missing": missing,
        "in_progress": progress,
        "note": "gap_pct is vs dense+fixed_table (the fair baseline); see DESIGN §1.1; the *_same_seeds gaps "
                "compare the means over the seeds both rows have (None where they share none)",
        "rows": [{k: v for k, v in r.items() if k != "val_curve"} for r in rows],
        "plot": None if args.no_plot else args.out,
        "device": args.device,
        "quick": args.quick,
        "state": str(store.directory),
        "seconds_this_invocation": round(time.time() - t0, 1),
        "command": " ".join(["python bench/convergence.py", *sys.argv[1:]]),
    }
    print(json.dumps(summary))


def best_dense_row(rows: list[dict], seed_losses: dict[str, dict[int, float]]) -> dict:
    """The best dense row, a knob's (e.g. another init) included: rows are compared on the seeds both have (on
    their means only where they share none), so a row that has only a lucky seed does not win on it."""
    best, *others = sorted((r for r in rows if r["subspace_rank"] is None), key=lambda r: r["val_loss"])
    for row in others:
        gap = same_seeds_gap(seed_losses[row["label"]], seed_losses[best["label"]])
        if (row["val_loss"] - best["val_loss"] if gap is None else gap) < 0:
            best = row
    return best


def same_seeds_gap(losses: dict[int, float], reference: dict[int, float]) -> float | None:
    """The gap (%) of one variant's mean loss to a reference's, both over the seeds the two share."""
    seeds = sorted(set(losses) & set(reference))
    if not seeds:
        return None
    mean, ref = (sum(d[s] for s in seeds) / len(seeds) for d in (losses, reference))
    return round(100 * (mean - ref) / ref, 3)


def common_settings(steps: int, sets: list[str]) -> list[str]:
    """The overrides every unit of a run shares (``sets``: ``--set``), part of each unit's key."""
    return [f"train.steps={steps}", f"train.warmup_steps={max(10, steps // 20)}", f"train.eval_every={max(1, steps // 6)}",
            "train.eval_batches=16", "train.log_every=100000", "train.checkpoint_every=0", *sets]


def unit_key(label: str, overrides: list[str], common: list[str], seed: int) -> str:
    """The store key of one variant at one seed: its label and a hash of its whole resolved config, so a
    result is reused only for the same settings (a changed default makes it another unit; a new setting
    that is off leaves the key as it was: bench/resume.config_digest)."""
    cfg = load_kept_tiny([*common, *overrides, f"train.seed={seed}", f"data.seed={seed}"])
    digest = config_digest(cfg.to_dict(), TRAINING_SECTIONS)
    return re.sub(r"[^A-Za-z0-9=+.-]+", "_", label)[:100] + f"-{digest}-s{seed}"



if __name__ == "__main__":
    main()
