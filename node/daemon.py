"""`node start`: the daemon a volunteer runs.

Start order (DESIGN §5): identity lock → /metrics and /health → DHT in the background (never blocking
on bootstrap) → run parameters (create and publish them, or read them from the swarm) → measure
throughput → claim a stage → load its weights (own checkpoint, else a peer, else the seeded init) →
announce ONLINE → serve (and, with one stage, train) while refreshing the record and rebalancing.

Shutdown (SIGINT/SIGTERM): announce OFFLINE, stop training at a step boundary, write a checkpoint,
stop the DHT and its libp2p daemon, exit 0, all within ``swarm.shutdown_timeout_s``. A second
signal kills the children and exits at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import random
import secrets
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack

from node.checkpoint import list_checkpoints
from node.config import ConfigError, RunConfig
from node.device import device_memory, resolve_device
from node.identity import IdentityLock
from node.metrics import MetricsServer, NodeMetrics
from node.pipeline import PipelineRole
from node.replica_sync import ReplicaSync
from node.run_params import config_from_run, run_parameters
from node.serving import StageWork
from node.status_line import RateWindow, StatusLine
from protocol.codecs import CODECS
from protocol.messages import RunRecord, StageRecord
from protocol.schema import PROTOCOL_VERSION
from swarm.access import GatedP2P, SwarmAccess
from swarm.claiming import choose_stage, prefer_own_stage, rebalance_target, stage_loads, stage_servers
from swarm.dht import SwarmDHT, descendants
from swarm.records import choose_run
from swarm.state_transfer import (
    StageStateServer,
    StateTransferError,
    download_from_replicas,
    download_stage_state,
)

logger = logging.getLogger(__name__)

def kill_descendants(sig: int = signal.SIGKILL) -> None:
    """Signal every descendant process (DHT process, libp2p daemons); best effort."""
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, sig)
        except OSError:
            pass


class NodeDaemon:
    def __init__(self, cfg: RunConfig, *, create: bool, out=None, status_mode: str = "off",
                 status_every_s: float = 60.0):
        self.cfg = cfg
        self.create = create
        self.out = out if out is not None else sys.stdout
        self._status = StatusLine(self.status_snapshot, mode=status_mode, log_every_s=status_every_s)
        self._record_rate = RateWindow(30.0)  # tokens/s announced in this node's stage record
        # The status line's rates: tokens trained, bytes sent and received per second over the last 10 s.
        self._status_rates = {total: (rate, RateWindow(10.0)) for total, rate in
                              (("tokens", "tokens_per_s"), ("bytes_sent", "sent_per_s"),
                               ("bytes_received", "received_per_s"))}
        self.device = resolve_device(cfg.train.device)  # ConfigError now, before anything starts
        self._peers_known: int | None = None
        self.started = time.monotonic()
        self.metrics = NodeMetrics()
        self.stop = threading.Event()
        self.state = "starting"
        self.run_id = cfg.swarm.run_id
        self.work: StageWork | None = None
        self.dht: SwarmDHT | None = None
        self.server: MetricsServer | None = None
        self._signals = 0
        self._trainer: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._p2p = None
        self._reported_rejections: dict[str, int] = {}
        self._throughput = 0.0
        self._probe: StageWork | None = None
        self._fit: list[int] = []  # stages whose estimated memory fits this node's device (at claim time)
        self._last_move = 0.0
        self.pipeline: PipelineRole | None = None  # with pipeline.num_stages > 1
        self.sync: ReplicaSync | None = None  # with diloco.enabled
        self.access = SwarmAccess()  # from the config in run()
        self._exit_code = 0  # 2 when the node stopped on a user-facing error (printed)
        self._losses: collections.deque[list[float]] = collections.deque(maxlen=4096)  # (unix time, loss), S = 1

    # health -------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        dht = self.dht
        return {
            "state": self.state,
            "bootstrap_state": dht.state if dht else "starting",
            "bootstrap_attempts": dht.attempts if dht else 0,
            "last_error": dht.last_error if dht else None,
            "peer_id": dht.peer_id if dht else None,
            "maddrs": dht.visible_maddrs() if dht and dht.online else [],
            "run_id": self.run_id or None,
            "num_stages": self.cfg.pipeline.num_stages,
            "stage": self.work.stage if self.work else None,
            "progress": self.work.progress if self.work else 0,
            "resumed_from": self.work.resumed_from if self.work else None,
            "throughput": self.work.throughput if self.work else 0.0,
            "device": self._device_health(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "protocol": ".".join(map(str, PROTOCOL_VERSION)),
            **({"pipeline": self.pipeline.health()} if self.pipeline is not None else {}),
            **({"outer": self.sync.health()} if self.sync is not None and self.work is not None else {}),
            **({"train": self._train_health()} if self._losses else {}),
            **({"banned": banned} if (banned := {k: v for k, v in self.metrics.banned().items() if v}) else {}),
        }

    def _device_health(self) -> dict[str, Any]:
        """The compute device and its memory (bytes): in use now, peak, total, free."""
        return device_memory(self.device)

    def status_snapshot(self) -> dict[str, Any]:
        """Totals, rates and state for the live status line (node/status_line.py)."""
        totals = self.metrics.totals()
        rates = {rate: max(0.0, window.update(totals.get(total, 0)))
                 for total, (rate, window) in self._status_rates.items()}
        return {"state": self.state, "stage": self.work.stage if self.work else None,
                "num_stages": self.cfg.pipeline.num_stages, "peers": self._peers_known,
                "loss": self._recent_loss(), "memory": self._device_health(), **totals, **rates}

    def _recent_loss(self) -> float | None:
        """Mean of the last 20 losses this node scored (S = 1 steps, or last-stage microbatches)."""
        plane = self.pipeline.plane if self.pipeline is not None else None
        try:  # the deques grow on other threads
            recent = [v for _, v in list(plane.losses if plane is not None else self._losses)[-20:]]
        except RuntimeError:
            return None
        return sum(recent) / len(recent) if recent else None

    def _emulate_link(self, text: str) -> None:
        """``swarm.link``: throttle and delay this process's protoswarm streams (not the DHT)."""
        from protocol import link

        spec = link.LinkSpec.parse(text) if text else None
        if spec is None or (spec.rate_bps is None and not spec.delay_s):
            return
        link.install(link.LinkEmulator(spec))
        self._print(f"link: emulating {spec} in-process (protoswarm streams only; DHT traffic is not shaped)")

    def _train_health(self) -> dict[str, Any]:
        """Local training (S = 1): the last losses, and the compute time for utilisation."""
        work = self.work
        return {"recent_losses": list(self._losses)[-512:], "started_at": work.started_at if work else None,
                "compute_s": round(work.compute_s, 3) if work else 0.0,
                "tokens": work.tokens_trained if work else 0}

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
            self._emulate_link(sw.link)
            self._install_signals()
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

    def _install_signals(self) -> None:
        def handle(signum, frame) -> None:
            self._signals += 1
            if self._signals > 1:
                logger.warning("second signal: exiting at once")
                kill_descendants()
                os._exit(130)
            logger.warning("signal %d: shutting down (send it again to exit at once)", signum)
            self.stop.set()

        signal.signal(signal.SIGINT, handle)
        signal.signal(signal.SIGTERM, handle)

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
        self._start_p2p()
        if self.stop.is_set() or self._p2p is None:
            return
        stage = self._claim_stage()
        if stage is None or self.stop.is_set():
            return
        self._take_stage(stage)
        if self.stop.is_set():
            return
        self._announce("online")
        self._set_state("online")
        self._print_banner()
        if self.cfg.pipeline.num_stages == 1:
            self._trainer = threading.Thread(target=self._train, name="trainer", daemon=True)
            self._trainer.start()
        self._maintain()

    # run parameters -------------------------------------------------------------------------------------

    def _resolve_run(self) -> bool:
        sw = self.cfg.swarm
        if self.create:
            self.run_id = sw.run_id or f"{self.cfg.model.name}-{secrets.token_hex(3)}"
            self._run_record = RunRecord(
                run_id=self.run_id, creator=self.dht.peer_id, created=time.time(), publisher=self.dht.peer_id,
                config=msgpack.packb(run_parameters(self.cfg)), access=self.access.proof(self.run_id, self.dht.peer_id),
            )
            self._publish_run_record()
            return True
        while not self.stop.is_set():
            records, owners, rejected = self.dht.get_run_records()
            self._count_rejections(rejected)
            chosen = choose_run(records, owners, sw.run_id or None)
            if isinstance(chosen, str):
                self._fail(chosen)
                return False
            if chosen is not None:
                self.run_id = chosen.run_id
                try:
                    params = msgpack.unpackb(chosen.config, raw=False)
                    if not isinstance(params, dict):
                        raise ConfigError("the run parameters are not a table")
                    self.cfg = config_from_run(params, self.cfg, self.dht.peer_id)
                except (ConfigError, ValueError, TypeError, msgpack.UnpackException) as exc:
                    self._fail(f"the swarm's run parameters are not usable here: {exc}")
                    return False
                self._run_record = RunRecord(
                    run_id=chosen.run_id, creator=chosen.creator, created=chosen.created,
                    publisher=self.dht.peer_id, config=chosen.config,
                    access=self.access.proof(chosen.run_id, self.dht.peer_id),
                )
                self._publish_run_record()
                return True
            logger.info("no run parameters found in the swarm yet; looking again")
            self.stop.wait(1.0)
        return False

    def _publish_run_record(self) -> None:
        self.dht.store_run_record(self._run_record, self.cfg.swarm.record_expiry_s)

    # stage ----------------------------------------------------------------------------------------------

    def _stages_that_fit(self) -> list[int] | None:
        """The stages whose estimated memory (node/memory.py) fits this node's device now; None, with the
        node stopped and the reason printed, when none does (before any download or training)."""
        from node.device import free_memory
        from node.memory import GIB, estimate_stage

        free = free_memory(self.device)
        outer_on_device = self.cfg.diloco.outer_device == "device" or self.device.type == "cpu"
        need = {s: estimate_stage(self.cfg, s, self.device.type, outer_on_device=outer_on_device).device_bytes
                for s in range(self.cfg.pipeline.num_stages)}
        fit = [s for s, n in need.items() if n <= free]
        pinned = self.cfg.swarm.stage
        if pinned is not None and pinned not in fit:
            self._fail(f"stage {pinned} of run {self.run_id} needs ~{need[pinned] / GIB:.2f} GiB on {self.device}, "
                       f"which has {free / GIB:.2f} GiB free (`node plan` shows why; more stages, a smaller "
                       f"train.batch_size or dataplane.backward=recompute need less)")
            return None
        if not fit:
            smallest = min(need.values())
            self._fail(f"no stage of run {self.run_id} fits {self.device}: the smallest needs ~{smallest / GIB:.2f} GiB, "
                       f"{free / GIB:.2f} GiB are free (`node plan --config ... --device-mem GIB` shows how many "
                       f"stages would fit)")
            return None
        if len(fit) < len(need):
            logger.warning("stages %s do not fit %s (%.2f GiB free; they need %s GiB): not claiming them",
                           sorted(set(need) - set(fit)), self.device, free / GIB,
                           [round(need[s] / GIB, 2) for s in sorted(set(need) - set(fit))])
        return fit

    def _claim_stage(self) -> int | None:
        cfg = self.cfg
        fit = self._stages_that_fit()
        if fit is None:
            return None
        self._fit = fit
        probe_stage = cfg.swarm.stage if cfg.swarm.stage is not None else fit[0]
        probe = StageWork(cfg, self.run_id, probe_stage, self._checkpoint_dir(probe_stage), self.device)
        # Measured once: a node's speed, not a stage's (stages are split evenly). Re-measuring on every
        # move would feed timing noise into the rebalancing decisions and make nodes oscillate.
        self._throughput = probe.measure_throughput()
        self._probe = probe  # reused by _take_stage if this is the stage claimed
        if cfg.swarm.stage is not None:
            return cfg.swarm.stage
        records, rejected = self.dht.get_stage_records(self.run_id, cfg.pipeline.num_stages)
        self._count_rejections(rejected)
        me = self.dht.peer_id
        loads = stage_loads(records, cfg.pipeline.num_stages, exclude_peer=me)
        servers = stage_servers(records, cfg.pipeline.num_stages, exclude_peer=me)
        stage = choose_stage(loads, servers, me, cfg.swarm.min_replicas)
        if stage not in fit:  # the swarm's pick does not fit this device: the neediest stage that does
            stage = min(fit, key=lambda s: (servers[s], loads[s]))
        own = self._own_checkpoint_stage()
        own = own if own in fit else None
        if (back := prefer_own_stage(stage, own, servers)) != stage:
            logger.info("stage loads %s, servers %s: back to stage %d, which this node has a checkpoint of "
                        "(stage %d would be the pick otherwise)", loads, servers, back, stage)
            return back
        logger.info("stage loads %s, servers %s: claiming stage %d", loads, servers, stage)
        return stage

    def _own_checkpoint_stage(self) -> int | None:
        """The stage of this node's newest checkpoint in this run, if any."""
        newest: tuple[float, int] | None = None
        for stage in range(self.cfg.pipeline.num_stages):
            found = list_checkpoints(self._checkpoint_dir(stage))
            if found:
                mtime = found[-1][1].stat().st_mtime
                newest = max(newest, (mtime, stage)) if newest else (mtime, stage)
        return newest[1] if newest else None

    def _checkpoint_dir(self, stage: int) -> Path:
        return Path(self.cfg.train.checkpoint_dir) / self.run_id / f"{self.dht.peer_id}-stage{stage}"

    def _take_stage(self, stage: int) -> None:
        """Become a server of ``stage``: own checkpoint, else a peer's state, else the seeded init."""
        probe, self._probe = self._probe, None
        # The probe is still at the seeded init (measuring leaves no gradients): no need to build it again.
        work = probe if probe is not None and probe.stage == stage else StageWork(
            self.cfg, self.run_id, stage, self._checkpoint_dir(stage), self.device
        )
        if work.resume():
            self._catch_up_resumed(work)
        else:
            self._download_into(work)
        work.throughput = self._throughput
        self.work = work
        self._last_move = time.monotonic()
        self.metrics.set_stage(stage)  # counts stage changes
        self.metrics.num_stages.set(self.cfg.pipeline.num_stages)
        if self.sync is not None:
            self.sync.attach(work)
        if self.pipeline is not None:
            if self._periodic_checkpoint not in self.pipeline.step_hooks:  # after the outer step's hook
                self.pipeline.step_hooks.append(self._periodic_checkpoint)
            self.pipeline.serve(work)
        self._announce("joining")

    def _catch_up_resumed(self, work: StageWork) -> None:
        """Resumed from a checkpoint: if the stage's other replicas applied outer rounds since it was
        written, take the stage's consensus state instead of its stale global copies (docs/node.md,
        "Checkpoints and crashes"). The inner optimizer state and the progress stay the checkpoint's
        (the progress never goes back). With no records to compare yet, ReplicaSync compares at its
        first view of the stage."""
        from node.replica_sync import rounds_behind

        if work.outer is None or self.sync is None:
            return
        records, _ = self.dht.get_stage_records(self.run_id, self.cfg.pipeline.num_stages)
        mates = [r for r in records.get(work.stage, []) if r.state == "online" and r.peer_id != self.dht.peer_id]
        behind = rounds_behind(work.outer.history(), mates)
        if behind is None:
            return
        logger.warning("stage %d: the checkpoint of step %d is behind the stage (%s); downloading the stage's state",
                       work.stage, work.progress, behind)
        self.sync.stats["resyncs"] += 1
        progress, history = work.progress, work.outer.history()
        self._download_into(work)
        if work.outer.history() != history:  # downloaded: the schedule position comes from the records
            work.resumed_schedule = None
        with work.lock:
            work.progress = max(work.progress, progress)

    def _periodic_checkpoint(self) -> None:
        """A pipeline stage's step hook (compute thread): start a checkpoint when one is due."""
        work = self.work
        if work is not None:
            work.maybe_checkpoint()

    def _download_into(self, work: StageWork, prefer: list[str] | None = None) -> None:
        """Load ``work``'s stage from a peer (the most advanced first; ``prefer``: only those, if any serve)."""
        records, _ = self.dht.get_stage_records(self.run_id, self.cfg.pipeline.num_stages)
        peers = [r for r in records.get(work.stage, []) if r.state == "online" and r.peer_id != self.dht.peer_id]
        peers.sort(key=lambda r: -r.progress)
        if prefer:
            peers = [r for r in peers if r.peer_id in prefer] or peers
        if work.outer is not None and peers and self._download_consensus(work, peers):
            return
        for record in peers[:3]:
            if self.stop.is_set():
                return
            started = time.monotonic()
            try:
                snap = self._run_async(self._download(record.peer_id, work.stage), timeout=120)
                work.check_compatible(snap)
            except (StateTransferError, TimeoutError, ValueError) as exc:
                self.metrics.count_state_download("failed")
                logger.warning("cannot download stage %d from %s: %s", work.stage, record.peer_id, exc)
                continue
            work.load(snap)
            self._count_download(snap, started)
            logger.info("loaded stage %d (step %d) from %s", work.stage, snap.step, record.peer_id)
            return
        logger.info("no peer serves stage %d: starting it from the seeded initialisation", work.stage)

    def _download_consensus(self, work: StageWork, peers: list[StageRecord]) -> bool:
        """Replica sync on: take the stage's agreed outer state from several replicas at once (resuming
        when one leaves) and start the local weights from its global copies. False: use a full download."""
        from hivemind.p2p import PeerID

        started = time.monotonic()
        ids = [PeerID.from_base58(r.peer_id) for r in peers[:8]]
        try:
            snap, served = self._run_async(download_from_replicas(
                self._p2p, ids, self.run_id, work.stage, self.cfg.wire.limits(), timeout=100), timeout=120)
            work.load_consensus(snap)
        except (StateTransferError, TimeoutError, ValueError) as exc:
            self.metrics.count_state_download("failed")
            logger.warning("cannot download stage %d's consensus state (%s); trying a full download", work.stage, exc)
            return False
        work.progress = max(r.progress for r in peers)  # the schedule's position for warm-up and decay
        self._count_download(snap, started)
        logger.info("loaded stage %d's consensus state from %d peer(s) (chunks: %s)", work.stage, len(served),
                    served)
        return True

    def _count_download(self, snap, started: float) -> None:
        self.metrics.count_state_download("ok")
        self.metrics.state_download_seconds.observe(time.monotonic() - started)
        self.metrics.state_download_bytes_total.inc(sum(t.numel() * t.element_size() for t in snap.tensors.values()))

    async def _download(self, peer_id: str, stage: int):
        from hivemind.p2p import PeerID

        return await download_stage_state(
            self._p2p, PeerID.from_base58(peer_id), self.run_id, stage, self.cfg.wire.limits(), timeout=100
        )

    def _announce(self, state: str) -> None:
        work = self.work
        record = StageRecord(
            peer_id=self.dht.peer_id, run_id=self.run_id, stage=work.stage,
            num_stages=self.cfg.pipeline.num_stages, state=state, throughput=float(work.throughput),
            progress=work.progress, codecs=sorted(CODECS), timestamp=time.time(),
            addrs=self.dht.visible_maddrs()[:8], **(self.sync.record_fields() if self.sync is not None else {}),
            tokens_per_s=round(max(0.0, self._record_rate.update(self.metrics.totals()["tokens"])), 3),
            loss=round(self._recent_loss() or 0.0, 5), access=self.access.proof(self.run_id, self.dht.peer_id),
        )
        try:
            expiry = self.cfg.swarm.record_expiry_s
            if state == "offline":  # nothing refreshes it: let it say "left on purpose" for a while longer
                expiry = max(3 * expiry, 60.0)
            stored = self.dht.store_stage_record(record, expiry)
        except Exception as exc:  # counted by time_dht; retried at the next refresh
            logger.warning("cannot publish this node's record: %s", exc)
            return
        if not stored:  # hivemind reports "no peer accepted it" by returning False
            self.metrics.dht_failures_total.labels(op="store").inc()

    # serving loop ---------------------------------------------------------------------------------------

    def _train(self) -> None:
        def on_step(step: int, loss: float) -> None:
            t = self.cfg.train
            self.metrics.record_train_step(step=step, loss=loss, tokens=t.batch_size * t.seq_len * t.grad_accum,
                                           seconds=self.work.last_step_s)
            self._losses.append([round(time.time(), 3), round(loss, 5)])
            if self.sync is not None:
                try:
                    self.sync.after_step()
                except Exception:  # replica sync must never stop local training
                    logger.exception("replica sync failed after step %d", step)
            if step % t.log_every == 0:
                logger.info("step %d loss %.4f (%.2f microbatches/s)", step, loss, self.work.throughput)

        try:
            self.work.train(self.stop, on_step)
        except Exception:
            logger.exception("local training failed; serving without training")

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
                    self._announce("online")
                    self._publish_run_record()
                    records = self._observe()
                if self.sync is not None and self.sync.resync_requested:
                    self._resync()
                if sw.stage is None and now >= next_rebalance:
                    next_rebalance = now + self._jittered(sw.rebalance_period_s)
                    self._rebalance(records)
            except Exception as exc:  # a failed DHT call or download: keep serving, try again next round
                logger.warning("swarm upkeep failed (%s: %s); retrying next round", type(exc).__name__, exc)
            self.stop.wait(max(0.05, min(next_refresh, next_rebalance) - time.monotonic()))

    def _jittered(self, period: float) -> float:
        j = self.cfg.swarm.rebalance_jitter
        return period * random.uniform(1 - j, 1 + j)

    def _observe(self) -> dict[int, list[StageRecord]]:
        records, rejected = self.dht.get_stage_records(self.run_id, self.cfg.pipeline.num_stages)
        self._count_rejections(rejected)
        self._count_rejections(self.dht.rejected_inside_dht(), cumulative=True)
        serving = {s: [r for r in recs if r.state != "offline"] for s, recs in records.items()}
        everyone = [r for recs in serving.values() for r in recs]
        losses = [r.loss for r in everyone if r.loss > 0]
        self._peers_known = len({r.peer_id for r in everyone})
        self.metrics.set_swarm_view(
            peers_known=self._peers_known,
            stage_peers={s: len(recs) for s, recs in serving.items()},
            stage_throughput={s: sum(r.throughput for r in recs) for s, recs in serving.items()},
            tokens_per_second=sum(r.tokens_per_s for r in everyone),
            loss=sum(losses) / len(losses) if losses else math.nan,
        )
        self.metrics.throughput.set(self.work.throughput)
        if self.pipeline is not None:
            self.pipeline.observe(records, self.work.stage)
        if self.sync is not None:
            self.sync.observe(records)
        return records

    def _resync(self) -> None:
        """Fallen too many rounds behind: download the stage's state again, then rejoin the schedule."""
        logger.warning("stage %d: fell behind the other replicas; downloading the stage's state again", self.work.stage)
        self.sync.stats["resyncs"] += 1
        work, progress = self.work, self.work.progress
        self._download_into(work, prefer=self.sync.resync_from)
        with work.lock:  # the schedule's (and the data's) position never goes back
            work.progress = max(work.progress, progress)
        self.sync.attach(work)

    def _count_rejections(self, counts, cumulative: bool = False) -> None:
        for reason, n in counts.items():
            if cumulative:  # totals kept by the DHT process: export the increase
                n, self._reported_rejections[reason] = n - self._reported_rejections.get(reason, 0), n
            for _ in range(max(0, n)):
                self.metrics.count_record_rejected(reason)

    def _rebalance(self, records: dict[int, list[StageRecord]] | None = None) -> None:
        """``records``: the swarm as just read by this round's refresh, if there was one."""
        # After a move, let the swarm see it (records refresh) before deciding again.
        if time.monotonic() - self._last_move < 2 * self.cfg.swarm.rebalance_period_s:
            return
        if records is None:
            records = self._observe()
        me, n = self.dht.peer_id, self.cfg.pipeline.num_stages
        target = rebalance_target(
            stage_loads(records, n, exclude_peer=me), stage_servers(records, n, exclude_peer=me),
            self.work.stage, self.work.throughput, self.cfg.swarm.rebalance_gain, self.cfg.swarm.min_replicas,
        )
        if target is None or target not in self._fit:
            return
        # Every server of this stage sees the same improvement at about the same time; if all of them
        # moved, the swarm would overshoot and oscillate. Each moves with probability 1/k, so about one
        # does per round and the next round sees the result.
        here = stage_servers(records, n, exclude_peer=me)[self.work.stage] + 1
        if random.random() >= 1.0 / here:
            logger.debug("stage %d would be better served; leaving the move to one of %d peers", target, here)
            return
        logger.info("moving from stage %d to stage %d (loads %s)", self.work.stage, target, stage_loads(records, n))
        old = self.work
        self._announce("offline")
        old.save_checkpoint()
        self._take_stage(target)
        self._announce("online")

    # p2p (state downloads) ------------------------------------------------------------------------------

    def _start_p2p(self) -> None:
        ready = threading.Event()

        def loop_main() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._p2p_setup())
            except ConfigError as exc:
                self._fail(str(exc))
            except Exception as exc:
                logger.exception("cannot start the p2p services")
                self._fail(f"cannot start the p2p services: {exc}")
            finally:
                ready.set()
            self._loop.run_forever()

        threading.Thread(target=loop_main, name="p2p", daemon=True).start()
        ready.wait(60)

    async def _p2p_setup(self) -> None:
        # Every protoswarm handler and call goes through the access rules (swarm/access.py).
        self._p2p = GatedP2P(await self.dht.dht.replicate_p2p(), self.access,
                             on_denied=lambda peer: self.metrics.access_denied_total.inc())
        server = StageStateServer(
            self.run_id, lambda: self.work.snapshot() if self.work else None, self.cfg.wire.limits(),
            on_error=lambda exc: self.metrics.count_protocol_error(exc.code),
            consensus=lambda: self.work.consensus_snapshot() if self.work else None,
        )
        await server.register(self._p2p)
        # Who is banned where: peer_banned_seconds{peer_id, where} and /health "banned" (bounded).
        self.metrics.watch_bans("state", server.strikes.banned)
        self.metrics.watch_bans("exchange", lambda: self.sync.exchange.strikes.banned()
                                if self.sync is not None and self.sync.exchange is not None else {})
        self.metrics.watch_bans("pipeline", lambda: self.pipeline.plane.strikes.banned()
                                if self.pipeline is not None and self.pipeline.plane is not None else {})
        if self.cfg.diloco.enabled:
            self.sync = ReplicaSync(self.cfg, self.metrics, asyncio.get_running_loop(), self._p2p, self.dht.peer_id,
                                    self.run_id)
            self.sync.stop = self.stop
            await self.sync.register()
        if self.cfg.pipeline.num_stages > 1:
            self.pipeline = PipelineRole(self.cfg, self.metrics, asyncio.get_running_loop())
            if self.sync is not None:
                self.pipeline.step_hooks.append(self.sync.after_step)
            await self.pipeline.setup(self._p2p, self.dht.peer_id, self.run_id)

    def _stop_p2p(self) -> None:
        async def close() -> None:
            if self._p2p is not None:
                await self._p2p.shutdown()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self._run_async(close(), timeout=5)
        except Exception as exc:
            logger.debug("closing the p2p loop: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def _run_async(self, coro, timeout: float):
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()  # do not leave the download running on the loop
            raise

    # banner and shutdown --------------------------------------------------------------------------------

    def _print_banner(self) -> None:
        maddrs = self.dht.visible_maddrs()
        public = [m for m in maddrs if "/127.0.0.1/" not in m and "/::1/" not in m] or maddrs
        cfg = self.cfg
        self._print(f"node {self.dht.peer_id}")
        self._print(
            f"run {self.run_id}: model {cfg.model.name}, {cfg.pipeline.num_stages} stage(s); "
            f"serving stage {self.work.stage} (progress {self.work.progress}, "
            f"{self.work.throughput:.2f} microbatches/s)"
        )
        if public:
            self._print("to join this swarm from another machine, run:")
            self._print(f"    node start --join {public[0]} --run-id {self.run_id}")

    def _shutdown(self) -> int:
        deadline = time.monotonic() + self.cfg.swarm.shutdown_timeout_s
        done = threading.Event()

        def graceful() -> None:
            try:
                if self.work is not None and self.dht is not None and self.dht.online:
                    self._announce("offline")
                    self._set_state("offline")
                if self._trainer is not None:
                    self._trainer.join(max(1.0, deadline - time.monotonic() - 5))
                if self.pipeline is not None:
                    self.pipeline.stop()
                if self.work is not None:
                    try:
                        self.work.save_checkpoint()
                    except Exception:  # a full disk: still leave the swarm properly; the last periodic one stays
                        logger.exception("cannot write the shutdown checkpoint")
                if self._loop is not None:
                    self._stop_p2p()
                if self.dht is not None:
                    self.dht.shutdown()
                if self.server is not None:
                    self.server.shutdown()
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
