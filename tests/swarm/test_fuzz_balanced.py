"""Fuzzing the balanced exchange's handler (swarm/exchange/balanced.py) over two real hivemind P2P
daemons in one process. The cases and the oracle are tests/fuzz_balanced.py: slices a member sends
to a reducer or checker (damaged framing, headers, tensors, non-finite values, parts out of order,
other rounds, runs, stages, fragments, codecs) and joins sent to a group's leader.

- Every case is answered as the oracle says, and every protocol error is counted once.
- The fuzzing peer is never handed a roster, a slice summary or a mean.
- Afterwards an honest round between the same two daemons commits, the same mean on both.
- A repeat offender is banned; a peer that is not an ONLINE replica is refused without a strike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest
import torch
from fuzz_balanced import BalancedTarget, SliceStream, balanced_corpus
from fuzz_util import SEED, Case, assert_counted_once, run_cases, send_case, tally
from p2p_util import run_p2p

from protocol.framing import encode_frame
from protocol.messages import encode_message
from protocol.tensors import WireLimits
from swarm.exchange import BalancedExchange, ExchangeConfig, RoundKey, plan_slices
from swarm.exchange.groups import round_order
from swarm.exchange.roster import HANDLER

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # hivemind's own
RUN = "fuzzb"
SIZES = [1000, 300]
PER = 128  # values a FragmentPart: a slice of 500 travels in 4 parts
LIMITS = WireLimits()


def _node(p2p, config: ExchangeConfig, errors: list | None = None) -> BalancedExchange:
    return BalancedExchange(p2p, p2p.peer_id.to_base58(), RUN, 0, SIZES, config, "e3m0", LIMITS,
                            on_error=errors.append if errors is not None else None)


@pytest.mark.timeout(300)
def test_balanced_handler_answers_every_case_as_the_oracle_says_and_still_averages():
    rng = random.Random(SEED)

    async def body(server, client):
        me, you = server.peer_id.to_base58(), client.peer_id.to_base58()
        errors: list = []
        config = ExchangeConfig(gather_s=0.5, timeout_s=2.0, max_values_per_part=PER, peer_strikes=10**6)
        node = _node(server, config, errors)
        node.set_peers([me, you])
        await node.register()

        key = RoundKey(0, 0, 5)  # a round whose roster (agreed below) holds the fuzzing peer
        roster = (round_order(RUN, key, [me, you]), frozenset())
        slices = {o: n for o, n, r, c in plan_slices(roster[0], SIZES[0]) if me in (r, c)}
        start = min(slices)
        stream = SliceStream(RUN, 0, 0, key.round, SIZES[0], PER, "e3m0", start=start, length=slices[start])
        target = BalancedTarget(LIMITS, RUN, 0, SIZES, PER, "e3m0", (0, 0, key.round), slices)
        cases = balanced_corpus(rng, stream, SIZES, join_round=6)
        problems, seen = [], []
        for case in cases:
            node.rosters.settle(key, roster)  # again if held cases pushed it out of the bounded table
            found, got = await run_cases(client, server.peer_id, HANDLER, [case], target.oracle, 15.0,
                                         held_timeout=config.timeout_s + 5)
            problems += found
            seen += got
        assert not problems, "\n".join(problems[:40])
        await assert_counted_once({"exchange": seen}, lambda: {"exchange": tally(e.code for e in errors)})
        answers = tally(str(o) for _, _, o in seen)
        families = {c.family.split("_")[0] for c, _, _ in seen}
        assert {"slice", "join"} <= families and len(cases) >= 80, (len(cases), answers)
        assert answers.get("ErrorReply[malformed]", 0) >= 10 and answers.get("ErrorReply[not_leader]", 0) >= 1
        assert len(node.strikes) == 1  # one peer, one entry, never banned (strikes out of reach)

        # The node is unharmed: an honest round with the same peer commits, the same mean on both.
        node.config = dataclasses.replace(config, gather_s=3.0, timeout_s=8.0)
        peer = _node(client, node.config)
        peer.set_peers([me, you])
        await peer.register()
        parts = [torch.randn(SIZES[1], generator=torch.Generator().manual_seed(s)) * 1e-3 for s in (1, 2)]
        honest = RoundKey(0, 1, 40)
        results = await asyncio.gather(node.run_round(honest, parts[0]), peer.run_round(honest, parts[1]))
        assert all(r.mean is not None for r in results), [r.reason for r in results]
        assert torch.equal(results[0].mean, results[1].mean) and results[0].group_size == 2
        print({"cases": len(seen), "answers": answers})

    run_p2p(2, body, timeout=280)


@pytest.mark.timeout(120)
def test_balanced_handler_refuses_strangers_and_bans_repeat_offenders():
    async def body(server, client):
        me, you = server.peer_id.to_base58(), client.peer_id.to_base58()
        errors: list = []
        node = _node(server, ExchangeConfig(gather_s=0.5, timeout_s=2.0, max_values_per_part=PER, peer_strikes=3,
                                            ban_s=60.0), errors)
        node.set_peers([me])  # the client is not an ONLINE replica of the stage here
        await node.register()
        stream = SliceStream(RUN, 0, 0, 5, SIZES[0], PER, "e3m0", start=0, length=500)
        send = lambda data: send_case(client, server.peer_id, HANDLER, Case("c", data), 10)  # noqa: E731
        assert (await send(stream.stream())).code == "not_member"
        node.set_peers([me, you])
        garbage = encode_frame(b"\x00" * 9)
        for _ in range(3):
            assert (await send(garbage)).code == "malformed"
        assert (await send(stream.stream())).code == "banned"
        assert (await send(encode_frame(encode_message(stream.part(0))))).code == "banned"
        assert [e.code for e in errors] == ["malformed"] * 3 and node.stats["peers_banned"] == 1

    run_p2p(2, body, timeout=100)
