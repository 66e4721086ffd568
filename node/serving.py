"""The stage a daemon serves: its parameters, its checkpoint, and (with one stage) local training.

:class:`StageWork` owns the module of one stage. With ``pipeline.num_stages == 1`` the stage is the
whole model and the daemon trains it as a local replica while it serves; with more stages it holds
the stage's parameters and inner optimizer, which :class:`node.pipeline.PipelineCompute` trains from
the microbatches of the pipeline. With ``diloco.enabled`` it also holds the stage's Streaming DiLoCo
outer state (:class:`swarm.diloco.OuterLoop`: global copy and momentum per fragment), which travels
with the weights in snapshots and checkpoints; node/replica_sync.py drives it.

A fresh stage is initialised from ``train.seed`` and the stage index alone, so every peer that starts
stage s from scratch holds the same weights. ``lock`` guards the parameters: the trainer holds it
for each optimizer step, snapshots (for peers downloading this stage) copy under it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from node.checkpoint import CheckpointError, load_latest, save_checkpoint
from node.config import RunConfig
from node.data import BatchSampler, load_corpus
from node.model import LanguageModel, Stage, lm_loss, parameter_groups
from node.train_local import _train_step
from swarm.diloco import OuterLoop, OuterSettings, units
from swarm.state_transfer import StageSnapshot

OUTER_PREFIX = "outer."  # snapshot entries of the outer state: outer.global.<p>, outer.momentum.<p>

logger = logging.getLogger(__name__)


class StageWork:
    def __init__(self, cfg: RunConfig, run_id: str, stage: int, checkpoint_dir: Path):
        self.cfg, self.run_id, self.stage = cfg, run_id, stage
        self.checkpoint_dir = checkpoint_dir
        self.single = cfg.pipeline.num_stages == 1
        self.lock = threading.Lock()
        self.progress = 0  # optimizer steps this stage's parameters have taken
        self.throughput = 0.0  # microbatches per second (EMA while training, else measured)
        self.compute_s = 0.0  # wall time inside local training steps (S = 1)
        self.last_step_s = 0.0
        self.started_at: float | None = None  # unix time the first local training step began
        torch.manual_seed(cfg.train.seed * 1_000_003 + stage)
        if self.single:
            self.module: torch.nn.Module = LanguageModel(cfg.model, cfg.pipeline)
        else:
            ranges = cfg.pipeline.stage_ranges(cfg.model.n_layers)
            self.module = Stage(cfg.model, ranges[stage], stage, cfg.pipeline.num_stages)
        t = cfg.train
        # The inner optimizer: local training (one stage) or pipeline steps (node/pipeline.py).
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.module, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2)
        )
        self.outer: OuterLoop | None = None
        if cfg.diloco.enabled:
            named = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
            self.outer = OuterLoop(named, outer_settings(cfg, list(named)))

    # state -----------------------------------------------------------------------------------------------

    def snapshot(self) -> StageSnapshot:
        with self.lock:
            tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.module.state_dict().items()}
            tensors.update(self._outer_tensors())
            return StageSnapshot(stage=self.stage, step=self.progress, round_id=self.outer_rounds, tensors=tensors)

    def consensus_snapshot(self) -> StageSnapshot | None:
        """What the stage's replicas agree on: global copies, momenta and history, no local weights.

        ``step`` is 0 and ``round_id`` a hash of the history, so replicas that applied the same means
        serve identical bytes under one digest and a joiner can fetch it from several of them.
        """
        if self.outer is None:
            return None
        with self.lock:
            tensors = self._outer_tensors()
            history = "|".join(self.outer.history())
        tag = int.from_bytes(hashlib.sha256(history.encode()).digest()[:7], "little")
        return StageSnapshot(stage=self.stage, step=0, round_id=tag, tensors=tensors)

    def load_consensus(self, snap: StageSnapshot) -> None:
        """Take the stage's agreed outer state and start the local weights from its global copies."""
        self.check_compatible(snap, self._outer_tensors())
        with self.lock:
            self._load_outer(snap.tensors)
            with torch.no_grad():
                for layout, flat in zip(self.outer.layouts, self.outer.global_, strict=True):
                    for name, value in layout.unflatten(flat).items():
                        param = self.outer.params[name]
                        param.copy_(value.to(param.device, param.dtype))

    def _load_outer(self, tensors: dict[str, torch.Tensor]) -> None:
        n = len(self.outer.global_)
        self.outer.load_state_dict({
            "global": [tensors[f"{OUTER_PREFIX}global.{p}"] for p in range(n)],
            "momentum": [tensors[f"{OUTER_PREFIX}momentum.{p}"] for p in range(n)],
            "rounds_applied": self.outer.rounds_applied,
            "last_round": tensors[f"{OUTER_PREFIX}last_round"].tolist(),
            "chain": [bytes(row.tolist()) for row in tensors[f"{OUTER_PREFIX}chain"]],
        })

    @property
    def outer_rounds(self) -> int:
        """Outer rounds applied to this state (all fragments): part of a snapshot's identity."""
        return sum(self.outer.rounds_applied) if self.outer is not None else 0

    def _outer_tensors(self) -> dict[str, torch.Tensor]:
        if self.outer is None:
            return {}
        state = self.outer.state_dict()
        out = {f"{OUTER_PREFIX}global.{p}": g for p, g in enumerate(state["global"])}
        out.update({f"{OUTER_PREFIX}momentum.{p}": m for p, m in enumerate(state["momentum"])})
        out[f"{OUTER_PREFIX}last_round"] = torch.tensor(state["last_round"], dtype=torch.int64)
        out[f"{OUTER_PREFIX}chain"] = torch.frombuffer(bytearray(b"".join(state["chain"])), dtype=torch.uint8).view(-1, 32)
        return out

    def check_compatible(self, snap: StageSnapshot, own: dict[str, torch.Tensor] | None = None) -> None:
        """Refuse (ValueError) a downloaded state whose names, shapes or dtypes differ from this stage's
        (``own``: what to compare with; default the weights and the outer state)."""
        if own is None:
            own = {**self.module.state_dict(), **self._outer_tensors()}
        if snap.stage != self.stage or set(snap.tensors) != set(own):
            missing, extra = sorted(set(own) - set(snap.tensors)), sorted(set(snap.tensors) - set(own))
            raise ValueError(f"state is not stage {self.stage}'s: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, tensor in own.items():
            got = snap.tensors[name]
            if got.shape != tensor.shape or got.dtype != tensor.dtype:
                raise ValueError(f"{name}: got {tuple(got.shape)} {got.dtype}, expected {tuple(tensor.shape)} {tensor.dtype}")

    def load(self, snap: StageSnapshot) -> None:
        with self.lock:
            self.module.load_state_dict({k: v for k, v in snap.tensors.items() if not k.startswith(OUTER_PREFIX)})
            if self.outer is not None:
                self._load_outer(snap.tensors)
            self.progress = snap.step

    def save_checkpoint(self) -> Path | None:
        with self.lock:
            state = {
                "step": self.progress,
                "run_id": self.run_id,
                "stage": self.stage,
                "config": self.cfg.to_dict(),
                "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "outer": self.outer.state_dict() if self.outer is not None else None,
            }
        path = save_checkpoint(self.checkpoint_dir, self.progress, state)
        logger.info("checkpoint of stage %d at step %d saved in %s", self.stage, self.progress, self.checkpoint_dir)
        return path

    def resume(self) -> bool:
        """Load this node's own checkpoint of the same run, stage and model; False if there is none."""
        try:
            state = load_latest(self.checkpoint_dir)
        except CheckpointError as exc:
            logger.warning("ignoring unreadable checkpoint in %s: %s", self.checkpoint_dir, exc)
            return False
        if state is None:
            return False
        now = self.cfg.to_dict()
        same = (
            state.get("run_id") == self.run_id
            and state.get("stage") == self.stage
            and all(state.get("config", {}).get(s) == now[s] for s in ("model", "pipeline"))
        )
        if not same:
            logger.warning("checkpoint in %s belongs to another run/stage/model; not resuming", self.checkpoint_dir)
            return False
        with self.lock:
            self.module.load_state_dict(state["model"])
            if self.optimizer is not None and state.get("optimizer") is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            if self.outer is not None and state.get("outer") is not None:
                try:
                    self.outer.load_state_dict(state["outer"])
                except (ValueError, KeyError) as exc:  # other fragments (config changed): start from the weights
                    logger.warning("outer state in the checkpoint does not fit (%s); restarting it", exc)
                    self.outer.reset()
            self.progress = int(state["step"])
        logger.info("resumed stage %d at step %d from %s", self.stage, self.progress, self.checkpoint_dir)
        return True

    # throughput ------------------------------------------------------------------------------------------

    def measure_throughput(self, iters: int = 3) -> float:
        """Microbatches per second for forward + backward of this stage on a synthetic microbatch."""
        t, m = self.cfg.train, self.cfg.model
        ids = torch.randint(0, m.vocab_size, (t.batch_size, t.seq_len))
        module = self.module
        stage = module.stages[0] if self.single else module
        width = stage.boundary_width

        def step() -> None:
            if self.single:
                loss = module(ids, ids)
            else:
                boundary = None if stage.is_first else torch.randn(t.batch_size, t.seq_len, width)
                out = stage(boundary, ids)
                loss = lm_loss(out, ids) if stage.is_last else out.float().square().mean()
            loss.backward()
            module.zero_grad(set_to_none=True)

        step()  # warm-up
        start = time.perf_counter()
        for _ in range(iters):
            step()
        self.throughput = iters / max(time.perf_counter() - start, 1e-9)
        return self.throughput

    # local training (one stage = whole model) ----------------------------------------------------------

    def train(self, stop: threading.Event, on_step: Callable[[int, float], None] | None = None) -> None:
        """Train until ``train.steps`` or ``stop``; stops only at step boundaries."""
        assert self.single and self.optimizer is not None
        cfg, t = self.cfg, self.cfg.train
        corpus = load_corpus(cfg.data)
        sampler = BatchSampler.from_config(corpus.train, t.seq_len, t.batch_size, cfg.data)
        self.module.train()
        samples = t.batch_size * t.grad_accum
        while not stop.is_set() and self.progress < t.steps:
            start = time.perf_counter()
            if self.started_at is None:
                self.started_at = time.time()
            with self.lock:
                loss = _train_step(self.module, self.optimizer, sampler, self.progress, cfg, torch.device("cpu"))
                self.progress += 1
            self.last_step_s = time.perf_counter() - start
            self.compute_s += self.last_step_s
            rate = samples / max(self.last_step_s, 1e-9) / t.grad_accum
            self.throughput = rate if self.throughput == 0 else 0.9 * self.throughput + 0.1 * rate
            if on_step is not None:
                on_step(self.progress, loss)
            if t.checkpoint_every and self.progress % t.checkpoint_every == 0:
                self.save_checkpoint()
        if self.progress >= t.steps:
            logger.info("reached train.steps=%d; serving without training", t.steps)


def outer_settings(cfg: RunConfig, names: list[str]) -> OuterSettings:
    """The Streaming DiLoCo settings of a stage with these parameters: P capped at the stage's units
    (blocks and other parameters), H rounded down to a multiple of P so the P offsets are evenly spaced."""
    d = cfg.diloco
    fragments = max(1, min(d.fragments, len(units(names))))
    spacing = max(1, d.inner_steps // fragments)
    inner = spacing * fragments
    return OuterSettings(inner_steps=inner, fragments=fragments, fragment_mode=d.fragment_mode, outer_lr=d.outer_lr,
                         outer_momentum=d.outer_momentum, nesterov=d.nesterov, overlap=min(d.overlap, inner - 1),
                         alpha=d.alpha)
