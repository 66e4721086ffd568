"""Stage-state download between two real hivemind P2P daemons on localhost.

A realistic state dict crosses bit-exact in many small chunks; refusals, a state that moves on while
it is fetched, a lying server and a client that walks away each end in a named outcome, never a crash
or a hang.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from hivemind.p2p import P2P
from p2p_util import run_p2p

from protocol.errors import ProtocolError, RemoteError
from protocol.messages import StateChunk, StateChunkRequest, StateManifest, StateRequest
from protocol.streams import request, serve_stream
from protocol.tensors import WireLimits
from swarm.state_transfer import (
    StageSnapshot,
    StageStateServer,
    StateTransferError,
    decode_snapshot,
    download_from_replicas,
    download_stage_state,
    encode_snapshot,
    manifest_digest,
)

RUN = "run-a"
LIMITS = WireLimits(max_frame_bytes=1 << 20)
CHUNK = 97  # small and odd: dozens of chunks, and chunk edges fall inside tensors


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(37, 16, generator=g),
        "blocks.0.attn.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "blocks.0.norm.weight": torch.randn(5, generator=g).half(),
        "mask": torch.randint(0, 256, (7,), generator=g, dtype=torch.uint8),  # odd: later offsets unaligned
        "scale": torch.randn(3, generator=g),
        "tokens_seen": torch.tensor(12_345_678_901 + seed, dtype=torch.int64),  # 0-d
        "empty": torch.empty(0, 4),
        "ids": torch.randint(-(2**40), 2**40, (3, 3), generator=g),
        "counts": torch.randint(-5, 5, (2, 3), generator=g, dtype=torch.int32),
    }


def _snap(step: int, stage: int = 1) -> StageSnapshot:
    return StageSnapshot(stage=stage, step=step, round_id=step // 10, tensors=_state(step))


def _assert_bit_exact(got: StageSnapshot, want: StageSnapshot) -> None:
    assert (got.stage, got.step, got.round_id) == (want.stage, want.step, want.round_id)
    assert list(got.tensors) == list(want.tensors)
    for name, t in want.tensors.items():
        g = got.tensors[name]
        assert g.dtype == t.dtype and g.shape == t.shape and g.is_contiguous(), name
        assert torch.equal(g.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def _run(body) -> None:
    """``await body(server_p2p, client_p2p)`` with two fresh daemons, a deadline, and shutdown."""

    async def main():
        daemons = []
        try:
            daemons.append(await P2P.create())
            daemons.append(await P2P.create(initial_peers=await daemons[0].get_visible_maddrs()))
            async with asyncio.timeout(30):
                await body(*daemons)
        finally:
            for p2p in reversed(daemons):
                await p2p.shutdown()

    asyncio.run(main())


def test_encode_decode_without_a_network():
    snap = _snap(7)
    manifest, data = encode_snapshot(snap, RUN, CHUNK)
    assert len(manifest.chunk_sha256) == -(-len(data) // CHUNK) > 20
    assert manifest.digest == manifest_digest(manifest)
    _assert_bit_exact(decode_snapshot(manifest, data), snap)
    empty = StageSnapshot(stage=0, step=0, round_id=0, tensors={"nothing": torch.empty(0)})
    manifest, data = encode_snapshot(empty, RUN, CHUNK)
    assert manifest.chunk_sha256 == [] and decode_snapshot(manifest, data).tensors["nothing"].shape == (0,)
    bools = StageSnapshot(stage=0, step=0, round_id=0, tensors={"x": torch.zeros(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="dtype"):
        encode_snapshot(bools, RUN, CHUNK)


def test_round_trip_is_bit_exact_over_many_chunks():
    snap = _snap(20)
    errors: list[ProtocolError] = []

    async def body(server_p2p, client_p2p):
        server = StageStateServer(RUN, lambda: snap, LIMITS, chunk_bytes=CHUNK, on_error=errors.append)
        await server.register(server_p2p)
        for _ in range(2):  # the second download reuses the serialized bytes
            got = await download_stage_state(client_p2p, server_p2p.peer_id, RUN, 1, LIMITS, timeout=20)
            _assert_bit_exact(got, snap)

        # Chunks above 1 MiB are hashed in a worker thread; the last one is short.
        big = StageSnapshot(stage=0, step=3, round_id=0, tensors={**snap.tensors, "w": torch.randn(800_000)})
        await server_p2p.remove_binary_stream_handler(StageStateServer.HANDLER)
        server = StageStateServer(RUN, lambda: big, chunk_bytes=3 << 19, on_error=errors.append)
        await server.register(server_p2p)
        _assert_bit_exact(await download_stage_state(client_p2p, server_p2p.peer_id, RUN, 0, timeout=20), big)
        assert errors == []

    _run(body)


def test_refusals_name_the_reason():
    served: dict[str, StageSnapshot | None] = {"snap": _snap(5, stage=1)}
    errors: list[ProtocolError] = []

    async def body(server_p2p, client_p2p):
        peer = server_p2p.peer_id
        with pytest.raises(StateTransferError, match="protocols not supported") as info:  # nothing registered
            await download_stage_state(client_p2p, peer, RUN, 1, LIMITS, timeout=10)
        assert info.value.reason == "transport"

        server = StageStateServer(RUN, lambda: served["snap"], LIMITS, CHUNK, on_error=errors.append)
        await server.register(server_p2p)
        refusals = [("run-b", 1, "wrong_run", "run-b"), (RUN, 2, "wrong_stage", "stage 1")]
        for run_id, stage, reason, words in refusals:
            with pytest.raises(StateTransferError, match=words) as info:
                await download_stage_state(client_p2p, peer, run_id, stage, LIMITS, timeout=10)
            assert info.value.reason == reason and str(peer) in str(info.value)
        served["snap"] = None
        with pytest.raises(StateTransferError, match="no stage state") as info:
            await download_stage_state(client_p2p, peer, RUN, 1, LIMITS, timeout=10)
        assert info.value.reason == "no_state"

        # Out-of-range requests are offences (counted), an unknown digest is just stale (not counted).
        served["snap"] = _snap(5, stage=1)
        _, reader, writer = await client_p2p.call_binary_stream_handler(peer, StageStateServer.HANDLER)
        manifest = await request(reader, writer, StateRequest(run_id=RUN, stage=1), LIMITS, timeout=10)
        assert isinstance(manifest, StateManifest)
        for digest, index, code in [("e" * 64, 0, "stale"), (manifest.digest, 10_000, "malformed")]:
            ask = StateChunkRequest(run_id=RUN, stage=1, digest=digest, index=index)
            with pytest.raises(RemoteError) as refused:
                await request(reader, writer, ask, LIMITS, timeout=10)
            assert refused.value.remote_code == code
        writer.close()
        assert [e.code for e in errors] == ["malformed"]

    _run(body)


def test_state_that_moves_on_mid_download():
    """keep=2: the joiner finishes the old state. keep=1: it is evicted, the joiner restarts once and
    gets the new one; a state that moves on twice in a row ends in a 'stale' error."""
    served: dict = {}

    async def body(server_p2p, client_p2p):
        async def on_stream(info, reader, writer):
            server = served["server"]

            async def handle(msg):
                if isinstance(msg, StateChunkRequest) and msg.index == 2 and served["pending"]:
                    served["snap"] = served["pending"].pop(0)  # training moves on …
                    await server.handle(StateRequest(run_id=RUN, stage=1))  # … and another joiner asks
                return await server.handle(msg)

            await serve_stream(reader, writer, handle, LIMITS)

        await server_p2p.add_binary_stream_handler(StageStateServer.HANDLER, on_stream)
        for keep, pending, want in [(2, [11], 10), (1, [11], 11), (1, [11, 12], None)]:
            served.update(snap=_snap(10), pending=[_snap(s) for s in pending])
            served["server"] = StageStateServer(RUN, lambda: served["snap"], LIMITS, CHUNK,
                                                keep_snapshots=keep, reserialize_s=0.0)
            if want is None:
                with pytest.raises(StateTransferError, match="no longer held") as info:
                    await download_stage_state(client_p2p, server_p2p.peer_id, RUN, 1, LIMITS, timeout=10)
                assert info.value.reason == "stale"
            else:
                got = await download_stage_state(client_p2p, server_p2p.peer_id, RUN, 1, LIMITS, timeout=10)
                _assert_bit_exact(got, _snap(want))
            assert served["pending"] == []

    _run(body)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


def _manifest_for(snap: StageSnapshot, **changes) -> tuple[StateManifest, torch.Tensor]:
    """``snap`` encoded, its manifest changed by ``changes`` (a lying server's), the digest recomputed unless given."""
    manifest, data = encode_snapshot(snap, RUN, CHUNK)
    manifest = dataclasses.replace(manifest, **changes)
    manifest.digest = changes.get("digest") or manifest_digest(manifest)
    return manifest, data


def test_lying_or_stalling_server_gives_a_named_error():
    honest = _snap(30)
    nan = torch.tensor([0.0, float("nan")])
    nan_state = dataclasses.replace(honest, tensors={**honest.tensors, "scale": nan})
    mode = {"name": ""}
    release = asyncio.Event()

    async def body(server_p2p, client_p2p):
        async def handle(msg):
            name = mode["name"]
            if name == "bad_entry_hash":
                entries = encode_snapshot(honest, RUN, CHUNK)[0].entries
                entries = [dataclasses.replace(e, sha256="ab" * 32) for e in entries]
                manifest, data = _manifest_for(honest, entries=entries)
            elif name == "bad_digest":
                manifest, data = _manifest_for(honest, digest="0" * 64)
            else:
                manifest, data = _manifest_for(nan_state if name == "nan" else honest)
            if isinstance(msg, StateRequest):
                return StateChunk(run_id=RUN, stage=1, digest=manifest.digest, index=0, data=b"") \
                    if name == "wrong_kind" else manifest
            if name == "stall":
                await asyncio.wait_for(release.wait(), 20)
            chunk = data[msg.index * CHUNK : (msg.index + 1) * CHUNK].numpy().tobytes()
            if name == "bad_chunk" and msg.index == 3:
                chunk = _flip(chunk, 5)
            if name == "short_chunk" and msg.index == 1:
                chunk = chunk[:-1]
            return StateChunk(run_id=RUN, stage=1, digest=msg.digest, index=msg.index, data=chunk)

        async def on_stream(info, reader, writer):
            await serve_stream(reader, writer, handle, LIMITS)

        await server_p2p.add_binary_stream_handler(StageStateServer.HANDLER, on_stream)
        cases = [
            ("bad_chunk", "checksum", "chunk 3"), ("bad_entry_hash", "checksum", "embed.weight"),
            ("bad_digest", "malformed", "digest"), ("short_chunk", "malformed", "96 bytes, expected 97"),
            ("nan", "non_finite", "scale"), ("wrong_kind", "malformed", "StateChunk"),
            ("too_big", "oversize", "cap"), ("stall", "timeout", "within"),
        ]
        try:
            for name, reason, words in cases:
                mode["name"] = name
                cap = 1000 if name == "too_big" else 1 << 30
                with pytest.raises(StateTransferError, match=words) as info:
                    await download_stage_state(client_p2p, server_p2p.peer_id, RUN, 1, LIMITS,
                                               timeout=0.5 if name == "stall" else 10, max_total_bytes=cap)
                assert info.value.reason == reason, (name, info.value)
                assert str(server_p2p.peer_id) in str(info.value)
        finally:
            release.set()
        mode["name"] = "honest"
        got = await download_stage_state(client_p2p, server_p2p.peer_id, RUN, 1, LIMITS, timeout=10)
        _assert_bit_exact(got, honest)

    _run(body)


def test_client_that_walks_away_does_not_break_the_server():
    snap = _snap(40)
    errors: list[ProtocolError] = []
    hold = {"index": 4}
    release = asyncio.Event()

    async def body(server_p2p, client_p2p):
        server = StageStateServer(RUN, lambda: snap, LIMITS, chunk_bytes=CHUNK, on_error=errors.append)

        async def on_stream(info, reader, writer):
            async def handle(msg):
                if isinstance(msg, StateChunkRequest) and msg.index == hold["index"]:
                    await asyncio.wait_for(release.wait(), 20)  # the client gives up meanwhile
                return await server.handle(msg, str(info.peer_id))

            await serve_stream(reader, writer, handle, LIMITS, on_error=errors.append)

        await server_p2p.add_binary_stream_handler(StageStateServer.HANDLER, on_stream)
        peer = server_p2p.peer_id
        with pytest.raises(StateTransferError) as info:
            await download_stage_state(client_p2p, peer, RUN, 1, LIMITS, timeout=1.0)
        assert info.value.reason == "timeout"
        release.set()
        hold["index"] = None

        # Half a request frame, then the stream is dropped.
        _, reader, writer = await client_p2p.call_binary_stream_handler(peer, StageStateServer.HANDLER)
        reply = await request(reader, writer, StateRequest(run_id=RUN, stage=1), LIMITS, timeout=10)
        assert isinstance(reply, StateManifest)
        writer.write(b"PSW\x01\x40\x00\x00\x00")
        await writer.drain()
        writer.close()

        _assert_bit_exact(await download_stage_state(client_p2p, peer, RUN, 1, LIMITS, timeout=10), snap)
        assert [e.code for e in errors] == ["frame"]  # the truncated request, counted by serve_stream

    _run(body)



class _LeavingServer(StageStateServer):
    """Serves ``after`` chunks, then its daemon shuts down (a donor that leaves mid-download)."""

    def __init__(self, p2p, *args, after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.p2p, self.after, self.chunks = p2p, after, 0

    def _chunk(self, msg, peer):
        self.chunks += 1
        if self.chunks > self.after:
            asyncio.get_running_loop().create_task(self.p2p.shutdown())
            raise RuntimeError("leaving")
        return super()._chunk(msg, peer)


def test_consensus_state_comes_from_several_replicas_and_resumes_when_one_leaves():
    snap, other = _snap(40), _snap(41)

    async def body(client, a, b, c, d):
        leaving = _LeavingServer(a, RUN, lambda: None, LIMITS, CHUNK, consensus=lambda: snap, after=1)
        await leaving.register(a)
        for p2p in (b, c):
            await StageStateServer(RUN, lambda: None, LIMITS, CHUNK, consensus=lambda: snap).register(p2p)
        await StageStateServer(RUN, lambda: None, LIMITS, CHUNK, consensus=lambda: other).register(d)  # drifted
        ids = [p.peer_id for p in (d, a, b, c)]
        got, served = await download_from_replicas(client, ids, RUN, 1, LIMITS, timeout=20)
        _assert_bit_exact(got, snap)  # the digest three replicas offer, not the lone drifted one's
        assert str(d.peer_id) not in served
        assert len(served) >= 2 and sum(served.values()) == len(encode_snapshot(snap, RUN, CHUNK, LIMITS)[0].chunk_sha256)
        assert leaving.chunks > 1 and served.get(str(a.peer_id), 0) <= 1  # it left; the others finished its share

        # Nobody has a consensus state (full snapshots only): a named error, not a hang.
        empty = await P2P.create(initial_peers=await client.get_visible_maddrs())
        try:
            await StageStateServer(RUN, lambda: snap, LIMITS, CHUNK).register(empty)
            with pytest.raises(StateTransferError) as err:
                await download_from_replicas(client, [empty.peer_id], RUN, 1, LIMITS, timeout=10)
            assert err.value.reason == "no_state"
        finally:
            await empty.shutdown()

    run_p2p(5, body, timeout=60)


def test_a_flood_of_state_requests_copies_the_state_once_and_is_rate_limited_per_peer():
    """Training moves on every step, yet requests within reserialize_s are served the same bytes without a
    new copy of the state; one peer gets a burst of 4 manifests, then `rate_limited` (another peer is served)."""
    taken = []

    def snapshot() -> StageSnapshot:
        taken.append(len(taken))
        return _snap(10 + len(taken))  # a new step at every call, as in training

    async def main():
        server = StageStateServer(RUN, snapshot, LIMITS, CHUNK, manifests_per_s=0.2, reserialize_s=60.0)
        replies = [await server.handle(StateRequest(run_id=RUN, stage=1), "flooder") for _ in range(6)]
        assert [getattr(r, "code", "manifest") for r in replies] == ["manifest"] * 4 + ["rate_limited"] * 2
        assert replies[4].retry_after == pytest.approx(5.0, abs=0.5)
        assert len({r.digest for r in replies[:4]}) == 1 and len(taken) == 1
        assert server.stats["manifests_reused"] == 3 and server.stats["refused_rate_limited"] == 2
        other = await server.handle(StateRequest(run_id=RUN, stage=1), "honest")
        assert other.digest == replies[0].digest and len(taken) == 1
        assert getattr(await server.handle(StateRequest(run_id=RUN, stage=2), "honest"), "code", "") == "wrong_stage"
        fresh = StageStateServer(RUN, snapshot, LIMITS, CHUNK, reserialize_s=0.0)  # always the current state
        first = await fresh.handle(StateRequest(run_id=RUN, stage=1), "p")
        second = await fresh.handle(StateRequest(run_id=RUN, stage=1), "p")
        assert first.digest != second.digest and len(taken) == 4
        # Told its stage, a server answers requests for another stage before charging them: a joiner whose
        # DHT view is stale is not rate-limited for asking the wrong peer first.
        serving = [None]
        told = StageStateServer(RUN, snapshot, LIMITS, CHUNK, manifests_per_s=0.2, stage=lambda: serving[0])
        assert getattr(await told.handle(StateRequest(run_id=RUN, stage=1), "j"), "code", "") == "no_state"
        serving[0] = 1
        wrong = [await told.handle(StateRequest(run_id=RUN, stage=2), "j") for _ in range(6)]
        assert {r.code for r in wrong} == {"wrong_stage"} and len(taken) == 4  # no copy taken
        assert [getattr(await told.handle(StateRequest(run_id=RUN, stage=1), "j"), "code", "manifest")
                for _ in range(5)] == ["manifest"] * 4 + ["rate_limited"]

    asyncio.run(main())
