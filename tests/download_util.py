"""A fake state donor for the download tests without a network (tests/unit/test_download_*.py).

``FakeDonor`` answers the client's requests with a real encoded state (swarm/state_codec.py) and can
cut the link or stall at a given chunk; ``FakeP2P`` opens "streams" to such donors and routes the
client's ``request`` calls (patched into swarm/state_transfer.py and swarm/state_fetch.py) to them.
"""

from __future__ import annotations

import swarm.state_fetch
import swarm.state_transfer
from protocol.errors import ConnectionLost, RemoteError
from protocol.messages import StateChunk, StateRequest
from swarm.state_codec import StageSnapshot, encode_snapshot

RUN = "run-a"
CHUNK = 1000


class _Writer:
    def __init__(self, peer: str):
        self.peer = peer

    def close(self) -> None:
        pass


class FakeDonor:
    """Serves ``snap``'s manifest and chunks to the client's ``request`` calls; ``cut_at``: the link
    drops when that chunk is asked for; ``stall_at``: that chunk never comes (a request timeout)."""

    def __init__(self, snap: StageSnapshot, cut_at: int | None = None, stall_at: int | None = None,
                 part: str = "all"):
        self.manifest, self.data = encode_snapshot(snap, RUN, CHUNK)
        self.part = part  # the state part it serves; others are refused as a real server does (no_state)
        self.cut_at, self.stall_at = cut_at, stall_at
        self.sent: list[int] = []

    async def request(self, reader, writer, msg, limits, *, timeout):
        if isinstance(msg, StateRequest):
            if msg.part != self.part:
                raise RemoteError(f"peer refused StateRequest: [no_state] no {msg.part} state", remote_code="no_state")
            return self.manifest
        if msg.index == self.cut_at:
            raise ConnectionLost("link down")
        if msg.index == self.stall_at:
            raise TimeoutError
        self.sent.append(msg.index)
        data = self.data[msg.index * CHUNK : (msg.index + 1) * CHUNK].numpy().tobytes()
        return StateChunk(run_id=RUN, stage=self.manifest.stage, digest=msg.digest, index=msg.index, data=data)


class FakeP2P:
    """Streams to fake donors by peer id; every ``request`` goes to the donor the stream was opened to."""

    def __init__(self, monkeypatch, donors: dict[str, FakeDonor]):
        self.donors = donors

        async def request(reader, writer, msg, limits, *, timeout):
            return await self.donors[writer.peer].request(reader, writer, msg, limits, timeout=timeout)

        monkeypatch.setattr(swarm.state_transfer, "request", request)
        monkeypatch.setattr(swarm.state_fetch, "request", request)

    async def call_binary_stream_handler(self, peer_id, handler):
        return None, None, _Writer(str(peer_id))
