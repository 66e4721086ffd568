"""The speed half of ``node plan`` (node/throughput.py): FLOPs against torch's own count, frame bytes
against real encoded frames, the pipeline and DiLoCo formulas on cases worked by hand, and the CLI's
JSON contract. Agreement with a real swarm is bench/plan_check.py's job (BENCHMARKS.md)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from node.cli import main
from node.config import load_config
from node.model import Stage, shared_tensors, stage_layers
from node.throughput import (
    TRANSPORT_OVERHEAD,
    find_gpu,
    gpu_catalogue,
    hop_frame_bytes,
    speed_plan,
    stage_flops_per_token,
)
from protocol.framing import PREFIX_BYTES
from protocol.messages import ActivationFrame
from protocol.schema import encode_message


@pytest.mark.parametrize("overrides", [[], ['model.subspace_rank="none"']], ids=["subspace", "dense"])
def test_stage_flops_match_torch_count(overrides):
    """torch's FlopCounterMode counts every matmul of a stash-mode forward and backward; it does not count
    the CPU attention kernel, so the formula's attention term (6 · n · d a layer) is taken out first."""
    cfg = load_config("swarm/pipeline-local", [*overrides, 'dataplane.backward="stash"', "train.seq_len=32"])
    ranges = stage_layers(cfg.model, cfg.pipeline)
    shared = shared_tensors(cfg.model)
    batch, n = 2, cfg.train.seq_len
    for s, layers in enumerate(ranges):
        stage = Stage(cfg.model, layers, s, len(ranges), shared)
        ids = torch.randint(0, cfg.model.vocab_size, (batch, n))
        width = cfg.model.subspace_rank or cfg.model.d_model
        boundary = None if s == 0 else torch.randn(batch, n, width, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            stage(boundary, ids).float().square().mean().backward()
        counted = counter.get_total_flops() / (batch * n)
        formula = stage_flops_per_token(cfg, ranges, s) - len(layers) * 6 * n * cfg.model.d_model
        assert formula == pytest.approx(counted, rel=0.02), (s, formula, counted)


def test_recompute_adds_a_forward_except_on_the_last_stage():
    stash = load_config("swarm/pipeline-local", ['dataplane.backward="stash"'])
    recompute = load_config("swarm/pipeline-local", ['dataplane.backward="recompute"'])
    ranges = stage_layers(stash.model, stash.pipeline)
    assert stage_flops_per_token(recompute, ranges, 0) == pytest.approx(stage_flops_per_token(stash, ranges, 0) * 4 / 3)
    assert stage_flops_per_token(recompute, ranges, 2) == stage_flops_per_token(stash, ranges, 2)


@pytest.mark.parametrize("codec", ["bf16", "int8", "fp32"])
def test_frame_bytes_are_real_encoded_frames(codec):
    cfg = load_config("swarm/pipeline-local", ["train.batch_size=5"])
    act, grad = hop_frame_bytes(cfg, codec)
    ids = torch.randint(0, 256, (5, cfg.train.seq_len))
    frame = ActivationFrame(run_id="run", microbatch_id=1 << 40, stage=0, route=["12D3KooW" + "x" * 44], token_ids=ids,
                            coefficients=torch.randn(5, cfg.train.seq_len, 8), codec=codec, basis="f" * 16,
                            step=1 << 20, budget_s=20.0)
    assert act == len(encode_message(frame)) + PREFIX_BYTES
    per_value = {"bf16": 2, "int8": 1, "fp32": 4}[codec]
    assert grad > 5 * cfg.train.seq_len * 8 * per_value  # at least the values themselves


def _tiny(link_rate_bps=None, inflight=64, **kw):
    cfg = load_config("swarm/pipeline-local", [f"dataplane.max_inflight={inflight}"])
    return cfg, speed_plan(cfg, tflops=0.05, mfu=1.0, link_rate_bps=link_rate_bps, hop_overhead_s=0.0, **kw)


def test_unlimited_link_and_enough_inflight_is_compute_bound():
    cfg, plan = _tiny()
    n = cfg.train.batch_size * cfg.train.seq_len
    slowest = max(stage_flops_per_token(cfg, stage_layers(cfg.model, cfg.pipeline), s) for s in range(3))
    assert plan["compute_tokens_per_s"] == pytest.approx(0.05e12 / slowest, rel=1e-3)
    assert plan["gpu_utilisation"]["subspace_bf16"] == 1.0
    assert plan["link_tokens_per_s"]["dense_bf16"] is None  # unbounded
    assert plan["variants"]["subspace_bf16"]["bound"] == "compute"
    assert n == plan["tokens_per_microbatch"]


def test_slow_link_binds_the_dense_boundary_at_its_byte_rate():
    _, plan = _tiny(link_rate_bps=5e6)
    dense = plan["variants"]["dense_bf16"]
    act, grad = dense["frame_bytes"]["activation"], dense["frame_bytes"]["gradient"]
    n = plan["tokens_per_microbatch"]
    # the middle stage sends its activations on and its gradients back over one 5 Mbit/s uplink
    assert dense["link_tokens_per_s"] == pytest.approx(n * 5e6 / 8 / (TRANSPORT_OVERHEAD * (act + grad)), rel=1e-3)
    assert dense["tokens_per_s"] == pytest.approx(dense["link_tokens_per_s"], rel=1e-3)
    assert dense["bound"] == "link"
    assert plan["compression_needed"] == pytest.approx(plan["compute_tokens_per_s"] / dense["link_tokens_per_s"],
                                                       rel=1e-3)
    assert 20 < plan["compression"]["subspace_bf16"] < plan["compression"]["subspace_int8"]


def test_one_microbatch_in_flight_is_latency_bound():
    _, plan = _tiny(inflight=1, delay_s=0.05)
    sub = plan["variants"]["subspace_bf16"]
    assert sub["bound"] == "latency"
    assert sub["tokens_per_s"] == pytest.approx(plan["tokens_per_microbatch"] / sub["round_trip_s"], rel=1e-3)
    assert sub["round_trip_s"] > 2 * 2 * 0.05  # two hops, both ways


def test_diloco_round_time_by_hand():
    cfg = load_config("swarm/diloco-local", ["exchange.max_group=4", "exchange.gather_s=50", "exchange.timeout_s=100",
                                             "exchange.mode='star'"])
    plan = speed_plan(cfg, tflops=0.05, mfu=1.0, link_rate_bps=8e6, replicas=4, hop_overhead_s=0.0)
    d = plan["diloco"]
    assert d["group"] == 4 and d["fragments"] == cfg.diloco.fragments
    # the leader downloads 3 parts and uploads 3 means at 1 MB/s
    assert d["round_s"] == pytest.approx(2 * 3 * d["fragment_bytes"] / 1e6, rel=2e-3)
    assert d["gather_s"] == pytest.approx(3 * d["fragment_bytes"] / 1e6, rel=2e-3) and d["rounds_average"]
    # a boundary: U summed steps, the others' counts seen through records refresh_s old
    alone = cfg.diloco.inner_steps / cfg.diloco.fragments * d["inner_step_s"]
    phase = min(alone, (alone + 3 * cfg.swarm.refresh_s) / 4)
    assert d["replica_steps_between_rounds"] * d["inner_step_s"] == pytest.approx(phase, rel=2e-3)
    # blocking: the leader waits for the parts, each member for the whole round
    wait = (d["gather_s"] + 3 * d["round_s"]) / 4
    assert d["utilisation"]["no_overlap"] == pytest.approx(phase / (phase + wait), rel=2e-3)
    assert d["utilisation"]["overlap_blocking"] >= d["utilisation"]["no_overlap"]
    assert d["link_busy"] == pytest.approx(d["round_s"] / phase, rel=2e-3)


def test_diloco_parts_later_than_gather_s_average_nothing():
    """Parts that reach the leader after exchange.gather_s: the leader commits its own part alone at
    gather_s and each member waits until its part is sent, then is refused; nothing is averaged."""
    cfg = load_config("swarm/diloco-local", ["exchange.max_group=4", "exchange.gather_s=0.5", "exchange.timeout_s=100",
                                             "exchange.mode='star'"])
    d = speed_plan(cfg, tflops=0.05, mfu=1.0, link_rate_bps=8e6, replicas=4, hop_overhead_s=0.0)["diloco"]
    assert d["gather_s"] > 0.5 and not d["rounds_average"] and d["default_rounds_kept"] == 0.0
    assert d["blocking_wait_s"] == {"leader": 0.5, "member": d["gather_s"]}
    assert d["compression_needed"] >= d["gather_s"] / 0.5
    phase = d["replica_steps_between_rounds"] * d["inner_step_s"]
    assert d["utilisation"]["no_overlap"] == pytest.approx(phase / (phase + (0.5 + 3 * d["gather_s"]) / 4), rel=2e-3)


def test_diloco_balanced_round_time_by_hand():
    """The balanced exchange: every member's link carries 3(G−1)/G of a fragment each way, against the star
    leader's 2(G−1); and every member waits the same."""
    over = ["exchange.max_group=4", "exchange.gather_s=50", "exchange.timeout_s=100"]
    cfg = load_config("swarm/diloco-local", over)
    assert cfg.exchange.mode == "balanced"  # the default
    d = speed_plan(cfg, tflops=0.05, mfu=1.0, link_rate_bps=8e6, replicas=4, hop_overhead_s=0.0,
                   delay_s=0.01)["diloco"]
    part = d["fragment_bytes"] / 1e6  # seconds at 1 MB/s
    assert d["exchange"] == "balanced" and d["rounds_average"]
    assert d["gather_s"] == pytest.approx(2 * 3 / 4 * part + 0.03, rel=2e-3)
    assert d["round_s"] == pytest.approx(3 * 3 / 4 * part + 0.04, rel=2e-3)
    assert d["blocking_wait_s"] == {"leader": d["round_s"], "member": d["round_s"]}
    star = speed_plan(load_config("swarm/diloco-local", [*over, "exchange.mode='star'"]), tflops=0.05, mfu=1.0,
                      link_rate_bps=8e6, replicas=4, hop_overhead_s=0.0, delay_s=0.01)["diloco"]
    assert d["round_s"] < star["round_s"]  # 2.25 parts against 6 on the leader's link
    late = speed_plan(load_config("swarm/diloco-local", [*over[:1], "exchange.gather_s=0.5", "exchange.timeout_s=100"]),
                      tflops=0.05, mfu=1.0, link_rate_bps=8e6, replicas=4, hop_overhead_s=0.0)["diloco"]
    assert not late["rounds_average"] and late["default_rounds_kept"] == 0.0
    assert late["blocking_wait_s"]["member"] == pytest.approx(late["gather_s"], rel=2e-3)
    # diloco.first_moment: the fragment's first moment rides in a twin round at the same time, on the same link.
    twin = speed_plan(load_config("swarm/diloco-local", [*over, "diloco.first_moment=true"]), tflops=0.05, mfu=1.0,
                      link_rate_bps=8e6, replicas=4, hop_overhead_s=0.0, delay_s=0.01)["diloco"]
    assert twin["first_moment"] and not d["first_moment"]
    assert twin["fragment_bytes"] == pytest.approx(2 * d["fragment_bytes"], abs=1)
    assert twin["round_s"] == pytest.approx(3 * 3 / 4 * 2 * part + 0.04, rel=2e-3)


def test_catalogue_names_sources_and_unknown_cards_fail():
    cards = gpu_catalogue()
    assert {"rtx4090", "rtx3090", "h100", "a100"} <= set(cards)
    assert all(card.source and card.bf16_tflops > 0 and card.memory_gib > 0 for card in cards.values())
    assert find_gpu("RTX4090").bf16_tflops == pytest.approx(165.2)


def _plan_json(capsys, *argv):
    code = main(["plan", *argv])
    out = capsys.readouterr().out
    return code, json.loads(out.strip().splitlines()[-1])


def test_cli_json_contract_8b_on_4090s(capsys):
    code, result = _plan_json(capsys, "--model", "8b", "--stages", "32", "--gpu", "rtx4090", "--link", "80mbit",
                              "--json")
    assert code == 0 and result["fits"] is True and result["memory"]["num_stages"] == 32
    for key in ("compute_tokens_per_s", "pipeline_tokens_per_s", "gpu_utilisation", "compression_needed"):
        assert result[key] is not None, key
    assert set(result["link_tokens_per_s"]) == {"dense_bf16", "subspace_bf16", "subspace_int8"}
    link = result["link_tokens_per_s"]
    assert 80 < link["subspace_bf16"] / link["dense_bf16"] < 120  # k = 40 of d = 4,096, ids counted
    assert result["gpu"]["name"] == "rtx4090" and result["assumptions"]["mfu"] == 0.4


def test_cli_errors(capsys):
    assert main(["plan", "--model", "tiny", "--gpu", "voodoo3", "--stages", "2"]) == 2
    assert "unknown GPU" in capsys.readouterr().err
    assert main(["plan", "--model", "tiny", "--device-mem", "8", "--link", "20mbit", "--stages", "2"]) == 2
    assert "needs a card" in capsys.readouterr().err
    assert main(["plan", "--model", "tiny", "--stages", "2"]) == 2
    assert "--device-mem" in capsys.readouterr().err
    assert main(["plan", "--model", "tiny", "--gpu", "rtx4090", "--link", "fast", "--stages", "2"]) == 2
    assert "--link" in capsys.readouterr().err
