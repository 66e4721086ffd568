"""A stage's state as bytes and a manifest: what :mod:`swarm.state_transfer` sends and checks.

The state bytes are the tensors' raw little-endian bytes concatenated in ``snapshot().tensors``
order. The manifest lists every entry (name, dtype, shape, offset, size, SHA-256), the chunk size and
one SHA-256 per chunk. Its ``digest`` is the SHA-256 of the msgpack list ``[run_id, stage, step,
round_id, [[name, dtype, shape, offset, nbytes, sha256], ...], chunk_bytes, chunk_sha256]``
(:func:`manifest_digest`), so it names one exact state and the client can recompute it. Nothing is
pickled; encoding and decoding are CPU-heavy and meant for worker threads.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass

import msgpack
import torch

from protocol.errors import ChecksumError, NonFiniteError, short_repr
from protocol.messages import STATE_DTYPES, StateEntry, StateManifest
from protocol.tensors import DEFAULT_LIMITS, WireLimits

_DTYPES: dict[torch.dtype, str] = {getattr(torch, name): name for name in STATE_DTYPES}
FRAME_SLACK = 4096  # room for a StateChunk's header next to its data in one frame


@dataclass(kw_only=True)
class StageSnapshot:
    """A stage's state at one point of training: what a server offers and a download returns."""

    stage: int
    step: int  # training progress the state belongs to
    round_id: int  # outer rounds completed
    tensors: dict[str, torch.Tensor]  # e.g. a stage module's state_dict; dtypes in STATE_DTYPES


def sha256_hex(data: bytes | memoryview) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()  # releases the GIL on large inputs


def manifest_digest(manifest: StateManifest) -> str:
    """The SHA-256 naming a manifest's state: everything in it but the digest itself."""
    entries = [[e.name, e.dtype, list(e.shape), e.offset, e.nbytes, e.sha256] for e in manifest.entries]
    content = [manifest.run_id, manifest.stage, manifest.step, manifest.round_id, entries,
               manifest.chunk_bytes, list(manifest.chunk_sha256)]
    return hashlib.sha256(msgpack.packb(content)).hexdigest()


def encode_snapshot(
    snapshot: StageSnapshot, run_id: str, chunk_bytes: int, limits: WireLimits = DEFAULT_LIMITS
) -> tuple[StateManifest, torch.Tensor]:
    """Serialize a snapshot into one buffer and its manifest (CPU-heavy: call it off the event loop).

    ``chunk_bytes`` grows when the state would need more than ``limits.max_list_len`` chunks. The
    tensors are copied first and hashed from the copy, so the hashes always describe the bytes sent.
    """
    if sys.byteorder != "little":
        raise NotImplementedError("state transfer assumes a little-endian host")
    if len(snapshot.tensors) > limits.max_list_len:
        raise ValueError(f"{len(snapshot.tensors)} state tensors exceed the manifest's {limits.max_list_len}")
    for name, tensor in snapshot.tensors.items():
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"state tensor {name!r} has dtype {tensor.dtype}, not one of {STATE_DTYPES}")
    total = sum(t.numel() * t.element_size() for t in snapshot.tensors.values())
    chunk_bytes = max(chunk_bytes, -(-total // limits.max_list_len))
    if chunk_bytes + FRAME_SLACK > limits.max_frame_bytes:
        raise ValueError(f"a {total}-byte state needs {chunk_bytes}-byte chunks, over the frame limit")
    data = torch.empty(total, dtype=torch.uint8)  # torch: no zero-fill, and copies release the GIL
    view = memoryview(data.numpy())
    entries, offset = [], 0
    for name, tensor in snapshot.tensors.items():
        end = offset + tensor.numel() * tensor.element_size()
        if end > offset:  # straight from the source device: a GPU state is not staged whole on the CPU
            data[offset:end].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
        entries.append(StateEntry(name=name, dtype=_DTYPES[tensor.dtype], shape=list(tensor.shape),
                                  offset=offset, nbytes=end - offset, sha256=sha256_hex(view[offset:end])))
        offset = end
    chunks = [sha256_hex(view[i : i + chunk_bytes]) for i in range(0, total, chunk_bytes)]
    manifest = StateManifest(
        run_id=run_id, stage=snapshot.stage, step=snapshot.step, round_id=snapshot.round_id,
        entries=entries, chunk_bytes=chunk_bytes, chunk_sha256=chunks, digest="0" * 64,
    )
    manifest.digest = manifest_digest(manifest)
    return manifest, data


def decode_snapshot(manifest: StateManifest, data: torch.Tensor, check_finite: bool = True) -> StageSnapshot:
    """Tensors from verified state bytes; raises a :class:`ProtocolError` if an entry does not check out."""
    view = memoryview(data.numpy())
    tensors: dict[str, torch.Tensor] = {}
    for e in manifest.entries:
        raw = view[e.offset : e.offset + e.nbytes]
        if sha256_hex(raw) != e.sha256:
            raise ChecksumError(f"state entry {short_repr(e.name)}: SHA-256 does not match the manifest")
        # Clone before the dtype view: an entry's offset need not be aligned for its dtype.
        tensor = data[e.offset : e.offset + e.nbytes].clone().view(getattr(torch, e.dtype)).reshape(e.shape)
        if check_finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"state entry {short_repr(e.name)} holds NaN or inf")
        tensors[e.name] = tensor
    return StageSnapshot(stage=manifest.stage, step=manifest.step, round_id=manifest.round_id,
                         tensors=tensors)
