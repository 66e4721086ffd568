"""`node sim`: start a local swarm, replay a fault script on it, print progress, return a summary."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from swarm.sim.faults import Fault, WaveRunner, Waves, apply_fault
from swarm.sim.link import LinkSpec
from swarm.sim.monitor import PipelineMonitor, progress_line
from swarm.sim.swarm import LocalSwarm, SimError
from swarm.sim.watch import SwarmWatch

JOIN_HANG_S = 300.0  # a node that answers but is not online for this long hangs (a download on a slow link)

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
    waves: Waves | None = None,
    stages: int = 1,
    hang_s: float = 90.0,
    stagger: float = 0.0,
) -> dict[str, Any]:
    """Start the swarm, replay ``faults`` (and ``waves``), print progress, and return a summary.

    ``prometheus_sd``: keep this file listing the live nodes' /metrics targets (file_sd_configs).
    ``nat``: the last ``nat`` nodes sit each behind a home router (the summary's ``nat`` object).
    ``stages``: the run's pipeline stages; ``hang_s``: silence that counts as a hang (swarm/sim/watch.py);
    ``stagger``: seconds between the starts of the joiners."""
    say = (lambda text: None) if quiet else (lambda text: print(text, flush=True))

    _check(nodes, faults, nat)
    monitor = PipelineMonitor()
    watch = NatWatch(list(range(nodes - nat, nodes)))
    monitor.listeners.append(watch.observe)
    with LocalSwarm(nodes, config, overrides, workdir, link=link, link_mode=link_mode,
                    prometheus_sd=prometheus_sd, nat=watch.nodes) as swarm:
        if swarm.link_note:
            say(f"links: {swarm.link_note}")
        watch_ = SwarmWatch(swarm, stages, hang_s, JOIN_HANG_S)
        runner = WaveRunner(waves, duration) if waves is not None else None
        start, start_wall = time.monotonic(), time.time()
        swarm.start_all(stagger)
        say(f"swarm of {nodes} node(s) starting in {swarm.workdir} (bootstrap {swarm.bootstrap})")
        try:
            events = _replay(swarm, monitor, watch_, runner, faults, start, duration, say)
        finally:
            if runner is not None:
                runner.finish(swarm)
        final = monitor.poll(swarm)
        watch_.observe(time.monotonic() - start, final)
        end_time = time.time()
        try:
            status = swarm.status(timeout=max(30.0, 2.0 * nodes))
        except SimError as exc:  # the summary says so; stage coverage then comes from /health
            status = {"error": str(exc)}
        summary = _summary(swarm, start, events, workdir, status, final, stages)
        _add_health(summary, watch_, runner)
        if link is not None:
            summary["link"] = {"spec": str(link), "mode": swarm.link_mode, "note": swarm.link_note, "bytes": swarm.link_bytes()}
        if monitor.seen:
            summary.update(monitor.summary(end_time, start_wall))
        if nat:
            summary["nat"] = watch.summary(monitor, final, status.get("peers") or [])
    return summary


def _check(nodes: int, faults: list[Fault], nat: int) -> None:
    for fault in faults:
        if fault.node is not None and fault.node >= nodes:
            raise SimError(f"fault {fault} names a node outside 0..{nodes - 1} (use 'new' to add one)")
    if not 0 <= nat < nodes:
        raise SimError(f"--nat {nat}: at most {nodes - 1} of {nodes} nodes can be behind NAT (node 0 founds the run "
                       "and is the bootstrap peer, which must be reachable)")


def _add_health(summary: dict[str, Any], watch: SwarmWatch, runner: WaveRunner | None) -> None:
    """The run's health (crashes, hangs, joins, ...) into ``summary``; ``ok`` only without crash or hang."""
    summary.update(watch.summary(runner.restarts_at if runner is not None else []))
    summary["hang_rule_s"] = {"silent_or_no_step": watch.hang_s, "not_online": watch.join_hang_s}
    summary["ok"] = summary["ok"] and not summary["survivor_crashes"] and not summary["hangs"]
    if runner is not None:
        w = runner.waves
        summary["waves"] = {"every_s": w.every, "count": w.count, "down_s": w.down, "first_s": w.first,
                            "seed": w.seed, "restarts": len(runner.restarts_at)}


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


def _replay(swarm: LocalSwarm, monitor: PipelineMonitor, watch: SwarmWatch, runner: WaveRunner | None,
            faults: list[Fault], start: float, duration: float, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Until ``duration`` seconds after ``start``: each fault and wave when it is due, the nodes' /health
    every POLL_S (rewriting the Prometheus targets), a progress line every REPORT_S. Returns the events."""
    events = []
    pending = list(faults)
    next_report = next_poll = 0.0
    stage_of: dict[int, int | None] = {}
    while (elapsed := time.monotonic() - start) < duration:
        while pending and pending[0].at <= elapsed:
            fault = pending.pop(0)
            index, in_round = apply_fault(swarm, fault)
            events.append({"t": round(elapsed, 1), "action": fault.action, "target": str(fault).split(":")[-1],
                           "node": index, **({"in_round": in_round} if in_round is not None else {})})
            say(f"[{elapsed:6.1f}s] {fault.action} node {index} ({fault})")
        if runner is not None:
            for event in runner.step(swarm, elapsed, stage_of):
                events.append(event)
                say(f"[{elapsed:6.1f}s] wave: {event['action']} node {event['node']}")
        if elapsed >= next_poll:
            healths = monitor.poll(swarm)
            watch.observe(elapsed, healths)
            stage_of = {i: h.get("stage") for i, h in enumerate(healths) if h}
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
             status: dict[str, Any], healths: list[dict[str, Any] | None], stages: int) -> dict[str, Any]:
    """The run as `node sim --json` reports it: the swarm as `node status` read it (``status``), each
    node's last /health (``healths``, None for a node that is down). Whether every stage is served
    comes from `node status`; where that failed (its error is in ``status_error``), from the nodes'
    own /health, and ``stages_served_from`` says which."""
    online = {s: sum(1 for h in healths if h and h.get("state") == "online" and h.get("stage") == s)
              for s in range(stages)}
    served = (all(s["servers"] > 0 for s in status.get("stages", [])) if "error" not in status
              else all(online.values()))
    return {
        "ok": served,
        "stages_served_from": "node status" if "error" not in status else "health",
        "online_per_stage": {str(s): n for s, n in online.items()},
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
