"""Backward mode of a pipeline stage: recompute the forward vs stash its graph (dataplane.backward).

Runs one middle stage of a preset (default: the tiny model split in 3, as configs/swarm/pipeline-local)
in-process through ``node.pipeline.PipelineCompute``: ``--inflight`` microbatches go forward, then
all come back (the pattern a stage sees with several microbatches in flight), repeated ``--rounds``
times. Reports, per mode:

- ms per microbatch for forward + backward (one torch thread, as a swarm node runs);
- bytes held per in-flight microbatch between its forward and its backward: the tensors autograd
  saved for the backward (counted with saved-tensor hooks) plus the stashed input.

    python bench/backward.py --quick

Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.config import load_config
from node.pipeline import FORWARD, PipelineCompute
from node.stage_store import StageStore


def held_bytes(compute: PipelineCompute) -> int:
    """Bytes kept for the in-flight microbatches now: saved activations (unique storages) + inputs."""
    seen, total = set(), 0
    for stash in compute.engine._stash.values():
        for t in [stash.ids, stash.boundary_in, *getattr(stash, "saved", [])]:
            if t is None:
                continue
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


async def run(mode: str, cfg, stage: int, inflight: int, rounds: int, tmp: Path) -> dict:
    cfg.dataplane.backward = mode
    compute = PipelineCompute(StageStore.fresh(cfg, "bench", stage, tmp / mode), cfg)
    t = cfg.train
    width = compute.width
    gen = torch.Generator().manual_seed(0)
    saved: list[torch.Tensor] = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    def forward_counting(key, ids, c):
        # Hooks are per thread: install them on the worker thread, around the stage's own forward.
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = compute.engine.forward(key, ids, c)
        compute.engine._stash[key].saved = list(saved)
        return out

    times, held = [], []
    for r in range(rounds + 1):  # round 0 warms up
        batch = [(torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1), generator=gen),
                  torch.randn(t.batch_size, t.seq_len + 1, width, generator=gen)) for _ in range(inflight)]
        start = time.perf_counter()
        outs = []
        for i, (ids, c) in enumerate(batch):
            outs.append(await compute._submit(FORWARD, "forward",
                                              lambda k=(r, i), ids=ids, c=c: forward_counting(k, ids, c)))
        if r:
            held.append(held_bytes(compute) / inflight)
        for i, out in enumerate(outs):
            await compute.backward((r, i), torch.randn_like(out))
        if r:
            times.append((time.perf_counter() - start) / inflight)
    compute.close()
    return {"mode": mode, "ms_per_microbatch": round(1000 * sorted(times)[len(times) // 2], 2),
            "bytes_held_per_microbatch": int(sum(held) / len(held)), "stale_recomputes": compute.recomputed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="swarm/pipeline-local")
    parser.add_argument("--stage", type=int, default=1, help="stage to run (default 1: a middle stage)")
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = 5 if args.quick else args.rounds
    cfg = load_config(args.config, ["train.grad_accum=1000000"])  # no optimizer step: only fwd/bwd timed
    tmp = Path("bench/out/backward")
    rows = []
    for mode in ("recompute", "stash"):
        row = asyncio.run(run(mode, cfg, args.stage, args.inflight, rounds, tmp))
        print(f"{mode:9s}: {row['ms_per_microbatch']:8.1f} ms/microbatch, "
              f"{row['bytes_held_per_microbatch'] / 2**20:7.2f} MiB held per in-flight microbatch", flush=True)
        rows.append(row)
    rec, sta = rows
    t = cfg.train
    print(json.dumps({
        "bench": "backward", "config": args.config, "stage": args.stage, "inflight": args.inflight, "rounds": rounds,
        "microbatch": [t.batch_size, t.seq_len + 1], "threads": 1, "rows": rows,
        "stash_speedup": round(rec["ms_per_microbatch"] / sta["ms_per_microbatch"], 3),
        "stash_memory_factor": round(sta["bytes_held_per_microbatch"] / rec["bytes_held_per_microbatch"], 1),
        "command": "python bench/backward.py" + (" --quick" if args.quick else ""),
    }))


if __name__ == "__main__":
    main()
