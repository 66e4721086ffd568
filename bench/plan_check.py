"""Does `node plan`'s speed model (node/throughput.py) predict the tiny pipeline swarm on this machine?

The plan predicts pipeline tokens/s from FLOPs, frame sizes, the link rate, delay and microbatches in
flight. This bench gives it this CPU's measured FLOP/s and compares its prediction with real swarms of
``configs/swarm/pipeline-local.toml`` (tiny d=256, 8 layers, 3 stages, batch 8 × 128), on 2 cores:

1. **Calibration**, in this process before any swarm, on one torch thread (the nodes run with
   ``OMP_NUM_THREADS=1``): every stage of the subspace model and of the dense one
   (``model.subspace_rank="none"``) is built and stepped by the real engine (node/engine.py) as a node
   does a microbatch: ``forward`` (no grad), then ``backward`` from the next stage's real boundary
   gradient (recompute: the forward again with grad, the backward, the AdamW step) on stages 0 and 1;
   ``forward_backward_last`` (forward, loss, backward, step) on the last. A stage's time is the median
   of ``--repeats`` microbatches after ``--warmup``; the models take turns, and 25 repeats (about a
   minute) average over this VM's speed, which drifts by ±15% over seconds. Measured FLOP/s = Σ over
   both models' stages of ``stage_flops_per_token`` × tokens / Σ of their times (per model too).
2. **Contention**: the 3 node processes share this machine's cores, so the plan gets
   ``tflops_eff = measured × min(1, cores / nodes)`` (cores = ``os.cpu_count()``).
3. **Measurement**: bench/wan.py's ``run_swarm``: 3 nodes, node i pinned to stage i, replica sync off,
   each in its own network namespace with tc tbf on both directions (unshaped veths for "unshaped",
   so bytes are still counted). The window opens when tokens flow and closes at ``--budget`` tokens
   or ``--window-s`` after opening, whichever first. Tokens/s = the change in the stage-0 node's
   ``pipeline.tokens_ok`` over the window's seconds (both read from /health at open and at close);
   the monitor's figure (from the first scored loss to the end) is kept for reference.
4. **Prediction**: ``speed_plan(mfu=1, tflops=tflops_eff, link rate, delay 0, --hop-overhead-s)``.
   Each row: predicted, measured, measured/predicted, within ±25%, the plan's bound, link bytes per
   token measured (all links, DHT and polls included) against the plan's (× 2 hops). Diagnostics:
   the plan's pipeline formula fed with the calibrated stage times instead of FLOPs
   (``tokens_per_s_from_stage_times``), the bound all cores give (cores × tokens / Σ stage times),
   each stage's compute time per microbatch in the swarm (its /metrics), the CPU used over the window
   by the nodes (with their libp2p daemons), by other work and by the hypervisor (stolen), each stage's
   mean compute queue, and a second calibration after the last swarm (``drift``). Before calibrating
   and before each swarm the bench waits (up to ``--quiet-wait-s``) for other work to stop.

Resumable: rows already in ``--out`` for the same variant, link and commit are reused (``--fresh``
ignores the file) unless other work used ``IDLE_CORES`` or more during their window; each new row is
written as soon as it completes. Predictions are recomputed from this invocation's calibration.
Progress goes to stderr; the last stdout line is one JSON object.

    flock /tmp/protoswarm-heavy.lock .venv/bin/python bench/plan_check.py --quick   # 8 runs, ~12 min
    flock /tmp/protoswarm-heavy.lock .venv/bin/python bench/plan_check.py           # 12 runs (+ int8)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))

import torch  # noqa: E402
from wan import PIPE_COMMON, PIPE_CONFIG, PIPE_VARIANTS, _pipe_tokens, run_swarm  # noqa: E402  bench/wan.py

from node import throughput  # noqa: E402
from node.config import load_config  # noqa: E402
from node.engine import build_engine  # noqa: E402
from node.model import shared_tensors, stage_layers  # noqa: E402
from swarm.sim.link import LinkSpec  # noqa: E402
from swarm.sim.netns import netns_unavailable  # noqa: E402

CONFIG = "swarm/pipeline-local"
NODES = 3
LINKS = ("unshaped", "80mbit", "20mbit", "5mbit")
QUICK_VARIANTS = ("subspace_bf16", "dense_bf16")
MODELS = {"subspace": [], "dense": ['model.subspace_rank="none"']}  # calibration: model → overrides
MODEL_OF = {"subspace_bf16": "subspace", "subspace_int8": "subspace", "dense_bf16": "dense"}
TOLERANCE = 0.25
IDLE_CORES = 0.05  # other work below this many cores is a quiet machine
_JUDGED = ("predicted", "ratio", "within_")  # a row's keys (and "bound") that come from the calibration
_METRIC = re.compile(r'^protoswarm_(pipeline_(?:compute|hop)_seconds)_(sum|count)(?:\{phase="(\w+)"\})? (\S+)$')


def log(msg: str) -> None:
    print(f"[plan_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------- calibration

def calibrate(repeats: int, warmup: int) -> dict[str, Any]:
    """Each stage of both models through the real engine, one thread, one microbatch at a time; the
    two models take turns, so that both see the same drift of this machine's speed."""
    torch.set_num_threads(1)
    runs = {}
    for model, extra in MODELS.items():
        cfg = load_config(CONFIG, PIPE_COMMON + extra)
        shared = shared_tensors(cfg.model)
        engines = [build_engine(cfg, s, "cpu", shared=shared) for s in range(cfg.pipeline.num_stages)]
        runs[model] = (cfg, engines, [{"wall": [], "cpu": [], "forward": [], "backward": [], "step": []}
                                      for _ in engines])
    b, n = cfg.train.batch_size, cfg.train.seq_len
    gen = torch.Generator().manual_seed(0)
    for i in range(warmup + repeats):
        ids = torch.randint(0, cfg.model.vocab_size, (b, n + 1), generator=gen)
        for _, engines, times in runs.values():
            spent = [{"forward": 0.0, "backward": 0.0, "cpu": 0.0} for _ in engines]
            boundary = None
            for s, engine in enumerate(engines[:-1]):
                boundary = _timed(spent[s], "forward", engine.forward, i, ids, boundary)
            _, grad = _timed(spent[-1], "backward", engines[-1].forward_backward_last, ids, boundary)
            for s in range(len(engines) - 2, -1, -1):
                grad = _timed(spent[s], "backward", engines[s].backward, i, grad)
            for s, engine in enumerate(engines if i >= warmup else []):
                got = {**spent[s], "wall": spent[s]["forward"] + spent[s]["backward"], "step": engine.last_step_s}
                for k, v in got.items():
                    times[s][k].append(v)
    models: dict[str, Any] = {}
    for model, (cfg, _, times) in runs.items():
        ranges, stages = stage_layers(cfg.model, cfg.pipeline), []
        for s, t in enumerate(times):
            flops = throughput.stage_flops_per_token(cfg, ranges, s)
            med = {k: statistics.median(v) for k, v in t.items()}
            stages.append({"layers": [ranges[s].start, ranges[s].stop], "flops_per_token": flops,
                           "wall_s": round(med["wall"], 5), "cpu_s": round(med["cpu"], 5),
                           "forward_s": round(med["forward"], 5), "backward_s_incl_step": round(med["backward"], 5),
                           "step_s": round(med["step"], 5), "gflops": round(flops * b * n / med["wall"] / 1e9, 2)})
        total_flops = sum(st["flops_per_token"] for st in stages) * b * n
        models[model] = {"stages": stages, "flops": total_flops, "wall_s": sum(st["wall_s"] for st in stages),
                         "tflops": total_flops / sum(st["wall_s"] for st in stages) / 1e12}
    cores = os.cpu_count() or 1
    measured = sum(m["flops"] for m in models.values()) / sum(m["wall_s"] for m in models.values()) / 1e12
    contention = min(1.0, cores / NODES)
    return {"threads": torch.get_num_threads(), "repeats": repeats, "warmup": warmup, "statistic": "median",
            "tokens_per_microbatch": b * n, "models": models,
            "tflops_measured": measured, "cores": cores, "nodes": NODES, "contention": contention,
            "contention_rule": "tflops_eff = tflops_measured × min(1, cores / nodes): the nodes share the cores",
            "tflops_eff": measured * contention}


def _timed(acc: dict[str, float], phase: str, fn, *args):
    """``fn(*args)``, adding its wall time to ``acc[phase]`` and its thread CPU time to ``acc["cpu"]``."""
    w, c = time.perf_counter(), time.thread_time()
    result = fn(*args)
    acc[phase] += time.perf_counter() - w
    acc["cpu"] += time.thread_time() - c
    return result


# ---------------------------------------------------------------------------------------- prediction

def predict(cal: dict[str, Any], variant: str, rate_bps: float | None, hop_s: float) -> dict[str, Any]:
    cfg = load_config(CONFIG, PIPE_COMMON)  # the subspace config: speed_plan derives the dense variant
    v = throughput.speed_plan(cfg, tflops=cal["tflops_eff"], mfu=1.0, link_rate_bps=rate_bps, delay_s=0.0,
                              hop_overhead_s=hop_s, replicas=1)["variants"][variant]
    model = cal["models"][MODEL_OF[variant]]
    # the plan's own pipeline formula with the calibrated stage times instead of FLOPs / FLOP/s
    vcfg = load_config(CONFIG, PIPE_COMMON + MODELS[MODEL_OF[variant]])
    codec = throughput.VARIANTS[variant][1]
    compute_s = [st["wall_s"] / cal["contention"] for st in model["stages"]]
    pipe = throughput._pipeline(vcfg, compute_s, throughput.hop_frame_bytes(vcfg, codec),
                                throughput._rate_bytes_per_s(rate_bps), hop_s, vcfg.dataplane.max_inflight)
    return {"tokens_per_s": v["tokens_per_s"], "bound": v["bound"], "compute_tokens_per_s": v["compute_tokens_per_s"],
            "link_tokens_per_s": v["link_tokens_per_s"], "round_trip_s": v["round_trip_s"],
            "link_bytes_per_token_hop": v["link_bytes_per_token"],
            "link_bytes_per_token_all_hops": round(v["link_bytes_per_token"] * (NODES - 1), 1),
            "tokens_per_s_from_stage_times": round(pipe["tokens_per_s"], 1), "bound_from_stage_times": pipe["bound"],
            "tokens_per_s_cpu_bound": round(cal["cores"] * cal["tokens_per_microbatch"] / model["wall_s"], 1)}


# --------------------------------------------------------------------------------------- measurement

def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants (the node and its libp2p daemon)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    tree, grew = {pid}, True
    while grew:  # add children until none is left out
        kids = {p for p, (ppid, _) in stats.items() if ppid in tree} - tree
        tree, grew = tree | kids, bool(kids)
    return sum(stats[p][1] for p in tree if p in stats)


def _machine_busy_s(stolen: bool = False) -> float:
    """CPU seconds this VM was busy so far (or, with ``stolen``, its vCPUs spent running other guests)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (f[7] if stolen else sum(f[:7]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_wait_s: float, idle_cores: float = IDLE_CORES) -> float:
    """Wait (up to ``max_wait_s``) until the machine's other work uses under ``idle_cores`` over 3 s;
    returns the cores it last saw busy (other processes would share the cores with the nodes)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = _machine_busy_s()
        time.sleep(3.0)
        busy = (_machine_busy_s() - before) / 3.0
        if busy < idle_cores or time.monotonic() > deadline:
            if busy >= idle_cores:
                log(f"  the machine is still busy ({busy:.2f} cores); going on, the row records it")
            return round(busy, 3)
        log(f"  the machine is busy ({busy:.2f} cores in use): waiting")
        time.sleep(7.0)


def _scrape(swarm, index: int) -> dict[str, float]:
    url = swarm.metrics_url(index)
    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            for line in r.read().decode().splitlines():
                if m := _METRIC.match(line):
                    out[f"{m[1]}:{m[3] or ''}:{m[2]}"] = float(m[4])
    except (OSError, ValueError, TypeError):
        pass
    return out


def _snapshot(swarm, healths: list, now: float) -> dict[str, Any]:
    return {"t": now, "tokens": _pipe_tokens(healths), "stages": [h.get("stage") if h else None for h in healths],
            "metrics": [_scrape(swarm, i) for i in range(len(swarm.nodes))],
            "cpu": [_tree_cpu_s(node.proc.pid) if node.proc else 0.0 for node in swarm.nodes],
            "machine_busy_s": _machine_busy_s(), "stolen_s": _machine_busy_s(stolen=True)}


def measure(variant: str, link_name: str, budget: int, window_s: float, deadline_s: float) -> dict[str, Any]:
    spec = None if link_name == "unshaped" else LinkSpec.parse(link_name)
    link = spec or (LinkSpec(None, 0.0) if netns_unavailable() is None else None)
    extra = PIPE_VARIANTS[variant]
    ctx: dict[str, Any] = {"samples": [], "queues": {}}

    def on_poll(swarm, healths) -> None:
        ctx["swarm"] = swarm

    def flowing(healths) -> bool:
        return _pipe_tokens(healths) > 0 and all(healths)

    def enough(opened, healths) -> bool:
        now = time.time()
        if "open" not in ctx:  # the first call is the poll that opened the window
            ctx["open"] = _snapshot(ctx["swarm"], opened, now)
        if not all(healths):
            return False
        tokens = _pipe_tokens(healths) - ctx["open"]["tokens"]
        ctx["samples"].append((now - ctx["open"]["t"], tokens))
        for h in healths:
            ctx["queues"].setdefault(h.get("stage"), []).append(h.get("pipeline", {}).get("queue", 0))
        done = tokens >= budget or now - ctx["open"]["t"] >= window_s
        if done:
            ctx["close"] = _snapshot(ctx["swarm"], healths, now)
        return done

    res = run_swarm(PIPE_CONFIG, NODES, PIPE_COMMON + extra, link, enough, deadline_s, "auto", ready=flowing,
                    node_overrides={i: [f"swarm.stage={i}"] for i in range(NODES)}, on_poll=on_poll)
    row: dict[str, Any] = {"variant": variant, "link": link_name, "link_spec": str(link) if link else None,
                           "link_mode": res["link_mode"], "overrides": PIPE_COMMON + extra, "run_s": res["run_s"],
                           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if "open" not in ctx or not ctx["samples"] or ctx["samples"][-1][1] <= 0:
        row["error"] = "tokens never flowed through all 3 stages before the deadline"
        return row
    o, c = ctx["open"], ctx.get("close")
    wall, tokens = ctx["samples"][-1]
    row.update({"closed_by": "deadline" if c is None else "budget" if tokens >= budget else "time",
                "window_s": round(wall, 2), "window_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
                "tokens_per_s_fit": round(statistics.linear_regression(*zip(*ctx["samples"], strict=True)).slope, 1)
                if len(ctx["samples"]) > 2 else None,  # least squares over the window's polls
                "monitor_tokens_per_s": res.get("tokens_per_s"),
                "microbatches_dropped": res.get("microbatches_dropped"),
                "boundary_bytes_per_token": res.get("bytes_per_token"),
                "link_bytes_window": res["link_bytes_window"],
                "link_bytes_per_token": round(res["link_bytes_window"] / tokens, 1) if res["link_bytes_window"] else None,
                "queue_mean_by_stage": {str(s): round(sum(q) / len(q), 2) for s, q in ctx["queues"].items()}})
    if c is not None:
        span = c["t"] - o["t"]
        per_stage = {}
        for i, stage in enumerate(c["stages"]):
            d = {k: c["metrics"][i].get(k, 0.0) - o["metrics"][i].get(k, 0.0) for k in c["metrics"][i]}
            jobs = d.get("pipeline_compute_seconds:backward:count", 0.0)
            hops = d.get("pipeline_hop_seconds::count", 0.0)
            per_stage[str(stage)] = {
                "compute_s_per_microbatch": round(sum(v for k, v in d.items() if k.startswith("pipeline_compute")
                                                      and k.endswith(":sum")) / jobs, 4) if jobs else None,
                "by_phase_s": {k.split(":")[1]: round(v / jobs, 4) for k, v in d.items()
                               if k.startswith("pipeline_compute") and k.endswith(":sum") and jobs},
                "hop_round_trip_s": round(d["pipeline_hop_seconds::sum"] / hops, 4) if hops else None,
                "node_cpu_cores": round((c["cpu"][i] - o["cpu"][i]) / span, 3)}
        nodes_cores = sum((c["cpu"][i] - o["cpu"][i]) / span for i in range(len(c["cpu"])))
        machine = (c["machine_busy_s"] - o["machine_busy_s"]) / span
        row["in_swarm"] = {"by_stage": per_stage, "nodes_cpu_cores": round(nodes_cores, 3),
                           "machine_busy_cores": round(machine, 3), "other_cpu_cores": round(machine - nodes_cores, 3),
                           "stolen_cores": round((c["stolen_s"] - o["stolen_s"]) / span, 3)}  # by the hypervisor
    return row


# -------------------------------------------------------------------------------------------- main

def _commit() -> tuple[str, bool]:
    run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return run("rev-parse", "--short", "HEAD") or "unknown", bool(run("status", "--porcelain"))


def _judge(row: dict[str, Any], cal: dict[str, Any], hop_s: float) -> dict[str, Any]:
    if "error" in row:
        return row
    rate = None if row["link"] == "unshaped" else LinkSpec.parse(row["link"]).rate_bps
    pred = predict(cal, row["variant"], rate, hop_s)
    ratio = row["tokens_per_s"] / pred["tokens_per_s"]
    if "after" in cal:
        row = {**row, "ratio_calibration_after": round(
            row["tokens_per_s"] / predict(cal["after"], row["variant"], rate, hop_s)["tokens_per_s"], 3)}
    return {**row, "predicted": pred, "predicted_tokens_per_s": pred["tokens_per_s"], "bound": pred["bound"],
            "ratio": round(ratio, 3), "within_25pct": abs(ratio - 1) <= TOLERANCE,
            "ratio_from_stage_times": round(row["tokens_per_s"] / pred["tokens_per_s_from_stage_times"], 3)}


def _summary(args, cal, rows: dict[str, dict], commit: str, dirty: bool, started: float) -> dict[str, Any]:
    judged = [_judge(r, cal, args.hop_overhead_s) for r in rows.values()]
    ok = [r for r in judged if "error" not in r]
    misses = [{k: r.get(k) for k in ("variant", "link", "predicted_tokens_per_s", "tokens_per_s", "ratio", "bound",
                                     "error")} for r in judged if "error" in r or not r["within_25pct"]]
    return {"bench": "plan_check", "quick": args.quick, "commit": commit, "dirty_tree": dirty,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                       f"torch {torch.__version__}",
            "netns": netns_unavailable() or "available", "config": PIPE_CONFIG,
            "settings": {"budget_tokens": args.budget, "window_s": args.window_s, "deadline_s": args.deadline_s,
                         "hop_overhead_s": args.hop_overhead_s, "mfu": 1.0, "delay_s": 0.0, "tolerance": TOLERANCE},
            "calibration": cal, "rows": judged,
            "within_25pct_all": bool(ok) and len(ok) == len(judged) and all(r["within_25pct"] for r in ok),
            "misses": misses, "wall_s": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only subspace_bf16 and dense_bf16 (8 runs)")
    parser.add_argument("--out", type=Path, help="resumable results (default bench/out/plan_check[-quick].json)")
    parser.add_argument("--fresh", action="store_true", help="ignore rows already in --out")
    parser.add_argument("--budget", type=int, default=40_000, help="tokens that close a window")
    parser.add_argument("--window-s", type=float, default=60.0, help="seconds that close a window")
    parser.add_argument("--deadline-s", type=float, default=150.0, help="the most one swarm runs")
    parser.add_argument("--hop-overhead-s", type=float, default=0.0005, help="the plan's software time a hop")
    parser.add_argument("--quiet-wait-s", type=float, default=300.0, help="most seconds to wait for other work to stop")
    parser.add_argument("--repeats", type=int, default=25, help="calibration microbatches a model (~1 s each)")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    started = time.monotonic()
    out = args.out or ROOT / "bench" / "out" / f"plan_check{'-quick' if args.quick else ''}.json"
    commit, dirty = _commit()
    rows: dict[str, dict] = {}
    if out.exists() and not args.fresh:
        rows = {f"{r['variant']}@{r['link']}": {k: v for k, v in r.items() if k != "bound" and not k.startswith(_JUDGED)}
                for r in json.loads(out.read_text()).get("rows", []) if r.get("commit") == commit and "error" not in r
                and (r.get("in_swarm") or {}).get("other_cpu_cores", 0.0) < IDLE_CORES}
        log(f"reusing {len(rows)} row(s) of commit {commit} from {out}")
    log("calibrating: every stage of both models on one thread")
    busy = wait_quiet(args.quiet_wait_s)
    cal = {**calibrate(args.repeats, args.warmup), "machine_busy_cores_before": busy}
    for name, m in cal["models"].items():
        log(f"  {name}: " + ", ".join(f"stage {s}: {st['wall_s'] * 1e3:.0f} ms" for s, st in enumerate(m["stages"]))
            + f"; {m['tflops'] * 1e3:.1f} GFLOP/s")
    log(f"  measured {cal['tflops_measured'] * 1e3:.1f} GFLOP/s, effective {cal['tflops_eff'] * 1e3:.1f} "
        f"(× {cal['contention']:.3f}: {cal['cores']} cores, {NODES} nodes); other work {busy} cores")
    variants = QUICK_VARIANTS if args.quick else tuple(PIPE_VARIANTS)
    for link in LINKS:
        for variant in variants:
            key = f"{variant}@{link}"
            if key in rows:
                continue
            log(f"{key}: 3 nodes, window {args.budget} tokens or {args.window_s:.0f} s")
            busy = wait_quiet(args.quiet_wait_s)
            row = {**measure(variant, link, args.budget, args.window_s, args.deadline_s), "commit": commit,
                   "machine_busy_cores_before": busy}
            rows[key] = row
            j = _judge(row, cal, args.hop_overhead_s)
            log(f"  {j.get('error') or ''}measured {j.get('tokens_per_s')} tok/s over {j.get('window_s')} s "
                f"(monitor {j.get('monitor_tokens_per_s')}), predicted {j.get('predicted_tokens_per_s')} "
                f"({j.get('bound')}), ratio {j.get('ratio')}; link B/token {j.get('link_bytes_per_token')} "
                f"vs plan {j.get('predicted', {}).get('link_bytes_per_token_all_hops')}")
            _write(out, _summary(args, cal, rows, commit, dirty, started))
    log("calibrating again after the swarms (drift)")
    cal["after"] = calibrate(args.repeats, args.warmup)
    cal["drift"] = round(cal["after"]["tflops_measured"] / cal["tflops_measured"], 3)
    log(f"  {cal['after']['tflops_measured'] * 1e3:.1f} GFLOP/s: × {cal['drift']} the first calibration")
    _write(out, summary := _summary(args, cal, rows, commit, dirty, started))
    print(json.dumps(summary))


def _write(out: Path, summary: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    main()
