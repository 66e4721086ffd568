"""A local swarm of real `node start` processes on 127.0.0.1, with a fault script.

:class:`LocalSwarm` starts node 0 (which creates the run) and nodes 1..N-1 (which join it), each a
separate process group with its own identity, checkpoint directory, log file and metrics port, and
one torch thread. It can kill (SIGKILL to the whole group: a machine dying), terminate (SIGTERM to
the daemon: a graceful exit), pause/resume (SIGSTOP/SIGCONT: a frozen machine) and restart nodes,
read each node's /health, and read the swarm through `node status`. Everything it starts is reaped
on exit. Used by `node sim` and by the swarm tests (as a context manager).
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

from swarm.dht import p2pd_sockets, remove_unbound_sockets

logger = logging.getLogger(__name__)

ACTIONS = ("kill", "term", "start", "pause", "resume")
_METRICS_LINE = re.compile(r"metrics: http://[^:]+:(\d+)/metrics")
_JOIN_LINE = re.compile(r"node start --join (\S+)")


class SimError(RuntimeError):
    """The simulation could not run as asked (bad fault script, a node that never came up, …)."""


@dataclass
class Fault:
    at: float
    action: str
    node: int


def parse_faults(text: str) -> list[Fault]:
    """``"20:kill:2,40:start:2"`` → faults sorted by time."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            at, action, node = item.split(":")
            fault = Fault(float(at), action, int(node))
        except ValueError:
            raise SimError(f"bad fault {item!r}: expected SECONDS:ACTION:NODE, e.g. 20:kill:2") from None
        if fault.action not in ACTIONS:
            raise SimError(f"bad fault {item!r}: action must be one of {', '.join(ACTIONS)}")
        if not (math.isfinite(fault.at) and fault.at >= 0 and fault.node >= 0):
            raise SimError(f"bad fault {item!r}: time and node must be non-negative numbers")
        faults.append(fault)
    return sorted(faults, key=lambda f: f.at)


@dataclass
class SimNode:
    index: int
    home: Path
    proc: subprocess.Popen | None = None
    metrics_port: int | None = None
    log_offset: int = 0
    exit_codes: list[int] = field(default_factory=list)

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
    ):
        if nodes < 1:
            raise SimError("a swarm needs at least one node")
        self.config, self.overrides, self.run_id = config, list(overrides or []), run_id
        self.startup_timeout = startup_timeout
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="protoswarm-sim-"))
        self.nodes = [SimNode(i, self.workdir / f"node{i}") for i in range(nodes)]
        self.bootstrap: str | None = None
        self._sockets_before = p2pd_sockets()

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
        cmd = [
            sys.executable, "-m", "node.cli", "start", "--config", self.config,
            "--identity", str(node.home / "identity.key"), "--metrics-host", "127.0.0.1", "--metrics-port", "0",
            "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", "1",
            "--set", f"train.checkpoint_dir={json.dumps(str(node.home / 'checkpoints'))}",
        ]
        if node.index == 0:
            cmd += ["--run-id", self.run_id] + [a for o in self.overrides for a in ("--set", o)]
        else:
            if self.bootstrap is None:
                raise SimError("node 0 must be up before others can join")
            cmd += ["--join", self.bootstrap, "--run-id", self.run_id]
            cmd += [a for o in self.overrides if o.startswith("swarm.") for a in ("--set", o)]
        return cmd

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

    def apply(self, fault: Fault) -> None:
        node = self.nodes[fault.node]
        if fault.action != "start" and not node.alive:
            logger.warning("fault %s on node %d ignored: it is not running", fault.action, fault.node)
            return
        if fault.action == "term":
            self._group_signal(node, signal.SIGCONT)  # a paused node cannot handle SIGTERM
        getattr(self, fault.action)(fault.node)

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
        for node in self.nodes:
            if node.proc is not None:
                self._group_signal(node, signal.SIGKILL)  # children left in the group, if any
                if node.proc.poll() is None:
                    node.proc.wait(10)
        # Killed nodes (SIGKILL: "machine died") cannot remove their libp2p socket files; the harness does.
        remove_unbound_sockets(p2pd_sockets() - self._sockets_before)
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

    def health(self, index: int) -> dict[str, Any] | None:
        node = self.nodes[index]
        if not node.alive:
            return None
        if node.metrics_port is None:
            match = _METRICS_LINE.search(self._read_log(node))
            if not match:
                return None
            node.metrics_port = int(match.group(1))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/health", timeout=5) as r:
                return json.load(r)
        except (OSError, ValueError):
            return None

    def metrics_url(self, index: int) -> str | None:
        self.health(index)
        port = self.nodes[index].metrics_port
        return f"http://127.0.0.1:{port}/metrics" if port else None

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


def run_simulation(
    nodes: int,
    config: str,
    overrides: list[str],
    duration: float,
    faults: list[Fault],
    workdir: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Start the swarm, replay ``faults``, print progress, and return a summary."""

    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    events = []
    for fault in faults:
        if fault.node >= nodes:
            raise SimError(f"fault {fault.at:g}:{fault.action}:{fault.node} names a node outside 0..{nodes - 1}")
    with LocalSwarm(nodes, config, overrides, workdir) as swarm:
        start = time.monotonic()
        swarm.start_all()
        say(f"swarm of {nodes} node(s) starting in {swarm.workdir} (bootstrap {swarm.bootstrap})")
        pending = list(faults)
        next_report = 0.0
        while (elapsed := time.monotonic() - start) < duration:
            while pending and pending[0].at <= elapsed:
                fault = pending.pop(0)
                swarm.apply(fault)
                events.append({"t": round(elapsed, 1), "action": fault.action, "node": fault.node})
                say(f"[{elapsed:6.1f}s] {fault.action} node {fault.node}")
            if elapsed >= next_report:
                rows = []
                for i in range(nodes):
                    h = swarm.health(i)
                    rows.append(f"{i}:{h['state']}/s{h['stage']}/p{h['progress']}" if h else f"{i}:down")
                say(f"[{elapsed:6.1f}s] " + "  ".join(rows))
                next_report = elapsed + 5.0
            time.sleep(0.5)
        try:
            status = swarm.status()
        except SimError as exc:
            status = {"error": str(exc)}
        healths = [swarm.health(i) for i in range(nodes)]
        summary = {
            "ok": "error" not in status and all(s["servers"] > 0 for s in status.get("stages", [])),
            "nodes": nodes,
            "duration_s": round(time.monotonic() - start, 1),
            "run_id": swarm.run_id,
            "events": events,
            "stages": status.get("stages"),
            "peers_online": sum(1 for p in status.get("peers", []) if p["state"] == "ONLINE"),
            "progress": [h["progress"] if h else None for h in healths],
            "status_error": status.get("error"),
            "workdir": str(swarm.workdir) if workdir else None,
        }
    return summary
