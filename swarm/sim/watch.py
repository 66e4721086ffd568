"""What `node sim` checks on a running swarm besides training: crashes, hangs, joins, stage coverage,
memory, fragment-exchange rounds and DHT record traffic (the scale report of docs/node.md).

:class:`SwarmWatch` reads each poll of every node's /health (and, every ``RSS_EVERY_S``, the memory of
each node's process tree from /proc) and keeps:

- **crashes**: node processes that exited although the harness neither killed nor stopped them;
- **hangs**: a live node, neither paused nor cut off, whose /health stayed unanswered for ``hang_s``;
  a node that answers but stayed out of "online" for ``join_hang_s``; a stage on which no node took an
  optimizer step for ``hang_s`` while every stage had an online node;
- **joins**: each start of a node (first start and restarts) to its first optimizer step (the node's
  /health ``first_step_at``), from the harness's clock at the moment it started the process;
- **coverage**: when every stage first had at least two online replicas (one where the swarm is too
  small), and each time that was lost and regained; when every node first was online with a stage;
- **memory**: RSS and PSS of each node with every process it spawned (its DHT process, libp2p daemon);
- **rounds**: every fragment-exchange round a node reports (``outer.recent_rounds``): its time and bytes;
- **DHT traffic**: the records each node stored and read (values only: hivemind's routing and
  replication messages are not counted), per second of its uptime.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from swarm.procs import descendants
from swarm.sim.swarm import LocalSwarm

RSS_EVERY_S = 10.0
_PAGE = 4096


def percentiles(values: list[float], digits: int = 2) -> dict[str, Any]:
    """``{"n", "p50", "p95", "max"}`` of ``values`` (None for each when empty)."""
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]  # noqa: E731
    return {"n": len(ordered), "p50": round(at(0.5), digits), "p95": round(at(0.95), digits),
            "max": round(ordered[-1], digits)}


def tree_memory(pid: int) -> tuple[int, int] | None:
    """RSS and PSS (bytes) of ``pid`` and all its descendants; None if it is gone."""
    rss = pss = 0
    for p in [pid, *descendants(pid)]:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            if p == pid:
                return None
            continue
        rss += int(stat.rsplit(")", 1)[1].split()[21]) * _PAGE
        pss += next((int(line.split()[1]) * 1024 for line in rollup.splitlines() if line.startswith("Pss:")), 0)
    return rss, pss


class SwarmWatch:
    """Fed each poll by `node sim`; :meth:`summary` is its part of the JSON."""

    def __init__(self, swarm: LocalSwarm, stages: int, hang_s: float, join_hang_s: float) -> None:
        self.swarm, self.stages = swarm, max(1, stages)
        self.hang_s, self.join_hang_s = hang_s, join_hang_s
        # Claiming balances throughput, not counts: a stage "has its replicas" with 2 (a partner to
        # average with), or all it can get in a swarm too small for that.
        self.share = max(1, min(2, len(swarm.nodes) // self.stages))
        self.crashes: list[dict[str, Any]] = []
        self.hangs: list[dict[str, Any]] = []
        self.joins: dict[tuple[int, float], float | None] = {}  # (node, started_at) -> seconds to its first step
        self.restarted: set[tuple[int, float]] = set()
        self._seen: set[int] = set()
        self._counted_exit: set[tuple[int, float]] = set()
        self._quiet_since: dict[int, float] = {}
        self._joining_since: dict[int, float] = {}
        self._stage_moved: dict[int, tuple[int, float]] = {}  # stage -> (summed progress, when it last moved)
        self._progress: dict[tuple[int, float], int] = {}
        self.all_online_s: float | None = None  # when every node first was online with a stage
        self.coverage: list[tuple[float, bool]] = []  # (elapsed, every stage at its share) when it changes
        self.memory: dict[int, list[tuple[int, int]]] = {}  # node -> (rss, pss) samples
        self.total_pss: list[int] = []
        self._next_rss = 0.0
        self.rounds: dict[tuple[int, float], list] = {}  # (node, unix time) -> [stage, outcome, s, sent, received, group]
        self.dht: dict[tuple[int, float], tuple[dict[str, int], float]] = {}  # incarnation -> (traffic, uptime)

    def observe(self, elapsed: float, healths: list[dict[str, Any] | None]) -> None:
        online_stages: dict[int, int] = {}
        for node, health in zip(self.swarm.nodes, healths, strict=False):  # a node may join after the poll
            self._check_process(node, elapsed, health)
            if health is None:
                continue
            life = (node.index, node.started_at)
            if life not in self.joins:
                if node.index in self._seen:
                    self.restarted.add(life)
                self._seen.add(node.index)
                self.joins[life] = None
            first = health.get("first_step_at")
            if first is not None and self.joins.get(life) is None:
                self.joins[life] = max(0.0, float(first) - node.started_at)
            if health.get("state") == "online" and health.get("stage") is not None:
                online_stages[health["stage"]] = online_stages.get(health["stage"], 0) + 1
            self._progress[life] = int(health.get("progress") or 0)
            for t, outcome, seconds, sent, received, group in (health.get("outer") or {}).get("recent_rounds", []):
                self.rounds.setdefault((node.index, t), [health.get("stage"), outcome, seconds, sent, received, group])
            if isinstance(health.get("dht"), dict):
                self.dht[life] = (health["dht"], float(health.get("uptime_s") or 0.0))
        full = all(online_stages.get(s, 0) >= self.share for s in range(self.stages))
        if self.all_online_s is None and all(h is not None and h.get("state") == "online" and h.get("stage") is not None
                                             for node, h in zip(self.swarm.nodes, healths, strict=False)):
            self.all_online_s = round(elapsed, 1)
        if not self.coverage or self.coverage[-1][1] != full:
            self.coverage.append((round(elapsed, 1), full))
        self._check_stages(elapsed, healths, online_stages)
        if elapsed >= self._next_rss:
            self._sample_memory()
            self._next_rss = elapsed + RSS_EVERY_S

    def _check_process(self, node, elapsed: float, health: dict[str, Any] | None) -> None:
        life = (node.index, node.started_at)
        if node.proc is not None and node.proc.poll() is not None and not node.stopped and life not in self._counted_exit:
            self._counted_exit.add(life)
            self.crashes.append({"node": node.index, "t": round(elapsed, 1), "exit": node.proc.returncode})
        if node.alive and not node.held and health is None:
            since = self._quiet_since.setdefault(node.index, elapsed)
            if elapsed - since > self.hang_s:
                self.hangs.append({"node": node.index, "t": round(elapsed, 1), "what": "/health unanswered"})
                self._quiet_since[node.index] = elapsed
        else:
            self._quiet_since.pop(node.index, None)
        if health is not None and health.get("state") != "online" and not node.held:
            since = self._joining_since.setdefault(node.index, elapsed)
            if elapsed - since > self.join_hang_s:
                self.hangs.append({"node": node.index, "t": round(elapsed, 1),
                                   "what": f"not online for {self.join_hang_s:.0f} s ({health.get('state')})"})
                self._joining_since[node.index] = elapsed
        else:
            self._joining_since.pop(node.index, None)

    def _check_stages(self, elapsed: float, healths: list[dict[str, Any] | None], online: dict[int, int]) -> None:
        """A stage whose nodes took no optimizer step for hang_s while every stage had an online node."""
        every = all(online.get(s, 0) > 0 for s in range(self.stages))
        for stage in range(self.stages):
            total = sum(int(h.get("progress") or 0) for h in healths if h and h.get("stage") == stage)
            last, moved = self._stage_moved.get(stage, (-1, elapsed))
            if total != last:  # moved (or a node came or went): the clock restarts
                self._stage_moved[stage] = (total, elapsed)
            elif every and elapsed - moved > self.hang_s:
                self.hangs.append({"stage": stage, "t": round(elapsed, 1),
                                   "what": f"no optimizer step on stage {stage} for {elapsed - moved:.0f} s"})
                self._stage_moved[stage] = (total, elapsed)
            elif not every:
                self._stage_moved[stage] = (total, elapsed)

    def _sample_memory(self) -> None:
        total = 0
        for node in self.swarm.nodes:
            if node.alive and not node.held and (mem := tree_memory(node.proc.pid)) is not None:
                self.memory.setdefault(node.index, []).append(mem)
                total += mem[1]
        if total:
            self.total_pss.append(total)

    def summary(self, restarts_at: list[float]) -> dict[str, Any]:
        """The watch's part of `node sim --json`; ``restarts_at``: when the fault script restarted nodes."""
        mib = 1 << 20
        per_node_rss = [statistics.fmean(r for r, _ in samples) / mib for samples in self.memory.values()]
        per_node_pss = [statistics.fmean(p for _, p in samples) / mib for samples in self.memory.values()]
        first = [s for life, s in self.joins.items() if s is not None and life not in self.restarted]
        again = [s for life, s in self.joins.items() if s is not None and life in self.restarted]
        # Rounds that averaged something (a replica alone commits its own part at once: not an exchange).
        committed = [r for r in self.rounds.values() if r[1] == "committed" and r[5] >= 2]
        per_round = [r[3] + r[4] for r in committed]
        rates = [(t.get("store_bytes", 0) + t.get("read_bytes", 0)) / up for t, up in self.dht.values() if up > 30]
        ops = [(t.get("stores", 0) + t.get("gets", 0)) / up for t, up in self.dht.values() if up > 30]
        return {
            "survivor_crashes": len(self.crashes),
            "crash_details": self.crashes,
            "hangs": len(self.hangs),
            "hang_details": self.hangs[:50],
            "join_to_first_step_s": percentiles(first, 1),
            "rejoin_to_first_step_s": percentiles(again, 1),
            "starts_without_a_step": sum(1 for s in self.joins.values() if s is None),
            "replicas_per_stage_target": self.share,
            "stages_replicated_s": next((t for t, full in self.coverage if full), None),
            "all_nodes_online_s": self.all_online_s,
            "replicas_restored_after_restart_s": self._restored(restarts_at),
            "rss_mib_per_node": percentiles(per_node_rss, 1),
            "pss_mib_per_node": percentiles(per_node_pss, 1),
            "pss_mib_swarm_max": round(max(self.total_pss) / mib, 1) if self.total_pss else None,
            "exchange_round_s": percentiles([r[2] for r in committed], 2),
            "exchange_rounds_seen": {"averaged": len(committed),
                                     "alone": sum(1 for r in self.rounds.values() if r[1] == "committed" and r[5] < 2),
                                     "skipped": sum(1 for r in self.rounds.values() if r[1] == "skipped")},
            "bytes_per_round_per_node": percentiles(per_round, 0),
            "dht_record_bytes_per_s_per_node": percentiles(rates, 1),
            "dht_ops_per_s_per_node": percentiles(ops, 3),
        }

    def _restored(self, restarts_at: list[float]) -> list[float | None]:
        """For each restart time: seconds until every stage again had its share online (None: never)."""
        out = []
        for at in restarts_at:
            before = [full for t, full in self.coverage if t <= at]
            if before and before[-1]:
                out.append(0.0)
                continue
            back = next((t for t, full in self.coverage if full and t > at), None)
            out.append(round(back - at, 1) if back is not None else None)
        return out
