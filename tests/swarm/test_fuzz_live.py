"""Fuzzing a real `node start` swarm (2 nodes, 2 pipeline stages) on every P2P stream handler.

A fuzzing peer that is a signed, ONLINE member of the target's stage sends the cases of
tests/fuzz_util.py to all three handlers (pipeline, fragment exchange in star mode, state server). The node answers
each (or is allowed to close a stream whose byte position is lost), counts the errors in /metrics,
bans the fuzzing peer on every handler, keeps serving an honest client and the honest stage-0 node
that trains through it, and its resident memory stays within a fixed bound. The same cases in one
process, handler by handler: tests/swarm/test_fuzz_handlers.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import urllib.request

import pytest
import torch
from fuzz_corpus import exchange_corpus, pipeline_corpus, state_corpus
from fuzz_util import (
    SEED,
    Case,
    ExchangeTarget,
    PipelineTarget,
    StateTarget,
    run_cases,
    send_case,
    serve_oracle,
    tally,
)
from hivemind.p2p import P2P, PeerID
from prometheus_client.parser import text_string_to_metric_families

from protocol.framing import encode_frame
from protocol.messages import (
    ActivationFrame,
    FragmentPart,
    GradientFrame,
    StageRecord,
    StateManifest,
    StateRequest,
    encode_message,
)
from protocol.streams import request
from protocol.tensors import WireLimits
from swarm.dataplane import HANDLER as PIPELINE
from swarm.exchange import HANDLER as EXCHANGE
from swarm.exchange import FragmentExchange, RoundKey, plan_groups
from swarm.state_transfer import StageStateServer, download_stage_state

STATE = StageStateServer.HANDLER

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # hivemind's own


CONFIG = "swarm/tiny-2stage"
MEMORY_BOUND = 150 << 20  # the node's resident memory may grow at most this much over the fuzzing


def _scrape(url: str) -> dict[str, float]:
    """/metrics as {name{labels}: value}, summed over nothing."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def _total(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix + "{"))


@pytest.mark.timeout(420)
def test_a_real_node_answers_counts_bans_and_keeps_serving_under_fuzzing(tmp_path):
    from node.config import load_config
    from node.model import shared_tensors
    from protocol.subspace import basis_fingerprint
    from swarm.dht import SwarmDHT
    from swarm.sim.swarm import LocalSwarm

    cfg = load_config(CONFIG)
    basis = basis_fingerprint(*(t for t in shared_tensors(cfg.model) if t is not None))
    pipe_limits, limits = cfg.wire.limits(cfg.model.vocab_size), cfg.wire.limits()
    # The star exchange's handler: a live node agrees no balanced round with a fuzzing peer, so the balanced
    # handler is fuzzed in one process instead, where a round's roster can hold it (test_fuzz_balanced.py).
    overrides = ["swarm.refresh_s=1", "swarm.expiry_s=8", "dataplane.max_inflight=1", "exchange.mode='star'"]
    pins = {0: ["swarm.stage=0"], 1: ["swarm.stage=1"]}  # a fuzzing "replica" must not make them rebalance
    report: dict = {}
    with LocalSwarm(2, CONFIG, overrides, workdir=tmp_path / "sim", node_overrides=pins) as swarm:
        started = time.monotonic()
        swarm.start_all()

        def training() -> bool:
            h0, h1 = swarm.health(0) or {}, swarm.health(1) or {}
            return (h1.get("state") == "online" and h1.get("stage") == 1 and h1.get("maddrs")
                    and (h0.get("pipeline") or {}).get("microbatches_ok", 0) >= 2)

        swarm.wait_until(training, 180, "node 1 ONLINE on stage 1 and microbatches through it", interval=0.5)
        report["startup_s"] = round(time.monotonic() - started, 1)
        h1 = swarm.health(1)
        member = SwarmDHT(initial_peers=h1["maddrs"][:1], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                          identity_path=str(tmp_path / "fuzzer.key"))
        member.run_in_background()
        try:
            assert member.wait_online(60), member.last_error
            asyncio.run(_fuzz_live(swarm, member, h1, cfg, basis, pipe_limits, limits, report))
        finally:
            member.shutdown()
        assert swarm.nodes[0].alive and swarm.nodes[1].alive
    report["total_s"] = round(time.monotonic() - started, 1)
    print(report)


@dataclasses.dataclass(frozen=True)
class _LiveTarget:
    """Node 1 (stage 1) as the fuzzing member sees it: the run, the exchange peers, the fragment sizes."""

    run: str
    target_id: str
    me: str  # the fuzzing peer
    sizes: list[int]
    max_group: int
    fragment: int = 0

    def leads(self, key) -> bool:
        return plan_groups(self.run, RoundKey(*key), [self.target_id, self.me], self.max_group)[0][0] == self.target_id

    def round_we_lead(self) -> int:
        return next(r for r in range(10**6, 10**6 + 1000) if not self.leads((1, self.fragment, r)))  # far off

    def whole_fragment(self, p2p_round: int) -> bytes:
        size = self.sizes[self.fragment]
        part = FragmentPart(run_id=self.run, stage=1, round_id=p2p_round, fragment_id=self.fragment, part=0,
                            num_parts=1, offset=0, total_values=size, values=torch.zeros(size))
        return encode_frame(encode_message(part))


async def _honest_manifests(honest, target, run: str, limits: WireLimits) -> tuple[StateManifest, StateManifest]:
    """Honest requests first (they also warm the node's state cache): the state's manifest names the
    fragment sizes (outer.global.<p>), and a chunk request needs a digest it holds."""
    _, reader, writer = await honest.call_binary_stream_handler(target, STATE)
    manifest = await request(reader, writer, StateRequest(run_id=run, stage=1), limits, timeout=60)
    consensus = await request(reader, writer, StateRequest(run_id=run, stage=1, part="consensus"), limits,
                              timeout=60)
    writer.close()
    assert isinstance(manifest, StateManifest) and isinstance(consensus, StateManifest)
    return manifest, consensus


def _fragment_sizes(manifest: StateManifest) -> list[int]:
    sizes_by = {int(e.name.rsplit(".", 1)[1]): e.shape[0] for e in manifest.entries
                if e.name.startswith("outer.global.")}
    return [sizes_by[p] for p in range(len(sizes_by))]


async def _wait_until_member(fuzzer, target, probe: bytes) -> None:
    """Until node 1 counts the fuzzer as a member (a valid part for a round it leads: not_leader)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        got = await send_case(fuzzer, target, EXCHANGE, Case("probe", probe), 30)
        if got.code == "not_leader":
            return
        assert got.code == "not_member" and loop.time() < deadline, f"membership probe: {got}"
        await asyncio.sleep(0.5)


def _live_runs(rng, t: _LiveTarget, cfg, basis: str, pipe_limits: WireLimits, limits: WireLimits,
               manifests: tuple[StateManifest, StateManifest]) -> list[tuple]:
    """(name, handler, cases, oracle, a well-formed request, the reply that serves it) for each handler."""
    manifest, consensus = manifests
    mine = t.round_we_lead()
    pipe = PipelineTarget(t.run, 1, basis, cfg.model.subspace_rank, cfg.model.max_seq_len)
    st = StateTarget(t.run, 1, {m.digest: len(m.chunk_sha256) for m in (manifest, consensus)},
                     parts=("all", "consensus"), volatile=True)
    checker = FragmentExchange(None, t.target_id, t.run, 1, t.sizes, cfg.exchange, cfg.wire.fragment_codec, limits)
    ex = ExchangeTarget(limits, lambda m, k, e, i: checker._check_part(m, RoundKey(*k), e, i), t.leads)
    per_part = cfg.exchange.max_values_per_part
    ex_cases = exchange_corpus(rng, t.run, 1, t.sizes, per_part, (t.fragment, mine), large=True, mutations=8)

    def valid_activation() -> bytes:
        frame = ActivationFrame(run_id=t.run, microbatch_id=rng.randrange(1, 1 << 40), stage=0, route=["x"],
                                token_ids=torch.randint(0, cfg.model.vocab_size, (2, 17)),
                                coefficients=torch.randn(2, 17, cfg.model.subspace_rank) * 0.1, codec="bf16",
                                basis=basis, budget_s=20.0)
        return encode_frame(encode_message(frame))

    state_request = encode_frame(encode_message(StateRequest(run_id=t.run, stage=1)))
    return [
        ("pipeline", PIPELINE, pipeline_corpus(rng, pipe, t.me, cfg.model.vocab_size, large=True, mutations=12),
         lambda c: serve_oracle(c, pipe_limits, pipe.rule), valid_activation, GradientFrame),
        ("state", STATE, state_corpus(rng, st, manifest.digest, large=True, mutations=8),
         lambda c: serve_oracle(c, limits, st.rule), lambda: state_request, StateManifest),
        ("exchange", EXCHANGE, ex_cases, ex.oracle, lambda: t.whole_fragment(mine), None),
    ]


async def _fuzz_each_handler(fuzzer, honest, target, runs: list[tuple]) -> tuple[dict, dict]:
    """Every case to every handler; after each, the fuzzer is banned there and an honest peer is not.
    Returns ({handler: [(case, expect, outcome)]}, {handler: seconds})."""
    problems, seen, timings = [], {}, {}
    for name, handler, cases, oracle, well_formed, served_as in runs:
        t0 = time.monotonic()
        found, seen[name] = await run_cases(fuzzer, target, handler, cases, oracle, 60.0, banned=True)
        problems += [f"{name}: {p}" for p in found]
        timings[name] = round(time.monotonic() - t0, 1)
        # (c) the fuzzing peer is banned here now: a well-formed request is refused as such ...
        got = await send_case(fuzzer, target, handler, Case("well_formed", well_formed()), 60)
        assert got.code == "banned", f"{name}: the fuzzing peer's well-formed request got {got}"
        # (a) ... while an honest peer is served (the exchange serves members only: "not_member")
        got = await send_case(honest, target, handler, Case("honest", well_formed()), 60)
        if served_as is None:
            assert got.code == "not_member", f"{name}: honest peer got {got}"
        else:
            assert isinstance(got.reply, served_as), f"{name}: honest peer got {got}"
    assert not problems, "\n".join(problems[:40])
    return seen, timings


def _assert_bans_shown(swarm, bans: dict[str, float], me: str, honest_id: str) -> None:
    """(c) The node shows the bans: /metrics peer_banned_seconds and /health "banned", on every handler."""
    for where in ("pipeline", "state", "exchange"):
        assert bans.get(f"protoswarm_peer_banned_seconds{{peer_id={me},where={where}}}", 0) > 0, where
        assert me in swarm.health(1).get("banned", {}).get(where, {}), where
    assert not any(honest_id in k for k in bans if k.startswith("protoswarm_peer_banned"))


async def _wait_stage0_trains(swarm, ok_before: int) -> None:
    """(a) The stage-0 node keeps training through the fuzzed node."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while swarm.health(0)["pipeline"]["microbatches_ok"] < ok_before + 3:
        assert loop.time() < deadline, "stage 0 stopped completing microbatches through the fuzzed node"
        await asyncio.sleep(0.5)


def _assert_counted_and_bounded(seen: dict, before: dict, after: dict, timings: dict, report: dict) -> None:
    # (b) Errors were counted: every protocol error of the pipeline and state handlers, those the fuzzer was
    # answered and those on streams it closed first. (The exchange's count only if the daemon hooks its
    # on_error to the metrics, hence the range.)
    banned_from = {n: next((i for i, (_, _, o) in enumerate(seen[n]) if o.code == "banned"), len(seen[n]))
                   for n in seen}

    def counted(names) -> int:
        # A case without a reply counts unless the handler had banned the fuzzer by then: a banned peer's
        # streams are refused when they open, before a byte is read (never decoded, never counted).
        return sum(1 for n in names for i, (_, e, o) in enumerate(seen[n]) if e.counted and (
            o.code == e.counted or (o.reply is None and not (n in ("pipeline", "state") and i >= banned_from[n]))))

    answered = sum(1 for n in ("pipeline", "state") for _, e, o in seen[n] if e.counted and o.code == e.counted)
    errors = _total(after, "protoswarm_protocol_errors_total") - _total(before, "protoswarm_protocol_errors_total")
    sent = sum(len(v) for v in seen.values())
    assert counted(("pipeline", "state")) <= errors <= counted(seen), (counted(("pipeline", "state")), errors)
    refused = {k: after[k] - before.get(k, 0.0) for k in after if k.startswith("protoswarm_pipeline_refused_total{")}
    banned_replies = sum(1 for _, _, o in seen["pipeline"] if o.code == "banned")
    assert refused.get("protoswarm_pipeline_refused_total{code=banned}", 0) >= banned_replies + 1 > 1
    # (d) Memory stays bounded.
    rss = "protoswarm_process_resident_memory_bytes{}"
    grew = after[rss] - before[rss]
    assert grew < MEMORY_BOUND, f"resident memory grew {grew / 2**20:.0f} MiB"
    report.update(
        cases={n: len(v) for n, v in seen.items()}, sent=sent, seconds=timings,
        answers={n: tally(str(o) for _, _, o in seen[n]) for n in seen},
        protocol_errors_counted=int(errors), answered_errors=answered,
        rss_mib=(round(before[rss] / 2**20), round(after[rss] / 2**20)),
        pipeline_refused={k.split("code=")[1][:-1]: int(v) for k, v in refused.items() if v},
    )


async def _fuzz_live(swarm, member, h1, cfg, basis, pipe_limits, limits, report) -> None:
    rng = random.Random(SEED + 1)
    target_id, run = h1["peer_id"], h1["run_id"]
    target = PeerID.from_base58(target_id)
    metrics_url = swarm.metrics_url(1)
    honest = await P2P.create(initial_peers=h1["maddrs"])
    try:
        fuzzer = await member.dht.replicate_p2p()
        me = fuzzer.peer_id.to_base58()
        # The fuzzing peer announces itself (signed) as an ONLINE replica of stage 1: an exchange member.
        record = StageRecord(peer_id=me, run_id=run, stage=1, num_stages=2, state="online", throughput=1e-6,
                             timestamp=time.time())
        assert await asyncio.to_thread(member.store_stage_record, record, 600.0)
        manifests = await _honest_manifests(honest, target, run, limits)
        t = _LiveTarget(run, target_id, me, _fragment_sizes(manifests[0]), cfg.exchange.max_group)
        await _wait_until_member(fuzzer, target, t.whole_fragment(t.round_we_lead()))

        # Training flows before; memory and counters now.
        before = _scrape(metrics_url)
        ok_before = swarm.health(0)["pipeline"]["microbatches_ok"]
        runs = _live_runs(rng, t, cfg, basis, pipe_limits, limits, manifests)
        seen, timings = await _fuzz_each_handler(fuzzer, honest, target, runs)
        _assert_bans_shown(swarm, _scrape(metrics_url), me, honest.peer_id.to_base58())

        # The honest peer downloads and verifies the whole stage state.
        snap = await download_stage_state(honest, target, run, 1, limits, timeout=120)
        assert snap.stage == 1 and snap.tensors
        await _wait_stage0_trains(swarm, ok_before)
        after = _scrape(metrics_url)
    finally:
        await honest.shutdown()
    _assert_counted_and_bounded(seen, before, after, timings, report)
