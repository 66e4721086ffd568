"""Stage 0's driver: keeps ``dataplane.max_inflight`` microbatches going through the pipeline.

Each microbatch gets ``dataplane.microbatch_timeout_s`` from its forward to its backward; one whose
hop fails (:class:`~swarm.dataplane.send.HopFailed`) is dropped and counted, its stash freed.
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
        self._task: asyncio.Task | None = None

    def start(self, next_batch: Callable[[], torch.Tensor]) -> None:
        """Keep ``max_inflight`` microbatches from ``next_batch()`` going through the pipeline."""
        self.stop()
        self._task = asyncio.get_running_loop().create_task(self._drive(next_batch))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

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
            state.stats["microbatches_dropped"] += 1
            state.stats[f"dropped_{exc.code}"] += 1
            state.events.pipeline_microbatch("dropped")
            logger.info("microbatch dropped: [%s] %s", exc.code, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            state.stats["microbatches_dropped"] += 1
            state.events.pipeline_microbatch("dropped")
            logger.exception("microbatch failed on this stage")
        else:
            state.stats["microbatches_ok"] += 1
            state.stats["tokens_ok"] += tokens
            state.events.pipeline_microbatch("ok", tokens)
        finally:
            compute.drop(key)
            slots.release()
