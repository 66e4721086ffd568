"""diloco.first_moment: the replicas' AdamW first moments averaged beside each fragment's part
(swarm/first_moment.py), in process (InProcessGroup) and through ReplicaSync's rounds."""

from __future__ import annotations

import asyncio
import threading
import types

import pytest
import torch

from node.config import ConfigError, load_config
from node.metrics import NodeMetrics
from node.replica_sync import ReplicaSync
from node.stage_store import StageStore
from swarm.diloco import DilocoConfig, OuterLoop, quantized
from swarm.diloco_group import InProcessGroup
from swarm.first_moment import FirstMoment, first_moment_bound

BETAS = (0.9, 0.95)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()
    opt.step()


def _grads(model: torch.nn.Module, scale: float = 1.0) -> list[torch.Tensor]:
    return [torch.randn_like(p) * scale for p in model.parameters()]


def _moment(model, opt) -> torch.Tensor:
    return torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])


def _setup(seed: int = 0):
    model = _model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=BETAS)
    loop = OuterLoop(dict(model.named_parameters()), DilocoConfig(inner_steps=2, fragments=1))
    return model, opt, FirstMoment(opt, dict(model.named_parameters()), loop.layouts, *BETAS)


def test_the_merge_keeps_the_steps_taken_since_the_snapshot_exactly():
    """Merging τ steps after the snapshot gives the m the replica would hold had the mean replaced its m when
    the round began and the same τ gradients followed (the clip, where it binds, applied to both)."""
    torch.manual_seed(1)
    model, opt, fm = _setup()
    twin = _model(0)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, betas=BETAS)
    for _ in range(3):
        g = _grads(model)
        _step(model, opt, g)
        _step(twin, twin_opt, g)
    sent = fm.snapshot(0)
    mean = sent * 0.5 + 0.01 * torch.randn_like(sent)
    offset = 0
    for p in twin.parameters():  # the twin takes the mean at the snapshot
        n = p.numel()
        twin_opt.state[p]["exp_avg"].copy_(mean[offset:offset + n].view_as(p))
        offset += n
    tau = 3
    for _ in range(tau):
        g = _grads(model)
        _step(model, opt, g)
        _step(twin, twin_opt, g)
    assert fm.merge(0, mean.clone(), tau)
    bound = first_moment_bound(*BETAS)
    v = torch.cat([twin_opt.state[p]["exp_avg_sq"].reshape(-1) for p in twin.parameters()])
    expected = torch.maximum(torch.minimum(_moment(twin, twin_opt), bound * v.sqrt()), -bound * v.sqrt())
    assert torch.allclose(_moment(model, opt), expected, atol=1e-7)
    assert not fm.merge(0, mean, 0)  # one merge per snapshot


def test_a_mean_larger_than_this_replicas_bound_is_clipped_to_it_and_bad_means_change_nothing():
    model, opt, fm = _setup()
    _step(model, opt, _grads(model, scale=0.001))
    sent = fm.snapshot(0)
    assert fm.merge(0, torch.full_like(sent, 5.0), 0)  # far beyond what gradients of 1e-3 allow
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    assert torch.allclose(_moment(model, opt), first_moment_bound(*BETAS) * v.sqrt())
    before = _moment(model, opt).clone()
    for bad in (torch.full_like(sent, float("nan")), torch.zeros(sent.numel() + 1)):
        fm.snapshot(0)
        with pytest.raises(ValueError, match="finite values"):
            fm.merge(0, bad, 0)
        assert torch.equal(_moment(model, opt), before)


def test_in_process_replicas_average_their_first_moments_as_sent_and_each_clips_to_its_own_bound():
    models = [_model(s) for s in (0, 1)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, betas=BETAS) for m in models]
    settings = DilocoConfig(inner_steps=2, fragments=1, overlap=0)
    loops = [OuterLoop(dict(m.named_parameters()), settings) for m in models]
    fms = [FirstMoment(o, dict(m.named_parameters()), lp.layouts, *BETAS) for m, o, lp in zip(models, opts, loops, strict=True)]
    group = InProcessGroup(loops, settings, "e3m0", moments=fms)
    torch.manual_seed(3)
    sent = 0
    for t in (1, 2):
        for m, o in zip(models, opts, strict=True):
            _step(m, o, _grads(m))
        if t == 2:
            snaps = [_moment(m, o).clone() for m, o in zip(models, opts, strict=True)]
        sent = group.after_step(t)
    # The part and the first moment: twice one 4-bit part's bytes.
    numel = loops[0].layouts[0].numel
    assert sent == 2 * quantized(torch.zeros(numel), "e3m0")[0].__len__()
    mean = (quantized(snaps[0], "e3m0")[1] + quantized(snaps[1], "e3m0")[1]) / 2
    got = [_moment(m, o) for m, o in zip(models, opts, strict=True)]
    limits = [first_moment_bound(*BETAS) * torch.cat([o.state[p]["exp_avg_sq"].reshape(-1) for p in m.parameters()]).sqrt()
              for m, o in zip(models, opts, strict=True)]
    inside = (mean.abs() <= limits[0]) & (mean.abs() <= limits[1])
    assert inside.sum() > numel // 2  # most of the mean needed no clip ...
    for g, lim in zip(got, limits, strict=True):
        assert torch.allclose(g[inside], mean[inside], atol=1e-6)  # ... and both replicas took it as it is
        assert bool((g.abs() <= lim * (1 + 1e-6)).all())  # the rest was clipped to each replica's own bound


def test_first_moment_needs_a_bounded_adam(tmp_path):
    with pytest.raises(ConfigError, match="first_moment"):
        load_config(None, train={"beta1": 0.99, "beta2": 0.95}, diloco={"first_moment": True})
    load_config(None, train={"beta1": 0.99, "beta2": 0.95})  # without it nothing needs the bound


def test_replica_sync_averages_the_first_moment_in_a_round_of_its_own_and_merges_it(tmp_path):
    cfg = load_config(None, model={"name": "t", "vocab_size": 256, "d_model": 32, "n_layers": 3, "n_heads": 2,
                                   "ffn_hidden": 64, "max_seq_len": 32, "subspace_rank": 4},
                      train={"seq_len": 16, "checkpoint_dir": str(tmp_path)},
                      diloco={"inner_steps": 30, "fragments": 3, "overlap": 0, "blocking": True, "first_moment": True})
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        sync = ReplicaSync(cfg, NodeMetrics(), loop, None, "P5", "r")
        work = StageStore.fresh(cfg, "r", 0, tmp_path / "P5")
        sync.attach(work)
        sizes = [layout.numel for layout in work.outer.layouts]
        assert sync.exchange.fragment_sizes == sizes * 2  # fragment p's first moment travels as fragment 3 + p

        class Exchange:
            fragment_sizes, stats, keys, size = sizes * 2, {}, [], 2

            async def run_round(self, key, part, weight=1.0):
                self.keys.append(key)
                value = 0.0 if key.fragment < 3 else 1e-4  # the stage's mean first moment: 1e-4 everywhere
                return types.SimpleNamespace(mean=torch.full_like(part, value), bytes_sent=10, bytes_received=20,
                                             rejected={}, group_size=self.size, reason="", sent=None, moment=None)

        sync.exchange = Exchange()
        for param in work.module.parameters():
            param.grad = torch.randn_like(param)
        work.optimizer.step()
        sync.epoch_steps = sync.spacing - 1
        sync.after_step()  # crosses epoch 1: fragment 1, round 0
        assert [(k.fragment, k.round) for k in sync.exchange.keys] == [(1, 0), (4, 0)]
        assert sync.stats["rounds_committed"] == 1 and sync.stats["moments_merged"] == 1
        assert sync.recent_rounds[-1][3:5] == [20, 40]  # both rounds' bytes are counted
        names = set(work.outer.layouts[1].names)
        bound = first_moment_bound(cfg.train.beta1, cfg.train.beta2)
        for name, param in work.module.named_parameters():
            st = work.optimizer.state[param]
            want = torch.clamp(torch.full_like(param, 1e-4), max=bound * st["exp_avg_sq"].sqrt())
            assert torch.allclose(st["exp_avg"], want, atol=1e-7) == (name in names), name  # only fragment 1's m is the mean
        # A moment round that averaged nothing (this replica's own m came back) is not merged.
        sync.exchange.size = 1
        sync.epoch_steps = sync.spacing - 1
        sync.after_step()
        assert sync.stats["rounds_committed"] == 2 and sync.stats["moments_merged"] == 1
    finally:
        loop.call_soon_threadsafe(loop.stop)
