"""Atomic checkpoints: write to a temporary file, fsync, rename; a crash never leaves a torn one.

A checkpoint is ``<dir>/ckpt-<step>.pt`` holding tensors and plain Python values only, loaded with
``torch.load(weights_only=True)`` (no arbitrary unpickling). One format for ``train-local`` and the
daemon (:func:`checkpoint_state`): the step, the config, and under ``stages`` each stage's engine state
(:meth:`node.engine.StageEngine.state`: weights, inner optimizer, outer state, progress) by stage index;
train-local holds every stage, a daemon the one it serves. Each writer adds its own fields (the run id
and schedule position of a daemon; the losses and corpus fingerprint of train-local). The newest complete file wins; older
ones beyond ``keep`` are removed after a new one is in place, and temporary files left by a process
killed mid-write are removed by the next save. If the newest file is unreadable anyway (damaged
disk), :func:`load_latest` falls back to the one before it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")
CHECKPOINT_FORMAT = 2  # 1: the layouts before one engine (model/optimizer at the top level)


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used (corrupt, or made for another model)."""


def checkpoint_state(step: int, config: dict[str, Any], stages: dict[int, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """What a checkpoint holds: ``stages`` maps stage index → engine state; ``extra`` the writer's fields."""
    return {"format": CHECKPOINT_FORMAT, "step": step, "config": config, "stages": dict(stages), **extra}


def stage_state(state: dict[str, Any], stage: int, where: str | Path = "the checkpoint") -> dict[str, Any]:
    """The engine state of ``stage`` in a loaded checkpoint; CheckpointError when it is not there."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{where} has format {state.get('format', 1)}, this protoswarm reads format "
                              f"{CHECKPOINT_FORMAT}; move it away to start fresh")
    stages = state.get("stages") or {}
    if stage not in stages:
        raise CheckpointError(f"{where} holds stages {sorted(stages)}, not stage {stage}")
    return stages[stage]


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"ckpt-{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``directory``, oldest first (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` (whose ``step`` is ``step``) as the checkpoint of ``step`` atomically; prune all
    but the newest ``keep``."""
    if state.get("step", step) != step:
        raise ValueError(f"the state is of step {state.get('step')}, not {step}")
    return write_checkpoint(directory, lambda: state, keep)[0]


def write_checkpoint(directory: str | Path, take: Callable[[], dict[str, Any]], keep: int = 2,
                     hold: contextlib.AbstractContextManager | None = None) -> tuple[Path, int]:
    """Write the state ``take()`` returns as the checkpoint of its ``step``, atomically; prune all but the
    newest ``keep``. Returns the file and the step.

    ``take()`` runs and the state is serialized while ``hold`` is held (the lock of the state's owner), so
    ``take()`` may return the live tensors: torch.save writes them into the file one at a time (a CUDA
    tensor through one host copy of itself), with no second copy of the whole state in memory. Only the
    serialization, into the OS page cache, is under ``hold``; the fsync and the rename are not.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            with hold if hold is not None else contextlib.nullcontext():
                state = take()
                step = int(state["step"])
                torch.save(state, fh)
                del state
            fh.flush()
            os.fsync(fh.fileno())
        final = checkpoint_path(directory, step)
        os.replace(tmp_name, final)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    # Prune by step among the checkpoints up to this one; never the file just written.
    older = [path for s, path in list_checkpoints(directory) if s < step]
    for old in older[: max(0, len(older) - (keep - 1))]:
        old.unlink(missing_ok=True)
    written = final.stat().st_mtime
    for stale in directory.glob(".ckpt-*.tmp"):  # left by a process killed mid-write
        try:
            if stale.stat().st_mtime < written:
                stale.unlink()
        except FileNotFoundError:
            pass
    logger.info("checkpoint step=%d written to %s", step, final)
    return final, step


def set_aside(directory: str | Path, why: str) -> Path | None:
    """Move every checkpoint in ``directory`` into a new ``set-aside-<UTC time>`` folder inside it, so that the
    next saves (which prune all but the newest ``keep``) cannot delete them; the folder, or None when there
    were none. For a node that will not resume the checkpoints it found (another model, unreadable,
    ``train.resume`` off): it starts fresh, and what it found stays on disk. ``why`` goes into the log."""
    directory = Path(directory)
    found = list_checkpoints(directory)
    if not found:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = directory / f"set-aside-{stamp}", 1
    while target.exists():
        n += 1
        target = directory / f"set-aside-{stamp}-{n}"
    target.mkdir()
    for _, path in found:
        os.replace(path, target / path.name)
    logger.warning("%s: moved %d checkpoint(s) to %s (not deleted; remove them when no longer wanted)",
                   why, len(found), target)
    return target


def load_latest(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The newest readable checkpoint's state, or None when there is none.

    A checkpoint that cannot be read (a damaged disk, a file edited by hand: never a crash, whose
    writes are atomic) is skipped with a warning and the next older one is used, so a node resumes
    from its last good state instead of refusing to start. The damaged file is left where it is for
    inspection; the next save of that step replaces it. Raises CheckpointError only when checkpoints
    exist and none of them can be read.
    """
    found = list_checkpoints(directory)
    if not found:
        return None
    errors = []
    for step, path in reversed(found):
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # torch raises several types for a damaged file
            errors.append(f"{path.name} cannot be read ({err})")
        else:
            if isinstance(state, dict) and state.get("step") == step:
                if errors:
                    logger.warning("skipped %d unreadable checkpoint(s) in %s (%s); using %s", len(errors), directory,
                                   "; ".join(errors), path.name)
                return state
            errors.append(f"{path.name} does not hold step {step}")
    raise CheckpointError(f"no checkpoint in {directory} can be read: {'; '.join(errors)}; move them away to start fresh")
