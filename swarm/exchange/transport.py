"""How parts travel: fragments and slices as chunked FragmentParts, read back with their checks; the
balanced exchange's per-part rounding (a sender knows the bits its receiver decodes) and the digests
its summaries carry."""

from __future__ import annotations

import asyncio
import hashlib
import math
from typing import Any

import torch

from protocol.errors import MalformedMessage, RemoteError
from protocol.framing import PREFIX_BYTES, read_frame
from protocol.messages import ErrorReply, FragmentPart, decode_message
from protocol.tensors import WireLimits
from swarm.diloco import quantized
from swarm.exchange.groups import RoundKey


def chunk(values: torch.Tensor, max_values: int) -> list[tuple[int, torch.Tensor]]:
    """``(offset, slice)`` pieces of a flat tensor, each at most ``max_values`` long (one for an empty one)."""
    n = values.numel()
    return [(o, values[o:o + max_values]) for o in range(0, max(n, 1), max_values)] if n else [(0, values)]


async def next_part(reader: asyncio.StreamReader, limits: WireLimits, timeout: float | None) -> tuple[FragmentPart, int]:
    """The next FragmentPart on a stream and the bytes it took; RemoteError for an ErrorReply or the end."""
    raw = await read_frame(reader, limits, timeout=timeout, idle_timeout=timeout)
    if raw is None:
        raise RemoteError("peer closed the stream mid-fragment", remote_code="closed")
    msg = decode_message(raw, limits)
    if isinstance(msg, ErrorReply):
        raise RemoteError(f"[{msg.code}] {msg.message}", remote_code=msg.code)
    if not isinstance(msg, FragmentPart):
        raise MalformedMessage(f"expected a FragmentPart, got {type(msg).__name__}")
    return msg, len(raw) + PREFIX_BYTES


def wire_values(values: torch.Tensor, per: int, codec: str) -> torch.Tensor:
    """What a receiver decodes of ``values`` (a slice of a fragment) sent in
    FragmentParts of at most ``per`` values: each part is quantized alone (blockwise codecs' blocks
    start at each part), so the sender knows the exact bits without a round trip."""
    out = torch.empty(values.numel(), dtype=torch.float32)
    for o in range(0, values.numel(), per):
        out[o:o + per] = quantized(values[o:o + per], codec)[1]
    return out


def part_digest(weight: float, values: torch.Tensor) -> str:
    """SHA-256 of a part as a reducer received it (its weight and its decoded fp32 values)."""
    h = hashlib.sha256(repr(float(weight)).encode())
    h.update(values.to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def mean_digest(values: torch.Tensor) -> str:
    return hashlib.sha256(values.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


async def read_slice(ex: Any, reader: asyncio.StreamReader, peer: str, key: RoundKey | None,
                     offset: int | None, length: int | None,
                     timeout: float | None = None, first: tuple[FragmentPart, int] | None = None) \
        -> tuple[torch.Tensor, int, RoundKey, int, float]:
    """A slice sent to ``ex`` as FragmentParts (key and slice from the first part when None; ``first``:
    that part and its size if already read). Returns the values, the bytes read, the key, the slice's
    offset and the first part's weight."""
    received, out, got, weight, num_parts = 0, None, 0, 1.0, None
    per = ex.config.max_values_per_part
    while num_parts is None or got < num_parts:
        msg, size = first if first is not None else await next_part(reader, ex.limits, timeout)
        first = None
        received += size
        if key is None:
            key, offset = RoundKey(msg.stage, msg.fragment_id, msg.round_id), msg.offset
            length = ex._slice_length(key, offset, peer)
            if msg.num_parts != max(1, math.ceil(length / per)):  # the sender planned other slices
                raise _NotMine(f"our slice at {offset} has {length} values; the sender's has other bounds "
                               "(views of the stage differ)")
        if msg.run_id != ex.run_id or (msg.stage, msg.fragment_id, msg.round_id) != (key.stage, key.fragment,
                                                                                     key.round):
            raise MalformedMessage("a part of another run, stage, fragment or round inside a slice")
        if msg.codec != ex.codec_name or msg.total_values != ex.fragment_sizes[key.fragment]:
            raise MalformedMessage(f"parts travel as {ex.codec_name} of the whole fragment's size")
        want = max(1, math.ceil(length / per))
        at = offset + got * per
        if msg.num_parts != want or msg.part != got or msg.offset != at or \
                msg.values.numel() != min(per, offset + length - at):
            raise MalformedMessage(f"part {msg.part} at {msg.offset} ({msg.values.numel()} values) is not part "
                                   f"{got} of the {length}-value slice at {offset}")
        if out is None:
            out, num_parts, weight = torch.empty(length, dtype=torch.float32), msg.num_parts, msg.weight
        out[at - offset:at - offset + msg.values.numel()] = msg.values
        got += 1
    return out, received, key, offset, weight


class _NotMine(Exception):
    """A slice this node neither reduces nor checks for that sender (views of the stage differ)."""
