"""One-process training: every stage in one place, on the engine a swarm runs (``node train-local``).

The model's stages run as a :class:`node.chain.StageChain`: one :class:`node.engine.StageEngine` each,
boundaries crossing through the subspace codec exactly as between peers, each stage taking its own
inner step (per-stage gradient clipping, as in the swarm). Microbatches are drawn in order from the
sampler (a pure function of the position, so resuming is exact), ``grad_accum`` of them per optimizer
step, with linear warm-up and cosine decay. Validation runs on a fixed set of held-out windows;
checkpoints are atomic and hold every stage's engine state, the step and the data position
(node/checkpoint.py).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from node.chain import StageChain
from node.checkpoint import (
    CheckpointError,
    checkpoint_state,
    list_checkpoints,
    load_latest,
    save_checkpoint,
    stage_state,
)
from node.config import ConfigError, RunConfig, TrainConfig
from node.data import BatchSampler, TokenCorpus, load_corpus, validation_batches
from node.device import resolve_device
from node.engine import lr_at as _lr_at
from node.model import LanguageModel, stage_layers

logger = logging.getLogger(__name__)


def lr_at(step: int, cfg: RunConfig | TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (node/engine.py ``lr_at``) for a run or train config."""
    return _lr_at(step, cfg.train if isinstance(cfg, RunConfig) else cfg)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    final_val_loss: float
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_s: float = 0.0
    resumed_from: int | None = None
    chain: StageChain | None = field(default=None, repr=False)

    @property
    def model(self) -> LanguageModel | None:
        """The trained stages as one module (the chain's own tensors, no copy)."""
        if self.chain is None:
            return None
        return LanguageModel(self.chain.engines[0].module.cfg, stages=self.chain.modules())


def evaluate(chain: StageChain, batches: list[torch.Tensor]) -> float:
    """Mean loss over held-out windows (``seq_len + 1`` tokens each), forward only."""
    modules = chain.modules()
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    losses = [chain.evaluate(batch) for batch in batches]
    for m, training in zip(modules, was_training, strict=True):
        m.train(training)
    return sum(losses) / len(losses)


def _checkpoint(cfg: RunConfig, chain: StageChain, step: int, position: int, result: TrainResult,
                corpus_fingerprint: str) -> dict:
    # The live tensors (no copy): train-local writes between steps, on the thread that takes them.
    return checkpoint_state(
        step, cfg.to_dict(), {e.stage: e.state(copy=False) for e in chain.engines}, data_position=position,
        corpus_fingerprint=corpus_fingerprint, train_losses=result.train_losses, val_losses=result.val_losses,
    )


_MAX_SKIPPED = 10  # non-finite updates in a row before train-local gives up

# Fields that decide which tokens step N reads: a resume that changed them would silently train on other data.
_DATA_FIELDS = ("batch_size", "seq_len", "grad_accum")


def _restore(state: dict, cfg: RunConfig, chain: StageChain, corpus_fingerprint: str) -> None:
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
    for engine in chain.engines:
        engine.load_state(stage_state(state, engine.stage, where), strict_optimizer=True)


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


def _train_step(chain: StageChain, sampler: BatchSampler, position: int, grad_accum: int) -> float:
    """One optimizer step's worth of microbatches from ``position`` on; returns their mean loss (every
    engine steps on its own after the last one)."""
    losses = [chain.train_microbatch(sampler.batch(position + micro)).loss for micro in range(grad_accum)]
    return sum(losses) / grad_accum


def _prepare(cfg: RunConfig) -> tuple[torch.device, TokenCorpus]:
    """The run's device and corpus, after checking its data paths, applying ``train.threads`` and refusing
    a checkpoint directory that holds checkpoints when ``train.resume`` is off."""
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
    if not t.resume and list_checkpoints(t.checkpoint_dir):
        raise CheckpointError(f"train.checkpoint_dir={t.checkpoint_dir!r} already holds checkpoints and "
                              "train.resume=false: choose an empty directory, or delete them to start over")
    return device, corpus


@dataclass
class _Progress:
    """Where a train-local loop stands; an interrupt reads it to decide whether to checkpoint."""

    completed: int  # optimizer steps applied, this run's and any resumed from
    position: int  # the sampler's next microbatch
    saved: int  # the newest checkpointed step
    at_boundary: bool = True  # False while a step's microbatches are in flight
    trained_steps: int = 0  # steps this run applied


def _resume(cfg: RunConfig, chain: StageChain, corpus_fingerprint: str, result: TrainResult) -> _Progress:
    """The newest checkpoint of ``train.checkpoint_dir`` loaded into ``chain`` and ``result`` when
    ``train.resume``; otherwise the start of the run."""
    t = cfg.train
    state = load_latest(t.checkpoint_dir) if t.resume else None
    if state is None:
        return _Progress(completed=0, position=0, saved=0)
    _restore(state, cfg, chain, corpus_fingerprint)
    start = result.resumed_from = state["step"]
    position = int(state.get("data_position", start * t.grad_accum))
    result.train_losses, result.val_losses = list(state["train_losses"]), list(state["val_losses"])
    logger.info("resumed from %s at step %d", t.checkpoint_dir, start)
    if start >= t.steps:
        logger.warning("the checkpoint already reached train.steps=%d: nothing to train; pass a larger "
                       "--steps to continue, or another train.checkpoint_dir to start over", t.steps)
    return _Progress(completed=start, position=position, saved=start)


def _log_model(cfg: RunConfig, chain: StageChain, device: torch.device) -> None:
    params = sum(p.numel() for m in chain.modules() for p in m.parameters() if p.requires_grad)
    logger.info(
        "model %s: %.2fM trainable params, %d stages %s, subspace k=%s, device %s",
        cfg.model.name, params / 1e6, cfg.pipeline.num_stages,
        [f"{r.start}-{r.stop - 1}" for r in stage_layers(cfg.model, cfg.pipeline)], cfg.model.subspace_rank, device,
    )
    if cfg.model.subspace_rank and cfg.pipeline.num_stages == 1:
        logger.warning("one stage: there are no boundaries, so every block is dense and only the embedding "
                       "is k-wide; set pipeline.num_stages > 1 to train the constrained model")


def _save(cfg: RunConfig, chain: StageChain, progress: _Progress, result: TrainResult,
          corpus_fingerprint: str) -> None:
    """Checkpoint the step ``progress`` has completed."""
    t = cfg.train
    save_checkpoint(t.checkpoint_dir, progress.completed,
                    _checkpoint(cfg, chain, progress.completed, progress.position, result, corpus_fingerprint),
                    keep=t.checkpoint_keep)
    progress.saved = progress.completed


def _evaluate_and_save(cfg: RunConfig, chain: StageChain, val_batches: list[torch.Tensor], progress: _Progress,
                       result: TrainResult, corpus_fingerprint: str) -> None:
    """After a completed step: validation every ``train.eval_every`` steps, a checkpoint every
    ``train.checkpoint_every``, both at the last step."""
    t, completed = cfg.train, progress.completed
    if (t.eval_every and completed % t.eval_every == 0) or completed == t.steps:
        result.val_losses.append((completed, evaluate(chain, val_batches)))
        logger.info("step %d val_loss %.4f", completed, result.val_losses[-1][1])
    if (t.checkpoint_every and completed % t.checkpoint_every == 0) or completed == t.steps:
        _save(cfg, chain, progress, result, corpus_fingerprint)


def _train_loop(cfg: RunConfig, chain: StageChain, sampler: BatchSampler, val_batches: list[torch.Tensor],
                progress: _Progress, result: TrainResult, corpus_fingerprint: str,
                on_step: Callable[[int, float], None] | None) -> None:
    """Optimizer steps until ``train.steps``. On SIGINT (at a step boundary) or KeyboardInterrupt it
    checkpoints a completed step not yet saved, never a half-applied one, and re-raises."""
    t = cfg.train
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
    window_start, window_tokens = time.perf_counter(), 0
    skipped = 0
    with _StopAtStepBoundary() as stop:
        try:
            while progress.completed < t.steps:
                progress.at_boundary = False
                train_loss = _train_step(chain, sampler, progress.position, t.grad_accum)
                progress.position += t.grad_accum
                progress.at_boundary = True
                if chain.progress == progress.completed:  # the update was skipped (non-finite gradients): draw on
                    skipped += 1
                    if skipped >= _MAX_SKIPPED:
                        raise FloatingPointError(f"{skipped} updates in a row had non-finite gradients at step "
                                                 f"{progress.completed + 1}: training diverged")
                    continue
                progress.completed, skipped = chain.progress, 0
                completed = progress.completed
                progress.trained_steps += 1
                result.train_losses.append((completed, train_loss))
                window_tokens += tokens_per_step
                if on_step is not None:
                    on_step(completed, train_loss)
                if completed % t.log_every == 0 or completed == t.steps:
                    elapsed = time.perf_counter() - window_start
                    logger.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", completed, t.steps, train_loss,
                                lr_at(completed - 1, t), window_tokens / max(elapsed, 1e-9))
                    window_start, window_tokens = time.perf_counter(), 0
                _evaluate_and_save(cfg, chain, val_batches, progress, result, corpus_fingerprint)
                if stop.requested:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if progress.at_boundary and progress.completed > progress.saved:
                _save(cfg, chain, progress, result, corpus_fingerprint)
                logger.warning("interrupted: checkpoint of step %d saved in %s", progress.completed, t.checkpoint_dir)
            elif not progress.at_boundary:
                logger.warning("stopped mid-step: not saving a half-applied update; newest checkpoint is step %d",
                               progress.saved)
            raise


def train_local(cfg: RunConfig, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train ``cfg`` in this process; returns losses and throughput. ``on_step(step, loss)`` per step."""
    t = cfg.train
    device, corpus = _prepare(cfg)
    chain = StageChain.build(cfg, device, backward="stash", wire=cfg.train.wire_boundaries)  # nothing steps between a forward and its backward
    sampler = BatchSampler.from_config(corpus.train, t.seq_len, t.batch_size, cfg.data)
    val_batches = validation_batches(corpus.val, t.seq_len, t.batch_size, t.eval_batches)
    result = TrainResult(steps=0, tokens=0, final_val_loss=float("nan"), chain=chain)
    progress = _resume(cfg, chain, corpus.fingerprint, result)
    _log_model(cfg, chain, device)

    run_start = time.perf_counter()
    _train_loop(cfg, chain, sampler, val_batches, progress, result, corpus.fingerprint, on_step)
    run_time = time.perf_counter() - run_start
    result.steps = t.steps
    result.tokens = progress.trained_steps * t.batch_size * t.seq_len * t.grad_accum
    result.tokens_per_s = result.tokens / max(run_time, 1e-9)
    if result.val_losses and result.val_losses[-1][0] == t.steps:
        result.final_val_loss = result.val_losses[-1][1]
    else:
        result.final_val_loss = evaluate(chain, val_batches)
    return result
