"""PipelineCompute: one stage's forward/backward/step as the data plane drives it (no network here)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from node.config import load_config
from node.model import LanguageModel
from node.pipeline import PipelineCompute, UnknownMicrobatch
from node.stage_store import StageStore


def small_config(tmp_path, **train):
    return load_config(
        None,
        model={"name": "t", "vocab_size": 256, "d_model": 64, "n_layers": 3, "n_heads": 2, "ffn_hidden": 128,
               "max_seq_len": 64, "subspace_rank": 8},
        pipeline={"num_stages": 3},
        train={"batch_size": 2, "seq_len": 16, "grad_accum": 2, "warmup_steps": 1,
               "checkpoint_dir": str(tmp_path), **train},
    )


def computes(cfg, tmp_path, mode="recompute"):
    cfg.dataplane.backward = mode
    return [PipelineCompute(StageStore.fresh(cfg, "r", s, tmp_path / f"s{s}"), cfg) for s in range(3)]


async def chain(stages, key, window):
    """One microbatch through every stage as the data plane would: forward down, gradients back up."""
    c = await stages[0].forward(key, window, None)
    c = await stages[1].forward(key, window, c.clone())
    loss, g = await stages[2].forward_backward_last(window, c.clone())
    g = await stages[1].backward(key, g.clone())
    assert await stages[0].backward(key, g.clone()) is None
    return loss


def unsplit(cfg, stages) -> LanguageModel:
    model = LanguageModel(cfg.model, cfg.pipeline)
    for s, compute in enumerate(stages):
        model.stages[s].load_state_dict(compute.module.state_dict())
    return model


@pytest.mark.parametrize("mode", ["recompute", "stash"])
def test_the_chain_gives_the_unsplit_models_loss_and_gradients(tmp_path, mode):
    cfg = small_config(tmp_path)
    stages = computes(cfg, tmp_path, mode)
    window = torch.randint(0, 256, (2, 17))  # seq_len + 1 tokens: the last stage scores positions 0..15
    model = unsplit(cfg, stages)
    loss = asyncio.run(chain(stages, "mb", window))  # grad_accum = 2: one microbatch accumulates, no step
    reference = model(window[:, :-1], window[:, 1:])
    (reference / 2).backward()
    assert loss == pytest.approx(reference.item(), rel=1e-5)
    worst = 0.0
    for s, compute in enumerate(stages):
        for (name, p), (_, q) in zip(compute.module.named_parameters(), model.stages[s].named_parameters(), strict=True):
            assert p.grad is not None, f"stage {s} {name} got no gradient"
            worst = max(worst, float((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-12)))
    assert worst < 1e-4
    assert all(c.in_flight == 0 for c in stages) and all(c.work.progress == 0 for c in stages)
    for c in stages:
        c.close()


def test_steps_every_grad_accum_microbatches_and_the_loss_falls(tmp_path):
    cfg = small_config(tmp_path, lr=3e-3)
    stages = computes(cfg, tmp_path)
    window = torch.randint(0, 256, (2, 17))

    async def train():
        return [await chain(stages, i, window) for i in range(16)]

    losses = asyncio.run(train())
    assert [c.work.progress for c in stages] == [8, 8, 8]
    assert losses[-1] < losses[0] - 0.5  # one repeated window: memorised quickly
    for c in stages:
        c.close()


def test_stash_mode_recomputes_a_graph_that_an_optimizer_step_made_stale(tmp_path):
    cfg = small_config(tmp_path, grad_accum=1)
    stages = computes(cfg, tmp_path, "stash")
    a, b = torch.randint(0, 256, (2, 17)), torch.randint(0, 256, (2, 17))

    async def interleaved():
        # Microbatch "a" runs its forward on stage 1, then "b" completes (a step), then "a" comes back.
        ca = await stages[0].forward("a", a, None)
        ca = await stages[1].forward("a", a, ca)
        await chain(stages, "b", b)
        _, g = await stages[2].forward_backward_last(a, ca)
        g = await stages[1].backward("a", g)
        await stages[0].backward("a", g)

    asyncio.run(interleaved())
    assert stages[1].recomputed == 1 and stages[0].recomputed == 1
    assert [c.work.progress for c in stages] == [2, 2, 2]
    for c in stages:
        c.close()


def test_unknown_duplicate_dropped_and_stale_stashes(tmp_path):
    cfg = small_config(tmp_path)
    stage0 = computes(cfg, tmp_path)[0]
    window = torch.randint(0, 256, (2, 17))

    async def run():
        with pytest.raises(UnknownMicrobatch):
            await stage0.backward("never", torch.zeros(2, 17, 8))
        await stage0.forward("x", window, None)
        with pytest.raises(ValueError, match="already in flight"):
            await stage0.forward("x", window, None)
        with pytest.raises(ValueError, match="shape"):
            await stage0.backward("x", torch.zeros(2, 17, 9))  # a wrong gradient shape consumes the stash
        assert stage0.in_flight == 0
        await stage0.forward("y", window, None)
        assert stage0.drop("y") and not stage0.drop("y")
        await stage0.forward("z", window, None)

    asyncio.run(run())
    assert stage0.sweep(60.0) == 0 and stage0.in_flight == 1
    time.sleep(0.02)
    assert stage0.sweep(0.01) == 1 and stage0.in_flight == 0
    assert all(p.grad is None for p in stage0.module.parameters())
    stage0.close()


def test_a_non_finite_loss_leaves_no_gradient_behind(tmp_path):
    cfg = small_config(tmp_path)
    last = computes(cfg, tmp_path)[2]
    window = torch.randint(0, 256, (2, 17))
    weight = last.module.lm_head.weight

    async def run():
        saved = weight.data[0, 0].item()
        weight.data[0, 0] = float("nan")  # diverged weights: the loss is NaN
        with pytest.raises(FloatingPointError):
            await last.forward_backward_last(window, torch.zeros(2, 17, 8))
        assert all(p.grad is None for p in last.module.parameters()) and last.engine.accumulated == 0
        weight.data[0, 0] = saved
        return await last.forward_backward_last(window, torch.zeros(2, 17, 8))

    loss, grad = asyncio.run(run())
    assert loss > 0 and grad.shape == (2, 17, 8) and last.engine.accumulated == 1
    last.close()


def test_a_requester_that_gave_up_before_its_job_started_costs_nothing(tmp_path):
    cfg = small_config(tmp_path)
    stage0 = computes(cfg, tmp_path)[0]
    window = torch.randint(0, 256, (2, 17))

    async def run():
        jobs = [asyncio.ensure_future(stage0.forward(i, window, None)) for i in range(6)]
        jobs[-1].cancel()  # queued behind the others: skipped by the worker, nothing stashed
        await asyncio.gather(*jobs, return_exceptions=True)

    asyncio.run(run())
    assert stage0.in_flight == 5 and stage0.queue_depth == 0
    stage0.close()
