"""``DataPlane``: this node's end of the pipeline, composed of its roles (serve, send, drive)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any

import torch

from protocol.messages import GradientFrame, Message
from protocol.streams import PeerStrikes
from protocol.tensors import WireConfig, WireLimits
from swarm.dataplane.config import EVAL_HANDLER, HANDLER, PING_HANDLER, DataplaneConfig
from swarm.dataplane.drive import MicrobatchDriver
from swarm.dataplane.send import HopSender
from swarm.dataplane.serve import HopServer
from swarm.dataplane.state import PipelineEvents, PlaneState, StageCompute
from swarm.routing import Router


class DataPlane:
    """This node's end of the pipeline: serves its stage to the previous one, drives it if it is stage 0.

    All methods run on the event loop of ``p2p`` (one thread); ``compute`` does the torch work on its own.
    """

    def __init__(self, p2p: Any, peer_id: str, run_id: str, config: DataplaneConfig, wire: WireConfig, *,
                 d_model: int, max_seq_len: int, limits: WireLimits | None = None,
                 events: PipelineEvents | None = None) -> None:
        """``wire``: the codecs frames are sent with; ``limits``: what is accepted (default ``wire.limits()``).
        ``d_model`` is the width a dense boundary would carry (for the compression ratio); ``max_seq_len``
        the longest microbatch accepted (tokens)."""
        self.state = PlaneState(p2p, peer_id, run_id, config, wire, limits if limits is not None else wire.limits(),
                                d_model=d_model, max_seq_len=max_seq_len, events=events or PipelineEvents())
        self.sender = HopSender(self.state)
        self.server = HopServer(self.state, self.sender)
        self.driver = MicrobatchDriver(self.state, self.sender)

    # what callers read ------------------------------------------------------------------------------------

    @property
    def compute(self) -> StageCompute | None:
        return self.state.compute

    @property
    def router(self) -> Router:
        return self.state.router

    @property
    def stats(self) -> dict[str, float]:
        return self.state.stats

    @property
    def losses(self) -> collections.deque[tuple[float, float]]:
        """(wall time, loss) of the microbatches this node scored as the last stage (the latest 4096)."""
        return self.server.losses

    @property
    def strikes(self) -> PeerStrikes:
        return self.server.strikes

    # setup ---------------------------------------------------------------------------------------------

    @property
    def val_losses(self) -> collections.deque[tuple[float, float, list[str]]]:
        """(wall time, loss, each stage's agreed-state tag) of this driver's validation measurements (stage 0;
        the latest 256)."""
        return self.state.val_losses

    async def register(self) -> None:
        gate = self.server.admission.wrap  # one admission for the three: limits per peer across them
        await self.state.p2p.add_binary_stream_handler(HANDLER, gate(self.server.on_stream))
        await self.state.p2p.add_binary_stream_handler(EVAL_HANDLER, gate(self.server.on_eval_stream))
        await self.state.p2p.add_binary_stream_handler(PING_HANDLER, gate(self.server.on_ping))

    def attach(self, compute: StageCompute | None) -> None:
        """Serve ``compute``'s stage from now on (None: serve nothing); the routes are for its next stage."""
        self.state.compute = compute
        self.state.router = self.state.new_router()

    def set_next_replicas(self, replicas: Iterable[tuple[str, float]]) -> None:
        """The ONLINE replicas of the next stage (peer id, announced throughput), from the DHT records."""
        self.state.router.update([(p, t) for p, t in replicas if p != self.state.peer_id])

    def health(self) -> dict[str, Any]:
        compute = self.compute
        return {
            **{k: int(v) if float(v).is_integer() else v for k, v in self.stats.items()},
            "queue": compute.queue_depth if compute else 0,
            "stash": compute.in_flight if compute else 0,
            "routes": self.router.snapshot(),
            "recent_losses": [[round(t, 3), round(v, 5)] for t, v in list(self.losses)[-512:]],
            "val_losses": [[round(t, 3), round(v, 5), tags] for t, v, tags in list(self.val_losses)],
            "completed_at": [round(t, 3) for t in list(self.state.completed_at)],
        }

    # serving and sending (the roles' entry points, for tests that drive them without a stream) -------------

    async def handle(self, msg: Message, peer: str, nbytes: int = 0) -> Message:
        """The reply to one request from ``peer``."""
        return await self.server.handle(msg, peer, nbytes)

    async def send_forward(self, out: torch.Tensor, ids: torch.Tensor, route: list[str], compute: StageCompute,
                           deadline: float) -> GradientFrame:
        """Send this stage's output one hop on (retrying other replicas) and return the validated reply."""
        return await self.sender.send_forward(out, ids, route, compute, deadline)

    # driving (stage 0) -----------------------------------------------------------------------------------

    def start_driver(self, next_batch: Callable[[], torch.Tensor], eval_batches: list[torch.Tensor] | None = None) -> None:
        """Stage 0: keep ``max_inflight`` microbatches from ``next_batch()`` going through the pipeline (and
        measure the validation loss on ``eval_batches`` every ``dataplane.eval_every_s``)."""
        self.driver.start(next_batch, eval_batches)

    def stop_driver(self) -> None:
        self.driver.stop()
