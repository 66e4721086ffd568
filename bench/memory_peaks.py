"""Peak memory of each stage measured through the production stage engine on the CPU, against the plan.

For each case, every stage of the split is built with ``node.engine.build_engine`` on the CPU, warmed
up (one microbatch and its optimizer step, so AdamW's state exists), and one round of
``dataplane.max_inflight`` microbatches is run (every forward of the round before any backward, as a
pipeline stage sees them). Its measured peak is compared with ``node plan``'s cpu estimate
(node/memory.py). tests/unit/test_memory_plan.py asserts the same comparison within ±20%.

How the peak is measured. The estimate counts torch tensors, so this measures torch's tensor memory:
``torch.profiler.profile(profile_memory=True)`` makes torch's CPU allocator report every allocation
and free, each with the allocator's running total of bytes allocated since profiling began
(``total_allocated``), so the maximum of that total over a window is the exact peak of the tensors
allocated in it, whatever the order or the timestamp resolution of the events. The tensors the engine
holds before the window are counted from their storages (``StageEngine.tensors()``: weights, frozen
buffers, optimizer state; plus the DiLoCo outer state). Measured peak = held tensors + the window's peak.

Why not the process's peak RSS (``VmHWM`` in a fresh subprocess minus a baseline after a warm-up):
it counts the interpreter and torch's libraries (~0.5 GB here, more than a test stage), and glibc
keeps freed blocks mapped, so a round after the warm-up barely moves the high-water mark (tiny, stage
0 of 3 at 8 x 129 tokens: RSS grew 17 MB in a round whose tensors peaked 80 MB above the start).
The profiler sees exactly what the estimate describes. It relies on semi-private profiler fields
(``experimental_event_tree``, ``_ExtraFields_Allocation``): a torch upgrade that changes them makes
this fail loudly, never pass wrongly.

    python bench/memory_peaks.py        # every case (about a minute on 2 cores)

Prints one JSON object as its last line.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch
from torch._C._profiler import _ExtraFields_Allocation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.config import load_config
from node.engine import build_engine
from node.memory import estimate_stage
from node.model import shared_tensors


def _held_bytes(engine) -> int:
    tensors = list(engine.tensors().values())
    if engine.outer is not None:
        tensors += [*engine.outer.global_, *engine.outer.momentum]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _window_peak(prof) -> int:
    """The most bytes allocated at once during the profile, above what was allocated when it began."""
    events = []

    def walk(nodes) -> None:
        for node in nodes:
            if isinstance(node.extra_fields, _ExtraFields_Allocation):
                events.append((node.start_time_ns, node.extra_fields.total_allocated, node.extra_fields.alloc_size))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    assert events, "the profiler reported no allocation"
    events.sort(key=lambda e: e[0])
    before = events[0][1] - events[0][2]
    return max(total for _, total, _ in events) - before


def measured_peak(cfg, stage: int, shared) -> int:
    """Peak bytes of torch tensors while stage ``stage`` trains on the CPU through node.engine."""
    engine = build_engine(cfg, stage, "cpu", shared=shared)
    if cfg.diloco.enabled:
        engine.attach_outer(cfg.diloco, "cpu")
    t, inflight = cfg.train, cfg.dataplane.max_inflight
    gen = torch.Generator().manual_seed(stage)

    def inputs():
        ids = torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1), generator=gen)
        return ids, None if engine.is_first else torch.randn(t.batch_size, t.seq_len + 1, engine.boundary_width,
                                                             generator=gen)

    def train(count: int) -> None:
        if engine.is_last:
            for _ in range(count):
                engine.forward_backward_last(*inputs())
            return
        shapes = [engine.forward(key, *inputs()).shape for key in range(count)]  # all in flight, then back
        for key, shape in enumerate(shapes):
            engine.backward(key, torch.randn(shape, generator=gen))

    train(1)  # warm-up: one optimizer step, so AdamW's state exists from here on
    assert engine.progress == 1 and engine.in_flight == 0
    held = _held_bytes(engine)
    gc.collect()  # collect earlier garbage now, not inside the window
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        train(inflight)
    assert engine.progress == 1 + inflight // t.grad_accum and engine.in_flight == 0
    return held + _window_peak(prof)


MEASURED = {  # preset, stages, overrides: each exercises a different mix of the estimate's terms
    "tiny-activations": ("tiny", 3, ["train.batch_size=8", "train.seq_len=128"]),
    "tiny-stash": ("tiny", 2, ["train.batch_size=4", "train.seq_len=64", "dataplane.backward=stash",
                               "dataplane.max_inflight=2"]),
    "tiny-one-stage": ("tiny", 1, ["train.batch_size=4", "train.seq_len=64", "dataplane.max_inflight=2"]),
    "tiny-loss": ("tiny", 2, ["train.batch_size=4", "train.seq_len=64", "model.vocab_size=8192"]),  # logits peak
    "small": ("small", 2, ["train.batch_size=4", "train.seq_len=64"]),
    "125m": ("125m", 2, ["train.batch_size=2", "train.seq_len=64"]),
}


def compare(case: str) -> list[dict]:
    """Every stage of ``case``: measured and estimated bytes, and the estimate's relative error."""
    preset, stages, overrides = MEASURED[case]
    cfg = load_config(f"model/{preset}", [f"pipeline.num_stages={stages}", *overrides])
    shared = shared_tensors(cfg.model)  # one T_fixed for the preset's stages, as StageChain does
    rows = []
    for stage in range(stages):
        measured = measured_peak(cfg, stage, shared)
        estimated = estimate_stage(cfg, stage, "cpu").device_bytes
        rows.append({"stage": stage, "measured_bytes": measured, "estimated_bytes": estimated,
                     "error": round(estimated / measured - 1, 4)})
    return rows


def main() -> None:
    started = time.time()
    out = {}
    for case in MEASURED:
        out[case] = compare(case)
        for row in out[case]:
            print(f"{case:17s} stage {row['stage']}: measured {row['measured_bytes']:>13,} B, estimated "
                  f"{row['estimated_bytes']:>13,} B ({row['error']:+.1%})", file=sys.stderr, flush=True)
    worst = max(abs(r["error"]) for rows in out.values() for r in rows)
    print(json.dumps({"bench": "memory_peaks", "device": "cpu", "cases": {k: {"preset": MEASURED[k][0],
                      "stages": MEASURED[k][1], "overrides": MEASURED[k][2], "rows": v} for k, v in out.items()},
                      "worst_abs_error": worst, "torch": torch.__version__, "seconds": round(time.time() - started, 1),
                      "command": "python bench/memory_peaks.py"}))


if __name__ == "__main__":
    main()
