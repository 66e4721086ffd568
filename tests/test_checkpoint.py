from __future__ import annotations

import pytest
import torch

from node.checkpoint import CheckpointError, list_checkpoints, load_latest, save_checkpoint


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
