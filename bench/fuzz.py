"""A flood of hostile messages against a live node, on every P2P stream handler it serves.

A real 2-node swarm (``swarm/tiny-2stage``, node 1 serving stage 1, stage 0 training through it) is started
with ``swarm.sim.swarm.LocalSwarm``; the fuzzer then drives at least ``--messages`` frames into each of
node 1's handlers: the pipeline's training, evaluation and liveness handlers, the state server, the
fragment exchange (star) and the reachability dial-back. The cases are this repository's fuzz corpus
(tests/fuzz_corpus.py, tests/fuzz_util.py): mutations of valid messages behind a recomputed CRC (the
decoder is reached), hostile header values, random frames, lying length prefixes, truncations, plus a
fresh batch of random mutations and frames each round. Frames that keep a stream in sync are sent up to
16 to a stream (a stream's refusals close it at 16); the others one to a stream.

Identities rotate: the fuzzer is a pool of hivemind P2P instances (each its own libp2p identity and
daemon), each retired after ``--streams-per-identity`` streams and replaced by a fresh one, so bans and
rate limits per peer are met again and again.

What it reports (one JSON object, the last line): messages and streams per handler; the lines node 1
logged meanwhile (refusals are logged once per code every 10 s); what came back
(ErrorReply codes, reply types, streams ended without a reply), and how many streams were refused at
admission, unread (``banned``, ``flood``, ``rate_limited``, protocol/admission.py) against those whose
frames were read; crashes (node 1 or 0 dead, tracebacks or ``handler failed`` in node 1's log,
``internal`` replies); node 1's RSS before and after (its Python process as its /metrics report it, and
every process of its group: the DHT process and the libp2p daemon); and whether an honest peer that took
no part in the flood is still served (a ping, the whole stage state downloaded and verified, stage 0
still completing microbatches through node 1).

    python bench/fuzz.py                      # 100,000 messages a handler (about 6 min on 2 cores)
    python bench/fuzz.py --messages 2000      # a quick look

The verdict (``ok``) requires every handler at ``--messages``, no crash, RSS growth of node 1's Python
process within ``--rss-bound-mib`` (50), and the honest peer served.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the fuzz corpus and harness the tests use

import torch  # noqa: E402
from fuzz_corpus import pipeline_corpus, state_corpus  # noqa: E402
from fuzz_util import Case, PipelineTarget, StateTarget, framing_cases, header_cases, mutation_cases  # noqa: E402
from hivemind.p2p import P2P, PeerID  # noqa: E402

from protocol.errors import ProtocolError  # noqa: E402
from protocol.framing import PREFIX_BYTES, parse_prefix, read_frame  # noqa: E402
from protocol.messages import (  # noqa: E402
    ActivationFrame,
    DialbackRequest,
    ErrorReply,
    FragmentPart,
    StateManifest,
    StateRequest,
    decode_message,
    encode_message,
)
from protocol.streams import request  # noqa: E402
from protocol.tensors import BUILTIN_CODECS, WireLimits  # noqa: E402

CONFIG = "swarm/tiny-2stage"
ADMISSION = ("banned", "flood", "rate_limited")  # refused before a byte was read
BATCH = 16  # in-sync frames a stream carries at most (serve_stream closes a stream after 16 refusals)
REPLY_LIMITS = WireLimits(codecs=BUILTIN_CODECS)


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def _tree_rss_mib(root: int) -> float:
    """Resident memory of ``root`` and every process under it (the node, its DHT process, the libp2p daemons)."""
    parent, rss = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid = int(stat.parent.name)
            parent[pid], rss[pid] = int(fields[1]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    tree, grew = {root}, True
    while grew:
        found = {pid for pid, up in parent.items() if up in tree} - tree
        tree |= found
        grew = bool(found)
    return round(sum(rss.get(pid, 0) for pid in tree) / 2**20, 1)


def _in_sync(case: Case, limits: WireLimits) -> bool:
    """Whether the case is one whole frame the node reads to its end (so another may follow it)."""
    if case.close or len(case.data) < PREFIX_BYTES:
        return False
    try:
        length, _ = parse_prefix(case.data[:PREFIX_BYTES], limits)
    except ProtocolError:
        return False
    return len(case.data) == PREFIX_BYTES + length


class Identities:
    """A pool of fuzzing P2P instances; each is retired after ``per_identity`` streams (a new identity)."""

    def __init__(self, maddrs: list[str], size: int, per_identity: int) -> None:
        self.maddrs, self.size, self.per_identity = maddrs, size, per_identity
        self.pool: list[list] = []  # [p2p, streams opened]
        self.created = 0
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self.pool = [[await self._new(), 0] for _ in range(self.size)]

    async def _new(self) -> P2P:
        self.created += 1
        return await P2P.create(initial_peers=self.maddrs)

    async def take(self, rng: random.Random) -> P2P:
        slot = rng.choice(self.pool)
        if slot[1] >= self.per_identity and not self._lock.locked():
            async with self._lock:  # one replacement at a time; the other slots keep serving meanwhile
                old, slot[1] = slot[0], 0
                slot[0] = await self._new()
                asyncio.get_running_loop().create_task(old.shutdown())
        slot[1] += 1
        return slot[0]

    async def close(self) -> None:
        await asyncio.gather(*(p.shutdown() for p, _ in self.pool), return_exceptions=True)


class Handler:
    """One handler's flood: its case pool, its counters."""

    def __init__(self, name: str, protocol: str, cases: list[Case], fresh, limits: WireLimits, *,
                 replies_per_stream: int = BATCH, pong: bytes | None = None) -> None:
        self.name, self.protocol, self.fresh, self.limits = name, protocol, fresh, limits
        self.replies_per_stream, self.pong = replies_per_stream, pong
        self.cases = cases
        self.messages = self.streams = self.admission_refused = 0
        self.answers: collections.Counter[str] = collections.Counter()
        self.families: collections.Counter[str] = collections.Counter()
        self.seconds = 0.0

    def batch(self, rng: random.Random) -> list[Case]:
        if rng.random() < 0.25:  # fresh damage every time, not only the corpus again
            self.cases.extend(self.fresh(rng))
            if len(self.cases) > 20_000:
                del self.cases[: len(self.cases) - 20_000]
        first = rng.choice(self.cases)
        if not _in_sync(first, self.limits):
            return [first]
        out = [first]
        while len(out) < BATCH:
            case = rng.choice(self.cases)
            if _in_sync(case, self.limits):
                out.append(case)
            elif rng.random() < 0.3:
                break
        return out

    def report(self) -> dict:
        return {"messages": self.messages, "streams": self.streams,
                "streams_refused_at_admission": self.admission_refused,
                "streams_read": self.streams - self.admission_refused, "seconds": round(self.seconds, 1),
                "answers": dict(self.answers.most_common()), "families": len(self.families)}


async def _one_stream(p2p: P2P, target: PeerID, handler: Handler, cases: list[Case]) -> None:
    handler.streams += 1
    handler.messages += len(cases)
    for case in cases:
        handler.families[case.family] += 1
    try:
        _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(target, handler.protocol), 20)
    except Exception as exc:  # the daemon refused to open it: counted as such
        handler.answers[f"open_failed:{type(exc).__name__}"] += 1
        return
    refused_first = False
    try:
        try:
            async with asyncio.timeout(10):
                writer.write(b"".join(c.data for c in cases))
                await writer.drain()
        except (OSError, TimeoutError, ConnectionError):
            pass
        if cases[-1].close:
            handler.answers["closed_by_us"] += 1
            return
        for i in range(min(len(cases), handler.replies_per_stream)):
            try:
                raw = await read_frame(reader, REPLY_LIMITS, timeout=10, idle_timeout=10)
            except ProtocolError as exc:
                handler.answers[f"ended:{exc.code}"] += 1
                return
            if raw is None:
                handler.answers["ended:eof"] += 1
                return
            if raw == handler.pong:  # the liveness handler's answer (it reads nothing)
                handler.answers["pong"] += 1
                return
            try:
                reply = decode_message(raw, REPLY_LIMITS)
            except ProtocolError as exc:
                handler.answers[f"unreadable_reply:{exc.code}"] += 1
                return
            what = f"refused:{reply.code}" if isinstance(reply, ErrorReply) else type(reply).__name__
            handler.answers[what] += 1
            if i == 0 and isinstance(reply, ErrorReply) and reply.code in ADMISSION:
                refused_first = True
                return
    finally:
        if refused_first:
            handler.admission_refused += 1
        writer.close()


async def _flood(handlers: list[Handler], identities: Identities, target: PeerID, messages: int, workers: int,
                 deadline: float, seed: int) -> None:
    async def worker(handler: Handler, k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        while handler.messages < messages and time.monotonic() < deadline:
            p2p = await identities.take(rng)
            await _one_stream(p2p, target, handler, handler.batch(rng))

    async def timed(index: int, handler: Handler) -> None:
        started = time.monotonic()
        await asyncio.gather(*(worker(handler, index * 100 + j) for j in range(workers)))
        handler.seconds = time.monotonic() - started

    progress = asyncio.get_running_loop().create_task(_progress(handlers, messages))
    try:
        await asyncio.gather(*(timed(i, h) for i, h in enumerate(handlers)))
    finally:
        progress.cancel()


async def _progress(handlers: list[Handler], messages: int) -> None:
    started = time.monotonic()
    while True:
        await asyncio.sleep(30)
        done = ", ".join(f"{h.name} {h.messages}" for h in handlers)
        print(f"  {time.monotonic() - started:.0f} s: {done} (of {messages} each)", file=sys.stderr, flush=True)


def _handlers(rng: random.Random, run: str, basis: str, cfg, manifest: StateManifest, me: str) -> list[Handler]:
    from swarm.dataplane.config import EVAL_HANDLER, HANDLER, PING_HANDLER, PONG
    from swarm.exchange import HANDLER as EXCHANGE
    from swarm.reachability import HANDLER as DIALBACK
    from swarm.state_transfer import StageStateServer

    pipe_limits, limits = cfg.wire.limits(cfg.model.vocab_size), cfg.wire.limits()
    pipe = PipelineTarget(run, 1, basis, cfg.model.subspace_rank, cfg.model.max_seq_len)
    state = StateTarget(run, 1, {manifest.digest: len(manifest.chunk_sha256)}, volatile=True)

    def activation(r: random.Random) -> bytes:
        frame = ActivationFrame(run_id=run, microbatch_id=r.randrange(1, 1 << 40), stage=0, route=[me],
                                token_ids=torch.randint(0, cfg.model.vocab_size, (2, 17)),
                                coefficients=torch.randn(2, 17, cfg.model.subspace_rank) * 0.1, codec="bf16",
                                basis=basis, budget_s=10.0)
        return encode_message(frame)

    def part(r: random.Random) -> bytes:
        size = r.choice([16, 256])
        return encode_message(FragmentPart(run_id=run, stage=1, round_id=r.randrange(1 << 20), fragment_id=0, part=0,
                                           num_parts=1, offset=0, total_values=size, values=torch.zeros(size)))

    valid = {
        "pipeline": lambda r: activation(r),
        "state": lambda r: encode_message(StateRequest(run_id=run, stage=1)),
        "exchange": part,
        "dialback": lambda r: encode_message(DialbackRequest(run_id=run, ports=[r.randrange(1, 65536)])),
    }

    def fresh(kind: str, lim: WireLimits):
        def make(r: random.Random) -> list[Case]:
            bodies = [valid[kind](r) for _ in range(3)]
            return mutation_cases(r, bodies, 24) + header_cases(r, bodies, 8) + framing_cases(r, bodies, lim)
        return make

    pipeline_cases = pipeline_corpus(rng, pipe, me, cfg.model.vocab_size, mutations=48)
    return [
        Handler("pipeline", HANDLER, list(pipeline_cases), fresh("pipeline", pipe_limits), pipe_limits),
        Handler("pipeline_eval", EVAL_HANDLER, list(pipeline_cases), fresh("pipeline", pipe_limits), pipe_limits),
        Handler("pipeline_ping", PING_HANDLER, fresh("pipeline", pipe_limits)(rng), fresh("pipeline", pipe_limits),
                pipe_limits, replies_per_stream=1, pong=PONG),
        Handler("state", StageStateServer.HANDLER, state_corpus(rng, state, manifest.digest, mutations=48),
                fresh("state", limits), limits),
        Handler("exchange", EXCHANGE, fresh("exchange", limits)(rng), fresh("exchange", limits), limits,
                replies_per_stream=1),  # one reply to a stream's parts
        Handler("dialback", DIALBACK, fresh("dialback", limits)(rng), fresh("dialback", limits), limits),
    ]


def _log_lines(swarm) -> int:
    log = swarm.nodes[1].log
    return log.read_text(errors="replace").count("\n") if log.exists() else 0


async def _honest_served(swarm, target: PeerID, run: str, limits: WireLimits, maddrs: list[str]) -> dict:
    """A peer that took no part: a ping answered, the stage state downloaded and verified, stage 0 training."""
    from swarm.dataplane.config import PING_HANDLER, PONG
    from swarm.state_transfer import download_stage_state

    honest = await P2P.create(initial_peers=maddrs)
    out: dict = {}
    try:
        _, reader, writer = await honest.call_binary_stream_handler(target, PING_HANDLER)
        out["ping"] = await read_frame(reader, limits, timeout=30) == PONG
        writer.close()
        started = time.monotonic()
        snap = await download_stage_state(honest, target, run, 1, limits, timeout=120)
        out["state_downloaded"] = snap.stage == 1 and bool(snap.tensors)
        out["state_download_s"] = round(time.monotonic() - started, 1)
        ok_before = swarm.health(0)["pipeline"]["microbatches_ok"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while swarm.health(0)["pipeline"]["microbatches_ok"] < ok_before + 3 and loop.time() < deadline:
            await asyncio.sleep(0.5)
        out["stage0_microbatches_after"] = swarm.health(0)["pipeline"]["microbatches_ok"] - ok_before
        out["stage0_trains"] = out["stage0_microbatches_after"] >= 3
    finally:
        await honest.shutdown()
    out["served"] = bool(out.get("ping") and out.get("state_downloaded") and out.get("stage0_trains"))
    return out


async def _run(args, swarm, cfg, basis: str) -> dict:
    h1 = swarm.health(1)
    run, target = h1["run_id"], PeerID.from_base58(h1["peer_id"])
    limits = cfg.wire.limits()
    asker = await P2P.create(initial_peers=h1["maddrs"])
    try:
        _, reader, writer = await asker.call_binary_stream_handler(target, "protoswarm.state.v1")
        manifest = await request(reader, writer, StateRequest(run_id=run, stage=1), limits, timeout=60)
        writer.close()
    finally:
        await asker.shutdown()
    rng = random.Random(args.seed)
    identities = Identities(h1["maddrs"], args.identities, args.streams_per_identity)
    await identities.start()
    handlers = _handlers(rng, run, basis, cfg, manifest, identities.pool[0][0].peer_id.to_base58())
    url = swarm.metrics_url(1)
    before, group_before = _scrape(url), _tree_rss_mib(swarm.nodes[1].proc.pid)
    lines_before = _log_lines(swarm)
    started = time.monotonic()
    try:
        await _flood(handlers, identities, target, args.messages, args.workers, started + args.minutes * 60, args.seed)
    finally:
        await identities.close()
    flood_s = time.monotonic() - started
    await asyncio.sleep(5)  # refused streams' lingers end, the node settles
    after, group_after = _scrape(url), _tree_rss_mib(swarm.nodes[1].proc.pid)
    log_lines = _log_lines(swarm) - lines_before
    honest = await _honest_served(swarm, target, run, limits, h1["maddrs"])
    rss = "protoswarm_process_resident_memory_bytes"
    return {"handlers": {h.name: h.report() for h in handlers}, "flood_s": round(flood_s, 1),
            "identities_used": identities.created, "honest": honest, "node1_log_lines_during_flood": log_lines,
            "rss_mib": {"node_before": round(before[rss] / 2**20, 1), "node_after": round(after[rss] / 2**20, 1),
                        "node_growth": round((after[rss] - before[rss]) / 2**20, 1),
                        "tree_before": group_before, "tree_after": group_after,
                        "tree_growth": round(group_after - group_before, 1)},
            "admission_refused": {k.split("{", 1)[1].rstrip("}"): int(v - before.get(k, 0.0)) for k, v in after.items()
                                  if k.startswith("protoswarm_admission_refused_total{") and v - before.get(k, 0.0)},
            "protocol_errors": int(sum(v - before.get(k, 0.0) for k, v in after.items()
                                       if k.startswith("protoswarm_protocol_errors_total{")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000, help="frames to send each handler")
    parser.add_argument("--minutes", type=float, default=18.0, help="stop the flood after this long regardless")
    parser.add_argument("--workers", type=int, default=3, help="concurrent streams per handler")
    parser.add_argument("--identities", type=int, default=6, help="fuzzing identities alive at once")
    parser.add_argument("--streams-per-identity", type=int, default=200, help="streams before an identity is retired")
    parser.add_argument("--rss-bound-mib", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from node.config import load_config
    from node.model import shared_tensors
    from protocol.subspace import basis_fingerprint
    from swarm.sim.swarm import LocalSwarm

    cfg = load_config(CONFIG)
    basis = basis_fingerprint(*(t for t in shared_tensors(cfg.model) if t is not None))
    overrides = ["swarm.refresh_s=1", "swarm.expiry_s=8", "dataplane.max_inflight=1", "exchange.mode='star'"]
    pins = {0: ["swarm.stage=0"], 1: ["swarm.stage=1"]}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fuzz-bench-") as tmp, \
            LocalSwarm(2, CONFIG, overrides, workdir=Path(tmp) / "sim", node_overrides=pins) as swarm:
        swarm.start_all()

        def training() -> bool:
            h0, h1 = swarm.health(0) or {}, swarm.health(1) or {}
            return (h1.get("state") == "online" and h1.get("stage") == 1 and bool(h1.get("maddrs"))
                    and (h0.get("pipeline") or {}).get("microbatches_ok", 0) >= 2)

        print("starting a 2-node swarm ...", file=sys.stderr, flush=True)
        swarm.wait_until(training, 240, "node 1 ONLINE on stage 1 and microbatches through it", interval=0.5)
        print(f"flooding node 1's handlers, {args.messages} messages each ...", file=sys.stderr, flush=True)
        result = asyncio.run(_run(args, swarm, cfg, basis))
        log = swarm.nodes[1].log.read_text(errors="replace") if swarm.nodes[1].log.exists() else ""
        result["crashes"] = {
            "node1_alive": swarm.nodes[1].alive, "node0_alive": swarm.nodes[0].alive,
            "tracebacks_in_log": log.count("Traceback"), "handler_failed_in_log": len(re.findall("handler failed", log)),
            "internal_replies": sum(h["answers"].get("refused:internal", 0) for h in result["handlers"].values()),
        }
    crashes = result["crashes"]
    crashed = (not crashes["node1_alive"] or not crashes["node0_alive"] or crashes["tracebacks_in_log"]
               or crashes["handler_failed_in_log"] or crashes["internal_replies"])
    result.update(
        bench="fuzz", messages_per_handler_target=args.messages, seed=args.seed,
        all_handlers_reached_target=all(h["messages"] >= args.messages for h in result["handlers"].values()),
        crashed=bool(crashed), rss_within_bound=result["rss_mib"]["node_growth"] <= args.rss_bound_mib,
        seconds=round(time.monotonic() - t0, 1), command=" ".join(["python bench/fuzz.py", *sys.argv[1:]]),
    )
    result["ok"] = bool(result["all_handlers_reached_target"] and not crashed and result["rss_within_bound"]
                        and result["honest"]["served"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
