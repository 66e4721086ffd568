"""Exactness and size of the subspace stage boundary (DESIGN §1.1).

Trains the ``tiny`` preset briefly (so the weights are not at their init), splits it into S ≥ 4
stages, and on held-out batches measures:

- ``compression_ratio``: dense bf16 boundary bytes / subspace boundary bytes (bf16 coefficients
  plus one token id per token), per boundary and per direction;
- ``max_rel_reconstruction_error``: worst per-token ``|x − decode(encode(x))| / |x|`` over every
  boundary, in fp32, where x is the residual stream of the unsplit model;
- ``max_rel_reconstruction_error_sent_part``: the same error relative to ``|x − T_fixed[ids]|``, the
  part the boundary actually carries (stricter: T_fixed is most of |x|);
- ``max_rel_grad_error``: worst per-parameter ``|g_staged − g_unsplit| / |g_unsplit|`` where the staged
  model crosses every boundary through the codec (coefficients forward, ∂L/∂c backward) on the
  production stage engine (``node.engine.StageChain``: the code a swarm's stages run);
- ``max_rel_boundary_grad_error``: autograd's ∂L/∂c vs ``encode_grad(∂L/∂x)`` of the unsplit model;
- a control: the same reconstruction applied to a dense model of the same shape, which must fail.

    python bench/subspace.py --quick        # ~1 minute on 2 CPU cores
    python bench/subspace.py                # longer training, more batches, 4 and 8 stages

Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.chain import StageChain
from node.config import load_config
from node.data import load_corpus, validation_batches
from node.model import LanguageModel, lm_loss
from node.train_local import train_local
from protocol import subspace


def unsplit_boundaries(model: LanguageModel, ids: torch.Tensor, targets: torch.Tensor):
    """Residual streams at every stage boundary of the unsplit model, their gradients, and param grads."""
    model.zero_grad(set_to_none=True)
    x = model.stages[0].embed(ids)
    boundaries = []
    for stage in model.stages:
        x = stage.run_blocks(x)
        if not stage.is_last:
            x.retain_grad()
            boundaries.append(x)
    loss = lm_loss(model.stages[-1].logits(x), targets)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return [b.detach() for b in boundaries], [b.grad.detach() for b in boundaries], grads, loss.item()


def per_token_rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    return (err.norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).max().item()


def measure(model: LanguageModel, batches: list[torch.Tensor], train) -> dict:
    """Worst errors over ``batches``; ``train``: the [train] section (the engines' accumulation is set
    high enough that no optimizer step runs)."""
    recon, recon_sent, grad_err, bgrad_err = 0.0, 0.0, 0.0, 0.0
    for batch in batches:
        ids, targets = batch[:, :-1], batch[:, 1:]
        xs, dxs, ref_grads, ref_loss = unsplit_boundaries(model, ids, targets)
        for stage, x in zip(model.stages, xs, strict=False):
            c = subspace.encode(x, ids, stage.basis, stage.table)
            err = subspace.decode(c, ids, stage.basis, stage.table) - x
            recon = max(recon, per_token_rel(err, x))
            recon_sent = max(recon_sent, per_token_rel(err, x - stage.table[ids]))
        model.zero_grad(set_to_none=True)
        # The engine takes the whole window (seq_len + 1 ids) and scores positions 0..n-2; its boundaries
        # have one more position than the unsplit run's, whose gradient is zero (nothing scores it).
        staged = StageChain.around(model.stages, train).train_microbatch(batch, record=True)
        if abs(staged.loss - ref_loss) > 1e-4 * abs(ref_loss):
            raise AssertionError(f"staged loss {staged.loss} differs from unsplit {ref_loss}")
        for name, p in model.named_parameters():
            ref = ref_grads[name]
            grad_err = max(grad_err, ((p.grad * train.grad_accum - ref).norm() / ref.norm().clamp_min(1e-30)).item())
        for stage, dx, dc in zip(model.stages, dxs, staged.boundary_grads, strict=False):
            expected = subspace.encode_grad(dx, stage.basis)
            dc = dc[:, : dx.shape[1]] * train.grad_accum  # the engine scaled the loss by 1/grad_accum (2^-30)
            bgrad_err = max(bgrad_err, ((dc - expected).norm() / expected.norm().clamp_min(1e-30)).item())
    return {"recon": recon, "recon_sent": recon_sent, "grad": grad_err, "boundary_grad": bgrad_err}


def dense_control(cfg, batch: torch.Tensor) -> float:
    """Reconstruction error if a dense model's boundary were sent through the same U (should be ~1)."""
    dense_cfg = load_config(None, model={**cfg.to_dict()["model"], "subspace_rank": None, "fixed_table": True},
                            pipeline=cfg.to_dict()["pipeline"])
    torch.manual_seed(0)
    dense = LanguageModel(dense_cfg.model, dense_cfg.pipeline)
    ids = batch[:, :-1]
    with torch.no_grad():
        # Dense writers put x − T_fixed anywhere in R^d, so k of d coordinates cannot carry it.
        x = dense.stages[0].run_blocks(dense.stages[0].embed(ids))
    shared = LanguageModel(cfg.model, cfg.pipeline).stages[0]
    back = subspace.decode(subspace.encode(x, ids, shared.basis, shared.table), ids, shared.basis, shared.table)
    return per_token_rel(back - x, x - shared.table[ids])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short training, few batches (about a minute)")
    parser.add_argument("--stages", type=int, nargs="+", help="stage counts to check (default 4, or 4 8)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    stage_counts = args.stages or ([4] if args.quick else [4, 8])
    train_steps, n_batches = (30, 2) if args.quick else (200, 8)

    t0 = time.time()
    rows = []
    for num_stages in stage_counts:
        print(f"training tiny with {num_stages} stages for {train_steps} steps ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config("local/tiny", [
                f"pipeline.num_stages={num_stages}", f"train.steps={train_steps}", "train.eval_every=0",
                "train.log_every=1000", f"train.checkpoint_dir='{tmp}'", "train.resume=false",
                "train.warmup_steps=5", "data.max_bytes=4000000",
            ])
            result = train_local(cfg)
        model = result.model.float()
        corpus = load_corpus(cfg.data)
        batches = validation_batches(corpus.val, cfg.train.seq_len, 8, n_batches)
        errors = measure(model, batches, dataclasses.replace(cfg.train, grad_accum=1 << 30))
        tokens = batches[0].shape[0] * cfg.train.seq_len
        k, d = cfg.model.subspace_rank, cfg.model.d_model
        dense_bytes = tokens * d * 2
        coeff_bytes = subspace.boundary_bytes(tokens, k, 2, cfg.model.vocab_size)
        rows.append({
            "stages": num_stages, "boundaries": num_stages - 1, "d": d, "k": k, "train_steps": train_steps,
            "compression_ratio": dense_bytes / coeff_bytes,
            "bytes_per_token_dense_bf16": d * 2,
            "bytes_per_token_subspace": k * 2 + subspace.id_bytes(cfg.model.vocab_size),
            "max_rel_reconstruction_error": errors["recon"],
            "max_rel_reconstruction_error_sent_part": errors["recon_sent"],
            "max_rel_grad_error": errors["grad"],
            "max_rel_boundary_grad_error": errors["boundary_grad"],
            "control_dense_model_reconstruction_error": dense_control(cfg, batches[0]),
        })
        print(json.dumps(rows[-1]), file=sys.stderr)
    summary = {
        "bench": "subspace",
        "preset": "tiny",
        "compression_ratio": min(r["compression_ratio"] for r in rows),
        "max_rel_reconstruction_error": max(r["max_rel_reconstruction_error"] for r in rows),
        "max_rel_reconstruction_error_sent_part": max(r["max_rel_reconstruction_error_sent_part"] for r in rows),
        "max_rel_grad_error": max(r["max_rel_grad_error"] for r in rows),
        "max_rel_boundary_grad_error": max(r["max_rel_boundary_grad_error"] for r in rows),
        "targets": {"compression_ratio": ">= 30", "max_rel_reconstruction_error": "<= 1e-5",
                    "max_rel_grad_error": "<= 1e-4"},
        "rows": rows,
        "quick": args.quick,
        "seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
