"""Fuzzing every P2P stream handler the daemon registers: the pipeline (swarm/dataplane/), the
fragment exchange (swarm/exchange.py) and the state server (swarm/state_transfer.py).

The harness is tests/fuzz_util.py: seeded cases (random bytes, framing damage, oversize prefixes,
wrong versions, dtypes, shapes, codecs and field types, non-finite tensors, out-of-range ids and
integers, bit-flipped and truncated valid messages) and an oracle that says what the node must
answer to each.

- In one process, over two real hivemind P2P daemons, each handler (with strikes set out of reach)
  answers every case exactly as the oracle says, and counts exactly the protocol errors and
  refusals it should.
- Against a real `node start` swarm (2 nodes, 2 pipeline stages), a fuzzing peer that is a signed,
  ONLINE member of the target's stage sends the cases to all three handlers. The node answers each
  (or is allowed to close a stream whose byte position is lost), counts the errors in /metrics, bans
  the fuzzing peer on every handler, keeps serving an honest client and the honest stage-0 node
  that trains through it, and its resident memory stays within a fixed bound.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import urllib.request

import pytest
import torch
from fuzz_util import (
    Case,
    ExchangeTarget,
    Expect,
    PipelineTarget,
    StateTarget,
    check,
    exchange_corpus,
    pipeline_corpus,
    send_case,
    serve_oracle,
    state_corpus,
    tally,
)
from hivemind.p2p import P2P, PeerID
from p2p_util import run_p2p, wait_for
from prometheus_client.parser import text_string_to_metric_families

from protocol.framing import encode_frame
from protocol.messages import (
    ActivationFrame,
    FragmentPart,
    GradientFrame,
    StageRecord,
    StateChunkRequest,
    StateManifest,
    StateRequest,
    encode_message,
)
from protocol.streams import PeerStrikes, request
from protocol.tensors import WireConfig, WireLimits
from swarm.dataplane import HANDLER as PIPELINE
from swarm.dataplane import DataPlane, DataplaneConfig, PipelineEvents
from swarm.exchange import HANDLER as EXCHANGE
from swarm.exchange import ExchangeConfig, FragmentExchange, RoundKey, plan_groups
from swarm.state_transfer import StageSnapshot, StageStateServer, download_stage_state

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # hivemind's own
STATE = StageStateServer.HANDLER
SEED = 20240


# ---- the strike table -----------------------------------------------------------------------------


def test_peer_strikes_ban_in_a_window_and_stay_bounded():
    now = [0.0]
    strikes = PeerStrikes(3, window_s=10.0, ban_s=30.0, max_peers=100, clock=lambda: now[0])
    assert not strikes.strike("a") and not strikes.strike("a")
    now[0] = 11.0  # both fell out of the window
    assert not strikes.strike("a") and not strikes.strike("a") and strikes.banned_for("a") == 0.0
    assert strikes.strike("a") and strikes.banned_for("a") == 30.0 and strikes.bans == 1
    now[0] = 40.0
    assert strikes.banned_for("a") == 1.0
    now[0] = 41.5
    assert strikes.banned_for("a") == 0.0 and len(strikes) == 0  # a served ban leaves nothing behind
    for i in range(10_000):  # a flood of fresh identities: at most max_peers are remembered
        strikes.strike(f"sybil-{i}")
    assert len(strikes) == 100 and max(len(t) for t, _ in strikes._peers.values()) <= 3
    assert "sybil-9999" in strikes._peers and "sybil-0" not in strikes._peers


# ---- every case, every handler, in one process ----------------------------------------------------

RUN = "fuzz"
VOCAB, WIDTH, MAX_SEQ = 256, 8, 64
SIZES = [1000, 300]  # fragment sizes: 4 and 2 parts of at most 256 values


class _Stage:
    """The last of 3 pipeline stages (StageCompute duck type): answers every microbatch with zeros."""

    stage, num_stages, width, basis, is_first, is_last = 2, 3, WIDTH, "b" * 16, False, True
    queue_depth = in_flight = 0

    async def forward_backward_last(self, ids, boundary):
        return 1.0, torch.zeros_like(boundary)

    def drop(self, key) -> bool:
        return False


class _Events(PipelineEvents):
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.refused: list[str] = []

    def protocol_error(self, code: str) -> None:
        self.errors.append(code)

    def pipeline_refused(self, code: str) -> None:
        self.refused.append(code)


def _snapshot() -> StageSnapshot:
    g = torch.Generator().manual_seed(1)
    return StageSnapshot(stage=1, step=5, round_id=0, tensors={"w": torch.randn(64, 16, generator=g),
                                                               "b": torch.randn(16, generator=g).half()})


async def _run_cases(client, server_id, handler, cases, oracle, timeout, *, held_timeout=None, banned=False):
    """Send every case; returns (problems, [(case, expect, outcome)])."""
    problems, seen = [], []
    for case in cases:
        expect: Expect = oracle(case)
        if banned:  # a banned peer may be answered "banned" wherever the handler decides (not while framing)
            expect = Expect(codes=expect.codes | {"banned"}, ok=expect.ok, counted=expect.counted,
                            reply=expect.reply, refusal=expect.refusal)
        wait = expect.reply in ("required", "optional") or (expect.reply == "held" and held_timeout is not None)
        got = await send_case(client, server_id, handler, case, held_timeout if expect.reply == "held" else timeout,
                              wait=wait)
        problem = check(case, expect, got)
        if problem:
            problems.append(problem)
        seen.append((case, expect, got))
    return problems, seen


@dataclasses.dataclass
class _Served:
    """The three handlers on the server daemon, strikes out of reach, and what each of them counted."""

    plane: DataPlane
    exchange: FragmentExchange
    state: StageStateServer
    events: _Events  # the pipeline's protocol errors and refusals
    exchange_errors: list
    state_errors: list


async def _serve_every_handler(server, peers: list[str], node_limits: WireLimits, limits: WireLimits,
                               config: ExchangeConfig) -> _Served:
    me = server.peer_id.to_base58()
    events, exchange_errors, state_errors = _Events(), [], []
    plane = DataPlane(server, me, RUN, DataplaneConfig(peer_strikes=10**6, microbatch_timeout_s=10.0),
                      WireConfig(), d_model=WIDTH, max_seq_len=MAX_SEQ, limits=node_limits, events=events)
    plane.attach(_Stage())
    await plane.register()
    exchange = FragmentExchange(server, me, RUN, 0, SIZES, config, "e3m0", limits, on_error=exchange_errors.append)
    exchange.set_peers(peers)
    await exchange.register()
    state = StageStateServer(RUN, _snapshot, limits, chunk_bytes=97, peer_strikes=10**6, on_error=state_errors.append)
    await state.register(server)
    return _Served(plane, exchange, state, events, exchange_errors, state_errors)


async def _assert_counted_once(served: _Served, seen: dict[str, list]) -> None:
    """Every protocol error was counted once, and nothing else (streams that end late are polled for)."""
    want = {name: tally(e.counted for _, e, _ in seen[name] if e.counted) for name in seen}
    got = {"pipeline": served.events.errors, "state": served.state_errors, "exchange": served.exchange_errors}
    await wait_for(lambda: all(tally(e if isinstance(e, str) else e.code for e in got[n]) == want[n] for n in want),
                   15, "every protocol error counted once")
    refusals = tally(e.refusal for _, e, _ in seen["pipeline"] if e.refusal)
    assert tally(served.events.refused) == refusals


@pytest.mark.timeout(240)
def test_every_handler_answers_every_case_as_the_oracle_says():
    rng = random.Random(SEED)
    node_limits = WireLimits(max_token_id=VOCAB)  # the pipeline's (the vocabulary bounds token ids)
    limits = WireLimits()  # the exchange's and the state server's
    summary: dict[str, dict] = {}

    async def body(server, client):
        me, you = server.peer_id.to_base58(), client.peer_id.to_base58()
        config = ExchangeConfig(gather_s=0.5, timeout_s=2.0, max_values_per_part=256, peer_strikes=10**6)
        served = await _serve_every_handler(server, [me, you], node_limits, limits, config)

        # An honest fetch first: the digest the chunk requests name.
        _, reader, writer = await client.call_binary_stream_handler(server.peer_id, STATE)
        manifest = await request(reader, writer, StateRequest(run_id=RUN, stage=1), limits, timeout=10)
        writer.close()
        assert isinstance(manifest, StateManifest)

        pipe = PipelineTarget(RUN, 2, _Stage.basis, WIDTH, MAX_SEQ)
        st = StateTarget(RUN, 1, {manifest.digest: len(manifest.chunk_sha256)})
        checker = FragmentExchange(None, me, RUN, 0, SIZES, config, "e3m0", limits)
        peers = [me, you]
        leads = lambda key: plan_groups(RUN, RoundKey(*key), peers, 16)[0][0] == me  # noqa: E731
        ex = ExchangeTarget(limits, lambda m, k, e, i: checker._check_part(m, RoundKey(*k), e, i), leads)
        fragment = 0
        mine = next(r for r in range(1000) if not leads((0, fragment, r)))  # rounds the client leads

        runs = [
            ("pipeline", PIPELINE, pipeline_corpus(rng, pipe, you, VOCAB, large=True),
             lambda c: serve_oracle(c, node_limits, pipe.rule)),
            ("state", STATE, state_corpus(rng, st, manifest.digest, large=True),
             lambda c: serve_oracle(c, limits, st.rule)),
            ("exchange", EXCHANGE, exchange_corpus(rng, RUN, 0, SIZES, 256, (fragment, mine), large=True),
             ex.oracle),
        ]
        problems, seen = [], {}
        for name, handler, cases, oracle in runs:
            found, seen[name] = await _run_cases(client, server.peer_id, handler, cases, oracle, 15.0,
                                                 held_timeout=config.timeout_s + 5)
            problems += [f"{name}: {p}" for p in found]
        assert not problems, "\n".join(problems[:40])

        await _assert_counted_once(served, seen)
        for name in seen:
            summary[name] = {"cases": len(seen[name]), "families": len(tally(c.family for c, _, _ in seen[name])),
                             "answers": tally(str(o) for _, _, o in seen[name])}
        plane, exchange, state = served.plane, served.exchange, served.state
        assert plane.stats["served"] >= 4 and exchange.stats["refused_not_leader"] >= 1
        assert len(plane.strikes) == len(exchange.strikes) == len(state.strikes) == 1  # one peer, one entry

    run_p2p(2, body, timeout=200)
    print(summary)


@pytest.mark.timeout(120)
def test_state_server_bans_repeat_offenders_and_silent_members_cannot_hold_exchange_streams(monkeypatch):
    import swarm.exchange

    monkeypatch.setattr(swarm.exchange, "LINGER_S", 0.5)
    limits = WireLimits()

    async def body(server, client):
        me, you = server.peer_id.to_base58(), client.peer_id.to_base58()
        errors, exchange_errors = [], []
        state = StageStateServer(RUN, _snapshot, limits, chunk_bytes=97, on_error=errors.append, peer_strikes=3,
                                 ban_s=3.0)
        await state.register(server)

        async def ask(msg) -> str:
            got = await send_case(client, server.peer_id, STATE, Case("ask", encode_frame(encode_message(msg))), 10)
            return got.code or type(got.reply).__name__

        # Honest mistakes are not offences: a state that went stale, another stage.
        for _ in range(4):
            assert await ask(StateChunkRequest(run_id=RUN, stage=1, digest="e" * 64, index=0)) == "stale"
            assert await ask(StateRequest(run_id=RUN, stage=2)) == "wrong_stage"
        assert await ask(StateRequest(run_id=RUN, stage=1)) == "StateManifest"
        # Offences: a broken frame, another run, a chunk that does not exist. The third bans.
        garbage = await send_case(client, server.peer_id, STATE, Case("garbage", encode_frame(b"\x00" * 9)), 10)
        assert garbage.code == "malformed"
        assert await ask(StateRequest(run_id="another-run", stage=1)) == "wrong_run"
        digest = next(iter(state._cache))
        assert await ask(StateChunkRequest(run_id=RUN, stage=1, digest=digest, index=10**6)) == "malformed"
        assert await ask(StateRequest(run_id=RUN, stage=1)) == "banned"
        assert [e.code for e in errors] == ["malformed", "malformed"] and state.stats["peers_banned"] == 1
        await asyncio.sleep(3.0)  # the ban ends
        assert await ask(StateRequest(run_id=RUN, stage=1)) == "StateManifest"

        # A member that opens streams and then says nothing, or stops after one part of a fragment, is
        # let go after exchange.timeout_s: no stream is held for ever, and it is not an offence.
        config = ExchangeConfig(gather_s=0.5, timeout_s=1.5, max_values_per_part=256)
        exchange = FragmentExchange(server, me, RUN, 0, SIZES, config, "e3m0", limits, on_error=exchange_errors.append)
        exchange.set_peers([me, you])
        await exchange.register()
        first = FragmentPart(run_id=RUN, stage=0, round_id=1, fragment_id=0, part=0, num_parts=4, offset=0,
                             total_values=SIZES[0], values=torch.zeros(256))
        silent = [b"", encode_frame(encode_message(first))] * 4
        started = time.monotonic()
        outcomes = await asyncio.gather(*(send_case(client, server.peer_id, EXCHANGE, Case("silent", d), 20)
                                          for d in silent))
        assert [str(o) for o in outcomes] == ["eof"] * len(silent)
        assert time.monotonic() - started < 1.5 + 0.5 + 5.0
        assert exchange_errors == [] and exchange.strikes.banned_for(you) == 0 and len(exchange.strikes) == 0

    run_p2p(2, body, timeout=100)


# ---- a real node ------------------------------------------------------------------------------------

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
    overrides = ["swarm.refresh_s=1", "swarm.expiry_s=8", "dataplane.max_inflight=1"]
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
        found, seen[name] = await _run_cases(fuzzer, target, handler, cases, oracle, 60.0, banned=True)
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
    def counted(names) -> int:
        return sum(1 for n in names for _, e, o in seen[n] if e.counted and (o.code == e.counted or o.reply is None))

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
