"""A stage's persistence: its checkpoints, its snapshots for peers, and loading either back.

:class:`StageStore` keeps the state of one stage's :class:`node.engine.StageEngine` (the stage's tensors
on the daemon's device: weights, inner optimizer, and with ``diloco.enabled`` the Streaming DiLoCo outer
state, :class:`swarm.diloco.OuterLoop`) on disk and on the wire:

- **Checkpoints** (docs/node.md, "Checkpoints and crashes"; the format of node/checkpoint.py) hold the
  engine state (weights, inner optimizer, outer state, progress: the learning-rate schedule's
  position), the replica-sync schedule position and the data position. :meth:`maybe_checkpoint` writes
  one every ``train.checkpoint_every`` steps of progress, on a background thread that writes the live
  tensors into the file under the engine's lock, one at a time with no copy of the state (training waits
  while they go into the page cache, not for the fsync).
  :meth:`resume` loads this node's newest checkpoint of the same run, stage and model.
- **Snapshots** for peers downloading the stage (swarm/state_transfer.py): the whole state
  (:meth:`snapshot`), or with replica sync the consensus only (:meth:`consensus_snapshot`: global copies,
  momenta and history, identical bytes on every replica that applied the same means); and loading them
  (:meth:`load`, :meth:`load_consensus`) after checking names, shapes and dtypes.

A fresh stage (:meth:`StageStore.fresh`) is initialised from ``train.seed`` and the stage index alone,
so every peer that starts stage s from scratch holds the same weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from node.checkpoint import (
    CheckpointError,
    checkpoint_state,
    load_latest,
    set_aside,
    stage_state,
    write_checkpoint,
)
from node.config import RunConfig
from node.engine import StageEngine, build_engine
from swarm.state_transfer import StageSnapshot

OUTER_PREFIX = "outer."  # snapshot entries of the outer state: outer.global.<p>, outer.momentum.<p>

logger = logging.getLogger(__name__)


class StageStore:
    """The checkpoints and snapshots of one stage's engine (see the module docstring)."""

    def __init__(self, cfg: RunConfig, run_id: str, engine: StageEngine, checkpoint_dir: Path):
        self.cfg, self.run_id, self.stage, self.engine = cfg, run_id, engine.stage, engine
        self.checkpoint_dir = checkpoint_dir
        self.single = cfg.pipeline.num_stages == 1
        # Checkpoints: what they add to the weights, and when the next periodic one is due.
        self.resumed_from: int | None = None  # the checkpoint's step, when this stage resumed from one
        self.resumed_schedule: dict[str, int] | None = None  # its replica-sync position, until ReplicaSync takes it
        self.schedule_state: Callable[[], dict[str, int] | None] | None = None  # set by ReplicaSync.attach
        self.data_position: int | None = None  # S = 1 and a pipeline's stage 0: the next microbatch drawn
        self.saved_step: int | None = None  # progress of the newest checkpoint written or loaded
        self._next_save = max(0, cfg.train.checkpoint_every)
        self._write_lock = threading.Lock()  # one checkpoint write at a time
        self._writer: threading.Thread | None = None

    @classmethod
    def fresh(cls, cfg: RunConfig, run_id: str, stage: int, checkpoint_dir: Path,
              device: torch.device | str = "cpu") -> StageStore:
        """Stage ``stage`` at its seeded initialisation on ``device`` (with its outer state when
        ``diloco.enabled``: then its inner optimizer peaks at ``diloco.inner_lr`` where set), stored under
        ``checkpoint_dir``."""
        inner = cfg
        if cfg.diloco.enabled and cfg.diloco.inner_lr is not None:
            inner = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=cfg.diloco.inner_lr))
        engine = build_engine(inner, stage, device)
        if cfg.diloco.enabled:
            engine.attach_outer(cfg.diloco, cfg.diloco.outer_device)
        return cls(cfg, run_id, engine, checkpoint_dir)

    # the engine's tensors --------------------------------------------------------------------------------

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    @property
    def outer(self):
        return self.engine.outer

    @property
    def lock(self) -> threading.RLock:
        return self.engine.lock

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def progress(self) -> int:
        """Optimizer steps this stage's parameters have taken."""
        return self.engine.progress

    @progress.setter
    def progress(self, value: int) -> None:
        self.engine.progress = value

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
                    for name, value in layout.unflatten(flat.to(self.device)).items():  # one copy a fragment
                        self.outer.params[name].copy_(value)

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
            self.engine.version += 1  # graphs kept from before are stale

    # checkpoints -----------------------------------------------------------------------------------------

    def checkpoint_state(self, copy: bool = True, schedule: dict | None = None) -> dict[str, Any]:
        """Everything a checkpoint holds, taken under ``lock``: with ``copy`` a copy, without it the live
        tensors (for a writer holding ``lock``). ``schedule``: the replica-sync position (default: asked
        now, before ``lock``: it has its own lock and must never be taken inside ours)."""
        if schedule is None and self.schedule_state is not None:
            schedule = self.schedule_state()
        with self.lock:
            return checkpoint_state(self.progress, self.cfg.to_dict(), {self.stage: self.engine.state(copy=copy)},
                                    run_id=self.run_id, stage=self.stage, saved_at=time.time(), schedule=schedule,
                                    data_position=self._data_position())

    def _data_position(self) -> int | None:
        """The next microbatch the stage's sampler draws: S = 1 and a pipeline's stage 0 (which drives
        the microbatches); None on the other pipeline stages, which draw none."""
        if not self._draws_data:
            return None
        drawn = self.data_position
        return drawn if drawn is not None else self.progress * self.cfg.train.grad_accum

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current state now (after any periodic write still running)."""
        self.wait_for_checkpoint()
        return self._write()

    def maybe_checkpoint(self) -> bool:
        """After an optimizer step: start a periodic checkpoint in the background when one is due
        (every ``train.checkpoint_every`` steps of progress; skipped while the previous one is still
        being written, and tried again at the next step). True when one was started."""
        every = self.cfg.train.checkpoint_every
        if not every or self.progress < self._next_save:
            return False
        if self._writer is not None and self._writer.is_alive():
            return False
        self._next_save = (self.progress // every + 1) * every
        self._writer = threading.Thread(target=self._write_quietly, name="checkpoint", daemon=True)
        self._writer.start()
        return True

    def wait_for_checkpoint(self, timeout: float | None = None) -> bool:
        """Wait for a background checkpoint write; False if it is still running after ``timeout``."""
        writer = self._writer
        if writer is not None:
            writer.join(timeout)
            return not writer.is_alive()
        return True

    def _write(self) -> Path:
        """Stream the live state into a checkpoint under the engine's lock: no copy of it is made (training
        waits while it is written into the page cache, not for the fsync; node/checkpoint.py)."""
        started = time.monotonic()
        schedule = self.schedule_state() if self.schedule_state is not None else None  # before our lock
        with self._write_lock:
            take = lambda: self.checkpoint_state(copy=False, schedule=schedule)  # noqa: E731
            path, step = write_checkpoint(self.checkpoint_dir, take, keep=self.cfg.train.checkpoint_keep, hold=self.lock)
            self.saved_step = step
        logger.info("checkpoint of stage %d at step %d saved in %s (%.2f s)", self.stage, step,
                    self.checkpoint_dir, time.monotonic() - started)
        return path

    def _write_quietly(self) -> None:
        try:
            self._write()
        except Exception:  # a full disk must not stop training; the previous checkpoint is intact
            logger.exception("stage %d: cannot write a checkpoint at step %d", self.stage, self.progress)

    def _schedule_next_save(self) -> None:
        every = self.cfg.train.checkpoint_every
        self._next_save = (self.progress // every + 1) * every if every else 0

    def resume(self) -> bool:
        """Load this node's own checkpoint of the same run, stage and model; False if there is none
        (or ``train.resume`` is off). The newest readable one is used (node/checkpoint.py). Checkpoints that
        are there but not resumed (resume off, unreadable, another run/stage/model) are set aside into a
        subfolder, never left for the next saves to prune."""
        if not self.cfg.train.resume:
            set_aside(self.checkpoint_dir, "train.resume=false: not resuming")
            return False
        try:
            state = load_latest(self.checkpoint_dir)
            saved = stage_state(state, self.stage, self.checkpoint_dir) if state is not None else None
        except CheckpointError as exc:
            set_aside(self.checkpoint_dir, f"ignoring unusable checkpoints ({exc})")
            return False
        if saved is None:
            return False
        now = self.cfg.to_dict()
        differ = [s for s in ("model", "pipeline") if state.get("config", {}).get(s) != now[s]]
        if state.get("run_id") != self.run_id or state.get("stage") != self.stage or differ:
            found = (f"run {state.get('run_id')!r}, stage {state.get('stage')}"
                     + (f", another [{'], ['.join(differ)}] config" if differ else ""))
            set_aside(self.checkpoint_dir, f"not resuming the checkpoint in {self.checkpoint_dir} ({found}; "
                                           f"this node serves run {self.run_id!r}, stage {self.stage})")
            return False
        with self.lock:
            self.engine.load_state(saved)
            position = state.get("data_position")
            self.data_position = int(position) if position is not None and self._draws_data else None
            schedule = state.get("schedule")
            self.resumed_schedule = dict(schedule) if isinstance(schedule, dict) else None
        self.resumed_from = self.saved_step = self.progress
        self._schedule_next_save()
        age = time.time() - float(state.get("saved_at", time.time()))
        rounds = self.outer.history() if self.outer is not None else []
        logger.info("resumed from checkpoint step %d (stage %d, saved %.0f s ago%s%s) in %s", self.progress,
                    self.stage, age, f", outer history {rounds}" if rounds else "",
                    f", schedule epoch {self.resumed_schedule.get('outer_epoch')}" if self.resumed_schedule else "",
                    self.checkpoint_dir)
        return True

    @property
    def _draws_data(self) -> bool:
        """S = 1 and a pipeline's stage 0 draw microbatches from a sampler; other stages draw none."""
        return self.single or self.stage == 0
