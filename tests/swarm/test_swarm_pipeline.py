"""The pipeline data plane over real hivemind P2P daemons in one process: routing, faults, bad input.

Each stage is a real DataPlane with a real PipelineCompute of a small subspace model (d=64, k=8,
3 stages); only the processes are shared. The multi-process swarm runs are in test_swarm_local.py.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from hivemind.p2p import PeerID
from p2p_util import run_p2p as _run
from p2p_util import wait_for

from node.config import load_config
from node.metrics import NodeMetrics
from node.pipeline import PipelineCompute
from node.stage_store import StageStore
from protocol.framing import read_frame, write_frame
from protocol.messages import ActivationFrame, ErrorReply, GradientFrame, decode_message, encode_message
from protocol.tensors import WireConfig
from swarm.dataplane import HANDLER, DataPlane, DataplaneConfig, ScaleGuard
from swarm.dataplane.config import PING_HANDLER

RUN = "pipe"


def small_config(tmp_path, num_stages=3):
    return load_config(
        None,
        model={"name": "t", "vocab_size": 256, "d_model": 64, "n_layers": 3, "n_heads": 2, "ffn_hidden": 128,
               "max_seq_len": 64, "subspace_rank": 8},
        pipeline={"num_stages": num_stages},
        train={"batch_size": 2, "seq_len": 16, "warmup_steps": 1, "lr": 3e-3, "checkpoint_dir": str(tmp_path)},
    )


class Node:
    """One daemon: a P2P instance, a DataPlane, the PipelineCompute of one stage, its own metrics."""

    def __init__(self, p2p, cfg, stage, tmp_path, wire=None, **dataplane):
        self.p2p, self.cfg, self.metrics = p2p, cfg, NodeMetrics()
        self.peer = p2p.peer_id.to_base58()
        defaults = dict(microbatch_timeout_s=10.0, max_inflight=2, ban_base_s=30.0)
        wire = wire or cfg.wire
        self.plane = DataPlane(p2p, self.peer, RUN, DataplaneConfig(**{**defaults, **dataplane}), wire,
                               d_model=cfg.model.d_model, max_seq_len=cfg.model.max_seq_len,
                               limits=wire.limits(cfg.model.vocab_size), events=self.metrics)
        self.compute = PipelineCompute(StageStore.fresh(cfg, RUN, stage, tmp_path / f"{self.peer}-{stage}"), cfg)
        self.plane.attach(self.compute)

    def refused(self, code: str) -> float:
        return self.metrics.registry.get_sample_value("protoswarm_pipeline_refused_total", {"code": code}) or 0.0




def fresh_windows(seed=0):
    """A new random batch every call: nothing to memorize, so gradients keep their scale. On the 4 repeated
    ``windows`` the stages memorize them and their gradients shrink by orders of magnitude, so an honest
    replica whose weights lag (one frozen early) can reply gradients over ``outlier_ratio`` × the median:
    refused as ``bad_reply`` and banned, which is the guard working, not the liveness a test may be about."""
    g = torch.Generator().manual_seed(seed)
    return lambda: torch.randint(0, 256, (2, 17), generator=g)


def windows(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 256, (2, 17), generator=g) for _ in range(n)]
    counter = iter(range(1 << 30))
    return lambda: batches[next(counter) % n]


def test_microbatches_flow_learn_reroute_around_a_dead_replica_and_reach_a_new_one(tmp_path):
    cfg = small_config(tmp_path)

    async def body(a, b, c, d, e):
        nodes = [Node(p, cfg, s, tmp_path) for p, s in ((a, 0), (b, 1), (c, 2), (d, 2), (e, 2))]
        n0, n1, n2, n3, n4 = nodes
        for node in nodes:
            await node.plane.register()
        n0.plane.set_next_replicas([(n1.peer, 1.0)])
        n1.plane.set_next_replicas([(n2.peer, 1.0), (n3.peer, 1.0)])
        n0.plane.start_driver(windows())
        await wait_for(lambda: n0.plane.stats["microbatches_ok"] >= 30, 60, "30 microbatches through 3 stages")
        assert n2.plane.stats["served"] > 0 and n3.plane.stats["served"] > 0  # both replicas get work
        losses = [v for _, v in sorted(list(n2.plane.losses) + list(n3.plane.losses))]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # 4 repeated windows: learned quickly
        # k = 8 of d = 64 in bf16, one byte of token id per token: ~7× less than dense bf16 both ways.
        for way in ("forward", "backward"):
            ratio = n1.plane.stats[f"dense_{way}_sent"] / n1.plane.stats[f"bytes_{way}_sent"]
            assert 5.0 < ratio < 8.0, (way, ratio)
        assert n0.metrics.registry.get_sample_value("protoswarm_pipeline_compression_ratio") > 5.0

        await d.shutdown()  # replica n3 dies; route stage 1 to it alone, so hops must hit the dead peer
        n1.plane.set_next_replicas([(n3.peer, 1.0)])
        await wait_for(lambda: n0.plane.stats["microbatches_dropped"] >= 1 and n1.plane.router.banned(n3.peer), 30,
                       "microbatches through the dead replica are dropped, counted, and the replica banned")
        # n1 refused them: the hop to the dead replica failed (downstream), ran out the budget (expired), or the
        # dead replica was banned already and n1 had no route left (no_route: stage 0 waited, then dropped).
        refused = sum(n1.plane.stats[f"refused_{c}"] for c in ("downstream", "expired", "no_route"))
        assert refused >= 1, dict(n1.plane.stats)
        stats = n0.plane.stats
        reasons = {k: v for k, v in stats.items() if k.startswith("drop_reason_")}
        assert sum(reasons.values()) == stats["microbatches_dropped"], reasons  # every drop has its reason
        n1.plane.set_next_replicas([(n2.peer, 1.0), (n3.peer, 1.0)])  # the survivor is back on the list
        ok = n0.plane.stats["microbatches_ok"]
        await wait_for(lambda: n0.plane.stats["microbatches_ok"] >= ok + 10, 60, "10 more through the survivor")
        assert n1.plane.router.banned(n3.peer)  # still banned: new work went around it

        n1.plane.set_next_replicas([(n2.peer, 1.0), (n4.peer, 1.0)])  # a new replica joins stage 2
        await wait_for(lambda: n4.plane.stats["served"] >= 3, 60, "the new replica serves traffic")
        n0.plane.stop_driver()
        await wait_for(lambda: all(n.compute.in_flight == 0 for n in nodes), 30, "no stash left")
        for node in nodes:
            node.compute.close()

    _run(5, body)


def test_a_stuck_next_hop_drops_the_microbatch_at_its_deadline_and_frees_every_stash(tmp_path):
    cfg = small_config(tmp_path)

    async def body(a, b, c):
        n0, n1, n2 = (Node(p, cfg, s, tmp_path, microbatch_timeout_s=2.0) for p, s in ((a, 0), (b, 1), (c, 2)))
        for node in (n0, n1, n2):
            await node.plane.register()
        n0.plane.set_next_replicas([(n1.peer, 1.0)])
        n1.plane.set_next_replicas([(n2.peer, 1.0)])
        frozen = threading.Event()
        n2.compute._jobs.put((-1, -1, "forward", frozen.wait, asyncio.get_running_loop().create_future(),
                              asyncio.get_running_loop(), None))  # the last stage's worker hangs (a frozen machine)
        n0.plane.start_driver(windows())
        await wait_for(lambda: n0.plane.stats["microbatches_dropped"] >= 2, 20, "drops at the deadline")
        n0.plane.stop_driver()
        stats = n0.plane.stats
        assert stats["microbatches_ok"] == 0
        dropped = n0.metrics.registry.get_sample_value("protoswarm_pipeline_microbatches_total", {"result": "dropped"})
        assert dropped == stats["microbatches_dropped"] >= 2
        # Every drop has its reason: the frozen last stage used up the budget.
        assert stats["drop_reason_deadline"] == stats["microbatches_dropped"], dict(stats)
        assert n0.metrics.registry.get_sample_value("protoswarm_pipeline_dropped_total",
                                                    {"reason": "deadline"}) == dropped
        await wait_for(lambda: n0.compute.in_flight == 0 and n1.compute.in_flight == 0, 10, "stashes freed")
        frozen.set()
        for node in (n0, n1, n2):
            node.compute.close()

    _run(3, body)


async def _send(client, server_peer, body: bytes):
    _, reader, writer = await client.call_binary_stream_handler(PeerID.from_base58(server_peer), HANDLER)
    try:
        await write_frame(writer, body)
        return decode_message(await read_frame(reader, timeout=20))
    finally:
        writer.close()


def test_bad_frames_are_refused_counted_and_the_stage_keeps_serving(tmp_path):
    cfg = small_config(tmp_path)

    async def body(server_p2p, client):
        last = Node(server_p2p, cfg, 2, tmp_path, peer_strikes=6)
        await last.plane.register()
        me = client.peer_id.to_base58()
        ids = torch.randint(0, 256, (2, 17))

        def frame(**changes):
            fields = dict(run_id=RUN, microbatch_id=1, stage=1, route=[me, me], token_ids=ids,
                          coefficients=torch.randn(2, 17, 8), codec="bf16", basis=last.compute.basis)
            return ActivationFrame(**{**fields, **changes})

        async def send(msg):
            return await _send(client, last.peer, encode_message(msg) if not isinstance(msg, bytes) else msg)

        reply = await send(frame())
        assert isinstance(reply, GradientFrame) and reply.loss > 0 and tuple(reply.grad.shape) == (2, 17, 8)
        nan = bytearray(encode_message(frame()))
        nan[-2:] = b"\xc0\x7f"  # the last coefficient becomes a bf16 NaN
        bad = {
            "wrong_stage": frame(stage=0, route=[me]),
            "wrong_run": frame(run_id="other"),
            "basis": frame(basis="0" * 16),
            "shape": frame(coefficients=torch.randn(2, 17, 9)),
            "unknown_microbatch": GradientFrame(run_id=RUN, microbatch_id=7, stage=3, grad=torch.zeros(2, 17, 8)),
            "non_finite": bytes(nan),
        }
        for code, msg in bad.items():
            reply = await send(msg)
            assert isinstance(reply, ErrorReply) and reply.code == code, (code, reply)
        for code in ("wrong_stage", "wrong_run", "basis", "shape", "unknown_microbatch"):
            assert last.refused(code) == 1.0, code
        assert last.metrics.registry.get_sample_value("protoswarm_protocol_errors_total", {"code": "non_finite"}) == 1
        reply = await send(frame(microbatch_id=2))  # still serving
        assert isinstance(reply, GradientFrame) and reply.microbatch_id == 2
        # Five offences so far (wrong_stage is not one: a stale route after a stage move is honest).
        reply = await send(frame(basis="1" * 16))
        assert isinstance(reply, ErrorReply) and reply.code == "basis"
        reply = await send(frame(microbatch_id=3))
        assert isinstance(reply, ErrorReply) and reply.code == "banned"
        assert last.plane.stats["peers_banned"] == 1 and last.refused("banned") == 1.0
        last.compute.close()

    _run(2, body)


def test_a_reply_for_another_microbatch_is_rejected_and_its_sender_banned(tmp_path):
    cfg = small_config(tmp_path)

    async def body(a, rogue):
        n0 = Node(a, cfg, 0, tmp_path, microbatch_timeout_s=5.0, max_inflight=1)
        await n0.plane.register()

        async def lying(info, reader, writer):
            msg = decode_message(await read_frame(reader))
            reply = GradientFrame(run_id=RUN, microbatch_id=msg.microbatch_id + 1, stage=1,
                                  grad=torch.zeros(msg.coefficients.shape))
            await write_frame(writer, encode_message(reply))
            writer.close()

        await rogue.add_binary_stream_handler(HANDLER, lying)
        rogue_peer = rogue.peer_id.to_base58()
        n0.plane.set_next_replicas([(rogue_peer, 1.0)])
        n0.plane.start_driver(windows())
        await wait_for(lambda: n0.plane.stats["microbatches_dropped"] >= 1, 20, "the microbatch is dropped")
        n0.plane.stop_driver()
        assert n0.plane.stats["microbatches_ok"] == 0
        assert n0.refused("bad_reply") >= 1 and n0.plane.router.banned(rogue_peer)
        await wait_for(lambda: n0.compute.in_flight == 0, 10, "stash freed")
        assert all(p.grad is None for p in n0.compute.module.parameters())  # nothing was learned from it
        n0.compute.close()

    _run(2, body)


@pytest.mark.parametrize("codec", ["int8", "e3m0"])
def test_quantized_boundaries_are_a_config_switch(tmp_path, codec):
    cfg = small_config(tmp_path)

    async def body(a, b, c):
        wire = WireConfig(activation_codec=codec, gradient_codec=codec)
        n0, n1, n2 = (Node(p, cfg, s, tmp_path, wire=wire) for p, s in ((a, 0), (b, 1), (c, 2)))
        for node in (n0, n1, n2):
            await node.plane.register()
        n0.plane.set_next_replicas([(n1.peer, 1.0)])
        n1.plane.set_next_replicas([(n2.peer, 1.0)])
        n0.plane.start_driver(windows())
        await wait_for(lambda: n0.plane.stats["microbatches_ok"] >= 4, 60, "microbatches with a quantized boundary")
        n0.plane.stop_driver()
        assert n1.metrics.registry.get_sample_value(
            "protoswarm_pipeline_bytes_total", {"direction": "forward", "way": "sent", "codec": codec}) > 0
        for node in (n0, n1, n2):
            node.compute.close()

    _run(3, body)


def test_a_full_replica_is_backpressure_not_a_drop(tmp_path):
    cfg = small_config(tmp_path)

    async def body(a, b, c):
        n0 = Node(a, cfg, 0, tmp_path, max_inflight=4)
        n1 = Node(b, cfg, 1, tmp_path, max_queue=1)  # takes one job at a time: the others hear "busy"
        n2 = Node(c, cfg, 2, tmp_path)
        for node in (n0, n1, n2):
            await node.plane.register()
        n0.plane.set_next_replicas([(n1.peer, 1.0)])
        n1.plane.set_next_replicas([(n2.peer, 1.0)])
        n0.plane.start_driver(windows())
        stats = n0.plane.stats
        await wait_for(lambda: stats["microbatches_ok"] >= 8 and stats["microbatches_retried"] >= 1, 60,
                       "8 microbatches through a busy stage, some of them asked again")
        n0.plane.stop_driver()
        assert n1.refused("busy") >= 1
        assert n0.plane.stats["microbatches_dropped"] == 0
        assert not n0.plane.router.banned(n1.peer)
        for node in (n0, n1, n2):
            node.compute.close()

    _run(3, body)


def test_a_middle_stage_without_a_route_yet_is_backpressure_not_a_drop(tmp_path):
    """The fault-free drops of a starting pipeline (issue 23): a middle replica comes online before it has
    read the next stage's records. It used to compute each frame, fail to send it on and refuse it as
    `downstream`, which dropped the microbatch at stage 0. Now it refuses before computing (`no_route`)
    and stage 0 asks it again after a pause, within the microbatch's budget."""
    cfg = small_config(tmp_path)

    async def body(a, b, c):
        n0, n1, n2 = (Node(p, cfg, s, tmp_path) for p, s in ((a, 0), (b, 1), (c, 2)))
        for node in (n0, n1, n2):
            await node.plane.register()
        n0.plane.set_next_replicas([(n1.peer, 1.0)])  # stage 1 knows no stage-2 replica yet
        n0.plane.start_driver(windows())
        await wait_for(lambda: n1.refused("no_route") + n1.refused("downstream") >= 3, 20,
                       "stage 1 refused frames while it had no route")
        n1.plane.set_next_replicas([(n2.peer, 1.0)])  # its first read of the records
        await wait_for(lambda: n0.plane.stats["microbatches_ok"] >= 6, 60, "6 microbatches once the route is known")
        n0.plane.stop_driver()
        assert n0.plane.stats["microbatches_dropped"] == 0, dict(n0.plane.stats)
        assert n1.refused("downstream") == 0
        assert n0.plane.stats["microbatches_retried"] >= 1 and not n0.plane.router.banned(n1.peer)
        await wait_for(lambda: n0.compute.in_flight == 0 and n1.compute.in_flight == 0, 30, "stashes freed")
        for node in (n0, n1, n2):
            node.compute.close()

    _run(3, body)


def test_a_frozen_replica_is_suspended_within_seconds_and_taken_back_when_it_answers(tmp_path):
    """Liveness faster than deadlines (issue 23): a replica whose process is frozen answers neither the hop
    nor a ping. Stage 0 gives up on it after liveness_s + a ping, suspends it (no ban) and retries the hop
    on the other replica, long before the 30 s budget; it pings it every second and routes to it again
    once it answers."""
    cfg = small_config(tmp_path)
    frozen, thawed = threading.Event(), threading.Event()

    async def body(a, b, c, d):
        n0 = Node(a, cfg, 0, tmp_path, microbatch_timeout_s=30.0, liveness_s=1.0)
        n1, n1b = Node(b, cfg, 1, tmp_path), Node(c, cfg, 1, tmp_path)
        n2 = Node(d, cfg, 2, tmp_path)
        answer = n1.plane.server.on_ping

        async def ping_while_alive(info, reader, writer):  # a frozen process does not answer
            while frozen.is_set():
                await asyncio.sleep(0.05)
            await answer(info, reader, writer)

        n1.plane.server.on_ping = ping_while_alive
        for node in (n0, n1, n1b, n2):
            await node.plane.register()
        n0.plane.set_next_replicas([(n1.peer, 1.0), (n1b.peer, 1.0)])
        for middle in (n1, n1b):
            middle.plane.set_next_replicas([(n2.peer, 1.0)])
        n0.plane.start_driver(fresh_windows())  # its weights lag n1b's once thawed
        stats = n0.plane.stats
        await wait_for(lambda: stats["microbatches_ok"] >= 5 and n1.plane.stats["served"] >= 1, 60, "both replicas serve")
        frozen.set()
        hang = asyncio.ensure_future(n1.compute._submit(-1, "forward", lambda: thawed.wait(60)))  # its worker
        t_frozen = time.monotonic()
        await wait_for(lambda: n0.plane.router.suspended() == {n1.peer}, 15, "the frozen replica suspended")
        suspended_after = time.monotonic() - t_frozen
        ok = stats["microbatches_ok"]
        await wait_for(lambda: stats["microbatches_ok"] >= ok + 5, 20, "5 more through the other replica")
        assert stats["microbatches_dropped"] == 0, dict(stats)
        assert not n0.plane.router.banned(n1.peer) and stats["drop_reason_peer_lost"] == 0
        frozen.clear()  # it thaws
        thawed.set()
        await wait_for(lambda: not n0.plane.router.suspended() and stats["peers_revived"] >= 1, 15, "taken back")
        served = n1.plane.stats["served"]

        def why() -> str:  # what a failure needs to be understood
            return (f"the thawed replica serves again; n0 routes {n0.plane.router.snapshot()} suspended "
                    f"{n0.plane.router.suspended()}; n0 stats {dict(stats)}; n1 stats {dict(n1.plane.stats)}, "
                    f"queue {n1.compute.queue_depth}, stash {n1.compute.in_flight}, routes {n1.plane.router.snapshot()}")

        await wait_for(lambda: n1.plane.stats["served"] >= served + 2, 30, why)
        n0.plane.stop_driver()
        await hang
        assert suspended_after < 10, suspended_after  # not the 30 s budget (liveness_s 1 s + a 1 s ping)
        assert stats["microbatches_dropped"] == 0 and stats["refused_bad_reply"] == 0, dict(stats)
        await wait_for(lambda: n0.compute.in_flight == 0, 30, "stashes freed")
        for node in (n0, n1, n1b, n2):
            node.compute.close()

    _run(4, body)


def test_a_stream_flood_and_a_banned_peer_are_refused_before_a_byte_is_read(tmp_path):
    cfg = small_config(tmp_path)

    async def first_reply(client, server_peer: str, handler: str = HANDLER):
        """Open a stream and read what comes back without writing anything."""
        _, reader, writer = await client.call_binary_stream_handler(PeerID.from_base58(server_peer), handler)
        try:
            return decode_message(await read_frame(reader, timeout=10.0))
        finally:
            writer.close()

    async def body(a, b):
        n1 = Node(b, cfg, 1, tmp_path, max_streams_per_peer=4)
        await n1.plane.register()
        me = a.peer_id.to_base58()
        held = [await a.call_binary_stream_handler(PeerID.from_base58(n1.peer), HANDLER) for _ in range(4)]
        await wait_for(lambda: n1.plane.server.admission.open_streams(me) == 4, 10, "4 streams held open, no frame sent")
        reply = await first_reply(a, n1.peer)
        assert isinstance(reply, ErrorReply) and reply.code == "flood", reply
        assert n1.refused("flood") == 1 and n1.plane.stats["served"] == 0
        for _, _, writer in held:
            writer.close()
        await wait_for(lambda: n1.plane.server.admission.open_streams(me) == 0, 10, "the held streams closed and forgotten")

        while not n1.plane.strikes.strike(me):  # strike it to a ban
            pass
        for handler in (HANDLER, PING_HANDLER):
            reply = await first_reply(a, n1.peer, handler)
            assert isinstance(reply, ErrorReply) and reply.code == "banned", (handler, reply)
        assert n1.refused("banned") == 2 and n1.plane.server.admission.open_streams(me) == 0
        n1.compute.close()

    _run(2, body)


def test_a_replica_returning_huge_gradients_is_refused_banned_and_the_microbatches_go_elsewhere(tmp_path):
    """Finite, well-formed garbage: gradients 10^6 times the honest ones. Once the node has seen honest
    replies, such a reply is `bad_reply`, its sender is banned, the microbatch is retried on the honest
    replica, and the stage's weights stay finite and close to what honest training gives."""
    cfg2 = small_config(tmp_path, num_stages=2)

    async def body(a, b, rogue):
        n0 = Node(a, cfg2, 0, tmp_path, microbatch_timeout_s=10.0, max_inflight=1)
        n1 = Node(b, cfg2, 1, tmp_path)
        for n in (n0, n1):
            await n.plane.register()

        async def garbage(info, reader, writer):
            msg = decode_message(await read_frame(reader))
            g = torch.Generator().manual_seed(msg.microbatch_id)
            reply = GradientFrame(run_id=RUN, microbatch_id=msg.microbatch_id, stage=1, loss=1.0,
                                  grad=torch.randn(msg.coefficients.shape, generator=g) * 1e6)
            await write_frame(writer, encode_message(reply))
            writer.close()

        await rogue.add_binary_stream_handler(HANDLER, garbage)
        honest, rogue_peer = n1.peer, rogue.peer_id.to_base58()
        n0.plane.set_next_replicas([(honest, 1.0)])
        n0.plane.start_driver(windows())
        await wait_for(lambda: n0.plane.stats["microbatches_ok"] >= 10, 60, "honest warm-up")
        # The rogue now looks fast: it is tried first.
        n0.plane.set_next_replicas([(honest, 1.0), (rogue_peer, 0.001)])
        ok = n0.plane.stats["microbatches_ok"]
        await wait_for(lambda: n0.refused("bad_reply") >= 1 and n0.plane.stats["microbatches_ok"] >= ok + 10, 60,
                       "the rogue's reply refused and training going on through the honest replica")
        n0.plane.stop_driver()
        assert n0.plane.router.banned(rogue_peer)
        assert n0.plane.stats["microbatches_dropped"] == 0  # retried on the honest replica, not lost
        assert all(torch.isfinite(p).all() and p.abs().max() < 100 for p in n0.compute.module.parameters())
        for n in (n0, n1):
            n.compute.close()

    _run(3, body)


def test_the_scale_guard_refuses_only_far_outliers_after_warm_up():
    guard = ScaleGuard(ratio=100.0, window=16, warmup=4)
    assert all(guard.check(torch.full((8,), 1.0), "x") is None for _ in range(3))
    assert guard.check(torch.full((8,), 1e9), "x") is None  # still warming up: accepted (and remembered)
    for _ in range(6):
        assert guard.check(torch.full((8,), 2.0), "x") is None  # drift within the ratio passes
    assert "over 100× the recent median" in guard.check(torch.full((8,), 1e4), "gradient")
    assert guard.check(torch.full((8,), 150.0), "x") is None  # 75× the median: passes


def test_evaluation_microbatches_score_the_agreed_weights_and_train_nothing(tmp_path):
    """Validation through 3 real data planes: the driver's measurement is the loss of the model made of each
    stage's agreed (global) weights, not of the replicas' trained local ones, and it changes no training state."""
    from node.model import LanguageModel

    cfg = small_config(tmp_path)
    val = [torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(50 + i)) for i in range(3)]

    async def body(a, b, c):
        nodes = [Node(p, cfg, s, tmp_path) for p, s in ((a, 0), (b, 1), (c, 2))]
        n0, n1, n2 = nodes
        for node in nodes:
            await node.plane.register()
        n0.plane.set_next_replicas([(n1.peer, 1.0)])
        n1.plane.set_next_replicas([(n2.peer, 1.0)])
        n0.plane.start_driver(windows())
        await wait_for(lambda: n0.plane.stats["microbatches_ok"] >= 12, 60, "some training first")
        n0.plane.stop_driver()
        await wait_for(lambda: all(n.compute.in_flight == 0 and n.compute.queue_depth == 0 for n in nodes), 30,
                       "the pipeline drained")
        before = [(n.compute.work.progress, {k: v.clone() for k, v in n.compute.module.state_dict().items()},
                   dict(n.plane.stats)) for n in nodes]
        loss = await n0.plane.driver.evaluate(n0.compute, val)

        # The reference: the unsplit model holding every stage's global copies (the seeded init: no outer
        # round ran here), against the trained local weights it must not be scored with.
        agreed, local = LanguageModel(cfg.model, cfg.pipeline), LanguageModel(cfg.model, cfg.pipeline)
        for s, node in enumerate(nodes):
            agreed.stages[s].load_state_dict(node.compute.engine.agreed_parameters(), strict=False)
            local.stages[s].load_state_dict(node.compute.module.state_dict())
        with torch.no_grad():
            expected = sum(agreed(w[:, :-1], w[:, 1:]).item() for w in val) / len(val)
            trained = sum(local(w[:, :-1], w[:, 1:]).item() for w in val) / len(val)
        assert loss == pytest.approx(expected, rel=1e-4), (loss, expected, trained)
        # The two are told apart: their gap is far above the tolerance above (how far training moved the local
        # weights depends on how many microbatches ran before the stop, so no fixed loss gap is asked for).
        assert abs(trained - expected) > 10 * 1e-4 * expected, (trained, expected)
        for node, (progress, weights, stats) in zip(nodes, before, strict=True):
            assert node.compute.work.progress == progress
            assert all(torch.equal(v, weights[k]) for k, v in node.compute.module.state_dict().items())
            changed = {k for k in node.plane.stats if node.plane.stats[k] != stats.get(k, 0)}
            assert changed <= {"eval_served", "eval_measurements", "bytes_forward_sent", "bytes_forward_received",
                               "dense_forward_sent", "dense_forward_received"}, changed  # no training counter moved
        assert n1.plane.stats["eval_served"] == 3 and n2.plane.stats["eval_served"] == 3
        _, measured, tags = list(n0.plane.val_losses)[-1]
        assert measured == loss and tags == [n.compute.engine.outer.agreed_tag() for n in nodes]
        assert n0.metrics.registry.get_sample_value("protoswarm_val_loss") == pytest.approx(loss)
        assert n0.metrics.registry.get_sample_value("protoswarm_eval_microbatches_total", {"result": "ok"}) == 3
        for node in nodes:
            node.compute.close()

    _run(3, body)
