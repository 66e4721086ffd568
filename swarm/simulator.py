"""A local swarm of real `node start` processes on 127.0.0.1 (or on emulated home links), with a fault script.

:class:`LocalSwarm` starts node 0 (which creates the run) and nodes 1..N-1 (which join it), each a
separate process group with its own identity, checkpoint directory, log file and metrics port, and
one torch thread. It can kill (SIGKILL to the whole group: a machine dying), terminate (SIGTERM to
the daemon: a graceful exit), pause/resume (SIGSTOP/SIGCONT: a frozen machine) and restart nodes,
read each node's /health, and read the swarm through `node status`. Everything it starts is reaped
on exit. Used by `node sim` and by the swarm tests (as a context manager).

With ``link=LinkSpec(...)`` each node gets a home link of that rate: its own network namespace with
tc tbf on both directions (swarm/links.py) when this process is root, or else, in-process throttling
of the nodes' protoswarm streams (``swarm.link``, protocol/link.py), which says so: that fallback
does not shape the DHT. ``link_mode`` forces one ("netns" or "app").
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.link import LinkSpec
from swarm.dht import p2pd_sockets, remove_unbound_sockets
from swarm.links import NetnsLab, netns_unavailable

logger = logging.getLogger(__name__)

LINK_MODES = ("auto", "netns", "app")
ACTIONS = ("kill", "kill-in-round", "term", "start", "pause", "resume", "partition", "heal")
IN_ROUND_WAIT_S = 15.0  # kill-in-round: how long to wait for the node to have a fragment exchange in flight
_METRICS_LINE = re.compile(r"metrics: http://[^:]+:(\d+)/metrics")
_JOIN_LINE = re.compile(r"node start --join (\S+)")


class SimError(RuntimeError):
    """The simulation could not run as asked (bad fault script, a node that never came up, …)."""


@dataclass
class Fault:
    at: float
    action: str
    node: int | None = None  # a node index; None with ``stage`` or ``new``
    stage: int | None = None  # "sS": one node serving stage S at that moment
    new: bool = False  # "start:new": a node that was not in the swarm before

    def __str__(self) -> str:
        target = "new" if self.new else f"s{self.stage}" if self.stage is not None else str(self.node)
        return f"{self.at:g}:{self.action}:{target}"


def parse_faults(text: str) -> list[Fault]:
    """``"20:kill:2,40:start:2"`` → faults sorted by time.

    The target is a node index, ``sS`` (one node serving stage S at that moment, e.g. ``60:kill:s1``),
    or, for ``start``, ``new`` (a fresh node joining the swarm, e.g. ``90:start:new``).
    """
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            at, action, target = item.split(":")
            fault = Fault(float(at), action)
            if target == "new":
                fault.new = True
            elif target.startswith("s"):
                fault.stage = int(target[1:])
            else:
                fault.node = int(target)
        except ValueError:
            raise SimError(f"bad fault {item!r}: expected SECONDS:ACTION:TARGET, e.g. 20:kill:2, 60:kill:s1, "
                           "90:start:new") from None
        if fault.action not in ACTIONS:
            raise SimError(f"bad fault {item!r}: action must be one of {', '.join(ACTIONS)}")
        if fault.new and fault.action != "start":
            raise SimError(f"bad fault {item!r}: only start can take a new node")
        numbers = [v for v in (fault.node, fault.stage) if v is not None]
        if not (math.isfinite(fault.at) and fault.at >= 0 and all(v >= 0 for v in numbers)):
            raise SimError(f"bad fault {item!r}: time, node and stage must be non-negative numbers")
        faults.append(fault)
    return sorted(faults, key=lambda f: f.at)


def processes_mentioning(text: str) -> list[int]:
    """PIDs (other than this one) whose command line mentions ``text``, e.g. a swarm's work directory:
    what is left of its nodes, their DHT processes and libp2p daemons."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(pid) != os.getpid():
            found.append(int(pid))
    return found


@dataclass
class SimNode:
    index: int
    home: Path
    proc: subprocess.Popen | None = None
    metrics_port: int | None = None
    log_offset: int = 0
    exit_codes: list[int] = field(default_factory=list)
    host: str = "127.0.0.1"  # where its /health and libp2p listen (its namespace's address with a lab)

    @property
    def log(self) -> Path:
        return self.home / "node.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class LocalSwarm:
    def __init__(
        self,
        nodes: int,
        config: str = "swarm/tiny",
        overrides: list[str] | None = None,
        workdir: str | Path | None = None,
        run_id: str = "sim",
        startup_timeout: float = 90.0,
        link: LinkSpec | None = None,
        link_mode: str = "auto",
        node_overrides: dict[int, list[str]] | None = None,
        prometheus_sd: str | Path | None = None,
    ):
        if nodes < 1:
            raise SimError("a swarm needs at least one node")
        self.config, self.overrides, self.run_id = config, list(overrides or []), run_id
        self.startup_timeout = startup_timeout
        self.node_overrides = node_overrides or {}  # node-local settings of single nodes, e.g. swarm.stage
        # Prometheus file-based service discovery: the live nodes' metrics endpoints, rewritten as they change.
        self.prometheus_sd = Path(prometheus_sd) if prometheus_sd else None
        self._sd_written: list | None = None
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="protoswarm-sim-"))
        self.nodes = [SimNode(i, self.workdir / f"node{i}") for i in range(nodes)]
        self.last_in_round: bool | None = None  # set by a kill-in-round fault: whether it hit an exchange
        self.bootstrap: str | None = None
        self._sockets_before = p2pd_sockets()
        self.link, self.link_mode, self.link_note = link, "none", ""
        self.lab: NetnsLab | None = None
        if link is not None:
            try:
                self._set_up_links(link, link_mode)
            except Exception as exc:
                if self._own_workdir:
                    shutil.rmtree(self.workdir, ignore_errors=True)
                raise exc if isinstance(exc, SimError) else SimError(f"cannot set up the links: {exc}") from exc

    def _set_up_links(self, link: LinkSpec, mode: str) -> None:
        if mode not in LINK_MODES:
            raise SimError(f"link mode must be one of {', '.join(LINK_MODES)}, got {mode!r}")
        reason = netns_unavailable() if mode in ("auto", "netns") else "in-process emulation was asked for"
        if reason and mode == "netns":
            raise SimError(f"cannot emulate links with network namespaces: {reason}")
        if reason:
            self.link_mode = "app"
            self.link_note = (f"{link}: in-process throttling of protoswarm's own streams only (DHT traffic is not "
                              f"shaped), because {reason}")
        else:
            self.lab = NetnsLab()
            self.link_mode = "netns"
            self.link_note = (f"{link}: each node in its own network namespace, tc tbf on both directions of its "
                              f"link ({self.lab.bridge}, 10.{self.lab.octet}.0.0/16)"
                              + (", delay added per frame by the nodes (no netem here)" if link.delay_s else ""))
        logger.info("links: %s", self.link_note)

    def _link_setting(self) -> list[str]:
        """The node-side part of the link emulation (`swarm.link`), if any."""
        if self.link is None:
            return []
        if self.link_mode == "app":
            return ["--set", f"swarm.link={json.dumps(str(self.link))}"]
        # The namespace shapes the rate; the node adds only the delay (and drops a rate its config names).
        delay_only = str(LinkSpec(None, self.link.delay_s)) if self.link.delay_s else ""
        return ["--set", f"swarm.link={json.dumps(delay_only)}"]

    def reshape(self, link: LinkSpec | None) -> None:
        """Change every node's link rate now (namespace labs only; delay stays as the nodes started)."""
        if self.lab is None:
            raise SimError("links can only be reshaped live with network namespaces")
        self.link = link if link is not None else LinkSpec(None, 0.0)
        for index in self.lab.hosts:
            self.lab.shape(index, link)

    def link_bytes(self) -> list[dict[str, int] | None]:
        """Bytes each node's emulated link carried (network-namespace labs only; None otherwise)."""
        if self.lab is None:
            return [None] * len(self.nodes)
        return [self.lab.link_bytes(n.index) if n.index in self.lab.hosts else None for n in self.nodes]

    # lifecycle -----------------------------------------------------------------------------------------

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def start_all(self) -> None:
        self.start(0)
        self.bootstrap = self._wait_for_line(self.nodes[0], _JOIN_LINE, self.startup_timeout)
        for node in self.nodes[1:]:
            self.start(node.index)

    def _command(self, node: SimNode) -> list[str]:
        prefix = []
        if self.lab is not None:
            host = self.lab.add(node.index, self.link)
            node.host, prefix = host.address, self.lab.exec_prefix(node.index)
        cmd = [
            *prefix, sys.executable, "-m", "node.cli", "start", "--config", self.config,
            "--identity", str(node.home / "identity.key"), "--metrics-host", node.host, "--metrics-port", "0",
            "--host-maddrs", f"/ip4/{node.host}/tcp/0", "--threads", "1",
            "--set", f"train.checkpoint_dir={json.dumps(str(node.home / 'checkpoints'))}",
        ]
        if node.index == 0:
            cmd += ["--run-id", self.run_id] + [a for o in self.overrides for a in ("--set", o)]
        else:
            if self.bootstrap is None:
                raise SimError("node 0 must be up before others can join")
            # Any live node lets a joiner in: node 0 may have been killed by the fault script.
            for addr in self.join_addresses()[:3]:
                cmd += ["--join", addr]
            cmd += ["--run-id", self.run_id]
            # Node-local settings apply to every node; run parameters come from node 0's run record.
            cmd += [a for o in self.overrides if o.startswith(("swarm.", "dataplane.", "exchange.")) for a in ("--set", o)]
        cmd += [a for o in self.node_overrides.get(node.index, []) for a in ("--set", o)]
        return cmd + self._link_setting()  # last: the harness's link wins over a swarm.link in the overrides

    def start(self, index: int) -> None:
        node = self.nodes[index]
        if node.alive:
            return
        node.home.mkdir(parents=True, exist_ok=True)
        node.log_offset = node.log.stat().st_size if node.log.exists() else 0
        node.metrics_port = None
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(node.log, "ab") as log:
            node.proc = subprocess.Popen(
                self._command(node), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                cwd=Path(__file__).resolve().parents[1],
            )
        logger.info("node %d started (pid %d)", index, node.proc.pid)

    def _group_signal(self, node: SimNode, sig: int) -> None:
        try:
            os.killpg(node.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self, index: int) -> None:
        """SIGKILL the node's whole process group: no OFFLINE record, no checkpoint (a machine dying)."""
        node = self.nodes[index]
        if node.proc is not None:
            self._group_signal(node, signal.SIGKILL)
            node.exit_codes.append(node.proc.wait(30))

    def term(self, index: int, timeout: float = 60.0) -> int:
        """SIGTERM to the daemon only (it stops its own children); returns its exit code."""
        node = self.nodes[index]
        node.proc.send_signal(signal.SIGTERM)
        code = node.proc.wait(timeout)
        node.exit_codes.append(code)
        return code

    def pause(self, index: int) -> None:
        self._group_signal(self.nodes[index], signal.SIGSTOP)

    def resume(self, index: int) -> None:
        self._group_signal(self.nodes[index], signal.SIGCONT)

    def partition(self, index: int) -> None:
        """Cut node ``index`` off the network (its namespace's link down; it keeps running)."""
        if self.lab is None or index not in self.lab.hosts:
            raise SimError("partitions need network-namespace links (--link with root)")
        self.lab.set_link_up(index, False)

    def heal(self, index: int) -> None:
        if self.lab is not None and index in self.lab.hosts:
            self.lab.set_link_up(index, True)

    def add_node(self) -> int:
        """A fresh node (own identity and home), not started; returns its index."""
        index = len(self.nodes)
        self.nodes.append(SimNode(index, self.workdir / f"node{index}"))
        return index

    def serving(self, stage: int) -> list[int]:
        """Indices of live nodes that serve ``stage`` now (by their /health)."""
        return [i for i in range(len(self.nodes)) if (h := self.health(i)) and h.get("stage") == stage]

    def resolve(self, fault: Fault) -> int | None:
        """The node index a fault acts on now; None when no node fits (e.g. no live server of the stage)."""
        if fault.new:
            return self.add_node()
        if fault.stage is not None:
            candidates = [i for i in self.serving(fault.stage) if i != 0] or self.serving(fault.stage)
            return candidates[-1] if candidates else None
        return fault.node

    def apply(self, fault: Fault) -> int | None:
        """Carry out ``fault``; returns the node index it acted on (None: nothing fitted, logged)."""
        index = self.resolve(fault)
        if index is None:
            logger.warning("fault %s ignored: no live node serves stage %s", fault, fault.stage)
            return None
        self._apply(Fault(fault.at, fault.action, index))
        return index

    def _apply(self, fault: Fault) -> None:
        node = self.nodes[fault.node]
        if fault.action not in ("start", "heal") and not node.alive:
            logger.warning("fault %s on node %d ignored: it is not running", fault.action, fault.node)
            return
        if fault.action == "term":
            self._group_signal(node, signal.SIGCONT)  # a paused node cannot handle SIGTERM
        if fault.action == "kill-in-round":
            self.last_in_round = self._wait_in_round(fault.node)
            self.kill(fault.node)
            return
        getattr(self, fault.action)(fault.node)

    def _wait_in_round(self, index: int) -> bool:
        """Wait (up to IN_ROUND_WAIT_S) until node ``index`` reports a fragment exchange in flight."""
        deadline = time.monotonic() + IN_ROUND_WAIT_S
        while time.monotonic() < deadline:
            health = self.health(index) or {}
            if health.get("outer", {}).get("rounds_in_flight", 0) > 0:
                return True
            time.sleep(0.1)
        logger.warning("node %d had no fragment exchange in flight within %.0f s; killing it anyway", index,
                       IN_ROUND_WAIT_S)
        return False

    def shutdown(self) -> None:
        """Terminate every node gracefully, then kill whatever is left of their process groups."""
        live = [n for n in self.nodes if n.alive]
        for node in live:
            self._group_signal(node, signal.SIGCONT)
            node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 40
        for node in live:
            try:
                node.exit_codes.append(node.proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                logger.warning("node %d did not stop in time: killing it", node.index)
        try:
            for node in self.nodes:
                if node.proc is not None:
                    self._group_signal(node, signal.SIGKILL)  # children left in the group, if any
                    if node.proc.poll() is None:
                        node.proc.wait(10)
            # Killed nodes (SIGKILL: "machine died") cannot remove their libp2p socket files; the harness does.
            remove_unbound_sockets(p2pd_sockets() - self._sockets_before)
        finally:
            if self.lab is not None:
                self.lab.close()
            self.write_prometheus_targets()  # no live node left: an empty target list
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # observation ---------------------------------------------------------------------------------------

    def _read_log(self, node: SimNode) -> str:
        with open(node.log, "rb") as f:
            f.seek(node.log_offset)
            return f.read().decode(errors="replace")

    def _wait_for_line(self, node: SimNode, pattern: re.Pattern, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self._read_log(node))
            if match:
                return match.group(1)
            if not node.alive:
                raise SimError(f"node {node.index} exited ({node.proc.returncode}):\n{self._read_log(node)[-3000:]}")
            time.sleep(0.2)
        raise SimError(f"node {node.index}: no {pattern.pattern!r} within {timeout:.0f} s:\n{self._read_log(node)[-3000:]}")

    def _metrics_port(self, node: SimNode) -> int | None:
        if node.metrics_port is None:
            match = _METRICS_LINE.search(self._read_log(node))
            node.metrics_port = int(match.group(1)) if match else None
        return node.metrics_port

    def write_prometheus_targets(self) -> bool:
        """Write the live nodes' metrics endpoints to ``prometheus_sd`` (Prometheus ``file_sd_configs``
        format) when they changed; atomically, so Prometheus never reads half a file. True if written."""
        if self.prometheus_sd is None:
            return False
        groups = [{"targets": [f"{node.host}:{node.metrics_port}"],
                   "labels": {"swarm": self.run_id, "node": str(node.index)}}
                  for node in self.nodes if node.alive and self._metrics_port(node) is not None]
        if groups == self._sd_written:
            return False
        self.prometheus_sd.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.prometheus_sd.with_name(self.prometheus_sd.name + ".tmp")
        tmp.write_text(json.dumps(groups, indent=1) + "\n")
        os.replace(tmp, self.prometheus_sd)
        self._sd_written = groups
        return True

    def health(self, index: int, since: float | None = None) -> dict[str, Any] | None:
        """Node ``index``'s /health (None when it is down); ``since``: only losses scored after that time."""
        node = self.nodes[index]
        if not node.alive or self._metrics_port(node) is None:
            return None
        try:
            with urllib.request.urlopen(f"http://{node.host}:{node.metrics_port}/health" + (f"?since={since}" if since else ""),
                                        timeout=5) as r:
                return json.load(r)
        except (OSError, ValueError):
            return None

    def metrics_url(self, index: int) -> str | None:
        self.health(index)
        node = self.nodes[index]
        return f"http://{node.host}:{node.metrics_port}/metrics" if node.metrics_port else None

    def join_addresses(self) -> list[str]:
        """Multiaddrs of live nodes (any of them lets a reader into the swarm)."""
        addrs = []
        for i, node in enumerate(self.nodes):
            h = self.health(i) if node.alive else None
            if h and h.get("maddrs"):
                addrs.append(h["maddrs"][0])
        return addrs or ([self.bootstrap] if self.bootstrap else [])

    def status(self, timeout: float = 30.0) -> dict[str, Any]:
        """`node status --json` through the real CLI, from a separate process."""
        join = self.join_addresses()[:2]
        cmd = [sys.executable, "-m", "node.cli", "--log-level", "WARNING", "status", "--json",
               "--run-id", self.run_id, "--timeout", str(timeout)]
        for addr in join:
            cmd += ["--join", addr]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60,
                             cwd=Path(__file__).resolve().parents[1])
        if out.returncode != 0:
            raise SimError(f"node status failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str, interval: float = 1.0) -> float:
        """Poll until ``predicate()``; returns the seconds it took, raises SimError at the deadline."""
        start = time.monotonic()
        last_error: Exception | None = None
        while time.monotonic() - start < timeout:
            try:
                if predicate():
                    return time.monotonic() - start
            except SimError as exc:
                last_error = exc
            time.sleep(interval)
        raise SimError(f"not within {timeout:.0f} s: {what}" + (f" (last error: {last_error})" if last_error else ""))


class PipelineMonitor:
    """Collects training losses, pipeline counters and replica-sync counters of every node incarnation
    from /health.

    Counters restart with a process, so each (node, pid) is kept apart and summed at the end; losses
    (the last stage's in a pipeline, every replica's with one stage) are merged by wall-clock time.
    """

    COUNTERS = ("microbatches_ok", "microbatches_dropped", "microbatches_retried", "tokens_ok", "served",
                "refused", "bytes_forward_sent", "bytes_backward_sent", "dense_forward_sent",
                "dense_backward_sent")
    OUTER_COUNTERS = ("rounds_started", "rounds_committed", "rounds_skipped", "rounds_missed", "resyncs",
                      "bytes_sent", "bytes_received", "parts_rejected", "inner_steps")

    def __init__(self) -> None:
        self.latest: dict[tuple[int, int], dict[str, Any]] = {}  # (node, pid) → last pipeline stats
        self.outer: dict[tuple[int, int], dict[str, Any]] = {}  # (node, pid) → last replica-sync stats
        self.losses: dict[tuple[int, float], float] = {}  # (node, unix time) → loss
        self.last_loss_t: dict[tuple[int, int], float] = {}  # (node, pid) → time of its last loss seen
        self.trained: dict[tuple[int, int], int] = {}  # (node, pid) → tokens of its local steps (S = 1)
        self.devices: dict[tuple[int, int], dict[str, Any]] = {}  # (node, pid) → its device and memory
        self.seen = False

    def poll(self, swarm: LocalSwarm) -> list[dict[str, Any] | None]:
        """Read every node's /health into the monitor; returns them (None for nodes that are down)."""
        healths = []
        for node in swarm.nodes:
            pid = node.proc.pid if node.proc is not None else None
            # Only the losses this incarnation scored since the last poll: small replies (with link
            # emulation the polls cross the nodes' shaped links too).
            health = swarm.health(node.index, since=self.last_loss_t.get((node.index, pid)))
            if health is not None and pid is not None:
                self.observe(node.index, pid, health)
            healths.append(health)
        return healths

    def observe(self, index: int, pid: int, health: dict[str, Any] | None) -> None:
        """One /health of node ``index`` while it runs as process ``pid`` (one incarnation)."""
        if not health:
            return
        if "outer" in health:
            self.seen = True
            self.outer[(index, pid)] = {**health["outer"], "stage": health.get("stage")}
        if isinstance(health.get("device"), dict):
            self.devices[(index, pid)] = health["device"]
        if "train" in health:
            self.trained[(index, pid)] = int(health["train"].get("tokens", 0))
        for source in ("pipeline", "train"):
            if source not in health:
                continue
            self.seen = True
            if source == "pipeline":
                self.latest[(index, pid)] = {**health["pipeline"], "stage": health.get("stage")}
            for t, loss in health[source].get("recent_losses", []):
                self.losses[(index, t)] = loss
                self.last_loss_t[(index, pid)] = max(t, self.last_loss_t.get((index, pid), 0.0))

    def summary(self, end_time: float) -> dict[str, Any]:
        out = self._loss_summary()
        if self.latest:
            out.update(self._pipeline_summary(end_time))
        elif self.trained:
            out.update(self._replica_summary(end_time))
        if self.devices:
            peaks = [int(d.get("peak_bytes", 0)) for d in self.devices.values()]
            out["devices"] = sorted({str(d.get("device")) for d in self.devices.values()})
            out["peak_memory_bytes_max"] = max(peaks)
        if self.outer:
            out.update(self._outer_summary())
        return out

    def _replica_summary(self, end_time: float) -> dict[str, Any]:
        """One stage: every replica trains the whole model; tokens/s over the swarm since the first loss."""
        tokens = sum(self.trained.values())
        first = min((t for (_, t) in self.losses), default=None)
        elapsed = end_time - first if first is not None else 0.0
        return {"tokens": tokens, "tokens_per_s": round(tokens / elapsed, 2) if elapsed > 0 else 0.0}

    def _loss_summary(self) -> dict[str, Any]:
        curve = sorted((t, loss) for (_, t), loss in self.losses.items())
        window = max(5, len(curve) // 10)
        first, last = curve[:window], curve[-window:]
        buckets: dict[int, list[float]] = {}
        for t, loss in curve:
            buckets.setdefault(int((t - curve[0][0]) // 10), []).append(loss)
        return {
            "loss_start": round(sum(v for _, v in first) / len(first), 4) if curve else None,
            "loss_end": round(sum(v for _, v in last) / len(last), 4) if curve else None,
            "loss_window": window if curve else 0,
            "losses_scored": len(curve),
            "loss_curve_10s": [[10 * b, round(sum(v) / len(v), 4)] for b, v in sorted(buckets.items())],
        }

    def _pipeline_summary(self, end_time: float) -> dict[str, Any]:
        totals = {name: sum(int(p.get(name, 0)) for p in self.latest.values()) for name in self.COUNTERS}
        curve = sorted(t for (_, t) in self.losses)
        sent = totals["bytes_forward_sent"] + totals["bytes_backward_sent"]
        dense = totals["dense_forward_sent"] + totals["dense_backward_sent"]
        elapsed = end_time - curve[0] if curve else 0.0
        served: dict[int, int] = {}
        driven: dict[int, int] = {}
        for (index, _), p in self.latest.items():
            served[index] = served.get(index, 0) + int(p.get("served", 0))
            driven[index] = driven.get(index, 0) + int(p.get("microbatches_ok", 0))
        return {
            "tokens": totals["tokens_ok"],
            "tokens_per_s": round(totals["tokens_ok"] / elapsed, 2) if elapsed > 0 else 0.0,
            "bytes_forward": totals["bytes_forward_sent"],
            "bytes_backward": totals["bytes_backward_sent"],
            "bytes_per_token": round(sent / totals["tokens_ok"], 2) if totals["tokens_ok"] else None,
            "dense_bf16_bytes": dense,
            "wire_compression_ratio": round(dense / sent, 2) if sent else None,
            "microbatches_ok": totals["microbatches_ok"],
            "microbatches_dropped": totals["microbatches_dropped"],
            "microbatches_retried": totals["microbatches_retried"],
            "frames_refused": totals["refused"],
            "served_per_node": {str(i): n for i, n in sorted(served.items())},
            "driven_per_node": {str(i): n for i, n in sorted(driven.items())},
        }

    def _outer_summary(self) -> dict[str, Any]:
        totals = {name: sum(int(o.get(name, 0)) for o in self.outer.values()) for name in self.OUTER_COUNTERS}
        per_stage: dict[str, int] = {}
        per_node: dict[str, int] = {}
        for (index, _), o in self.outer.items():
            if o.get("stage") is not None:
                per_stage[str(o["stage"])] = per_stage.get(str(o["stage"]), 0) + int(o.get("rounds_committed", 0))
            per_node[str(index)] = per_node.get(str(index), 0) + int(o.get("rounds_committed", 0))
        params = max((int(o.get("params", 0)) for o in self.outer.values()), default=0)
        steps = totals["inner_steps"]
        return {
            "outer_rounds_committed": totals["rounds_committed"],
            "outer_rounds_skipped": totals["rounds_skipped"],
            "outer_rounds_missed": totals["rounds_missed"],
            "outer_rounds_committed_per_stage": dict(sorted(per_stage.items())),
            "outer_rounds_committed_per_node": dict(sorted(per_node.items())),
            "outer_parts_rejected": totals["parts_rejected"],
            "resyncs": totals["resyncs"],
            "inner_steps_total": steps,
            "bytes_sent_total": totals["bytes_sent"],
            # Exchange bytes per parameter of a stage per inner step, summed over replicas. Data parallel
            # with fp32 gradients sends 4 bytes per parameter per step from every replica.
            "bytes_per_param_per_step": round(totals["bytes_sent"] / (params * steps), 6) if params and steps else None,
        }


def run_simulation(
    nodes: int,
    config: str,
    overrides: list[str],
    duration: float,
    faults: list[Fault],
    workdir: str | None = None,
    quiet: bool = False,
    link: LinkSpec | None = None,
    link_mode: str = "auto",
    prometheus_sd: str | None = None,
) -> dict[str, Any]:
    """Start the swarm, replay ``faults``, print progress, and return a summary.

    ``prometheus_sd``: keep this file listing the live nodes' /metrics targets (file_sd_configs)."""

    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    events = []
    for fault in faults:
        if fault.node is not None and fault.node >= nodes:
            raise SimError(f"fault {fault} names a node outside 0..{nodes - 1} (use 'new' to add one)")
    monitor = PipelineMonitor()
    with LocalSwarm(nodes, config, overrides, workdir, link=link, link_mode=link_mode,
                    prometheus_sd=prometheus_sd) as swarm:
        if swarm.link_note:
            say(f"links: {swarm.link_note}")
        start = time.monotonic()
        swarm.start_all()
        say(f"swarm of {nodes} node(s) starting in {swarm.workdir} (bootstrap {swarm.bootstrap})")
        pending = list(faults)
        next_report = next_poll = 0.0
        while (elapsed := time.monotonic() - start) < duration:
            while pending and pending[0].at <= elapsed:
                fault = pending.pop(0)
                swarm.last_in_round = None
                index = swarm.apply(fault)
                events.append({"t": round(elapsed, 1), "action": fault.action, "target": str(fault).split(":")[-1],
                               "node": index,
                               **({"in_round": swarm.last_in_round} if swarm.last_in_round is not None else {})})
                say(f"[{elapsed:6.1f}s] {fault.action} node {index} ({fault})")
            if elapsed >= next_poll:
                healths = monitor.poll(swarm)
                if swarm.write_prometheus_targets():
                    say(f"[{elapsed:6.1f}s] prometheus targets: {len(swarm._sd_written)} node(s) in {prometheus_sd}")
                next_poll = elapsed + 2.0
                if elapsed >= next_report:
                    rows = []
                    for i, h in enumerate(healths):
                        if not h:
                            rows.append(f"{i}:down")
                            continue
                        row = f"{i}:{h['state']}/s{h['stage']}/p{h['progress']}"
                        if "pipeline" in h:
                            losses = h["pipeline"].get("recent_losses") or []
                            row += f"/ok{h['pipeline'].get('microbatches_ok', 0)}" if h["stage"] == 0 else ""
                            row += f"/loss{losses[-1][1]:.3f}" if losses else ""
                        rows.append(row)
                    say(f"[{elapsed:6.1f}s] " + "  ".join(rows))
                    next_report = elapsed + 10.0
            time.sleep(0.5)
        monitor.poll(swarm)
        end_time = time.time()
        try:
            status = swarm.status()
        except SimError as exc:
            status = {"error": str(exc)}
        healths = [swarm.health(i) for i in range(len(swarm.nodes))]
        summary = {
            "ok": "error" not in status and all(s["servers"] > 0 for s in status.get("stages", [])),
            "nodes": len(swarm.nodes),
            "duration_s": round(time.monotonic() - start, 1),
            "run_id": swarm.run_id,
            "events": events,
            "stages": status.get("stages"),
            "peers_online": sum(1 for p in status.get("peers", []) if p["state"] == "ONLINE"),
            "progress": [h["progress"] if h else None for h in healths],
            "stage_of_node": [h["stage"] if h else None for h in healths],
            "status_error": status.get("error"),
            "workdir": str(swarm.workdir) if workdir else None,
        }
        if link is not None:
            summary["link"] = {"spec": str(link), "mode": swarm.link_mode, "note": swarm.link_note,
                               "bytes": swarm.link_bytes()}
        if monitor.seen:
            summary.update(monitor.summary(end_time))
    return summary
