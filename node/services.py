"""The node's P2P services: one event loop (uvloop) on its own thread, and the handlers registered on it.

:class:`NodeServices` replicates the DHT's libp2p daemon into the node (``replicate_p2p``), wraps it in
the swarm's access rules (:class:`swarm.access.GatedP2P`), and registers what every node answers: the
stage state server (swarm/state_transfer.py, serving whatever stage this node hosts now), the fragment
exchange (:class:`node.replica_sync.ReplicaSync`, with ``diloco.enabled``) and the pipeline data plane
(:class:`node.pipeline.PipelineRole`, with more than one stage), and the dial-back check in both
directions (swarm/reachability.py: answering peers, and :class:`node.reachability.ReachabilityProbe`
asking them about this node). They live as long as the node; a stage
change re-attaches them to the new stage (node/stage_host.py). Other threads reach the loop through
:meth:`run` (a coroutine, with a deadline) and :meth:`call` (a plain callable).

The loop is uvloop's (DESIGN.md). Measured against asyncio's own loop on one pipeline hop over hivemind
P2P (bench/hop_latency.py, BENCHMARKS.md "Event loop"), the two are within this machine's run-to-run
noise: the bytes move in the Go libp2p daemon, so the loop has little to win or lose.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import uvloop

from node.config import ConfigError, RunConfig
from node.metrics import NodeMetrics
from node.pipeline import PipelineRole
from node.reachability import ReachabilityProbe
from node.replica_sync import ReplicaSync
from node.stage_store import StageStore
from swarm.access import GatedP2P, SwarmAccess
from swarm.reachability import DialbackServer
from swarm.state_transfer import StageStateServer

logger = logging.getLogger(__name__)


class NodeServices:
    """The P2P loop and its handlers (see the module docstring)."""

    def __init__(self, cfg: RunConfig, metrics: NodeMetrics, access: SwarmAccess, run_id: str,
                 current: Callable[[], StageStore | None]) -> None:
        """``current()``: the store of the stage this node hosts now (None while it hosts none)."""
        self.cfg, self.metrics, self.access, self.run_id, self.current = cfg, metrics, access, run_id, current
        self.loop: asyncio.AbstractEventLoop | None = None
        self.p2p = None
        self.sync: ReplicaSync | None = None  # with diloco.enabled
        self.pipeline: PipelineRole | None = None  # with pipeline.num_stages > 1
        self.reachability: ReachabilityProbe | None = None
        self.dht_client = False  # the DHT stopped serving (this node is unreachable)

    def start(self, dht, peer_id: str, stop: threading.Event) -> str | None:
        """Start the loop and register the handlers; the reason when that failed, else None."""
        ready, failure = threading.Event(), []

        def loop_main() -> None:
            self.loop = uvloop.new_event_loop()
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self._setup(dht, peer_id, stop))
            except ConfigError as exc:
                failure.append(str(exc))
            except Exception as exc:
                logger.exception("cannot start the p2p services")
                failure.append(f"cannot start the p2p services: {exc}")
            finally:
                ready.set()
            self.loop.run_forever()

        threading.Thread(target=loop_main, name="p2p", daemon=True).start()
        if not ready.wait(60):
            return "the p2p services did not start within 60 s"
        return failure[0] if failure else None

    async def _setup(self, dht, peer_id: str, stop: threading.Event) -> None:
        # Every protoswarm handler and call goes through the access rules (swarm/access.py).
        metrics = self.metrics
        self.p2p = GatedP2P(await dht.replicate_p2p(), self.access, on_denied=lambda peer: metrics.access_denied_total.inc())
        store = self.current
        server = StageStateServer(
            self.run_id, lambda: store().snapshot() if store() else None, self.cfg.wire.limits(),
            on_error=lambda exc: metrics.count_protocol_error(exc.code),
            consensus=lambda: store().consensus_snapshot() if store() else None,
            stage=lambda: store().stage if store() else None,
        )
        await server.register(self.p2p)
        dialback = DialbackServer(self.run_id, self.cfg.wire.limits(), on_error=lambda exc: metrics.count_protocol_error(exc.code))
        await dialback.register(self.p2p)
        own = [str(m) for m in await asyncio.to_thread(dht.get_visible_maddrs)]
        self.reachability = ReachabilityProbe(self.p2p, peer_id, self.run_id, lambda: own, self.cfg.wire.limits())
        self.reachability.start()
        # Who is banned where: peer_banned_seconds{peer_id, where} and /health "banned" (bounded).
        metrics.watch_bans("state", server.strikes.banned)
        metrics.watch_bans("exchange", lambda: self.sync.exchange.strikes.banned()
                           if self.sync is not None and self.sync.exchange is not None else {})
        metrics.watch_bans("pipeline", lambda: self.pipeline.plane.strikes.banned()
                           if self.pipeline is not None and self.pipeline.plane is not None else {})
        admissions = [server.admission, dialback.admission]  # floods refused before a byte was read
        metrics.watch_bans("admission", lambda: {peer: left for gate in self._admissions(admissions)
                                                 for peer, left in gate.strikes.banned().items()})
        loop = asyncio.get_running_loop()
        if self.cfg.diloco.enabled:
            self.sync = ReplicaSync(self.cfg, metrics, loop, self.p2p, peer_id, self.run_id)
            self.sync.stop = stop
            await self.sync.register()
        if self.cfg.pipeline.num_stages > 1:
            self.pipeline = PipelineRole(self.cfg, metrics, loop)
            if self.sync is not None:
                self.pipeline.step_hooks.append(self.sync.after_step)
            await self.pipeline.setup(self.p2p, peer_id, self.run_id)

    def _admissions(self, fixed: list) -> list:
        """The admissions of every handler this node serves now (protocol/admission.py)."""
        plane = self.pipeline.plane if self.pipeline is not None else None
        return fixed + [gate for gate in (getattr(self.sync, "admission", None),
                                          plane.server.admission if plane is not None else None) if gate is not None]

    def reachable(self) -> str:
        """This node's reachability as peers found it: "public", "private" or "" (not known yet)."""
        return self.reachability.state if self.reachability is not None else ""

    def reachability_upkeep(self, dht) -> None:
        """Upkeep thread: a node peers cannot dial stops serving the DHT (once)."""
        if self.reachable() == "private" and not self.dht_client:
            self.dht_client = True
            if dht.become_client():
                logger.info("peers cannot dial this node: its DHT now runs as a client (reads and stores only)")

    def run(self, coro, timeout: float) -> Any:
        """Run ``coro`` on the loop and wait for it (TimeoutError after ``timeout``; it is cancelled then)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()  # do not leave the work running on the loop
            raise

    def stop(self) -> None:
        """Close the P2P instance, cancel what runs on the loop, and stop it."""
        if self.loop is None:
            return

        async def close() -> None:
            if self.p2p is not None:
                await self.p2p.shutdown()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(close(), timeout=5)
        except Exception as exc:
            logger.debug("closing the p2p loop: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
