"""The client's side of one state download attempt: the manifest checked, then its chunks one by one.

:func:`check_manifest` is what decoding cannot know (this is the state asked for, affordable and
self-consistent). :class:`StateFetch` holds one attempt at the bytes a manifest names: the buffer
(allocated once, after the size cap was checked), the verified chunks taken from disk
(swarm/chunk_cache.py), the chunks still to fetch and the attempt's :class:`TransferProgress`
(swarm/transfer_pace.py). :meth:`StateFetch.get` fetches one chunk over a stream, checks it
(identity, length, SHA-256), puts it in place, keeps it on disk and counts it. Used by both downloads
of :mod:`swarm.state_transfer`, one peer's whole state and the consensus from several replicas.
"""

from __future__ import annotations

import asyncio
import collections

import torch

from protocol.errors import ChecksumError, FrameTimeout, MalformedMessage, OversizeError, short_repr
from protocol.messages import Message, StateChunk, StateChunkRequest, StateManifest
from protocol.streams import request
from protocol.tensors import WireLimits
from swarm.chunk_cache import ChunkCache
from swarm.state_codec import FRAME_SLACK, manifest_digest, sha256_hex
from swarm.transfer_pace import TransferPace, TransferTooSlow

_HASH_OFF_LOOP = 1 << 20  # chunks larger than this are hashed in a worker thread


def check_manifest(reply: Message, run_id: str, stage: int, limits: WireLimits, max_total_bytes: int) -> StateManifest:
    """What decoding cannot know: that this is the state asked for, affordable, and self-consistent."""
    if not isinstance(reply, StateManifest):
        raise MalformedMessage(f"expected a StateManifest, got {type(reply).__name__}")
    if (reply.run_id, reply.stage) != (run_id, stage):
        raise MalformedMessage(f"manifest is for run {short_repr(reply.run_id)} stage {reply.stage}")
    if reply.total_bytes > max_total_bytes:
        raise OversizeError(f"state of {reply.total_bytes} bytes exceeds the {max_total_bytes}-byte cap")
    if min(reply.chunk_bytes, reply.total_bytes) + FRAME_SLACK > limits.max_frame_bytes:
        raise OversizeError(f"{reply.chunk_bytes}-byte chunks exceed the {limits.max_frame_bytes}-byte frame")
    if len({e.name for e in reply.entries}) != len(reply.entries):
        raise MalformedMessage("manifest names an entry twice")
    if manifest_digest(reply) != reply.digest:
        raise MalformedMessage("manifest digest does not match its content")
    return reply


class StateFetch:
    """One attempt at the bytes ``manifest`` names (see the module docstring)."""

    def __init__(self, manifest: StateManifest, pace: TransferPace, cache: ChunkCache | None, source: str,
                 part: str = "all"):
        self.manifest, self.pace, self.cache = manifest, pace, cache
        # The one allocation sized by the peer, after the cap was checked; torch.empty does not zero-fill
        # (a 16 GiB bytearray would hold the event loop for seconds while it is cleared).
        self.data = torch.empty(manifest.total_bytes, dtype=torch.uint8)
        self.view = memoryview(self.data.numpy())
        self.todo: collections.deque[int] = collections.deque(range(len(manifest.chunk_sha256)))
        self.progress = pace.start(stage=manifest.stage, part=part, total=manifest.total_bytes, source=source)

    async def restore(self) -> None:
        """Take the verified chunks kept on disk; only the others are left to fetch."""
        if self.cache is None:
            return
        kept = set(await asyncio.to_thread(self.cache.restore, self.manifest, self.view))
        self.todo = collections.deque(i for i in self.todo if i not in kept)
        self.progress.resumed(sum(self._size(i) for i in kept), len(kept))

    def _size(self, index: int) -> int:
        m = self.manifest
        return min(m.chunk_bytes, m.total_bytes - index * m.chunk_bytes)

    async def get(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int,
                  limits: WireLimits) -> None:
        """Fetch chunk ``index``, check it, put it in place and keep it; raises on any failure (the
        stream is closed then) and :class:`TransferTooSlow` when nothing came for ``pace.stall_s``."""
        m, name = self.manifest, self.manifest.digest[:12]
        ask = StateChunkRequest(run_id=m.run_id, stage=m.stage, digest=m.digest, index=index)
        try:
            chunk = await request(reader, writer, ask, limits, timeout=self.pace.stall_s)
        except (FrameTimeout, TimeoutError) as exc:
            raise TransferTooSlow(f"stalled: no verified bytes within {self.pace.stall_s:g} s (chunk {index}: {exc})",
                                  "timeout") from None
        if not isinstance(chunk, StateChunk):
            raise MalformedMessage(f"expected chunk {index} of state {name}, got {type(chunk).__name__}")
        if (chunk.run_id, chunk.stage, chunk.digest, chunk.index) != (ask.run_id, ask.stage, ask.digest, index):
            raise MalformedMessage(f"asked for chunk {index} of state {name}, got another chunk")
        want = self._size(index)
        if len(chunk.data) != want:
            raise MalformedMessage(f"chunk {index} has {len(chunk.data)} bytes, expected {want}")
        big = len(chunk.data) > _HASH_OFF_LOOP
        digest = await asyncio.to_thread(sha256_hex, chunk.data) if big else sha256_hex(chunk.data)
        if digest != m.chunk_sha256[index]:
            raise ChecksumError(f"chunk {index} of state {name}: SHA-256 does not match the manifest")
        start = index * m.chunk_bytes
        self.view[start : start + want] = chunk.data
        if self.cache is not None:
            await asyncio.to_thread(self.cache.keep, digest, self.view[start : start + want])
        self.progress.add(want)

    def check_deadline(self) -> None:
        """Raise :class:`TransferTooSlow` when the attempt ran past its deadline with chunks to go."""
        if self.todo and self.progress.overdue():
            raise self.progress.too_slow()
