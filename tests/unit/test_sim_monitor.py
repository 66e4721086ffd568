"""swarm/sim/monitor.py: the sim JSON's pipeline totals, and why microbatches were dropped."""

from __future__ import annotations

from swarm.dataplane import DROP_REASONS
from swarm.dataplane.send import drop_reason
from swarm.sim.monitor import PipelineMonitor


def health(**pipeline) -> dict:
    return {"stage": 0, "pipeline": {"recent_losses": [], **pipeline}}


def test_drops_and_refusals_are_summed_by_reason_over_nodes_and_incarnations() -> None:
    m = PipelineMonitor()
    m.observe(0, 100, health(microbatches_ok=5, microbatches_dropped=3, drop_reason_deadline=2,
                             drop_reason_no_route=1, refused=0))
    m.observe(0, 101, health(microbatches_ok=4, microbatches_dropped=1, drop_reason_deadline=1))  # a restart
    m.observe(1, 200, health(served=9, refused=4, refused_busy=3, refused_no_route=1))
    out = m.summary(end_time=1.0)
    assert out["microbatches_dropped"] == 4
    assert out["dropped_by_reason"] == {"deadline": 3, "no_route": 1}
    assert out["refused_by_code"] == {"busy": 3, "no_route": 1}
    assert out["frames_refused"] == 4


def test_a_drop_without_a_reason_is_reported_unattributed() -> None:
    m = PipelineMonitor()
    m.observe(0, 100, health(microbatches_dropped=2, drop_reason_peer_lost=1))
    assert m.summary(end_time=1.0)["dropped_by_reason"] == {"peer_lost": 1, "unattributed": 1}
    m = PipelineMonitor()
    m.observe(0, 100, health(microbatches_ok=7))
    assert m.summary(end_time=1.0)["dropped_by_reason"] == {}


def test_every_hop_failure_maps_to_a_drop_reason() -> None:
    codes = ("expired", "timeout", "no_route", "connection", "bad_reply", "something_new")
    remotes = ("busy", "expired", "no_route", "downstream", "wrong_stage", "no_stage", "closed", "internal",
               "outlier", "banned", "loss", None)
    seen = {drop_reason(c, None) for c in codes} | {drop_reason("remote", r) for r in remotes}
    assert seen <= set(DROP_REASONS)
    assert drop_reason("timeout", None) == drop_reason("remote", "expired") == "deadline"
    assert drop_reason("remote", "wrong_stage") == "stage_moved" and drop_reason("connection", None) == "peer_lost"
    assert drop_reason("remote", "outlier") == "refused" and drop_reason("remote", "downstream") == "downstream"


def test_the_longest_progress_gap_runs_to_the_end_of_the_run() -> None:
    m = PipelineMonitor()
    m.observe(0, 100, health(completed_at=[100.0, 101.0, 102.0]))
    m.observe(3, 300, health(completed_at=[101.5, 110.0]))  # the other stage-0 driver
    out = m.summary(end_time=112.0, start_time=90.0)
    assert out["max_progress_gap_s"] == 8.0 and out["max_progress_gap_at_s"] == 12.0  # 102 → 110
    out = m.summary(end_time=125.0, start_time=90.0)
    assert out["max_progress_gap_s"] == 15.0 and out["max_progress_gap_at_s"] == 20.0  # 110 → the end
    assert PipelineMonitor().summary(end_time=1.0) == {"loss_start": None, "loss_end": None, "loss_window": 0,
                                                      "losses_scored": 0, "loss_curve_10s": []}
