"""Admission before a byte is read (protocol/admission.py), the rate limiter and the bounded ban table."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import pytest

from protocol.admission import REFUSED, Admission, StreamLimits
from protocol.errors import RateLimited
from protocol.framing import encode_frame
from protocol.messages import ErrorReply, StateRequest, encode_message
from protocol.streams import PeerStrikes, RateLimiter, receive_message, serve_stream


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_refills_at_its_rate_and_says_how_long_to_wait():
    clock = Clock()
    rates = RateLimiter(rate=2.0, burst=4, clock=clock)
    assert [rates.take("a") for _ in range(4)] == [0.0] * 4
    assert rates.take("a") == pytest.approx(0.5)  # empty: one token in half a second
    assert rates.take("b") == 0.0  # buckets are per key
    clock.now = 0.5
    assert rates.take("a") == 0.0 and rates.take("a") == pytest.approx(0.5)
    clock.now = 100.0  # saved up, but never more than the burst
    assert sum(rates.take("a") == 0.0 for _ in range(10)) == 4


def test_rate_limiter_is_bounded_and_a_flood_of_keys_only_refills_an_old_one():
    clock = Clock()
    rates = RateLimiter(rate=1.0, burst=2, max_keys=50, clock=clock)
    rates.take("old"), rates.take("old")
    assert rates.take("old") > 0
    for i in range(10_000):
        rates.take(f"sybil-{i}")
    assert len(rates) == 50
    assert [rates.take("old") for _ in range(3)][:2] == [0.0, 0.0]  # forgotten: a full burst, no more


def test_a_flood_of_fresh_identities_washes_out_offences_but_never_a_ban():
    clock = Clock()
    strikes = PeerStrikes(3, window_s=10.0, ban_s=30.0, max_peers=100, max_bans=10, clock=clock)
    for _ in range(3):
        strikes.strike("offender")
    assert strikes.banned_for("offender") == 30.0
    for i in range(10_000):  # one offence each: only the offence table churns
        strikes.strike(f"sybil-{i}")
    assert strikes.banned_for("offender") == 30.0 and strikes.displaced == 0
    assert len(strikes._offences) == 100 and len(strikes._bans) == 1
    # To displace the ban the flood must earn max_bans bans of its own; the one ending soonest goes first.
    clock.now = 1.0
    for i in range(9):
        for _ in range(3):
            strikes.strike(f"banned-{i}")
    assert strikes.banned_for("offender") > 0 and strikes.displaced == 0
    for _ in range(3):
        strikes.strike("banned-9")
    assert strikes.banned_for("offender") == 0.0 and strikes.displaced == 1
    assert len(strikes.banned()) == 10 and all(left == 30.0 for left in strikes.banned().values())
    clock.now = 40.0  # expired bans make room before any is displaced
    for _ in range(3):
        strikes.strike("late")
    assert strikes.displaced == 1 and list(strikes.banned()) == ["late"]


def test_admission_refuses_banned_floods_and_excess_rates_and_bans_repeat_flooders():
    clock = Clock()
    handler_bans: dict[str, float] = {}
    seen: list[tuple[str, str]] = []
    limits = StreamLimits(max_streams=2, rate=1.0, burst=3, flood_strikes=4, ban_s=60.0)
    gate = Admission("test.v1", limits, banned=lambda p: handler_bans.get(p, 0.0),
                     on_refused=lambda peer, code: seen.append((peer, code)), clock=clock)
    before = REFUSED[("test.v1", "flood")]
    assert gate.admit("a") is None and gate.admit("a") is None and gate.open_streams("a") == 2
    assert gate.admit("a").code == "flood"
    assert REFUSED[("test.v1", "flood")] == before + 1
    gate.release("a")
    assert gate.admit("a") is None  # the third token of the burst
    gate.release("a")
    refusal = gate.admit("a")
    assert refusal.code == "rate_limited" and refusal.retry_after == pytest.approx(1.0)
    with pytest.raises(RateLimited):
        gate.request("a")
    assert gate.admit("b") is None  # another peer is not affected
    # the flood_strikes-th flood or excess request bans the peer, for every stream
    assert gate.admit("a").code == "rate_limited" and gate.strikes.banned_for("a") == 60.0
    assert gate.admit("a").code == "banned"
    clock.now = 61.0
    assert gate.admit("a") is None
    handler_bans["a"] = 5.0  # the handler's own ban counts too
    assert gate.admit("a").code == "banned" and gate.admit("a").retry_after == 5.0
    assert [code for peer, code in seen if peer == "a"] == ["flood", "rate_limited", "rate_limited", "rate_limited",
                                                             "banned", "banned", "banned"]


async def _pair():
    a, b = socket.socketpair()
    server = await asyncio.open_connection(sock=a)
    client = await asyncio.open_connection(sock=b)
    return server, client


def test_a_refused_stream_is_answered_and_closed_and_its_input_never_read():
    calls = []

    async def handler(info, reader, writer):
        calls.append(info.peer_id)
        writer.close()

    async def main():
        gate = Admission("test.v1", StreamLimits(max_streams=1, rate=100, burst=100))
        wrapped = gate.wrap(handler)
        (sr, sw), (cr, cw) = await _pair()
        gate.admit("p")  # one stream held open already
        cw.write(b"\xff" * 64)  # garbage that would fail any decoder
        await cw.drain()
        await asyncio.wait_for(wrapped(SimpleNamespace(peer_id="p"), sr, sw), 5)
        reply = await receive_message(cr, timeout=5)
        assert isinstance(reply, ErrorReply) and reply.code == "flood" and not calls
        gate.release("p")
        (sr, sw), _ = await _pair()
        await asyncio.wait_for(wrapped(SimpleNamespace(peer_id="p"), sr, sw), 5)
        assert calls == ["p"] and gate.open_streams("p") == 0  # released after the handler

    asyncio.run(main())


def test_serve_stream_charges_each_request_after_the_first_and_refuses_the_excess_unread():
    clock = Clock()
    gate = Admission("test.v1", StreamLimits(rate=1.0, burst=3), clock=clock)
    errors, handled = [], []

    async def handle(msg):
        handled.append(msg)
        return msg

    async def main():
        (sr, sw), (cr, cw) = await _pair()
        assert gate.admit("p") is None  # the stream (its first request)
        serving = asyncio.create_task(serve_stream(sr, sw, handle, on_error=errors.append,
                                                   admit=lambda: gate.request("p")))
        frame = encode_frame(encode_message(StateRequest(run_id="r", stage=0)))
        cw.write(frame * 5)
        await cw.drain()
        codes = []
        while (reply := await receive_message(cr, timeout=5, idle_timeout=5)) is not None:
            codes.append(getattr(reply, "code", "ok"))
        await asyncio.wait_for(serving, 5)
        assert codes == ["ok", "ok", "ok", "rate_limited"] and len(handled) == 3
        assert [e.code for e in errors] == ["rate_limited"]
        cw.close()

    asyncio.run(main())
