"""bench/claiming.py: the claiming policy's simulation runs, and reads the way BENCHMARKS.md says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_claiming_bench_prints_its_json_and_the_new_rule_unfreezes_a_crowded_swarm():
    out = subprocess.run([sys.executable, "bench/claiming.py", "--trials", "40"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["bench"] == "claiming" and result["policy_now"] == "tolerant+evening"
    wave = result["scenarios"]["wave"]
    assert set(wave) == {"strict+bottleneck", "strict+evening", "tolerant+bottleneck", "tolerant+evening"}
    # Strict joiners of one wave all take the same stage; the tolerance spreads them.
    assert wave["strict+bottleneck"]["most_on_one_stage"] == 8
    assert wave["tolerant+evening"]["most_on_one_stage"] < 8
    # The bottleneck rule leaves the crowd in place; the current rule moves it (seeded: the same swarms).
    assert wave["tolerant+evening"]["after_rebalance"] > wave["strict+bottleneck"]["after_rebalance"] + 0.1
    assert all(row["after_rebalance"] > 0 for s in result["scenarios"].values() for row in s.values())
