"""Chaos soak: a localhost pipeline swarm with replica sync, while a seeded script kills, restarts,
pauses and partitions its nodes and a hostile peer sends garbage (issue 9, docs/security.md).

The swarm: the tiny model in 2 pipeline stages, 2 replicas per stage (4 `node start` processes,
stages claimed as usual), Streaming DiLoCo among each stage's replicas, periodic checkpoints. As root
each node sits in its own network namespace (unshaped links), so a partition cuts a node's link;
without root partitions are left out and the JSON says so.

The script (seeded) takes at most one node down at a time, so every stage keeps a live replica:
every 15–35 s it picks a node that is up and

- kills it (SIGKILL; restarted 10–30 s later with the same identity and checkpoints),
- stops it gracefully (SIGTERM; restarted 10–30 s later),
- pauses it (SIGSTOP, for 5–20 s, beyond the exchange deadlines), or
- partitions it (its link down for 10–30 s).

Every 20 s a hostile peer (a real libp2p peer in this process) sends a handful of malformed frames
to a random live node's pipeline, exchange and state handlers.

Measured, from every node's /health and /metrics every 2 s:

- survivor crashes: processes that exited without the script killing or stopping them;
- hangs: periods over 3 × the round deadline (exchange.timeout_s) in which the swarm's progress
  (microbatches completed by stage 0) did not move although every stage had a replica up and
  reachable, plus nodes up and reachable whose /health stopped answering that long, plus nodes that
  answer but stay out of "online" for over 120 s;
- rounds committed (all replicas), loss at the start and end (the last stage's loss, smoothed);
- checkpoint restores: restarted nodes whose /health says they resumed from their own checkpoint
  (and how long each took to be online again, and its stage before and after);
- bad messages rejected (protocol errors and pipeline refusals counted by the nodes).

    python bench/chaos.py --quick    # 10 minutes
    python bench/chaos.py            # 30 minutes

Prints progress, then one JSON object as its last line, and writes a PNG of progress and loss.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client.parser import text_string_to_metric_families

from swarm.dataplane import HANDLER as PIPELINE_HANDLER
from swarm.exchange import HANDLER as EXCHANGE_HANDLER
from swarm.sim.link import LinkSpec
from swarm.sim.monitor import PipelineMonitor
from swarm.sim.netns import netns_unavailable
from swarm.sim.swarm import LocalSwarm, processes_mentioning
from swarm.state_transfer import StageStateServer

NODES = 4
DEADLINE_S = 20.0  # exchange.timeout_s below: the round deadline
OVERRIDES = [
    "pipeline.num_stages=2", "diloco.enabled=true", "diloco.inner_steps=60", "diloco.fragments=3",
    "train.batch_size=4", "train.seq_len=64", "train.checkpoint_every=20",
    "swarm.refresh_s=2", "swarm.expiry_s=8", "swarm.rebalance_period_s=10",
    "exchange.gather_s=6", f"exchange.timeout_s={DEADLINE_S}",
]


def _metric_sum(url: str | None, names: tuple[str, ...]) -> float | None:
    """Sum of the samples named ``names`` on a node's /metrics; None when it does not answer."""
    if url is None:
        return None
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in names)


class Hostile:
    """A real libp2p peer that sends malformed frames to a node's protoswarm handlers."""

    HANDLERS = (PIPELINE_HANDLER, EXCHANGE_HANDLER, StageStateServer.HANDLER)

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.p2p = None
        self.sent = 0

    def _run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def attack(self, maddrs: list[str], peer_id: str) -> int:
        return self._run(self._attack(maddrs, peer_id))

    async def _attack(self, maddrs: list[str], peer_id: str) -> int:
        from hivemind.p2p import P2P, PeerID

        from protocol.framing import write_frame

        if self.p2p is None:
            self.p2p = await P2P.create(initial_peers=maddrs, host_maddrs=["/ip4/0.0.0.0/tcp/0"])
        sent = 0
        for _ in range(4):
            name = self.rng.choice(self.HANDLERS)
            try:
                _, reader, writer = await asyncio.wait_for(
                    self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), name), 10)
                kind = self.rng.random()
                if kind < 0.4:  # random bytes in a valid frame
                    await write_frame(writer, self.rng.randbytes(self.rng.randint(1, 2048)))
                elif kind < 0.7:  # a frame header announcing far more than the size cap
                    writer.write((1 << 31).to_bytes(4, "big") + b"\x00" * 16)
                    await writer.drain()
                else:  # raw garbage without framing
                    writer.write(self.rng.randbytes(self.rng.randint(1, 512)))
                    await writer.drain()
                sent += 1
                try:
                    await asyncio.wait_for(reader.read(4096), 5)
                except (TimeoutError, OSError):
                    pass
                writer.close()
            except Exception:  # a node that is down, paused or partitioned: try another time
                continue
        self.sent += sent
        return sent

    def close(self) -> None:
        if self.p2p is not None:
            try:
                self._run(self.p2p.shutdown(), 30)
            except Exception:
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)


def plot(samples: list[dict], events: list[dict], losses: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    t = [s["t"] for s in samples]
    ax.plot(t, [s["progress"] for s in samples], color="tab:blue", label="microbatches completed (stage 0)")
    colors = {"kill": "tab:red", "term": "tab:orange", "pause": "tab:purple", "partition": "tab:brown",
              "start": "tab:green", "resume": "tab:green", "heal": "tab:green"}
    for e in events:
        ax.axvline(e["t"], color=colors.get(e["action"], "grey"), alpha=0.4, lw=1)
    ax.set_ylabel("progress")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    if losses:
        bx.plot([x for x, _ in losses], [y for _, y in losses], color="tab:red")
    bx.set_xlabel("seconds (lines: red kill, orange stop, purple pause, brown partition, green back)")
    bx.set_ylabel("loss (last stage, 10 s means)")
    bx.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 minutes (default: 30)")
    parser.add_argument("--duration", type=float, help="seconds of chaos (overrides --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep identities, checkpoints and logs here (default: a temp dir)")
    parser.add_argument("--out", default="bench/out/chaos.png")
    args = parser.parse_args()
    duration = args.duration or (600.0 if args.quick else 1800.0)
    rng = random.Random(args.seed)
    reason = netns_unavailable()
    link = LinkSpec(None, 0.0) if reason is None else None  # namespaces for partitions, links unshaped
    actions = ["kill", "term", "pause"] + (["partition"] if link is not None else [])

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    monitor = PipelineMonitor()
    hostile = Hostile(args.seed)
    events: list[dict] = []
    samples: list[dict] = []
    deliberate: set[int] = set()  # node indices the script took down on purpose (not yet restarted)
    exits_seen: dict[int, int] = {}
    crashes: list[dict] = []
    hangs: list[dict] = []
    restarts: list[dict] = []
    unresponsive_since: dict[int, float] = {}
    joining_since: dict[int, float] = {}  # node → since when it answers /health but is not online
    stage_of: dict[int, int | None] = {}  # node → the stage it served when the script took it down
    bad_seen: dict[tuple[int, int], float] = {}
    with LocalSwarm(NODES, "swarm/tiny", OVERRIDES, args.workdir, link=link,
                    link_mode="netns" if link else "auto") as swarm:
        say(f"chaos: {NODES} nodes, {duration:.0f} s, seed {args.seed}, actions {actions}"
            + (f"; no partitions: {reason}" if reason else ""))
        swarm.start_all()
        swarm.wait_until(lambda: all((h := swarm.health(i)) and h.get("state") == "online" for i in range(NODES)),
                         240, "every node online")
        start = time.monotonic()
        next_event = 30.0
        next_attack = 20.0
        down: dict[int, tuple[str, float]] = {}  # node → (how it is down, when it comes back)
        last_progress, last_move = 0, 0.0
        while (elapsed := time.monotonic() - start) < duration:
            # Bring back what is due.
            for index, (how, back_at) in list(down.items()):
                if elapsed >= back_at:
                    action = {"kill": "start", "term": "start", "pause": "resume", "partition": "heal"}[how]
                    getattr(swarm, action)(index)
                    del down[index]
                    deliberate.discard(index)
                    events.append({"t": round(elapsed, 1), "action": action, "node": index})
                    if action == "start":
                        restarts.append({"node": index, "t": round(elapsed, 1), "resumed_from": None,
                                         "stage_before": stage_of.get(index), "stage_after": None,
                                         "online_after_s": None})
                    say(f"[{elapsed:6.1f}s] {action} node {index}")
            # Take one node down, one at a time.
            if elapsed >= next_event and not down:
                up = [i for i in range(NODES) if swarm.nodes[i].alive]
                if up:
                    index, how = rng.choice(up), rng.choice(actions)
                    back = elapsed + (rng.uniform(5, 20) if how == "pause" else rng.uniform(10, 30))
                    if how in ("kill", "term"):
                        deliberate.add(index)
                    stage_of[index] = (swarm.health(index) or {}).get("stage")
                    getattr(swarm, how)(index)
                    if how in ("kill", "term"):
                        exits_seen[index] = len(swarm.nodes[index].exit_codes)
                    down[index] = (how, back)
                    events.append({"t": round(elapsed, 1), "action": how, "node": index})
                    say(f"[{elapsed:6.1f}s] {how} node {index} (back at {back:.0f} s)")
                next_event = elapsed + rng.uniform(15, 35)
            # A hostile peer.
            if elapsed >= next_attack:
                targets = [i for i in range(NODES) if swarm.nodes[i].alive and i not in down]
                if targets:
                    h = swarm.health(rng.choice(targets))
                    if h and h.get("maddrs") and h.get("peer_id"):
                        hostile.attack(h["maddrs"], h["peer_id"])
                next_attack = elapsed + 20.0
            # Observe.
            healths = monitor.poll(swarm)
            for i, node in enumerate(swarm.nodes):
                if node.proc is not None and node.proc.poll() is not None and i not in deliberate:
                    crashes.append({"node": i, "t": round(elapsed, 1), "exit": node.proc.returncode})
                    say(f"[{elapsed:6.1f}s] node {i} exited by itself ({node.proc.returncode}): restarting it")
                    swarm.start(i)
                reachable = node.alive and i not in down
                if reachable and healths[i] is None:
                    unresponsive_since.setdefault(i, elapsed)
                    if elapsed - unresponsive_since[i] > 3 * DEADLINE_S:
                        hangs.append({"node": i, "t": round(elapsed, 1), "what": "/health unanswered"})
                        unresponsive_since[i] = elapsed
                else:
                    unresponsive_since.pop(i, None)
                h = healths[i]
                if h:
                    for r in restarts:
                        if r["node"] != i or r["online_after_s"] is not None:
                            continue
                        if h.get("resumed_from") is not None:
                            r["resumed_from"] = h["resumed_from"]
                        if h.get("state") == "online":
                            r["online_after_s"] = round(elapsed - r["t"], 1)
                            r["stage_after"] = h.get("stage")
                    if h.get("state") != "online" and i not in down:
                        joining_since.setdefault(i, elapsed)
                        if elapsed - joining_since[i] > 120:
                            hangs.append({"node": i, "t": round(elapsed, 1), "what": f"not online for 120 s ({h.get('state')})"})
                            joining_since[i] = elapsed
                    else:
                        joining_since.pop(i, None)
                    bad = _metric_sum(swarm.metrics_url(i), ("protoswarm_protocol_errors_total",
                                                             "protoswarm_pipeline_refused_total"))
                    if bad is not None and node.proc is not None:
                        bad_seen[(i, node.proc.pid)] = bad
            progress = sum(int(p.get("microbatches_ok", 0)) for p in monitor.latest.values())
            stages_up = {h.get("stage") for i, h in enumerate(healths) if h and i not in down}
            if progress > last_progress:
                last_progress, last_move = progress, elapsed
            elif stages_up >= {0, 1} and elapsed - last_move > 3 * DEADLINE_S:
                hangs.append({"t": round(elapsed, 1), "what": f"no swarm progress for {elapsed - last_move:.0f} s"})
                last_move = elapsed
            samples.append({"t": round(elapsed, 1), "progress": progress})
            time.sleep(2.0)
        for index, (how, _) in list(down.items()):  # leave nothing paused or cut off for the shutdown
            getattr(swarm, {"kill": "start", "term": "start", "pause": "resume", "partition": "heal"}[how])(index)
        end_time = time.time()
        summary = monitor.summary(end_time)
        workdir = swarm.workdir
    hostile.close()
    deadline = time.monotonic() + 15  # a killed node's DHT child exits on its own within a second or so
    while (leftover := processes_mentioning(str(workdir))) and time.monotonic() < deadline:
        time.sleep(0.5)
    restored = [r for r in restarts if r["resumed_from"] is not None]
    came_back = [r for r in restarts if r["online_after_s"] is not None]
    result = {
        "duration_s": duration,
        "seed": args.seed,
        "nodes": NODES,
        "partitions": link is not None,
        "partitions_note": reason,
        "events_injected": len([e for e in events if e["action"] in ("kill", "term", "pause", "partition")]),
        "events": events,
        "hostile_frames_sent": hostile.sent,
        "survivor_crashes": len(crashes),
        "crashes": crashes,
        "hangs": len(hangs),
        "hang_details": hangs,
        "rounds_committed": summary.get("outer_rounds_committed"),
        "rounds_skipped": summary.get("outer_rounds_skipped"),
        "microbatches_completed": last_progress,
        "microbatches_dropped": summary.get("microbatches_dropped"),
        "dropped_by_reason": summary.get("dropped_by_reason"),
        "loss_start": summary.get("loss_start"),
        "loss_end": summary.get("loss_end"),
        "restarts": len(restarts),
        "restarts_back_online": len(came_back),
        "checkpoint_restores": len(restored),
        "restores_of_those_back_online": len([r for r in came_back if r["resumed_from"] is not None]),
        "restart_details": restarts,
        "bad_messages_rejected": int(sum(bad_seen.values())),
        "processes_left": len(leftover),
        "command": "python bench/chaos.py" + (" --quick" if args.quick and not args.duration else "")
                   + (f" --duration {args.duration:g}" if args.duration else "") + f" --seed {args.seed}",
    }
    plot(samples, events, summary.get("loss_curve_10s") or [], Path(args.out),
         f"chaos soak, {NODES} nodes, seed {args.seed}: {result['events_injected']} events, "
         f"{result['survivor_crashes']} crashes, {result['hangs']} hangs")
    result["plot"] = args.out
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
