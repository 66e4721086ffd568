"""`node export --checkpoint`, `node eval` and `node generate` through the real CLI (in process), on a
train-local checkpoint of a small model."""

from __future__ import annotations

import json

import pytest

from node.cli import main

SMALL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "pipeline.num_stages=2", "model.subspace_rank=8",
         "train.steps=4", "train.batch_size=2", "train.seq_len=32", "train.eval_batches=2", "train.eval_every=0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    home = tmp_path_factory.mktemp("ck")
    sets = [arg for s in [*SMALL, f"train.checkpoint_dir={home / 'ck'}"] for arg in ("--set", s)]
    assert main(["--log-level", "WARNING", "train-local", *sets]) == 0
    return home / "ck"


def test_export_eval_and_generate_from_a_train_local_checkpoint(checkpoint, tmp_path, capsys):
    for fmt in ("native", "hf"):
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / fmt), "--format", fmt,
                     "--json"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["format"] == fmt and summary["step"] == 4 and summary["parameters"] > 0
    scores = []
    for fmt in ("native", "hf"):
        assert main(["eval", "--model", str(tmp_path / fmt), "--device", "cpu"]) == 0
        scores.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    # The same function in both formats, on the same windows of the run's validation split.
    assert scores[0]["windows"] == scores[1]["windows"] == 4 and scores[0]["seq_len"] == 32
    assert abs(scores[0]["val_loss"] - scores[1]["val_loss"]) < 1e-4, scores
    text = tmp_path / "t.txt"
    text.write_text("import os\n" * 40)
    assert main(["eval", "--model", str(tmp_path / "native"), "--text", str(text), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["source"] == str(text)

    args = ["generate", "--model", str(tmp_path / "native"), "--prompt", "def f(", "--max-new-tokens", "12",
            "--seed", "3", "--json", "--device", "cpu"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == first  # a seed repeats the sample
    assert len(first["ids"]) == 12 and all(0 <= i < 256 for i in first["ids"])
    assert main([*args, "--temperature", "0"]) == 0  # greedy
    assert len(json.loads(capsys.readouterr().out)["ids"]) == 12


def test_the_commands_refuse_with_one_error_line(checkpoint, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path)]) == 2
    assert "not a protoswarm export" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m")]) == 0
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "", "--device", "cpu"]) == 2
    assert "prompt is empty" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_eval_and_generate_on_cuda_match_the_cpu(checkpoint, tmp_path, capsys):
    """bench/gpu.py runs this (`pytest -m cuda`): the same export scored on the GPU (bf16 autocast) and the CPU."""
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m"), "--format", "hf"]) == 0
    capsys.readouterr()
    losses = {}
    for device in ("cpu", "cuda"):
        assert main(["eval", "--model", str(tmp_path / "m"), "--device", device]) == 0
        losses[device] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_loss"]
    assert abs(losses["cuda"] - losses["cpu"]) < 0.02 * losses["cpu"], losses
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--max-new-tokens", "8", "--device",
                 "cuda", "--json", "--seed", "1"]) == 0
    assert len(json.loads(capsys.readouterr().out)["ids"]) == 8
