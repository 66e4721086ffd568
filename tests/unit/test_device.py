"""The compute device: `auto` by default, a clear error (never a silent CPU fall-back) for a device
this machine does not have, and the device's memory where a volunteer looks (status line, /health)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from node.config import ConfigError, load_config
from node.device import device_memory, resolve_device
from node.status_line import format_status

REPO = Path(__file__).resolve().parents[2]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


def test_auto_is_the_default_and_resolves_to_what_is_here():
    assert load_config("swarm/tiny").train.device == "auto"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "CPU", "gpu", ""])
def test_an_unknown_device_string_is_refused_at_load(spec):
    with pytest.raises(ConfigError, match=r"train\.device"):
        load_config("swarm/tiny", [f"train.device={spec!r}"])
    with pytest.raises(ConfigError, match=r"train\.device"):
        resolve_device(spec)


@NO_CUDA
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_names_the_problem(spec):
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_device(spec)


def test_a_cuda_index_that_does_not_exist_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"CUDA device 5 does not exist \(this machine has 2: cuda:0..cuda:1\)"):
        resolve_device("cuda:5")


@pytest.mark.slow
@NO_CUDA
@pytest.mark.parametrize("command", ["start", "train-local"])
def test_node_asked_for_cuda_here_exits_at_once_naming_cuda(tmp_path, command):
    args = [sys.executable, "-m", "node.cli", command, "--device", "cuda"]
    if command == "start":
        args += ["--identity", str(tmp_path / "id.key"), "--metrics-port", "0", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                 "--set", f"train.checkpoint_dir={str(tmp_path / 'ckpt')!r}"]
    else:
        args += ["--set", f"train.checkpoint_dir={str(tmp_path / 'ckpt')!r}"]
    started = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.monotonic() - started < 30
    assert "error:" in proc.stderr and "CUDA" in proc.stderr
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "id.key").exists()  # nothing started


def test_device_memory_reports_use_and_peak():
    memory = device_memory(torch.device("cpu"))
    assert memory["device"] == "cpu"
    assert 0 < memory["allocated_bytes"] <= memory["peak_bytes"] < memory["total_bytes"]
    assert 0 < memory["free_bytes"] <= memory["total_bytes"]
    line = format_status({"state": "online", "stage": 0, "num_stages": 1, "peers": 2, "tokens_per_s": 10.0,
                          "memory": memory})
    assert "cpu " in line and "GB (peak" in line
    gpu = format_status({"state": "online", "memory": {"device": "cuda:0", "allocated_bytes": 3.1e9,
                                                        "peak_bytes": 3.4e9, "total_bytes": 24e9}})
    assert "· cuda:0 3.1/24.0 GB (peak 3.4) ·" in gpu


def test_a_node_claims_only_stages_that_fit_its_device(monkeypatch):
    from node import claim
    from node.memory import estimate_stage

    cfg = load_config("model/125m", ["pipeline.num_stages=3", "train.device='cpu'"])
    need = [estimate_stage(cfg, s, "cpu").device_bytes for s in range(3)]
    cpu = torch.device("cpu")
    monkeypatch.setattr(claim, "free_memory", lambda device: sorted(need)[1])  # the two smaller fit
    fit, failure = claim.stages_that_fit(cfg, cpu, "r")
    assert failure is None and fit == sorted(sorted(range(3), key=lambda s: need[s])[:2])
    # The swarm's weakest stage does not fit: the neediest one that does is picked instead.
    unfit = next(s for s in range(3) if s not in fit)
    loads, servers = [1.0, 1.0, 1.0], [1, 1, 1]
    servers[unfit] = 0
    assert claim.pick_stage(loads, servers, "me", 1, fit, own=None) in fit
    # Among the stages that fit, joiners spread the same way (loads within the tolerance tie).
    picks = {claim.pick_stage([0.0, 3.0, 2.9], [0, 1, 1], f"p{i}", 1, [1, 2], None, 1.2) for i in range(30)}
    assert picks == {1, 2}
    monkeypatch.setattr(claim, "free_memory", lambda device: min(need) - 1)  # none fits: the reason to stop
    fit, failure = claim.stages_that_fit(cfg, cpu, "r")
    assert fit == [] and failure.startswith("no stage of run r fits cpu")
    pinned = load_config("model/125m", ["pipeline.num_stages=3", "swarm.stage=1"])
    assert "stage 1 of run r needs" in claim.stages_that_fit(pinned, cpu, "r")[1]


@pytest.mark.slow
def test_node_start_refuses_a_model_this_machine_cannot_hold(tmp_path):
    """8b as one stage needs ~170 GiB: the node says so and exits before building or downloading anything."""
    args = [sys.executable, "-m", "node.cli", "start", "--config", "model/8b", "--device", "cpu",
            "--identity", str(tmp_path / "id.key"), "--metrics-port", "0", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
            "--set", f"train.checkpoint_dir={str(tmp_path / 'ckpt')!r}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "fits cpu: the smallest needs" in proc.stderr and "GiB" in proc.stderr
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.slow
@NO_CUDA
def test_the_gpu_bench_says_plainly_that_there_is_no_gpu():
    proc = subprocess.run([sys.executable, "bench/gpu.py"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["bench"] == "gpu" and out["cuda"] is False and "no CUDA" in out["reason"]
