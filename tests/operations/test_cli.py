"""The installed command: argument handling, error exits, a real end-to-end run in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from node.cli import main
from node.config import load_config


def test_bad_config_exits_2_with_the_field_named(capsys):
    assert main(["train-local", "--set", "model.bogus=1"]) == 2
    assert "model.bogus" in capsys.readouterr().err
    assert main(["train-local", "--set", "data.source=text", "--set", "data.path=/no/such/dir"]) == 2
    assert "data.path='/no/such/dir' does not exist" in capsys.readouterr().err


def test_config_show_round_trips(capsys, tmp_path):
    assert main(["config", "show", "--config", "small", "--set", "train.lr=0.002"]) == 0
    shown = tmp_path / "shown.toml"
    shown.write_text(capsys.readouterr().out)
    assert load_config(shown).to_dict() == load_config("small", ["train.lr=0.002"]).to_dict()


def test_config_fields_lists_every_section(capsys):
    assert main(["config", "fields"]) == 0
    out = capsys.readouterr().out
    assert all(f"[{s}]" in out for s in ("model", "pipeline", "data", "train"))


def _script(name: str) -> Path:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.skip(f"console script {name} is not installed next to {sys.executable}")
    return path


def test_console_scripts_train_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train-local", "--json", "--set", "data.max_bytes=300000",
            "--set", "train.batch_size=2", "--set", "train.seq_len=32", "--set", "train.eval_batches=1",
            "--set", f"train.checkpoint_dir={tmp_path}", "--set", "train.threads=1"]
    for name, steps in (("node", 2), ("protoswarm", 3)):
        cmd = [_script(name), *args, "--steps", str(steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["steps"] == steps and summary["val_loss"] > 0
        assert f"step {steps}/{steps}" in proc.stderr  # progress output
    assert summary["resumed_from"] == 2  # the second command found the first one's checkpoint
