"""One-process training: every stage in one place, the loop a swarm wraps (``node train-local``).

The step is plain: draw ``grad_accum`` microbatches (a pure function of the step, so resuming is
exact), accumulate gradients, clip, AdamW with linear warm-up and cosine decay. Validation runs on a
fixed set of held-out windows; checkpoints are atomic and hold params, optimizer state and the step
(the data position follows from it).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from node.checkpoint import CheckpointError, list_checkpoints, load_latest, save_checkpoint
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
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - 1 - t.warmup_steps))
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


# Fields that decide which tokens step N reads: a resume that changed them would silently train on other data.
_DATA_FIELDS = ("batch_size", "seq_len", "grad_accum")


def _restore(state: dict, cfg: RunConfig, model: LanguageModel, opt: torch.optim.Optimizer,
             corpus_fingerprint: str) -> None:
    saved, now = state.get("config", {}), cfg.to_dict()
    where = f"the checkpoint in {cfg.train.checkpoint_dir}"
    advice = "use another train.checkpoint_dir to start a new run"
    for section in ("model", "pipeline", "data"):
        if saved.get(section) != now[section]:
            raise CheckpointError(f"{where} was made with a different [{section}] config "
                                  f"({saved.get(section)} vs {now[section]}); {advice}")
    for name in _DATA_FIELDS:
        if saved.get("train", {}).get(name) != now["train"][name]:
            raise CheckpointError(f"{where} was made with train.{name}={saved.get('train', {}).get(name)!r}, "
                                  f"now {now['train'][name]!r}: resuming would read other data; {advice}")
    if state.get("corpus_fingerprint") != corpus_fingerprint:
        raise CheckpointError(f"{where} was trained on corpus {state.get('corpus_fingerprint')}, this one is "
                              f"{corpus_fingerprint} (another Python's stdlib, or changed files); {advice}")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])


class _StopAtStepBoundary:
    """SIGINT sets a flag the loop checks between steps, so a checkpoint never holds half an update.

    A second SIGINT interrupts at once. Outside the main thread signals cannot be caught: no-op there.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("interrupt: stopping after this step (press Ctrl-C again to stop at once)")

    def __enter__(self) -> _StopAtStepBoundary:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _train_step(model: LanguageModel, opt: torch.optim.Optimizer, sampler: BatchSampler, step: int,
                cfg: RunConfig, device: torch.device) -> float:
    """One optimizer step over ``grad_accum`` microbatches; returns the mean microbatch loss."""
    t = cfg.train
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    loss_sum = 0.0
    for micro in range(t.grad_accum):
        batch = sampler.batch(step * t.grad_accum + micro).to(device)
        with autocast(device):
            loss = model(batch[:, :-1], batch[:, 1:])
        (loss / t.grad_accum).backward()
        loss_sum += loss.item()
    train_loss = loss_sum / t.grad_accum
    if not math.isfinite(train_loss):
        opt.zero_grad(set_to_none=True)
        raise FloatingPointError(f"training loss became {train_loss} at step {step + 1}; that update was not applied")
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return train_loss


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
    if not t.resume and list_checkpoints(t.checkpoint_dir):
        raise CheckpointError(f"train.checkpoint_dir={t.checkpoint_dir!r} already holds checkpoints and "
                              "train.resume=false: choose an empty directory, or delete them to start over")
    state = load_latest(t.checkpoint_dir, map_location=device) if t.resume else None
    if state is not None:
        _restore(state, cfg, model, opt, corpus.fingerprint)
        start = result.resumed_from = state["step"]
        result.train_losses, result.val_losses = list(state["train_losses"]), list(state["val_losses"])
        logger.info("resumed from %s at step %d", t.checkpoint_dir, start)
        if start >= t.steps:
            logger.warning("the checkpoint already reached train.steps=%d: nothing to train; pass a larger "
                           "--steps to continue, or another train.checkpoint_dir to start over", t.steps)
    logger.info(
        "model %s: %.2fM trainable params, %d stages %s, subspace k=%s, device %s",
        cfg.model.name, model.num_parameters() / 1e6, cfg.pipeline.num_stages,
        [f"{r.start}-{r.stop - 1}" for r in cfg.pipeline.stage_ranges(cfg.model.n_layers)],
        cfg.model.subspace_rank, device,
    )

    if cfg.model.subspace_rank and cfg.pipeline.num_stages == 1:
        logger.warning("one stage: there are no boundaries, so every block is dense and only the embedding "
                       "is k-wide; set pipeline.num_stages > 1 to train the constrained model")

    model.train()
    window_start, window_tokens = time.perf_counter(), 0
    run_start, completed, saved, at_boundary = time.perf_counter(), start, start, True
    with _StopAtStepBoundary() as stop:
        try:
            for step in range(start, t.steps):
                at_boundary = False
                train_loss = _train_step(model, opt, sampler, step, cfg, device)
                completed, at_boundary = step + 1, True
                result.train_losses.append((completed, train_loss))
                window_tokens += tokens_per_step
                if on_step is not None:
                    on_step(completed, train_loss)
                if completed % t.log_every == 0 or completed == t.steps:
                    elapsed = time.perf_counter() - window_start
                    logger.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", completed, t.steps, train_loss,
                                lr_at(step, cfg), window_tokens / max(elapsed, 1e-9))
                    window_start, window_tokens = time.perf_counter(), 0
                if (t.eval_every and completed % t.eval_every == 0) or completed == t.steps:
                    result.val_losses.append((completed, evaluate(model, val_batches, device)))
                    logger.info("step %d val_loss %.4f", completed, result.val_losses[-1][1])
                if (t.checkpoint_every and completed % t.checkpoint_every == 0) or completed == t.steps:
                    state = _checkpoint_state(cfg, model, opt, completed, result, corpus.fingerprint)
                    save_checkpoint(t.checkpoint_dir, completed, state, keep=t.checkpoint_keep)
                    saved = completed
                if stop.requested:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if at_boundary and completed > saved:
                save_checkpoint(t.checkpoint_dir, completed,
                                _checkpoint_state(cfg, model, opt, completed, result, corpus.fingerprint),
                                keep=t.checkpoint_keep)
                logger.warning("interrupted: checkpoint of step %d saved in %s", completed, t.checkpoint_dir)
            elif not at_boundary:
                logger.warning("stopped mid-step: not saving a half-applied update; newest checkpoint is step %d",
                               saved)
            raise
    run_time = time.perf_counter() - run_start
    result.steps = t.steps
    result.tokens = max(0, t.steps - start) * tokens_per_step
    result.tokens_per_s = result.tokens / max(run_time, 1e-9)
    if result.val_losses and result.val_losses[-1][0] == t.steps:
        result.final_val_loss = result.val_losses[-1][1]
    else:
        result.final_val_loss = evaluate(model, val_batches, device)
    return result
