"""Everything a node runs for the stage it serves, built and torn down as a unit.

A :class:`StageHost` owns one stage's :class:`node.stage_store.StageStore` (and through it the stage
engine), loads it (own checkpoint, else a peer's state, else the seeded init), attaches the node's
services to it (the pipeline data plane's compute, replica sync, the state server through
``NodeContext.current``), trains it itself when the stage is the whole model (S = 1), saves its
checkpoints, and lets go of all of it at :meth:`stop`. When the node changes stage the daemon stops
one host and opens another; nothing of the old stage survives in the new one.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from node.config import ConfigError, RunConfig
from node.context import NodeContext
from node.data import BatchSampler, load_corpus, validation_batches
from node.stage_download import StageDownloader, StageUnavailable  # noqa: F401 (raised by open)
from node.stage_store import StageStore
from protocol.messages import StageRecord

logger = logging.getLogger(__name__)


class StageHost:
    def __init__(self, ctx: NodeContext, store: StageStore, throughput: float) -> None:
        self.ctx, self.store, self.stage = ctx, store, store.stage
        self.throughput = throughput  # microbatches per second (measured; an EMA while training with S = 1)
        self.trainer = ReplicaTrainer(store, ctx.cfg, throughput)  # used with one stage only
        self.trainer.on_val_loss = ctx.metrics.pipeline_val_loss
        self.losses: collections.deque[list[float]] = collections.deque(maxlen=4096)  # (unix time, loss), S = 1
        self._trainer: threading.Thread | None = None
        self._stop_training = threading.Event()

    @classmethod
    def open(cls, ctx: NodeContext, stage: int, throughput: float, probe: StageStore | None = None,
             seen: Sequence[StageRecord] = (), confirm_vacant: bool = True) -> StageHost:
        """Host ``stage``: its store loaded (own checkpoint, else a peer's state, else the seeded init) and
        the node's services attached to it. ``probe``: a store of this stage still at its seeded init;
        ``seen``: the stage's records as the claim read them (their servers are tried if a new read misses);
        ``confirm_vacant``: a stage found vacant is read again before its seeded start (False: the founder).
        Raises ``StageUnavailable`` when peers serve the stage but its state could not be downloaded (the
        seeded init is only for a stage nobody serves; node/stage_download.py)."""
        store = probe if probe is not None and probe.stage == stage else StageStore.fresh(
            ctx.cfg, ctx.run_id, stage, ctx.checkpoint_dir(stage), ctx.device)
        downloads = StageDownloader(ctx)
        if store.resume():
            downloads.catch_up_resumed(store)
        else:
            downloads.load_from_swarm(store, seen, confirm_vacant)
        host = cls(ctx, store, throughput)
        services = ctx.services
        if services.sync is not None:
            services.sync.attach(store)
        if services.pipeline is not None:
            services.pipeline.step_hooks.append(host._periodic_checkpoint)  # after the outer step's hook
            services.pipeline.serve(store)
        ctx.metrics.set_stage(stage)  # counts stage changes
        ctx.metrics.num_stages.set(ctx.cfg.pipeline.num_stages)
        return host

    # ---------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start training the stage where this host does it itself (one stage: the whole model)."""
        if self.ctx.cfg.pipeline.num_stages == 1:
            self._trainer = threading.Thread(target=self._train, name="trainer", daemon=True)
            self._trainer.start()

    def stop(self, save: bool = True, wait_s: float = 10.0) -> None:
        """Stop training at a step boundary (waiting up to ``wait_s``) and write a checkpoint."""
        self._stop_training.set()
        if self._trainer is not None:
            self._trainer.join(wait_s)
        pipeline = self.ctx.services.pipeline
        if pipeline is not None and self._periodic_checkpoint in pipeline.step_hooks:
            pipeline.step_hooks.remove(self._periodic_checkpoint)
        if save:
            try:
                self.store.save_checkpoint()
            except Exception:  # a full disk: the last periodic checkpoint stays
                logger.exception("cannot write the checkpoint of stage %d", self.stage)

    def resync(self) -> None:
        """Fallen too many rounds behind: download the stage's state again, then rejoin the schedule."""
        sync, store = self.ctx.services.sync, self.store
        logger.warning("stage %d: fell behind the other replicas; downloading the stage's state again", self.stage)
        sync.stats["resyncs"] += 1
        progress = store.progress
        StageDownloader(self.ctx).download_into(store, prefer=sync.resync_from)
        with store.lock:  # the schedule's (and the data's) position never goes back
            store.progress = max(store.progress, progress)
        sync.attach(store)

    def _periodic_checkpoint(self) -> None:
        """A pipeline stage's step hook (compute thread): start a checkpoint when one is due."""
        self.store.maybe_checkpoint()

    # ---------------------------------------------------------------------------------------- S = 1

    def _train(self) -> None:
        halt = lambda: self.ctx.stop.is_set() or self._stop_training.is_set()  # noqa: E731
        try:
            self.trainer.run(halt, self._stepped)
        except Exception:
            logger.exception("local training failed; serving without training")

    def _stepped(self, step: int, loss: float) -> None:
        """After a local optimizer step: metrics, losses, replica sync, a progress line now and then."""
        ctx, t, trainer = self.ctx, self.ctx.cfg.train, self.trainer
        self.throughput = trainer.throughput
        ctx.metrics.record_train_step(step=step, loss=loss, tokens=trainer.tokens_per_step, seconds=trainer.last_step_s)
        self.losses.append([round(time.time(), 3), round(loss, 5)])
        if ctx.services.sync is not None:
            try:
                ctx.services.sync.after_step()
            except Exception:  # replica sync must never stop local training
                logger.exception("replica sync failed after step %d", step)
        if step % t.log_every == 0:
            logger.info("step %d loss %.4f (%.2f microbatches/s)", step, loss, self.throughput)

    # ---------------------------------------------------------------------------------------- status

    def recent_losses(self) -> list[list[float]]:
        """The losses this node scored lately: local steps (S = 1) or its last-stage microbatches."""
        pipeline = self.ctx.services.pipeline
        source = pipeline.plane.losses if pipeline is not None and pipeline.plane is not None else self.losses
        for _ in range(3):  # the deques grow on other threads
            try:
                return [list(x) for x in list(source)]
            except RuntimeError:
                continue
        return []

    def health(self) -> dict[str, Any]:
        """This stage's part of /health."""
        store, services = self.store, self.ctx.services
        out: dict[str, Any] = {"stage": self.stage, "progress": store.progress, "resumed_from": store.resumed_from,
                               "saved_step": store.saved_step, "throughput": self.throughput}
        if services.pipeline is not None:
            out["pipeline"] = services.pipeline.health()
        if services.sync is not None:
            out["outer"] = services.sync.health()
        if self.losses:
            trainer = self.trainer
            out["train"] = {"recent_losses": list(self.losses)[-512:], "started_at": trainer.started_at,
                            "compute_s": round(trainer.compute_s, 3), "tokens": trainer.tokens_trained,
                            "val_losses": [[round(t, 3), round(v, 5), tags] for t, v, tags in list(trainer.val_losses)]}
        return out

    def latest_val_loss(self) -> tuple[float, float] | None:
        """(wall time, loss) of this node's latest validation measurement (a pipeline's stage-0 driver, or a
        whole-model replica), or None."""
        pipeline = self.ctx.services.pipeline
        if pipeline is not None:
            return pipeline.latest_val_loss()
        measured = self.trainer.val_losses
        return measured[-1][:2] if measured else None


class ReplicaTrainer:
    """Local training of the whole model (one stage): ``train.grad_accum`` windows a step, drawn in order
    from this node's shard (the position is saved with the checkpoints), through the stage engine."""

    def __init__(self, store: StageStore, cfg: RunConfig, throughput: float = 0.0) -> None:
        self.store, self.cfg = store, cfg
        t = cfg.train
        self.tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
        self.throughput = throughput  # microbatches per second: an EMA of the steps taken
        self.compute_s = 0.0  # wall time inside training steps
        self.last_step_s = 0.0
        self.tokens_trained = 0  # tokens of the steps taken
        self.started_at: float | None = None  # unix time the first step began
        # (wall time, loss, [agreed-state tag]) of its validation measurements on the agreed weights
        self.val_losses: collections.deque[tuple[float, float, list[str]]] = collections.deque(maxlen=256)
        self._next_eval = 0.0  # monotonic time of the next measurement
        self.on_val_loss: Callable[[float], None] | None = None  # the metric

    def run(self, halt: Callable[[], bool], on_step: Callable[[int, float], None] | None = None) -> None:
        """Train until ``train.steps`` or ``halt()``; stops only at step boundaries. ``on_step(step, loss)``."""
        cfg, t, store = self.cfg, self.cfg.train, self.store
        corpus = load_corpus(cfg.data)
        sampler = BatchSampler.from_config(corpus.train, t.seq_len, t.batch_size, cfg.data)
        val = self._validation(corpus.val)
        if store.data_position is None:
            store.data_position = store.progress * t.grad_accum
        while not halt() and store.progress < t.steps:
            self._maybe_evaluate(val)
            start = time.perf_counter()
            self.started_at = self.started_at or time.time()
            with store.lock:
                before, losses = store.progress, []
                for _ in range(t.grad_accum):
                    losses.append(store.engine.forward_backward_last(sampler.batch(store.data_position), None)[0])
                    store.data_position += 1
            self.last_step_s = time.perf_counter() - start
            self.compute_s += self.last_step_s
            if store.progress == before:  # non-finite gradients: the engine skipped the update
                continue
            self.tokens_trained += self.tokens_per_step
            rate = t.grad_accum / max(self.last_step_s, 1e-9)
            self.throughput = rate if self.throughput == 0 else 0.9 * self.throughput + 0.1 * rate
            if on_step is not None:
                on_step(store.progress, sum(losses) / len(losses))
            store.maybe_checkpoint()
        if store.progress >= t.steps:
            logger.info("reached train.steps=%d; serving without training", t.steps)

    def _validation(self, tokens) -> list[torch.Tensor]:
        """The fixed validation microbatches (none when measuring is off or the split is too small: said once)."""
        t, every = self.cfg.train, self.cfg.dataplane.eval_every_s
        if every <= 0:
            return []
        try:
            return validation_batches(tokens, t.seq_len, t.batch_size, self.cfg.dataplane.eval_batches)
        except ConfigError as exc:
            logger.warning("no validation measurements: %s", exc)
            return []

    def _maybe_evaluate(self, batches: list[torch.Tensor]) -> None:
        """Every ``dataplane.eval_every_s``: the validation loss of the agreed weights (the outer loop's global
        copies; this replica's own without replica sync), as a pipeline's stage-0 driver measures it."""
        every = self.cfg.dataplane.eval_every_s
        if not batches or time.monotonic() < self._next_eval:
            return
        self._next_eval = time.monotonic() + every
        engine = self.store.engine
        with self.store.lock:
            tag = engine.outer.agreed_tag() if engine.outer is not None else ""
            losses = [float(engine.infer(batch, None, agreed=True)) for batch in batches]
        loss = sum(losses) / len(losses)  # equal windows: the token-weighted mean
        self.val_losses.append((time.time(), loss, [tag]))
        if self.on_val_loss is not None:
            self.on_val_loss(loss)
        logger.info("validation loss %.4f on the agreed weights (%d windows)", loss, sum(len(b) for b in batches))
