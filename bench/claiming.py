"""Joiners arriving together and rebalancing after them: the stage-claiming policy (swarm/claiming.py, no network).

A wave of J nodes joins a swarm at once: each reads the same stage records (nobody sees the others
of its wave) and claims a stage; then rebalancing runs, node by node in a random order, each move
seen by the next node (an ideal swarm: the daemon's one elected mover per stage a round and jittered
checks aim at that), until nobody moves. Throughputs are drawn per node (log-normal, ``--spread``) and each node's
*measured* throughput, the one it announces, is its true one times a log-normal noise (``--noise``):
the policy sees the measured loads, the bottleneck is reported on the true ones. Every policy meets
the same swarms (same seeds). Joining:

- ``strict``    the lowest measured load wins (``choose_stage`` with ``tolerance = 1``: before 6fd7dac)
- ``tolerant``  loads within ``rebalance_gain`` of the lowest count as ties (the node's since)

Rebalancing:

- ``bottleneck`` move when that raises the swarm's bottleneck by the gain (the rule before the
                 change that added this bench, kept here as ``bottleneck_rule`` for the comparison)
- ``evening``    ``rebalance_target``: move to the lightest stage that is ``gain`` times lighter than what
                 this node's stage keeps without it

Scenarios: ``start`` (an empty swarm, the wave covers it), ``wave`` (a swarm of ``--base`` nodes,
settled by the rule under test, and a wave of ``--wave`` joins). Reported per policy, means over
``--trials`` swarms: the bottleneck after the wave (before any move) and after rebalancing, as a
fraction of a throughput-balanced placement's (greedy: each node, fastest first, onto the stage with
the least true load); the most joiners of the wave on one stage; the moves rebalancing made (each a
checkpoint, an announce and a stage download in a real swarm).

    python bench/claiming.py                     # 4 stages, 8 + a wave of 8, 200 trials (seconds)
    python bench/claiming.py --stages 8 --base 32 --wave 32

Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.claiming import bottleneck, choose_stage, coverage_gap, rebalance_target


def bottleneck_rule(loads_without_me, servers_without_me, current, my_throughput, gain, min_replicas=1):
    """The rebalancing rule before ``rebalance_target``'s evening-out: coverage first (as now), then a
    move only when it raises the swarm's bottleneck by ``gain``. For the comparison only."""
    def with_me(values, stage, mine):
        return [v + (mine if s == stage else 0) for s, v in enumerate(values)]

    gap_now = coverage_gap(with_me(servers_without_me, current, 1), min_replicas)
    others = [s for s in range(len(loads_without_me)) if s != current]
    gaps = {s: coverage_gap(with_me(servers_without_me, s, 1), min_replicas) for s in others}
    better_covered = [s for s in others if gaps[s] < gap_now]
    if better_covered:
        return min(better_covered, key=lambda s: (gaps[s], loads_without_me[s]))
    now = bottleneck(with_me(loads_without_me, current, my_throughput))
    best, best_value = None, now
    for stage in others:
        value = bottleneck(with_me(loads_without_me, stage, my_throughput))
        if gaps[stage] == gap_now and value > best_value:
            best, best_value = stage, value
    return best if best is not None and best_value >= gain * now else None


JOINING = {"strict": 1.0, "tolerant": None}  # None: the gain
REBALANCING = {"bottleneck": bottleneck_rule, "evening": rebalance_target}


def balanced_bottleneck(true: list[float], stages: int) -> float:
    """The bottleneck of a greedy throughput-balanced placement (the reference the policies are read against)."""
    loads = [0.0] * stages
    for t in sorted(true, reverse=True):
        loads[loads.index(min(loads))] += t
    return min(loads)


def loads_of(stage_of: list[int], values: list[float], stages: int, skip: int | None = None) -> list[float]:
    loads = [0.0] * stages
    for i, s in enumerate(stage_of):
        if i != skip:
            loads[s] += values[i]
    return loads


def servers_of(stage_of: list[int], stages: int, skip: int | None = None) -> list[int]:
    counts = [0] * stages
    for i, s in enumerate(stage_of):
        if i != skip:
            counts[s] += 1
    return counts


def trial(scenario: str, stages: int, base: int, wave: int, spread: float, noise: float,
          gain: float, min_replicas: int, tolerance: float, rule, trial_id: int) -> dict:
    rng = random.Random(trial_id)  # the same swarm, the same visiting orders, for every policy
    n_base = 0 if scenario == "start" else base
    true = [rng.lognormvariate(0.0, spread) for _ in range(n_base + wave)]
    measured = [t * rng.lognormvariate(0.0, noise) for t in true]
    stage_of = [i % stages for i in range(n_base)]  # the existing swarm: evenly spread by count
    order = list(range(n_base))
    rng.shuffle(order)
    for _ in range(50):  # let it settle by the policy's own rule before the wave
        moved = False
        for i in order:
            target = rule(loads_of(stage_of, measured, stages, i), servers_of(stage_of, stages, i),
                                      stage_of[i], measured[i], gain, min_replicas)
            if target is not None:
                stage_of[i], moved = target, True
        if not moved:
            break
    loads, servers = loads_of(stage_of, measured, stages), servers_of(stage_of, stages)
    picks = [choose_stage(loads, servers, f"t{trial_id}-peer-{j}", min_replicas, tolerance) for j in range(wave)]
    stage_of += picks
    after_wave = min(loads_of(stage_of, true, stages))
    moves = 0
    order = list(range(len(stage_of)))
    for _ in range(50):
        rng.shuffle(order)
        moved = False
        for i in order:
            target = rule(loads_of(stage_of, measured, stages, i), servers_of(stage_of, stages, i),
                                      stage_of[i], measured[i], gain, min_replicas)
            if target is not None:
                stage_of[i], moved, moves = target, True, moves + 1
        if not moved:
            break
    reference = balanced_bottleneck(true, stages)
    return {"after_wave": after_wave / reference, "after_rebalance": min(loads_of(stage_of, true, stages)) / reference,
            "most_on_one_stage": max(picks.count(s) for s in range(stages)), "moves": moves}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--base", type=int, default=8, help="nodes already serving in the 'wave' scenario")
    parser.add_argument("--wave", type=int, default=8, help="nodes joining at once")
    parser.add_argument("--spread", type=float, default=0.5, help="σ of log throughput across nodes")
    parser.add_argument("--noise", type=float, default=0.1, help="σ of log measurement noise")
    parser.add_argument("--gain", type=float, default=1.2, help="swarm.rebalance_gain")
    parser.add_argument("--min-replicas", type=int, default=1, help="swarm.min_replicas")
    parser.add_argument("--trials", type=int, default=200)
    args = parser.parse_args()
    result: dict = {"bench": "claiming", "stages": args.stages, "base": args.base, "wave": args.wave,
                    "spread": args.spread, "noise": args.noise, "gain": args.gain, "min_replicas": args.min_replicas,
                    "trials": args.trials, "scenarios": {}}
    for scenario in ("start", "wave"):
        rows = {}
        for joining, tolerance in JOINING.items():
            for rebalancing, rule in REBALANCING.items():
                policy = f"{joining}+{rebalancing}"
                runs = [trial(scenario, args.stages, args.base, args.wave, args.spread, args.noise, args.gain,
                              args.min_replicas, tolerance or args.gain, rule, t) for t in range(args.trials)]
                rows[policy] = {key: round(statistics.fmean(r[key] for r in runs), 4) for key in runs[0]}
                print(f"{scenario:6s} {policy:20s} " + "  ".join(f"{k} {v}" for k, v in rows[policy].items()),
                      file=sys.stderr)
        result["scenarios"][scenario] = rows
    result["policy_now"] = "tolerant+evening"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
