"""Tensor codecs: how the values of one tensor become bytes on the wire and back.

Every codec turns a float tensor into a *payload* (``bytes``) and back into a float32 tensor; the
shape travels in the message header next to the codec's name (see :mod:`protocol.tensors`), so a
payload alone is just values. The codec interface and the registry are in :mod:`protocol.codec_base`. Codecs compose with the subspace boundary codec: a stage boundary
first projects the residual stream to k coefficients (:mod:`protocol.subspace`), then sends those
with any codec here.

=========  ==============================================  ======================
name       what it sends                                   bits per value
=========  ==============================================  ======================
``fp32``   the float32 bytes                               32
``bf16``   bfloat16 (round to nearest even)                16
``fp16``   float16, saturated to ±65504                    16
``int8``   blockwise absmax: 256 values share an fp32      8 + 32/256 = 8.125
           scale, each value ``round(127·x/absmax)``
``e3m0``   4-bit float: sign + 3 exponent bits, no         4 + 32/256 = 4.125
           mantissa; 256 values share an fp32 scale
``int2``   2-bit uniform: ±σ/2, ±3σ/2 with σ the RMS of    2 + 32/256 = 2.125
           the block's 256 values (fp32), larger clipped
``topk``   the largest 1/32 of the values: int32 indices   48/32 = 1.5
           (strictly increasing), then bf16 values
=========  ==============================================  ======================

E3M0 (Streaming DiLoCo's 4-bit format, DESIGN §1.2): a value is ``scale · ±2^(e−7)`` for code
``e ∈ 1..7`` or ``0`` for code 0, with ``scale`` the block's absolute maximum. So a block keeps
the magnitudes ``absmax · {0, 2⁻⁶, …, 2⁻¹, 1}`` and each value rounds to the *nearest* of them (not
to the nearest exponent): between ``2^p`` and ``2^(p+1)`` the midpoint ``1.5·2^p`` decides, which
is exactly "add half the mantissa range to the float32 bits and keep the exponent". Two codes
pack into a byte, low nibble first.

All payloads are little-endian. Quantized payloads put the block scales first, then the codes.
Decoding checks the byte length against the shape *before* allocating anything and rejects
non-finite or negative scales, so a decoded quantized tensor is finite by construction.
"""

from __future__ import annotations

import sys
from abc import abstractmethod
from typing import ClassVar

import torch

from protocol.codec_base import CODECS, Codec, _as_bytes, _check_input, _view, all_finite, register_codec
from protocol.errors import NonFiniteError, TensorError, UnknownCodec

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI machine
    raise ImportError("protoswarm's wire format is little-endian; this host is big-endian")

BLOCK_SIZE = 256  # values per scale for int8 and e3m0: 32/256 = 0.125 extra bits per value

class _Passthrough(Codec):
    """Sends the values in a float dtype as is (after a cast)."""

    wire_dtype: ClassVar[torch.dtype]

    def payload_nbytes(self, numel: int) -> int:
        return numel * self.wire_dtype.itemsize

    def encode(self, tensor: torch.Tensor) -> bytes:
        tensor = _check_input(tensor, self.name)
        # Receivers refuse NaN/inf, so refuse to send them; checked again after the cast because a
        # finite 3e38 becomes inf in bf16 (fp16 saturates finite values instead).
        if not all_finite(tensor):
            raise ValueError(f"codec {self.name!r} cannot send NaN or inf values")
        cast = self._cast(tensor)
        if cast is not tensor and not all_finite(cast):  # fp32 input to fp32: already checked
            raise ValueError(f"codec {self.name!r}: values overflow {self.wire_dtype} to inf")
        return _as_bytes(cast)

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.wire_dtype)

    def _decode(self, payload, numel: int, check_finite: bool) -> torch.Tensor:
        values = _view(payload, self.wire_dtype, numel)
        # .to() copies out of the (read-only, peer-owned) buffer; clone() does it for float32.
        values = values.to(torch.float32) if self.wire_dtype != torch.float32 else values.clone()
        if check_finite and not all_finite(values):
            raise NonFiniteError(f"{self.name} tensor holds NaN or inf values")
        return values


class Float32Codec(_Passthrough):
    name = "fp32"
    lossless = True
    wire_dtype = torch.float32


class BFloat16Codec(_Passthrough):
    name = "bf16"
    wire_dtype = torch.bfloat16


class Float16Codec(_Passthrough):
    name = "fp16"
    wire_dtype = torch.float16
    _MAX = torch.finfo(torch.float16).max

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        # Saturate rather than overflow to inf (which every receiver would reject).
        return tensor.to(torch.float32).clamp(-self._MAX, self._MAX).to(torch.float16)


def _scale_blocks(blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``blocks / scale`` per row (0 where the scale is 0), by the faster reciprocal when it is finite.

    A subnormal scale (below 2⁻¹²⁸) has no finite float32 reciprocal; those rare inputs divide.
    """
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    if bool(torch.isfinite(inv).all()):
        return blocks * inv[:, None]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return blocks / safe[:, None]


class _Blockwise(Codec):
    """Shared layout of the block-scaled codecs: ``[fp32 scale × blocks][codes]``."""

    block: ClassVar[int] = BLOCK_SIZE

    def num_blocks(self, numel: int) -> int:
        return -(-numel // self.block)

    @abstractmethod
    def code_nbytes(self, numel: int) -> int: ...

    def payload_nbytes(self, numel: int) -> int:
        return 4 * self.num_blocks(numel) + self.code_nbytes(numel)

    def _blocks(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(padded fp32 values as [blocks, block], per-block absmax); refuses non-finite input."""
        flat = _check_input(tensor, self.name).reshape(-1).to(torch.float32)
        nb = self.num_blocks(flat.numel())
        if nb * self.block != flat.numel():
            flat = torch.nn.functional.pad(flat, (0, nb * self.block - flat.numel()))
        blocks = flat.view(nb, self.block)
        absmax = blocks.abs().amax(dim=1) if nb else torch.empty(0, device=flat.device)
        if nb and not bool(torch.isfinite(absmax).all()):
            raise ValueError(f"codec {self.name!r} cannot encode NaN or inf values")
        return blocks, absmax

    max_scale: ClassVar[float] = torch.finfo(torch.float32).max  # largest scale an encoder can produce

    def _lookup(self, payload, numel: int, check_finite: bool, table: torch.Tensor) -> torch.Tensor:
        """Decode packed codes through ``table`` (byte value → the row of levels it packs) × block scales."""
        scales = self._scales(payload, numel, check_finite)
        nb = scales.numel()
        if nb == 0:
            return torch.empty(0, dtype=torch.float32)
        packed = torch.zeros(nb * self.block // table.shape[1], dtype=torch.uint8)
        packed[: self.code_nbytes(numel)] = _view(payload, torch.uint8, self.code_nbytes(numel), offset=4 * nb)
        # index_select with int32 indices: ~3× faster than advanced indexing with int64 here.
        values = torch.index_select(table, 0, packed.int()).view(nb, self.block)
        return values.mul_(scales[:, None]).reshape(-1)[:numel]

    def _scales(self, payload, numel: int, check_finite: bool) -> torch.Tensor:
        scales = _view(payload, torch.float32, self.num_blocks(numel))
        # Always checked (it is one value per block): a NaN/negative scale would poison the whole block,
        # and a scale above max_scale could overflow to inf when multiplied by a code.
        if scales.numel() and not bool(((scales >= 0) & (scales <= self.max_scale)).all()):
            raise NonFiniteError(f"{self.name} payload has a non-finite, negative or impossible block scale")
        return scales


class Int8Codec(_Blockwise):
    name = "int8"
    max_scale = torch.finfo(torch.float32).max / 128  # exact in float32, and 127 · max_scale is finite

    def code_nbytes(self, numel: int) -> int:
        return numel

    def encode(self, tensor: torch.Tensor) -> bytes:
        blocks, absmax = self._blocks(tensor)
        numel = tensor.numel()
        step = absmax / 127.0
        if step.numel() and float(step.max()) > self.max_scale:
            raise ValueError(f"codec {self.name!r} cannot send values above {127 * self.max_scale:.3g}")
        codes = torch.round(_scale_blocks(blocks, step)).clamp_(-127, 127).to(torch.int8)
        return _as_bytes(step) + _as_bytes(codes.reshape(-1)[:numel])

    def _decode(self, payload, numel: int, check_finite: bool) -> torch.Tensor:
        step = self._scales(payload, numel, check_finite)
        nb = step.numel()
        codes = _view(payload, torch.int8, numel, offset=4 * nb)
        padded = torch.empty(nb * self.block, dtype=torch.float32)
        padded[:numel] = codes
        padded[numel:] = 0
        return padded.view(nb, self.block).mul_(step[:, None]).reshape(-1)[:numel]


def _e3m0_levels() -> torch.Tensor:
    magnitudes = torch.tensor([0.0] + [2.0 ** (e - 7) for e in range(1, 8)], dtype=torch.float32)
    return torch.cat([magnitudes, -magnitudes])  # code = sign << 3 | exponent code


class E3M0Codec(_Blockwise):
    name = "e3m0"
    LEVELS = _e3m0_levels()
    # Both nibbles of a byte at once: one gather per byte instead of unpack + gather.
    _PAIRS = torch.stack([LEVELS[torch.arange(256) & 15], LEVELS[torch.arange(256) >> 4]], dim=1).contiguous()

    def code_nbytes(self, numel: int) -> int:
        return -(-numel // 2)

    def encode(self, tensor: torch.Tensor) -> bytes:
        blocks, absmax = self._blocks(tensor)
        numel = tensor.numel()
        if numel == 0:
            return b""
        y = _scale_blocks(blocks, absmax)  # in [-1, 1]
        bits = y.view(torch.int32)
        magnitude = bits & 0x7FFFFFFF
        # [2⁻⁷, 2⁻⁶) is nearer 2⁻⁶ than 0: at least code 1 from 2⁻⁷ (float32 bits 0x3C000000) up.
        at_least_one = (magnitude >= 0x3C000000).view(torch.uint8)
        # +0x400000 rounds the mantissa at 1.5·2^p; >>23 keeps the biased exponent; −120 = −127+7.
        codes = magnitude.add_(0x400000).bitwise_right_shift_(23).sub_(120).clamp_(0, 7).to(torch.uint8)
        codes = torch.maximum(codes, at_least_one)
        # No sign on code 0 (no "−0"), so equal values always give equal bytes.
        sign = (bits < 0).view(torch.uint8) & (codes > 0).view(torch.uint8)
        pairs = codes.bitwise_or_(sign.bitwise_left_shift_(3)).view(-1, 2)
        packed = pairs[:, 0] | (pairs[:, 1] << 4)
        return _as_bytes(absmax) + _as_bytes(packed[: self.code_nbytes(numel)])

    def _decode(self, payload, numel: int, check_finite: bool) -> torch.Tensor:
        return self._lookup(payload, numel, check_finite, self._PAIRS)


class Int2Codec(_Blockwise):
    """2-bit uniform quantizer scaled by the block's RMS σ: levels ±σ/2 and ±3σ/2 (within 1.2% of the
    best 4-level quantizer's error for Gaussian values); larger values clip to ±3σ/2. Meant for
    outer gradients with error feedback, which carries what a clip or rounding lost to the next round."""

    name = "int2"
    max_scale = torch.finfo(torch.float32).max / 2  # 1.5 × max_scale stays finite

    def code_nbytes(self, numel: int) -> int:
        return -(-numel // 4)

    def encode(self, tensor: torch.Tensor) -> bytes:
        blocks, _ = self._blocks(tensor)
        numel = tensor.numel()
        if numel == 0:
            return b""
        count = torch.full((blocks.shape[0],), float(self.block))
        if numel % self.block:  # the last block's padding is no value: leave it out of its RMS
            count[-1] = numel % self.block
        rms = blocks.square().sum(dim=1).div_(count).sqrt_()
        if float(rms.max()) > self.max_scale:
            raise ValueError(f"codec {self.name!r} cannot send values of this size")
        # code 0..3 ↦ (code − 1.5)·σ; the thresholds are −σ, 0, σ
        codes = torch.floor(_scale_blocks(blocks, rms)).add_(2).clamp_(0, 3).to(torch.uint8).view(-1, 4)
        packed = codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)
        return _as_bytes(rms) + _as_bytes(packed[: self.code_nbytes(numel)])

    _QUADS = torch.stack([((torch.arange(256) >> (2 * i)) & 3).float() - 1.5 for i in range(4)], dim=1).contiguous()

    def _decode(self, payload, numel: int, check_finite: bool) -> torch.Tensor:
        return self._lookup(payload, numel, check_finite, self._QUADS)


class TopKCodec(Codec):
    """The largest 1/32 of the values by magnitude: their indices (int32, strictly increasing) then
    their values (bf16); the rest decode as 0. 6 bytes a kept value, 1.5 bits a value in all. Meant for
    outer gradients with error feedback, which carries the values left out to the next round."""

    name = "topk"
    density: ClassVar[int] = 32  # one value in this many is sent

    def kept(self, numel: int) -> int:
        return -(-numel // self.density)

    def payload_nbytes(self, numel: int) -> int:
        return 6 * self.kept(numel)

    def encode(self, tensor: torch.Tensor) -> bytes:
        flat = _check_input(tensor, self.name).reshape(-1).to(torch.float32)
        if not all_finite(flat):
            raise ValueError(f"codec {self.name!r} cannot send NaN or inf values")
        index = torch.topk(flat.abs(), self.kept(flat.numel()), sorted=False).indices.sort().values
        values = flat[index].to(torch.bfloat16)
        if not all_finite(values):
            raise ValueError(f"codec {self.name!r}: values overflow bfloat16 to inf")
        return _as_bytes(index.to(torch.int32)) + _as_bytes(values)

    def _decode(self, payload, numel: int, check_finite: bool) -> torch.Tensor:
        k = self.kept(numel)
        index = _view(payload, torch.int32, k).to(torch.int64)
        if k and (int(index[0]) < 0 or int(index[-1]) >= numel or (k > 1 and not bool((index.diff() > 0).all()))):
            raise TensorError(f"{self.name} indices must be strictly increasing and below {numel}")
        values = _view(payload, torch.bfloat16, k, offset=4 * k).to(torch.float32)
        if check_finite and not all_finite(values):
            raise NonFiniteError(f"{self.name} tensor holds NaN or inf values")
        out = torch.zeros(numel, dtype=torch.float32)
        out[index] = values
        return out


for _builtin in (Float32Codec, BFloat16Codec, Float16Codec, Int8Codec, E3M0Codec, Int2Codec, TopKCodec):
    register_codec(_builtin())


def get_codec(name: str) -> Codec:
    """The codec called ``name``; raises :class:`UnknownCodec` (a ``ProtocolError``) otherwise.

    ``hivemind-float16`` and ``hivemind-uniform8bit`` wrap hivemind's own codecs (imported on first use).
    """
    codec = CODECS.get(name) if isinstance(name, str) else None
    if codec is None and isinstance(name, str) and name.startswith("hivemind-"):
        from protocol import hivemind_compat  # noqa: F401  (registers the hivemind codecs)

        codec = CODECS.get(name)
    if codec is None:
        known = ", ".join(sorted(CODECS)) + ", hivemind-float16, hivemind-uniform8bit"
        raise UnknownCodec(f"unknown tensor codec {name!r}; this node knows: {known}")
    return codec


class MeanAccumulator:
    """Weighted FP32 average of decoded contributions (e.g. peers' 4-bit pseudo-gradients).

    Quantized payloads are decoded and summed in float32 so that averaging M replicas does not
    add M rounding steps of a low-precision accumulator on top of the quantization itself.
    """

    def __init__(self, shape: tuple[int, ...] | list[int] | torch.Size):
        self.total = torch.zeros(tuple(shape), dtype=torch.float32)
        self.weight = 0.0
        self.count = 0

    def add(self, values: torch.Tensor, weight: float = 1.0) -> None:
        if tuple(values.shape) != tuple(self.total.shape):
            raise TensorError(f"contribution of shape {list(values.shape)} does not match {list(self.total.shape)}")
        if not weight > 0 or weight == float("inf"):
            raise ValueError(f"contribution weight must be a positive finite number, got {weight}")
        values = values.to(torch.float32)
        # Checked before touching the total, so a hostile magnitude or weight cannot leave it inf/NaN.
        if values.numel():
            bound = float(torch.linalg.vector_norm(values, float("inf"))) * float(weight)
            bound += float(torch.linalg.vector_norm(self.total, float("inf")))
            if not bound < torch.finfo(torch.float32).max:
                raise NonFiniteError(f"contribution ×{weight} would overflow the float32 average")
        self.total.add_(values, alpha=float(weight))
        self.weight += float(weight)
        self.count += 1

    def add_encoded(self, payload: bytes | memoryview, codec: str | Codec, weight: float = 1.0) -> None:
        """Decode (validating length and finiteness) and add one contribution."""
        codec = get_codec(codec) if isinstance(codec, str) else codec
        self.add(codec.decode(payload, self.total.shape), weight)

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no contributions to average")
        return self.total / self.weight
