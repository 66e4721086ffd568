"""The fragment exchange over real hivemind P2P daemons in one process: agreement, faults, bad parts."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hivemind.p2p import PeerID
from p2p_util import run_p2p, wait_for

from protocol.framing import read_frame, write_frame
from protocol.messages import ErrorReply, FragmentPart, decode_message, encode_message
from protocol.settings import ConfigError
from swarm.diloco import quantized, robust_mean
from swarm.exchange import HANDLER, ExchangeConfig, FragmentExchange, RoundKey, chunk, plan_groups

RUN = "ex"
SIZES = [1000, 300]


def exchanges(daemons, **config):
    defaults = dict(gather_s=3.0, timeout_s=8.0, max_values_per_part=256)
    ex = [FragmentExchange(p, p.peer_id.to_base58(), RUN, 0, SIZES, ExchangeConfig(**{**defaults, **config}), "e3m0")
          for p in daemons]
    peers = [e.peer_id for e in ex]
    for e in ex:
        e.set_peers(peers)
    return ex


async def registered(daemons, **config):
    ex = exchanges(daemons, **config)
    for e in ex:
        await e.register()
    return ex, [e.peer_id for e in ex]


def led_by(leader, peers, fragment=0):
    """The first round of ``fragment`` whose single group ``leader`` leads."""
    return next(RoundKey(0, fragment, r) for r in range(1000)
                if plan_groups(RUN, RoundKey(0, fragment, r), peers, 16)[0][0] == leader)


def parts(n, numel=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=gen) * 1e-3 for _ in range(n)]


def test_plan_groups_is_deterministic_capped_and_mixes():
    peers = [f"p{i}" for i in range(10)]
    key = RoundKey(0, 1, 5)
    groups = plan_groups(RUN, key, peers, 4)
    assert groups == plan_groups(RUN, key, list(reversed(peers)), 4)  # order of the list does not matter
    assert sorted(len(g) for g in groups) == [3, 3, 4] and sorted(p for g in groups for p in g) == sorted(peers)
    other = plan_groups(RUN, RoundKey(0, 1, 6), peers, 4)
    assert [g[0] for g in other] != [g[0] for g in groups]  # leaders change with the round
    assert plan_groups(RUN, key, [], 4) == []
    assert [len(c) for _, c in chunk(torch.zeros(600), 256)] == [256, 256, 88]
    assert [o for o, _ in chunk(torch.zeros(600), 256)] == [0, 256, 512]


def test_three_replicas_agree_on_the_same_mean():
    async def body(*daemons):
        ex, _ = await registered(daemons)
        key = RoundKey(0, 0, 3)
        mine = parts(3)
        results = await asyncio.gather(*(e.run_round(key, p) for e, p in zip(ex, mine, strict=True)))
        leader = plan_groups(RUN, key, [e.peer_id for e in ex], 16)[0][0]
        assert sum(r.role == "leader" for r in results) == 1 and all(r.leader == leader for r in results)
        # The leader's mean: robust mean of the 4-bit parts, then itself sent as 4-bit.
        expected = quantized(robust_mean([quantized(p, "e3m0")[1] for p in mine]).mean, "e3m0")[1]
        for r in results:
            assert r.mean is not None, r.reason
            assert torch.equal(r.mean, expected)  # bit-identical on every replica
        lead = next(r for r in results if r.role == "leader")
        assert sorted(lead.group) == sorted(e.peer_id for e in ex) and not lead.rejected
        # 1000 values in 256-value chunks: 4 frames each way, 4-bit payloads (~0.5 byte a value + headers).
        for r in results:
            if r.role == "member":
                assert 500 < r.bytes_sent < 1500 and 500 < r.bytes_received < 1500
        assert all(e.stats["rounds_committed"] == 1 for e in ex)

    run_p2p(3, body)


def test_parts_count_by_their_senders_weight():
    """Each replica's weight (its inner steps) reaches the leader; the mean is weighted, capped by
    exchange.max_weight_ratio."""
    async def body(*daemons):
        ex, _ = await registered(daemons, max_weight_ratio=4.0)
        key = RoundKey(0, 0, 5)
        mine, weights = parts(3, seed=4), [1.0, 3.0, 100.0]
        results = await asyncio.gather(*(e.run_round(key, p, w) for e, p, w in zip(ex, mine, weights, strict=True)))
        sent = [quantized(p, "e3m0")[1] for p in mine]
        want = quantized((sent[0] * 1 + sent[1] * 3 + sent[2] * 12) / 16, "e3m0")[1]  # 100 capped at 4 × 3
        for r in results:
            assert r.mean is not None, r.reason
            torch.testing.assert_close(r.mean, want, rtol=0, atol=float(want.abs().max()) / 8)
        unweighted = quantized(robust_mean(sent).mean, "e3m0")[1]
        assert not torch.equal(results[0].mean, unweighted)

    run_p2p(3, body)


def test_a_silent_member_is_left_out_and_a_dead_leader_skips_the_round():
    async def body(*daemons):
        ex, peers = await registered(daemons)
        # A round whose leader is live: one member never shows up (it crashed before sending).
        key = led_by(peers[0], peers, 0)
        mine = parts(3, seed=1)
        t0 = time.monotonic()
        results = await asyncio.gather(ex[0].run_round(key, mine[0]), ex[1].run_round(key, mine[1]))
        assert time.monotonic() - t0 < 8.0  # gather_s (3 s) bounds the leader's wait
        assert all(r.mean is not None for r in results)
        assert sorted(results[0].group) == sorted(peers[:2])
        assert torch.equal(results[0].mean, results[1].mean)

        # A round led by peer 2, which is dead: the others skip it, within their deadline.
        key = led_by(peers[2], peers, 1)
        await daemons[2].shutdown()
        t0 = time.monotonic()
        results = await asyncio.gather(*(ex[i].run_round(key, parts(1, 300, seed=i)[0]) for i in range(2)))
        assert time.monotonic() - t0 < 10.0
        assert all(r.mean is None and r.reason for r in results), [r.reason for r in results]
        assert ex[0].stats["rounds_skipped"] == 1 and ex[1].stats["rounds_skipped"] == 1

    run_p2p(3, body)


def test_poisoned_part_is_dropped_and_its_sender_skips():
    async def body(*daemons):
        ex, peers = await registered(daemons)
        key = led_by(peers[0], peers, 0)
        mine = parts(3, seed=2)
        mine[2] = mine[2] * 1e5  # replica 2 diverged (or lies): its norm is 10^5 times the others'
        results = await asyncio.gather(*(e.run_round(key, p) for e, p in zip(ex, mine, strict=True)))
        lead, honest, bad = results
        assert lead.rejected == {peers[2]: "norm"} and sorted(lead.group) == sorted(peers[:2])
        assert torch.equal(lead.mean, honest.mean)
        assert bad.mean is None and "dropped" in bad.reason
        assert ex[0].stats["parts_rejected"] == 1

    run_p2p(3, body)


def test_a_repeat_poisoner_is_banned_and_shown_while_the_honest_replicas_keep_averaging():
    async def body(*daemons):
        ex, peers = await registered(daemons, peer_strikes=2)
        leader, poisoner = ex[0], peers[2]
        keys = [RoundKey(0, 0, r) for r in range(1000)
                if plan_groups(RUN, RoundKey(0, 0, r), peers, 16)[0][0] == peers[0]][:3]
        for n, key in enumerate(keys):
            mine = parts(3, seed=10 + n)
            mine[2] = mine[2] * 1e5  # every round: a part 10^5 times the others' norm
            lead, honest, bad = await asyncio.gather(*(e.run_round(key, p) for e, p in zip(ex, mine, strict=True)))
            assert sorted(lead.group) == sorted(peers[:2]) and torch.equal(lead.mean, honest.mean)
            assert bad.mean is None
            if n == 0:
                assert leader.strikes.banned() == {}  # one dropped part is a strike, not yet a ban
        # Two strikes: banned, and the leader's ban table names it (exported as peer_banned_seconds).
        assert set(leader.strikes.banned()) == {poisoner} and leader.stats["peers_banned"] == 1
        assert 0 < leader.strikes.banned()[poisoner] <= leader.config.ban_s

    run_p2p(3, body)


def test_malformed_parts_get_error_replies_and_repeat_offenders_are_banned():
    async def body(*daemons):
        ex = exchanges(daemons[:1], peer_strikes=2)
        await ex[0].register()
        attacker = daemons[1]
        ex[0].set_peers([ex[0].peer_id, attacker.peer_id.to_base58()])

        async def send(**fields):
            base = dict(run_id=RUN, stage=0, round_id=1, fragment_id=1, part=0, num_parts=2, offset=0,
                        total_values=300, values=torch.zeros(256), codec="e3m0")
            base.update(fields)
            _, reader, writer = await attacker.call_binary_stream_handler(PeerID.from_base58(ex[0].peer_id), HANDLER)
            try:
                await write_frame(writer, encode_message(FragmentPart(**base)))
                raw = await asyncio.wait_for(read_frame(reader), 5)
                return decode_message(raw)
            finally:
                writer.close()

        reply = await send(total_values=999)  # no fragment of that size
        assert isinstance(reply, ErrorReply) and "does not exist" in reply.message
        reply = await send(offset=10)  # out of order
        assert isinstance(reply, ErrorReply) and "out of order" in reply.message
        reply = await send()  # well-formed now, but banned after two strikes
        assert isinstance(reply, ErrorReply) and reply.code == "banned"
        assert ex[0].stats["refused_banned"] == 1

        # A stranger (not an ONLINE replica of the stage) is refused outright.
        ex[0].set_peers([ex[0].peer_id])
        reply = await send()
        assert isinstance(reply, ErrorReply) and reply.code in ("banned", "not_member")

    run_p2p(2, body, timeout=60)


def test_early_parts_wait_for_a_late_leader():
    async def body(*daemons):
        ex, peers = await registered(daemons[:2])
        key = led_by(peers[0], peers, 0)
        mine = parts(2, seed=3)
        member = asyncio.create_task(ex[1].run_round(key, mine[1]))
        await wait_for(lambda: key in ex[0]._gathers and ex[0]._gathers[key].parts, 5, "the early part is held")
        await asyncio.sleep(0.5)  # the leader reaches the round a little later
        lead = await ex[0].run_round(key, mine[0])
        got = await member
        assert lead.mean is not None and torch.equal(lead.mean, got.mean)
        # A part for a round the leader already averaged is refused at once, not held.
        late = await ex[1].run_round(key, mine[1])
        assert late.mean is None and "already averaged" in late.reason

    run_p2p(2, body)


def test_config_is_checked():
    with pytest.raises(ConfigError, match=r"exchange\.gather_s"):
        ExchangeConfig(gather_s=10, timeout_s=5)
    with pytest.raises(ConfigError, match=r"exchange\.max_group"):
        ExchangeConfig(max_group=0)
    with pytest.raises(ConfigError, match=r"exchange\.mode"):
        ExchangeConfig(mode="ring")
    with pytest.raises(ConfigError, match=r"exchange\.max_norm_ratio"):
        ExchangeConfig(max_norm_ratio=0.5)
