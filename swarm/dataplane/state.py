"""What the roles of one data plane share: the stage they serve, the router, the ids and the counters.

The compute itself is the node's (``node.pipeline.PipelineCompute``); the data plane only needs the
duck type :class:`StageCompute`. :class:`PipelineEvents` are the metric hooks (the node's
``NodeMetrics`` implements them).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Hashable
from typing import Any, Protocol

import torch

from protocol.codecs import get_codec
from protocol.tensors import WireConfig, WireLimits
from swarm.dataplane.config import DENSE_BYTES_PER_VALUE, DataplaneConfig
from swarm.routing import Router


class StageCompute(Protocol):
    stage: int
    num_stages: int
    width: int
    basis: str
    is_first: bool
    is_last: bool

    @property
    def queue_depth(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    async def forward(self, key: Hashable, ids: torch.Tensor, boundary_in: torch.Tensor | None) -> torch.Tensor: ...
    async def backward(self, key: Hashable, grad_out: torch.Tensor) -> torch.Tensor | None: ...
    async def forward_backward_last(self, ids: torch.Tensor, boundary_in: torch.Tensor) -> tuple[float, torch.Tensor]: ...
    async def evaluate(self, ids: torch.Tensor, boundary_in: torch.Tensor | None) -> tuple[torch.Tensor, str]: ...
    def drop(self, key: Hashable) -> bool: ...


class PipelineEvents:
    """Hooks for metrics; the node's NodeMetrics implements them. These defaults do nothing."""

    def pipeline_bytes(self, direction: str, way: str, codec: str, nbytes: int, dense_nbytes: int) -> None: ...
    def pipeline_microbatch(self, result: str, tokens: int = 0) -> None: ...
    def pipeline_refused(self, code: str) -> None: ...
    def pipeline_dropped(self, reason: str) -> None: ...
    def pipeline_hop(self, seconds: float) -> None: ...
    def pipeline_loss(self, loss: float, tokens: int) -> None: ...
    def pipeline_val_loss(self, loss: float) -> None: ...
    def pipeline_eval(self, result: str) -> None: ...
    def protocol_error(self, code: str) -> None: ...


class PlaneState:
    """One node's data plane as its roles (serve, send, drive) see it.

    ``compute`` (the stage served, or None) and ``router`` (to its next stage) are replaced together
    by ``DataPlane.attach``; the roles read them here each time, never keep their own reference.
    ``ids`` numbers the microbatches this node sends and the driver's stash keys (one counter).
    """

    def __init__(self, p2p: Any, peer_id: str, run_id: str, config: DataplaneConfig, wire: WireConfig,
                 limits: WireLimits, *, d_model: int, max_seq_len: int, events: PipelineEvents) -> None:
        self.p2p, self.peer_id, self.run_id = p2p, peer_id, run_id
        self.config, self.wire, self.limits = config, wire, limits
        self.d_model, self.max_seq_len = d_model, max_seq_len
        self.events = events
        self.compute: StageCompute | None = None
        self.router = self.new_router()
        self.ids = itertools.count(1)
        self.stats: dict[str, float] = collections.Counter()
        # (wall time, loss, agreed-state tag of each stage) of this driver's validation measurements
        # (swarm/dataplane/drive.py); the tags are empty when the stages' agreed states changed mid-measurement.
        self.val_losses: collections.deque[tuple[float, float, list[str]]] = collections.deque(maxlen=256)
        # Wall times at which this driver completed a microbatch (stage 0): where progress stalled, and for how long.
        self.completed_at: collections.deque[float] = collections.deque(maxlen=512)

    def new_router(self) -> Router:
        return Router(ban_base_s=self.config.ban_base_s, ban_max_s=self.config.ban_max_s)

    def count_bytes(self, direction: str, way: str, codec: str, nbytes: int, values: int, ids: int) -> None:
        """Count a frame and what the same frame would weigh with a dense bf16 boundary."""
        width = self.compute.width if self.compute else 1
        tokens = values // max(1, width)
        payload = get_codec(codec).payload_nbytes(values)
        dense = nbytes - payload + tokens * self.d_model * DENSE_BYTES_PER_VALUE
        self.stats[f"bytes_{direction}_{way}"] += nbytes
        self.stats[f"dense_{direction}_{way}"] += dense
        self.events.pipeline_bytes(direction, way, codec, nbytes, dense)
