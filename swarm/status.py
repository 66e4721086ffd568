"""`node status`: read the swarm's records from any peer and show them as a table or JSON.

The reader joins the DHT in client mode (it stores nothing and is not routed through), reads the run
records and every stage's records (validated like any node does: bad ones are skipped and counted),
and leaves.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from typing import Any

import msgpack

from protocol.errors import short_repr
from protocol.messages import RunRecord
from swarm.access import SwarmAccess
from swarm.dht import SwarmDHT, maddrs_from_health
from swarm.procs import process_age_s
from swarm.records import MAX_STAGES, choose_run

logger = logging.getLogger(__name__)


class StatusError(RuntimeError):
    """The swarm could not be read (unreachable, no run, ambiguous run)."""


def peers_from_health(url: str) -> list[str]:
    """Multiaddrs of the local node, from its /health endpoint (so `node status` needs no arguments)."""
    try:
        maddrs = maddrs_from_health(url)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise StatusError(f"no --join given and no local node answers at {url} ({exc}); pass --join MADDR") from None
    if not maddrs:
        raise StatusError(f"the local node at {url} is not in a swarm yet")
    return maddrs


def pick_run(records: list[RunRecord], owners: list[bytes], run_id: str | None) -> tuple[RunRecord, dict, int]:
    """The run (chosen as joiners choose it), its parameters, and its number of stages (validated)."""
    chosen = choose_run(records, owners, run_id)
    if chosen is None:
        raise StatusError(f"no run {run_id!r} in this swarm" if run_id else "no run is published in this swarm")
    if isinstance(chosen, str):
        raise StatusError(chosen)
    try:
        params = msgpack.unpackb(chosen.config, raw=False)
        num_stages = params["pipeline"]["num_stages"]
    except Exception:  # any malformed parameters: a forged or corrupt record
        raise StatusError(f"run {chosen.run_id} has unreadable parameters") from None
    if type(num_stages) is not int or not 1 <= num_stages <= MAX_STAGES:
        raise StatusError(f"run {chosen.run_id} declares {short_repr(num_stages)} stages (1..{MAX_STAGES} allowed)")
    return chosen, params, num_stages


def collect_status(join: list[str], run_id: str | None = None, timeout: float = 30.0,
                   access: SwarmAccess | None = None) -> dict[str, Any]:
    # With the swarm's access rules, records of peers outside them are skipped (as members skip them).
    dht = SwarmDHT(initial_peers=join, host_maddrs=["/ip4/0.0.0.0/tcp/0"], client_mode=True, retry_max_s=2.0,
                   access=access)
    started = time.monotonic()
    since = lambda: time.monotonic() - started  # noqa: E731
    age = process_age_s()
    if age is not None:
        logger.info("status: reading the swarm %.1f s after the process started", age)
    dht.run_in_background()
    try:
        if not dht.wait_online(timeout):
            raise StatusError(f"cannot reach the swarm at {', '.join(join)} within {timeout:.0f} s ({dht.last_error})")
        logger.info("status: in the swarm's DHT after %.1f s", since())
        try:
            records, owners, rejected = dht.get_run_records()
            run, params, num_stages = pick_run(records, owners, run_id)
            logger.info("status: %d run record(s) read after %.1f s", len(records), since())
            by_stage, stage_rejected = dht.get_stage_records(run.run_id, num_stages)
            logger.info("status: %d stage(s) read after %.1f s", num_stages, since())
        except TimeoutError:
            raise StatusError(f"the swarm did not answer within {dht.call_timeout:.0f} s") from None
        rejected.update(stage_rejected)
    finally:
        dht.shutdown(graceful=False)  # a reader stores nothing: its DHT process and daemon go at once
        logger.info("status: DHT stopped after %.1f s", since())
    now = time.time()
    newest: dict[str, Any] = {}  # a peer that changed stage leaves an OFFLINE record behind until it expires
    for recs in by_stage.values():
        for r in recs:
            if r.peer_id not in newest or r.timestamp > newest[r.peer_id].timestamp:
                newest[r.peer_id] = r
    peers = sorted(
        (
            {
                "peer_id": r.peer_id, "stage": r.stage, "state": r.state.upper(), "throughput": r.throughput,
                "progress": r.progress, "age_s": round(max(0.0, now - r.timestamp), 1), "addrs": r.addrs,
                "reachable": r.reachable,
            }
            for r in newest.values()
        ),
        key=lambda p: (p["stage"], p["peer_id"]),
    )
    stages = [
        {
            "stage": s,
            "servers": sum(1 for p in peers if p["stage"] == s and p["state"] != "OFFLINE"),
            "throughput": round(sum(p["throughput"] for p in peers if p["stage"] == s and p["state"] != "OFFLINE"), 3),
        }
        for s in range(num_stages)
    ]
    return {
        "run_id": run.run_id, "model": str((params.get("model") or {}).get("name")), "num_stages": num_stages,
        "creator": run.creator, "stages": stages, "peers": peers, "rejected_records": dict(rejected),
    }


def format_status(status: dict[str, Any]) -> str:
    lines = [
        f"run {status['run_id']}  model {status['model']}  {status['num_stages']} stage(s)  "
        f"created by {status['creator']}",
        "",
        "stage  servers  throughput (microbatches/s)",
    ]
    lines += [f"{s['stage']:>5}  {s['servers']:>7}  {s['throughput']:>10.2f}" for s in status["stages"]]
    lines += ["", f"{'peer':<54} {'stage':>5} {'state':<8} {'thr/s':>7} {'progress':>8} {'age s':>6}  address"]
    for p in status["peers"]:
        addr = next((a for a in p["addrs"] if "/127.0.0.1/" not in a), p["addrs"][0] if p["addrs"] else "-")
        lines.append(
            f"{p['peer_id']:<54} {p['stage']:>5} {p['state']:<8} {p['throughput']:>7.2f} {p['progress']:>8} "
            f"{p['age_s']:>6}  {addr}"
        )
    if status["rejected_records"]:
        lines += ["", f"skipped invalid records: {status['rejected_records']}"]
    return "\n".join(lines)
