"""One stage's compute in the swarm pipeline: forward, backward and inner optimizer steps.

:class:`PipelineCompute` runs every torch operation of a stage on one worker thread, fed by a
priority queue: backward jobs go before forward jobs (a finished backward frees a stash and
completes a microbatch; a forward only adds work), optimizer steps run inside the backward job
that completes the ``train.grad_accum``-th microbatch. One thread per stage keeps torch at one
intra-op thread (the swarm tests run several nodes per core) and makes every parameter update
ordered with respect to every forward and backward, so no lock is needed around the module.

Backward modes (``dataplane.backward``):

- ``recompute`` (default): the forward runs without autograd and the stage keeps only its input
  (token ids plus k coefficients a token); the backward reruns the forward with autograd. Memory per
  in-flight microbatch is the input alone, and a gradient is always taken at the current weights.
- ``stash``: the forward keeps its autograd graph (every layer's activations), so the backward does
  not recompute. A graph taken before an optimizer step cannot be backpropagated after it (the
  step changed the saved weights in place), so such microbatches fall back to recomputing.

``bench/backward.py`` measures both; docs/pipeline.md records the choice.

The last stage fuses forward and backward into one job: it has the targets (the shifted ids), so
nothing has to wait. Its loss is over positions 0..n-2 predicting ids 1..n-1 of the window it was
sent, which is exactly ``train-local``'s loss on the same window.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from node.config import ConfigError, RunConfig
from node.model import Stage, lm_loss
from node.serving import StageWork
from node.train_local import lr_at
from protocol.subspace import basis_fingerprint

logger = logging.getLogger(__name__)

BACKWARD, FORWARD = 0, 1  # queue priorities: lower runs first


class UnknownMicrobatch(KeyError):
    """A backward for a microbatch this stage holds no stash of (never seen, dropped, or done)."""


@dataclass
class _Stash:
    ids: torch.Tensor
    boundary_in: torch.Tensor | None  # detached input (None on the first stage)
    leaf: torch.Tensor | None = None  # stash mode: the input leaf of the kept graph
    output: torch.Tensor | None = None  # stash mode: the forward output with its graph
    version: int = 0  # optimizer steps taken when the forward ran
    created: float = 0.0  # time.monotonic() of the forward


class PipelineCompute:
    """Forward/backward/step of one stage, on one worker thread. Awaitable from any event loop."""

    def __init__(
        self,
        work: StageWork,
        cfg: RunConfig,
        *,
        on_step: Callable[[int], None] | None = None,
        on_phase: Callable[[str, float], None] | None = None,
    ) -> None:
        if not isinstance(work.module, Stage):
            raise ValueError("PipelineCompute needs a pipeline stage (pipeline.num_stages > 1)")
        self.work, self.cfg = work, cfg
        self.module: Stage = work.module
        self.stage, self.num_stages = work.stage, cfg.pipeline.num_stages
        self.is_first, self.is_last = self.module.is_first, self.module.is_last
        self.width = self.module.boundary_width  # numbers per token on this stage's boundaries
        basis, table = self.module.basis, self.module.table
        self.basis = basis_fingerprint(*(t for t in (basis, table) if t is not None)) if basis is not None else ""
        self.mode = cfg.dataplane.backward
        self.loss_scale = 1.0 / cfg.train.grad_accum
        self.on_step, self.on_phase = on_step, on_phase
        self.version = 0  # optimizer steps taken by this compute (stash validity)
        self.accumulated = 0  # microbatches in the current accumulation
        self.recomputed = 0  # stash-mode backwards that had to recompute (stale graph)
        self._stash: dict[Hashable, _Stash] = {}
        self._stash_lock = threading.Lock()
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._queued = 0
        self._count_lock = threading.Lock()
        self._closed = False
        self.module.train()
        self._thread = threading.Thread(target=self._work, name=f"stage{self.stage}-compute", daemon=True)
        self._thread.start()

    # queue ---------------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Jobs waiting or running."""
        return self._queued

    @property
    def in_flight(self) -> int:
        """Microbatches whose forward ran here and whose backward has not (yet)."""
        return len(self._stash)

    def _work(self) -> None:
        while True:
            _, _, fn, future, loop, undo = self._jobs.get()
            if fn is None:
                return
            if future.cancelled():  # the requester gave up (deadline) before the job started: skip it
                with self._count_lock:
                    self._queued -= 1
                continue
            try:
                # The stage's lock across the whole job: a state download or resync (another thread)
                # must not copy new weights in between a forward and its backward.
                with self.work.lock:
                    result, error = fn(), None
            except BaseException as exc:  # handed to the awaiting coroutine, never lost
                result, error = None, exc
            finally:
                with self._count_lock:
                    self._queued -= 1
            try:
                loop.call_soon_threadsafe(_resolve, future, result, error, undo)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    async def _submit(self, priority: int, fn: Callable[[], object], undo: Callable[[], object] | None = None):
        """Run ``fn`` on the worker; ``undo`` runs (on the loop) if the awaiter was cancelled meanwhile."""
        if self._closed:
            raise RuntimeError(f"stage {self.stage} compute is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._count_lock:
            self._queued += 1
        self._jobs.put((priority, next(self._order), fn, future, loop, undo))
        return await future

    def close(self, wait_s: float = 0.0) -> bool:
        """Stop the worker after its current job; queued jobs are abandoned (their awaiters are
        cancelled with the loop, or time out). ``wait_s`` > 0 waits for the thread: a process must not
        exit while torch runs on it. Returns False if the thread was still busy after ``wait_s``."""
        if not self._closed:
            self._closed = True
            self._jobs.put((-1, -1, None, None, None, None))  # ahead of every queued job
        if wait_s > 0:
            self._thread.join(wait_s)
        return not self._thread.is_alive()

    # jobs ----------------------------------------------------------------------------------------------

    async def forward(self, key: Hashable, ids: torch.Tensor, boundary_in: torch.Tensor | None) -> torch.Tensor:
        """Run the stage on one microbatch and keep what its backward needs; returns the output boundary."""
        if self.is_last:
            raise ValueError("the last stage runs forward_backward_last")
        return await self._submit(FORWARD, lambda: self._forward(key, ids, boundary_in), lambda: self.drop(key))

    async def backward(self, key: Hashable, grad_out: torch.Tensor) -> torch.Tensor | None:
        """Backpropagate ``grad_out`` (∂L/∂ output boundary); returns ∂L/∂ input boundary (None on stage 0)."""
        return await self._submit(BACKWARD, lambda: self._backward(key, grad_out))

    async def forward_backward_last(self, ids: torch.Tensor, boundary_in: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Last stage: loss of the microbatch and ∂L/∂ input boundary, gradients accumulated."""
        if not self.is_last:
            raise ValueError("only the last stage computes the loss")
        return await self._submit(BACKWARD, lambda: self._last(ids, boundary_in))

    def drop(self, key: Hashable) -> bool:
        """Forget a microbatch's stash (its downstream failed or timed out); True when there was one."""
        with self._stash_lock:
            return self._stash.pop(key, None) is not None

    def sweep(self, max_age_s: float) -> int:
        """Drop stashes older than ``max_age_s`` (their requester is gone); returns how many."""
        cutoff = time.monotonic() - max_age_s
        with self._stash_lock:
            old = [key for key, stash in self._stash.items() if stash.created < cutoff]
            for key in old:
                del self._stash[key]
        return len(old)

    def _timed(self, phase: str, start: float) -> None:
        if self.on_phase is not None:
            self.on_phase(phase, time.perf_counter() - start)

    def _forward(self, key: Hashable, ids: torch.Tensor, boundary_in: torch.Tensor | None) -> torch.Tensor:
        start = time.perf_counter()
        with self._stash_lock:
            if key in self._stash:
                raise ValueError(f"microbatch {key!r} is already in flight on stage {self.stage}")
        stash = _Stash(ids=ids, boundary_in=None if boundary_in is None else boundary_in.detach(),
                       version=self.version, created=time.monotonic())
        if self.mode == "stash":
            leaf = None if boundary_in is None else boundary_in.detach().float().requires_grad_(True)
            output = self.module(leaf, ids)
            stash.leaf, stash.output = leaf, output
            result = output.detach()
        else:
            with torch.no_grad():
                result = self.module(None if boundary_in is None else boundary_in.float(), ids)
        with self._stash_lock:
            self._stash[key] = stash
        self._timed("forward", start)
        return result

    def _backward(self, key: Hashable, grad_out: torch.Tensor) -> torch.Tensor | None:
        start = time.perf_counter()
        with self._stash_lock:
            stash = self._stash.pop(key, None)
        if stash is None:
            raise UnknownMicrobatch(key)
        output, leaf = stash.output, stash.leaf
        if output is None or stash.version != self.version:
            if output is not None:
                self.recomputed += 1
            leaf = None if stash.boundary_in is None else stash.boundary_in.float().requires_grad_(True)
            output = self.module(leaf, stash.ids)
        if tuple(grad_out.shape) != tuple(output.shape):
            raise ValueError(f"gradient shape {list(grad_out.shape)} does not match the output {list(output.shape)}")
        output.backward(grad_out.to(output.dtype))
        self._accumulated_one()
        self._timed("backward", start)
        return None if leaf is None else leaf.grad

    def _last(self, ids: torch.Tensor, boundary_in: torch.Tensor) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        leaf = boundary_in.detach().float().requires_grad_(True)
        logits = self.module(leaf, ids)
        loss = lm_loss(logits[:, :-1], ids[:, 1:])
        value = loss.item()
        if not math.isfinite(value):  # never let a diverged microbatch into the accumulated gradients
            raise FloatingPointError(f"stage {self.stage}: loss is {value}")
        (loss * self.loss_scale).backward()
        self._accumulated_one()
        self._timed("backward", start)
        return value, leaf.grad

    def _accumulated_one(self) -> None:
        self.accumulated += 1
        if self.accumulated >= self.cfg.train.grad_accum:
            self._step()

    def _step(self) -> None:
        start = time.perf_counter()
        work, t = self.work, self.cfg.train
        params = [p for p in self.module.parameters() if p.grad is not None]
        finite = all(bool(torch.isfinite(p.grad).all()) for p in params)
        with work.lock:
            if finite:
                for group in work.optimizer.param_groups:
                    group["lr"] = lr_at(work.progress, self.cfg)
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                work.optimizer.step()
                work.progress += 1
            work.optimizer.zero_grad(set_to_none=True)
        self.accumulated = 0
        self.version += 1
        if not finite:
            logger.warning("stage %d: non-finite gradients; that update was skipped", self.stage)
        elif self.on_step is not None:
            try:
                self.on_step(work.progress)
            except Exception:  # a metrics or logging hook must never fail a microbatch
                logger.exception("stage %d: on_step hook failed", self.stage)
        self._timed("step", start)


def _resolve(future: asyncio.Future, result: object, error: BaseException | None, undo) -> None:
    if future.cancelled():  # the awaiter gave up while the job ran: take back what it left behind
        if undo is not None and error is None:
            undo()
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class PipelineRole:
    """What a daemon with ``pipeline.num_stages > 1`` does besides the DHT: serve and drive its stage.

    Owns the :class:`swarm.pipeline.DataPlane` (on the daemon's P2P event loop) and the
    :class:`PipelineCompute` of the stage the node serves; a stage-0 node also drives microbatches
    from its own data shard. The daemon calls :meth:`setup` on the loop, then :meth:`serve`,
    :meth:`observe` and :meth:`stop` from its own threads.
    """

    def __init__(self, cfg: RunConfig, metrics, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg, self.metrics, self.loop = cfg, metrics, loop
        self.step_hooks: list[Callable[[], None]] = []  # after each optimizer step, in the compute thread
        self.plane = None
        self.compute: PipelineCompute | None = None
        self._sampler = None
        self._drawn = 0

    async def setup(self, p2p, peer_id: str, run_id: str) -> None:
        from swarm.pipeline import DataPlane, DataplaneSettings

        cfg, d = self.cfg, self.cfg.dataplane
        if cfg.train.seq_len + 1 > cfg.model.max_seq_len:
            raise ConfigError(f"pipeline microbatches carry train.seq_len+1={cfg.train.seq_len + 1} tokens (the "
                              f"last stage needs the next token), over model.max_seq_len={cfg.model.max_seq_len}")
        settings = DataplaneSettings(
            max_inflight=d.max_inflight, max_queue=d.max_queue, max_stash=d.max_stash,
            microbatch_timeout_s=d.microbatch_timeout_s, max_retries=d.max_retries, ban_base_s=d.ban_base_s,
            ban_max_s=d.ban_max_s, peer_strikes=d.peer_strikes, activation_codec=cfg.wire.activation_codec,
            gradient_codec=cfg.wire.gradient_codec, dense_width=cfg.model.d_model, max_seq_len=cfg.model.max_seq_len,
            outlier_ratio=d.outlier_ratio,
        )
        self.plane = DataPlane(p2p, peer_id, run_id, settings, cfg.wire.limits(cfg.model.vocab_size), self.metrics)
        await self.plane.register()
        self.metrics.pipeline_queue_depth.set_function(lambda: self.compute.queue_depth if self.compute else 0)
        self.metrics.pipeline_stash.set_function(lambda: self.compute.in_flight if self.compute else 0)
        self.loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Free stashes whose requester is long gone (a safety net: requests free their own)."""
        while True:
            await asyncio.sleep(5.0)
            if self.compute is not None:
                dropped = self.compute.sweep(2 * self.cfg.dataplane.microbatch_timeout_s)
                if dropped:
                    logger.warning("freed %d stale microbatch stash(es) on stage %d", dropped, self.compute.stage)

    def serve(self, work: StageWork) -> None:
        """Serve ``work``'s stage from now on (called on every stage change)."""
        old = self.compute
        self.compute = PipelineCompute(work, self.cfg, on_phase=self.metrics.pipeline_compute, on_step=self._on_step)
        self._call(self._attach, self.compute)
        if old is not None:
            old.close()

    def _on_step(self, step: int) -> None:
        """After each optimizer step (compute thread): the hooks, the metric, and a progress line now and then."""
        for hook in self.step_hooks:
            hook()
        self.metrics.train_step.set(step)
        if step % self.cfg.train.log_every or self.plane is None or self.compute is None:
            return
        stats, compute = self.plane.stats, self.compute
        line = f"stage {compute.stage} step {step}"
        if compute.is_first:
            line += (f": microbatches ok {int(stats['microbatches_ok'])}, dropped {int(stats['microbatches_dropped'])}, "
                     f"retried {int(stats['microbatches_retried'])}")
        else:
            line += f": served {int(stats['served'])}, refused {int(stats['refused'])}"
        recent = [loss for _, loss in list(self.plane.losses)[-20:]]
        if recent:
            line += f", loss {sum(recent) / len(recent):.4f} (mean of the last {len(recent)})"
        sent = stats["bytes_forward_sent"] + stats["bytes_backward_sent"]
        if sent:
            line += f", wire {(stats['dense_forward_sent'] + stats['dense_backward_sent']) / sent:.1f}× vs dense bf16"
        logger.info(line)

    def _attach(self, compute: PipelineCompute) -> None:
        self.plane.stop_driver()
        self.plane.attach(compute)
        if compute.is_first:
            if self._sampler is None:
                from node.data import BatchSampler, load_corpus

                t = self.cfg.train
                corpus = load_corpus(self.cfg.data)
                self._sampler = BatchSampler.from_config(corpus.train, t.seq_len, t.batch_size, self.cfg.data)
                # The data position: a checkpoint's (windows drawn before it, even those whose step
                # never completed, are not drawn again), else where the progress puts it.
                self._drawn = max(compute.work.progress * t.grad_accum, compute.work.data_position or 0)
            self.plane.start_driver(self._next_batch)

    def _next_batch(self) -> torch.Tensor:
        batch = self._sampler.batch(self._drawn)
        self._drawn += 1
        if self.compute is not None:
            self.compute.work.data_position = self._drawn  # saved with the stage's checkpoints
        return batch

    def observe(self, records: dict, stage: int) -> None:
        """Route to the ONLINE replicas of the stage after ``stage`` (from this round's DHT records)."""
        if stage + 1 >= self.cfg.pipeline.num_stages:
            return
        replicas = [(r.peer_id, r.throughput) for r in records.get(stage + 1, []) if r.state == "online"]
        self._call(self.plane.set_next_replicas, replicas)

    def health(self) -> dict:
        for _ in range(3):  # read from the HTTP thread while the loop may be adding keys
            try:
                return self.plane.health() if self.plane else {}
            except RuntimeError:
                continue
        return {}

    def stop(self, wait_s: float = 10.0) -> None:
        """Stop driving and computing; waits (up to ``wait_s``) for the compute thread's current job."""
        if self.plane is not None:
            self._call(self.plane.stop_driver)
        if self.compute is not None and not self.compute.close(wait_s):
            logger.warning("stage %d: the compute thread is still busy after %.0f s", self.compute.stage, wait_s)

    def _call(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)
