"""The sender's liveness ping (swarm/dataplane/send.py) against what a replica may send back: only its
well-formed PONG is an answer; a malformed, oversize or cut-off frame is none (counted), and a peer whose
handler cannot be reached at all is "unknown" (None), as before. No network: a fake p2p hands back a stream."""

from __future__ import annotations

import asyncio
import collections
import struct
from types import SimpleNamespace

import pytest

from protocol.framing import PREFIX_BYTES, frame_prefix
from protocol.tensors import DEFAULT_LIMITS
from swarm.dataplane.config import PONG
from swarm.dataplane.send import HopSender

PEER = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"  # a well-formed base58 peer id


class _Writer:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class _P2P:
    """Answers every stream open with ``reply`` (bytes, then end of stream), or raises ``error``."""

    def __init__(self, reply: bytes = b"", error: Exception | None = None) -> None:
        self.reply, self.error, self.writers = reply, error, []

    async def call_binary_stream_handler(self, peer, handler):
        if self.error is not None:
            raise self.error
        reader = asyncio.StreamReader()
        reader.feed_data(self.reply)
        reader.feed_eof()
        self.writers.append(_Writer())
        return None, reader, self.writers[-1]


def _ping(p2p: _P2P) -> tuple[bool | None, collections.Counter]:
    stats: collections.Counter = collections.Counter()
    state = SimpleNamespace(p2p=p2p, limits=DEFAULT_LIMITS, stats=stats, config=SimpleNamespace(outlier_ratio=1e3))
    answer = asyncio.run(HopSender(state)._ping(PEER, timeout=5.0))
    assert all(writer.closed for writer in p2p.writers)
    return answer, stats


def test_a_well_formed_pong_is_an_answer():
    assert _ping(_P2P(frame_prefix(PONG) + PONG)) == (True, collections.Counter())


def test_another_well_formed_frame_or_none_is_no_answer():
    assert _ping(_P2P(frame_prefix(b"dead") + b"dead"))[0] is False
    assert _ping(_P2P(b""))[0] is False  # the stream closed without a frame


@pytest.mark.parametrize("reply", [
    b"not a protoswarm frame at all",  # wrong magic
    frame_prefix(PONG)[:8] + struct.pack("<I", 0) + PONG,  # a bad checksum
    frame_prefix(PONG) + PONG[:2],  # cut off inside the body
    frame_prefix(PONG)[:PREFIX_BYTES - 4],  # cut off inside the prefix
], ids=["garbage", "bad_crc", "cut_body", "cut_prefix"])
def test_a_malformed_reply_is_no_answer_and_is_counted(reply):
    answer, stats = _ping(_P2P(reply))
    assert answer is False and stats["pings_malformed"] == 1


def test_an_oversize_frame_is_refused_before_its_body_is_read():
    prefix = bytearray(frame_prefix(PONG))
    prefix[4:8] = b"\xff\xff\xff\xff"  # a declared body of 4 GiB (the prefix: magic, format, length, crc)
    answer, stats = _ping(_P2P(bytes(prefix)))
    assert answer is False and stats["pings_malformed"] == 1


def test_a_peer_whose_handler_cannot_be_reached_is_unknown_not_dead():
    assert _ping(_P2P(error=RuntimeError("protocol not supported"))) == (None, collections.Counter())
