"""Stage 0's driver: keeps ``dataplane.max_inflight`` microbatches going through the pipeline.

Each microbatch gets ``dataplane.microbatch_timeout_s`` from its forward to its backward; one whose
hop fails (:class:`~swarm.dataplane.send.HopFailed`) is dropped and counted, its stash freed.

Every ``dataplane.eval_every_s`` it also measures the swarm's validation loss: the same fixed
validation microbatches, one after another, forward only through every stage on the agreed weights
(the evaluation handler); the token-weighted mean is one measurement, kept only when every microbatch
of it was scored. Evaluation never draws training data, never steps, and is never counted as training.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import torch

from swarm.dataplane.send import HopFailed, HopSender
from swarm.dataplane.state import PlaneState, StageCompute

logger = logging.getLogger(__name__)


class MicrobatchDriver:
    """Draws microbatches while a slot is free and a next-stage replica is reachable; completes or drops each."""

    def __init__(self, state: PlaneState, sender: HopSender) -> None:
        self.state, self.sender = state, sender
        self._tasks: list[asyncio.Task] = []

    def start(self, next_batch: Callable[[], torch.Tensor], eval_batches: list[torch.Tensor] | None = None) -> None:
        """Keep ``max_inflight`` microbatches from ``next_batch()`` going through the pipeline, and with
        ``eval_batches`` measure the validation loss on them every ``dataplane.eval_every_s``."""
        self.stop()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._drive(next_batch))]
        if eval_batches and self.state.config.eval_every_s > 0:
            self._tasks.append(loop.create_task(self._evaluate_every(eval_batches)))

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []

    async def _evaluate_every(self, batches: list[torch.Tensor]) -> None:
        state = self.state
        while True:
            compute = state.compute
            if compute is None or not compute.is_first or state.router.choose() is None:
                await asyncio.sleep(1.0)  # nothing to send through (yet)
                continue
            await self.evaluate(compute, batches)
            await asyncio.sleep(state.config.eval_every_s)

    async def evaluate(self, compute: StageCompute, batches: list[torch.Tensor]) -> float | None:
        """One measurement: the token-weighted mean loss over ``batches`` through the whole pipeline on the
        agreed weights; None (counted) when one of them could not be scored."""
        state = self.state
        total = tokens = 0.0
        states: set[tuple[str, ...]] = set()
        for ids in batches:
            deadline = time.monotonic() + state.config.microbatch_timeout_s
            try:
                out, tag = await compute.evaluate(ids, None)
                result = await self.sender.send_eval(out, ids, [], compute, deadline)
            except Exception as exc:  # a hop failed (HopFailed), or this stage's compute went (a stage change)
                state.stats["eval_failed"] += 1
                state.events.pipeline_eval("failed")
                logger.info("validation measurement abandoned: [%s] %s", getattr(exc, "code", type(exc).__name__), exc)
                return None
            total += result.loss * result.tokens
            tokens += result.tokens
            states.add((tag, *result.agreed))
            state.events.pipeline_eval("ok")
        loss = total / tokens
        # Which agreed state of each stage it measured (none when a stage moved on mid-measurement).
        state.val_losses.append((time.time(), loss, list(states.pop()) if len(states) == 1 else []))
        state.stats["eval_measurements"] += 1
        state.events.pipeline_val_loss(loss)
        logger.info("swarm validation loss %.4f (%d tokens, agreed weights)", loss, int(tokens))
        return loss

    async def _drive(self, next_batch: Callable[[], torch.Tensor]) -> None:
        state = self.state
        slots = asyncio.Semaphore(state.config.max_inflight)
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                await slots.acquire()
                compute = state.compute
                if compute is None or not compute.is_first or not state.router.peers or state.router.choose() is None:
                    slots.release()
                    await asyncio.sleep(0.2)  # no next stage to send to (yet, or all banned): poll
                    continue
                task = asyncio.get_running_loop().create_task(self._one(compute, next_batch(), slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, compute: StageCompute, ids: torch.Tensor, slots: asyncio.Semaphore) -> None:
        state = self.state
        key = ("driver", next(state.ids))
        start = time.monotonic()
        deadline = start + state.config.microbatch_timeout_s
        tokens = ids.shape[0] * (ids.shape[1] - 1)
        try:
            out = await compute.forward(key, ids, None)
            reply = await self.sender.send_forward(out, ids, [], compute, deadline)
            await compute.backward(key, reply.grad)
        except HopFailed as exc:
            self._dropped(exc.reason, exc.code)
            logger.info("microbatch dropped (%s): [%s] %s", exc.reason, exc.code, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            # This stage's own compute failed: closed under it (the node moved to another stage), or a bug.
            self._dropped("stage_moved" if state.compute is not compute else "error", "local")
            logger.exception("microbatch failed on this stage")
        else:
            state.stats["microbatches_ok"] += 1
            state.stats["tokens_ok"] += tokens
            state.completed_at.append(time.time())
            state.events.pipeline_microbatch("ok", tokens)
        finally:
            compute.drop(key)
            slots.release()

    def _dropped(self, reason: str, code: str) -> None:
        """Count one dropped microbatch: in total, by the hop's failure code, and by reason."""
        stats = self.state.stats
        stats["microbatches_dropped"] += 1
        stats[f"dropped_{code}"] += 1
        stats[f"drop_reason_{reason}"] += 1
        self.state.events.pipeline_microbatch("dropped")
        self.state.events.pipeline_dropped(reason)
