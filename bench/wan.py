"""The headline benchmarks over emulated home links: pipeline, Streaming DiLoCo, and hivemind's own DP.

Every run is a real localhost swarm of `node start` processes (swarm/sim/swarm.py) whose nodes each
sit in their own network namespace with tc tbf shaping both directions of their link (swarm/sim/netns.py)
when this process is root; otherwise the nodes throttle their own protoswarm streams in-process
(the DHT is then unshaped and the link byte counts are missing, and the JSON says so). One machine,
one invocation, the same token budget within each family:

- **pipeline**  ``configs/swarm/pipeline-local.toml`` (tiny d=256, 3 stages, batch 8 × 128), 3 nodes,
  node i pinned to stage i (``swarm.stage``: no claiming or moves in the measurement), replica sync
  off, 70k tokens (``--quick``). Variants: subspace k=8 coefficients in bf16 and in int8, and dense
  bf16 activations (``model.subspace_rank="none"``, the naive dense model: no frozen token table),
  each over 80 Mbit/s links and over unshaped links ("loopback": namespaces joined by unshaped veth
  pairs, so bytes are still counted). Figures: tokens/s from the first scored microbatch to the end,
  wall time to a fixed loss, bytes on the links. The loss is the last stage's loss on microbatches
  it has not trained on yet (one pass over fresh data, so each one is held out when it is scored),
  smoothed over 10 microbatches; time is counted from the first scored microbatch.
- **diloco**    ``configs/swarm/diloco-local.toml`` (tiny as one stage, batch 4 × 64), 4 replicas,
  H=60 summed inner steps, 3 fragments, 4-bit parts. The swarm forms over unshaped links; the link
  is applied once all 4 replicas train, and the window runs for 4 × 60 steps' tokens from there.
  Compute utilisation = time inside training steps / window wall time, averaged over replicas,
  over 80 and 20 Mbit/s, without overlap (τ=0, blocking), with the paper's overlap (τ=1, blocking),
  and with this project's default (τ=1, never blocking: the mean is applied whenever it is back).
- **hivemind**  bench/hivemind_dp.py: 4 peers of ``hivemind.Optimizer`` synchronous data parallel
  (one optimizer step per local step of every peer, fp16 gradients, hivemind's default background
  parameter averaging) training the same model on the same data shape, 40 steps (10,240 tokens) a
  peer, over 80 Mbit/s. The peers start training together once all joined.

    python bench/wan.py --quick     # about 15 minutes on 2 cores
    python bench/wan.py             # twice the budgets

The last line printed is one JSON object with every figure; PNGs go to docs/img/wan[-quick].png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import moving_average  # bench/pipeline.py (this script's folder is first on sys.path)

from swarm.sim.link import LinkSpec
from swarm.sim.monitor import PipelineMonitor
from swarm.sim.netns import NetnsLab, netns_unavailable
from swarm.sim.swarm import LocalSwarm

ROOT = Path(__file__).resolve().parents[1]
PIPE_CONFIG = "configs/swarm/pipeline-local.toml"
DILOCO_CONFIG = "configs/swarm/diloco-local.toml"
PIPE_VARIANTS = {
    "subspace_bf16": [],
    "subspace_int8": ['wire.activation_codec="int8"', 'wire.gradient_codec="int8"'],
    "dense_bf16": ['model.subspace_rank="none"'],
}
PIPE_COMMON = ["diloco.enabled=false"]  # and node i serves stage i (swarm.stage): no claiming or moves
DILOCO_VARIANTS = {
    "no_overlap": ["diloco.blocking=true", "diloco.overlap=0"],
    "overlap": ["diloco.blocking=true", "diloco.overlap=1"],
    "nonblocking": ["diloco.blocking=false", "diloco.overlap=1"],
}
DILOCO_COMMON = ["diloco.inner_steps=60", "diloco.fragments=3"]
# Fixed losses for time-to-loss (smoothed): the dense model (no frozen table) learns slower early, so
# it gets an easier target too; the subspace runs reach 2.8 about a third into their budget.
PIPE_TARGETS = (3.2, 2.8)
SMOOTH = 10
POLL_S = 2.0


def log(msg: str) -> None:
    print(f"[wan {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def smoothed(curve: list[tuple[float, float]], window: int = SMOOTH) -> list[tuple[float, float]]:
    """(time, trailing mean of the last ``window`` losses)."""
    return list(zip([t for t, _ in curve], moving_average([v for _, v in curve], window), strict=True))


def time_to_loss(curve: list[tuple[float, float]], target: float) -> float | None:
    if len(curve) < SMOOTH:
        return None
    t0 = curve[0][0]
    for t, v in smoothed(curve)[SMOOTH - 1:]:
        if v <= target:
            return round(t - t0, 1)
    return None


def run_swarm(config: str, nodes: int, overrides: list[str], link: LinkSpec | None, enough, deadline_s: float,
              link_mode: str, ready=None, node_overrides=None, shape_late: bool = False,
              on_poll=None) -> dict[str, Any]:
    """Start a swarm and poll it. The measured window opens when ``ready(healths)`` (default: at once)
    and closes when ``enough(healths_at_open, healths)`` or at the deadline; returns what it did.
    ``on_poll(swarm, healths)``, if given, sees every poll first (bench/plan_check.py reads the nodes'
    /metrics and processes through it).

    With ``shape_late`` and network namespaces, the swarm forms over unshaped links and ``link`` is
    applied when the window opens: joining (the stage-state download) is not what is measured. Link
    bytes are counted over the window."""
    monitor = PipelineMonitor()
    started = time.monotonic()
    late = shape_late and link is not None and link_mode != "app" and netns_unavailable() is None
    # late: unshaped until the window opens, with the link's delay from the start (nodes add it themselves)
    with LocalSwarm(nodes, config, overrides, link=LinkSpec(None, link.delay_s) if late else link, link_mode=link_mode,
                    startup_timeout=120.0, node_overrides=node_overrides) as swarm:
        swarm.start_all()
        opened: list | None = None
        opened_at = bytes_at_open = None
        while True:
            healths = monitor.poll(swarm)
            if on_poll is not None:
                on_poll(swarm, healths)
            if opened is None and (ready is None or ready(healths)):
                if late:
                    swarm.reshape(link)
                opened, opened_at, bytes_at_open = healths, time.time(), swarm.link_bytes()
            if opened is not None and enough(opened, healths):
                break
            if time.monotonic() - started > deadline_s:
                log(f"  deadline of {deadline_s:.0f} s reached " + ("before the budget" if opened else
                                                                    "before every node was working"))
                break
            time.sleep(POLL_S)
        end = time.time()
        link_bytes = swarm.link_bytes()
        mode, note = swarm.link_mode, swarm.link_note
    out = monitor.summary(end) if monitor.seen else {}
    curve = sorted((t, loss) for (_, t), loss in monitor.losses.items())
    window_bytes = None
    if opened is not None and any(link_bytes):
        window_bytes = sum(b["sent"] - (a or {"sent": 0})["sent"]
                           for a, b in zip(bytes_at_open, link_bytes, strict=True) if b)
    return {**out, "curve": curve, "opened": opened, "opened_at": opened_at, "healths": healths, "end": end,
            "link_mode": mode, "link_note": note, "run_s": round(time.monotonic() - started, 1),
            "link_bytes_total": sum(b["sent"] for b in link_bytes if b) if any(link_bytes) else None,
            "link_bytes_window": window_bytes}


def pipeline_rows(link: LinkSpec | None, budget: int, deadline_s: float, mode: str) -> dict[str, dict]:
    rows = {}
    for name, extra in PIPE_VARIANTS.items():
        label = f"{name} @ {link or 'loopback'}"
        log(f"pipeline {label}: 3 nodes until {budget} tokens")

        def enough(_, healths, budget=budget) -> bool:
            return _pipe_tokens(healths) >= budget and all(healths)

        def flowing(healths) -> bool:
            return _pipe_tokens(healths) > 0 and all(healths)

        # "loopback": namespaces with unshaped veth links when they are available, so bytes are counted too
        unshaped = LinkSpec(None, 0.0) if mode != "app" and netns_unavailable() is None else None
        res = run_swarm(PIPE_CONFIG, 3, PIPE_COMMON + extra, link or unshaped, enough, deadline_s, mode,
                        node_overrides={i: [f"swarm.stage={i}"] for i in range(3)}, ready=flowing)
        stages = sorted(h["stage"] for h in res["healths"] if h and h.get("stage") is not None)
        window_tokens = _pipe_tokens(res["healths"]) - _pipe_tokens(res["opened"] or [])
        row = {
            "config": PIPE_CONFIG, "overrides": PIPE_COMMON + extra, "link": str(link) if link else "loopback",
            "link_mode": res["link_mode"] + (" (unshaped)" if link is None else ""), "stages_of_nodes": stages,
            "tokens": res.get("tokens"), "tokens_per_s": res.get("tokens_per_s"),
            "time_to_loss_s": {str(x): time_to_loss(res["curve"], x) for x in PIPE_TARGETS},
            "loss_end": res.get("loss_end"), "boundary_bytes_per_token": res.get("bytes_per_token"),
            "link_bytes_window": res["link_bytes_window"],
            "link_bytes_per_token": round(res["link_bytes_window"] / window_tokens, 1)
            if res["link_bytes_window"] and window_tokens else None,
            "microbatches_dropped": res.get("microbatches_dropped"), "dropped_by_reason": res.get("dropped_by_reason"),
            "run_s": res["run_s"],
            "curve": [[round(t - res["curve"][0][0], 2), v] for t, v in res["curve"]] if res["curve"] else [],
        }
        log(f"  {row['tokens_per_s']} tok/s, time to loss: {row['time_to_loss_s']} s, "
            f"loss_end {row['loss_end']}, link bytes/token {row['link_bytes_per_token']}")
        rows[name] = row
    return rows


def _pipe_tokens(healths: list) -> int:
    return sum(h["pipeline"].get("tokens_ok", 0) for h in healths if h and "pipeline" in h)


def _by_peer(healths: list) -> dict[str, dict]:
    return {h["peer_id"]: h for h in healths if h and h.get("peer_id")}


def _steps(healths: list) -> int:
    return sum(h.get("progress", 0) for h in healths if h)


def diloco_rows(link: LinkSpec, budget: int, deadline_s: float, mode: str, variants: list[str]) -> dict[str, dict]:
    """The window opens once all 4 replicas train (joiners download the stage state first) and
    closes after ``budget`` tokens in all; utilisation and tokens/s are over that window."""
    rows = {}
    tokens_per_step = 4 * 64  # diloco-local: batch 4 × seq 64
    for name in variants:
        extra = DILOCO_COMMON + DILOCO_VARIANTS[name]
        log(f"diloco {name} @ {link}: 4 replicas, {budget} tokens in all once every replica trains")

        def ready(healths) -> bool:
            return sum(1 for h in healths if h and (h.get("train") or {}).get("started_at")) == 4

        def enough(opened, healths) -> bool:  # counted on complete polls only (a slow /health is retried)
            return all(healths) and (_steps(healths) - _steps(opened)) * tokens_per_step >= budget

        res = run_swarm(DILOCO_CONFIG, 4, extra, link, enough, deadline_s, mode, ready=ready, shape_late=True)
        row: dict[str, Any] = {"config": DILOCO_CONFIG, "overrides": extra, "link": str(link),
                               "link_mode": res["link_mode"], "run_s": res["run_s"]}
        if res["opened"] is None:
            row["error"] = "the 4 replicas never all trained before the deadline"
            rows[name] = row
            log(f"  {row['error']}")
            continue
        row.update(diloco_window(res, tokens_per_step))
        log(f"  utilisation {row['utilization']} {row['utilization_per_replica']}, waits {row['wait_s_per_replica']} s, {row['tokens_per_s']} tok/s, committed "
            f"{row['rounds_committed']} ({row['rounds_in_window']['alone']} alone), skipped {row['rounds_skipped']}, loss_end {row['loss_end']}")
        rows[name] = row
    return rows


def diloco_window(res: dict[str, Any], tokens_per_step: int) -> dict[str, Any]:
    """Utilisation, waits, tokens/s and rounds of a DiLoCo swarm over ``run_swarm``'s measured window."""
    wall = res["end"] - res["opened_at"]
    before, after = _by_peer(res["opened"]), _by_peer(res["healths"])
    peers = [p for p, h in after.items() if p in before and h.get("train") and before[p].get("train")]

    def delta(section: str, key: str) -> list[float]:  # each replica's counter over the window
        return [(after[p].get(section) or {}).get(key, 0) - (before[p].get(section) or {}).get(key, 0) for p in peers]

    per = [round(c / wall, 4) for c in delta("train", "compute_s")]
    waits = [round(w, 2) for w in delta("outer", "wait_s")]
    steps = _steps(res["healths"]) - _steps(res["opened"])
    sent, link = sum(delta("outer", "bytes_sent")), res["link_bytes_window"]
    round_s = _summed_dicts(before, after, peers, "round_s")
    ends = {k: sum(delta("outer", f"rounds_{k}")) for k in ("committed", "alone", "skipped")}
    return {
        "window_s": round(wall, 1), "utilization": round(sum(per) / len(per), 4) if per else None,
        "utilization_per_replica": per, "wait_s_per_replica": waits, "tokens": steps * tokens_per_step,
        "tokens_per_s": round(steps * tokens_per_step / wall, 1),
        "rounds_committed": res.get("outer_rounds_committed"), "rounds_skipped": res.get("outer_rounds_skipped"),
        # summed over the replicas (each takes part in every round it starts)
        # "alone": committed with only the replica's own part in the mean (nothing averaged)
        "rounds_in_window": {k: sum(delta("outer", f"rounds_{k}"))
                             for k in ("started", "committed", "alone", "skipped", "missed")},
        "step_s_measured": round(sum(delta("train", "compute_s")) / steps, 4) if steps else None,  # waits left out
        "replica_steps_per_round": round(steps / started, 1) if (started := sum(delta("outer", "rounds_started")))
        else None,  # boundary to boundary, one replica's steps (the plan's schedule: U/R)
        "skipped_by": _summed_dicts(before, after, peers, "skipped_by"),
        # mean boundary-to-end seconds of the window's rounds, by outcome ("alone" commits are in "committed")
        "round_s_mean": {k: round(round_s.get(k, 0.0) / n, 2) if n else None for k, n in ends.items()},
        "loss_end": res.get("loss_end"), "link_bytes_window": link,
        "link_bytes_per_token": round(link / (steps * tokens_per_step), 1) if link and steps else None,
        "exchange_bytes_sent": res.get("bytes_sent_total"), "fragment_bytes_sent_window": sent,
        # what on the links was not fragment traffic (the DHT, the polls, TCP; namespaces' links only)
        "background_share": round(1 - sent / link, 3) if link else None,
    }


def _summed_dicts(before: dict[str, Any], after: dict[str, Any], peers: list[str], key: str) -> dict[str, float]:
    """A dict-valued /health "outer" counter summed over ``peers``, as the window's increase."""
    out: dict[str, float] = {}
    for p in peers:
        old, new = (before[p].get("outer") or {}).get(key) or {}, (after[p].get("outer") or {}).get(key) or {}
        for k, v in new.items():
            out[k] = round(out.get(k, 0) + v - old.get(k, 0), 3)
    return {k: v for k, v in sorted(out.items()) if v}


def hivemind_row(link: LinkSpec | None, tokens_per_peer: int, deadline_s: float, peers: int = 4,
                 extra: tuple[str, ...] = (), shape_late: bool = False) -> dict[str, Any]:
    """hivemind.Optimizer peers in their own namespaces (shaped from the start: hivemind's joiners load
    the state as they would over such links; with ``shape_late``, shaped only when they start
    training); they start training together, and link bytes are counted from that start. Without
    namespaces the row runs unshaped on loopback and says so. ``extra``: more hivemind_dp.py flags."""
    lab = NetnsLab() if link is not None and netns_unavailable() is None else None
    label = str(link) if lab is not None else f"loopback ({netns_unavailable() or 'no link asked'})"
    log(f"hivemind.Optimizer DP @ {label}: {peers} peers, {tokens_per_peer} tokens each")
    procs, outs, results = [], [], []
    workdir = Path(tempfile.mkdtemp(prefix="protoswarm-hm-"))
    started = time.monotonic()
    bytes_at_go = link_bytes = None
    try:
        try:
            join: list[str] = []
            for i in range(peers):
                prefix, host = [], "127.0.0.1"
                if lab is not None:
                    host, prefix = lab.add(i, LinkSpec(None, 0.0) if shape_late else link).address, lab.exec_prefix(i)
                cmd = [*prefix, sys.executable, str(ROOT / "bench/hivemind_dp.py"), "--config", DILOCO_CONFIG,
                       "--peer-index", str(i), "--peers", str(peers), "--host", host, "--tokens", str(tokens_per_peer),
                       "--run-id", f"wan-hm-{os.getpid()}", "--deadline-s", str(int(deadline_s)),
                       "--start-file", str(workdir / "GO"), *extra]
                if join:
                    cmd += ["--initial-peers", *join]
                out = open(workdir / f"peer{i}.out", "w+")
                outs.append(out)
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                              start_new_session=True,
                                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}))
                if i == 0:
                    join = [_wait_line(workdir / "peer0.out", procs[0], "JOIN ").split()[1]]
            for i, proc in enumerate(procs):  # every peer joined and loaded the state: start together
                _wait_line(workdir / f"peer{i}.out", proc, "READY")
            if lab is not None and shape_late:
                for i in range(peers):
                    lab.shape(i, link)
            bytes_at_go = [lab.link_bytes(i) for i in range(peers)] if lab is not None else None
            (workdir / "GO").touch()
            for proc, out in zip(procs, outs, strict=True):
                try:
                    proc.wait(max(1.0, deadline_s - (time.monotonic() - started)))
                except subprocess.TimeoutExpired:
                    log("  a hivemind peer passed the deadline: killing it")
                out.seek(0)
                last = [ln for ln in out.read().splitlines() if ln.startswith("{")]
                results.append(json.loads(last[-1]) if last else None)
            link_bytes = [lab.link_bytes(i) for i in range(peers)] if lab is not None else None
        finally:
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, 9)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(10)
            for out in outs:
                out.close()
    finally:
        if lab is not None:
            lab.close()
    done = [r for r in results if r]
    tokens = sum(r["tokens"] for r in done)
    wall = max((r["wall_s"] for r in done), default=0.0)
    sent = sum(b["sent"] - a["sent"] for a, b in zip(bytes_at_go, link_bytes, strict=True)) if link_bytes else None
    row = {
        "script": "bench/hivemind_dp.py", "config": DILOCO_CONFIG, "peers": peers, "peers_finished": len(done),
        "peers_complete": sum(1 for r in done if r.get("complete")), "link": label,
        "link_mode": "netns" if lab is not None else "none", "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1) if wall else None,
        "loss_end": round(sum(r["loss_end"] for r in done) / len(done), 4) if done else None,
        "val_loss": round(sum(r["val_loss"] for r in done) / len(done), 4) if done else None,
        "epochs": [r.get("epochs") for r in done],
        # forward + backward only: the local AdamW step happens inside opt.step(), with the averaging
        "utilization": round(sum(r["compute_s"] / r["wall_s"] for r in done if r["wall_s"]) / len(done), 4)
        if done else None,
        "link_bytes_window": sent, "link_bytes_per_token": round(sent / tokens, 1) if sent and tokens else None,
        "settings": done[0].get("settings") if done else None, "run_s": round(time.monotonic() - started, 1),
    }
    if not done:
        row["error"] = "no peer finished; logs in " + str(workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    log(f"  {row['tokens_per_s']} tok/s, loss_end {row['loss_end']}, link bytes {row['link_bytes_window']}, "
        f"complete peers {row['peers_complete']}/{peers}")
    return row


def _wait_line(path: Path, proc: subprocess.Popen, prefix: str, timeout: float = 180.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if line.startswith(prefix):
                return line
        if proc.poll() is not None:
            raise RuntimeError(f"a hivemind peer exited ({proc.returncode}): {path.read_text()[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"a hivemind peer printed no {prefix.strip()} line in time")


def _bars(ax, bars: list[tuple[str, float | None]], color, **settings) -> None:
    """One bar chart panel from (label, value) pairs; a missing value draws as 0."""
    ax.bar(range(len(bars)), [v or 0 for _, v in bars], color=color)
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=7)
    ax.set(**settings)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
    ax = axes[0]
    for link, rows in summary["pipeline"].items():
        for name, row in rows.items():
            if row["curve"]:
                pts = smoothed([tuple(p) for p in row["curve"]])
                ax.plot([t for t, _ in pts], [v for _, v in pts], label=f"{name} @ {link}",
                        linestyle="-" if link != "loopback" else ":")
    for target in PIPE_TARGETS:
        ax.axhline(target, color="grey", linewidth=0.8)
    ax.set(xlabel="seconds since the first scored microbatch", ylabel="loss (smoothed, held out)",
           title="pipeline, 3 stages: loss vs wall time")
    ax.legend(fontsize=7)
    pipe, diloco, hm = summary["pipeline"], summary["diloco"], summary.get("hivemind")
    _bars(axes[1], [(f"{name}\n{link}", row["tokens_per_s"]) for link, rows in pipe.items()
                    for name, row in rows.items()],
          ["C0", "C1", "C2"] * 2, ylabel="tokens/s", title="pipeline throughput")
    util = [(f"{name}\n{link}", row["utilization"]) for link, rows in diloco.items() for name, row in rows.items()]
    util += [(f"hivemind DP\n{hm['link']}", hm["utilization"])] if hm else []
    _bars(axes[2], util, "C4", ylabel="compute time / wall time", ylim=(0, 1),
          title="4 replicas: compute utilisation")
    per_token = [(f"pipeline\n{name}", row["link_bytes_per_token"]) for name, row in pipe.get("80mbit", {}).items()]
    per_token += [(f"DiLoCo\n{name}", row["link_bytes_per_token"]) for name, row in diloco.get("80mbit", {}).items()]
    per_token += [("hivemind\nDP", hm["link_bytes_per_token"])] if hm else []
    axes[3].set_yscale("log")
    _bars(axes[3], per_token, ["C0"] * 3 + ["C4"] * (len(per_token) - 3),
          ylabel="bytes on the links per token (log)", title="80 Mbit/s: link bytes per token")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller token budgets (about 15 minutes here)")
    parser.add_argument("--link-mode", choices=("auto", "netns", "app"), default="auto")
    parser.add_argument("--only", choices=("pipeline", "diloco", "hivemind"), action="append",
                        help="run only these families (default: all)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--regime", metavar="PRESET:GPU:LINK",
                        help="time-scaled emulation of a target (e.g. 8b:rtx4090:80mbit; bench/regime.py): the lab's "
                             "links get the target's ratio of link time to compute time")
    parser.add_argument("--target-stages", type=int, help="--regime: the target's pipeline stages (default: one "
                                                          "layer each)")
    parser.add_argument("--target-set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="--regime: override a field of the target's config (e.g. diloco.inner_steps=4000)")
    parser.add_argument("--replicas", type=int, default=4, help="--regime: DiLoCo replicas (default 4)")
    parser.add_argument("--tiny-batch", type=int, default=1,
                        help="--regime: the tiny DiLoCo replicas' batch (default 1: the shortest tiny step, so the "
                             "fastest scaled link and the shortest rounds in the tiny swarm's time)")
    parser.add_argument("--window-s", type=float, help="--regime: seconds measured per run (default 90, 180 "
                                                       "without --quick; twice that for DiLoCo)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.regime:
        from regime import regime_main  # bench/regime.py

        summary = regime_main(args, log)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary))
        return
    scale = 1 if args.quick else 2
    families = args.only or ["pipeline", "diloco", "hivemind"]
    fast, slow = LinkSpec.parse("80mbit"), LinkSpec.parse("20mbit")
    started = time.monotonic()
    summary: dict[str, Any] = {
        "bench": "wan", "quick": args.quick, "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}", "netns": netns_unavailable() or "available",
        "pipeline": {}, "diloco": {},
    }
    def family(name: str, run) -> None:  # one family failing must not lose the others' figures
        if name not in families:
            return
        try:
            run()
        except Exception as exc:
            log(f"{name} failed: {type(exc).__name__}: {exc}")
            summary.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:2000]

    def pipeline() -> None:
        for link in (fast, None):
            summary["pipeline"][str(link) if link else "loopback"] = pipeline_rows(link, 70_000 * scale,
                                                                                   240.0 * scale, args.link_mode)

    def diloco() -> None:
        for link in (fast, slow):
            # about 60 steps a replica (120 without --quick)
            summary["diloco"][str(link)] = diloco_rows(link, 4 * 60 * 256 * scale, 240.0 * scale, args.link_mode,
                                                       list(DILOCO_VARIANTS))

    def hivemind() -> None:
        summary["hivemind"] = hivemind_row(fast, 40 * 256 * scale, 360.0 * scale)

    family("pipeline", pipeline)
    family("diloco", diloco)
    family("hivemind", hivemind)
    pipe = summary["pipeline"].get("80mbit", {})
    if pipe and "loopback" in summary["pipeline"]:
        loop = summary["pipeline"]["loopback"]
        sub, dense = pipe["subspace_bf16"]["tokens_per_s"], pipe["dense_bf16"]["tokens_per_s"]
        summary["pipeline_80mbit_tokens_per_s"] = {k: r["tokens_per_s"] for k, r in pipe.items()}
        summary["pipeline_loopback_tokens_per_s"] = {k: r["tokens_per_s"] for k, r in loop.items()}
        summary["pipeline_80mbit_subspace_over_dense"] = round(sub / dense, 3) if sub and dense else None
        lsub, ldense = loop["subspace_bf16"]["tokens_per_s"], loop["dense_bf16"]["tokens_per_s"]
        summary["pipeline_loopback_subspace_over_dense"] = round(lsub / ldense, 3) if lsub and ldense else None
        summary["pipeline_80mbit_over_loopback"] = {
            k: round(r["tokens_per_s"] / loop[k]["tokens_per_s"], 3) if r["tokens_per_s"] and loop[k]["tokens_per_s"]
            else None for k, r in pipe.items()}
        summary["pipeline_80mbit_time_to_loss_s"] = {k: r["time_to_loss_s"] for k, r in pipe.items()}
    if len(summary["diloco"]) == 2:
        summary["diloco_80mbit_utilization"] = {k: r["utilization"] for k, r in summary["diloco"]["80mbit"].items()}
        summary["diloco_20mbit_utilization"] = {k: r["utilization"] for k, r in summary["diloco"]["20mbit"].items()}
    if "hivemind" in summary:
        hm = summary["hivemind"]
        summary["hivemind_80mbit"] = {k: hm[k] for k in ("link", "tokens", "tokens_per_s", "loss_end", "val_loss",
                                                           "link_bytes_window", "link_bytes_per_token", "utilization",
                                                           "peers_complete")}
    summary["wall_s"] = round(time.monotonic() - started, 1)
    png = ROOT / "docs/img" / ("wan-quick.png" if args.quick else "wan.png")
    if len(summary["pipeline"]) == 2 and len(summary["diloco"]) == 2:
        plot(summary, png)
        summary["plot"] = str(png.relative_to(ROOT))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
