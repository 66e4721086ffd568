"""Stage-state download: how a node that joins or changes stage gets that stage's weights from a peer.

Flow, over one hivemind P2P binary stream (handler ``protoswarm.state.v1``, messages of
:mod:`protocol.messages`)::

    joiner                                   replica (StageStateServer)
    StateRequest(run, stage)        ──▶      snapshot() → serialize off the event loop (cached by
                                    ◀──      (stage, step, round_id)) → StateManifest(digest, ...)
    StateChunkRequest(digest, i)    ──▶      chunk i of the bytes cached under that digest
                                    ◀──      StateChunk(data)            … for i = 0 … n−1

The state bytes and the manifest naming them (entries, chunk SHA-256s, a ``digest`` the client can
recompute) are laid out in :mod:`swarm.state_codec`; ``StageSnapshot`` and its encoding live there
and are imported here.

The server keeps the serialized bytes of its last ``keep_snapshots`` states keyed by digest, so a
joiner finishes a consistent state while training moves on. A chunk request for a digest it no
longer holds is answered ``stale``; the client then restarts once from a fresh manifest.

The peer is untrusted: the client checks the manifest (run, stage, digest, total against
``max_total_bytes``, unique names, chunks that fit a frame) before allocating the total size once,
checks every chunk's length and SHA-256, then every entry's SHA-256 and, with
``limits.check_finite``, that float tensors are finite (swarm/state_fetch.py). Its peak memory is
about twice the state (the assembled bytes and the rebuilt tensors); the server holds one serialized
copy per cached state. Hashing, serializing and rebuilding run in worker threads. Nothing is pickled.

Made for home links: an attempt is cut when no verified chunk arrived for ``pace.stall_s`` or when it
trickles past a deadline sized from the state and the measured rate (swarm/transfer_pace.py), never
by a fixed total time unless the caller gives ``timeout``; with a ``cache`` (swarm/chunk_cache.py)
every verified chunk is kept on disk and a retried or restarted download fetches only the chunks it
lacks. Every failure is a :class:`StateTransferError` naming the peer, the stage and a reason.
Refusals the server sends on purpose are ``ErrorReply`` codes: ``wrong_run``, ``wrong_stage``,
``no_state``, ``stale``, ``banned`` and ``rate_limited``; malformed requests are refused by ``serve_stream``
and counted through ``on_error``. Malformed requests and requests for another run are strikes: a peer with
``peer_strikes`` of them within ``ban_s`` is refused (``banned``) for ``ban_s``, before a byte of its
streams is read (protocol/admission.py, which also bounds streams and requests per peer). A peer may ask
for a manifest once every 5 s (after a burst of 4), and a state serialized within the last 10 s is served
again as it is, so a flood of state requests, from however many identities, copies and serializes the
state at most once every 10 s.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from protocol.admission import Admission, StreamLimits
from protocol.errors import MalformedMessage, ProtocolError, RemoteError, short_repr
from protocol.messages import ErrorReply, Message, StateChunk, StateChunkRequest, StateManifest, StateRequest
from protocol.streams import LogLimiter, PeerStrikes, RateLimiter, request, serve_stream
from protocol.tensors import DEFAULT_LIMITS, WireLimits
from swarm.chunk_cache import ChunkCache
from swarm.state_codec import (  # StageSnapshot, the codec and the digest are imported from here too
    FRAME_SLACK,
    StageSnapshot,
    decode_snapshot,
    encode_snapshot,
    manifest_digest,
)
from swarm.state_fetch import StateFetch, check_manifest
from swarm.transfer_pace import TransferPace, TransferTooSlow

__all__ = ["StageSnapshot", "StageStateServer", "StateTransferError", "decode_snapshot", "download_from_replicas",
           "download_stage_state", "encode_snapshot", "manifest_digest"]

logger = logging.getLogger(__name__)
_served_log = LogLimiter(logger)  # what any peer can ask for: a line per kind every 10 s at most

# Per peer: a state download opens one stream a donor and asks a manifest, then one request a chunk
# (4 MiB: 128 a second is 4 Gbit/s).
STATE_STREAM_LIMITS = StreamLimits(max_streams=4, rate=128.0, burst=256.0)
MANIFESTS_PER_S = 0.2  # state requests a second per peer, after a burst of 4 (an honest joiner asks once a try)
RESERIALIZE_S = 10.0  # a serialization this young is served again rather than copying the state anew


class StateTransferError(Exception):
    """A stage-state download failed. ``reason`` is short and stable (a metric label, e.g. ``stale``,
    ``checksum``, ``timeout``, ``wrong_stage``); ``peer`` is the peer it was downloaded from."""

    def __init__(self, message: str, *, peer: str, reason: str):
        super().__init__(message)
        self.peer = peer
        self.reason = reason


@dataclass
class _Serialized:
    key: tuple[str, int, int, int]  # (part, stage, step, round_id) the bytes were taken at
    manifest: StateManifest
    data: torch.Tensor  # uint8, the serialized state
    made_at: float  # time.monotonic() when it was serialized


class StageStateServer:
    """Serves this node's stage state to joiners; ``snapshot()`` returns it (None: nothing to serve).

    ``snapshot()`` runs on the event loop and must be cheap; the tensors it returns must not change
    while they are serialized (return copies taken between optimizer steps). A state is identified by
    (stage, step, round_id): while those stay the same the serialized bytes are reused.
    """

    HANDLER = "protoswarm.state.v1"

    def __init__(self, run_id: str, snapshot: Callable[[], StageSnapshot | None],
                 limits: WireLimits = DEFAULT_LIMITS, chunk_bytes: int = 4 << 20,
                 on_error: Callable[[ProtocolError], None] | None = None, keep_snapshots: int = 2,
                 consensus: Callable[[], StageSnapshot | None] | None = None, peer_strikes: int = 8,
                 ban_s: float = 60.0, stream_limits: StreamLimits = STATE_STREAM_LIMITS,
                 manifests_per_s: float = MANIFESTS_PER_S, reserialize_s: float = RESERIALIZE_S,
                 stage: Callable[[], int | None] | None = None):
        """``consensus()``: the state every replica of the stage agrees on (``StateRequest.part ==
        "consensus"``), or None when this node has no such thing. ``on_error(exc)`` sees every
        malformed request (metrics); ``peer_strikes`` offences within ``ban_s`` ban a peer for ``ban_s``.
        ``stream_limits``: streams and requests per peer (protocol/admission.py); ``manifests_per_s``: state
        requests per peer (a burst of 4); ``reserialize_s``: a state serialized this recently is served as it
        is, however far training moved since (0: always the current state). ``stage()``: the stage this node
        serves now (None: none yet), a cheap read that answers a request for another stage before it is charged
        against ``manifests_per_s`` (without it, the stage of the snapshot decides, after the charge)."""
        if not 0 < chunk_bytes <= limits.max_frame_bytes - FRAME_SLACK:
            raise ValueError(f"chunk_bytes must be in 1..{limits.max_frame_bytes - FRAME_SLACK}")
        if keep_snapshots < 1:
            raise ValueError(f"keep_snapshots must be at least 1, got {keep_snapshots}")
        self.run_id, self.limits, self.chunk_bytes = run_id, limits, chunk_bytes
        self._snapshot, self._on_error, self._keep = snapshot, on_error, keep_snapshots
        self._consensus = consensus
        self._cache: OrderedDict[str, _Serialized] = OrderedDict()  # digest → bytes, least recent first
        self._lock = asyncio.Lock()  # one serialization at a time; concurrent joiners share it
        self.strikes = PeerStrikes(peer_strikes, ban_s, ban_s)  # bounded per peer
        self.stats: collections.Counter[str] = collections.Counter()
        self.admission = Admission(self.HANDLER, stream_limits, banned=self.strikes.banned_for, wire_limits=limits)
        self._manifests = RateLimiter(manifests_per_s, 4)
        self._reserialize_s = reserialize_s
        self._stage = stage

    async def register(self, p2p: Any) -> None:
        await p2p.add_binary_stream_handler(self.HANDLER, self.admission.wrap(self._on_stream))

    async def _on_stream(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(info.peer_id)

        async def handle(msg: Message) -> Message:
            return await self.handle(msg, peer)

        def on_error(exc: ProtocolError) -> None:
            if self._on_error is not None:
                self._on_error(exc)
            self._strike(peer, exc.code)

        await serve_stream(reader, writer, handle, self.limits, on_error=on_error, peer=peer,
                           admit=lambda: self.admission.request(peer))

    async def handle(self, msg: Message, peer: str = "?") -> Message:
        """The reply to one request (public so a wrapper or a test can drive it without a stream)."""
        if (left := self.strikes.banned_for(peer)) > 0:
            return self._refuse("banned", f"too many bad requests; refused for {left:.0f} s more", retry_after=left)
        if isinstance(msg, StateRequest):
            return await self._manifest(msg, peer)
        if isinstance(msg, StateChunkRequest):
            return self._chunk(msg, peer)
        raise MalformedMessage(f"{self.HANDLER} does not answer {type(msg).__name__}")

    def _refuse(self, code: str, message: str, retry_after: float | None = None) -> ErrorReply:
        self.stats[f"refused_{code}"] += 1
        return ErrorReply(code=code, message=message, retry_after=retry_after)

    def _strike(self, peer: str, code: str) -> None:
        self.stats["strikes"] += 1
        if self.strikes.strike(peer):
            self.stats["peers_banned"] += 1
            _served_log.warning("ban", "peer %s: %d bad state requests (last: %s); refusing it for %.0f s", peer,
                                self.strikes.limit, code, self.strikes.ban_s)

    async def _manifest(self, msg: StateRequest, peer: str) -> Message:
        if msg.run_id != self.run_id:
            self._strike(peer, "wrong_run")
            text = f"this node trains run {short_repr(self.run_id)}, not {short_repr(msg.run_id)}"
            return self._refuse("wrong_run", text)
        if self._stage is not None and (serving := self._stage()) != msg.stage:  # free: nothing copied
            if serving is None:
                return self._refuse("no_state", "this node serves no stage yet")
            return self._refuse("wrong_stage", f"this node serves stage {serving}, not {msg.stage}")
        if (wait := self._manifests.take(peer)) > 0:
            return self._refuse("rate_limited", "too many state requests from this peer", retry_after=wait)
        recent = self._recent(msg.part, msg.stage)
        if recent is not None:  # serialized moments ago: no new copy of the state, however far training moved
            self.stats["manifests_reused"] += 1
            return recent.manifest
        source = self._snapshot if msg.part == "all" else self._consensus
        snap = source() if source is not None else None
        if snap is None:
            what = "stage state" if msg.part == "all" else "consensus stage state (replica sync off?)"
            return self._refuse("no_state", f"this node has no {what} to serve")
        if snap.stage != msg.stage:
            text = f"this node serves stage {snap.stage}, not {msg.stage}"
            return self._refuse("wrong_stage", text)
        key = (msg.part, snap.stage, snap.step, snap.round_id)
        async with self._lock:
            cached = next((s for s in self._cache.values() if s.key == key), None)
            if cached is None:
                started = time.perf_counter()
                manifest, data = await asyncio.to_thread(
                    encode_snapshot, snap, self.run_id, self.chunk_bytes, self.limits)
                cached = self._cache[manifest.digest] = _Serialized(key, manifest, data, time.monotonic())
                while len(self._cache) > self._keep:
                    self._cache.popitem(last=False)
                logger.info("stage %d step %d: serialized %d bytes, %d chunks, digest %s, in %.2f s",
                            snap.stage, snap.step, len(data), len(manifest.chunk_sha256),
                            manifest.digest[:12], time.perf_counter() - started)
            self._cache.move_to_end(cached.manifest.digest)
        _served_log.info("manifest", "peer %s: stage %d step %d: sending manifest %s", peer, snap.stage, snap.step,
                         cached.manifest.digest[:12])
        return cached.manifest

    def _recent(self, part: str, stage: int) -> _Serialized | None:
        """The newest serialization of ``part`` of ``stage`` if it is younger than ``reserialize_s``."""
        now = time.monotonic()
        for held in reversed(self._cache.values()):
            if held.key[0] == part and held.key[1] == stage and now - held.made_at < self._reserialize_s:
                self._cache.move_to_end(held.manifest.digest)
                return held
        return None

    def _chunk(self, msg: StateChunkRequest, peer: str) -> Message:
        if msg.run_id != self.run_id:
            self._strike(peer, "wrong_run")
            return self._refuse("wrong_run", f"this node trains run {short_repr(self.run_id)}")
        cached = self._cache.get(msg.digest)
        if cached is None:
            _served_log.info("stale", "peer %s: stage %d: state %s is no longer held", peer, msg.stage, msg.digest[:12])
            return self._refuse("stale", "that state is no longer held; request a new manifest")
        manifest = cached.manifest
        if msg.stage != manifest.stage or msg.index >= len(manifest.chunk_sha256):
            raise MalformedMessage(f"no chunk {msg.index} of stage {msg.stage} in state {msg.digest[:12]}")
        start = msg.index * manifest.chunk_bytes
        data = memoryview(cached.data.numpy())[start : start + manifest.chunk_bytes]  # encoding copies it
        return StateChunk(run_id=self.run_id, stage=msg.stage, digest=msg.digest, index=msg.index, data=data)


async def download_stage_state(p2p: Any, peer_id: Any, run_id: str, stage: int,
                               limits: WireLimits = DEFAULT_LIMITS, timeout: float | None = 60.0, *,
                               max_total_bytes: int = 16 << 30, pace: TransferPace | None = None,
                               cache: ChunkCache | None = None) -> StageSnapshot:
    """Download and verify ``stage``'s state from ``peer_id``; raises :class:`StateTransferError`.

    ``pace``: the stall window and the deadline sized from the state (default: ``timeout`` as the
    stall window); ``timeout``: a fixed cap on the whole download as well (None: none). ``cache``:
    verified chunks kept on disk are taken from there, and fetched ones are kept there."""
    peer, started = str(peer_id), time.perf_counter()
    where = f"peer {peer}, stage {stage} state"
    pace = pace or TransferPace(stall_s=timeout or 60.0)
    try:
        async with asyncio.timeout(timeout):
            snap = await _download(p2p, peer_id, run_id, stage, limits, max_total_bytes, pace, cache)
    except TimeoutError:
        text = f"{where}: not downloaded within {timeout} s"
        raise StateTransferError(text, peer=peer, reason="timeout") from None
    except TransferTooSlow as exc:
        raise StateTransferError(f"{where}: {exc}", peer=peer, reason=exc.reason) from None
    except RemoteError as exc:
        raise StateTransferError(f"{where}: {exc}", peer=peer, reason=exc.remote_code) from exc
    except ProtocolError as exc:
        raise StateTransferError(f"{where}: [{exc.code}] {exc}", peer=peer, reason=exc.code) from exc
    except Exception as exc:  # the transport (daemon, stream) failed under us
        raise StateTransferError(f"{where}: transfer failed: {exc!r}", peer=peer, reason="transport") from exc
    nbytes = sum(t.numel() * t.element_size() for t in snap.tensors.values())
    logger.info("peer %s: stage %d step %d: downloaded %d bytes in %.2f s", peer, stage, snap.step, nbytes,
                time.perf_counter() - started)
    return snap


async def _download(p2p: Any, peer_id: Any, run_id: str, stage: int, limits: WireLimits, max_total_bytes: int,
                    pace: TransferPace, cache: ChunkCache | None) -> StageSnapshot:
    peer = str(peer_id)
    _, reader, writer = await p2p.call_binary_stream_handler(peer_id, StageStateServer.HANDLER)
    restarts = 1  # a state that goes stale while we fetch it is retried once, from a new manifest
    try:
        while True:
            ask = StateRequest(run_id=run_id, stage=stage)
            reply = await request(reader, writer, ask, limits, timeout=pace.stall_s)
            manifest = check_manifest(reply, run_id, stage, limits, max_total_bytes)
            logger.info("peer %s: stage %d step %d: manifest %s, %d bytes in %d chunks", peer, stage,
                        manifest.step, manifest.digest[:12], manifest.total_bytes, len(manifest.chunk_sha256))
            fetch = StateFetch(manifest, pace, cache, peer)
            await fetch.restore()
            try:
                while fetch.todo:
                    await fetch.get(reader, writer, fetch.todo[0], limits)
                    fetch.todo.popleft()
                    fetch.check_deadline()
            except RemoteError as exc:
                if exc.remote_code != "stale" or restarts == 0:
                    raise
                restarts -= 1
                logger.info("peer %s: stage %d: state %s went stale mid-download; restarting", peer, stage,
                            manifest.digest[:12])
                continue
            return await asyncio.to_thread(decode_snapshot, manifest, fetch.data, limits.check_finite)
    finally:
        writer.close()


async def download_from_replicas(p2p: Any, peer_ids: list[Any], run_id: str, stage: int,
                                 limits: WireLimits = DEFAULT_LIMITS, timeout: float | None = 60.0, *,
                                 part: str = "consensus", max_total_bytes: int = 16 << 30,
                                 pace: TransferPace | None = None, cache: ChunkCache | None = None,
                                 ) -> tuple[StageSnapshot, dict[str, int]]:
    """Download one state from several replicas at once; returns it and the chunks each peer sent.

    Every peer is asked for its manifest of ``part``; the digest most of them offer is the state taken
    (ties: the earliest peer in ``peer_ids``). Its chunks are fetched in parallel, one stream per
    donor; a donor that fails, stalls or leaves hands its unfinished chunk back and the others take
    over, so the download resumes as long as one donor of that digest remains. Chunks are verified
    one by one against the manifest, the whole state as in :func:`download_stage_state`, which
    ``timeout``, ``pace`` and ``cache`` mean the same as for.
    """
    where = f"stage {stage} {part} state from {len(peer_ids)} peer(s)"
    started = time.perf_counter()
    streams: list[_Donor] = []
    ask = StateRequest(run_id=run_id, stage=stage, part=part)
    pace = pace or TransferPace(stall_s=timeout or 60.0)
    try:
        async with asyncio.timeout(timeout):
            streams = await _open_donors(p2p, peer_ids, ask, limits, pace.stall_s, max_total_bytes)
            if not streams:
                raise StateTransferError(f"{where}: no peer offered one", peer="", reason="no_state")
            donors = _majority(streams)
            fetch = StateFetch(donors[0].manifest, pace, cache, f"{len(donors)} peer(s)", part)
            await fetch.restore()
            served = await _fetch_from_donors(donors, fetch, limits, where)
            manifest = fetch.manifest
            snap = await asyncio.to_thread(decode_snapshot, manifest, fetch.data, limits.check_finite)
    except TimeoutError:
        raise StateTransferError(f"{where}: not downloaded within {timeout} s", peer="", reason="timeout") from None
    except TransferTooSlow as exc:
        raise StateTransferError(f"{where}: {exc}", peer="", reason=exc.reason) from None
    except ProtocolError as exc:
        raise StateTransferError(f"{where}: [{exc.code}] {exc}", peer="", reason=exc.code) from exc
    finally:
        for donor in streams:
            donor.writer.close()
    logger.info("stage %d: downloaded %d bytes of %s state %s from %d peer(s) %s in %.2f s (%d chunk(s) from disk)",
                stage, manifest.total_bytes, part, manifest.digest[:12], len(served), served,
                time.perf_counter() - started, fetch.progress.kept_chunks)
    return snap, served


class _Donor(NamedTuple):
    """One replica's open stream and the manifest it offered."""

    peer: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    manifest: StateManifest


async def _open_donors(p2p: Any, peer_ids: list[Any], ask: StateRequest, limits: WireLimits, timeout: float,
                       max_total_bytes: int) -> list[_Donor]:
    """A stream to each peer that answers ``ask`` with a sound manifest, in ``peer_ids`` order."""

    async def manifest_of(pid: Any) -> _Donor:
        _, reader, writer = await p2p.call_binary_stream_handler(pid, StageStateServer.HANDLER)
        try:
            reply = await request(reader, writer, ask, limits, timeout=timeout)
            manifest = check_manifest(reply, ask.run_id, ask.stage, limits, max_total_bytes)
        except BaseException:
            writer.close()
            raise
        return _Donor(str(pid), reader, writer, manifest)

    answers = await asyncio.gather(*(manifest_of(pid) for pid in peer_ids), return_exceptions=True)
    for pid, answer in zip(peer_ids, answers, strict=True):
        if isinstance(answer, BaseException):
            logger.info("peer %s: no %s manifest for stage %d: %s", pid, ask.part, ask.stage, answer)
    return [answer for answer in answers if not isinstance(answer, BaseException)]


def _majority(streams: list[_Donor]) -> list[_Donor]:
    """The streams offering the digest most of them offer (ties: the digest offered first)."""
    votes = collections.Counter(donor.manifest.digest for donor in streams)
    digest = max(votes, key=votes.__getitem__)  # the first of equals: counted in the order offered
    return [donor for donor in streams if donor.manifest.digest == digest]


async def _fetch_from_donors(donors: list[_Donor], fetch: StateFetch, limits: WireLimits,
                             where: str) -> dict[str, int]:
    """Fill ``fetch`` from its chunks still to fetch, one worker per donor; the chunks each donor sent."""
    todo, served = fetch.todo, {}

    async def worker(donor: _Donor) -> bool:
        while todo and not fetch.progress.overdue():
            index = todo.popleft()
            try:
                await fetch.get(donor.reader, donor.writer, index, limits)
            except Exception as exc:  # this donor failed, stalled or left: the others take its chunk
                todo.appendleft(index)
                logger.info("peer %s left mid-download of stage %d (%s); %d chunk(s) to go", donor.peer,
                            fetch.manifest.stage, exc, len(todo))
                return False
            served[donor.peer] = served.get(donor.peer, 0) + 1
        return True

    healthy = list(donors)
    while todo and healthy:
        results = await asyncio.gather(*(worker(d) for d in healthy))
        fetch.check_deadline()
        healthy = [d for d, ok in zip(healthy, results, strict=True) if ok]
    if todo:
        raise StateTransferError(f"{where}: every donor of state {fetch.manifest.digest[:12]} left with {len(todo)} "
                                 "chunk(s) to go", peer=",".join(served), reason="donors_left")
    return served
