"""One stage's compute in the swarm pipeline: the stage engine on a worker thread, fed by the data plane.

:class:`PipelineCompute` runs every job of a stage's :class:`node.engine.StageEngine` on one worker
thread, fed by a priority queue: backward jobs go before forward jobs (a finished backward frees a
stash and completes a microbatch; a forward only adds work); the engine takes its optimizer step inside
the backward job that completes the ``train.grad_accum``-th microbatch. One thread per stage keeps
torch at one intra-op thread (the swarm tests run several nodes per core) and orders every parameter
update with respect to every forward and backward.

The engine keeps its tensors on its device; this wrapper hands the data plane host tensors (one copy
per boundary tensor, which the wire needs anyway) and gives the engine whatever arrived.

Backward modes (``dataplane.backward``), implemented by the engine:

- ``recompute`` (default): the forward runs without autograd and the stage keeps only its input (token
  ids plus k coefficients a token); the backward reruns the forward with autograd. Memory per in-flight
  microbatch is the input alone, and a gradient is always taken at the current weights.
- ``stash``: the forward keeps its autograd graph, so the backward does not recompute. A graph taken
  before an optimizer step cannot be backpropagated after it (the step changed the saved weights in
  place), so such microbatches fall back to recomputing.

``bench/backward.py`` measures both; docs/pipeline.md records the choice. The last stage fuses forward
and backward into one job: it has the targets (the shifted ids), so nothing has to wait.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable

import torch

from node.config import ConfigError, RunConfig
from node.engine import StageEngine, UnknownMicrobatch
from node.stage_store import StageStore
from protocol.subspace import basis_fingerprint

__all__ = ["PipelineCompute", "PipelineRole", "UnknownMicrobatch"]

logger = logging.getLogger(__name__)

BACKWARD, FORWARD = 0, 1  # queue priorities: lower runs first


class PipelineCompute:
    """The jobs of one stage engine, on one worker thread. Awaitable from any event loop."""

    def __init__(
        self,
        work: StageStore,
        cfg: RunConfig,
        *,
        on_step: Callable[[int], None] | None = None,
        on_phase: Callable[[str, float], None] | None = None,
    ) -> None:
        engine: StageEngine = work.engine
        if engine.num_stages < 2:
            raise ValueError("PipelineCompute needs a pipeline stage (pipeline.num_stages > 1)")
        self.work, self.cfg, self.engine = work, cfg, engine
        self.module = engine.module
        self.stage, self.num_stages = engine.stage, engine.num_stages
        self.is_first, self.is_last = engine.is_first, engine.is_last
        self.width = engine.boundary_width  # numbers per token on this stage's boundaries
        basis, table = self.module.basis, self.module.table
        self.basis = basis_fingerprint(*(t for t in (basis, table) if t is not None)) if basis is not None else ""
        self.on_phase = on_phase
        engine.on_step = on_step
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._queued = 0
        self._count_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"stage{self.stage}-compute", daemon=True)
        self._thread.start()

    @property
    def version(self) -> int:
        return self.engine.version

    @property
    def recomputed(self) -> int:
        return self.engine.recomputed

    # queue ---------------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Jobs waiting or running."""
        return self._queued

    @property
    def in_flight(self) -> int:
        """Microbatches whose forward ran here and whose backward has not (yet)."""
        return self.engine.in_flight

    def _work(self) -> None:
        while True:
            _, _, phase, fn, future, loop, undo = self._jobs.get()
            if fn is None:
                return
            if future.cancelled():  # the requester gave up (deadline) before the job started: skip it
                with self._count_lock:
                    self._queued -= 1
                continue
            start, steps = time.perf_counter(), self.engine.version
            try:
                # The stage's lock across the whole job: a state download or resync (another thread)
                # must not copy new weights in between a forward and its backward.
                with self.engine.lock:
                    result, error = fn(), None
            except BaseException as exc:  # handed to the awaiting coroutine, never lost
                result, error = None, exc
            finally:
                with self._count_lock:
                    self._queued -= 1
            self._timed(phase, time.perf_counter() - start, stepped=self.engine.version != steps)
            try:
                loop.call_soon_threadsafe(_resolve, future, result, error, undo)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _timed(self, phase: str, seconds: float, stepped: bool) -> None:
        if self.on_phase is None:
            return
        if stepped:  # the optimizer step ran inside this backward: report it on its own
            step_s = min(seconds, self.engine.last_step_s)
            self.on_phase("step", step_s)
            seconds -= step_s
        self.on_phase(phase, seconds)

    async def _submit(self, priority: int, phase: str, fn: Callable[[], object],
                      undo: Callable[[], object] | None = None):
        """Run ``fn`` on the worker; ``undo`` runs (on the loop) if the awaiter was cancelled meanwhile."""
        if self._closed:
            raise RuntimeError(f"stage {self.stage} compute is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._count_lock:
            self._queued += 1
        self._jobs.put((priority, next(self._order), phase, fn, future, loop, undo))
        return await future

    def close(self, wait_s: float = 0.0) -> bool:
        """Stop the worker after its current job; queued jobs are abandoned (their awaiters are
        cancelled with the loop, or time out). ``wait_s`` > 0 waits for the thread: a process must not
        exit while torch runs on it. Returns False if the thread was still busy after ``wait_s``."""
        if not self._closed:
            self._closed = True
            self._jobs.put((-1, -1, "", None, None, None, None))  # ahead of every queued job
        if wait_s > 0:
            self._thread.join(wait_s)
        return not self._thread.is_alive()

    # jobs ----------------------------------------------------------------------------------------------

    async def forward(self, key: Hashable, ids: torch.Tensor, boundary_in: torch.Tensor | None) -> torch.Tensor:
        """Run the stage on one microbatch and keep what its backward needs; returns the output boundary."""
        if self.is_last:
            raise ValueError("the last stage runs forward_backward_last")
        return await self._submit(FORWARD, "forward", lambda: _host(self.engine.forward(key, ids, boundary_in)),
                                  lambda: self.drop(key))

    async def backward(self, key: Hashable, grad_out: torch.Tensor) -> torch.Tensor | None:
        """Backpropagate ``grad_out`` (∂L/∂ output boundary); returns ∂L/∂ input boundary (None on stage 0)."""
        return await self._submit(BACKWARD, "backward", lambda: _host(self.engine.backward(key, grad_out)))

    async def forward_backward_last(self, ids: torch.Tensor, boundary_in: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Last stage: loss of the microbatch and ∂L/∂ input boundary, gradients accumulated."""
        if not self.is_last:
            raise ValueError("only the last stage computes the loss")

        def job() -> tuple[float, torch.Tensor]:
            loss, grad = self.engine.forward_backward_last(ids, boundary_in)
            return loss, _host(grad)

        return await self._submit(BACKWARD, "backward", job)

    async def evaluate(self, ids: torch.Tensor, boundary_in: torch.Tensor | None) -> tuple[torch.Tensor, str]:
        """An evaluation microbatch: forward only on the stage's agreed weights (the outer loop's global
        copies; the local ones without replica sync), nothing kept. The output boundary, or on the last
        stage the loss (a 0-d tensor), and the tag of the agreed state used ("" without replica sync)."""
        engine = self.engine

        def job() -> tuple[torch.Tensor, str]:
            tag = engine.outer.agreed_tag() if engine.outer is not None else ""
            return _host(engine.infer(ids, boundary_in, agreed=True)), tag

        return await self._submit(FORWARD, "forward", job)

    def drop(self, key: Hashable) -> bool:
        """Forget a microbatch's stash (its downstream failed or timed out); True when there was one."""
        return self.engine.drop(key)

    def sweep(self, max_age_s: float) -> int:
        """Drop stashes older than ``max_age_s`` (their requester is gone); returns how many."""
        return self.engine.sweep(max_age_s)


def _host(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A boundary tensor for the wire: on the CPU (one device-to-host copy; none on a CPU engine)."""
    return None if tensor is None else tensor.detach().to("cpu")


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

    Owns the :class:`swarm.dataplane.DataPlane` (on the daemon's P2P event loop) and the
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
        self._val_batches: list[torch.Tensor] = []
        self._drawn = 0

    async def setup(self, p2p, peer_id: str, run_id: str) -> None:
        from swarm.dataplane import DataPlane

        cfg = self.cfg
        if cfg.train.seq_len + 1 > cfg.model.max_seq_len:
            raise ConfigError(f"pipeline microbatches carry train.seq_len+1={cfg.train.seq_len + 1} tokens (the "
                              f"last stage needs the next token), over model.max_seq_len={cfg.model.max_seq_len}")
        self.plane = DataPlane(p2p, peer_id, run_id, cfg.dataplane, cfg.wire, d_model=cfg.model.d_model,
                               max_seq_len=cfg.model.max_seq_len, limits=cfg.wire.limits(cfg.model.vocab_size),
                               events=self.metrics)
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

    def serve(self, work: StageStore) -> None:
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
        self.metrics.stepped(step)
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
                from node.data import BatchSampler, load_corpus, validation_batches

                t = self.cfg.train
                corpus = load_corpus(self.cfg.data)
                self._sampler = BatchSampler.from_config(corpus.train, t.seq_len, t.batch_size, self.cfg.data)
                # The swarm's validation loss is measured on these fixed windows (dataplane.eval_*).
                try:
                    self._val_batches = validation_batches(corpus.val, t.seq_len, t.batch_size,
                                                           self.cfg.dataplane.eval_batches)
                except ConfigError as exc:  # a validation split too small for one window
                    logger.warning("no validation measurements: %s", exc)
                # The data position: a checkpoint's (windows drawn before it, even those whose step
                # never completed, are not drawn again), else where the progress puts it.
                self._drawn = max(compute.work.progress * t.grad_accum, compute.work.data_position or 0)
            self.plane.start_driver(self._next_batch, self._val_batches)

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

    def latest_val_loss(self) -> tuple[float, float] | None:
        """(wall time, loss) of this driver's latest validation measurement, or None."""
        losses = self.plane.val_losses if self.plane is not None else None
        return losses[-1][:2] if losses else None

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
