"""bench/convergence.py: a unit killed mid-way (a session's end) continues from its newest checkpoint to the result
an uncut run gives, and its checkpoints go once the result is saved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Runs one unit in a process of its own that SIGKILLs itself after step 25 of 36: nothing of it can clean up.
KILLED_AT_25 = """
import json, os, signal, sys
import torch
import bench.convergence as bench
torch.set_num_threads(int(sys.argv[2]))
train = bench.train_local
bench.train_local = lambda cfg, on_step: train(cfg, on_step=lambda step, loss: on_step(step, loss) or (
    step == 25 and os.kill(os.getpid(), signal.SIGKILL)))
bench.run_variant(*json.loads(sys.argv[1]))
"""


@pytest.fixture
def one_thread():
    """One torch thread, as the bench's ``--jobs`` workers train: with two, a validation pass in another process
    came out different in the 7th digit once in a few runs (the weights were the same)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_unit_killed_mid_way_continues_from_its_checkpoint_to_the_uncut_result(small_data_overrides, tmp_path,
                                                                                     capsys):
    from bench.convergence import run_variant
    from bench.resume import ResultStore, run_units
    from node.checkpoint import list_checkpoints

    common = [*(o for o in small_data_overrides if not o.startswith("train.checkpoint_dir")), "train.steps=36",
              "train.warmup_steps=3", "train.eval_every=12", "train.seed=1", "data.seed=1"]
    overrides = ["model.subspace_rank=8", "model.dense_tail_layers=2"]
    uncut = run_variant("k=8", overrides, common)  # a temporary directory: nothing kept
    assert "resumed_from_step" not in uncut
    said = capsys.readouterr().err
    assert [line.split(",")[0] for line in said.splitlines() if "step" in line and "loss" in line][:3] == [
        f"k=8 (seed 1): step {n}/36" for n in (3, 6, 9)]  # progress every twelfth of the run

    store = ResultStore(tmp_path / "state", {"test": "resume"})
    partial = store.partial("k8-s1")
    args = ["k=8", overrides, common, "cpu", str(partial)]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_25, json.dumps(args), str(torch.get_num_threads())],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    saved = [step for step, _ in list_checkpoints(partial)]
    assert saved and 0 < max(saved) <= 25 and max(saved) % 3 == 0, saved  # every twelfth of 36 steps
    noted = json.loads((partial / "seconds.json").read_text())  # the unit's seconds at each checkpoint
    assert noted[str(max(saved))] > 0

    results = run_units(store, [("k8-s1", "k=8 (seed 1)", tuple(args))], run_variant)
    row = results["k8-s1"]
    assert row["resumed_from_step"] == max(saved)
    assert row["val_loss"] == uncut["val_loss"]
    assert row["val_curve"] == uncut["val_curve"]
    assert row["tokens"] == uncut["tokens"]  # the whole unit's, not the resumed part's
    assert row["seconds"] > noted[str(max(saved))] and "seconds_this_part_only" not in row  # both parts'
    assert store.get("k8-s1") == json.loads(json.dumps(row))
    assert not partial.exists()  # saved, so its checkpoints are gone
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [".partial", "k8-s1.json"]


def test_a_kept_unit_or_a_fresh_run_drops_checkpoints_left_behind(tmp_path):
    from bench.resume import ResultStore, run_units

    store = ResultStore(tmp_path, {"test": "resume"})
    store.put("done", {"val_loss": 1.0})
    for key in ("done", "again"):
        store.partial(key).mkdir(parents=True)
        (store.partial(key) / "ckpt-00000004.pt").write_bytes(b"x")
    run_units(store, [("done", "done", ())], lambda: {"val_loss": 2.0})
    assert not store.partial("done").exists() and store.partial("again").exists()

    seen = []
    fresh = ResultStore(tmp_path, {"test": "resume"}, fresh=True)
    run_units(fresh, [("again", "again", ())], lambda: seen.append(store.partial("again").exists()) or {"val_loss": 3.0})
    assert seen == [False] and fresh.get("again") is None  # fresh reads nothing back
    assert ResultStore(tmp_path, {"test": "resume"}).get("again") == {"val_loss": 3.0}
    with pytest.raises(ValueError):
        store.partial("../elsewhere")


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_checkpoints_a_unit_cannot_resume_are_set_aside_and_it_starts_over(small_data_overrides, tmp_path, capsys):
    """A unit's folder holding another model's checkpoint (say, one cut off before a config field was added): the
    unit says so, sets it aside and trains from the start, to the result an uncut run gives."""
    from bench.convergence import run_variant
    from bench.resume import load_kept_tiny
    from node.train_local import train_local

    common = [*(o for o in small_data_overrides if not o.startswith("train.checkpoint_dir")), "train.steps=12",
              "train.warmup_steps=2", "train.eval_every=6", "train.seed=2", "data.seed=2"]
    overrides = ["model.subspace_rank=8", "model.dense_tail_layers=2"]
    uncut = run_variant("k=8", overrides, common)
    folder = tmp_path / "state" / ".partial" / "k8-s2"
    train_local(load_kept_tiny([*common, "model.subspace_rank=16", "train.steps=3", "train.eval_every=0",
                                f"train.checkpoint_dir='{folder}'"]))
    capsys.readouterr()
    again = run_variant("k=8", overrides, common, "cpu", str(folder))
    assert "k=8 (seed 2): the checkpoints in" in capsys.readouterr().err
    assert again["val_loss"] == uncut["val_loss"] and "resumed_from_step" not in again
    assert list(folder.glob("set-aside-*/ckpt-*.pt"))  # kept until the unit's result is saved (drop_partial)
