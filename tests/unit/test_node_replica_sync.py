"""ReplicaSync's bookkeeping without a network: the shared schedule and drift detection."""

from __future__ import annotations

import asyncio

import torch

from node.config import load_config
from node.metrics import NodeMetrics
from node.replica_sync import ReplicaSync
from node.stage_store import StageStore
from protocol.messages import StageRecord


def small(tmp_path):
    return load_config(None, model={"name": "t", "vocab_size": 256, "d_model": 32, "n_layers": 3, "n_heads": 2,
                                    "ffn_hidden": 64, "max_seq_len": 32, "subspace_rank": 4},
                       train={"seq_len": 16, "checkpoint_dir": str(tmp_path)},
                       diloco={"inner_steps": 30, "fragments": 3})


def record(peer, epoch=0, steps=0, history=(), state="online"):
    return StageRecord(peer_id=peer, run_id="r", stage=0, num_stages=1, state=state, outer_epoch=epoch,
                       epoch_steps=steps, outer_history=list(history))


def make(tmp_path, peer="P5"):
    cfg = small(tmp_path)
    loop = asyncio.new_event_loop()
    sync = ReplicaSync(cfg, NodeMetrics(), loop, None, peer, "r")
    work = StageStore.fresh(cfg, "r", 0, tmp_path / peer)
    sync.attach(work)
    return sync, work, loop


def test_the_epoch_is_summed_over_replicas_and_a_joiner_takes_the_stage_position(tmp_path):
    sync, _, loop = make(tmp_path)
    try:
        assert sync.spacing == 10  # H = 30 summed steps over P = 3 fragments
        sync.observe({0: [record("P1", epoch=4, steps=3), record("P2", epoch=4, steps=5)]})
        assert sync.epoch == 4  # joined the schedule where the stage is, without a round
        assert sync._target_epoch() == 4
        sync.epoch_steps = 2  # 2 + 3 + 5 = 10 summed steps: the boundary
        assert sync._target_epoch() == 5
        sync.observe({0: [record("P1", epoch=7)]})  # a peer is ahead: move there at once
        assert sync._target_epoch() == 7
        fields = sync.record_fields()
        assert fields["outer_epoch"] == 4 and len(fields["outer_history"]) == 3
        # The exchange takes the [exchange] section itself, and the run's fragment codec.
        assert sync.exchange.config is sync.cfg.exchange
        assert sync.exchange.codec_name == sync.cfg.wire.fragment_codec
    finally:
        loop.close()


def test_a_replica_whose_history_differs_from_the_majority_resyncs(tmp_path):
    sync, work, loop = make(tmp_path, peer="P5")
    try:
        work.outer.begin(0, 2)
        work.outer.apply(0, torch.zeros(work.outer.layouts[0].numel))
        mine = work.outer.history()
        other = ["2:" + "ab" * 8, *mine[1:]]
        # One peer agrees with us, one differs: 2 against 1, nothing to do.
        sync.observe({0: [record("P1", history=mine), record("P2", history=other)]})
        assert not sync.resync_requested
        # Two peers share another history for the same round: we are the odd one out.
        sync.observe({0: [record("P1", history=other), record("P2", history=other)]})
        assert sync.resync_requested and sorted(sync.resync_from) == ["P1", "P2"]
        sync.attach(work)
        assert not sync.resync_requested
        # Two replicas, one each way: the larger peer id gives way, so exactly one of them resyncs.
        sync.observe({0: [record("P9", history=other)]})
        assert not sync.resync_requested  # P9 > P5: P9 gives way
        sync.observe({0: [record("P1", history=other)]})
        assert sync.resync_requested and sync.resync_from == ["P1"]
        sync.attach(work)
        # Histories of another round are not compared (a replica may just be a round behind).
        sync.observe({0: [record("P1", history=["1:" + "cd" * 8, *mine[1:]]), record("P2", history=["1:" + "cd" * 8, *mine[1:]])]})
        assert not sync.resync_requested
    finally:
        loop.close()


def test_outer_state_travels_in_snapshots(tmp_path):
    cfg = small(tmp_path)
    a, b = StageStore.fresh(cfg, "r", 0, tmp_path / "a"), StageStore.fresh(cfg, "r", 0, tmp_path / "b")
    a.outer.begin(1, 0)
    a.outer.apply(1, torch.full((a.outer.layouts[1].numel,), 1e-3))
    snap = a.snapshot()
    assert snap.round_id == 1 and "outer.global.1" in snap.tensors and "outer.chain" in snap.tensors
    b.check_compatible(snap)
    b.load(snap)
    assert b.outer.history() == a.outer.history()
    assert all(torch.equal(x, y) for x, y in zip(a.outer.global_, b.outer.global_, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a.outer.momentum, b.outer.momentum, strict=True))


def test_consensus_state_is_the_same_bytes_on_agreeing_replicas_and_a_joiner_starts_from_it(tmp_path):
    from swarm.state_transfer import encode_snapshot

    cfg = small(tmp_path)
    a, b, joiner = (StageStore.fresh(cfg, "r", 0, tmp_path / n) for n in ("a", "b", "j"))
    mean = torch.full((a.outer.layouts[2].numel,), 1e-3)
    for work in (a, b):
        with torch.no_grad():  # their local weights differ; their agreed state does not
            next(work.module.parameters()).add_(torch.rand(()).item())
        work.outer.begin(2, 0)
        work.outer.apply(2, mean)
    digest = [encode_snapshot(w.consensus_snapshot(), "r", 1 << 20)[0].digest for w in (a, b)]
    assert digest[0] == digest[1]
    assert "stages.0.lm_head.weight" not in a.consensus_snapshot().tensors  # no local weights
    joiner.load_consensus(a.consensus_snapshot())
    assert joiner.outer.history() == a.outer.history()
    for layout, flat in zip(joiner.outer.layouts, a.outer.global_, strict=True):
        params = dict(joiner.module.named_parameters())
        for name, value in layout.unflatten(flat).items():
            assert torch.equal(params[name].detach(), value)


def _run_with_slow_exchange(tmp_path, blocking: bool, overlap: int, group_size: int = 2, error_feedback=False):
    """One boundary crossed with an exchange that takes 0.4 s (it "sends" each part at half its size);
    returns the sync after that step."""
    import threading
    import time
    import types

    cfg = small(tmp_path)
    cfg.diloco.blocking, cfg.diloco.overlap, cfg.diloco.error_feedback = blocking, overlap, error_feedback
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sync = ReplicaSync(cfg, NodeMetrics(), loop, None, "P5", "r")
    work = StageStore.fresh(cfg, "r", 0, tmp_path / "P5")
    sync.attach(work)

    class SlowExchange:
        def __init__(self):
            self.stats = {}

        async def run_round(self, key, part, weight=1.0):
            await asyncio.sleep(0.4)
            self.part = part.clone()
            return types.SimpleNamespace(mean=torch.zeros_like(part), bytes_sent=1, bytes_received=1, rejected={},
                                         group_size=group_size, reason="", sent=part * 0.5)

    sync.exchange = SlowExchange()
    with torch.no_grad():  # the replica has moved away from the global copy: its part is not zero
        for param in work.module.parameters():
            param.add_(0.01)
    sync.epoch_steps = sync.spacing - 1  # the next step reaches the boundary
    started = time.monotonic()
    sync.after_step()
    return sync, time.monotonic() - started, loop


def _stop(loop) -> None:
    loop.call_soon_threadsafe(loop.stop)


def test_blocking_without_overlap_waits_for_the_mean_before_the_next_step(tmp_path):
    sync, took, loop = _run_with_slow_exchange(tmp_path, blocking=True, overlap=0)
    _stop(loop)
    assert sync.stats["rounds_committed"] == 1 and sync.stats["rounds_alone"] == 0 and not sync._pending
    assert took >= 0.35 and sync.wait_s >= 0.35  # it stood still for the round, and counted it
    # With overlap (τ = 1) the boundary step does not wait; the next step does.
    sync, took, loop = _run_with_slow_exchange(tmp_path / "tau1", blocking=True, overlap=1)
    try:
        assert sync.stats["rounds_committed"] == 0 and len(sync._pending) == 1 and sync.wait_s == 0.0
        sync.after_step()
        assert sync.stats["rounds_committed"] == 1 and sync.wait_s > 0.0
    finally:
        _stop(loop)


def test_a_round_committed_with_only_our_own_part_is_counted_alone(tmp_path):
    """A leader whose members' parts never arrived applies its own outer gradient: committed, but
    nothing was averaged, and the count (and metric) must say so."""
    sync, _, loop = _run_with_slow_exchange(tmp_path, blocking=True, overlap=0, group_size=1)
    _stop(loop)
    assert sync.stats["rounds_committed"] == 1 and sync.stats["rounds_alone"] == 1
    assert sync.metrics.outer_rounds_alone_total._value.get() == 1
    assert sync.health()["rounds_alone"] == 1


def test_error_feedback_through_replica_sync_keeps_what_the_wire_lost_and_adds_it_to_the_next_part(tmp_path):
    sync, _, loop = _run_with_slow_exchange(tmp_path, blocking=True, overlap=0, error_feedback=True)
    _stop(loop)
    outer = sync.work.outer
    fragment = next(f for f, r in enumerate(outer.residual) if r is not None)
    part = sync.exchange.part
    assert part.abs().sum() > 0 and torch.allclose(outer.residual[fragment], part * 0.5)
    fresh = outer.global_[fragment] - outer._outer(outer._flat(fragment))
    assert torch.allclose(outer.begin(fragment, 99), fresh + part * 0.5)  # the next part carries it
    # Without error feedback nothing is kept.
    sync, _, loop = _run_with_slow_exchange(tmp_path / "off", blocking=True, overlap=0)
    _stop(loop)
    assert all(r is None for r in sync.work.outer.residual)


def test_non_blocking_never_waits(tmp_path):
    sync, _, loop = _run_with_slow_exchange(tmp_path, blocking=False, overlap=0)
    try:
        assert sync.wait_s == 0.0
        assert sync.stats["rounds_committed"] == 0 and len(sync._pending) == 1  # applied when it is back
    finally:
        _stop(loop)
