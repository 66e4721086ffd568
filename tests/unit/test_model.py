"""The subspace model's defining invariants (DESIGN §1.1), and the controls that show they can fail."""

from __future__ import annotations

import pytest
import torch

from node.config import load_config
from node.model import LanguageModel, parameter_groups
from protocol import subspace


def build(overrides=(), stages=4, seed=0):
    cfg = load_config("tiny", [f"pipeline.num_stages={stages}", *overrides])
    torch.manual_seed(seed)
    return cfg, LanguageModel(cfg.model, cfg.pipeline)


def batch(n=2, length=48, seed=1):
    ids = torch.randint(0, 256, (n, length + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def boundaries(model, ids):
    x = model.stages[0].embed(ids)
    out = []
    for stage in model.stages[:-1]:
        x = stage.run_blocks(x)
        out.append(x)
    return out


def max_reconstruction_error(model, ids):
    """Worst per-token error relative to the part a boundary actually carries, |x − T_fixed[ids]|."""
    err = 0.0
    with torch.no_grad():
        for stage, x in zip(model.stages, boundaries(model, ids), strict=False):
            back = stage.decode(stage.encode(x, ids), ids)
            err = max(err, ((back - x).norm(dim=-1) / (x - stage.table[ids]).norm(dim=-1)).max().item())
    return err


def train_a_few_steps(model, steps=5):
    opt = torch.optim.AdamW(parameter_groups(model, 0.1), lr=3e-3)
    for step in range(steps):
        ids, targets = batch(seed=100 + step)
        model(ids, targets).backward()
        opt.step()
        opt.zero_grad()


def test_basis_is_orthonormal_deterministic_and_seeded():
    u = subspace.make_basis(3, 256, 8)
    assert torch.allclose(u.T @ u, torch.eye(8), atol=1e-6)
    assert torch.equal(u, subspace.make_basis(3, 256, 8))
    assert subspace.basis_fingerprint(u) == subspace.basis_fingerprint(subspace.make_basis(3, 256, 8))
    assert not torch.allclose(u, subspace.make_basis(4, 256, 8))
    table = subspace.make_fixed_table(3, 256, 64, std=1.0)
    assert torch.linalg.matrix_rank(table) == 64  # high rank: not itself inside any small subspace
    with pytest.raises(ValueError):
        subspace.make_basis(0, 8, 9)


# fp32 rounding of x (|x| ≈ |T_fixed[ids]| ≈ 16) relative to the part a boundary carries, |x − T_fixed[ids]|
# (≈ 0.5 at init): ulp(16)/0.5 ≈ 4e-6 a coordinate; 3e-5 bounds it per token. The control below is ~1.
EXACT = 3e-5


def test_boundaries_are_exactly_reconstructible_before_and_after_training():
    _, model = build()
    ids, _ = batch()
    assert max_reconstruction_error(model, ids) <= EXACT
    train_a_few_steps(model)
    assert max_reconstruction_error(model, ids) <= EXACT


def test_dense_model_boundaries_are_not_reconstructible():
    """Control: the same codec on a dense model loses most of the stream, so the test above can fail."""
    _cfg, dense = build(["model.subspace_rank='none'", "model.fixed_table=true"])
    ids, _ = batch()
    shared = build()[1].stages[0]
    x = boundaries(dense, ids)[0]
    with torch.no_grad():
        back = subspace.decode(subspace.encode(x, ids, shared.basis, shared.table), ids, shared.basis, shared.table)
    rel = ((back - x).norm(dim=-1) / (x - shared.table[ids]).norm(dim=-1)).max().item()
    assert rel > 0.5


def test_last_stage_is_unconstrained_and_others_are():
    cfg, model = build()
    k, d = cfg.model.subspace_rank, cfg.model.d_model
    for stage in model.stages:
        expected_rows = d if stage.is_last else k
        for block in stage.blocks:
            assert block.attn.wo.weight.shape[0] == expected_rows
            assert block.mlp.w_down.weight.shape[0] == expected_rows
    assert model.stages[0].embedding.shape == (cfg.model.vocab_size, k)


def test_shared_tensors_are_not_in_checkpoints():
    _, model = build()
    keys = model.state_dict().keys()
    assert not any(key.endswith(("basis", "table", "rope_cos", "rope_sin")) for key in keys)


def test_causal_and_gqa():
    _, model = build(["model.n_kv_heads=2"], stages=2)
    ids, _ = batch(n=1, length=32)
    changed = ids.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % 256
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.allclose(a[0, :20], b[0, :20], atol=1e-5)
    assert not torch.allclose(a[0, 20:], b[0, 20:], atol=1e-3)


def test_bf16_autocast_keeps_the_residual_stream_fp32():
    """T_fixed is most of |x|: a bf16 stream would round the trainable part away (15% error seen)."""
    _, model = build()
    ids, _ = batch()
    with torch.no_grad():
        reference = boundaries(model, ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = boundaries(model, ids)
    table = model.stages[0].table[ids]
    for x_low, x in zip(low, reference, strict=True):
        assert x_low.dtype == torch.float32
        assert ((x_low - x).norm() / (x - table).norm()).item() < 0.02


def test_rope_attention_depends_on_relative_position_only():
    from node.model import apply_rope, rope_tables

    cos, sin = rope_tables(16, 64, 10000.0)
    q, k = torch.randn(16), torch.randn(16)

    def score(i, j):
        seq_q, seq_k = torch.zeros(1, 1, 64, 16), torch.zeros(1, 1, 64, 16)
        seq_q[0, 0, i], seq_k[0, 0, j] = q, k
        return (apply_rope(seq_q, cos, sin)[0, 0, i] @ apply_rope(seq_k, cos, sin)[0, 0, j]).item()

    assert score(5, 2) == pytest.approx(score(40, 37), rel=1e-4, abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)


def test_gqa_equals_full_attention_with_repeated_kv_heads():
    cfg_gqa, gqa = build(["model.n_kv_heads=2"], stages=1)
    _, full = build(stages=1)
    full.load_state_dict({k: v for k, v in gqa.state_dict().items() if "wkv" not in k}, strict=False)
    head_dim = cfg_gqa.model.d_model // cfg_gqa.model.n_heads
    groups = cfg_gqa.model.n_heads // 2
    for b_gqa, b_full in zip(gqa.stages[0].blocks, full.stages[0].blocks, strict=True):
        k, v = b_gqa.attn.wkv.weight.view(2, 2, head_dim, -1)  # (k|v, kv_head, head_dim, d)
        repeat = lambda w: w.repeat_interleave(groups, dim=0).reshape(-1, w.shape[-1])  # noqa: E731
        b_full.attn.wkv.weight.data = torch.cat([repeat(k), repeat(v)])
    ids, _ = batch()
    with torch.no_grad():
        assert torch.allclose(gqa(ids), full(ids), atol=1e-5)


def test_compression_ratio_of_tiny_preset():
    cfg = load_config("tiny")
    tokens = 1000
    dense = tokens * cfg.model.d_model * 2
    assert dense / subspace.boundary_bytes(tokens, cfg.model.subspace_rank, 2, cfg.model.vocab_size) >= 30


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_matches_cpu_loosely():
    _, model = build(stages=2)
    ids, targets = batch()
    cpu_loss = model(ids, targets).item()
    model = model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu_loss = model(ids.cuda(), targets.cuda()).item()
    assert abs(gpu_loss - cpu_loss) < 0.05 * cpu_loss
