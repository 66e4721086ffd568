"""`node sim`: start a local swarm, replay a fault script on it, print progress, return a summary."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from swarm.sim.faults import Fault, apply_fault
from swarm.sim.link import LinkSpec
from swarm.sim.monitor import PipelineMonitor, progress_line
from swarm.sim.swarm import LocalSwarm, SimError

POLL_S = 2.0  # /health of every node (and the Prometheus targets) this often
REPORT_S = 10.0  # a progress line this often


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
    nat: int = 0,
) -> dict[str, Any]:
    """Start the swarm, replay ``faults``, print progress, and return a summary.

    ``prometheus_sd``: keep this file listing the live nodes' /metrics targets (file_sd_configs).
    ``nat``: the last ``nat`` nodes sit each behind a home router (the summary's ``nat`` object)."""

    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    for fault in faults:
        if fault.node is not None and fault.node >= nodes:
            raise SimError(f"fault {fault} names a node outside 0..{nodes - 1} (use 'new' to add one)")
    if not 0 <= nat < nodes:
        raise SimError(f"--nat {nat}: at most {nodes - 1} of {nodes} nodes can be behind NAT (node 0 founds the run "
                       "and is the bootstrap peer, which must be reachable)")
    monitor = PipelineMonitor()
    watch = NatWatch(list(range(nodes - nat, nodes)))
    monitor.listeners.append(watch.observe)
    with LocalSwarm(nodes, config, overrides, workdir, link=link, link_mode=link_mode,
                    prometheus_sd=prometheus_sd, nat=watch.nodes) as swarm:
        if swarm.link_note:
            say(f"links: {swarm.link_note}")
        start = time.monotonic()
        swarm.start_all()
        say(f"swarm of {nodes} node(s) starting in {swarm.workdir} (bootstrap {swarm.bootstrap})")
        events = _replay(swarm, monitor, faults, start, duration, say)
        final = monitor.poll(swarm)
        end_time = time.time()
        try:
            status = swarm.status()
        except SimError as exc:
            status = {"error": str(exc)}
        summary = _summary(swarm, start, events, workdir, status, final)
        if link is not None:
            summary["link"] = {"spec": str(link), "mode": swarm.link_mode, "note": swarm.link_note,
                               "bytes": swarm.link_bytes()}
        if monitor.seen:
            summary.update(monitor.summary(end_time))
        if nat:
            summary["nat"] = watch.summary(monitor, final, status.get("peers") or [])
    return summary


class NatWatch:
    """The nodes behind NAT through a run: their peer ids and every ban another node placed on them."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.peer_ids: dict[int, str] = {}  # node index -> peer id (by /health; an identity is kept on restart)
        self.bans: set[tuple[int, str, int]] = set()  # (banning node, where, banned node behind NAT)
        self.last: dict[int, dict[str, Any]] = {}  # each node's last /health

    def observe(self, index: int, health: dict[str, Any]) -> None:
        self.last[index] = health
        if health.get("peer_id"):
            self.peer_ids[index] = health["peer_id"]
        behind = {self.peer_ids[i]: i for i in self.nodes if i in self.peer_ids}
        for where, peers in (health.get("banned") or {}).items():
            for peer in peers:
                if peer in behind:
                    self.bans.add((index, where, behind[peer]))

    def summary(self, monitor: PipelineMonitor, final: list[dict[str, Any] | None],
                status_peers: list[dict[str, Any]]) -> dict[str, Any]:
        seen = {p["peer_id"]: p.get("reachable", "") for p in status_peers}
        committed = {i: 0 for i in self.nodes}
        for (index, _), outer in monitor.outer.items():
            if index in committed:
                committed[index] += int(outer.get("rounds_committed", 0))
        return {
            "nodes": self.nodes,
            "online": sum(1 for i in self.nodes if (final[i] or {}).get("state") == "online"),
            "rounds_committed": [committed[i] for i in self.nodes],
            "bans": [{"by": by, "where": where, "on": on} for by, where, on in sorted(self.bans)],
            "stages": [self.last.get(i, {}).get("stage") for i in self.nodes],
            "reachability": [{"node": i, "behind_nat": i in self.nodes, "own": self.last.get(i, {}).get("reachable"),
                              "records": seen.get(self.peer_ids.get(i, ""), None)}
                             for i in sorted(self.peer_ids)],
        }


def _replay(swarm: LocalSwarm, monitor: PipelineMonitor, faults: list[Fault], start: float, duration: float,
            say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Until ``duration`` seconds after ``start``: each fault when it is due, the nodes' /health every
    POLL_S (rewriting the Prometheus targets), a progress line every REPORT_S. Returns the fault events."""
    events = []
    pending = list(faults)
    next_report = next_poll = 0.0
    while (elapsed := time.monotonic() - start) < duration:
        while pending and pending[0].at <= elapsed:
            fault = pending.pop(0)
            index, in_round = apply_fault(swarm, fault)
            events.append({"t": round(elapsed, 1), "action": fault.action, "target": str(fault).split(":")[-1],
                           "node": index, **({"in_round": in_round} if in_round is not None else {})})
            say(f"[{elapsed:6.1f}s] {fault.action} node {index} ({fault})")
        if elapsed >= next_poll:
            healths = monitor.poll(swarm)
            if swarm.write_prometheus_targets():
                say(f"[{elapsed:6.1f}s] prometheus targets: {len(swarm.prometheus_targets)} node(s) in "
                    f"{swarm.prometheus_sd}")
            next_poll = elapsed + POLL_S
            if elapsed >= next_report:
                say(f"[{elapsed:6.1f}s] " + progress_line(healths))
                next_report = elapsed + REPORT_S
        time.sleep(0.5)
    return events


def _summary(swarm: LocalSwarm, start: float, events: list[dict[str, Any]], workdir: str | None,
             status: dict[str, Any], healths: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The run as `node sim --json` reports it: the swarm as `node status` read it (``status``), each
    node's last /health (``healths``, None for a node that is down)."""
    return {
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
