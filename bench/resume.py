"""Resumable long benches: every finished unit of work (one variant at one seed) is kept on disk.

A bench that takes hours on 2 cores is run as many units; each unit's result is written, atomically,
as one JSON file named by its key under a state directory, together with the commit it ran at and
the bench's *fingerprint* (the settings that make results comparable: steps, H, P, ...). Rerunning
the same command loads every unit already there with the same fingerprint and runs only the rest, so
a run can be stopped at any point (Ctrl-C, a session's end) and continued later. A unit run at
another commit is kept and reused, and its commit is reported with it; ``--fresh`` runs everything
again. A unit that checkpoints as it trains (bench/convergence.py's) keeps its checkpoints in
:meth:`ResultStore.partial` until its result is saved, so a unit cut off mid-way continues from its newest
checkpoint too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.checkpoint import list_checkpoints, set_aside
from node.model_config import automatic_dense_tail

ROOT = Path(__file__).resolve().parents[1]


def commit() -> dict[str, Any]:
    """The checkout's short commit and whether it has uncommitted changes (the kept units under bench/state,
    which a run writes as it goes, do not count: they would mark every later unit of the run dirty)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--", ".", ":(exclude)bench/state"))}


class ResultStore:
    """Finished units of one bench configuration, one JSON file each under ``directory``."""

    def __init__(self, directory: str | Path, fingerprint: dict[str, Any], fresh: bool = False,
                 device: str = "cpu") -> None:
        """``device``: where the units train; a GPU's (bf16 autocast) are another experiment than the CPU's, so
        the device joins the fingerprint and every key (:meth:`key`), and the CPU's keys stay as they were."""
        self.directory = Path(directory)
        self.device = device
        if device != "cpu":
            fingerprint = {**fingerprint, "device": device}
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it will read back
        self.fresh = fresh
        self.directory.mkdir(parents=True, exist_ok=True)
        self.here = commit()

    def key(self, base: str) -> str:
        """The key of a unit named ``base`` on this store's device."""
        return base if self.device == "cpu" else f"{base}-{self.device.replace(':', '')}"

    def _path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"a unit key must be a plain file name, got {key!r}")
        return self.directory / f"{key}.json"

    def partial(self, key: str) -> Path:
        """Where unit ``key`` keeps its checkpoints while it trains (a hidden folder of the state directory, left
        out of git by .gitignore): removed once its result is saved (:meth:`drop_partial`), so what is there is
        the newest state of a unit that was cut off, and its rerun continues from it."""
        self._path(key)  # the same plain-name rule as the results
        return self.directory / ".partial" / key

    def drop_partial(self, key: str) -> None:
        """Remove unit ``key``'s checkpoints (its result is saved, or ``--fresh`` starts it over)."""
        shutil.rmtree(self.partial(key), ignore_errors=True)

    def get(self, key: str) -> dict[str, Any] | None:
        """The saved result of ``key``, or None (none yet, another fingerprint, unreadable, or --fresh)."""
        path = self._path(key)
        if self.fresh or not path.exists():
            return None
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a torn or foreign file: the unit runs again and replaces it
        if not isinstance(saved, dict) or saved.get("fingerprint") != self.fingerprint:
            return None
        return saved.get("result")

    def foreign(self, key: str) -> dict[str, Any] | None:
        """The fingerprint of another configuration saved under ``key`` here (a unit that ``put`` must not
        overwrite: say, ``--replicas 2`` pointed at the state of a 4-replica run), else None."""
        try:
            saved = json.loads(self._path(key).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if isinstance(saved, dict) and "fingerprint" in saved and saved["fingerprint"] != self.fingerprint:
            return saved["fingerprint"]
        return None

    def put(self, key: str, result: dict[str, Any]) -> None:
        """Save ``result`` for ``key`` with the commit it ran at (written whole or not at all). Refuses to
        replace a unit of another configuration (:meth:`foreign`): its result would be lost."""
        other = self.foreign(key)
        if other is not None:
            raise ValueError(f"{self._path(key)} holds a unit of another configuration ({other}, not "
                             f"{self.fingerprint}): give this run a --state of its own")
        body = json.dumps({"fingerprint": self.fingerprint, **self.here, "result": result})
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())  # on disk before the unit's checkpoints go (drop_partial)
            os.replace(tmp, self._path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def commit_of(self, key: str) -> dict[str, Any] | None:
        """The commit a saved unit ran at."""
        path = self._path(key)
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return {"commit": saved.get("commit"), "dirty": saved.get("dirty")}


class UnitClock:
    """A unit's training seconds across the processes that trained it: each part notes the unit's seconds at every
    checkpointed step in the unit's checkpoint folder (``seconds.json``, written by the bench, never read from a
    peer), and a resumed part starts from what was noted at its step."""

    def __init__(self, folder: str | None) -> None:
        self.path = Path(folder) / "seconds.json" if folder else None
        self.noted: dict[str, float] = {}
        if self.path is not None:
            try:
                read = json.loads(self.path.read_text())
                self.noted = {str(k): float(v) for k, v in read.items()}
            except (OSError, ValueError, TypeError, AttributeError):
                pass  # none yet, or torn: this part's seconds only
        self.started, self.first_step = time.time(), None

    def restart(self) -> None:
        """The unit starts over (its checkpoints could not be resumed)."""
        self.noted, self.started, self.first_step = {}, time.time(), None

    def total(self, resumed_from: int | None) -> float | None:
        """The whole unit's seconds so far; None when the part it resumed from left no note at that step."""
        before = self.noted.get(str(resumed_from)) if resumed_from else 0.0
        return None if before is None else round(before + time.time() - self.started, 1)

    def saw(self, step: int) -> None:
        """Every step this part trains (the first one says where the part resumed)."""
        if self.first_step is None:
            self.first_step = step

    def note(self, step: int) -> None:
        """Keep the unit's seconds at checkpointed ``step``."""
        total = self.total(self.first_step - 1 if self.first_step else None)
        if self.path is None or total is None:
            return
        self.noted[str(step)] = total
        self.path.parent.mkdir(parents=True, exist_ok=True)  # (the step's checkpoint is written after this)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.noted))
        os.replace(tmp, self.path)


# What an in-process training result depends on (the swarm's sections -- exchange, swarm, dataplane -- do
# not train there): the sections the training benches hash.
TRAINING_SECTIONS = ("model", "pipeline", "data", "train", "wire")

# The tiny preset's model settings before it took the measured recipe (configs/model/tiny.toml: init 0.06,
# table 0.5 since 2026-12-07 and 0.3 before, 4 dense final layers): the convergence and DiLoCo benches train on top
# of these, so the units kept in bench/state keep their keys and every row stays the comparison it was measured as
# (the preset's recipe is the knob row "k=8 tail4 init0.06 T0.5", "... T0.3" before). ``--set`` comes after them
# and overrides them.
KEPT_TINY = ("model.init_std=0.02", "model.fixed_table_std=0.1", "model.min_dense_tail_layers=3")


def load_kept_tiny(overrides: list[str] | tuple[str, ...]):
    """``local/tiny`` with the model settings the kept units trained on (``KEPT_TINY``) under ``overrides``."""
    from node.config import load_config

    return load_config("local/tiny", [*KEPT_TINY, *overrides])


def config_digest(settings: dict[str, Any], sections: tuple[str, ...] | None = None) -> str:
    """Short hash of a resolved configuration (nested dicts of settings), for a unit's key: a result is
    reused only for the same settings, so a changed default makes it another unit.

    ``sections``: only those top-level sections count (a bench names the ones its result depends on, so a
    setting added to, say, the exchange does not orphan a training bench's results). Settings that are
    None or False (off, unset, automatic) are left out, so adding an optional setting whose default is
    off does not orphan the results already kept; turning it on does."""
    def kept(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: kept(v) for k, v in value.items() if v is not None and v is not False}
        return value
    if sections is not None:
        settings = {k: v for k, v in settings.items() if k in sections}
    settings = _without_inert_tail(settings)
    return hashlib.sha256(json.dumps(kept(settings), sort_keys=True, default=str).encode()).hexdigest()[:12]


def _without_inert_tail(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without ``model.min_dense_tail_layers`` where it changes nothing (0, a dense model, an
    explicit ``dense_tail_layers`` or ``layer_splits``, one stage), so the units kept before it existed keep
    their keys: the setting came with a default of 3, and only the models it reshapes are other units."""
    model, pipeline = settings.get("model"), settings.get("pipeline") or {}
    if not isinstance(model, dict) or "min_dense_tail_layers" not in model:
        return settings
    if model.get("dense_tail_layers") is None and automatic_dense_tail(
            n_layers=model["n_layers"], num_stages=pipeline.get("num_stages", 1),
            subspace_rank=model.get("subspace_rank"), dense_tail_layers=None,
            min_dense_tail_layers=model["min_dense_tail_layers"], layer_splits=pipeline.get("layer_splits")):
        return settings
    return {**settings, "model": {k: v for k, v in model.items() if k != "min_dense_tail_layers"}}


def run_units(store: ResultStore, units: list[tuple[str, str, tuple]], work: Callable[..., dict[str, Any]],
              jobs: int = 1, threads: int = 1, deadline_s: float | None = None) -> dict[str, dict[str, Any]]:
    """Every unit's result: the kept ones from ``store``, the rest computed by ``work(*args)`` and saved
    as each finishes. ``units``: (key, what to print, args), run in that order. ``jobs`` > 1 runs that many
    units at a time, each in a worker process of its own (spawned, ``threads`` torch threads each); ``work``
    must then be a module-level function. ``deadline_s``: no unit starts that many seconds after the call
    began (the running ones finish); the units left are reported and the call exits non-zero, like a unit
    that fails (its traceback is printed and the others go on). Finished units stay saved either way, so a
    rerun continues. A unit's checkpoints (:meth:`ResultStore.partial`) are removed once its result is saved,
    and before it starts with ``--fresh``."""
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    pending = []
    for key, what, args in units:
        row = store.get(key)
        if row is None:
            pending.append((key, what, args))
            if store.fresh:
                store.drop_partial(key)
        else:
            results[key] = row
            store.drop_partial(key)
            print(f"{what}: kept from {store.commit_of(key)}", file=sys.stderr, flush=True)
    clashes = [f"{store._path(key)} ({other})" for key, _, _ in pending if (other := store.foreign(key)) is not None]
    if clashes:  # before any training: the run could not save its results there
        raise SystemExit(f"{store.directory} holds units of another configuration than this run's "
                         f"({store.fingerprint}): {', '.join(clashes)}; give this run a --state of its own")
    failed: list[str] = []
    queue = list(reversed(pending))

    def may_start() -> bool:
        return bool(queue) and (deadline_s is None or time.monotonic() - started < deadline_s)

    if jobs <= 1:
        while may_start():
            key, what, args = queue.pop()
            print(f"training {what} ...", file=sys.stderr, flush=True)
            results[key] = work(*args)
            store.put(key, results[key])
            store.drop_partial(key)
    elif pending:
        import concurrent.futures as cf
        import multiprocessing
        import traceback

        print(f"{len(pending)} unit(s) to run, {jobs} at a time", file=sys.stderr, flush=True)
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_worker_init, initargs=(threads, os.getpid())) as pool:
            running: dict[cf.Future, tuple[str, str]] = {}
            try:
                while True:
                    while len(running) < jobs and may_start():
                        key, what, args = queue.pop()
                        running[pool.submit(work, *args)] = (key, what)
                    if not running:
                        break
                    finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                    for future in finished:
                        key, what = running.pop(future)
                        try:
                            results[key] = future.result()
                        except Exception as exc:  # one failed unit must not lose the others
                            failed.append(what)
                            print(f"FAILED {what}: {exc!r}\n{''.join(traceback.format_exception(exc))}",
                                  file=sys.stderr, flush=True)
                            continue
                        store.put(key, results[key])
                        store.drop_partial(key)
                        print(f"finished {what} ({len(pending) - len(queue) - len(running)}/{len(pending)})",
                              file=sys.stderr, flush=True)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    problems = [f"{len(failed)} unit(s) failed: {', '.join(failed)}"] if failed else []
    if queue:
        problems.append(f"{len(queue)} unit(s) not started before the {deadline_s:g}-s deadline: "
                        f"{', '.join(what for _, what, _ in reversed(queue))}")
    if problems:
        raise SystemExit("; ".join(problems) + " (the finished units are saved; rerun to continue)")
    return results


def in_progress(store: ResultStore, units: list[tuple], done: dict[str, Any]) -> dict[str, int]:
    """The units (key, what to print, ...) not in ``done`` that a cut-off run left checkpoints of, and the step each
    continues from (``--kept``'s ``in_progress``)."""
    return {what: found[-1][0] for key, what, *_ in units
            if key not in done and (found := list_checkpoints(store.partial(key)))}


def set_aside_unit(checkpoint_dir: str, unit: str, why: Exception) -> None:
    """Checkpoints of ``unit`` that cannot be resumed (another unit's, another layout's, unreadable): moved aside,
    not deleted, with a line saying so; the caller starts the unit over."""
    set_aside(checkpoint_dir, f"{unit}: its checkpoints cannot be resumed")
    print(f"{unit}: the checkpoints in {checkpoint_dir} cannot be resumed ({why}); set aside, the unit starts over",
          file=sys.stderr, flush=True)


def kept_units(store: ResultStore, units: list[tuple]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``--kept``: the results of the ``units`` (key, what to print, ...) saved in ``store``, and what each missing
    one prints as; nothing is trained."""
    done = {unit[0]: row for unit in units if (row := store.get(unit[0])) is not None}
    return done, [unit[1] for unit in units if unit[0] not in done]


def mean_over_seeds(label: str, runs: list[dict]) -> dict:
    """A variant's table row from its seeds' kept results: the mean validation loss and the curve of the mean
    (each ``val_curve`` a list of (x, loss) at the same x), the spread, each seed's loss, the commits, devices."""
    losses = [r["val_loss"] for r in runs]
    curve = [(x, statistics.fmean(r["val_curve"][i][1] for r in runs)) for i, (x, _) in enumerate(runs[0]["val_curve"])]
    return {**{k: v for k, v in runs[0].items() if k not in ("seed", "commit", "dirty", "resumed_from_step")}, "label": label,
            "val_loss": statistics.fmean(losses), "val_curve": curve,
            "val_loss_std": round(statistics.stdev(losses), 4) if len(losses) > 1 else None,
            "val_loss_per_seed": [round(v, 4) for v in losses],
            "commits": sorted({f"{r.get('commit')}{'+dirty' if r.get('dirty') else ''}" for r in runs}),
            "devices": sorted({r.get("device", "cpu") for r in runs})}


def _worker_init(threads: int, parent: int | None = None) -> None:
    import torch

    torch.set_num_threads(threads)
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), name="exit-with-parent", daemon=True).start()


def _exit_with(parent: int, every_s: float = 1.0) -> None:
    """End this worker once ``parent`` (the runner) is gone: a killed runner must not leave its workers training
    units nobody can save. A child outliving its parent is re-parented, so its parent pid changes."""
    while os.getppid() == parent:
        time.sleep(every_s)
    print(f"bench worker {os.getpid()}: the runner ({parent}) is gone; stopping", file=sys.stderr, flush=True)
    os._exit(3)
