from __future__ import annotations

import pytest
import torch

from node.checkpoint import CheckpointError, list_checkpoints, load_latest, save_checkpoint, set_aside


def test_round_trip_and_pruning(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    state = load_latest(tmp_path)
    assert state["step"] == 3 and torch.equal(state["w"], torch.full((3,), 3.0))


def test_half_written_file_is_ignored(tmp_path):
    save_checkpoint(tmp_path, 5, {"step": 5})
    # What a process killed mid-write leaves behind: a temp file that never got renamed.
    (tmp_path / ".ckpt-00000006.pt.abc.tmp").write_bytes(b"\x80\x02partial")
    assert load_latest(tmp_path)["step"] == 5


def test_corrupt_checkpoint_raises_a_clear_error(tmp_path):
    save_checkpoint(tmp_path, 7, {"step": 7, "w": torch.zeros(1000)})
    path = list_checkpoints(tmp_path)[-1][1]
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_latest(tmp_path)


def test_no_checkpoint(tmp_path):
    assert load_latest(tmp_path / "missing") is None


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (100, 200):
        save_checkpoint(tmp_path, step, {"step": step})
    save_checkpoint(tmp_path, 10, {"step": 10}, keep=2)
    assert 10 in [s for s, _ in list_checkpoints(tmp_path)]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"step": 1, "w": torch.ones(2)})

    def broken_save(obj, fh):
        fh.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"step": 2})
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert not list(tmp_path.glob("*.tmp")) and load_latest(tmp_path)["step"] == 1


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((1000,), float(step))})
    newest = list_checkpoints(tmp_path)[-1][1]
    newest.write_bytes(newest.read_bytes()[:300])  # damaged on disk (a crash never does this: writes are atomic)
    with caplog.at_level("WARNING", logger="node.checkpoint"):
        state = load_latest(tmp_path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.full((1000,), 1.0))
    assert "ckpt-00000002.pt cannot be read" in caplog.text and "using ckpt-00000001.pt" in caplog.text
    assert newest.exists()  # left for inspection; the next save of step 2 replaces it
    save_checkpoint(tmp_path, 2, {"step": 2})
    assert load_latest(tmp_path)["step"] == 2


def test_a_checkpoint_holding_another_step_is_skipped_too(tmp_path):
    save_checkpoint(tmp_path, 3, {"step": 3})
    save_checkpoint(tmp_path, 4, {"step": 4})
    torch.save({"step": 99}, list_checkpoints(tmp_path)[-1][1])  # renamed or copied by hand
    assert load_latest(tmp_path)["step"] == 3
    with pytest.raises(CheckpointError, match="does not hold step 3"):
        torch.save({"step": 98}, list_checkpoints(tmp_path)[0][1])
        load_latest(tmp_path)


def test_the_next_save_removes_temporary_files_of_a_killed_writer(tmp_path):
    import os
    import time

    stale = tmp_path / ".ckpt-00000002.pt.x1y2.tmp"
    stale.write_bytes(b"\x80\x02partial")
    os.utime(stale, (time.time() - 5, time.time() - 5))
    save_checkpoint(tmp_path, 2, {"step": 2})
    assert not stale.exists() and not list(tmp_path.glob("*.tmp"))


def test_set_aside_moves_every_checkpoint_into_a_new_folder_that_pruning_never_touches(tmp_path):
    assert set_aside(tmp_path, "nothing there") is None and list(tmp_path.iterdir()) == []
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    first = set_aside(tmp_path, "test")
    assert first.parent == tmp_path and sorted(p.name for p in first.iterdir()) == ["ckpt-00000001.pt", "ckpt-00000002.pt"]
    assert list_checkpoints(tmp_path) == []
    for step in (1, 2, 3):  # a fresh start's saves prune only what they wrote
        save_checkpoint(tmp_path, step, {"step": step}, keep=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3] and load_latest(first)["step"] == 2
    second = set_aside(tmp_path, "test again")  # in the same second: a folder of its own
    assert second != first and [p.name for p in second.iterdir()] == ["ckpt-00000003.pt"]
    assert len(list(first.iterdir())) == 2
