"""Shared fixtures. Per-test timeouts come from pytest-timeout (pyproject: timeout = 300)."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores on the CI machine: one test process may use both, child processes set their own.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def small_data_overrides(tmp_path) -> list[str]:
    """Config overrides for a fast local run on a 1 MB slice of the embedded corpus."""
    return [
        "data.max_bytes=1000000", "train.batch_size=4", "train.seq_len=64", "train.eval_batches=2",
        "train.log_every=1000", f"train.checkpoint_dir='{tmp_path / 'ckpt'}'",
    ]
