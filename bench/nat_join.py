"""How long a joiner behind a home router takes to its first committed outer round, next to a public one.

A real localhost swarm of `node start` processes (swarm/sim/swarm.py) in the namespace lab: nodes 0
and 1 are public and form the swarm (``configs/swarm/diloco-local.toml``: the tiny model as one stage,
Streaming DiLoCo between the replicas). Once both committed a round, node 2 joins from behind a home
router of its own (``nat``: a masquerading namespace, no inbound port); once it committed a round,
node 3 joins with a public address, for comparison. Every link is shaped to ``--link`` (the router's
WAN behind NAT). For each joiner, from its process start, read from its /health every 0.5 s:
``reachability_s`` (its verdict is known), ``online_s`` (it serves) and ``first_round_s`` (its first
committed outer round), and what it found (``reachable``).

    python bench/nat_join.py                 # 80 Mbit/s links
    python bench/nat_join.py --link 20mbit

Needs root (namespaces) and iptables (unpacked from Debian's package when missing). The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = "configs/swarm/diloco-local.toml"


def _rounds(health: dict | None) -> int:
    return int(((health or {}).get("outer") or {}).get("rounds_committed", 0))


def _time_join(swarm, index: int, timeout: float) -> dict:
    """Start node ``index`` and time it to reachability, online and its first committed round."""
    started = time.monotonic()
    swarm.start(index)
    out: dict = {"node": index, "behind_nat": index in swarm.nat}
    while time.monotonic() - started < timeout:
        health = swarm.health(index)
        elapsed = round(time.monotonic() - started, 1)
        if health:
            if health.get("reachable") and "reachability_s" not in out:
                out["reachability_s"], out["reachable"] = elapsed, health["reachable"]
            if health.get("state") == "online" and "online_s" not in out:
                out["online_s"] = elapsed
            if _rounds(health) > 0:
                out["first_round_s"] = elapsed
                return out
        if not swarm.nodes[index].alive:
            out["error"] = f"node {index} exited ({swarm.nodes[index].proc.returncode})"
            return out
        time.sleep(0.5)
    out["error"] = f"no committed round within {timeout:.0f} s"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--link", default="80mbit", help="every node's link (default 80mbit)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a joiner may take (default 300)")
    args = parser.parse_args()

    from swarm.sim.link import LinkSpec
    from swarm.sim.swarm import LocalSwarm

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    with LocalSwarm(4, CONFIG, link=LinkSpec.parse(args.link), link_mode="netns", nat=[2]) as swarm:
        swarm.start_founder()
        swarm.start(1)
        formed = swarm.wait_until(lambda: min(_rounds(swarm.health(i)) for i in (0, 1)) > 0, args.timeout,
                                  "nodes 0 and 1 commit a round")
        print(f"swarm formed: both public nodes committed a round {formed:.0f} s after node 1 started", file=sys.stderr)
        joins = []
        for index in (2, 3):
            joins.append(_time_join(swarm, index, args.timeout))
            print(f"joiner {joins[-1]}", file=sys.stderr)
    print(json.dumps({"bench": "nat_join", "commit": commit, "link": args.link, "config": CONFIG, "joins": joins}))


if __name__ == "__main__":
    main()
