"""`node start`: the daemon a volunteer runs — the node's lifecycle, nothing of a stage's own work.

Start order (DESIGN §5): identity lock → /metrics and /health → DHT in the background (never blocking
on bootstrap) → run parameters (create and publish them, or read them from the swarm) → the P2P
services (node/services.py) → measure throughput → claim a stage that fits the device and host it
(node/placement.py: its weights from the own checkpoint, else a peer, else the seeded init; another
stage when the claimed one cannot be downloaded) → announce ONLINE (node/presence.py) → serve (and,
with one stage, train) while refreshing the record and rebalancing. Changing stage stops one
:class:`node.stage_host.StageHost` and opens another.

Shutdown (SIGINT/SIGTERM): announce OFFLINE, stop training at a step boundary, write a checkpoint,
stop the DHT and its libp2p daemon, exit 0, all within ``swarm.shutdown_timeout_s``. A second
signal kills the children and exits at once.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import threading
import time
from typing import Any

from node.config import RunConfig
from node.context import NodeContext
from node.daemon_view import node_health, recent_loss, status_snapshot
from node.device import resolve_device
from node.identity import IdentityLock
from node.last_run import RunMemory
from node.metrics import MetricsServer, NodeMetrics
from node.placement import StagePlacement
from node.presence import SwarmPresence, count_rejected
from node.run_params import RunUnusable, created_run, joined_run
from node.services import NodeServices
from node.stage_host import StageHost
from node.status_line import RateWindow, StatusLine
from protocol.schema import PROTOCOL_VERSION
from swarm.access import SwarmAccess
from swarm.dht import SwarmDHT
from swarm.procs import descendants
from swarm.records import choose_run

logger = logging.getLogger(__name__)


def kill_descendants(sig: int = signal.SIGKILL) -> None:
    """Signal every descendant process (DHT process, libp2p daemons); best effort."""
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGINT/SIGTERM set ``stop`` (the orderly shutdown); a second one kills the children and exits."""
    signals = 0

    def handle(signum, frame) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            logger.warning("second signal: exiting at once")
            kill_descendants()
            os._exit(130)
        logger.warning("signal %d: shutting down (send it again to exit at once)", signum)
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


def emulate_link(text: str) -> str | None:
    """``swarm.link``: throttle and delay this process's protoswarm streams (not the DHT); what to print."""
    from swarm.sim import link

    spec = link.LinkSpec.parse(text) if text else None
    if spec is None or (spec.rate_bps is None and not spec.delay_s):
        return None
    link.install(link.LinkEmulator(spec))
    return f"link: emulating {spec} in-process (protoswarm streams only; DHT traffic is not shaped)"


def join_banner(cfg: RunConfig, run_id: str, dht: SwarmDHT, host: StageHost, device, reach=None) -> list[str]:
    """What the node prints once it serves: who it is, what it serves, and how another machine joins
    (``reach``: the node's ReachabilityProbe; the address peers reached it at comes first)."""
    maddrs = dht.visible_maddrs()
    public = [m for m in maddrs if "/127.0.0.1/" not in m and "/::1/" not in m] or maddrs
    lines = [f"node {dht.peer_id}",
             f"run {run_id}: model {cfg.model.name}, {cfg.pipeline.num_stages} stage(s); serving stage {host.stage} "
             f"(progress {host.store.progress}, {host.throughput:.2f} microbatches/s) on {device}"]
    if reach is not None and reach.state == "private":
        return [*lines, "peers cannot dial this node (behind NAT or a firewall): others join through a reachable "
                        "peer of the swarm, not this one; to change that, forward its port (docs/networking.md)"]
    seen = reach.address() if reach is not None else None
    if seen or public:
        lines += ["to join this swarm from another machine, run:",
                  f"    node start --join {seen or public[0]} --run-id {run_id}"]
    return lines


def wait_for_run(dht: SwarmDHT, cfg: RunConfig, metrics: NodeMetrics, stop: threading.Event, me: str, proof):
    """The swarm's run, once its record is found: (the run's config, this node's run record); None when
    stopped first. RunUnusable when the swarm's run cannot be joined."""
    while not stop.is_set():
        records, owners, rejected = dht.get_run_records()
        count_rejected(metrics, rejected)
        chosen = choose_run(records, owners, cfg.swarm.run_id or None)
        if isinstance(chosen, str):
            raise RunUnusable(chosen)
        if chosen is not None:
            return joined_run(chosen, cfg, me, proof)
        logger.info("no run parameters found in the swarm yet; looking again")
        stop.wait(1.0)
    return None


class NodeDaemon:
    """One node's lifecycle: start, join the run, claim a stage, host it (and move), leave."""

    def __init__(self, cfg: RunConfig, *, create: bool, out=None, status_mode: str = "off",
                 status_every_s: float = 60.0):
        self.cfg = cfg
        self.create = create
        self.out = out if out is not None else sys.stdout
        self.device = resolve_device(cfg.train.device)  # ConfigError now, before anything starts
        self._status = StatusLine(self.status_snapshot, mode=status_mode, log_every_s=status_every_s)
        # The status line's rates: tokens trained, bytes sent and received per second over the last 10 s.
        self._status_rates = {total: (rate, RateWindow(10.0)) for total, rate in
                              (("tokens", "tokens_per_s"), ("bytes_sent", "sent_per_s"),
                               ("bytes_received", "received_per_s"))}
        self.started = time.monotonic()
        self.metrics = NodeMetrics()
        self.stop = threading.Event()
        self.state = "starting"
        self.run_id = cfg.swarm.run_id
        self.dht: SwarmDHT | None = None
        self.server: MetricsServer | None = None
        self.services: NodeServices | None = None
        self.ctx: NodeContext | None = None
        self.placement: StagePlacement | None = None  # the stage this node serves (``host``), claimed and moved
        self.presence: SwarmPresence | None = None  # its records in the DHT, once the run is known
        self.access = SwarmAccess()  # from the config in run()
        self._run_record = None
        self._exit_code = 0  # 2 when the node stopped on a user-facing error (printed)

    @property
    def host(self) -> StageHost | None:
        """The stage this node serves (None before it hosts one)."""
        return self.placement.host if self.placement is not None else None

    # health -------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return node_health(self)

    def status_snapshot(self) -> dict[str, Any]:
        """Totals, rates and state for the live status line (node/status_line.py)."""
        return status_snapshot(self)

    def _recent_loss(self) -> float | None:
        return recent_loss(self.host)

    def _set_state(self, state: str) -> None:
        self.state = state
        self.metrics.set_state(state)

    def _print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def _fail(self, message: str) -> None:
        """A user-facing error: print it, stop, and exit 2 after the orderly shutdown."""
        print(f"error: {message}", file=sys.stderr, flush=True)
        self._exit_code = 2
        self.stop.set()

    # main ---------------------------------------------------------------------------------------------

    def run(self) -> int:
        sw = self.cfg.swarm
        self.access = SwarmAccess.from_config(sw)  # AccessError (a bad key file) stops the node at once
        lock = IdentityLock(sw.identity_path).acquire()
        try:
            self.server = MetricsServer(self.metrics, host=sw.metrics_host, port=sw.metrics_port, health=self.health)
            self.server.start()
            self._print(f"metrics: {self.server.url}/metrics   health: {self.server.url}/health")
            self._status.start()
            if (note := emulate_link(sw.link)) is not None:
                self._print(note)
            install_signal_handlers(self.stop)
            self.dht = SwarmDHT(
                initial_peers=sw.initial_peers, host_maddrs=sw.host_maddrs, announce_maddrs=sw.announce_maddrs,
                identity_path=str(lock.path), retry_max_s=sw.bootstrap_retry_max_s,
                on_state=self._on_bootstrap_state, time_op=self.metrics.time_dht, access=self.access,
            )
            if not self.access.open:
                self._print(f"access: {self.access.describe()} (docs/security.md)")
            self.dht.run_in_background()
            try:
                if self._wait_online():
                    self._serve()
            except Exception:  # never leave without the orderly shutdown below (OFFLINE, checkpoint, DHT)
                logger.exception("the node failed; shutting down")
                self._shutdown()
                return 1
            code = self._shutdown()
            return code if code else self._exit_code
        finally:
            self._status.stop()
            lock.release()

    def _on_bootstrap_state(self, state: str) -> None:
        self.metrics.set_bootstrap_state(state)  # counts attempts on "bootstrapping"
        if state == "retrying":
            self._print(f"cannot reach the swarm yet ({self.dht.last_error}); retrying in the background")

    def _wait_online(self) -> bool:
        self._set_state("joining")
        while not self.stop.is_set():
            if self.dht.wait_online(0.2):
                self.access.self_id = self.dht.peer_id
                self.metrics.set_info(peer_id=self.dht.peer_id, protocol=".".join(map(str, PROTOCOL_VERSION)))
                return True
            if self.dht.state == "failed":
                self._fail(f"the DHT cannot start: {self.dht.last_error}")
                return False
        return False

    def _serve(self) -> None:
        if not self._resolve_run() or self.stop.is_set():
            return
        self.services = NodeServices(self.cfg, self.metrics, self.access, self.run_id,
                                     lambda: self.host.store if self.host is not None else None)
        failure = self.services.start(self.dht.dht, self.dht.peer_id, self.stop)
        if failure is not None:
            self._fail(failure)
            return
        self.ctx = NodeContext(cfg=self.cfg, run_id=self.run_id, peer_id=self.dht.peer_id, device=self.device,
                               metrics=self.metrics, dht=self.dht, services=self.services, stop=self.stop)
        self.presence = SwarmPresence(self.ctx, self.access, self._recent_loss)
        self.placement = StagePlacement(self.ctx, self.presence, create=self.create, fail=self._fail)
        if not self.placement.join():
            return
        self.presence.announce(self.host, "online")
        self._set_state("online")
        self.run_memory = RunMemory.online(self.cfg, self._run_record, self.dht)
        for line in join_banner(self.cfg, self.run_id, self.dht, self.host, self.device, self.services.reachability):
            self._print(line)
        self.host.start()
        self._maintain()

    # run parameters -------------------------------------------------------------------------------------

    def _resolve_run(self) -> bool:
        """Create the run, or find the swarm's and take its parameters; publish them. False: stop."""
        me, proof = self.dht.peer_id, self.access.proof
        if self.create:
            self._run_record = created_run(self.cfg, me, proof)
        else:
            try:
                joined = wait_for_run(self.dht, self.cfg, self.metrics, self.stop, me, proof)
            except RunUnusable as exc:
                self._fail(str(exc))
                return False
            if joined is None:
                return False
            self.cfg, self._run_record = joined
        self.run_id = self._run_record.run_id
        self.dht.store_run_record(self._run_record, self.cfg.swarm.record_expiry_s)
        return True

    # serving loop ---------------------------------------------------------------------------------------

    def _maintain(self) -> None:
        sw = self.cfg.swarm
        next_refresh = 0.0
        next_rebalance = time.monotonic() + self._jittered(sw.rebalance_period_s)
        while not self.stop.is_set():
            now = time.monotonic()
            try:
                records = None
                if now >= next_refresh:
                    next_refresh = now + sw.refresh_s
                    self.presence.announce(self.host, "online")
                    self.services.reachability_upkeep(self.dht)
                    self.presence.publish_run(self._run_record)
                    records = self.presence.observe(self.host)
                    self.run_memory.refresh(records)
                sync = self.services.sync
                if sync is not None and sync.resync_requested:
                    self.host.resync()
                if sw.stage is None and now >= next_rebalance:
                    next_rebalance = now + self._jittered(sw.rebalance_period_s)
                    self.placement.rebalance(records)
            except Exception as exc:  # a failed DHT call or download: keep serving, try again next round
                logger.warning("swarm upkeep failed (%s: %s); retrying next round", type(exc).__name__, exc)
            self.stop.wait(max(0.05, min(next_refresh, next_rebalance) - time.monotonic()))

    def _jittered(self, period: float) -> float:
        j = self.cfg.swarm.rebalance_jitter
        return period * random.uniform(1 - j, 1 + j)

    # shutdown --------------------------------------------------------------------------------

    def _shutdown(self) -> int:
        deadline = time.monotonic() + self.cfg.swarm.shutdown_timeout_s
        done = threading.Event()

        def graceful() -> None:
            try:
                if self.host is not None and self.dht is not None and self.dht.online:
                    self.presence.announce(self.host, "offline", linger=True)
                    self._set_state("offline")
                stop_in_order(self.host, self.services, self.dht, self.server, deadline)
            except Exception:
                logger.exception("error during shutdown")
            finally:
                done.set()

        threading.Thread(target=graceful, name="shutdown", daemon=True).start()
        if done.wait(max(0.0, deadline - time.monotonic())):
            logger.info("stopped")
            return 0
        logger.error("shutdown took longer than %.0f s: killing child processes", self.cfg.swarm.shutdown_timeout_s)
        kill_descendants()
        return 1


def stop_in_order(host: StageHost | None, services: NodeServices | None, dht: SwarmDHT | None,
                  server: MetricsServer | None, deadline: float) -> None:
    """Training stops at a step boundary, then the pipeline's compute, then the checkpoint is written;
    then the P2P services, the DHT (and its libp2p daemon) and the metrics server."""
    if host is not None:
        host.stop(save=False, wait_s=max(1.0, deadline - time.monotonic() - 5))
    if services is not None and services.pipeline is not None:
        services.pipeline.stop()
    if host is not None:
        host.stop(save=True, wait_s=0.0)
    if services is not None:
        services.stop()
    if dht is not None:
        dht.shutdown()
    if server is not None:
        server.shutdown()
