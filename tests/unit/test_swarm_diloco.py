"""Streaming DiLoCo outer loop (swarm/diloco.py) against a straightforward reference computation."""

from __future__ import annotations

import copy

import pytest
import torch

from node.config import ConfigError, load_config
from node.model import LanguageModel
from protocol.codecs import get_codec
from swarm.diloco import (
    Boundary,
    DilocoConfig,
    OuterLoop,
    due,
    quantized,
    robust_mean,
    split_fragments,
)
from swarm.diloco_group import InProcessGroup

REPLICAS, STEPS = 3, 26


def tiny_model() -> LanguageModel:
    cfg = load_config(None, model={"name": "t", "vocab_size": 256, "d_model": 32, "n_layers": 4, "n_heads": 2,
                                   "ffn_hidden": 64, "max_seq_len": 32, "subspace_rank": 4},
                      train={"seq_len": 16})
    torch.manual_seed(0)
    return LanguageModel(cfg.model)


def batch(replica: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * replica + step)
    # A learnable pattern (each row counts up from a random start) so the replicas really train.
    start = torch.randint(0, 200, (2, 1), generator=gen)
    return (start + torch.arange(17)) % 256


def inner_step(model, opt, replica: int, step: int) -> None:
    ids = batch(replica, step)
    loss = model(ids[:, :-1], ids[:, 1:])
    opt.zero_grad()
    loss.backward()
    opt.step()


def replicas():
    base = tiny_model()
    models = [copy.deepcopy(base) for _ in range(REPLICAS)]
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95)) for m in models]
    return models, opts


# The reference's own idea of the fragments of this 4-block model, written out by hand: units are the
# embedding, blocks 0..3, the final norm and the LM head (7 units); strided over P=3.
def reference_fragments(model) -> list[list[str]]:
    names = [n for n, _ in model.named_parameters()]
    unit_names = ["stages.0.embedding", *[f"stages.0.blocks.{i}." for i in range(4)],
                  "stages.0.final_norm.weight", "stages.0.lm_head.weight"]
    members = [[n for n in names if n == u or (u.endswith(".") and n.startswith(u))] for u in unit_names]
    return [[n for unit in members[p::3] for n in unit] for p in range(3)]


def run_reference(settings: DilocoConfig, codec: str | None):
    """Streaming DiLoCo written out plainly: whole tensors, explicit formulas, no swarm.diloco code."""
    H, P, tau, lr, mu, alpha = (settings.inner_steps, settings.fragments, settings.overlap, settings.outer_lr,
                                settings.outer_momentum, settings.alpha)
    models, opts = replicas()
    frags = reference_fragments(models[0])
    glob = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    mom = {n: torch.zeros_like(p) for n, p in glob.items()}
    started: dict[int, tuple[int, dict]] = {}  # fragment -> (start step, mean delta by name)
    taken: dict[tuple[int, str], torch.Tensor] = {}  # (replica, name) -> its local value when the part was taken
    residual: dict[tuple[int, int], torch.Tensor] = {}  # (replica, fragment) -> what the codec lost (error feedback)

    def finish(p):
        # The formulas of DESIGN §1.2, in the same fused floating-point operations as swarm.diloco (a·x + y
        # rounds once there): with a 4-bit codec one last-bit difference can flip a value to the next step.
        _, mean = started.pop(p)
        with torch.no_grad():
            for n in frags[p]:
                mom[n] = mom[n].mul(mu).add(mean[n])  # m ← μ·m + Δ
                glob[n] = glob[n].sub(mean[n].add(mom[n], alpha=mu), alpha=lr)  # θ ← θ − lr·(Δ + μ·m)
                for r, m in enumerate(models):
                    local = dict(m.named_parameters())[n]
                    if settings.merge == "since":  # θ + the replica's own change since its part was taken
                        local.copy_(glob[n] + (local - taken.pop((r, n))))
                    else:
                        local.mul_(alpha).add_(glob[n], alpha=1 - alpha)  # α·θ_local + (1−α)·θ

    for t in range(1, STEPS + 1):
        for r, (m, o) in enumerate(zip(models, opts, strict=True)):
            inner_step(m, o, r, t)
        for p in [p for p, (t0, _) in started.items() if t0 + tau == t and tau > 0]:
            finish(p)
        for p in range(P):
            if (t - p * H // P) % H == 0:
                total = None
                for r, m in enumerate(models):
                    named = dict(m.named_parameters())
                    taken.update({(r, n): named[n].detach().clone() for n in frags[p]})
                    delta = torch.cat([(glob[n] - named[n].detach()).reshape(-1) for n in frags[p]])
                    if settings.error_feedback and (r, p) in residual:
                        delta = delta + residual[(r, p)]  # e: what the last sent part of p lost
                    if codec is not None:
                        c = get_codec(codec)
                        sent = c.decode(c.encode(delta), delta.shape)
                        if settings.error_feedback:
                            residual[(r, p)] = delta - sent
                        delta = sent
                    total = delta.clone() if total is None else total + delta
                flat = total / len(models)
                sizes = [glob[n].numel() for n in frags[p]]
                mean = {n: v.view_as(glob[n]) for n, v in zip(frags[p], flat.split(sizes), strict=True)}
                started[p] = (t, mean)
                if tau == 0:
                    finish(p)
    return models


def run_swarm_diloco(settings: DilocoConfig, codec: str | None):
    models, opts = replicas()
    group = InProcessGroup([OuterLoop(dict(m.named_parameters()), settings) for m in models], settings, codec)
    for t in range(1, STEPS + 1):
        for r, (m, o) in enumerate(zip(models, opts, strict=True)):
            inner_step(m, o, r, t)
        group.after_step(t)
    assert group.kept and all(kept == list(range(REPLICAS)) for kept in group.kept) and not group.rejected
    return models, group.loops


@pytest.mark.parametrize("codec,error_feedback", [(None, False), ("e3m0", False), ("e3m0", True), ("int2", True),
                                                  ("topk", True)])
@pytest.mark.parametrize("overlap,alpha,merge", [(2, 0.5, "alpha"), (0, 0.0, "alpha"), (2, 0.5, "since")])
def test_golden_streaming_diloco_matches_the_reference(codec, error_feedback, overlap, alpha, merge):
    settings = DilocoConfig(inner_steps=6, fragments=3, overlap=overlap, alpha=alpha, outer_lr=0.7,
                            error_feedback=error_feedback, merge=merge)
    assert split_fragments([n for n, _ in tiny_model().named_parameters()], 3) == reference_fragments(tiny_model())
    reference = run_reference(settings, codec)
    models, loops = run_swarm_diloco(settings, codec)
    # Boundaries up to 26: fragment 0 at 6,12,18,24; 1 at 2,8,14,20,26; 2 at 4,10,16,22. With τ=2 the
    # round begun at 26 is still in flight at the end.
    assert loops[0].rounds_applied == ([4, 4, 4] if overlap else [4, 5, 4])
    for ref, got in zip(reference, models, strict=True):
        for (name, a), (_, b) in zip(ref.named_parameters(), got.named_parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    # The check can fail: the outer steps moved the replicas away from plain local training.
    local, opts = replicas()
    for t in range(1, STEPS + 1):
        inner_step(local[0], opts[0], 0, t)
    gap = max(float((a - b).detach().abs().max()) for a, b in zip(local[0].parameters(), models[0].parameters(), strict=True))
    assert gap > 1e-3
    if error_feedback:  # the residual was carried (and is what the wire lost: not zero)
        assert all(e is not None and float(e.abs().max()) > 0 for e in loops[0].residual)


def test_error_feedback_residual_survives_a_skipped_round_and_resets_with_the_state():
    """A skipped round leaves the residual alone (the next Δ covers both periods); a loaded state
    (a resync, a checkpoint) starts it over, since it is this replica's own."""
    model = tiny_model()
    settings = DilocoConfig(inner_steps=6, fragments=3, error_feedback=True)
    loop = OuterLoop(dict(model.named_parameters()), settings)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01)
    part = loop.begin(0, 0)
    _, sent = quantized(part, "int2")
    assert loop.apply(0, sent, sent=sent)
    lost = loop.residual[0].clone()
    torch.testing.assert_close(lost, part - sent)
    nxt = loop.begin(0, 1)
    assert not loop.apply(0, None)  # skipped
    torch.testing.assert_close(loop.residual[0], lost)
    torch.testing.assert_close(loop.begin(0, 2), nxt)  # the same Δ + e again
    loop.apply(0, None)
    loop.load_state_dict(loop.state_dict())
    assert loop.residual == [None, None, None]


def test_schedule_is_a_pure_function_of_progress():
    s = DilocoConfig(inner_steps=6, fragments=3)
    assert [s.offset(p) for p in range(3)] == [0, 2, 4]
    expected = [Boundary(2, 1, 0), Boundary(4, 2, 0), Boundary(6, 0, 1), Boundary(8, 1, 1), Boundary(10, 2, 1),
                Boundary(12, 0, 2)]
    assert due(s, 0, 12) == expected
    stepwise = [b for t in range(1, 13) for b in due(s, t - 1, t)]
    assert stepwise == expected  # one jump or twelve small ones: the same rounds
    assert due(s, 12, 12) == [] and due(s, 12, 5) == []
    assert due(s, 5, 9) == [Boundary(6, 0, 1), Boundary(8, 1, 1)]
    # Summed swarm progress jumps by uneven amounts; every boundary is still seen exactly once.
    jumps, seen, t = [3, 1, 7, 2, 11, 5], [], 0
    for j in jumps:
        seen += due(s, t, t + j)
        t += j
    assert seen == due(s, 0, t)


def test_robust_mean_weighs_parts_and_caps_a_claimed_weight():
    a, b, c = torch.full((4,), 1.0), torch.full((4,), 2.0), torch.full((4,), 4.0)
    assert torch.equal(robust_mean([a, b, c]).mean, torch.full((4,), 7 / 3))
    # weights 1, 3, 2: (1·1 + 3·2 + 2·4) / 6
    torch.testing.assert_close(robust_mean([a, b, c], weights=[1, 3, 2]).mean, torch.full((4,), 15 / 6))
    # a part claiming 1e9 steps counts max_weight_ratio × the lower median (2) = 8 at most
    torch.testing.assert_close(robust_mean([a, b, c], weights=[1, 2, 1e9]).mean, torch.full((4,), (1 + 4 + 32) / 11))
    # a dropped part's weight neither counts nor sets the median
    bad = torch.full((4,), float("nan"))
    torch.testing.assert_close(robust_mean([a, bad, c], weights=[2, 1e9, 2]).mean, torch.full((4,), 2.5))
    for weights in ([1, 2], [1, 0, 1], [1, float("inf"), 1]):
        with pytest.raises(ValueError):
            robust_mean([a, b, c], weights=weights)


def test_fragments_strided_sequential_and_errors():
    names = ["emb", "blocks.0.a", "blocks.0.b", "blocks.1.a", "blocks.2.a", "norm", "head"]
    assert split_fragments(names, 2) == [["emb", "blocks.1.a", "norm"], ["blocks.0.a", "blocks.0.b", "blocks.2.a", "head"]]
    assert split_fragments(names, 2, "sequential") == [["emb", "blocks.0.a", "blocks.0.b", "blocks.1.a"],
                                                       ["blocks.2.a", "norm", "head"]]
    assert split_fragments(names, 1) == [names]
    with pytest.raises(ValueError, match="6 unit"):
        split_fragments(names, 7)
    with pytest.raises(ValueError, match="fragment mode"):
        split_fragments(names, 2, "random")
    for bad in ({"fragments": 0}, {"fragments": 7, "inner_steps": 6}, {"overlap": 6, "inner_steps": 6},
                {"overlap": -1}, {"alpha": 1.5}, {"merge": "mix"}, {"outer_lr": 0.0}, {"outer_momentum": 1.0}, {"fragment_mode": "x"},
                {"inner_steps": 6.0}):
        with pytest.raises(ConfigError):  # a ValueError naming the diloco.* field
            DilocoConfig(**bad)


def test_a_stage_fits_the_config_to_its_units():
    """P is capped at the stage's units, H rounded down to a multiple of P, τ kept below H; a copy."""
    config = DilocoConfig(inner_steps=10, fragments=4, overlap=9)
    fitted = config.for_units(3)
    assert (fitted.fragments, fitted.inner_steps, fitted.overlap) == (3, 9, 8)
    assert (config.fragments, config.inner_steps) == (4, 10)  # the run's section is unchanged
    assert config.for_units(7) == DilocoConfig(inner_steps=8, fragments=4, overlap=7)
    assert [fitted.offset(p) for p in range(3)] == [0, 3, 6]


def test_robust_mean_drops_poison_and_keeps_idle_replicas():
    good = [torch.full((8,), 1.0), torch.full((8,), 1.2), torch.full((8,), 0.9)]
    result = robust_mean([*good, torch.full((8,), 1e6), torch.tensor([float("nan")] * 8), torch.ones(5)])
    assert result.kept == [0, 1, 2]
    assert result.rejected == {3: "norm", 4: "non_finite", 5: "shape"}
    torch.testing.assert_close(result.mean, torch.full((8,), (1.0 + 1.2 + 0.9) / 3))
    # Two members: the huge one is the outlier (lower median = the honest norm).
    assert robust_mean([torch.ones(4), torch.full((4,), 1e4)]).kept == [0]
    # A replica that has not trained yet (zero part) does not make the trained one look huge.
    assert robust_mean([torch.zeros(4), torch.ones(4)]).kept == [0, 1]
    assert robust_mean([torch.tensor([float("inf")])]).mean is None


def test_skipped_round_changes_nothing_and_state_round_trips():
    model = tiny_model()
    params = dict(model.named_parameters())
    loop = OuterLoop(params, DilocoConfig(inner_steps=4, fragments=2))
    before = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        params["stages.0.lm_head.weight"].add_(0.01)
    assert "stages.0.lm_head.weight" in loop.layouts[0].names  # unit 6 of 7, strided over 2
    delta = loop.begin(0, 0)
    assert loop.pending(0) == 0 and delta.abs().max() > 0
    with pytest.raises(RuntimeError, match="never applied"):
        loop.begin(0, 1)
    assert loop.apply(0, None) is False
    assert torch.equal(params["stages.0.lm_head.weight"], before["stages.0.lm_head.weight"] + 0.01)
    with pytest.raises(RuntimeError, match="without begin"):
        loop.apply(0, None)
    loop.begin(1, 0)
    with pytest.raises(ValueError, match="finite"):
        loop.apply(1, torch.full((loop.layouts[1].numel,), float("nan")))
    state = loop.state_dict()
    other = OuterLoop(dict(tiny_model().named_parameters()), DilocoConfig(inner_steps=4, fragments=2))
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.global_, loop.global_, strict=True))


def test_one_replica_outer_step_with_unit_lr_and_no_momentum_is_the_identity():
    # Δ = θ_g − θ, θ̃ = θ_g − 1·Δ = θ: plain DiLoCo with lr 1 and μ 0 must leave a lone replica where it is.
    model = tiny_model()
    params = dict(model.named_parameters())
    loop = OuterLoop(params, DilocoConfig(inner_steps=2, fragments=1, outer_lr=1.0, outer_momentum=0.0, alpha=0.0,
                                           overlap=0))
    with torch.no_grad():
        for p in params.values():
            p.mul_(1.5).add_(0.01)
    moved = {n: p.detach().clone() for n, p in params.items()}
    loop.apply(0, quantized(loop.begin(0, 1), get_codec("fp32"))[1])
    for n, p in params.items():
        torch.testing.assert_close(p, moved[n])
    torch.testing.assert_close(loop.global_[0], loop.layouts[0].flatten(params))


def test_history_chain_agrees_on_the_same_means_and_tells_a_skipped_round_apart():
    a, b = (OuterLoop(dict(tiny_model().named_parameters()), DilocoConfig(inner_steps=4, fragments=2))
            for _ in range(2))
    mean = torch.full((a.layouts[0].numel,), 1e-4)
    for loop in (a, b):
        loop.begin(0, 3)
        loop.apply(0, mean)
    assert a.history() == b.history() and a.history()[0].startswith("3:") and a.history()[1] == "-1:" + "0" * 16
    a.begin(0, 4)
    a.apply(0, mean)
    b.begin(0, 4)
    b.apply(0, None)  # b skipped round 4: same means so far, then a gap
    a.begin(0, 5)
    a.apply(0, mean)
    b.begin(0, 5)
    b.apply(0, mean)
    assert a.history()[0].split(":")[0] == b.history()[0].split(":")[0] == "5"
    assert a.history() != b.history()  # the same last round, different histories: b drifted
    state = a.state_dict()
    b.load_state_dict(state)
    assert b.history() == a.history()
