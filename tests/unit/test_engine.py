"""The stage engine (node/engine.py): the one code path every stage trains through.

Exactness of the subspace boundary through the production engine, its guards, the device every
tensor lives on, the bit-identical T_fixed on any device, and one inner step shared by train-local and
the daemon's one-stage replica.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from node.chain import StageChain
from node.config import ConfigError, load_config
from node.engine import StageEngine, UnknownMicrobatch, build_engine
from node.model import LanguageModel, lm_loss
from node.stage_host import ReplicaTrainer
from node.stage_store import StageStore
from node.train_local import train_local
from protocol import subspace

GPU = ["cuda"] if torch.cuda.is_available() else []
# The cuda case carries the marker, so `pytest -m cuda` (bench/gpu.py) selects it.
DEVICES = ["cpu", *(pytest.param(d, marks=pytest.mark.cuda) for d in GPU)]


def tiny(stages=4, extra=()):
    return load_config("tiny", [f"pipeline.num_stages={stages}", *extra])


def window(n=2, length=48, seed=1):
    """A microbatch: ``length + 1`` ids (the last stage scores positions 0..length-1)."""
    return torch.randint(0, 256, (n, length + 1), generator=torch.Generator().manual_seed(seed))


NO_STEP = 1 << 30  # an accumulation that never completes; the engine scales each loss by 1/NO_STEP (exact)


def no_step(cfg):
    """The [train] section with an accumulation that never completes (gradients stay to be read)."""
    return dataclasses.replace(cfg.train, grad_accum=NO_STEP)


def trained_model(cfg, steps=3):
    torch.manual_seed(0)
    model = LanguageModel(cfg.model, cfg.pipeline)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        w = window(seed=100 + step)
        model(w[:, :-1], w[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("mode", ["stash", "recompute"])
def test_chain_of_engines_gives_the_unsplit_models_loss_and_gradients(mode):
    cfg = tiny()
    model = trained_model(cfg)
    w = window(seed=7)
    model.zero_grad()
    loss = model(w[:, :-1], w[:, 1:])
    loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    staged = StageChain.around(model.stages, no_step(cfg), backward=mode).train_microbatch(w, record=True)
    assert abs(staged.loss - loss.item()) <= 1e-5 * loss.item()
    for name, p in model.named_parameters():
        assert ((p.grad * NO_STEP - reference[name]).norm() / reference[name].norm()).item() <= 1e-4, name
    k = cfg.model.subspace_rank  # each boundary carries k numbers per token both ways
    assert all(b.shape == (2, 49, k) for b in staged.boundaries) and len(staged.boundaries) == 3
    assert all(g.shape == (2, 49, k) for g in staged.boundary_grads) and len(staged.boundary_grads) == 3


def test_boundary_gradients_are_the_encoded_stream_gradients():
    cfg = tiny()
    model = trained_model(cfg)
    w = window()
    ids = w[:, :-1]
    x = model.stages[0].embed(ids)
    streams = []
    for stage in model.stages[:-1]:
        x = stage.run_blocks(x)
        x.retain_grad()
        streams.append(x)
    x = model.stages[-1].run_blocks(x)
    lm_loss(model.stages[-1].logits(x), w[:, 1:]).backward()
    model.zero_grad(set_to_none=True)
    staged = StageChain.around(model.stages, no_step(cfg)).train_microbatch(w, record=True)
    for stage, stream, dc in zip(model.stages, streams, staged.boundary_grads, strict=False):
        expected = subspace.encode_grad(stream.grad, stage.basis)
        assert torch.allclose(dc[:, :48] * NO_STEP, expected, rtol=1e-4, atol=1e-7)
        assert dc[:, 48].abs().max() == 0  # the extra position of the window is scored by nothing


def test_engine_guards_and_drop():
    cfg = tiny()
    first, middle = build_engine(cfg, 0), build_engine(cfg, 1)
    with pytest.raises(ValueError, match="boundary_in"):
        middle.forward(0, window(), None)
    out = first.forward(1, window(), None)
    assert first.in_flight == 1 and out.shape[-1] == first.boundary_width
    with pytest.raises(ValueError, match="already in flight"):
        first.forward(1, window(), None)
    assert first.drop(1) and first.in_flight == 0 and not first.drop(1)
    with pytest.raises(UnknownMicrobatch):
        first.backward(1, out)
    with pytest.raises(ValueError, match="last stage"):
        first.forward_backward_last(window(), None)


def test_microbatches_out_of_order_accumulate_like_the_mean_loss():
    cfg = tiny(stages=2)
    model = trained_model(cfg, steps=0)
    windows = [window(seed=s) for s in (11, 12, 13)]
    (sum(model(w[:, :-1], w[:, 1:]) for w in windows) / 3).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    train = dataclasses.replace(cfg.train, grad_accum=4)  # three of four: no step yet, gradients stay
    first, last = (StageEngine(stage, train, backward="stash") for stage in model.stages)
    grads = {mb: last.forward_backward_last(w, first.forward(mb, w, None).clone())[1] for mb, w in enumerate(windows)}
    assert first.in_flight == 3  # every forward in flight before any backward
    for mb in (2, 0, 1):
        first.backward(mb, grads[mb])
    assert first.progress == last.progress == 0 and first.in_flight == 0
    for name, p in model.named_parameters():  # the engines scaled each loss by 1/4; the reference by 1/3
        assert torch.allclose(p.grad * 4 / 3, reference[name], rtol=1e-4, atol=1e-7), name


def test_one_inner_step_for_train_local_and_the_one_stage_daemon(tmp_path, small_data_overrides):
    """train-local and a daemon's S = 1 replica run the same engine: same data, same weights, bit for bit."""
    overrides = [*small_data_overrides, "train.steps=3", "train.eval_every=0", "train.grad_accum=2",
                 "pipeline.num_stages=1", "diloco.enabled=false"]
    cfg = load_config("local/tiny", overrides)
    result = train_local(cfg)
    work = StageStore.fresh(cfg, "r", 0, tmp_path / "daemon")
    losses = []
    ReplicaTrainer(work, cfg).run(lambda: False, on_step=lambda step, loss: losses.append(loss))
    assert work.progress == 3
    assert losses == [loss for _, loss in result.train_losses]
    for (name, a), (_, b) in zip(result.chain.engines[0].module.state_dict().items(),
                                 work.module.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_diloco_inner_lr_sets_a_syncing_stages_peak_lr_and_nothing_else(tmp_path):
    """diloco.inner_lr: the peak of the inner schedule of a stage whose replicas sync; train.lr where it is unset
    or replica sync is off (and for the store's own configuration, which the run's other parts read)."""
    base = ["pipeline.num_stages=1", "train.lr=1e-3", "train.warmup_steps=10"]

    def peak(*extra: str) -> tuple[float, float]:
        cfg = load_config("local/tiny", [*base, *extra])
        store = StageStore.fresh(cfg, "r", 0, tmp_path / str(len(extra)) / "_".join(extra))
        return store.engine.train_cfg.lr, store.cfg.train.lr

    assert peak() == (1e-3, 1e-3)
    assert peak("diloco.inner_lr=4e-4") == (4e-4, 1e-3)
    assert peak("diloco.inner_lr=4e-4", "diloco.enabled=false") == (1e-3, 1e-3)
    with pytest.raises(ConfigError, match=r"diloco\.inner_lr must be positive"):
        load_config("local/tiny", ["diloco.inner_lr=0"])


@pytest.mark.parametrize(("extra", "warned"), [
    (["diloco.merge=since"], True),  # the defaults: Nesterov 0.9 at outer lr 0.8
    (["diloco.merge=since", "diloco.outer_lr=1", "diloco.outer_momentum=0"], False),
    (["diloco.outer_lr=1", "diloco.outer_momentum=0"], False),
])
def test_merge_since_with_outer_momentum_is_warned_about(caplog, extra, warned):
    cfg = tiny(stages=1, extra=extra)
    with caplog.at_level("WARNING", logger="node.engine"):
        build_engine(cfg, 0).attach_outer(cfg.diloco, "cpu")
    assert any("merge = 'since'" in r.getMessage() for r in caplog.records) == warned


@pytest.mark.parametrize("device", DEVICES)
def test_every_tensor_of_a_stage_lives_on_the_engines_device(device):
    """Parameters, gradients, optimizer state, frozen tensors and boundary tensors: all on the device."""
    cfg = tiny(stages=3, extra=["train.grad_accum=1"])
    for stage in range(3):
        engine = build_engine(cfg, stage, device)
        engine.attach_outer(cfg.diloco, "auto")
        w = window()
        boundary = None if stage == 0 else torch.randn(2, 49, engine.boundary_width)
        if engine.is_last:
            _, grad_in = engine.forward_backward_last(w, boundary)
            produced = [grad_in]
        else:
            out = engine.forward(0, w, boundary)
            grad_in = engine.backward(0, torch.randn_like(out))
            produced = [out] + ([grad_in] if grad_in is not None else [])
        assert engine.progress == 1 and engine.optimizer.state  # a step ran: AdamW state exists
        # gradients are cleared after a step: make some to check where they land
        engine.module(boundary.to(device) if boundary is not None else None, w.to(device)).float().mean().backward()
        placed = {**engine.tensors(), **{f"boundary:{i}": t for i, t in enumerate(produced)}}
        want = torch.device(device).type
        wrong = {name: str(t.device) for name, t in placed.items() if t.device.type != want}
        assert not wrong, wrong
        assert any(name.startswith("grad:") for name in placed) and any(name.startswith("optim:") for name in placed)
        # The outer state lives on the host (pinned on CUDA), never on the device.
        assert all(g.device.type == "cpu" for g in engine.outer.global_)
        if want == "cuda":
            assert all(g.is_pinned() for g in engine.outer.global_ + engine.outer.momentum)


@pytest.mark.cuda  # also runs without a GPU (the CPU checks); `-m cuda` selects it for the GPU one
def test_fixed_table_is_the_same_bits_on_every_device():
    table = subspace.make_fixed_table(0, 256, 256, 1.0)
    # The generator is part of the protocol: a change would split CPU and GPU peers (and old and new).
    assert subspace.basis_fingerprint(table) == "c8b6b2102dd84b67"
    assert abs(float(table.std()) - 1.0) < 0.01 and abs(float(table.mean())) < 0.01
    assert torch.linalg.matrix_rank(table) == 256
    for device in GPU:
        assert torch.equal(subspace.make_fixed_table(0, 256, 256, 1.0, device=device).cpu(), table)


def _snapshot(engine: StageEngine) -> dict:
    """Everything training state is made of: weights, gradients, optimizer state, counters."""
    return {"params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
            "grads": {n: None if p.grad is None else p.grad.clone() for n, p in engine.module.named_parameters()},
            "optim": {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                      for i, st in enumerate(engine.optimizer.state.values())},
            "counters": (engine.progress, engine.version, engine.accumulated, engine.in_flight)}


def _same(a: dict, b: dict) -> bool:
    def eq(x, y):
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
    return (all(eq(a["params"][n], b["params"][n]) for n in a["params"])
            and all(eq(a["grads"][n], b["grads"][n]) for n in a["grads"]) and a["counters"] == b["counters"]
            and all(eq(a["optim"][i][k], b["optim"][i][k]) if isinstance(a["optim"][i][k], torch.Tensor)
                    else a["optim"][i][k] == b["optim"][i][k] for i in a["optim"] for k in a["optim"][i]))


def test_an_evaluation_forward_never_changes_training_state_and_scores_the_agreed_weights():
    """infer(agreed=True) computes with the outer loop's global copies, while a training microbatch is in flight
    (stash mode keeps its graph), and leaves weights, gradients, optimizer state and counters as they were."""
    cfg = tiny(2, ["diloco.fragments=2"])
    first, last = build_engine(cfg, 0, backward="stash"), build_engine(cfg, 1, backward="stash")
    for engine in (first, last):
        engine.attach_outer(cfg.diloco, "cpu")
    for step in range(3):  # local weights move away from the global copies (no outer round here)
        w = window(seed=200 + step)
        boundary = first.forward(("m", step), w, None)
        _, grad = last.forward_backward_last(w, boundary)
        first.backward(("m", step), grad)
    w = window(seed=7)
    boundary = first.forward(("in flight", 0), w, None)  # its graph is held while the evaluations run
    before = [_snapshot(first), _snapshot(last)]
    agreed_boundary = first.infer(w, None, agreed=True)
    agreed_loss = last.infer(w, agreed_boundary, agreed=True)
    local_loss = last.infer(w, first.infer(w, None))
    assert _same(before[0], _snapshot(first)) and _same(before[1], _snapshot(last))

    # The agreed figure is the global copies' model: the seeded init here, since no round ran.
    fresh = LanguageModel(cfg.model, cfg.pipeline)
    with torch.no_grad():
        for engine, stage in zip((first, last), fresh.stages, strict=True):
            stage.load_state_dict(engine.agreed_parameters(), strict=False)
        expected = fresh(w[:, :-1], w[:, 1:])
    assert torch.allclose(agreed_loss, expected, atol=1e-5), (agreed_loss, expected)
    assert not torch.allclose(agreed_loss, local_loss), "local weights should differ from the global copies"
    # The in-flight microbatch's backward still runs on its own graph, as if nothing had happened.
    _, grad = last.forward_backward_last(w, boundary)
    first.backward(("in flight", 0), grad)
    assert first.recomputed == 0
