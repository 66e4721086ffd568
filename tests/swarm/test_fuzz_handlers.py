"""Fuzzing every P2P stream handler the daemon registers: the pipeline's training and evaluation
handlers (swarm/dataplane/), the fragment exchange (swarm/exchange/star.py) and the state server
(swarm/state_transfer.py).

The harness is tests/fuzz_util.py: seeded cases (random bytes, framing damage, oversize prefixes,
wrong versions, dtypes, shapes, codecs and field types, non-finite tensors, out-of-range ids and
integers, bit-flipped and truncated valid messages) and an oracle that says what the node must
answer to each.

- In one process, over two real hivemind P2P daemons, each handler (with strikes set out of reach)
  answers every case exactly as the oracle says, and counts exactly the protocol errors and
  refusals it should.
- The same cases against a real `node start` swarm: tests/swarm/test_fuzz_live.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import pytest
import torch
from fuzz_corpus import exchange_corpus, pipeline_corpus, state_corpus
from fuzz_util import (
    SEED,
    Case,
    ExchangeTarget,
    PipelineTarget,
    StateTarget,
    assert_counted_once,
    run_cases,
    send_case,
    serve_oracle,
    tally,
)
from p2p_util import run_p2p

from protocol.admission import StreamLimits
from protocol.framing import encode_frame
from protocol.messages import (
    FragmentPart,
    StateChunkRequest,
    StateManifest,
    StateRequest,
    encode_message,
)
from protocol.streams import PeerStrikes, request
from protocol.tensors import WireConfig, WireLimits
from swarm.dataplane import EVAL_HANDLER as PIPELINE_EVAL
from swarm.dataplane import HANDLER as PIPELINE
from swarm.dataplane import DataPlane, DataplaneConfig, PipelineEvents
from swarm.exchange import HANDLER as EXCHANGE
from swarm.exchange import ExchangeConfig, FragmentExchange, RoundKey, plan_groups
from swarm.state_transfer import StageSnapshot, StageStateServer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # hivemind's own
STATE = StageStateServer.HANDLER


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
    assert len(strikes) == 100 and max(len(t) for t in strikes._offences.values()) <= 3
    assert "sybil-9999" in strikes._offences and "sybil-0" not in strikes._offences


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

    async def evaluate(self, ids, boundary):
        return torch.tensor(1.5), "t" * 16

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
    state = StageStateServer(RUN, _snapshot, limits, chunk_bytes=97, peer_strikes=10**6, on_error=state_errors.append,
                             manifests_per_s=1e6, stream_limits=StreamLimits(max_streams=64, rate=1e6, burst=1e6))
    await state.register(server)
    return _Served(plane, exchange, state, events, exchange_errors, state_errors)


async def _assert_counted_once(served: _Served, seen: dict[str, list]) -> None:
    """Every protocol error counted once, and nothing else (fuzz_util.assert_counted_once); the pipeline's
    refusals exactly."""
    got = {"pipeline": served.events.errors, "state": served.state_errors, "exchange": served.exchange_errors}
    await assert_counted_once(seen, lambda: {n: tally(e if isinstance(e, str) else e.code for e in got[n])
                                             for n in seen})
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
        pipe_eval = PipelineTarget(RUN, 2, _Stage.basis, WIDTH, MAX_SEQ, evaluate=True)
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
            ("pipeline_eval", PIPELINE_EVAL, pipeline_corpus(rng, pipe_eval, you, VOCAB),
             lambda c: serve_oracle(c, node_limits, pipe_eval.rule)),
            ("state", STATE, state_corpus(rng, st, manifest.digest, large=True),
             lambda c: serve_oracle(c, limits, st.rule)),
            ("exchange", EXCHANGE, exchange_corpus(rng, RUN, 0, SIZES, 256, (fragment, mine), large=True),
             ex.oracle),
        ]
        problems, seen = [], {}
        for name, handler, cases, oracle in runs:
            found, seen[name] = await run_cases(client, server.peer_id, handler, cases, oracle, 15.0,
                                                 held_timeout=config.timeout_s + 5)
            problems += [f"{name}: {p}" for p in found]
        assert not problems, "\n".join(problems[:40])
        assert served.plane.stats["eval_served"] >= 4
        seen["pipeline"] += seen.pop("pipeline_eval")  # one data plane counts both handlers' errors

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
    import swarm.exchange.star

    monkeypatch.setattr(swarm.exchange.star, "LINGER_S", 0.5)
    limits = WireLimits()

    async def body(server, client):
        me, you = server.peer_id.to_base58(), client.peer_id.to_base58()
        errors, exchange_errors = [], []
        state = StageStateServer(RUN, _snapshot, limits, chunk_bytes=97, on_error=errors.append, peer_strikes=3,
                                 ban_s=3.0, manifests_per_s=1e6)  # refills at once: these asks test strikes, not the rate
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
