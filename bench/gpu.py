"""The GPU check: the daemon's and train-local's CUDA path, measured (≤ 8 minutes on one GPU).

For the tiny, small and 125m presets, on ``cuda``:

- ``train_local``: ``node train-local`` (one stage, the production engine) for a few dozen steps: tokens/s
  after warm-up, peak memory (``torch.cuda.max_memory_allocated``), and the same run's tokens/s on the
  machine's CPU (all its cores, a few steps) for the CPU/GPU ratio;
- ``plan``: every stage of a 3-stage split run through its engine (forward, backward, an optimizer step,
  ``dataplane.max_inflight`` microbatches in flight) with its peak memory against ``node plan``'s cuda
  estimate (docs/memory.md: the estimate minus its fixed CUDA-context allowance, which torch's allocator
  does not count);
- ``sim``: a 3-stage ``node sim`` (3 real daemons, one stage each, sharing the GPU): the swarm's
  tokens/s, the devices the nodes reported and their largest peak memory;
- ``checks``: T_fixed generated on the GPU is bit-identical to the CPU's; the CUDA tests of the suite
  (``pytest -m cuda tests/unit``: every unit test marked cuda) pass.

Without CUDA it prints one JSON object saying so and exits 0. Each finished row is saved to ``--state``
(JSON), and a rerun skips the rows already there (``--fresh`` starts over): a run cut short by a device
lease continues where it stopped.

    python bench/gpu.py                 # tiny, small, 125m
    python bench/gpu.py --presets tiny  # one preset

The node sim needs hivemind, which the lent GPU machines do not have: ``bash bench/gpu_wheels.sh``
(here) downloads it and its dependencies as wheels into ``.whl/``; carry ``.whl`` and start the command
there with ``python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
export PYTHONPATH=/tmp/site``. Without hivemind the sim rows say so and the rest still runs.

Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = ("tiny", "small", "125m")
STEPS = {"tiny": 60, "small": 40, "125m": 30}  # train-local steps on the GPU (the first 5 are warm-up)
CPU_STEPS = {"tiny": 6, "small": 4, "125m": 3}  # the same on the CPU, for the ratio
SIM_SECONDS = 45


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def config(preset: str, overrides: list[str]):
    from node.config import load_config

    return load_config(f"model/{preset}", ["train.eval_every=0", "train.log_every=100000", "train.resume=false",
                                           "data.max_bytes=2000000", *overrides])


def train_local_row(preset: str) -> dict:
    from node.train_local import train_local

    out = {}
    for device, steps in (("cuda", STEPS[preset]), ("cpu", CPU_STEPS[preset])):
        stamps: list[float] = []
        with tempfile.TemporaryDirectory() as tmp:
            cfg = config(preset, [f"train.device={device!r}", f"train.steps={steps}", "train.checkpoint_every=0",
                                  f"train.checkpoint_dir={tmp!r}", "train.warmup_steps=5"])
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            else:
                torch.set_num_threads(os.cpu_count() or 1)
            result = train_local(cfg, on_step=lambda step, loss, stamps=stamps: stamps.append(time.perf_counter()))
        warm = 5 if device == "cuda" else 1
        tokens = (len(stamps) - warm) * cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum
        rate = tokens / (stamps[-1] - stamps[warm - 1])
        out[device] = {"steps": steps, "tokens_per_s": round(rate, 1), "final_train_loss": round(result.train_losses[-1][1], 4)}
        if device == "cuda":
            out[device]["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        log(f"  train-local {preset} on {device}: {rate:,.0f} tok/s")
    out["gpu_over_cpu"] = round(out["cuda"]["tokens_per_s"] / out["cpu"]["tokens_per_s"], 1)
    return out


def plan_row(preset: str) -> dict:
    """Each stage of a 3-stage split through its engine on the GPU: peak memory against the plan."""
    from node.engine import build_engine
    from node.memory import CUDA_OVERHEAD_BYTES, estimate_stage

    cfg = config(preset, ["pipeline.num_stages=3", "train.grad_accum=2"])
    t, inflight = cfg.train, cfg.dataplane.max_inflight
    rows = []
    for stage in range(3):
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        engine = build_engine(cfg, stage, "cuda")
        engine.attach_outer(cfg.diloco, cfg.diloco.outer_device)  # as the daemon does: pinned host memory
        torch.cuda.reset_peak_memory_stats()  # from here: the stage's tensors and its training, not T_fixed's generation
        ids = torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1))
        boundary = None if stage == 0 else torch.randn(t.batch_size, t.seq_len + 1, engine.boundary_width)
        for rnd in range(2):  # two optimizer steps: AdamW state exists for the second
            if engine.is_last:
                for _ in range(t.grad_accum):
                    engine.forward_backward_last(ids, boundary)
            else:
                outs = [engine.forward((rnd, i), ids, boundary) for i in range(max(inflight, t.grad_accum))]
                for i, out in enumerate(outs):
                    engine.backward((rnd, i), torch.randn_like(out))
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base
        estimate = estimate_stage(cfg, stage, "cuda").device_bytes - CUDA_OVERHEAD_BYTES
        rows.append({"stage": stage, "measured_bytes": measured, "estimated_bytes": estimate,
                     "error": round(estimate / measured - 1, 3)})
        log(f"  plan {preset} stage {stage}: measured {measured / 2**20:,.0f} MiB, estimated {estimate / 2**20:,.0f} MiB")
        rows[-1]["outer_on_host"] = all(not g.is_cuda and g.is_pinned() for g in engine.outer.global_)
        del engine, boundary
    return {"stages": rows, "worst_error": max((r["error"] for r in rows), key=abs)}


def sim_row(preset: str) -> dict:
    try:
        import hivemind  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"hivemind is not importable here ({exc}); see bench/gpu_wheels.sh"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpu-sim.toml"
        path.write_text(
            f'extends = ["{REPO}/configs/swarm/pipeline-local.toml", "{REPO}/configs/model/{preset}.toml"]\n'
            '[train]\ndevice = "cuda"\nthreads = 1\n[pipeline]\nnum_stages = 3\n[diloco]\nenabled = false\n'
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(
            [sys.executable, "-m", "node.cli", "--log-level", "WARNING", "sim", "--nodes", "3", "--config", str(path),
             "--duration", str(SIM_SECONDS), "--workdir", str(Path(tmp) / "sim"), "--json"],
            capture_output=True, text=True, timeout=SIM_SECONDS + 240, cwd=REPO, env=env,
        )
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        return {"failed": proc.returncode, "stderr": proc.stderr[-2000:]}
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    row = {k: summary.get(k) for k in ("ok", "tokens", "tokens_per_s", "devices", "peak_memory_bytes_max",
                                      "microbatches_ok", "microbatches_dropped", "loss_start", "loss_end")}
    log(f"  sim {preset}: {row['tokens_per_s']} tok/s on {row['devices']}")
    return row


def checks_row() -> dict:
    from protocol import subspace

    cpu = subspace.make_fixed_table(0, 32000, 768, 1.0)
    gpu = subspace.make_fixed_table(0, 32000, 768, 1.0, device="cuda")
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/unit"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    return {"fixed_table_bit_identical": bool(torch.equal(cpu, gpu.cpu())),
            "pytest_exit": tests.returncode, "pytest_tail": tests.stdout.strip().splitlines()[-1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--state", default="bench/out/gpu-state.json", help="finished rows (rerun continues)")
    parser.add_argument("--fresh", action="store_true", help="ignore rows saved by an earlier run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"bench": "gpu", "cuda": False, "torch": torch.__version__,
                          "reason": "torch sees no CUDA device here: nothing measured"}))
        return
    state_path = Path(args.state)
    rows = {} if args.fresh or not state_path.exists() else json.loads(state_path.read_text())
    started = time.time()
    jobs = [("checks", checks_row)]
    for preset in args.presets:
        jobs += [(f"train_local/{preset}", lambda p=preset: train_local_row(p)),
                 (f"plan/{preset}", lambda p=preset: plan_row(p)), (f"sim/{preset}", lambda p=preset: sim_row(p))]
    for name, job in jobs:
        if name in rows:
            log(f"{name}: from {state_path}")
            continue
        log(f"{name} ...")
        try:
            rows[name] = job()
        except Exception as exc:  # one failed row must not lose the others
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(rows, indent=1))
    print(json.dumps({
        "bench": "gpu", "cuda": True, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "rows": rows, "seconds": round(time.time() - started, 1),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=REPO).stdout.strip() or None,
        "command": "python bench/gpu.py" + (f" --presets {' '.join(args.presets)}" if args.presets != list(PRESETS) else ""),
    }))


if __name__ == "__main__":
    main()
