"""What a running node shows of itself: its /health document and its status line's snapshot.

Read-only views of a :class:`node.daemon.NodeDaemon` (its DHT, stage host, services, metrics), kept
out of the daemon so that it holds the lifecycle only.
"""

from __future__ import annotations

import time
from typing import Any

from node.device import device_memory
from protocol.messages import PROTOCOL_VERSION


def recent_loss(host) -> float | None:
    """Mean of the last 20 losses this node scored (S = 1 steps, or last-stage microbatches)."""
    recent = [v for _, v in host.recent_losses()[-20:]] if host is not None else []
    return sum(recent) / len(recent) if recent else None


def node_health(d) -> dict[str, Any]:
    """The node's /health: state, bootstrap, identity, run, stage, device, bans, download, reachability."""
    dht, host = d.dht, d.host
    reach = d.services.reachability if d.services is not None else None
    banned = {k: v for k, v in d.metrics.banned().items() if v}
    return {
        "state": d.state,
        "bootstrap_state": dht.state if dht else "starting",
        "bootstrap_attempts": dht.attempts if dht else 0,
        "last_error": dht.last_error if dht else None,
        "peer_id": dht.peer_id if dht else None,
        "maddrs": dht.visible_maddrs() if dht and dht.online else [],
        "run_id": d.run_id or None,
        "num_stages": d.cfg.pipeline.num_stages,
        "stage": None, "progress": 0, "resumed_from": None, "saved_step": None, "throughput": 0.0,
        **(host.health() if host is not None else {}),
        "device": device_memory(d.device),
        "uptime_s": round(time.monotonic() - d.started, 3),
        "first_step_at": d.metrics.first_step_at,  # unix time of this process's first optimizer step
        **({"dht": dict(dht.traffic)} if dht else {}),
        "protocol": ".".join(map(str, PROTOCOL_VERSION)),
        **({"banned": banned} if banned else {}),
        **({"download": download} if (download := d.metrics.download.view()) else {}),
        **({"reachable": reach.state, "public_address": reach.address()} if reach is not None else {}),
    }


def status_snapshot(d) -> dict[str, Any]:
    """Totals, rates and state for the live status line (node/status_line.py)."""
    totals = d.metrics.totals()
    rates = {rate: max(0.0, window.update(totals.get(total, 0)))
             for total, (rate, window) in d._status_rates.items()}
    return {"state": d.state, "stage": d.host.stage if d.host else None,
            "num_stages": d.cfg.pipeline.num_stages, "download": d.metrics.download.view(),
            "peers": d.presence.peers_known if d.presence else None,
            "loss": recent_loss(d.host), "memory": device_memory(d.device), **totals, **rates}
