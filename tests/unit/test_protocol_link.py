"""The emulated access link (swarm/sim/link.py, framing's frame hook): spec parsing, rate and delay over
real TCP streams.

Rates are measured over ~1.6 s transfers on 127.0.0.1 (loopback is ~1000x faster than the emulated
link, so the emulator is what sets the pace) and checked to ±15%. Every test that installs an
emulator does it through the ``link`` fixture, which restores the previous one afterwards.
"""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from protocol.errors import FrameTimeout
from protocol.framing import PREFIX_BYTES, encode_frame, read_frame, stream_key, write_frame
from protocol.messages import StageRecord, StateRequest
from protocol.streams import request, serve_stream
from swarm.sim.link import LinkEmulator, LinkSpec, current, install

RATE = 8e6  # bits/s: 1 MB/s
FRAME = 64 * 1024  # body bytes per frame
FRAMES = 24  # 24 x 64 KiB ≈ 1.6 MB with prefixes: ~1.6 s per measurement
TOLERANCE = 0.15


@pytest.fixture
def link():
    """``link(text)`` installs an emulator for that spec and returns it; uninstalled after the test."""
    previous = current()

    def _install(text: str, **kwargs) -> LinkEmulator:
        spec = LinkSpec.parse(text)
        assert spec is not None
        emulator = LinkEmulator(spec, **kwargs)
        install(emulator)
        return emulator

    try:
        yield _install
    finally:
        install(previous)


async def _tcp_pair():
    """(server, (reader, writer) accepted, (reader, writer) connected) over 127.0.0.1."""
    accepted = asyncio.get_running_loop().create_future()
    server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await asyncio.open_connection("127.0.0.1", port)
    return server, await asyncio.wait_for(accepted, 5), client


async def _close(server, *writers) -> None:
    for writer in writers:
        writer.close()
    server.close()
    await asyncio.wait_for(server.wait_closed(), 5)


def _assert_rate(nbytes: int, seconds: float, rate: float = RATE) -> None:
    measured = nbytes * 8 / seconds
    assert abs(measured / rate - 1) <= TOLERANCE, (
        f"{measured / 1e6:.2f} Mbit/s for a {rate / 1e6:g} Mbit/s link"
    )


# --- spec text ---


@pytest.mark.parametrize(
    ("text", "rate", "delay", "canonical"),
    [
        ("80mbit", 80e6, 0.0, "80mbit"),
        ("20Mbit", 20e6, 0.0, "20mbit"),
        ("1.5gbit", 1.5e9, 0.0, "1.5gbit"),
        ("500kbit", 500e3, 0.0, "500kbit"),
        ("9600bit", 9600.0, 0.0, "9.6kbit"),
        ("1000kbit", 1e6, 0.0, "1mbit"),
        ("80mbit,delay=30ms", 80e6, 0.03, "80mbit,delay=30ms"),
        (" 80mbit , delay = 30ms ", 80e6, 0.03, "80mbit,delay=30ms"),
        ("delay=30ms,80mbit", 80e6, 0.03, "80mbit,delay=30ms"),
        ("delay=30ms", None, 0.03, "delay=30ms"),
        ("delay=1.5s", None, 1.5, "delay=1.5s"),
        ("delay=250us", None, 250e-6, "delay=250us"),
        ("delay=2000ms", None, 2.0, "delay=2s"),
    ],
)
def test_good_specs_parse_and_print_canonically(text, rate, delay, canonical):
    spec = LinkSpec.parse(text)
    assert spec == LinkSpec(rate_bps=rate, delay_s=delay)
    assert str(spec) == canonical
    assert LinkSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text", ["", "  ", "none", "NONE", "delay=0ms"])
def test_specs_that_emulate_nothing_parse_to_none(text):
    assert LinkSpec.parse(text) is None


@pytest.mark.parametrize(
    "spec",
    [
        LinkSpec(rate_bps=1234567.0),
        LinkSpec(rate_bps=0.1),
        LinkSpec(rate_bps=123456789.123, delay_s=0.0123456789),
        LinkSpec(rate_bps=3e12, delay_s=1e-7),
        LinkSpec(delay_s=1 / 3),
    ],
)
def test_any_spec_round_trips_through_its_text(spec):
    assert LinkSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("100mbps", "100mbps"),
        ("80", "80"),
        ("80 furlongs", "80 furlongs"),
        ("mbit", "mbit"),
        ("0mbit", "0mbit"),
        ("-5mbit", "-5mbit"),
        ("80mbit,40mbit", "40mbit"),
        ("80mbit,", "empty item"),
        ("80mbit,,delay=1ms", "empty item"),
        ("delay=30", "delay=30"),
        ("delay=30min", "delay=30min"),
        ("delay=-1ms", "delay=-1ms"),
        ("delay=1ms,delay=2ms", "delay=2ms"),
        ("jitter=5ms", "jitter"),
        ("=5ms", "=5ms"),
    ],
)
def test_bad_specs_name_the_bad_piece(text, named):
    with pytest.raises(ValueError, match=named) as info:
        LinkSpec.parse(text)
    assert repr(text) in str(info.value)


def test_spec_fields_are_validated():
    with pytest.raises(ValueError, match="positive"):
        LinkSpec(rate_bps=0)
    with pytest.raises(ValueError, match="delay"):
        LinkSpec(delay_s=-0.1)
    assert str(LinkSpec()) == "none" and not LinkSpec().emulates_anything
    assert LinkSpec(rate_bps=8_000_000).rate_bps == 8e6


def test_install_returns_the_emulator_it_replaces():
    assert current() is None
    first, second = LinkEmulator(LinkSpec(rate_bps=1e6)), LinkEmulator(LinkSpec(delay_s=0.01))
    try:
        assert install(first) is None and current() is first
        assert install(second) is first and current() is second
    finally:
        install(None)
    assert current() is None


# --- rate over real TCP ---


@pytest.mark.parametrize("side", ["uplink", "downlink", "both"])
def test_rate_over_tcp(link, side):
    """~1.6 MB in 64 KiB frames at 8 Mbit/s arrive at 8 Mbit/s ±15%, whichever side is throttled.

    uplink: frames go through write_frame, the receiver reads raw bytes (no downlink wait);
    downlink: the sender writes raw frames, the receiver uses read_frame; both: framing on both
    sides, the uplink and the downlink of this one process then overlap (pipelined), still ~rate."""
    emulator = link(f"{RATE:g}bit")
    body = bytes(range(256)) * (FRAME // 256)
    total = FRAMES * (PREFIX_BYTES + FRAME)

    async def send(writer):
        for _ in range(FRAMES):
            if side == "downlink":
                writer.write(encode_frame(body))
                await writer.drain()
            else:
                await write_frame(writer, body, timeout=10)

    async def receive(reader):
        if side == "uplink":
            await reader.readexactly(total)
            return
        for _ in range(FRAMES):
            assert await read_frame(reader, timeout=10, idle_timeout=10) == body

    async def main():
        server, (sr, sw), (_cr, cw) = await _tcp_pair()
        try:
            start = time.monotonic()
            await asyncio.wait_for(asyncio.gather(send(cw), receive(sr)), 20)
            return time.monotonic() - start
        finally:
            await _close(server, sw, cw)

    elapsed = asyncio.run(main())
    _assert_rate(total, elapsed)
    up = side in ("uplink", "both")
    down = side in ("downlink", "both")
    assert emulator.bytes_sent == (total if up else 0) and emulator.frames_sent == (FRAMES if up else 0)
    assert emulator.bytes_received == (total if down else 0)
    assert emulator.frames_received == (FRAMES if down else 0)
    if side == "uplink":  # the sender waited for (nearly) the whole transfer
        assert emulator.wait_s_up >= 0.8 * elapsed and emulator.wait_s_down == 0
    if side == "downlink":
        assert emulator.wait_s_down >= 0.8 * elapsed and emulator.wait_s_up == 0


def test_concurrent_senders_share_the_uplink_fairly(link):
    """Four streams sending at once get the link rate together, and each its share: FIFO slots
    interleave their frames, so none finishes much before the end."""
    emulator = link(f"{RATE:g}bit")
    per_task, tasks = 6, 4
    finished = []

    async def sender():
        for _ in range(per_task):
            await emulator.before_send(FRAME)
        finished.append(time.monotonic())

    async def main():
        start = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(sender() for _ in range(tasks))), 20)
        return start

    start = asyncio.run(main())
    elapsed = max(finished) - start
    _assert_rate(tasks * per_task * FRAME, elapsed)
    assert min(finished) - start >= 0.8 * elapsed
    assert emulator.frames_sent == tasks * per_task


def test_a_link_too_slow_for_a_frame_hits_the_frame_timeout(link):
    """A 64 KiB frame needs ~6.5 s on an 80 kbit/s link: both write_frame and read_frame give up at
    their timeout with FrameTimeout, and the abandoned uplink slot is given back to the next frame."""
    emulator = link("80kbit")

    async def main():
        server, (sr, sw), (cr, cw) = await _tcp_pair()
        try:
            start = time.monotonic()
            with pytest.raises(FrameTimeout):
                await write_frame(cw, bytes(FRAME), timeout=0.3)
            assert time.monotonic() - start < 2
            await write_frame(cw, b"small", timeout=2)  # ~17 bytes: ~2 ms, not behind a 6.5 s slot
            assert await read_frame(sr, timeout=2) == b"small"
            assert time.monotonic() - start < 2
            assert emulator.frames_sent == 1  # the timed-out frame never went out

            sw.write(encode_frame(bytes(FRAME)))  # downlink: bytes arrive at once, the emulator holds them
            start = time.monotonic()
            with pytest.raises(FrameTimeout):
                await read_frame(cr, timeout=0.3, idle_timeout=2)
            assert time.monotonic() - start < 2
        finally:
            await _close(server, sw, cw)

    asyncio.run(main())


# --- delay ---


def test_delay_makes_a_round_trip_pay_twice(link):
    """delay=50ms, no rate: a request/reply through streams.request/serve_stream over TCP takes at
    least 2 x 50 ms (request and reply each wait once) and well under a second, the second request on
    the stream too: it follows a receive, so the direction turned and the delay is owed again."""
    emulator = link("delay=50ms")
    record = StageRecord(peer_id="p", run_id="r", stage=0, num_stages=1, state="online")

    async def handle(msg):
        assert isinstance(msg, StateRequest)
        return record

    async def main():
        server, (sr, sw), (cr, cw) = await _tcp_pair()
        serving = asyncio.create_task(serve_stream(sr, sw, handle))
        try:
            await request(cr, cw, StateRequest(run_id="r", stage=0), timeout=5)  # warm-up
            start = time.monotonic()
            reply = await request(cr, cw, StateRequest(run_id="r", stage=0), timeout=5)
            elapsed = time.monotonic() - start
        finally:
            cw.close()
            await asyncio.wait_for(serving, 5)
            await _close(server, sw)
        return reply, elapsed

    reply, elapsed = asyncio.run(main())
    assert reply == record
    assert 0.1 <= elapsed < 1.0
    assert emulator.frames_sent == 4 and emulator.frames_received == 4  # both ends are this process
    assert emulator.delays_paid == 4  # every send is its stream's first or follows a receive
    assert emulator.wait_s_up == 0 and emulator.wait_s_down == 0  # no rate: only the delay


def test_back_to_back_frames_on_one_stream_pay_the_delay_once(link):
    """delay=200ms, no rate: 10 frames written back to back on one TCP stream take one delay, not 10
    (the first frame shifts the sender's clock by it); the reply on the same stream pays it again, and
    so does the next frame sent after that reply was read."""
    emulator = link("delay=200ms")
    delay, frames = 0.2, 10

    async def main():
        server, (sr, sw), (cr, cw) = await _tcp_pair()
        try:
            start = time.monotonic()
            for i in range(frames):
                await write_frame(cw, bytes([i]) * 1000, timeout=5)
            burst = time.monotonic() - start
            for i in range(frames):
                assert await read_frame(sr, timeout=5, idle_timeout=5) == bytes([i]) * 1000
            assert emulator.delays_paid == 1
            await write_frame(sw, b"reply", timeout=5)  # the other end's first send: its own delay
            assert await read_frame(cr, timeout=5, idle_timeout=5) == b"reply"
            assert emulator.delays_paid == 2
            start = time.monotonic()
            await write_frame(cw, b"next", timeout=5)  # cw's stream received: the direction turned
            turned = time.monotonic() - start
            assert await read_frame(sr, timeout=5, idle_timeout=5) == b"next"
            assert emulator.stats()["streams_sending"] == 1  # cw's stream, whose last event is a send
        finally:
            await _close(server, sw, cw)
        return burst, turned

    burst, turned = asyncio.run(main())
    assert emulator.delays_paid == 3 and emulator.frames_sent == frames + 2
    assert 0.9 * delay <= burst < 2 * delay
    assert turned >= 0.9 * delay


def test_frames_on_an_unknown_stream_pay_the_delay_each(link):
    """stream=None (a hook called without one, or a writer with no transport): every frame pays the
    delay, the old per-frame model."""
    emulator = link("delay=20ms")

    class Sink:  # a stand-in writer: write/drain, no transport
        def write(self, data):
            pass

        async def drain(self):
            pass

    async def main():
        start = time.monotonic()
        for _ in range(5):
            await write_frame(Sink(), b"x" * 100, timeout=5)
        for _ in range(5):
            await emulator.before_send(100)
        return time.monotonic() - start

    elapsed = asyncio.run(main())
    assert emulator.delays_paid == 10 and emulator.frames_sent == 10
    assert elapsed >= 10 * 0.02 * 0.9


def test_a_stream_is_the_same_key_for_its_reader_and_writer():
    """framing names a stream by its transport: one key for both halves of a stream, another for the
    other end's."""

    async def main():
        server, (sr, sw), (cr, cw) = await _tcp_pair()
        try:
            assert stream_key(cr) is stream_key(cw) is cw.transport
            assert stream_key(sr) is stream_key(sw) is sw.transport
            assert stream_key(cw) is not stream_key(sw)
            assert stream_key(asyncio.StreamReader()) is None  # fed by hand: no transport
        finally:
            await _close(server, sw, cw)

    asyncio.run(main())


def test_per_stream_delay_state_is_bounded_and_weak():
    """A stream is remembered only while its last event was a send, and is forgotten once freed;
    a concurrent send on a stream still waiting out its delay waits with it and pays nothing more;
    a send cancelled in its delay leaves the delay owed."""
    emulator = LinkEmulator(LinkSpec(delay_s=0.1))

    class Stream:
        pass

    async def main():
        a, b = Stream(), Stream()
        start = time.monotonic()
        await asyncio.gather(emulator.before_send(10, stream=a), emulator.before_send(10, stream=a))
        assert time.monotonic() - start >= 0.09 and emulator.delays_paid == 1
        assert emulator.stats()["streams_sending"] == 1
        await emulator.after_receive(10, stream=a)
        assert emulator.stats()["streams_sending"] == 0
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(emulator.before_send(10, stream=b), 0.02)
        assert emulator.stats()["streams_sending"] == 0
        await emulator.before_send(10, stream=b)
        assert emulator.delays_paid == 2 and emulator.stats()["streams_sending"] == 1
        del a, b
        gc.collect()
        assert emulator.stats()["streams_sending"] == 0

    asyncio.run(main())


def test_without_an_emulator_frames_pass_untouched():
    assert current() is None

    async def main():
        server, (sr, sw), (_cr, cw) = await _tcp_pair()
        try:
            start = time.monotonic()
            for i in range(50):
                await write_frame(cw, bytes([i]) * 1000, timeout=2)
                assert await read_frame(sr, timeout=2) == bytes([i]) * 1000
            assert time.monotonic() - start < 1
        finally:
            await _close(server, sw, cw)

    asyncio.run(main())
