"""The subspace recipe's knobs (issue 19): each keeps the boundary exact, and each really changes the model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from node.chain import StageChain
from node.config import ConfigError, load_config
from node.model import LanguageModel, ResidualWriter, stage_layers, stage_parameters
from node.model_config import ModelConfig
from protocol.codecs import get_codec


def build(overrides=(), stages=4, seed=0):
    cfg = load_config("tiny", [f"pipeline.num_stages={stages}", "model.subspace_rank=8", *overrides])
    torch.manual_seed(seed)
    return cfg, LanguageModel(cfg.model, cfg.pipeline)


def windows(n=2, length=32, seed=1):
    return torch.randint(0, 256, (n, length + 1), generator=torch.Generator().manual_seed(seed))


def writers(stage):
    return [m for m in stage.modules() if isinstance(m, ResidualWriter)]


def unsplit_and_chain_losses(cfg, model, ids):
    with torch.no_grad():
        unsplit = float(model(ids[:, :-1], ids[:, 1:]))
    return unsplit, StageChain.around(list(model.stages), cfg.train).evaluate(ids)


def test_dense_tail_layers_decides_which_writers_are_dense_and_stays_in_the_last_stage():
    cfg, model = build(["model.dense_tail_layers=0"])
    assert all(w.rank == 8 for s in model.stages for w in writers(s))  # even the last stage constrained
    cfg, model = build(["model.dense_tail_layers=3"])
    ranges = stage_layers(cfg.model, cfg.pipeline)
    assert ranges[-1].start <= 8 - 3  # the automatic split keeps every dense layer in the last stage
    dense = [layer for s, r in zip(model.stages, ranges, strict=True) for layer, b in zip(r, s.blocks, strict=True)
             if b.attn.wo.rank is None]
    assert dense == [5, 6, 7]
    for i, (s, r) in enumerate(zip(model.stages, ranges, strict=True)):
        assert sum(p.numel() for p in s.parameters()) == stage_parameters(cfg.model, r, i, 4)
    with pytest.raises(ConfigError, match="dense_tail_layers"):
        load_config("tiny", ["pipeline.num_stages=4", "model.subspace_rank=8", "model.dense_tail_layers=3",
                             "pipeline.layer_splits=[2,4,6]"])
    with pytest.raises(ConfigError, match="dense_tail_layers"):
        load_config("tiny", ["model.dense_tail_layers=9"])
    # A tail the stage count cannot hold (every stage before the last needs a constrained layer): a clear error,
    # not the partition's fallback split (which once gave the last stage every layer).
    with pytest.raises(ConfigError, match="dense_tail_layers=6 leaves 2 constrained layer"):
        load_config("tiny", ["pipeline.num_stages=4", "model.subspace_rank=8", "model.dense_tail_layers=6"])
    cfg = load_config("tiny", ["pipeline.num_stages=4", "model.subspace_rank=8", "model.dense_tail_layers=5"])
    assert stage_layers(cfg.model, cfg.pipeline)[-1] == range(3, 8)  # the most it can hold
    cfg = load_config("tiny", ["pipeline.num_stages=4", "model.subspace_rank=8"])
    with pytest.raises(ConfigError, match="dense_tail_layers=6"):  # a config built without the check
        stage_layers(dataclasses.replace(cfg.model, dense_tail_layers=6), cfg.pipeline)
    load_config("tiny", ["pipeline.num_stages=4", 'model.subspace_rank="none"', "model.dense_tail_layers=6"])  # dense


def test_table_gains_differ_per_stage_and_the_split_model_still_matches_the_unsplit_one():
    cfg, model = build(["model.table_gain=true"])
    gains = [s.table_gain for s in model.stages]
    assert all(isinstance(g, torch.nn.Parameter) and float(g.detach()) == 1.0 for g in gains)
    ids = windows()
    before = unsplit_and_chain_losses(cfg, model, ids)
    with torch.no_grad():
        for g, value in zip(gains, (0.3, 1.7, 0.9, 0.5), strict=True):
            g.fill_(value)
    unsplit, chained = unsplit_and_chain_losses(cfg, model, ids)
    assert abs(unsplit - before[0]) > 1e-3  # the gains change the model...
    assert unsplit == pytest.approx(chained, abs=1e-4)  # ...and the boundaries still carry it exactly
    loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert all(g.grad is not None and g.grad.abs() > 0 for g in gains)


def test_a_low_rank_table_has_that_rank_and_scale_and_keeps_the_boundary_exact():
    from protocol import subspace

    table = subspace.make_fixed_table(0, 256, 256, 0.1, rank=12)
    assert torch.linalg.matrix_rank(table) == 12 and 0.09 < float(table.std()) < 0.11
    assert torch.equal(table, subspace.make_fixed_table(0, 256, 256, 0.1, rank=12))  # seed-derived, same bits
    assert torch.linalg.matrix_rank(subspace.make_fixed_table(0, 256, 256, 0.1)) == 256  # default: full rank
    cfg, model = build(["model.fixed_table_rank=12", "model.fixed_table_std=0.1"])
    assert torch.equal(model.stages[0].table, table)
    unsplit, chained = unsplit_and_chain_losses(cfg, model, windows())
    assert unsplit == pytest.approx(chained, abs=1e-4)
    with pytest.raises(ConfigError, match="fixed_table_rank"):
        build(["model.fixed_table_rank=257"])
    with pytest.raises(ValueError, match="rank"):
        subspace.make_fixed_table(0, 16, 8, 0.1, rank=9)


def test_constrained_init_std_scales_the_span_u_parts_only_and_keeps_the_boundary_exact():
    """``model.constrained_init_std``: the constrained writers and the rank-k embedding drawn at that std (raised
    by sqrt(d/k) as with init_std), every dense part at init_std; unset, the same draws as before it existed."""
    import math

    cfg, base = build(["model.dense_tail_layers=3"])
    again = build(["model.dense_tail_layers=3", f"model.constrained_init_std={cfg.model.init_std}"])[1]  # same bits
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), again.state_dict().values(), strict=True))
    cfg, model = build(["model.dense_tail_layers=3", "model.init_std=0.06", "model.constrained_init_std=0.01"])
    d, k, scale = 256, 8, math.sqrt(2 * 8)
    stds = {"constrained": [], "dense": []}
    for s in model.stages:
        for w in writers(s):
            stds["dense" if w.rank is None else "constrained"].append(float(w.weight.std()))
    assert all(0.9 < v / (0.01 / scale * math.sqrt(d / k)) < 1.1 for v in stds["constrained"]), stds
    assert all(0.9 < v / (0.06 / scale) < 1.1 for v in stds["dense"]) and len(stds["dense"]) == 6, stds
    assert 0.9 < float(model.stages[0].embedding.std()) / (0.01 * math.sqrt(d / k)) < 1.1
    assert 0.9 < float(model.stages[0].blocks[0].attn.wq.weight.std()) / 0.06 < 1.1  # readers: init_std
    assert 0.9 < float(model.stages[-1].lm_head.weight.std()) / 0.06 < 1.1
    unsplit, chained = unsplit_and_chain_losses(cfg, model, windows())
    assert unsplit == pytest.approx(chained, abs=1e-4)
    dense = load_config("tiny", ['model.subspace_rank="none"', "model.init_std=0.06", "model.constrained_init_std=0.01"])
    torch.manual_seed(0)
    assert 0.9 < float(LanguageModel(dense.model, dense.pipeline).stages[0].embedding.std()) / 0.06 < 1.1  # no span
    with pytest.raises(ConfigError, match="constrained_init_std"):
        build(["model.constrained_init_std=0"])


def test_lr_multipliers_scale_z_and_embedding_steps_only():
    cfg = load_config("tiny", ["pipeline.num_stages=2", "model.subspace_rank=8", "train.subspace_lr_mult=0.5",
                               "train.embedding_lr_mult=3", "train.warmup_steps=0"])
    torch.manual_seed(0)
    chain = StageChain.build(cfg)
    chain.train_microbatch(windows())
    groups = chain.engines[0].optimizer.param_groups
    base = max(g["lr"] for g in groups if g["lr_mult"] == 1.0)
    z = {id(w.weight) for w in writers(chain.engines[0].module)}
    emb = id(chain.engines[0].module.embedding)
    for g in groups:
        ids = {id(p) for p in g["params"]}
        expected = 0.5 if ids <= z else 3.0 if ids == {emb} else 1.0
        assert g["lr_mult"] == expected and g["lr"] == pytest.approx(base * expected)
    assert any(g["lr_mult"] == 0.5 for g in groups) and any(g["lr_mult"] == 3.0 for g in groups)


def test_projected_parameterisation_stays_in_span_after_steps_and_stays_exact():
    cfg = load_config("tiny", ["pipeline.num_stages=4", "model.subspace_rank=8", "model.subspace_param='projected'",
                               "train.lr=3e-3", "train.warmup_steps=0"])
    torch.manual_seed(0)
    chain = StageChain.build(cfg)
    for step in range(3):
        chain.train_microbatch(windows(seed=10 + step))
    for engine in chain.engines:
        stage = engine.module
        u = stage.basis
        constrained = stage.constrained_parameters()
        assert bool(constrained) == (not stage.is_last)
        for p in constrained:
            full = p.T if stage.is_first and p is stage.embedding else p  # writers are d×h, the embedding V×d
            outside = full - u @ (u.T @ full)
            assert outside.abs().max() < 1e-5 * max(1.0, full.abs().max().item())
            assert p.shape[0] == cfg.model.d_model or p.shape[1] == cfg.model.d_model  # dense, not k-wide
        assert sum(q.numel() for q in stage.parameters()) == stage_parameters(
            cfg.model, stage.layers, stage.index, stage.num_stages)
    model = LanguageModel(cfg.model, cfg.pipeline, stages=chain.modules())
    unsplit, chained = unsplit_and_chain_losses(cfg, model, windows(seed=3))
    assert unsplit == pytest.approx(chained, abs=1e-4)


def test_chain_rounds_boundaries_through_the_wire_codecs_when_asked():
    cfg = load_config("tiny", ["pipeline.num_stages=2", "model.subspace_rank=8", "wire.activation_codec='int8'",
                               "wire.gradient_codec='int8'"])
    torch.manual_seed(0)
    exact = StageChain.build(cfg).train_microbatch(windows(), record=True)
    torch.manual_seed(0)
    wired = StageChain.build(cfg, wire=True).train_microbatch(windows(), record=True)
    codec = get_codec("int8")
    sent = exact.boundaries[0]
    assert not torch.equal(wired.boundaries[0], sent)
    assert torch.equal(wired.boundaries[0], codec.decode(codec.encode(sent), tuple(sent.shape)))
    assert wired.loss != exact.loss or not torch.equal(wired.boundary_grads[0], exact.boundary_grads[0])


def test_the_automatic_split_gives_the_last_stage_at_least_min_dense_tail_layers():
    def last(overrides, stages=4):
        cfg = load_config("tiny", [f"pipeline.num_stages={stages}", "model.subspace_rank=8", *overrides])
        return stage_layers(cfg.model, cfg.pipeline)[-1]

    assert ModelConfig().min_dense_tail_layers == 3  # the global default (BENCHMARKS.md, issue 19)
    assert load_config("tiny").model.min_dense_tail_layers == 4  # the tiny preset's measured recipe
    deep = load_config("model/125m", ["pipeline.num_stages=4"])  # 12 layers: its preset keeps 4 (BENCHMARKS.md)
    assert deep.model.min_dense_tail_layers == 4 and stage_layers(deep.model, deep.pipeline)[-1] == range(8, 12)
    assert last([]) == range(4, 8)
    assert last(["model.min_dense_tail_layers=3"]) == range(5, 8)
    assert last(["model.min_dense_tail_layers=0"]) == range(6, 8)  # the split by parameters alone
    assert last(["model.min_dense_tail_layers=5"]) == range(3, 8)
    assert last([], stages=8) == range(7, 8)  # as many as the stage count leaves room for
    assert last(["model.min_dense_tail_layers=4"], stages=6) == range(5, 8)
    assert last(["model.dense_tail_layers=1"]) == range(6, 8)  # an explicit tail overrides the minimum
    cfg = load_config("tiny", ["pipeline.num_stages=4", "model.subspace_rank=8", "pipeline.layer_splits=[2,4,6]"])
    assert stage_layers(cfg.model, cfg.pipeline)[-1] == range(6, 8)  # an explicit split is kept as given
    cfg, model = build()
    assert [w.rank for w in writers(model.stages[-1])] == [None] * 8  # the last stage's 4 layers are dense
    assert all(w.rank == 8 for s in model.stages[:-1] for w in writers(s))
    with pytest.raises(ConfigError, match="min_dense_tail_layers"):
        load_config("tiny", ["model.min_dense_tail_layers=-1"])


def test_node_start_builds_its_stage_with_the_default_dense_tail(tmp_path):
    """StageStore.fresh is what `node start` builds a stage with: the last stage holds tiny's 4 dense layers."""
    from node.stage_store import StageStore

    cfg = load_config("tiny", ["pipeline.num_stages=4", "model.subspace_rank=8"])
    last, before = (StageStore.fresh(cfg, "r", s, tmp_path / str(s)) for s in (3, 2))
    assert [w.rank for w in writers(last.module)] == [None] * 8
    assert [w.rank for w in writers(before.module)] == [8] * 4  # layers 2-3, constrained


def test_node_start_builds_its_stage_with_the_span_u_init_apart(tmp_path):
    """``model.constrained_init_std`` where `node start` builds a stage (StageStore.fresh): the first stage's
    constrained writers and embedding at that std, its readers at init_std."""
    import math

    from node.stage_store import StageStore

    cfg = load_config("tiny", ["pipeline.num_stages=4", "model.subspace_rank=8", "model.init_std=0.06",
                               "model.constrained_init_std=0.01"])
    first = StageStore.fresh(cfg, "r", 0, tmp_path / "0").module
    ratio = math.sqrt(256 / 8)
    assert all(0.85 < float(w.weight.std()) / (0.01 / 4 * ratio) < 1.15 for w in writers(first))
    assert 0.9 < float(first.embedding.std()) / (0.01 * ratio) < 1.1
    assert 0.9 < float(first.blocks[0].attn.wq.weight.std()) / 0.06 < 1.1


def test_boundary_parameterisation_projects_only_the_boundaries_and_the_split_is_exact():
    cfg, model = build(["model.subspace_param='boundary'", "model.init_std=0.05"])
    ranges = stage_layers(cfg.model, cfg.pipeline)
    plain = load_config("tiny", ["pipeline.num_stages=4", "model.subspace_rank=8", "model.min_dense_tail_layers=0"])
    assert ranges == stage_layers(plain.model, plain.pipeline)  # no dense-tail minimum: the split by parameters
    assert all(w.rank is None for s in model.stages for w in writers(s))  # every writer dense
    assert model.stages[0].embedding.shape == (256, cfg.model.d_model)  # a dense embedding
    for stage in model.stages:
        assert sum(q.numel() for q in stage.parameters()) == stage_parameters(
            cfg.model, stage.layers, stage.index, stage.num_stages)
        assert stage.boundary_width == 8
    # The unsplit model applies the same bottleneck the split one sends, so the two compute one function ...
    chain = StageChain.around(list(model.stages), cfg.train)
    step = chain.train_microbatch(windows(), record=True)
    assert all(b.shape[-1] == 8 for b in step.boundaries) and all(g.shape[-1] == 8 for g in step.boundary_grads)
    unsplit, chained = unsplit_and_chain_losses(cfg, model, windows(seed=3))
    assert unsplit == pytest.approx(chained, abs=1e-4)
    # ... and the bottleneck is real: without it (the stream passed whole) the loss differs.
    with torch.no_grad():
        x, ids = model.stages[0].embed(windows(seed=3)[:, :-1]), windows(seed=3)
        for stage in model.stages:
            x = stage.run_blocks(x)
        whole = float(torch.nn.functional.cross_entropy(model.stages[-1].logits(x).flatten(0, 1), ids[:, 1:].flatten()))
    assert abs(whole - unsplit) > 1e-3
    # One stage: no boundary, so the model is dense + table.
    _, one = build(["model.subspace_param='boundary'"], stages=1)
    assert all(w.rank is None for w in writers(one.stages[0])) and one.stages[0].embedding.shape[1] == 256


def test_boundary_parameterisation_refuses_what_does_not_apply():
    for extra in ("model.dense_tail_layers=3", "model.constrained_init_std=0.02"):
        with pytest.raises(ConfigError, match="subspace_param='boundary'"):
            load_config("tiny", ["model.subspace_rank=8", "model.subspace_param='boundary'", extra])
    with pytest.raises(ConfigError, match="'factored', 'projected', 'boundary'"):
        load_config("tiny", ["model.subspace_rank=8", "model.subspace_param='bottle'"])


def test_boundary_learned_projections_and_anchors_train_and_keep_the_split_exact():
    cfg = load_config("tiny", ["pipeline.num_stages=3", "model.subspace_rank=8", "model.subspace_param='boundary'",
                               "model.boundary_learned=true", "model.boundary_anchor_rank=16", "train.lr=3e-3",
                               "train.warmup_steps=0"])
    torch.manual_seed(0)
    chain = StageChain.build(cfg)
    first, middle, last = (e.module for e in chain.engines)
    assert first.proj_in is None and first.anchor_embedding is None and last.proj_out is None
    assert torch.equal(first.proj_out.detach(), first.basis) and torch.equal(last.proj_in.detach(), last.basis)
    assert middle.anchor_embedding.shape == (256, 16) and not middle.anchor_out.detach().any()  # zero at init
    for stage in (first, middle, last):
        assert sum(q.numel() for q in stage.parameters()) == stage_parameters(
            cfg.model, stage.layers, stage.index, stage.num_stages)
    for step in range(3):
        out = chain.train_microbatch(windows(seed=10 + step), record=True)
    assert all(b.shape[-1] == 8 for b in out.boundaries)
    # Each learned part moved (the gradient reaches the sender's map through the boundary's gradient).
    assert not torch.equal(first.proj_out.detach(), first.basis) and not torch.equal(last.proj_in.detach(), last.basis)
    assert middle.anchor_out.detach().abs().sum() > 0
    model = LanguageModel(cfg.model, cfg.pipeline, stages=chain.modules())
    unsplit, chained = unsplit_and_chain_losses(cfg, model, windows(seed=3))
    assert unsplit == pytest.approx(chained, abs=1e-4)
    for extra in ("model.boundary_learned=true", "model.boundary_anchor_rank=4"):
        with pytest.raises(ConfigError, match="boundary_anchor_rank need"):
            load_config("tiny", ["model.subspace_rank=8", extra])
