"""Which stage this node can and should take: its device's memory, its own checkpoints, the swarm's needs.

The swarm's side (loads, servers, the weakest stage, when to move) is pure functions over records in
swarm/claiming.py; this module adds what only the node knows: how much memory its device has free for
each stage (the estimate of node/memory.py, the same as ``node plan``) and which stage it holds a
checkpoint of.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from node.checkpoint import list_checkpoints
from node.config import RunConfig
from node.device import free_memory
from node.memory import GIB, estimate_stage
from swarm.claiming import choose_stage, prefer_own_stage

logger = logging.getLogger(__name__)


def stages_that_fit(cfg: RunConfig, device: torch.device, run_id: str) -> tuple[list[int], str | None]:
    """The stages whose estimated memory fits ``device``'s free memory now, and the reason to stop
    (before any download or training) when the pinned stage or every stage does not fit."""
    free = free_memory(device)
    outer_on_device = cfg.diloco.outer_device == "device" or device.type == "cpu"
    need = {s: estimate_stage(cfg, s, device.type, outer_on_device=outer_on_device).device_bytes
            for s in range(cfg.pipeline.num_stages)}
    fit = [s for s, n in need.items() if n <= free]
    pinned = cfg.swarm.stage
    if pinned is not None and pinned not in fit:
        return fit, (f"stage {pinned} of run {run_id} needs ~{need[pinned] / GIB:.2f} GiB on {device}, which has "
                     f"{free / GIB:.2f} GiB free (`node plan` shows why; more stages, a smaller train.batch_size "
                     f"or dataplane.backward=recompute need less)")
    if not fit:
        return fit, (f"no stage of run {run_id} fits {device}: the smallest needs ~{min(need.values()) / GIB:.2f} "
                     f"GiB, {free / GIB:.2f} GiB are free (`node plan --config ... --device-mem GIB` shows how many "
                     f"stages would fit)")
    if len(fit) < len(need):
        skipped = sorted(set(need) - set(fit))
        logger.warning("stages %s do not fit %s (%.2f GiB free; they need %s GiB): not claiming them", skipped,
                       device, free / GIB, [round(need[s] / GIB, 2) for s in skipped])
    return fit, None


def own_checkpoint_stage(checkpoint_dirs: dict[int, Path]) -> int | None:
    """The stage of this node's newest checkpoint among ``checkpoint_dirs`` (stage → directory), if any."""
    newest: tuple[float, int] | None = None
    for stage, directory in checkpoint_dirs.items():
        found = list_checkpoints(directory)
        if found:
            mtime = found[-1][1].stat().st_mtime
            newest = max(newest, (mtime, stage)) if newest else (mtime, stage)
    return newest[1] if newest else None


def pick_stage(loads: list[float], servers: list[int], me: str, min_replicas: int, fit: list[int],
               own: int | None, tolerance: float = 1.0) -> int:
    """The swarm's weakest stage among those that fit (loads within ``tolerance`` × the lowest tie: the
    swarm's ``rebalance_gain``); back to the stage of this node's own checkpoint unless a stage has no
    server (swarm/claiming.py ``prefer_own_stage``)."""
    stage = choose_stage(loads, servers, me, min_replicas, tolerance)
    if stage not in fit:  # the swarm's pick does not fit this device: the same choice among those that do
        stage = fit[choose_stage([loads[s] for s in fit], [servers[s] for s in fit], me, min_replicas, tolerance)]
    own = own if own in fit else None
    back = prefer_own_stage(stage, own, servers)
    if back != stage:
        logger.info("stage loads %s, servers %s: back to stage %d, which this node has a checkpoint of "
                    "(stage %d would be the pick otherwise)", loads, servers, back, stage)
    else:
        logger.info("stage loads %s, servers %s: claiming stage %d", loads, servers, stage)
    return back
