"""bench/regime.py's time scaling for Streaming DiLoCo (`bench/wan.py --regime`): the tiny swarm's link,
deadlines and refresh follow the target's round-to-step ratio. The runs themselves are benches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from regime import diloco_scale, parse_regime, target_config


def _setting(overrides: list[str], key: str) -> float:
    return float(next(o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")))


@pytest.mark.parametrize("link", ["80mbit", "20mbit"])
def test_the_tiny_round_keeps_the_targets_ratio_of_round_to_step(link):
    regime = parse_regime(f"1b:rtx4090:{link}")
    target = target_config(regime, None, diloco=True)
    a = diloco_scale(regime, target, 4, tiny_step_s=0.1, tiny_batch=1, contention=2.0)
    b = diloco_scale(regime, target, 4, tiny_step_s=0.2, tiny_batch=1, contention=2.0)
    plan = a["plan_target"]
    # a round over the scaled link, in tiny steps, is the target's round in target steps
    g = plan["group"]
    fragments_on_a_link = 3 * (g - 1) / g if plan["exchange"] == "balanced" else 2 * (g - 1)  # a member's / the leader's
    tiny_round_steps = fragments_on_a_link * a["fragment_bytes"]["tiny"] * 8 / a["rate_bps"] / a["inner_step_s"]["tiny"]
    assert tiny_round_steps == pytest.approx(plan["round_in_inner_steps"], rel=0.05)  # the plan adds delays
    # a tiny step twice as long wants a link half as fast; time runs twice as slow
    assert b["rate_bps"] == pytest.approx(a["rate_bps"] / 2)
    assert b["time_factor"] == pytest.approx(2 * a["time_factor"])
    assert a["inner_step_s"]["tiny"] == pytest.approx(0.2)  # the step × contention
    # deadlines and record refresh stretched by the time factor; a round ends at commit or deadline
    x = target.exchange
    assert _setting(a["overrides"], "exchange.timeout_s") == pytest.approx(x.timeout_s * a["time_factor"], rel=1e-3)
    assert _setting(b["overrides"], "swarm.refresh_s") == pytest.approx(
        max(2.0, target.swarm.refresh_s * b["time_factor"]), rel=1e-3)
    assert a["round_end_tiny_s"] == pytest.approx(min(plan["round_s"], x.timeout_s) * a["time_factor"])
    assert "train.batch_size=1" in a["overrides"]
