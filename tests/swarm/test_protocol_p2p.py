"""Messages over real hivemind P2P binary streams (two go-libp2p daemons on localhost).

Checks that the framing rides hivemind's streams unchanged, that the subspace codec composes with
the wire codecs end to end, and that a serving stream answers bad input with an ErrorReply instead
of crashing: it stays usable after a bad message and closes only when the byte position is lost.
"""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest
import torch
from hivemind.p2p import P2P

from protocol import subspace
from protocol.errors import ProtocolError, RemoteError
from protocol.framing import encode_frame, frame_prefix
from protocol.messages import ActivationFrame, ErrorReply, GradientFrame, encode_message
from protocol.streams import receive_message, request, serve_stream
from protocol.tensors import WireLimits

HANDLER = "protoswarm.test.v1"
LIMITS = WireLimits(max_frame_bytes=1 << 20, max_token_id=256)


async def _with_peers(client_body):
    """Start a serving and a calling P2P daemon, run ``client_body(reader, writer, errors)``, shut down."""
    server = await P2P.create()
    client = await P2P.create(initial_peers=await server.get_visible_maddrs())
    errors: list[ProtocolError] = []

    async def handle(msg):
        if isinstance(msg, ActivationFrame):
            # Echo the coefficients back as a "gradient" so the client can compare bit for bit.
            return GradientFrame(
                run_id=msg.run_id, microbatch_id=msg.microbatch_id, stage=msg.stage + 1,
                grad=msg.coefficients, codec=msg.codec, loss=1.5,
            )
        raise ProtocolError(f"unexpected {type(msg).__name__}")

    async def on_stream(info, reader, writer):
        await serve_stream(reader, writer, handle, LIMITS, frame_timeout=10, on_error=errors.append)

    try:
        await server.add_binary_stream_handler(HANDLER, on_stream)
        _, reader, writer = await client.call_binary_stream_handler(server.peer_id, HANDLER)
        async with asyncio.timeout(60):
            await client_body(reader, writer, errors, client, server)
    finally:
        await client.shutdown()
        await server.shutdown()


def _frame(ids: torch.Tensor, coefficients: torch.Tensor, codec: str = "fp32") -> ActivationFrame:
    return ActivationFrame(
        run_id="test", microbatch_id=7, stage=0, route=["peer-a"], token_ids=ids,
        coefficients=coefficients, codec=codec, basis="f" * 16,
    )


def test_subspace_coefficients_cross_hivemind_p2p():
    """x → c (subspace) → bf16 wire → P2P → reply → x̂: error is bf16 rounding of c, nothing more."""
    d, k, vocab = 64, 8, 256
    basis = subspace.make_basis(0, d, k)
    table = subspace.make_fixed_table(0, vocab, d, std=0.5)
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    x = table[ids] + torch.randn(2, 16, k, generator=torch.Generator().manual_seed(1)) @ basis.T
    c = subspace.encode(x, ids, basis, table)

    async def body(reader, writer, errors, client, server):
        for codec in ("fp32", "bf16"):
            reply = await request(reader, writer, _frame(ids, c, codec), LIMITS, timeout=10)
            assert isinstance(reply, GradientFrame) and reply.codec == codec and reply.loss == 1.5
            expected = c if codec == "fp32" else c.to(torch.bfloat16).float()
            assert torch.equal(reply.grad, expected)
            x_hat = subspace.decode(reply.grad, ids, basis, table)
            err = ((x_hat - x).norm(dim=-1) / (x - table[ids]).norm(dim=-1)).max().item()
            assert err < (1e-5 if codec == "fp32" else 1e-2)
        assert errors == []

    asyncio.run(_with_peers(body))


def test_bad_input_gets_an_error_reply_and_the_stream_survives():
    """Garbage, a wrong major version, a corrupted frame and a token id past the vocabulary are each
    refused with a named code, and a good request on the same stream still works afterwards."""
    good = _frame(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, 8))

    header = msgpack.packb({"v": [2, 0], "kind": "activation", "payloads": []})
    future_version = struct.pack("<I", len(header)) + header
    corrupted = bytearray(encode_frame(encode_message(good)))
    corrupted[-1] ^= 0x40
    bad_id = encode_message(_frame(torch.full((1, 4), 300), torch.ones(1, 4, 8)))  # vocab is 256

    async def body(reader, writer, errors, client, server):
        sent = [
            (encode_frame(b"\x05\x00\x00\x00garbage"), "malformed"),
            (encode_frame(future_version), "version"),
            (bytes(corrupted), "checksum"),
            (encode_frame(bad_id), "tensor"),
        ]
        for raw, code in sent:
            writer.write(raw)
            await writer.drain()
            reply = await receive_message(reader, LIMITS, timeout=10)
            assert isinstance(reply, ErrorReply) and reply.code == code, reply
            assert (await request(reader, writer, good, LIMITS, timeout=10)).microbatch_id == 7
        assert [e.code for e in errors] == [code for _, code in sent]
        assert "2.0" in next(e for e in errors if e.code == "version").args[0]

    asyncio.run(_with_peers(body))


def test_lost_framing_closes_only_that_stream():
    """An oversize declared length is refused before the body is read; the stream closes (its position
    is lost) but the node keeps serving new streams. A handler's refusal arrives as RemoteError."""

    async def body(reader, writer, errors, client, server):
        writer.write(frame_prefix(b"")[:4] + struct.pack("<II", 1 << 30, 0))  # declares 1 GiB
        await writer.drain()
        reply = await receive_message(reader, LIMITS, timeout=10)
        assert isinstance(reply, ErrorReply) and reply.code == "oversize"
        assert await receive_message(reader, LIMITS, timeout=10) is None  # closed by the server

        _, reader2, writer2 = await client.call_binary_stream_handler(server.peer_id, HANDLER)
        good = _frame(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, 8))
        assert (await request(reader2, writer2, good, LIMITS, timeout=10)).microbatch_id == 7
        refused = ErrorReply(code="x", message="not a request")
        with pytest.raises(RemoteError, match="unexpected ErrorReply") as info:
            await request(reader2, writer2, refused, LIMITS, timeout=10)
        assert info.value.remote_code == "protocol"
        assert [e.code for e in errors] == ["oversize", "protocol"]

    asyncio.run(_with_peers(body))
