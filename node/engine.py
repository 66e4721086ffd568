"""The stage engine: one stage's tensors and its inner training step, on one device.

:class:`StageEngine` is the only place where a stage trains. ``node train-local`` chains one engine per
stage in a process (:class:`node.chain.StageChain`), the daemon runs one (the whole model with one stage, one
pipeline stage otherwise), and the benches and the subspace exactness tests go through the same code.

What an engine owns, all on ``device`` (CUDA when ``train.device`` resolves to it):

- the stage module (weights and gradients, fp32 master weights) and the frozen seed-derived tensors
  (basis U, table T_fixed, RoPE tables), generated on the device when given there;
- the inner AdamW and its state; the optimizer step (linear warm-up, cosine decay, gradient clipping,
  an update whose gradients are not finite is skipped);
- the microbatches in flight: what a backward needs (``recompute``: the stage's input only, the forward
  is rerun at backward time; ``stash``: the forward's autograd graph);
- optionally the Streaming DiLoCo outer state (:class:`swarm.diloco.OuterLoop`), which keeps its global
  copy and momentum where ``outer_device`` says (pinned host memory by default on CUDA).

Forward passes run under bf16 autocast on CUDA; the residual stream stays fp32 (node/model.py). The
engine takes boundary tensors on any device and returns them on its own; moving them to the host for
the wire is the caller's business (``node.pipeline.PipelineCompute``).

A microbatch is a window of ``seq_len + 1`` token ids: every stage runs on all of them and the last
stage scores positions ``0..n-2`` predicting ids ``1..n-1`` (causal attention makes the extra position
invisible to the others), so train-local and the swarm compute the same loss on the same window.

Not thread-safe: one thread runs an engine's jobs at a time, holding :attr:`lock` (re-entrant) so that
a state download on another thread cannot replace the weights between a forward and its backward.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from node.config import ModelConfig, RunConfig, TrainConfig
from node.device import autocast, device_memory
from node.model import Stage, lm_loss, parameter_groups, shared_tensors, stage_layers

logger = logging.getLogger(__name__)

BACKWARD_MODES = ("recompute", "stash")


def lr_at(step: int, train: TrainConfig) -> float:
    """Linear warm-up to ``train.lr`` then cosine decay to ``lr·min_lr_ratio`` at ``train.steps``."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.steps - 1 - train.warmup_steps))
    return train.lr * (train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class UnknownMicrobatch(KeyError):
    """A backward for a microbatch this stage holds no stash of (never seen, dropped, or done)."""


@dataclass
class _Stash:
    ids: torch.Tensor
    boundary_in: torch.Tensor | None  # detached input (None on the first stage)
    leaf: torch.Tensor | None = None  # stash mode: the input leaf of the kept graph
    output: torch.Tensor | None = None  # stash mode: the forward output with its graph
    version: int = 0  # optimizer steps taken when the forward ran
    created: float = 0.0  # time.monotonic() of the forward


def build_stage(model: ModelConfig, layers: range, index: int, num_stages: int, seed: int,
                shared: tuple[torch.Tensor | None, torch.Tensor | None] | None = None) -> Stage:
    """Stage ``index`` at its seeded initialisation: a pure function of ``seed`` and the index, so every
    peer that starts the stage from scratch holds the same weights whatever its device (the trainable
    weights are drawn on the CPU; ``shared`` may already live on the device)."""
    torch.manual_seed(seed * 1_000_003 + index)
    return Stage(model, layers, index, num_stages, shared)


class StageEngine:
    """One stage's weights, inner optimizer, outer state and microbatches in flight, on one device."""

    def __init__(self, module: Stage, train: TrainConfig, device: torch.device | str = "cpu", *,
                 backward: str = "recompute", on_step: Callable[[int], None] | None = None) -> None:
        if backward not in BACKWARD_MODES:
            raise ValueError(f"backward mode must be one of {BACKWARD_MODES}, got {backward!r}")
        self.train_cfg = train
        self.device = torch.device(device)
        self.module: Stage = module.to(self.device)
        self.stage, self.num_stages = module.index, module.num_stages
        self.is_first, self.is_last = module.is_first, module.is_last
        self.mode = backward
        self.on_step = on_step
        # On CUDA the fused kernel: one launch for the whole stage, and no whole-group temporaries (the
        # default foreach AdamW takes sqrt(exp_avg_sq) of a parameter group at once: 4 B a parameter).
        groups = parameter_groups(self.module, train.weight_decay, train.subspace_lr_mult, train.embedding_lr_mult)
        self.optimizer = torch.optim.AdamW(groups, lr=train.lr,
                                           betas=(train.beta1, train.beta2), fused=self.device.type == "cuda")
        self.outer = None  # swarm.diloco.OuterLoop, attached by attach_outer()
        self.lock = threading.RLock()
        self.progress = 0  # optimizer steps these parameters have taken
        self.version = 0  # optimizer steps taken by this engine (stash validity)
        self.accumulated = 0  # microbatches in the current accumulation
        self.recomputed = 0  # stash-mode backwards that had to recompute (their graph was stale)
        self.skipped_steps = 0  # updates dropped because a gradient was not finite
        self.last_step_s = 0.0  # wall time of the last optimizer step
        self._stash: dict[Hashable, _Stash] = {}
        self._stash_lock = threading.Lock()
        self.module.train()

    # ---------------------------------------------------------------------------------------- properties

    @property
    def boundary_width(self) -> int:
        """Numbers per token on this stage's boundaries (k, or d for a dense model)."""
        return self.module.boundary_width

    @property
    def in_flight(self) -> int:
        """Microbatches whose forward ran here and whose backward has not (yet)."""
        return len(self._stash)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the stage computes with, by role (for the placement test and the memory plan):
        parameters, gradients, optimizer state and the frozen buffers."""
        out = {f"param:{n}": p for n, p in self.module.named_parameters()}
        out.update({f"grad:{n}": p.grad for n, p in self.module.named_parameters() if p.grad is not None})
        out.update({f"buffer:{n}": b for n, b in self.module.named_buffers() if b is not None})
        for i, state in enumerate(self.optimizer.state.values()):
            out.update({f"optim:{i}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim()})
        return out

    # ---------------------------------------------------------------------------------------- microbatches

    def _to_device(self, tensor: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        if tensor is None:
            return None
        return tensor.to(self.device, dtype or tensor.dtype, non_blocking=True)

    def _run(self, boundary_in: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            return self.module(boundary_in, ids)

    def forward(self, key: Hashable, ids: torch.Tensor, boundary_in: torch.Tensor | None) -> torch.Tensor:
        """Run a non-last stage on one microbatch and keep what its backward needs; returns the output
        boundary (on the device, no graph)."""
        if self.is_last:
            raise ValueError("the last stage runs forward_backward_last")
        if self.is_first != (boundary_in is None):
            raise ValueError(f"stage {self.stage}: boundary_in must be given to every stage but the first")
        with self._stash_lock:
            if key in self._stash:
                raise ValueError(f"microbatch {key!r} is already in flight on stage {self.stage}")
        ids = self._to_device(ids)
        boundary_in = self._to_device(boundary_in, torch.float32)
        stash = _Stash(ids=ids, boundary_in=boundary_in, version=self.version, created=time.monotonic())
        if self.mode == "stash":
            leaf = None if boundary_in is None else boundary_in.detach().requires_grad_(True)
            output = self._run(leaf, ids)
            stash.leaf, stash.output = leaf, output
            result = output.detach()
        else:
            with torch.no_grad():
                result = self._run(boundary_in, ids)
        with self._stash_lock:
            self._stash[key] = stash
        return result

    def backward(self, key: Hashable, grad_out: torch.Tensor) -> torch.Tensor | None:
        """Backpropagate ``grad_out`` (∂L/∂ output boundary); accumulates parameter gradients (and steps
        after ``train.grad_accum`` microbatches); returns ∂L/∂ input boundary (None on the first stage)."""
        with self._stash_lock:
            stash = self._stash.pop(key, None)
        if stash is None:
            raise UnknownMicrobatch(key)
        output, leaf = stash.output, stash.leaf
        if output is None or stash.version != self.version:
            if output is not None:  # the graph predates an optimizer step: its saved weights changed
                self.recomputed += 1
            leaf = None if stash.boundary_in is None else stash.boundary_in.detach().requires_grad_(True)
            output = self._run(leaf, stash.ids)
        if tuple(grad_out.shape) != tuple(output.shape):
            raise ValueError(f"gradient shape {list(grad_out.shape)} does not match the output {list(output.shape)}")
        output.backward(self._to_device(grad_out, output.dtype))
        self._accumulated_one()
        return None if leaf is None else leaf.grad

    def forward_backward_last(self, ids: torch.Tensor, boundary_in: torch.Tensor | None) -> tuple[float, torch.Tensor | None]:
        """Last stage (the whole model with one stage): the loss of one window and ∂L/∂ input boundary
        (None with one stage); gradients accumulated, a step taken after ``train.grad_accum`` of them."""
        if not self.is_last:
            raise ValueError("only the last stage computes the loss")
        if self.is_first != (boundary_in is None):
            raise ValueError(f"stage {self.stage}: boundary_in must be given to every stage but the first")
        ids = self._to_device(ids)
        leaf = None if boundary_in is None else self._to_device(boundary_in, torch.float32).detach().requires_grad_(True)
        loss = lm_loss(self._run(leaf, ids)[:, :-1], ids[:, 1:])
        value = loss.item()
        if not math.isfinite(value):  # never let a diverged microbatch into the accumulated gradients
            raise FloatingPointError(f"stage {self.stage}: loss is {value} at step {self.progress + 1}")
        (loss / self.train_cfg.grad_accum).backward()
        self._accumulated_one()
        return value, None if leaf is None else leaf.grad

    @torch.no_grad()
    def infer(self, ids: torch.Tensor, boundary_in: torch.Tensor | None, agreed: bool = False) -> torch.Tensor:
        """Forward only, nothing kept: the output boundary, or the loss of the window on the last stage.

        ``agreed``: compute with the Streaming DiLoCo global copies (the weights the stage's replicas
        agree on) instead of this replica's inner-step weights, when the stage has an outer loop. The
        module's parameters are not touched (a functional call with the global tensors in their place),
        so a training microbatch in flight, its stash or its graph, is unaffected."""
        ids = self._to_device(ids)
        boundary_in = self._to_device(boundary_in, torch.float32)
        if agreed and self.outer is not None:
            with autocast(self.device):
                out = torch.func.functional_call(self.module, self.agreed_parameters(), (boundary_in, ids),
                                                 strict=False)
        else:
            out = self._run(boundary_in, ids)
        return lm_loss(out[:, :-1], ids[:, 1:]) if self.is_last else out

    def agreed_parameters(self) -> dict[str, torch.Tensor]:
        """The outer loop's global copies by parameter name, on this engine's device (new tensors)."""
        out: dict[str, torch.Tensor] = {}
        for layout, flat in zip(self.outer.layouts, self.outer.global_, strict=True):
            out.update(layout.unflatten(flat.to(self.device)))
        return out

    def drop(self, key: Hashable) -> bool:
        """Forget a microbatch's stash (its downstream failed or timed out); True when there was one."""
        with self._stash_lock:
            return self._stash.pop(key, None) is not None

    def sweep(self, max_age_s: float) -> int:
        """Drop stashes older than ``max_age_s`` (their requester is gone); returns how many."""
        cutoff = time.monotonic() - max_age_s
        with self._stash_lock:
            old = [key for key, stash in self._stash.items() if stash.created < cutoff]
            for key in old:
                del self._stash[key]
        return len(old)

    # ---------------------------------------------------------------------------------------- the inner step

    def _accumulated_one(self) -> None:
        self.accumulated += 1
        if self.accumulated >= self.train_cfg.grad_accum:
            self.step()

    def step(self) -> bool:
        """The inner optimizer step over the accumulated gradients; False when it was skipped (a
        gradient was not finite). Gradients are cleared either way."""
        t, started = self.train_cfg, time.perf_counter()
        params = [p for p in self.module.parameters() if p.grad is not None]
        with self.lock:
            # One norm for both purposes: it is not finite exactly when some gradient is not.
            if not params:
                norm = torch.zeros(())
            elif t.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            finite = bool(torch.isfinite(norm))
            if finite:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr_at(self.progress, t) * group.get("lr_mult", 1.0)
                self.optimizer.step()
                self.module.project_()  # the ``projected`` parameterisation: back into span(U)
                self.progress += 1
            self.optimizer.zero_grad(set_to_none=True)
        self.accumulated = 0
        self.version += 1
        self.last_step_s = time.perf_counter() - started
        if not finite:
            self.skipped_steps += 1
            logger.warning("stage %d: non-finite gradients at step %d; that update was skipped", self.stage,
                           self.progress + 1)
        elif self.on_step is not None:
            try:
                self.on_step(self.progress)
            except Exception:  # a metrics or logging hook must never fail a microbatch
                logger.exception("stage %d: on_step hook failed", self.stage)
        return finite

    # ---------------------------------------------------------------------------------------- state

    def attach_outer(self, diloco: Any, outer_device: str = "auto") -> None:
        """Keep Streaming DiLoCo outer state for this stage (``diloco``: the run's [diloco] section).
        ``outer_device``: ``auto`` (pinned host memory when the engine is on CUDA, else the CPU),
        ``cpu``, ``pinned`` or ``device``."""
        from swarm.diloco import OuterLoop, units

        named = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        settings = diloco.for_units(len(units(named)))
        if settings.merge == "since" and (settings.outer_momentum or settings.outer_lr != 1):
            logger.warning("diloco.merge = 'since' with outer_lr %g and outer_momentum %g: measured only with plain "
                           "averaging (outer_lr 1, outer_momentum 0); with Nesterov 0.9 at lr 0.8 it diverged "
                           "(BENCHMARKS.md, \"Local Adam\")", settings.outer_lr, settings.outer_momentum)
        self.outer = OuterLoop(named, settings, **_outer_placement(outer_device, self.device))

    def state(self, copy: bool = True) -> dict[str, Any]:
        """The stage's state (the ``stages`` entry of a checkpoint): weights, inner optimizer, outer state,
        progress. Taken under :attr:`lock`; with ``copy`` a copy on the CPU that later steps cannot change,
        without it the live tensors themselves (read them only while holding :attr:`lock`)."""
        take = _copied if copy else (lambda value: value)
        with self.lock:
            return {
                "progress": self.progress,
                "model": take(self.module.state_dict()),
                "optimizer": take(self.optimizer.state_dict()),
                "outer": self.outer.state_dict(copy=copy) if self.outer is not None else None,
            }

    def load_state(self, state: dict[str, Any], *, strict_optimizer: bool = False) -> None:
        """Load :meth:`state` (tensors go to this engine's device). An inner optimizer or outer state
        that does not fit (another layout) is restarted with a warning unless ``strict_optimizer``."""
        with self.lock:
            self.module.load_state_dict(state["model"])
            if state.get("optimizer") is not None:
                try:
                    self.optimizer.load_state_dict(state["optimizer"])
                except (ValueError, KeyError) as exc:
                    if strict_optimizer:
                        raise
                    logger.warning("inner optimizer state does not fit (%s); restarting it", exc)
            if self.outer is not None and state.get("outer") is not None:
                try:
                    self.outer.load_state_dict(state["outer"])
                except (ValueError, KeyError) as exc:  # other fragments (config changed): start from the weights
                    if strict_optimizer:
                        raise
                    logger.warning("outer state does not fit (%s); restarting it", exc)
                    self.outer.reset()
            self.progress = int(state.get("progress", 0))
            self.version += 1  # any graph kept from before is stale now

    def memory(self) -> dict[str, Any]:
        """Memory of this engine's device (bytes): in use now, peak, total (see node/device.py)."""
        return device_memory(self.device)

    def measure_throughput(self, batch_size: int, seq_len: int, iters: int = 3) -> float:
        """Microbatches per second for forward + backward of this stage on a synthetic microbatch."""
        vocab = self.module.cfg.vocab_size
        ids = torch.randint(0, vocab, (batch_size, seq_len + 1), device=self.device)
        boundary = None if self.is_first else torch.randn(batch_size, seq_len + 1, self.boundary_width,
                                                          device=self.device)

        def once() -> None:
            out = self._run(boundary, ids)
            loss = lm_loss(out[:, :-1], ids[:, 1:]) if self.is_last else out.float().square().mean()
            loss.backward()
            self.module.zero_grad(set_to_none=True)

        with self.lock:
            once()  # warm-up
            _synchronize(self.device)
            start = time.perf_counter()
            for _ in range(iters):
                once()
            _synchronize(self.device)
        return iters / max(time.perf_counter() - start, 1e-9)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _outer_placement(spec: str, device: torch.device) -> dict[str, Any]:
    if spec == "device":
        return {"outer_device": device}
    if spec == "pinned" or (spec == "auto" and device.type == "cuda"):
        if not torch.cuda.is_available():
            raise ValueError("outer state in pinned host memory needs CUDA; use 'cpu' (or 'auto')")
        return {"outer_device": "cpu", "pin_memory": True}  # host memory, page-locked
    return {"outer_device": "cpu"}


def _copied(value: Any) -> Any:
    """``value`` with every tensor cloned to the CPU (and containers rebuilt): a state that later
    optimizer steps cannot change while it is being written."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    return value


def build_engine(cfg: RunConfig, stage: int, device: torch.device | str = "cpu", *, backward: str | None = None,
                 shared: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
                 on_step: Callable[[int], None] | None = None) -> StageEngine:
    """The engine of stage ``stage`` of ``cfg``'s model at its seeded initialisation, on ``device``.
    ``shared``: the basis and table, when several engines of one process share them."""
    device = torch.device(device)
    ranges = stage_layers(cfg.model, cfg.pipeline)
    if shared is None:
        shared = shared_tensors(cfg.model, device)
    module = build_stage(cfg.model, ranges[stage], stage, len(ranges), cfg.train.seed, shared)
    return StageEngine(module, cfg.train, device, backward=backward or cfg.dataplane.backward, on_step=on_step)


# ---------------------------------------------------------------------------------------------- a chain
