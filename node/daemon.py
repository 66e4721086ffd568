"""`node start`: the daemon a volunteer runs — the node's lifecycle, nothing of a stage's own work.

Start order (DESIGN §5): identity lock → /metrics and /health → DHT in the background (never blocking
on bootstrap) → run parameters (create and publish them, or read them from the swarm) → the P2P
services (node/services.py) → measure throughput → claim a stage that fits the device (node/claim.py)
→ host it (node/stage_host.py: load its weights from the own checkpoint, else a peer, else the seeded
init; attach the services) → announce ONLINE (node/presence.py) → serve (and, with one stage, train) while refreshing the
record and rebalancing. Changing stage stops one :class:`node.stage_host.StageHost` and opens another.

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

from node.claim import own_checkpoint_stage, pick_stage, stages_that_fit
from node.config import RunConfig
from node.context import NodeContext
from node.daemon_view import node_health, recent_loss, status_snapshot
from node.device import resolve_device
from node.identity import IdentityLock
from node.last_run import RunMemory
from node.metrics import MetricsServer, NodeMetrics
from node.presence import SwarmPresence, count_rejected
from node.reachability import stages_for
from node.run_params import RunUnusable, created_run, joined_run
from node.services import NodeServices
from node.stage_host import StageHost, StageUnavailable
from node.stage_store import StageStore
from node.status_line import RateWindow, StatusLine
from protocol.messages import StageRecord
from protocol.schema import PROTOCOL_VERSION
from swarm.access import SwarmAccess
from swarm.claiming import rebalance_target, stage_loads, stage_servers
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
        self.host: StageHost | None = None  # the stage this node serves
        self.presence: SwarmPresence | None = None  # its records in the DHT, once the run is known
        self.access = SwarmAccess()  # from the config in run()
        self._throughput = 0.0
        self._probe: StageStore | None = None
        self._claim_records: dict[int, list[StageRecord]] = {}
        self._fit: list[int] = []  # stages whose estimated memory fits this node's device (at claim time)
        self._last_move = 0.0
        self._unavailable = ""  # why the last stage this node tried to host could not be downloaded
        # stage → the peers that served it when its download failed: no move there while they are the same
        self._undownloadable: dict[int, frozenset[str]] = {}
        self._told_undownloadable: set[int] = set()
        self._claim_records_read: dict[int, list[StageRecord]] = {}  # the read the latest claim was made on
        self._run_record = None
        self._exit_code = 0  # 2 when the node stopped on a user-facing error (printed)

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
        stage = self._claim_stage()
        if stage is None or self.stop.is_set():
            return
        tried: list[int] = []
        while not self._host_stage(stage, fail=False):
            if self.stop.is_set():
                return
            tried.append(stage)
            self._undownloadable[stage] = _server_ids(self._claim_records_read, stage)
            stage = self._claim_another(tried)
            if stage is None:
                others = f" (stages tried: {', '.join(map(str, tried))})" if len(tried) > 1 else ""
                self._fail(f"{self._unavailable}{others}")
                return
            logger.warning("stage %d is served but its state could not be downloaded from its servers; "
                           "claiming stage %d instead (stages tried: %s)", tried[-1], stage, tried)
        if self.stop.is_set():
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

    # stage ----------------------------------------------------------------------------------------------

    def _claim_stage(self) -> int | None:
        cfg, ctx = self.cfg, self.ctx
        fit, failure = stages_that_fit(cfg, self.device, self.run_id)
        if failure is not None:
            self._fail(failure)
            return None
        fit, failure = stages_for(self.services.reachability, fit, cfg.pipeline.num_stages, cfg.swarm.stage,
                                  wait_s=0 if self.create else 30.0)
        if failure is not None:
            self._fail(failure)
            return None
        self._fit = fit
        probe_stage = cfg.swarm.stage if cfg.swarm.stage is not None else fit[0]
        probe = StageStore.fresh(cfg, self.run_id, probe_stage, ctx.checkpoint_dir(probe_stage), self.device)
        # Measured once: a node's speed, not a stage's (stages are balanced). Re-measuring on every move
        # would feed timing noise into the rebalancing decisions and make nodes oscillate.
        self._throughput = probe.engine.measure_throughput(cfg.train.batch_size, cfg.train.seq_len)
        self._probe = probe  # reused by _host_stage if this is the stage claimed (still at its seeded init)
        if cfg.swarm.stage is not None:
            try:  # only a help for the download (servers to try): a pinned node does not fail on it
                self._claim_records = self.presence.read()
            except Exception as exc:  # a DHT lookup: timeouts, a closed daemon
                logger.warning("reading the swarm before hosting stage %d failed (%s); going on", cfg.swarm.stage, exc)
            return cfg.swarm.stage
        records = self._claim_records = self.presence.read()  # its servers are tried if the download's read misses
        self._claim_records_read = records
        me, n = self.dht.peer_id, cfg.pipeline.num_stages
        own = own_checkpoint_stage({s: ctx.checkpoint_dir(s) for s in range(n)})
        return pick_stage(stage_loads(records, n, exclude_peer=me), stage_servers(records, n, exclude_peer=me), me,
                          cfg.swarm.min_replicas, fit, own, cfg.swarm.rebalance_gain)

    def _claim_another(self, tried: list[int]) -> int | None:
        """The stage to claim after the servers of every stage in ``tried`` failed to give it: the same choice
        over a fresh read among the other stages that fit (a peer that announces a stage but cannot serve
        it, broken or hostile, must not keep joiners out of the swarm). None: the node is pinned to its
        stage, or no other stage fits."""
        cfg = self.cfg
        fit = [s for s in self._fit if s not in tried]
        if cfg.swarm.stage is not None or not fit:
            return None
        records = self._claim_records = self._claim_records_read = self.presence.read()
        me, n = self.dht.peer_id, cfg.pipeline.num_stages
        return pick_stage(stage_loads(records, n, exclude_peer=me), stage_servers(records, n, exclude_peer=me), me,
                          cfg.swarm.min_replicas, fit, None, cfg.swarm.rebalance_gain)

    def _host_stage(self, stage: int, fail: bool = True, records: dict[int, list[StageRecord]] | None = None) -> bool:
        """Become a server of ``stage`` (node/stage_host.py) and say so. False: its servers could not give it
        (why: ``_unavailable``). ``records``: the DHT read the stage was chosen on (default: the claim's)."""
        probe, self._probe = self._probe, None
        seen = (records if records is not None else self._claim_records).get(stage, [])
        self._claim_records = {}  # the claim's read serves the claim only
        try:
            self.host = StageHost.open(self.ctx, stage, self._throughput, probe, seen, confirm_vacant=not self.create)
        except StageUnavailable as exc:  # peers serve it but it could not be downloaded: stop (``fail``), never seed
            self._unavailable = str(exc)
            if fail and not self.stop.is_set():
                self._fail(str(exc))
            return False
        self._last_move = time.monotonic()
        self.presence.announce(self.host, "joining")
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
                    self._rebalance(records)
            except Exception as exc:  # a failed DHT call or download: keep serving, try again next round
                logger.warning("swarm upkeep failed (%s: %s); retrying next round", type(exc).__name__, exc)
            self.stop.wait(max(0.05, min(next_refresh, next_rebalance) - time.monotonic()))

    def _jittered(self, period: float) -> float:
        j = self.cfg.swarm.rebalance_jitter
        return period * random.uniform(1 - j, 1 + j)

    def _rebalance(self, records: dict[int, list[StageRecord]] | None = None) -> None:
        """``records``: the swarm as just read by this round's refresh, if there was one."""
        # After a move, let the swarm see it (records refresh) before deciding again.
        if time.monotonic() - self._last_move < 2 * self.cfg.swarm.rebalance_period_s:
            return
        if records is None:
            records = self.presence.observe(self.host)
        me, n, here_stage = self.dht.peer_id, self.cfg.pipeline.num_stages, self.host.stage
        servers = stage_servers(records, n, exclude_peer=me)
        target = rebalance_target(stage_loads(records, n, exclude_peer=me), servers, here_stage, self.host.throughput,
                                  self.cfg.swarm.rebalance_gain, self.cfg.swarm.min_replicas)
        if target is None or target not in self._fit:
            return
        if self._undownloadable.get(target) == _server_ids(records, target):
            if target not in self._told_undownloadable:  # once per failure, not every period
                self._told_undownloadable.add(target)
                logger.info("stage %d would be better served, but its servers (the same peers) could not give it "
                            "before: staying on stage %d", target, here_stage)
            return
        # Every server of this stage sees the same improvement at about the same time; if all of them
        # moved, the swarm would overshoot and oscillate. Each moves with probability 1/k, so about one
        # does per round and the next round sees the result.
        here = servers[here_stage] + 1
        if random.random() >= 1.0 / here:
            logger.debug("stage %d would be better served; leaving the move to one of %d peers", target, here)
            return
        logger.info("moving from stage %d to stage %d (loads %s)", here_stage, target, stage_loads(records, n))
        self.presence.announce(self.host, "offline")
        self.host.stop(save=True)
        if not self._host_stage(target, fail=False, records=records):
            # Not tried again while the same peers serve it: each try stops training for a checkpoint.
            self._undownloadable[target] = _server_ids(records, target)
            self._told_undownloadable.discard(target)
            logger.warning("stage %d could not be downloaded from its servers; back to stage %d, and no move to "
                           "stage %d until its servers change", target, here_stage, target)
            if self.stop.is_set() or not self._host_stage(here_stage, records=records):
                return  # (from the checkpoint just written)
        self.host.start()
        self.presence.announce(self.host, "online")

    # shutdown --------------------------------------------------------------------------------

    def _shutdown(self) -> int:
        deadline = time.monotonic() + self.cfg.swarm.shutdown_timeout_s
        done = threading.Event()

        def graceful() -> None:
            try:
                if self.host is not None and self.dht is not None and self.dht.online:
                    self.presence.announce(self.host, "offline")
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


def _server_ids(records: dict[int, list[StageRecord]], stage: int) -> frozenset[str]:
    """The peers ``records`` show serving ``stage`` (joining or online)."""
    return frozenset(r.peer_id for r in records.get(stage, []) if r.state in ("joining", "online"))


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
