"""The trained model out of a live swarm: export, evaluate, compare with the swarm's own figure, sample.

A 3-stage swarm of real ``node start`` processes (``configs/swarm/pipeline-local.toml``: the tiny
subspace model, 2 replicas a stage, Streaming DiLoCo between them) trains for ``--train`` seconds.
Then, while it keeps training:

1. ``node export --join ... --out native`` fetches every stage's agreed weights from its replicas.
2. The swarm's own validation measurements (stage-0 drivers, forward only on the agreed weights,
   ``dataplane.eval_every_s``) are read from the nodes' /health. **How the two are made comparable:**
   each measurement carries, per stage, the tag of the agreed state it was scored on (a hash of the
   stage's outer history), and the export records the same tag per stage. The bench pairs the export
   with a measurement of exactly the same states of every stage; it waits for one up to
   ``--match-wait`` seconds and exports again if the swarm moved on first (up to ``--attempts``). The
   windows are the same too: the run's validation split cut by ``validation_batches`` with
   ``train.seq_len``, ``train.batch_size`` and ``dataplane.eval_batches`` on both sides. What still
   differs: the swarm's boundaries cross the wire as bf16 coefficients, ``node eval`` runs the model
   unsplit in fp32.
3. ``node eval --model native --batches eval_batches`` scores the export (``export_val_loss``).
4. ``node export --format hf``: transformers' ``LlamaForCausalLM`` loads it; the largest logit
   difference against ours on one validation batch (``hf_max_abs_logit_diff``).
5. ``node generate`` samples from it (``sample``).

    python bench/export.py --quick     # 6 nodes, ~2 minutes of training (about 5 minutes in all)
    python bench/export.py             # 6 nodes, 5 minutes of training

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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.sim.swarm import LocalSwarm

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/swarm/pipeline-local.toml"
EVAL_BATCHES = 2
OVERRIDES = ["dataplane.eval_every_s=5", f"dataplane.eval_batches={EVAL_BATCHES}"]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "node.cli", "--log-level", "WARNING", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"node {args[0]} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return done


def measurements(swarm: LocalSwarm) -> list[tuple[float, float, list[str]]]:
    """Every validation measurement the stage-0 drivers hold now: (wall time, loss, agreed tags per stage)."""
    out = []
    for i in range(len(swarm.nodes)):
        health = swarm.health(i) if swarm.nodes[i].alive else None
        out += [tuple(m) for m in ((health or {}).get("pipeline") or {}).get("val_losses", [])]
    return sorted(out)


def matched(swarm: LocalSwarm, tags: list[str], wait_s: float) -> tuple[float, float, list[str]] | None:
    """A measurement scored on exactly the agreed states ``tags``, waiting up to ``wait_s`` for one."""
    deadline = time.monotonic() + wait_s
    while True:
        hits = [m for m in measurements(swarm) if list(m[2]) == tags]
        if hits:
            return hits[-1]
        if time.monotonic() > deadline:
            return None
        time.sleep(2.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~2 minutes of training (the full run: 5)")
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--attempts", type=int, default=4, help="exports tried until one matches a measurement")
    parser.add_argument("--match-wait", type=float, default=30.0, help="seconds to wait for a matching measurement")
    args = parser.parse_args()
    train_s = 120 if args.quick else 300
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp, \
            LocalSwarm(args.nodes, CONFIG, OVERRIDES, workdir=Path(tmp) / "swarm") as swarm:
        swarm.start_all()
        swarm.wait_until(lambda: len(measurements(swarm)) > 0, 180, "a first validation measurement")
        first = measurements(swarm)[0]
        print(f"first swarm validation loss {first[1]:.4f}; training {train_s} s", file=sys.stderr, flush=True)
        time.sleep(train_s)  # the swarm trains; nothing here waits on it
        joins = [a for addr in swarm.join_addresses()[:2] for a in ("--join", addr)]
        pair, tries = None, []
        for attempt in range(1, args.attempts + 1):
            out = Path(tmp) / f"native{attempt}"
            summary = json.loads(cli("export", *joins, "--run-id", swarm.run_id, "--out", str(out), "--json")
                                 .stdout.strip().splitlines()[-1])
            tags = [s["agreed_tag"] for s in summary["stages"]]
            hit = matched(swarm, tags, args.match_wait)
            tries.append({"attempt": attempt, "tags": tags, "matched": hit is not None, "export_s": summary["seconds"]})
            print(f"export {attempt}: agreed states {tags}: {'matched' if hit else 'no measurement of them'}",
                  file=sys.stderr, flush=True)
            if hit is not None:
                pair = (out, hit, summary)
                break
        if pair is None:
            raise SystemExit(f"no export matched a swarm measurement in {args.attempts} attempts: {tries}")
        out, hit, summary = pair
        scored = json.loads(cli("eval", "--model", str(out), "--device", "cpu", "--batches", str(EVAL_BATCHES))
                            .stdout.strip().splitlines()[-1])
        live_hf = json.loads(cli("export", *joins, "--run-id", swarm.run_id, "--out", str(Path(tmp) / "hf-live"),
                                 "--format", "hf", "--json").stdout.strip().splitlines()[-1])
        diff = hf_logit_diff(out, Path(tmp) / "hf")
        sample = json.loads(cli("generate", "--model", str(out), "--prompt", "def ", "--max-new-tokens", "80",
                                "--seed", "0", "--json", "--device", "cpu").stdout)["text"]
        final = measurements(swarm)
    swarm_val, export_val = hit[1], scored["val_loss"]
    result = {
        "bench": "export", "quick": args.quick, "nodes": args.nodes, "train_s": train_s,
        "swarm_val_loss_first": first[1], "swarm_val_loss": swarm_val, "export_val_loss": export_val,
        "val_loss_rel_diff": round(abs(export_val - swarm_val) / swarm_val, 5),
        "agreed_tags": hit[2], "swarm_measurements": len(final), "export_attempts": tries,
        "export_stages": summary["stages"], "parameters": summary["parameters"],
        "hf_max_abs_logit_diff": diff, "hf_live_export_s": live_hf["seconds"], "sample": sample, "eval": scored,
        "seconds": round(time.time() - started, 1),
        "command": " ".join(["python bench/export.py", *sys.argv[1:]]),
    }
    print(json.dumps(result))


def hf_logit_diff(native: Path, hf_dir: Path) -> float:
    """Largest |logit| difference, on one validation batch, between our subspace model (the matched native
    export) and transformers' Llama on the same weights merged and written with ``--format hf`` (converted
    here from the native export: the live ``--format hf`` export above may hold a later agreed state)."""
    from transformers import LlamaForCausalLM

    from node.data import load_corpus, validation_batches
    from node.model_files import load_export, write_export

    ours = load_export(native)
    write_export(hf_dir, ours.model, ours.cfg, "hf")
    batch = validation_batches(load_corpus(ours.cfg.data).val, ours.cfg.train.seq_len, ours.cfg.train.batch_size, 1)[0]
    theirs = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ours.model(batch[:, :-1]), theirs(batch[:, :-1]).logits
    return float((a - b).abs().max())


if __name__ == "__main__":
    main()
