"""Peak resident memory of a daemon's checkpoint save, the copying way against the streaming way.

A stage's state is its weights, AdamW's two moments and, with Streaming DiLoCo, the global copy and the
outer momentum: five times the parameters in fp32. Each mode runs in a fresh subprocess (so high-water
marks do not mix): the whole model of a preset as one stage (S = 1, ``diloco.enabled``) on the CPU, one
optimizer step with made-up gradients (so AdamW's state exists), then the peak RSS is reset
(``/proc/self/clear_refs``) and one checkpoint is saved:

- ``copy``: what the daemon did before: ``StageStore.checkpoint_state()`` copies the whole state under
  the engine's lock, then ``save_checkpoint`` writes the copy;
- ``stream``: ``StageStore.save_checkpoint()`` now: the live tensors are written under the lock, one at a
  time (node/checkpoint.py ``write_checkpoint``).

``extra_rss_mib`` is the peak RSS during the save (``VmHWM``) minus the RSS before it; ``under_lock_s``
how long training would have waited (the copy, or the write into the page cache).

    python bench/checkpoint_rss.py                  # 125m, both modes
    python bench/checkpoint_rss.py --preset tiny    # quick

Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("copy", "stream")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(preset: str, mode: str) -> dict:
    """One save in this process (run it in a fresh one)."""
    import torch

    from node import stage_store
    from node.checkpoint import save_checkpoint
    from node.config import load_config
    from node.stage_store import StageStore

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ckpt-rss-") as tmp:
        cfg = load_config(f"model/{preset}", ["pipeline.num_stages=1", "diloco.enabled=true", "train.resume=false",
                                              f"train.checkpoint_dir='{tmp}'"])
        store = StageStore.fresh(cfg, "bench", 0, Path(tmp))
        gen = torch.Generator().manual_seed(0)
        with store.lock:  # one step with made-up gradients: AdamW's moments exist
            for p in store.module.parameters():
                p.grad = torch.randn(p.shape, generator=gen) * 1e-3
            store.optimizer.step()
            store.optimizer.zero_grad(set_to_none=True)
            store.progress += 1
        state_bytes = sum(t.numel() * t.element_size() for t in
                          [*store.engine.tensors().values(), *store.outer.global_, *store.outer.momentum])
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status_kib("VmRSS")
        started = time.perf_counter()
        if mode == "copy":
            state = store.checkpoint_state(copy=True)
            under_lock = time.perf_counter() - started
            path = save_checkpoint(tmp, state["step"], state, keep=1)
            del state
        else:
            held = []

            class Timed:  # the lock the write holds (the engine's), timed
                def __init__(self, inner):
                    self.inner = inner

                def __enter__(self):
                    self.inner.__enter__()
                    held.append(time.perf_counter())

                def __exit__(self, *exc):
                    held.append(time.perf_counter())
                    return self.inner.__exit__(*exc)

            real = stage_store.write_checkpoint
            stage_store.write_checkpoint = lambda directory, take, keep=2, hold=None: real(
                directory, take, keep, hold=Timed(hold))
            path = store.save_checkpoint()
            under_lock = held[1] - held[0]
        seconds = time.perf_counter() - started
        peak = _status_kib("VmHWM")
        return {"preset": preset, "mode": mode, "params": sum(p.numel() for p in store.module.parameters()),
                "state_mib": round(state_bytes / 2**20, 1), "rss_before_mib": round(before / 1024, 1),
                "peak_rss_mib": round(peak / 1024, 1), "extra_rss_mib": round((peak - before) / 1024, 1),
                "extra_over_state": round((peak - before) * 1024 / state_bytes, 2),
                "file_mib": round(path.stat().st_size / 2**20, 1), "seconds": round(seconds, 2),
                "under_lock_s": round(under_lock, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--mode", choices=MODES, help="one mode in this process (what the parent runs)")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.preset, args.mode)))
        return
    rows = {}
    for mode in MODES:
        print(f"{args.preset}, {mode}: saving ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--mode", mode],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
        rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {rows[mode]}", file=sys.stderr, flush=True)
    print(json.dumps({"bench": "checkpoint_rss", "preset": args.preset, "modes": rows,
                      "extra_rss_saved_mib": round(rows["copy"]["extra_rss_mib"] - rows["stream"]["extra_rss_mib"], 1),
                      "command": " ".join(["python bench/checkpoint_rss.py", *sys.argv[1:]])}))


if __name__ == "__main__":
    main()
