"""bench/diloco.py: a unit killed mid-way continues from its newest checkpoint, taken where no round was in flight,
to the result an uncut unit gives (error-feedback residuals, outer momenta and the recorded curve included)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SMALL = ("model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "model.n_layers=2")
# label, seed, steps, H, P, replicas, device, overrides: 24 steps (a checkpoint every 2), 2 replicas
UNIT = ("streaming_e3m0_ef", 1, 24, 8, 2, 2, "cpu", SMALL)

# Runs one unit in a process of its own that SIGKILLs itself as step 15 ends, before its checkpoint could be taken.
KILLED_AT_15 = """
import json, os, signal, sys
import torch
import bench.diloco as bench
torch.set_num_threads(int(sys.argv[2]))
checkpoint = bench.Run.checkpoint
def cut(self, t, *args):
    if t == 15:
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint(self, t, *args)
bench.Run.checkpoint = cut
bench.train_unit(*json.loads(sys.argv[1]))
"""


@pytest.fixture
def one_thread():
    """One torch thread, as the bench's ``--jobs`` workers train."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _same_row(row: dict, uncut: dict) -> None:
    for field in ("val_loss", "val_curve", "train_loss_end", "bytes_sent_per_replica", "peak_bytes_per_step",
                  "syncs", "parts_rejected"):
        assert json.loads(json.dumps(row[field])) == json.loads(json.dumps(uncut[field])), field


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_streaming_unit_killed_mid_way_continues_from_a_quiet_checkpoint_to_the_uncut_result(tmp_path):
    from bench.diloco import train_unit
    from bench.resume import ResultStore, run_units
    from node.checkpoint import list_checkpoints

    uncut = train_unit(*UNIT)  # no checkpoint directory: nothing kept
    assert "resumed_from_step" not in uncut and uncut["syncs"] > 0

    store = ResultStore(tmp_path / "state", {"test": "diloco-resume"})
    partial = store.partial("ef-s1")
    args = [*UNIT[:7], list(SMALL), str(partial)]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_15, json.dumps(args), str(torch.get_num_threads())],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    # A checkpoint every 2 steps, but never while a round is in flight: fragment 1's rounds begin at steps 4 and 12,
    # fragment 0's at 8, each applied one step later (τ = 1), so those checkpoints move one step on.
    said = [line.split(",")[0] for line in killed.stderr.splitlines() if "train loss" in line]
    assert said == [f"streaming_e3m0_ef (seed 1): step {n}/24" for n in (2, 5, 6, 9, 10, 13, 14)], killed.stderr
    assert [step for step, _ in list_checkpoints(partial)] == [13, 14]  # the newest two kept

    results = run_units(store, [("ef-s1", "streaming_e3m0_ef (seed 1)", tuple(args))], train_unit)
    row = results["ef-s1"]
    assert row["resumed_from_step"] == 14
    _same_row(row, uncut)
    assert "seconds_this_part_only" not in row and row["seconds"] > 0  # both parts' seconds
    assert not partial.exists()  # saved, so its checkpoints are gone
    assert store.get("ef-s1") == json.loads(json.dumps(row))


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_another_units_checkpoint_is_set_aside_and_the_unit_starts_over(tmp_path, capsys):
    from bench.diloco import train_unit
    from node.checkpoint import list_checkpoints

    dp = ("data_parallel", *UNIT[1:])
    uncut = train_unit(*dp)
    mine, other = tmp_path / "dp", tmp_path / "ef"
    cut = train_unit(*UNIT, str(other))  # a finished unit keeps its last checkpoints (run_units drops them)
    _same_row(cut, train_unit(*UNIT))  # checkpointing changes nothing in the run itself
    shutil.copytree(other, mine)
    row = train_unit(*dp, str(mine))
    said = capsys.readouterr().err
    assert "cannot be resumed" in said and "not of this unit" in said, said
    assert "resumed_from_step" not in row
    _same_row(row, uncut)
    aside = [p for p in mine.iterdir() if p.name.startswith("set-aside-")]
    assert len(aside) == 1 and list_checkpoints(aside[0])  # moved, not deleted
    assert [s for s, _ in list_checkpoints(mine)] == [20, 22]  # the unit's own, every 2 steps up to the last


@pytest.mark.usefixtures("one_thread")
def test_a_unit_with_a_round_always_in_flight_says_so_and_still_finishes(tmp_path, capsys):
    """With τ = 1 and a round every step (H = P = 2) no step is free of a round in flight: no checkpoint is taken."""
    from bench.diloco import train_unit
    from node.checkpoint import list_checkpoints

    label = "streaming_e3m0_H8_lr6e-4_olr0.8_fm"  # synced at H/12 rounded up to P: every step with H = 8, P = 2
    row = train_unit(label, 0, 12, 8, 2, 2, "cpu", SMALL, str(tmp_path / "fm"))
    said = capsys.readouterr().err
    assert row["syncs"] == 12 and not list_checkpoints(tmp_path / "fm")
    assert said.count("was free of a round in flight") == 1, said
