"""One-process training: loss falls, resume is exact, bad checkpoints and configs fail clearly."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from node.checkpoint import CheckpointError, list_checkpoints
from node.config import ConfigError, load_config
from node.train_local import lr_at, train_local


def config(overrides, extra=()):
    return load_config("local/tiny", [*overrides, *extra])


@pytest.mark.slow
def test_loss_falls(small_data_overrides):
    cfg = config(small_data_overrides, ["train.steps=30", "train.warmup_steps=3", "train.lr=3e-3",
                                        "train.eval_every=0"])
    result = train_local(cfg)
    first = sum(v for _, v in result.train_losses[:3]) / 3
    last = sum(v for _, v in result.train_losses[-3:]) / 3
    assert result.train_losses[0][1] > 5.0  # ~ln(256) = 5.55 at init (the first three steps already learn)
    assert last < first - 1.5, (first, last)
    assert result.final_val_loss < first - 1.0
    assert result.tokens == 30 * 4 * 64


@pytest.mark.slow
def test_resume_after_interrupt_is_exact(small_data_overrides, tmp_path):
    common = ["train.steps=8", "train.warmup_steps=2", "train.eval_every=0", "train.checkpoint_every=100",
              "train.grad_accum=2"]
    straight = train_local(config(small_data_overrides, [*common, f"train.checkpoint_dir='{tmp_path / 'a'}'"]))

    def interrupt_at_5(step, _loss):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: honoured at the end of the step

    resumed_dir = tmp_path / "b"
    cfg = config(small_data_overrides, [*common, f"train.checkpoint_dir='{resumed_dir}'"])
    with pytest.raises(KeyboardInterrupt):
        train_local(cfg, on_step=interrupt_at_5)
    assert [s for s, _ in list_checkpoints(resumed_dir)] == [5]
    resumed = train_local(cfg)
    assert resumed.resumed_from == 5
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert [loss for _, loss in straight.train_losses] == [loss for _, loss in resumed.train_losses]


def test_checkpoint_of_another_model_is_refused(small_data_overrides):
    train_local(config(small_data_overrides, ["train.steps=1", "train.eval_every=0"]))
    with pytest.raises(CheckpointError, match=r"different \[model\] config"):
        train_local(config(small_data_overrides, ["train.steps=2", "model.subspace_rank=16"]))


def test_tokenizer_larger_than_model_vocab_is_refused(small_data_overrides, tmp_path):
    corpus = tmp_path / "tokens.bin"
    corpus.write_bytes(bytes(4096))
    cfg = config(small_data_overrides, ["data.source='tokens'", f"data.path='{corpus}'", "train.steps=1"])
    with pytest.raises(ConfigError, match=r"model.vocab_size=256"):
        train_local(cfg)


def test_dense_model_trains_too(small_data_overrides):
    cfg = config(small_data_overrides, ["model.subspace_rank='none'", "train.steps=3", "train.eval_every=0"])
    result = train_local(cfg)
    assert result.model.stages[0].basis is None and len(result.train_losses) == 3


def test_lr_schedule_shape():
    cfg = load_config("local/tiny", ["train.steps=100", "train.warmup_steps=10", "train.lr=1e-3",
                                     "train.min_lr_ratio=0.1"])
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert 1e-4 < lr_at(55, cfg) < 1e-3 and lr_at(30, cfg) > lr_at(60, cfg)
    assert lr_at(99, cfg) == pytest.approx(1e-4)  # the last step reaches the floor


@pytest.mark.parametrize(("change", "message"), [
    ("data.seed=5", r"different \[data\] config"),
    ("train.grad_accum=2", "train.grad_accum=1, now 2"),
])
def test_resume_with_other_data_is_refused(small_data_overrides, change, message):
    train_local(config(small_data_overrides, ["train.steps=1", "train.eval_every=0"]))
    with pytest.raises(CheckpointError, match=message):
        train_local(config(small_data_overrides, ["train.steps=2", change]))


def test_fresh_start_into_a_used_directory_is_refused(small_data_overrides):
    train_local(config(small_data_overrides, ["train.steps=1", "train.eval_every=0"]))
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train_local(config(small_data_overrides, ["train.steps=1", "train.resume=false"]))
