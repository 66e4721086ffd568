"""What one node costs the machine: memory and CPU of every process a `node start` runs (issue 20).

Two phases, each one real node started by the sim harness (swarm/sim), measured from /proc:

- ``idle``      a node of a 3-stage pipeline alone (configs/swarm/pipeline-local.toml): it claims a stage and
                waits for neighbours, so it runs the DHT, presence and the P2P handlers, no training
- ``training``  a Streaming DiLoCo replica of the tiny model as one stage (configs/swarm/diloco-local.toml),
                training alone

For every process in the node's session (the node, hivemind's DHT process, its libp2p daemon, ...):
RSS, PSS (shared pages split between the processes that map them: the honest share of a machine's
memory), USS (pages only it maps) and CPU (% of one core over the window). Linux only (/proc).

    python bench/footprint.py                      # 30 s windows
    python bench/footprint.py --window 60 --phases idle

Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.sim.swarm import LocalSwarm

PHASES = {"idle": "swarm/pipeline-local", "training": "swarm/diloco-local"}
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def session_pids(root: int) -> list[int]:
    """``root`` and all its descendants (hivemind starts its DHT process and daemon in new sessions)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(entry)] = int(fields[1])  # fields after "(comm)": state ppid ...
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, ppid in parent.items() if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    return sorted(pid for pid in tree if pid in parent)


def sample(pid: int) -> dict | None:
    """One process's name, memory (bytes) and CPU time (seconds), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    kib = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:] if line.split()[-1] == "kB"}
    return {
        "name": describe(stat[stat.index("(") + 1:stat.rindex(")")], [c.decode(errors="replace") for c in cmdline if c]),
        "rss": int(fields[21]) * PAGE,
        "pss": kib.get("Pss", 0) * 1024,
        "uss": (kib.get("Private_Clean", 0) + kib.get("Private_Dirty", 0)) * 1024,
        "cpu_s": (int(fields[11]) + int(fields[12])) / TICKS,
    }


def describe(comm: str, argv: list[str]) -> str:
    """A readable role for a node's process."""
    text = " ".join(argv)
    if "node.cli" in text:
        return "node (forked child)"  # the root is renamed "node (main)" by the caller
    if "p2pd" in comm or "p2pd" in text:
        return "p2pd (libp2p daemon)"
    if comm.startswith("python") or "multiprocessing" in text or "spawn_main" in text:
        return f"python child ({comm})"
    return comm


def measure(config: str, window: float, training: bool, startup: float) -> dict:
    with LocalSwarm(1, config=config, startup_timeout=startup, run_id=f"footprint-{os.getpid()}") as swarm:
        swarm.start_all()
        node = swarm.nodes[0]
        node_pid = node.proc.pid

        def ready() -> bool:
            h = swarm.health(0) or {}
            return h.get("state") == "online" and h.get("stage") is not None and (not training or (h.get("progress") or 0) >= 10)

        waited = swarm.wait_until(ready, startup, "the node claimed a stage" + (" and trained 10 steps" if training else ""))
        first = {pid: s for pid in session_pids(node.proc.pid) if (s := sample(pid))}
        t0, peaks = time.monotonic(), {}
        while time.monotonic() - t0 < window:
            for pid in session_pids(node.proc.pid):
                s = sample(pid)
                if s:
                    peak = peaks.setdefault(pid, {"rss": 0, "pss": 0, "uss": 0})
                    for k in peak:
                        peak[k] = max(peak[k], s[k])
            time.sleep(1.0)
        elapsed = time.monotonic() - t0
        last = {pid: s for pid in session_pids(node.proc.pid) if (s := sample(pid))}
        health = swarm.health(0) or {}
    mib = 1 << 20
    procs = []
    for pid, s in sorted(last.items()):
        if pid == node_pid:
            s["name"] = "node (main)"
        before = first.get(pid, {"cpu_s": s["cpu_s"]})
        peak = peaks.get(pid, s)
        procs.append({"pid": pid, "name": s["name"], "rss_mib": round(peak["rss"] / mib, 1),
                      "pss_mib": round(peak["pss"] / mib, 1), "uss_mib": round(peak["uss"] / mib, 1),
                      "cpu_pct": round(100 * (s["cpu_s"] - before["cpu_s"]) / elapsed, 1)})
    return {
        "config": config, "window_s": round(elapsed, 1), "ready_after_s": round(waited, 1),
        "progress_at_end": health.get("progress"), "processes": procs, "process_count": len(procs),
        "rss_mib": round(sum(p["rss_mib"] for p in procs), 1),
        "pss_mib": round(sum(p["pss_mib"] for p in procs), 1),
        "cpu_pct": round(sum(p["cpu_pct"] for p in procs), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=30.0, help="seconds each phase is sampled for")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES))
    parser.add_argument("--startup", type=float, default=180.0, help="deadline for a node to get ready (s)")
    args = parser.parse_args()
    out = {"bench": "footprint", "phases": {}}
    for phase in args.phases:
        print(f"measuring {phase} ({PHASES[phase]}) ...", file=sys.stderr, flush=True)
        out["phases"][phase] = result = measure(PHASES[phase], args.window, phase == "training", args.startup)
        for p in result["processes"]:
            print(f"  {p['name']:<28} rss {p['rss_mib']:7.1f} MiB  pss {p['pss_mib']:7.1f}  uss {p['uss_mib']:7.1f}"
                  f"  cpu {p['cpu_pct']:5.1f}%", file=sys.stderr, flush=True)
    out["command"] = " ".join(["python bench/footprint.py", *sys.argv[1:]])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
