"""Data parallel vs DiLoCo vs Streaming DiLoCo variants, same tokens (DESIGN §1.2).

M whole-model replicas of the tiny preset (S = 1; with the model settings its kept units trained on,
``bench.resume.KEPT_TINY``: init 0.02, table 0.1) train in one process on disjoint shards of the
embedded corpus. Every variant sees the same batches and the same inner schedule (AdamW, warm-up +
cosine); they differ only in how the replicas agree:

- ``data_parallel``      every step, the M gradients are averaged (one model, M× the batch)
- ``diloco``             H inner steps, then one outer step on the whole model (P = 1, τ = 0, α = 0,
                         outer lr 0.7, Nesterov 0.9)
- ``streaming_fp32``     P fragments, fragment p synced every H steps at offset p·H/P, overlap τ = 1,
                         mixing α = 0.5, outer lr 0.4 (swarm/diloco.py)
- ``streaming_e3m0``     the same with every replica's part sent as 4-bit E3M0 (4.125 bits a value)
- ``streaming_e3m0_requant``  ... and the mean rounded to E3M0 again, as the swarm's leader sends it
- ``streaming_e3m0_ef``  4-bit parts with error feedback (each replica adds what its last part lost)
- ``streaming_int2``     2-bit parts (``int2``: 2.125 bits a value), ``streaming_int2_ef`` with error feedback
- ``streaming_topk_ef``  the largest 1/32 of each part (``topk``: 1.5 bits a value) with error feedback
- ``streaming_e3m0_lr4e-4``  4-bit parts at the paper's inner learning rate, 4e-4
- ``streaming_int2_ef_lr4e-4``  2-bit parts with error feedback at inner lr 4e-4 (the two best so far)
- ``streaming_e3m0_olr0.8``, ``streaming_e3m0_olr1.2``  4-bit parts at outer learning rate 0.8 or 1.2 (not 0.4)
- ``streaming_e3m0_lr4e-4_olr0.8``  both: inner lr 4e-4 and outer lr 0.8
- ``streaming_int2_ef_lr4e-4_olr0.8``, ``streaming_e3m0_H25_lr4e-4_olr0.8``  the same two lrs with 2-bit parts and
  error feedback, or with H/4
- ``streaming_e3m0_H25``  4-bit parts synced about 4× as often (H/4 rounded to a multiple of P: 24 in the full run);
  ``streaming_e3m0_H25_olr0.8`` the same at outer lr 0.8; ``streaming_int2_ef_H25_lr4e-4_olr0.8`` 2-bit parts with
  error feedback at H/4 and the two lrs (about the bytes of 4-bit parts at H/2)
- ``streaming_e3m0_H12_lr4e-4_olr0.8``, ``streaming_int2_ef_H12_lr4e-4_olr0.8``  synced about 8× as often (H/8 a
  multiple of P: 12 in the full run), at the two lrs, with 4-bit parts or 2-bit parts and error feedback
- ``streaming_e3m0_H8_lr4e-4_olr0.8`` synced about 12× as often (H/12: 8 in the full run), both lrs; its probes
  ``streaming_fp32_H8_lr4e-4_olr0.8`` (parts unquantized), ``streaming_e3m0_H8_lr6e-4_olr0.8`` (inner lr 6e-4),
  ``streaming_e3m0_H8_lr4e-4_olr0.5`` and ``_olr0.3`` (outer lr 0.5, 0.3), ``streaming_e3m0_H8_lr4e-4_olr0.8_a0.75`` (α = 0.75),
  ``streaming_e3m0_H8_lr4e-4_olr0.8_adam`` (the replicas' AdamW moments of each synced fragment averaged too:
  a diagnostic, fp32 moments counted on the wire; the swarm does not do it);
  ``streaming_e3m0_H8_lr6e-4_olr0.8_m4`` (inner lr 6e-4 and the first moment alone averaged, each replica's
  rounded to 4-bit e3m0 as it would be sent: about twice the part's bytes; not built in the swarm) against
  ``streaming_e3m0_H4_lr6e-4_olr0.8`` (the same lr synced twice as often: the same bytes), and
  ``streaming_e3m0_H8_lr6e-4_olr0.8_m4c`` (``_m4`` with the averaged first moment clipped, element by element, to
  each replica's own AdamW bound |m| ≤ 1.165 √v: ``first_moment_bound``), and
  ``streaming_e3m0_H8_lr6e-4_olr0.8_fm`` (``diloco.first_moment``: the swarm's own first-moment exchange,
  swarm/first_moment.py, through the same InProcessGroup: m read when the round begins, averaged like the part,
  merged keeping the replica's τ steps since, clipped to that bound), with its probes
  ``streaming_e3m0_H4_lr6e-4_olr0.8_fm`` (synced twice as often), ``streaming_e3m0_H8_lr6e-4_olr0.8_fm_a0.75``
  (α = 0.75) and ``streaming_e3m0_H16_lr6e-4_olr0.8_fm`` (half as often: the plain H = 8 row's bytes)
- ``local_adam_H1``, ``local_adam_H1_fm``  diagnostics, not methods: every replica's parameters averaged after
  every step (fp32), each replica's AdamW moments its own, or (``_fm``) its first moment averaged too: what is
  left of the gap when nothing drifts between syncs; ``local_adam_H2``, ``_H4``, ``_H8`` the same mean every 2, 4 or
  8 steps, and ``local_adam_H2_e3m0_ef``, ``_H4_e3m0_ef``, ``_H8_e3m0_ef`` at 2, 4 and 8 with 4-bit parts and
  error feedback;
  around the last: ``_P4`` (4 fragments in turn), ``_P4_t1`` (and τ = 1 with the α = 0.5 merge), ``_fm`` (first
  moment averaged too), ``local_adam_H8_int2_ef`` (2-bit parts), ``local_adam_H16_e3m0_ef`` (half the syncs),
  ``_P4_t1s`` (τ = 1 with ``diloco.merge = "since"``: the new global copy plus the replica's step since its part
  was taken, not the α mix); ``streaming_e3m0_H8_lr6e-4_olr0.8_since`` the recipe's streaming row merged so;
  ``streaming_e3m0_ef_avg_since`` plain averaging (outer lr 1, no momentum) merged so at the full H, with 4-bit
  parts and error feedback
- ``data_parallel_lr4e-4``, ``data_parallel_lr2e-3``  data parallel at other learning rates: the control for the
  streaming rows' tuned lrs (the gaps are against ``data_parallel``, at 1e-3)

Bytes are what one replica sends: its gradient (fp32) every step for data parallel, one encoded
copy of its outer-gradient part per sync for the others. ``peak_bytes_per_step`` is the most sent in
any one step. Validation loss is measured on the global (agreed) parameters.

    python bench/diloco.py --quick   # 4 replicas, 240 steps each, H=30, P=3
    python bench/diloco.py           # 4 replicas, 1200 steps each, H=100, P=4
    python bench/diloco.py --seeds 3 --only data_parallel,streaming_e3m0_ef
    python bench/diloco.py --set model.d_model=128 --set model.ffn_hidden=512 --state bench/out/diloco-d128

Resumable (bench/resume.py): each variant at each seed is saved under ``--state`` when it finishes,
and a rerun of the same command continues from there (``--fresh`` starts over; ``--kept`` trains nothing and
reads the table from the units there, each variant over the seeds it has). A unit also checkpoints about every
twelfth of its steps (at the first step where no round is in flight) under ``--state``'s ``.partial/`` until it
finishes, so one cut off mid-way continues from there, to the same result at one torch thread (its row says
``resumed_from_step``; ``--kept``'s ``in_progress`` lists such units and their step). Prints one JSON
object as its last line and writes a PNG of the loss curves. ``--jobs N`` trains N units at a time, each in
a process of its own; ``--device cuda`` trains on a GPU (bf16 autocast there: its units are kept apart from
the CPU's; bench/gpu_long.sh is written to run the long runs on a lent GPU, untested there so far).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

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
from node.chain import StageChain
from node.checkpoint import CheckpointError, load_latest, write_checkpoint
from node.config import ConfigError
from node.data import BatchSampler, load_corpus, validation_batches
from node.engine import StageEngine, build_engine
from node.train_local import evaluate
from protocol.codecs import Codec, get_codec
from swarm.diloco import DilocoConfig, OuterLoop, quantized
from swarm.diloco_group import InProcessGroup
from swarm.first_moment import FirstMoment, clip_to_bound_, first_moment_bound

UNIT_FORMAT = 1  # of a unit's mid-run checkpoint (Run.checkpoint); its own, not a node's checkpoint format


class Run:
    """One variant: the replicas are production stage engines (node/engine.py) of the whole model (S = 1),
    all at the same seeded init; the inner step (AdamW, schedule, clipping) is the engine's."""

    def __init__(self, cfg, samplers, val, steps: int, eval_every: int, device: str = "cpu",
                 checkpoint_dir: str | None = None, unit: dict | None = None):
        self.cfg, self.samplers, self.val, self.device = cfg, samplers, val, device
        self.steps, self.eval_every = steps, eval_every
        self.tokens_per_step = len(samplers) * cfg.train.batch_size * cfg.train.seq_len
        self.curve: list[tuple[int, float]] = []
        self.train_losses: list[float] = []
        self.bytes_per_step = [0] * (steps + 1)
        # Mid-unit checkpoints (``checkpoint_dir``: the unit's ResultStore.partial): at the first step at or after
        # every twelfth of the run where no round is in flight, so that the state is the replicas' engines, their
        # outer loops and error-feedback residuals, and what the run recorded; nothing half-exchanged.
        self.checkpoint_dir, self.unit = checkpoint_dir, dict(unit or {})
        self.every = max(1, steps // 12)
        self.clock = UnitClock(checkpoint_dir)
        self.resumed_from: int | None = None
        self._saved = 0  # the newest step checkpointed (or resumed from)
        self._unquiet_said = False

    def engine(self, grad_accum: int = 1) -> StageEngine:
        cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, grad_accum=grad_accum))
        return build_engine(cfg, 0, self.device, backward="stash")

    def record(self, step: int, engine: StageEngine) -> None:
        if step % self.eval_every == 0 or step == self.steps:
            self.curve.append((step * self.tokens_per_step, evaluate(StageChain([engine]), self.val)))
            print(f"  step {step}: val {self.curve[-1][1]:.4f}", file=sys.stderr, flush=True)

    def data_parallel(self) -> None:
        """One engine accumulating the M replicas' microbatches: the average of their gradients."""
        engine = self.engine(grad_accum=len(self.samplers))
        numel = sum(p.numel() for p in engine.module.parameters())
        for t in range(self.resume([engine]) + 1, self.steps + 1):
            losses = [engine.forward_backward_last(sampler.batch(t - 1), None)[0] for sampler in self.samplers]
            self.train_losses.append(sum(losses) / len(losses))
            self.bytes_per_step[t] = 4 * numel  # each replica sends its fp32 gradient once
            self.record(t, engine)
            self.checkpoint(t, [engine])

    def diloco(self, settings: DilocoConfig, codec: str, corrupt=None, requantize_mean: bool = False,
               average_moments: bool = False, average_first_moment: str | None = None,
               clip_first_moment: bool = False) -> None:
        """Streaming DiLoCo among the replicas (swarm.diloco_group.InProcessGroup); ``corrupt``: a poisoner.
        ``average_moments``: when a fragment's mean is applied, the replicas' AdamW moments of its parameters
        are averaged too (a diagnostic of how much the noisy local optimizer state costs; counted as 2 fp32
        values a parameter more on the wire; the swarm does not do it). ``average_first_moment`` (a codec
        name): the first moment alone, each replica's rounded with that codec as it would be sent, and its
        bytes counted (a candidate for the swarm: about as many bytes again as the part; not built there).
        ``clip_first_moment``: each replica then clips the averaged first moment, element by element, to the
        largest one its own second moment allows (``first_moment_bound``), so a mean taken from replicas with
        larger gradients cannot make a step over Adam's own bound where this replica's are small."""
        moments = None  # (AdamW state keys averaged at each applied round, their codec on the wire)
        if average_moments:
            moments = (("exp_avg", "exp_avg_sq"), None)
        elif average_first_moment:
            moments = (("exp_avg",), get_codec(average_first_moment))
        bound = first_moment_bound(self.cfg.train.beta1, self.cfg.train.beta2) if clip_first_moment else None
        engines = [self.engine() for _ in self.samplers]
        params = [dict(e.module.named_parameters()) for e in engines]
        loops = [OuterLoop(p, settings) for p in params]
        # diloco.first_moment: the swarm's own first-moment exchange (swarm/first_moment.py), beside each part
        fms = [FirstMoment(e.optimizer, p, loop.layouts, self.cfg.train.beta1, self.cfg.train.beta2)
               for e, p, loop in zip(engines, params, loops, strict=True)] if settings.first_moment else None
        group = InProcessGroup(loops, settings, codec, corrupt=corrupt, requantize_mean=requantize_mean, moments=fms)
        global_model = self.engine()
        for t in range(self.resume(engines, group) + 1, self.steps + 1):
            losses = [e.forward_backward_last(s.batch(t - 1), None)[0] for e, s in zip(engines, self.samplers, strict=True)]
            self.train_losses.append(sum(losses) / len(losses))
            applied = list(group.loops[0].rounds_applied) if moments else None
            self.bytes_per_step[t] += group.after_step(t)
            for fragment, before in enumerate(applied or ()):
                if group.loops[0].rounds_applied[fragment] != before:
                    self.bytes_per_step[t] += self.average_moments(engines, params,
                                                                   group.loops[0].layouts[fragment].names, *moments,
                                                                   clip=bound)
            if t % self.eval_every == 0 or t == self.steps:
                self.load_global(global_model, group.loops[0])
                self.record(t, global_model)
            self.checkpoint(t, engines, group)
        self.rejected = sum(len(r) for r in group.rejected)
        self.group, self.engines = group, engines

    # ------------------------------------------------------------------------------- mid-unit checkpoints

    def resume(self, engines: list[StageEngine], group: InProcessGroup | None = None) -> int:
        """Load the newest checkpoint of this unit into the freshly built ``engines`` (and ``group``): the step to
        continue after (0: none, the unit starts). Raises CheckpointError, before anything is loaded, when the
        checkpoint is of another unit or layout (:func:`train_unit` then sets it aside and starts over)."""
        if not self.checkpoint_dir:
            return 0
        state = load_latest(self.checkpoint_dir)
        if state is None:
            return 0
        loops = group.loops if group is not None else []
        if state.get("format") != UNIT_FORMAT or state.get("unit") != self.unit:
            raise CheckpointError(f"its checkpoint is of {state.get('unit')} (format {state.get('format')}), "
                                  f"not of this unit, {self.unit}")
        if len(state.get("engines", ())) != len(engines) or len(state.get("outer", ())) != len(loops):
            raise CheckpointError(f"its checkpoint holds {len(state.get('engines', ()))} replica(s) and "
                                  f"{len(state.get('outer', ()))} outer loop(s), not {len(engines)} and {len(loops)}")
        try:
            for engine, saved in zip(engines, state["engines"], strict=True):
                engine.load_state(saved, strict_optimizer=True)
            for loop, outer, residual in zip(loops, state["outer"], state["residual"], strict=True):
                loop.load_state_dict(outer)  # clears the residual: this replica's own, restored next
                loop.residual = [None if r is None else r.to(loop.outer_device) for r in residual]
        except (ValueError, KeyError, RuntimeError) as exc:  # the engines are half-loaded: the unit must start over
            raise CheckpointError(f"its checkpoint does not fit this unit's model ({exc})") from exc
        if group is not None:
            group.rejected, group.kept = list(state["rejected"]), list(state["kept"])
        self.curve = [(int(n), float(v)) for n, v in state["curve"]]
        self.train_losses = list(state["train_losses"])
        self.bytes_per_step = list(state["bytes_per_step"])
        torch.set_rng_state(state["rng"])
        self.resumed_from = self._saved = int(state["step"])
        print(f"{self._name}: resumed from step {self._saved} in {self.checkpoint_dir}", file=sys.stderr, flush=True)
        return self._saved

    @property
    def _name(self) -> str:
        return f"{self.unit.get('label', 'unit')} (seed {self.unit.get('seed', '?')})"

    def checkpoint(self, t: int, engines: list[StageEngine], group: InProcessGroup | None = None) -> None:
        """After step ``t``: a checkpoint when a twelfth of the run has passed since the last one and no round is
        in flight (a round's parts and mean live only in this process); a progress line with it."""
        self.clock.saw(t)
        if not self.checkpoint_dir or t == self.steps or t // self.every == self._saved // self.every:
            return
        if group is not None and group.in_flight:
            if t % self.every == self.every - 1 and not self._unquiet_said:
                self._unquiet_said = True  # every step of a twelfth had a round in flight (τ >= H/P)
                print(f"{self._name}: no step of step {t // self.every * self.every}'s twelfth was free of a round "
                      "in flight; this unit checkpoints only where one is", file=sys.stderr, flush=True)
            return
        self.clock.note(t)
        loops = group.loops if group is not None else []
        # The live tensors, no copies (this thread is the only one that steps them): written one at a time.
        write_checkpoint(self.checkpoint_dir, lambda: {
            "format": UNIT_FORMAT, "step": t, "unit": self.unit,
            "engines": [engine.state(copy=False) for engine in engines],
            "outer": [loop.state_dict(copy=False) for loop in loops],
            "residual": [list(loop.residual) for loop in loops],
            "rejected": list(group.rejected) if group is not None else [],
            "kept": list(group.kept) if group is not None else [],
            "curve": list(self.curve), "train_losses": list(self.train_losses),
            "bytes_per_step": list(self.bytes_per_step), "rng": torch.get_rng_state()}, keep=2)
        self._saved = t
        loss = statistics.fmean(self.train_losses[-self.every:])
        print(f"{self._name}: step {t}/{self.steps}, train loss {loss:.3f}, {time.time() - self.clock.started:.0f} s",
              file=sys.stderr, flush=True)

    @staticmethod
    @torch.no_grad()
    def average_moments(engines: list[StageEngine], per_engine: list[dict[str, torch.Tensor]], names: list[str],
                        keys: tuple[str, ...] = ("exp_avg", "exp_avg_sq"), codec: Codec | None = None,
                        clip: float | None = None) -> int:
        """Replace each replica's AdamW ``keys`` of ``names`` by their mean (of the values rounded with
        ``codec`` as sent, when given; fp32 otherwise); bytes one sent. ``per_engine``: each engine's
        parameters by name. ``clip``: each replica's new first moment is clipped to ± ``clip`` × the square
        root of its own second moment."""
        sent = 0
        for name in names:
            states = [e.optimizer.state.get(params[name]) for e, params in zip(engines, per_engine, strict=True)]
            if any(not st for st in states):
                continue  # no step taken yet
            for key in keys:
                values = [st[key] if codec is None else quantized(st[key], codec)[1].to(st[key]) for st in states]
                mean = torch.stack(values).mean(0)
                for st in states:
                    st[key].copy_(mean)
                    if clip is not None and key == "exp_avg":
                        clip_to_bound_(st[key], st["exp_avg_sq"], clip)
                sent += 4 * mean.numel() if codec is None else codec.payload_nbytes(mean.numel())
        return sent

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

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    colours = plt.get_cmap("tab20").colors
    for i, row in enumerate(rows):
        tokens, losses = zip(*row["val_curve"], strict=True)
        ax.plot([x / 1e6 for x in tokens], losses, marker="o", ms=2, color=colours[i % len(colours)],
                label=f"{row['label']} ({row['val_loss']:.3f})")
    ax.set_xlabel("tokens, all replicas (M)")
    ax.set_ylabel("validation loss of the global model (nats/byte)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6 if len(rows) > 8 else 8)
    if all(len(r["val_curve"]) > 2 for r in rows):  # the first evaluation's spread would flatten the rest
        ax.set_ylim(top=max(r["val_curve"][1][1] for r in rows) * 1.02)
    # The trade: final loss (mean ± std over the seeds, each seed a dot) against how many times fewer bytes
    # than data parallel each replica sent.
    for i, row in enumerate(rows):
        x = row["bytes_ratio_vs_data_parallel"]
        seeds = row.get("val_loss_per_seed") or [row["val_loss"]]
        bx.errorbar([x], [row["val_loss"]], yerr=[row.get("val_loss_std") or 0.0], fmt="o", ms=5, capsize=3,
                    color=colours[i % len(colours)])
        bx.scatter([x] * len(seeds), seeds, s=6, color="black", zorder=3)
    bx.axhline(rows[0]["val_loss"], color="grey", lw=0.8, ls="--")
    bx.axhline(rows[0]["val_loss"] * 1.01, color="grey", lw=0.8, ls=":")
    # A row far above the rest (an unstable variant) would flatten them: cut the axis at +6% and name it at the top.
    top = rows[0]["val_loss"] * 1.06
    lowest = min(min(r.get("val_loss_per_seed") or [r["val_loss"]]) for r in rows)
    if any(r["val_loss"] > top for r in rows):
        bx.set_ylim(min(lowest, rows[0]["val_loss"]) - 0.005, top)
        for i, row in enumerate(rows):
            if row["val_loss"] > top:
                x = row["bytes_ratio_vs_data_parallel"]
                bx.scatter([x], [top], marker="^", s=40, color=colours[i % len(colours)], clip_on=False, zorder=4)
                bx.annotate(f"{row['val_loss']:.3f} (off scale)", (x, top), textcoords="offset points",
                            xytext=(-4, -12), ha="right", fontsize=7)
    bx.set_xscale("log")
    bx.set_xlabel("times fewer bytes than data parallel, per replica (log)")
    bx.set_ylabel("final validation loss: mean ± std, dots = seeds")
    bx.set_title("dashed: data parallel; dotted: +1% (the goal); colours as on the left", fontsize=9)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def variants(H: int, P: int) -> dict[str, dict]:
    """Each variant: the outer settings (None: data parallel), the part codec, and its extras."""
    streaming = dict(inner_steps=H, fragments=P, overlap=1, alpha=0.5, outer_lr=0.4)
    quarter = max(P, H // 4 // P * P)  # H/4, a multiple of P
    eighth = max(P, H // 8 // P * P)
    twelfth = max(P, H // 12 // P * P)
    sixth, twentyfourth = max(P, H // 6 // P * P), max(P, H // 24 // P * P)
    every_step = dict(inner_steps=1, fragments=1, overlap=0, alpha=0.0, outer_lr=1.0, outer_momentum=0.0)

    def local_adam(inner_steps: int, codec: str = "fp32", **outer) -> dict:
        """The replicas' parameters averaged every ``inner_steps`` steps (one fragment, blocking, the mean itself)."""
        return {"settings": DilocoConfig(**{**every_step, "inner_steps": inner_steps, **outer}), "codec": codec}

    def at_twelfth(codec: str, inner_lr: float = 4e-4, outer_lr: float = 0.8, **outer: float) -> dict:
        """A streaming variant synced at H/12 (a multiple of P), by default at both tuned lrs."""
        return {"settings": DilocoConfig(**{**streaming, "inner_steps": twelfth, "outer_lr": outer_lr, **outer}),
                "codec": codec, "inner_lr": inner_lr}

    return {
        "data_parallel": {"settings": None, "codec": None},
        # Data parallel at the other learning rates the streaming rows were tried at: the control that the gaps
        # below are not an artefact of tuning DiLoCo's lrs and not data parallel's.
        "data_parallel_lr4e-4": {"settings": None, "codec": None, "inner_lr": 4e-4},
        "data_parallel_lr2e-3": {"settings": None, "codec": None, "inner_lr": 2e-3},
        "diloco": {"settings": DilocoConfig(inner_steps=H, fragments=1, overlap=0, alpha=0.0, outer_lr=0.7),
                   "codec": "fp32"},
        # Diagnostics: every replica's parameters averaged after every step (fp32, no outer momentum: the mean
        # itself), its AdamW moments its own (``local_adam_H1``), or its first moment averaged too, so that only the
        # second moment is each replica's own (``_fm``): what each replica's own optimizer state costs without drift.
        "local_adam_H1": {"settings": DilocoConfig(**every_step), "codec": "fp32"},
        "local_adam_H1_fm": {"settings": DilocoConfig(**every_step, first_moment=True), "codec": "fp32"},
        # The same mean every 2, 4 or 8 steps: where between H = 1 and the streaming rows' H = 4..8 the gap opens,
        # without their fragments, overlap, α merge, Nesterov or inner lr; and at 2, 4 and 8 with 4-bit parts and error
        # feedback (15.5×, 31× and 62× fewer bytes than data parallel): local Adam as a method, if the fp32 rows hold.
        "local_adam_H2": local_adam(2),
        "local_adam_H4": local_adam(4),
        "local_adam_H8": local_adam(8),
        "local_adam_H2_e3m0_ef": local_adam(2, "e3m0", error_feedback=True),
        "local_adam_H4_e3m0_ef": local_adam(4, "e3m0", error_feedback=True),
        "local_adam_H8_e3m0_ef": local_adam(8, "e3m0", error_feedback=True),
        # ... at H = 8 with 4-bit parts and error feedback: what the streaming machinery costs on top of it (P = 4
        # fragments synced in turn; then also τ = 1 step of overlap with the α = 0.5 merge, as the swarm runs it),
        # the first moment averaged too (diloco.first_moment, 31×), 2-bit parts (int2), and half the syncs (H = 16).
        "local_adam_H8_e3m0_ef_P4": local_adam(8, "e3m0", error_feedback=True, fragments=4),
        "local_adam_H8_e3m0_ef_P4_t1": local_adam(8, "e3m0", error_feedback=True, fragments=4, overlap=1, alpha=0.5),
        # τ = 1 with merge = 'since' (the new global copy plus exactly the replica's step since its part was taken)
        # instead of the α = 0.5 mix, which cost ~3 points above; and the recipe's streaming row merged so.
        "local_adam_H8_e3m0_ef_P4_t1s": local_adam(8, "e3m0", error_feedback=True, fragments=4, overlap=1,
                                                   merge="since"),
        "local_adam_H8_e3m0_ef_fm": local_adam(8, "e3m0", error_feedback=True, first_moment=True),
        "local_adam_H8_int2_ef": local_adam(8, "int2", error_feedback=True),
        "local_adam_H16_e3m0_ef": local_adam(16, "e3m0", error_feedback=True),
        "streaming_fp32": {"settings": DilocoConfig(**streaming), "codec": "fp32"},
        "streaming_e3m0": {"settings": DilocoConfig(**streaming), "codec": "e3m0"},
        "streaming_e3m0_requant": {"settings": DilocoConfig(**streaming), "codec": "e3m0", "requantize_mean": True},
        "streaming_e3m0_ef": {"settings": DilocoConfig(**streaming, error_feedback=True), "codec": "e3m0"},
        "streaming_int2": {"settings": DilocoConfig(**streaming), "codec": "int2"},
        "streaming_int2_ef": {"settings": DilocoConfig(**streaming, error_feedback=True), "codec": "int2"},
        "streaming_topk_ef": {"settings": DilocoConfig(**streaming, error_feedback=True), "codec": "topk"},
        "streaming_e3m0_lr4e-4": {"settings": DilocoConfig(**streaming), "codec": "e3m0", "inner_lr": 4e-4},
        "streaming_int2_ef_lr4e-4": {"settings": DilocoConfig(**streaming, error_feedback=True), "codec": "int2",
                                     "inner_lr": 4e-4},
        "streaming_e3m0_olr0.8": {"settings": DilocoConfig(**{**streaming, "outer_lr": 0.8}), "codec": "e3m0"},
        "streaming_e3m0_olr1.2": {"settings": DilocoConfig(**{**streaming, "outer_lr": 1.2}), "codec": "e3m0"},
        "streaming_e3m0_lr4e-4_olr0.8": {"settings": DilocoConfig(**{**streaming, "outer_lr": 0.8}), "codec": "e3m0",
                                         "inner_lr": 4e-4},
        "streaming_int2_ef_lr4e-4_olr0.8": {"settings": DilocoConfig(**{**streaming, "outer_lr": 0.8}, error_feedback=True),
                                            "codec": "int2", "inner_lr": 4e-4},
        "streaming_e3m0_H25_lr4e-4_olr0.8": {"settings": DilocoConfig(**{**streaming, "inner_steps": quarter,
                                                                         "outer_lr": 0.8}),
                                             "codec": "e3m0", "inner_lr": 4e-4},
        "streaming_e3m0_H12_lr4e-4_olr0.8": {"settings": DilocoConfig(**{**streaming, "inner_steps": eighth,
                                                                         "outer_lr": 0.8}),
                                             "codec": "e3m0", "inner_lr": 4e-4},
        "streaming_int2_ef_H12_lr4e-4_olr0.8": {"settings": DilocoConfig(**{**streaming, "inner_steps": eighth,
                                                                            "outer_lr": 0.8}, error_feedback=True),
                                                "codec": "int2", "inner_lr": 4e-4},
        "streaming_int2_ef_H25_lr4e-4_olr0.8": {"settings": DilocoConfig(**{**streaming, "inner_steps": quarter,
                                                                            "outer_lr": 0.8}, error_feedback=True),
                                                "codec": "int2", "inner_lr": 4e-4},
        # Plain averaging of the fragment (outer SGD at lr 1, no momentum) at H/8, the inner lr data parallel uses:
        # local Adam with a periodic mean, the limit the outer optimizer's amplification is measured against.
        "streaming_e3m0_H12_avg": {"settings": DilocoConfig(**{**streaming, "inner_steps": eighth, "outer_lr": 1.0,
                                                               "outer_momentum": 0.0}), "codec": "e3m0"},
        "streaming_e3m0_H8_lr4e-4_olr0.8": at_twelfth("e3m0"),
        # Where the rest of the gap at H/12 is: the 4-bit rounding (fp32 parts), an inner lr nearer half of data
        # parallel's (6e-4; the sqrt-batch rule for Adam), a smaller outer lr (the best one grows with H in the
        # DiLoCo scaling-law study; 0.8 was chosen at H = 100), and more of the local progress kept at each merge.
        "streaming_fp32_H8_lr4e-4_olr0.8": at_twelfth("fp32"),
        "streaming_e3m0_H8_lr6e-4_olr0.8": at_twelfth("e3m0", inner_lr=6e-4),
        # 6e-4 beat 4e-4 at H/12 (the recipe's init, seed 0): where is the inner lr's best at this H?
        "streaming_e3m0_H8_lr8e-4_olr0.8": at_twelfth("e3m0", inner_lr=8e-4),
        "streaming_e3m0_H8_lr1e-3_olr0.8": at_twelfth("e3m0", inner_lr=1e-3),
        "streaming_e3m0_H8_lr4e-4_olr0.8_adam": {**at_twelfth("e3m0"), "average_moments": True},
        # What the swarm could send: the first moment alone, 4-bit, with each synced fragment (about twice the
        # part's bytes), at the best inner lr; against the same lr synced twice as often (H/24, the same bytes).
        "streaming_e3m0_H8_lr6e-4_olr0.8_m4": {**at_twelfth("e3m0", inner_lr=6e-4), "average_first_moment": "e3m0"},
        # ... with the averaged first moment clipped to each replica's own Adam bound (|m| ≤ 1.165 √v): the
        # _m4 units dropped parts at robust_mean's norm check, which no other variant ever did.
        "streaming_e3m0_H8_lr6e-4_olr0.8_m4c": {**at_twelfth("e3m0", inner_lr=6e-4), "average_first_moment": "e3m0",
                                               "clip_first_moment": True},
        # What the swarm does with diloco.first_moment (swarm/first_moment.py): ``_m4c`` as the exchange runs it, the
        # first moment read when the round begins (its τ steps since kept), averaged like the part, then clipped.
        "streaming_e3m0_H8_lr6e-4_olr0.8_fm": at_twelfth("e3m0", inner_lr=6e-4, first_moment=True),
        # Nearer parity, at any bytes: ``_fm`` synced twice as often (H/24), and ``_fm`` keeping more of each
        # replica's own progress at the merge (α = 0.75: α 0 → 0.5 was worth ~7 points at H/8).
        "streaming_e3m0_H4_lr6e-4_olr0.8_fm": at_twelfth("e3m0", inner_lr=6e-4, first_moment=True,
                                                         inner_steps=twentyfourth),
        "streaming_e3m0_H8_lr6e-4_olr0.8_fm_a0.75": at_twelfth("e3m0", inner_lr=6e-4, first_moment=True, alpha=0.75),
        # ... and at the bytes of the plain H/12 row (62×): the first moment with every part, synced half as often
        # (H/6). Turning diloco.first_moment on at a node's present bytes is this trade.
        "streaming_e3m0_H16_lr6e-4_olr0.8_fm": at_twelfth("e3m0", inner_lr=6e-4, first_moment=True,
                                                          inner_steps=sixth),
        "streaming_e3m0_H4_lr6e-4_olr0.8": {**at_twelfth("e3m0", inner_lr=6e-4),
                                            "settings": DilocoConfig(**{**streaming, "inner_steps": twentyfourth,
                                                                        "outer_lr": 0.8})},
        "streaming_e3m0_H8_lr6e-4_olr0.8_since": at_twelfth("e3m0", inner_lr=6e-4, merge="since"),
        # ``since`` where it was measured to work (plain averaging: outer lr 1, no momentum) at the full run's H, the
        # data-parallel inner lr, 4-bit parts with error feedback: the swarm's schedule (H in the hundreds) merged so.
        "streaming_e3m0_ef_avg_since": {"settings": DilocoConfig(**{**streaming, "outer_lr": 1.0, "outer_momentum": 0.0},
                                                                 error_feedback=True, merge="since"), "codec": "e3m0"},
        "streaming_e3m0_H8_lr4e-4_olr0.5": at_twelfth("e3m0", outer_lr=0.5),
        "streaming_e3m0_H8_lr4e-4_olr0.3": at_twelfth("e3m0", outer_lr=0.3),
        "streaming_e3m0_H8_lr4e-4_olr0.8_a0.75": at_twelfth("e3m0", alpha=0.75),
        # ... and without the local/global mix (alpha 0: each synced fragment is the global copy, as in DiLoCo).
        "streaming_e3m0_H12_lr4e-4_olr0.8_a0": {"settings": DilocoConfig(**{**streaming, "inner_steps": eighth,
                                                                            "outer_lr": 0.8, "alpha": 0.0}),
                                                "codec": "e3m0", "inner_lr": 4e-4},
        "streaming_e3m0_H25": {"settings": DilocoConfig(**{**streaming, "inner_steps": quarter}), "codec": "e3m0"},
        "streaming_e3m0_H25_olr0.8": {"settings": DilocoConfig(**{**streaming, "inner_steps": quarter, "outer_lr": 0.8}),
                                      "codec": "e3m0"},
    }


def seed_setup(seed: int, steps: int, replicas: int, overrides: tuple[str, ...] = ()):
    """The configuration, the replicas' samplers (disjoint shards) and the validation batches of one seed.
    ``overrides``: ``--set`` keys on top (another model size, say), part of every unit's key."""
    cfg = load_kept_tiny([
        "pipeline.num_stages=1", f"train.steps={steps}", f"train.warmup_steps={max(10, steps // 20)}",
        "train.batch_size=4", "train.seq_len=64", f"train.seed={seed}", f"data.seed={seed}", *overrides,
    ])
    corpus = load_corpus(cfg.data)
    samplers = [BatchSampler(corpus.train, cfg.train.seq_len, cfg.train.batch_size, 0, r, replicas)
                for r in range(replicas)]
    return cfg, samplers, validation_batches(corpus.val, cfg.train.seq_len, 16, 8)


def train_unit(label: str, seed: int, steps: int, H: int, P: int, replicas: int, device: str = "cpu",
               overrides: tuple[str, ...] = (), checkpoint_dir: str | None = None) -> dict:
    """One variant at one seed, from its seeded init (a worker process of ``--jobs`` runs this alone).

    ``checkpoint_dir`` (the unit's :meth:`ResultStore.partial`): checkpoints about every twelfth of the run go there
    (:meth:`Run.checkpoint`) and the unit continues from the newest one found, its row saying from which step; on
    the CPU at one torch thread (a ``--jobs`` worker's) it ends where an uncut unit would
    (tests/unit/test_bench_diloco_resume.py). A checkpoint of another unit or layout is set aside with a warning and
    the unit starts over. ``seconds`` is the whole unit's, or this part's with ``seconds_this_part_only``."""
    cfg, samplers, val = seed_setup(seed, steps, replicas, overrides)
    unit = {"label": label, "seed": seed, "steps": steps, "H": H, "P": P, "replicas": replicas, "device": device,
            "config": config_digest(cfg.to_dict(), TRAINING_SECTIONS)}
    torch.manual_seed(seed)
    try:
        return run_variant(cfg, samplers, val, steps, H, variants(H, P)[label], device, checkpoint_dir, unit)
    except CheckpointError as exc:  # raised before any step of this part
        set_aside_unit(checkpoint_dir, f"{label} (seed {seed})", exc)
        torch.manual_seed(seed)
        return run_variant(cfg, samplers, val, steps, H, variants(H, P)[label], device, checkpoint_dir, unit)


def run_variant(cfg, samplers, val, steps: int, H: int, spec: dict, device: str = "cpu",
                checkpoint_dir: str | None = None, unit: dict | None = None) -> dict:
    """Train one variant from its seeded init (or from its newest checkpoint in ``checkpoint_dir``, which must be
    of ``unit``); its row (JSON-able)."""
    settings, codec = spec["settings"], spec["codec"]
    if "inner_lr" in spec:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=spec["inner_lr"]))
    run = Run(cfg, samplers, val, steps, eval_every=max(1, H), device=device, checkpoint_dir=checkpoint_dir, unit=unit)
    if settings is None:
        run.data_parallel()
    else:
        run.diloco(settings, codec, requantize_mean=spec.get("requantize_mean", False),
                   average_moments=spec.get("average_moments", False),
                   average_first_moment=spec.get("average_first_moment"),
                   clip_first_moment=spec.get("clip_first_moment", False))
    seconds = run.clock.total(run.resumed_from)
    return {
        "val_loss": run.curve[-1][1],
        "val_curve": run.curve,
        "train_loss_end": sum(run.train_losses[-20:]) / len(run.train_losses[-20:]),
        "bytes_sent_per_replica": sum(run.bytes_per_step),
        "peak_bytes_per_step": max(run.bytes_per_step),
        "syncs": sum(1 for b in run.bytes_per_step if b),
        "parts_rejected": getattr(run, "rejected", 0),
        "settings": None if settings is None else {**settings.__dict__, "codec": codec,
                                                   "requantize_mean": spec.get("requantize_mean", False),
                                                   "average_moments": spec.get("average_moments", False),
                                                   "average_first_moment": spec.get("average_first_moment"),
                                                   "clip_first_moment": spec.get("clip_first_moment", False)},
        "inner_lr": cfg.train.lr,
        "seconds": seconds if seconds is not None else round(time.time() - run.clock.started, 1),
        "device": device,
        **({"resumed_from_step": run.resumed_from} if run.resumed_from else {}),
        **({"seconds_this_part_only": True} if seconds is None else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="240 steps, H=30, P=3 (the full run: 1200, 100, 4)")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--steps", type=int, help="inner steps per replica (default 240 quick / 1200; H and P stay): "
                        "a longer token budget, e.g. on a GPU; part of the state's fingerprint")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 of the init and the data order")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all; data_parallel always)")
    parser.add_argument("--state", default=None, help="where finished variants are kept (default bench/out/diloco-state"
                        "[-quick])")
    parser.add_argument("--fresh", action="store_true", help="ignore finished variants under --state")
    parser.add_argument("--out", default="bench/out/diloco.png", help="where to write the PNG")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG (where matplotlib is missing)")
    parser.add_argument("--device", default="cpu", help="cpu (the default), cuda or cuda:N: a GPU's units are kept "
                        "apart from the CPU's (bf16 autocast there, so not the same experiment)")
    parser.add_argument("--deadline-s", type=float, help="start no unit this many seconds after the start (the "
                        "running ones finish; exits non-zero naming the units left): for a lease of fixed length")
    parser.add_argument("--jobs", type=int, default=1, help="units trained at a time, each in its own process")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override on top of the bench's (repeatable), e.g. --set model.d_model=128 "
                        "--set model.ffn_hidden=512 for a smaller model; part of each unit's key, so give the run a "
                        "--state of its own")
    parser.add_argument("--kept", action="store_true",
                        help="train nothing: the table from the units kept under --state, each variant's mean over "
                        "the seeds it has there (JSON: seeds_per_variant, missing)")
    args = parser.parse_args()
    overrides = tuple(args.set)
    torch.set_num_threads(1)
    steps, H, P = (240, 30, 3) if args.quick else (1200, 100, 4)
    if args.steps is not None:
        if args.steps < H:
            parser.error(f"--steps {args.steps} is fewer than one round of H = {H} inner steps")
        steps = args.steps
    specs = variants(H, P)
    chosen = ["data_parallel", *[v for v in args.only.split(",") if v and v != "data_parallel"]] if args.only \
        else list(specs)
    unknown = [v for v in chosen if v not in specs]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(specs)}")
    store = ResultStore(args.state or f"bench/out/diloco-state{'-quick' if args.quick else ''}",
                        {"steps": steps, "H": H, "P": P, "replicas": args.replicas}, fresh=args.fresh,
                        device=args.device)
    t0 = time.time()
    units = []
    for seed in range(args.seeds):
        try:
            cfg = seed_setup(seed, steps, args.replicas, overrides)[0]
        except ConfigError as exc:
            parser.error(f"--set: {exc}")
        digest = config_digest(cfg.to_dict(), TRAINING_SECTIONS)  # a changed default: another unit
        units += [(key, f"{label} (seed {seed})",
                   (label, seed, steps, H, P, args.replicas, args.device, overrides, str(store.partial(key))),
                   label, seed)
                  for label in chosen for key in [store.key(f"{label}-{digest}-s{seed}")]]
    if args.kept:
        done, missing = kept_units(store, units)
    else:
        done = run_units(store, [u[:3] for u in units], train_unit, jobs=args.jobs, deadline_s=args.deadline_s)
        missing = []
    # the missing units that a cut-off run left checkpoints of: the step the next run continues from
    progress = in_progress(store, units, done)
    per_seed: dict[str, list[dict]] = {v: [] for v in chosen}
    for key, _, _, label, seed in units:
        if key in done:
            per_seed[label].append({**done[key], "label": label, "seed": seed, **(store.commit_of(key) or {})})
    if not per_seed["data_parallel"]:
        parser.error(f"--kept: no unit of the data_parallel baseline is kept under {store.directory}")
    chosen = [label for label in chosen if per_seed[label]]
    numel = sum(p.numel() for p in build_engine(cfg, 0).module.parameters())
    rows = [mean_over_seeds(label, per_seed[label]) for label in chosen]
    dp = rows[0]
    dp_losses = {r["seed"]: r["val_loss"] for r in per_seed["data_parallel"]}
    for row in rows:
        row["bytes_ratio_vs_data_parallel"] = dp["bytes_sent_per_replica"] / row["bytes_sent_per_replica"]
        row["peak_ratio_vs_data_parallel"] = dp["peak_bytes_per_step"] / row["peak_bytes_per_step"]
        row["loss_gap_pct_vs_dp"] = 100 * (row["val_loss"] / dp["val_loss"] - 1)
        # Against data parallel on the same seeds only (differs from the above where a variant lacks some seeds).
        same = [dp_losses[r["seed"]] for r in per_seed[row["label"]] if r["seed"] in dp_losses]
        row["loss_gap_pct_vs_dp_same_seeds"] = 100 * (row["val_loss"] / statistics.fmean(same) - 1) \
            if len(same) == len(per_seed[row["label"]]) else None
    tokens = steps * args.replicas * cfg.train.batch_size * cfg.train.seq_len
    if not args.no_plot:
        plot(rows, Path(args.out), f"tiny (S=1), {args.replicas} replicas, {tokens / 1e6:.2f}M tokens, H={H}, P={P}, "
             f"{args.seeds} seed(s)")
    by = {r["label"]: r for r in rows}
    summary = {
        "bench": "diloco", "replicas": args.replicas, "steps_per_replica": steps, "tokens": tokens, "params": numel,
        "H": H, "P": P, "seeds": args.seeds, "set": list(overrides),
        "seeds_per_variant": {label: [r["seed"] for r in per_seed[label]] for label in chosen}, "missing": missing,
        "in_progress": progress,
        "variants": {r["label"]: {"val_loss": round(r["val_loss"], 4), "val_loss_std": r["val_loss_std"],
                                  "val_loss_per_seed": r["val_loss_per_seed"],
                                  "bytes_ratio_vs_dp": round(r["bytes_ratio_vs_data_parallel"], 1),
                                  "loss_gap_pct_vs_dp": round(r["loss_gap_pct_vs_dp"], 2),
                                  "loss_gap_pct_vs_dp_same_seeds": None if r["loss_gap_pct_vs_dp_same_seeds"] is None
                                  else round(r["loss_gap_pct_vs_dp_same_seeds"], 2),
                                  "commits": r["commits"]} for r in rows},
        "val_loss": {r["label"]: round(r["val_loss"], 4) for r in rows},
        "bytes_sent_per_replica": {r["label"]: r["bytes_sent_per_replica"] for r in rows},
        "peak_bytes_per_step": {r["label"]: r["peak_bytes_per_step"] for r in rows},
        "bytes_ratio_vs_data_parallel": {r["label"]: round(r["bytes_ratio_vs_data_parallel"], 1) for r in rows},
        "streaming_e3m0_ratio_at_least_100x": by["streaming_e3m0"]["bytes_ratio_vs_data_parallel"] >= 100
        if "streaming_e3m0" in by else None,
        "rows": [{k: v for k, v in r.items() if k != "val_curve"} for r in rows],
        "curves": {r["label"]: r["val_curve"] for r in rows},
        "plot": None if args.no_plot else args.out, "device": args.device, "quick": args.quick, "state": str(store.directory),
        "seconds_this_invocation": round(time.time() - t0, 1),
        "seconds_training": round(sum(s["seconds"] for runs in per_seed.values() for s in runs), 1),
        "command": " ".join(["python bench/diloco.py", *sys.argv[1:]]),
    }
    print(json.dumps(summary))



if __name__ == "__main__":
    main()
