"""serve_stream and request under hostile or broken peers, and the receiver-side budgets.

Streams are real asyncio streams over a socketpair; every wait has a deadline (no sleeps as
synchronisation). Each test states which way a peer could otherwise stall or crash a node.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import msgpack
import pytest
import torch

from protocol.errors import FrameTimeout, MalformedMessage, OversizeError, TensorError, UnknownCodec
from protocol.framing import encode_frame, read_frame, write_frame
from protocol.hivemind_compat import HIVEMIND_CODECS
from protocol.messages import (
    ActivationFrame,
    ErrorReply,
    FragmentPart,
    StageRecord,
    StateChunk,
    StateRequest,
    decode_message,
    encode_message,
)
from protocol.streams import receive_message, request, serve_stream
from protocol.tensors import BUILTIN_CODECS, WireLimits, decode_tensor, encode_tensor


async def _pair():
    a, b = socket.socketpair()
    for s in (a, b):  # small kernel buffers so a peer that does not read blocks the writer quickly
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    server = await asyncio.open_connection(sock=a)
    client = await asyncio.open_connection(sock=b)
    return server, client


def _state_request() -> StateRequest:
    return StateRequest(run_id="r", stage=0)


def test_a_peer_that_never_reads_cannot_block_the_server():
    """Replies the peer never takes hit write_timeout and the stream closes instead of hanging."""

    async def handle(msg):
        return StateChunk(run_id="r", stage=0, digest="d" * 64, index=0, data=bytes(8 << 20))

    async def main():
        (sr, sw), (_cr, cw) = await _pair()
        serving = asyncio.create_task(serve_stream(sr, sw, handle, write_timeout=0.5))
        for _ in range(4):  # requests only; the client never reads a reply
            cw.write(encode_frame(encode_message(_state_request())))
        await cw.drain()
        start = time.monotonic()
        await asyncio.wait_for(serving, 10)
        assert time.monotonic() - start < 5
        cw.close()

    asyncio.run(main())


def test_too_many_refusals_close_the_stream():
    """Corrupted frames keep a stream in sync, so each gets a reply, up to max_refusals; then it closes."""
    errors = []

    async def main():
        (sr, sw), (cr, cw) = await _pair()
        serving = asyncio.create_task(serve_stream(sr, sw, _unused, max_refusals=5, on_error=errors.append))
        bad = bytearray(encode_frame(encode_message(_state_request())))
        bad[-1] ^= 1
        cw.write(bytes(bad) * 8)
        await cw.drain()
        replies = []
        while (reply := await receive_message(cr, timeout=5, idle_timeout=5)) is not None:
            replies.append(reply.code)
        await asyncio.wait_for(serving, 5)
        assert replies == ["checksum"] * 5 and len(errors) == 5
        cw.close()

    asyncio.run(main())


async def _unused(msg):
    raise AssertionError("handler must not see corrupted frames")


def test_a_reply_the_handler_cannot_send_is_answered_internal():
    """A handler that builds an invalid reply (here from peer-chosen data) or returns a non-message gets
    an 'internal' error reply, and the stream goes on serving."""
    replies = iter([
        StageRecord(peer_id="p", run_id="x" * 600, stage=0, num_stages=1, state="online"),  # string too long
        {"not": "a message"},
        StageRecord(peer_id="p", run_id="r", stage=0, num_stages=1, state="online"),
    ])

    async def handle(msg):
        return next(replies)

    async def main():
        (sr, sw), (cr, cw) = await _pair()
        serving = asyncio.create_task(serve_stream(sr, sw, handle))
        for expected in ("internal", "internal"):
            with pytest.raises(Exception) as info:
                await request(cr, cw, _state_request(), timeout=5)
            assert getattr(info.value, "remote_code", None) == expected
        ok = await request(cr, cw, _state_request(), timeout=5)
        assert isinstance(ok, StageRecord) and ok.run_id == "r"
        cw.close()
        await asyncio.wait_for(serving, 5)

    asyncio.run(main())


def test_request_closes_the_stream_after_a_timeout():
    """A late reply must never be read as the answer to the next request, so a timed-out stream closes."""

    async def main():
        (_sr, sw), (cr, cw) = await _pair()  # nobody serves the other end: the request times out
        with pytest.raises(FrameTimeout):
            await request(cr, cw, _state_request(), timeout=0.3)
        assert cw.is_closing()
        sw.close()

    asyncio.run(main())


def test_idle_streams_close_quietly_and_slow_frames_time_out():
    """Silence between requests is not an offence (no error counted); a frame started but not finished
    within frame_timeout is refused with 'timeout'."""
    errors = []

    async def main():
        (sr, sw), (cr, cw) = await _pair()
        serving = asyncio.create_task(serve_stream(sr, sw, _unused, idle_timeout=0.3, on_error=errors.append))
        assert await asyncio.wait_for(read_frame(cr, idle_timeout=5), 5) is None  # closed, no reply
        await asyncio.wait_for(serving, 5)
        assert errors == []
        cw.close()

        (sr, sw), (cr, cw) = await _pair()
        serving = asyncio.create_task(serve_stream(sr, sw, _unused, frame_timeout=0.3, on_error=errors.append))
        cw.write(encode_frame(encode_message(_state_request()))[:20])  # a frame that never completes
        await cw.drain()
        reply = await receive_message(cr, timeout=5, idle_timeout=5)
        assert isinstance(reply, ErrorReply) and reply.code == "timeout"
        await asyncio.wait_for(serving, 5)
        assert [e.code for e in errors] == ["timeout"]
        cw.close()

    asyncio.run(main())


def test_write_frame_has_a_deadline():
    async def main():
        (_sr, sw), (_cr, cw) = await _pair()
        with pytest.raises(FrameTimeout):
            await write_frame(cw, bytes(16 << 20), timeout=0.3)
        cw.close()
        sw.close()

    asyncio.run(main())


def test_hivemind_codecs_are_accepted_only_when_opted_in():
    """A peer cannot make a node run hivemind's decoders (or import hivemind) unless it chose to."""
    data = encode_tensor(torch.randn(100), "hivemind-float16")
    with pytest.raises(UnknownCodec, match="not accepted"):
        decode_tensor(data)
    opted_in = WireLimits(codecs=BUILTIN_CODECS | HIVEMIND_CODECS)
    assert decode_tensor(data, opted_in).shape == (100,)


def test_decoded_size_budget_counts_the_expansion():
    """u8 token ids decode to int64 (8×) and coefficients to float32: a small frame is still refused
    when what it decodes to exceeds max_decoded_bytes."""
    ids = torch.zeros(1, 4096, dtype=torch.long)
    frame = ActivationFrame(run_id="r", microbatch_id=0, stage=0, route=["a"], token_ids=ids,
                            coefficients=torch.zeros(1, 4096, 1))
    body = encode_message(frame)
    limits = WireLimits(max_frame_bytes=1 << 20, max_decoded_bytes=32 * 1024)  # ids 32 KiB + coeffs 16 KiB
    assert len(body) < 24 * 1024  # 4 KiB of ids, 16 KiB of coefficients
    with pytest.raises(OversizeError, match="decode"):
        decode_message(body, limits)
    assert decode_message(body, WireLimits(max_decoded_bytes=64 * 1024)).token_ids.shape == (1, 4096)
    with pytest.raises(ValueError, match="k ≥ 1"):
        encode_message(ActivationFrame(**{**vars(frame), "coefficients": torch.zeros(1, 4096, 0)}))


def _header_body(header: dict) -> bytes:
    packed = msgpack.packb(header)
    return struct.pack("<I", len(packed)) + packed


def test_hostile_state_entry_shapes_are_refused_quickly():
    """4095 dimensions of 2^63-1 times a zero would be valid arithmetic but slow and useless."""
    entry = {"name": "w", "dtype": "float32", "shape": [2**63 - 1] * 4095 + [0], "offset": 0, "nbytes": 0,
             "sha256": "0" * 64}
    header = {"v": [1, 0], "kind": "state_manifest", "run_id": "r", "stage": 0, "step": 0, "round_id": 0,
              "entries": [entry] * 20, "chunk_bytes": 1, "chunk_sha256": [], "digest": "0" * 64, "payloads": []}
    start = time.monotonic()
    with pytest.raises(TensorError, match="out of range"):
        decode_message(_header_body(header))
    assert time.monotonic() - start < 0.5


def test_fragment_weight_is_bounded():
    part = FragmentPart(run_id="r", stage=0, round_id=0, fragment_id=0, part=0, num_parts=1, offset=0,
                        total_values=10, weight=1e300, values=torch.zeros(10))
    with pytest.raises(ValueError, match="weight"):
        encode_message(part)


def test_sender_side_checks():
    """What a receiver would refuse, the sender refuses first, as ValueError."""
    with pytest.raises(ValueError, match="bytes"):
        encode_message(StateChunk(run_id="r", stage=0, digest="d" * 64, index=0, data=10_000_000))
    with pytest.raises(ValueError, match="header"):
        encode_message(StageRecord(peer_id="p", run_id="r", stage=0, num_stages=1, state="online",
                                   codecs=["c" * 500] * 100), WireLimits(max_header_bytes=4096))
    with pytest.raises(ValueError, match="exceeds the limit"):
        encode_message(FragmentPart(run_id="r", stage=0, round_id=0, fragment_id=0, part=0, num_parts=1,
                                    offset=0, total_values=2000, values=torch.zeros(2000)),
                       WireLimits(max_tensor_values=1000))
    ids = torch.tensor([[1, 2, 70000]], dtype=torch.uint32)
    assert torch.equal(decode_tensor(encode_tensor(ids)), ids.long())
    with pytest.raises(MalformedMessage):
        decode_tensor(b"\x01\x00\x00\x00\xc1")  # 0xc1 is never valid msgpack


def test_refusal_logs_are_rate_limited_per_code_and_say_what_they_left_out(caplog) -> None:
    import logging

    from protocol.streams import LogLimiter

    now = [0.0]
    log = LogLimiter(logging.getLogger("limiter-test"), every=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="limiter-test"):
        assert log.info("shape", "refused [%s]", "shape")
        for _ in range(1000):  # a flood of the same refusal: no line each
            assert not log.info("shape", "refused [%s]", "shape")
        assert log.info("outlier", "refused [%s]", "outlier")  # another code is its own key
        now[0] = 10.5
        assert log.info("shape", "refused [%s]", "shape")
        for i in range(500):  # bans of a flood of identities: a warning, then a count
            log.warning("ban", "peer %s banned", f"sybil-{i}")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused [shape]", "refused [outlier]",
                     "refused [shape] (and 1000 more like it in the last 10 s, not logged)", "peer sybil-0 banned"]
    assert caplog.records[-1].levelno == logging.WARNING
