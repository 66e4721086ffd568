"""A local swarm of real `node start` processes on 127.0.0.1 (or on emulated home links).

:class:`LocalSwarm` starts node 0 (which creates the run) and nodes 1..N-1 (which join it), each a
separate process group with its own identity, checkpoint directory, log file and metrics port, and
one torch thread. It can kill (SIGKILL to the whole group: a machine dying), terminate (SIGTERM to
the daemon: a graceful exit), pause/resume (SIGSTOP/SIGCONT: a frozen machine) and restart nodes,
read each node's /health, and read the swarm through `node status`. Everything it starts is reaped
on exit. Used by `node sim` (swarm/sim/run.py, with a fault script from swarm/sim/faults.py) and by
the swarm tests (as a context manager).

With ``link=LinkSpec(...)`` each node gets a home link of that rate: its own network namespace with
tc tbf on both directions (swarm/sim/netns.py) when this process is root, or else, in-process
throttling of the nodes' protoswarm streams (``swarm.link``, swarm/sim/link.py), which says so: that
fallback does not shape the DHT. ``link_mode`` forces one ("netns" or "app").

With ``nat=[i, …]`` those nodes sit each behind a home router of its own (swarm/sim/netns.py: a
router namespace that masquerades; outbound only, no inbound port), with or without a ``link`` (then
shaped on the router's WAN). NAT needs the namespace lab (root) and iptables: when iptables is not
installed, Debian's package is unpacked into the cache (swarm/sim/iptables.py), and the log says so.
Node 0 founds the run and is every joiner's first bootstrap peer, so it is never behind NAT.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarm.exchange import ExchangeConfig
from swarm.procs import p2pd_sockets, remove_unbound_sockets
from swarm.sim.iptables import fetch_iptables, find_iptables
from swarm.sim.link import LinkSpec
from swarm.sim.netns import NetnsLab, nat_unavailable, netns_unavailable
from swarm.sim.targets import PrometheusTargets

logger = logging.getLogger(__name__)

LINK_MODES = ("auto", "netns", "app")
_METRICS_LINE = re.compile(r"metrics: http://[^:]+:(\d+)/metrics")
_JOIN_LINE = re.compile(r"node start --join (\S+)")
_REPO = Path(__file__).resolve().parents[2]  # where the nodes run `python -m node.cli`


class SimError(RuntimeError):
    """The simulation could not run as asked (bad fault script, a node that never came up, …)."""


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
    started_at: float = 0.0  # unix time of its last start
    stopped: bool = False  # killed or terminated by the harness (not a crash) and not started since
    held: bool = False  # paused or cut off by the harness: silent on purpose
    held_for_stage: int | None = None  # the stage of the fault target ("pause:sS") that paused it

    @property
    def log(self) -> Path:
        return self.home / "node.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _check_nat(nat: set[int], nodes: int, mode: str) -> None:
    """SimError when ``nat`` cannot be put behind home routers here (iptables is fetched if missing)."""
    if 0 in nat or any(not 0 < i < nodes for i in nat):
        raise SimError(f"nodes behind NAT must be in 1..{nodes - 1} (node 0 founds the run and is the "
                       f"bootstrap peer), got {sorted(nat)}")
    if mode == "app":
        raise SimError("NAT needs network-namespace links, not in-process emulation (link mode 'app')")
    if (reason := netns_unavailable()) is not None:
        raise SimError(f"cannot put nodes behind NAT: {reason}")
    if find_iptables() is None:
        logger.warning("iptables is not installed: unpacking Debian's package into the cache for the home routers")
        try:
            logger.info("iptables: %s", fetch_iptables())
        except RuntimeError as exc:
            raise SimError(f"cannot put nodes behind NAT: {exc}") from exc
    if (reason := nat_unavailable()) is not None:
        raise SimError(f"cannot put nodes behind NAT: {reason}")


def _emulate_links(link: LinkSpec, mode: str) -> tuple[str, str, NetnsLab | None]:
    """How ``link`` gets emulated: (the link mode, a note that says how, the namespace lab if there is one)."""
    if mode not in LINK_MODES:
        raise SimError(f"link mode must be one of {', '.join(LINK_MODES)}, got {mode!r}")
    reason = netns_unavailable() if mode in ("auto", "netns") else "in-process emulation was asked for"
    if reason and mode == "netns":
        raise SimError(f"cannot emulate links with network namespaces: {reason}")
    lab = None if reason else NetnsLab()
    if lab is None:
        note = (f"{link}: in-process throttling of protoswarm's own streams only (DHT traffic is not "
                f"shaped), because {reason}")
    else:
        note = (f"{link}: each node in its own network namespace, tc tbf on both directions of its "
                f"link ({lab.bridge}, 10.{lab.octet}.0.0/16)"
                + (", delay added per frame by the nodes (no netem here)" if link.delay_s else ""))
    logger.info("links: %s", note)
    return ("app" if lab is None else "netns"), note, lab


class LocalSwarm(PrometheusTargets):
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
        nat: Iterable[int] = (),
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
        self.bootstrap: str | None = None
        self._sockets_before = p2pd_sockets()
        self.link, self.link_mode, self.link_note = link, "none", ""
        self.lab: NetnsLab | None = None
        self.nat = set(nat)  # indices of the nodes behind a home router (NAT)
        try:
            if self.nat:
                _check_nat(self.nat, nodes, link_mode)
            if link is not None:
                self.link_mode, self.link_note, self.lab = _emulate_links(link, "netns" if self.nat else link_mode)
            elif self.nat:
                self.link_mode, self.lab = "netns", NetnsLab()
        except Exception as exc:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise exc if isinstance(exc, SimError) else SimError(f"cannot set up the links: {exc}") from exc

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

    def start_all(self, stagger: float = 0.0) -> None:
        """Node 0, then every other node, ``stagger`` seconds apart (volunteers do not all start at once)."""
        self.start_founder()
        for node in self.nodes[1:]:
            if stagger > 0 and node.index > 1:
                time.sleep(stagger)
            self.start(node.index)

    def start_founder(self) -> None:
        """Start node 0 (it creates the run) and wait for the join address it prints."""
        self.start(0)
        self.bootstrap = self._wait_for_line(self.nodes[0], _JOIN_LINE, self.startup_timeout)

    def _command(self, node: SimNode) -> list[str]:
        prefix = []
        if self.lab is not None:
            host = self.lab.add(node.index, self.link, nat=node.index in self.nat)
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
            local = ("swarm.", "dataplane.", *(f"exchange.{f}=" for f in ExchangeConfig.LOCAL_FIELDS))
            cmd += [a for o in self.overrides if o.startswith(local) for a in ("--set", o)]
        cmd += [a for o in self.node_overrides.get(node.index, []) for a in ("--set", o)]
        return cmd + self._link_setting()  # last: the harness's link wins over a swarm.link in the overrides

    def start(self, index: int) -> None:
        node = self.nodes[index]
        if node.alive:
            return
        node.home.mkdir(parents=True, exist_ok=True)
        node.log_offset = node.log.stat().st_size if node.log.exists() else 0
        node.metrics_port = None
        node.started_at, node.stopped, node.held = time.time(), False, False
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(node.log, "ab") as log:
            node.proc = subprocess.Popen(
                self._command(node), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                cwd=_REPO,
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
        node.stopped = True
        if node.proc is not None:
            self._group_signal(node, signal.SIGKILL)
            node.exit_codes.append(node.proc.wait(30))

    def term(self, index: int, timeout: float = 60.0) -> int:
        """SIGTERM to the daemon only (it stops its own children); returns its exit code."""
        node = self.nodes[index]
        node.stopped = True
        node.proc.send_signal(signal.SIGTERM)
        code = node.proc.wait(timeout)
        node.exit_codes.append(code)
        return code

    def pause(self, index: int) -> None:
        self.nodes[index].held = True
        self._group_signal(self.nodes[index], signal.SIGSTOP)

    def resume(self, index: int) -> None:
        self.nodes[index].held, self.nodes[index].held_for_stage = False, None
        self._group_signal(self.nodes[index], signal.SIGCONT)

    def partition(self, index: int) -> None:
        """Cut node ``index`` off the network (its namespace's link down; it keeps running)."""
        if self.lab is None or index not in self.lab.hosts:
            raise SimError("partitions need network-namespace links (--link with root)")
        self.nodes[index].held = True
        self.lab.set_link_up(index, False)

    def heal(self, index: int) -> None:
        if self.lab is not None and index in self.lab.hosts:
            self.nodes[index].held, self.nodes[index].held_for_stage = False, None
            self.lab.set_link_up(index, True)

    def add_node(self) -> int:
        """A fresh node (own identity and home), not started; returns its index."""
        index = len(self.nodes)
        self.nodes.append(SimNode(index, self.workdir / f"node{index}"))
        return index

    def serving(self, stage: int) -> list[int]:
        """Indices of live nodes that serve ``stage`` now (by their /health)."""
        return [i for i in range(len(self.nodes)) if (h := self.health(i)) and h.get("stage") == stage]

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
        """`node status --json` through the real CLI, from a separate process. ``timeout`` bounds its
        reads; the process gets twice that and two minutes more, since on a box its nodes saturate
        (24 nodes on 2 cores) merely starting Python and torch took 82 s (BENCHMARKS.md)."""
        limit = 2 * timeout + 120
        join = self.join_addresses()[:2]
        cmd = [sys.executable, "-m", "node.cli", "--log-level", "INFO", "status", "--json",
               "--run-id", self.run_id, "--timeout", str(timeout)]
        for addr in join:
            cmd += ["--join", addr]
        started, began = time.monotonic(), time.strftime("%H:%M:%S")
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=_REPO)
        except subprocess.TimeoutExpired as exc:  # what it had logged says how far it got
            said = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            raise SimError(f"node status (started at {began}) did not answer within {limit:.0f} s; its log: "
                           f"{_status_lines(said) or 'nothing'}") from None
        if out.returncode != 0:
            raise SimError(f"node status failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
        logger.info("node status answered in %.1f s: %s", time.monotonic() - started, _status_lines(out.stderr))
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


def _status_lines(log: str) -> str:
    """The progress lines of a `node status` log (swarm/status.py), with their clock times, for the sim's
    log and its errors."""
    said = [f"{line.split(' ', 1)[0]} {line.split('status: ', 1)[1]}" for line in log.splitlines()
            if "swarm.status: status: " in line]
    return "; ".join(said[-6:])
