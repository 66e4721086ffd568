"""One-process training: every stage in one place, the loop a swarm wraps (``node train-local``).

The step is plain: draw ``grad_accum`` microbatches (a pure function of the step, so resuming is
exact), accumulate gradients, clip, AdamW with linear warm-up and cosine decay. Validation runs on a
fixed set of held-out windows; checkpoints are atomic and hold params, optimizer state and the step
(the data position follows from it).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from node.checkpoint import CheckpointError, load_latest, save_checkpoint
from node.config import ConfigError, RunConfig
from node.data import BatchSampler, load_corpus, validation_batches
from node.device import autocast, resolve_device
from node.model import LanguageModel, parameter_groups

logger = logging.getLogger(__name__)


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warm-up to ``train.lr`` then cosine decay to ``lr·min_lr_ratio`` at ``train.steps``."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainResult:
    steps: int
    tokens: int
    final_val_loss: float
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_s: float = 0.0
    resumed_from: int | None = None
    model: LanguageModel | None = field(default=None, repr=False)


@torch.no_grad()
def evaluate(model: LanguageModel, batches: list[torch.Tensor], device: torch.device) -> float:
    was_training = model.training
    model.eval()
    losses = []
    for batch in batches:
        batch = batch.to(device)
        with autocast(device):
            losses.append(model(batch[:, :-1], batch[:, 1:]).item())
    model.train(was_training)
    return sum(losses) / len(losses)


def _checkpoint_state(cfg: RunConfig, model: LanguageModel, opt: torch.optim.Optimizer, step: int,
                      result: TrainResult, corpus_fingerprint: str) -> dict:
    return {
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "config": cfg.to_dict(),
        "corpus_fingerprint": corpus_fingerprint,
        "train_losses": result.train_losses,
        "val_losses": result.val_losses,
    }


def _restore(state: dict, cfg: RunConfig, model: LanguageModel, opt: torch.optim.Optimizer, directory: str) -> None:
    saved = state.get("config", {})
    for section in ("model", "pipeline"):
        if saved.get(section) != cfg.to_dict()[section]:
            raise CheckpointError(
                f"checkpoint in {directory} was made with a different [{section}] config "
                f"({saved.get(section)} vs {cfg.to_dict()[section]}); use another train.checkpoint_dir "
                "or train.resume=false"
            )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])


def train_local(cfg: RunConfig, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train ``cfg`` in this process; returns losses and throughput. ``on_step(step, loss)`` per step."""
    t = cfg.train
    cfg.data.check_paths()
    device = resolve_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    corpus = load_corpus(cfg.data)
    if corpus.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"data tokenizer has {corpus.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}"
        )
    logger.info("corpus: %s (fingerprint %s)", corpus.description, corpus.fingerprint)

    torch.manual_seed(t.seed)
    model = LanguageModel(cfg.model, cfg.pipeline).to(device)
    opt = torch.optim.AdamW(parameter_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2))
    sampler = BatchSampler.from_config(corpus.train, t.seq_len, t.batch_size, cfg.data)
    val_batches = validation_batches(corpus.val, t.seq_len, t.batch_size, t.eval_batches)
    result = TrainResult(steps=0, tokens=0, final_val_loss=float("nan"), model=model)
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum

    start = 0
    state = load_latest(t.checkpoint_dir, map_location=device) if t.resume else None
    if state is not None:
        _restore(state, cfg, model, opt, t.checkpoint_dir)
        start = result.resumed_from = state["step"]
        result.train_losses, result.val_losses = list(state["train_losses"]), list(state["val_losses"])
        logger.info("resumed from %s at step %d", t.checkpoint_dir, start)
    logger.info(
        "model %s: %.2fM trainable params, %d stages %s, subspace k=%s, device %s",
        cfg.model.name, model.num_parameters() / 1e6, cfg.pipeline.num_stages,
        [f"{r.start}-{r.stop - 1}" for r in cfg.pipeline.stage_ranges(cfg.model.n_layers)],
        cfg.model.subspace_rank, device,
    )

    model.train()
    window_start, window_tokens = time.perf_counter(), 0
    run_start, completed = time.perf_counter(), start
    try:
        for step in range(start, t.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss_sum = 0.0
            for micro in range(t.grad_accum):
                batch = sampler.batch(step * t.grad_accum + micro).to(device)
                with autocast(device):
                    loss = model(batch[:, :-1], batch[:, 1:])
                (loss / t.grad_accum).backward()
                loss_sum += loss.item()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            completed = step + 1
            opt.zero_grad(set_to_none=True)
            train_loss = loss_sum / t.grad_accum
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"training loss became {train_loss} at step {step + 1}")
            result.train_losses.append((step + 1, train_loss))
            window_tokens += tokens_per_step
            if on_step is not None:
                on_step(step + 1, train_loss)
            done = completed
            if done % t.log_every == 0 or done == t.steps:
                elapsed = time.perf_counter() - window_start
                logger.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", done, t.steps, train_loss,
                            lr_at(step, cfg), window_tokens / max(elapsed, 1e-9))
                window_start, window_tokens = time.perf_counter(), 0
            if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
                val = evaluate(model, val_batches, device)
                result.val_losses.append((done, val))
                logger.info("step %d val_loss %.4f", done, val)
            if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.steps:
                save_checkpoint(t.checkpoint_dir, done, _checkpoint_state(cfg, model, opt, done, result, corpus.fingerprint))
    except KeyboardInterrupt:
        # Keep the work done so far: the interrupted step was never applied, so save the last whole one.
        if completed > start:
            state = _checkpoint_state(cfg, model, opt, completed, result, corpus.fingerprint)
            save_checkpoint(t.checkpoint_dir, completed, state)
            logger.warning("interrupted: checkpoint of step %d saved in %s", completed, t.checkpoint_dir)
        raise
    run_time = time.perf_counter() - run_start
    result.steps = t.steps
    result.tokens = (t.steps - start) * tokens_per_step
    result.tokens_per_s = result.tokens / max(run_time, 1e-9)
    if result.val_losses and result.val_losses[-1][0] == t.steps:
        result.final_val_loss = result.val_losses[-1][1]
    else:
        result.final_val_loss = evaluate(model, val_batches, device)
    return result
