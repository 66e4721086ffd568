"""Tensors on the wire: a small descriptor in the message header, raw payload bytes after it.

A descriptor is the msgpack map ``{"codec": name, "shape": [..]}``. Float tensors use a codec from
:mod:`protocol.codecs`; integer tensors (token ids) use one of the integer wire types below, chosen
by the sender as the narrowest that holds the values. Before anything is allocated, decoding checks
the codec against the allow-list, the shape against :class:`WireLimits`, and the payload length
against ``shape × codec``; only then are values materialised, and optionally checked for
finiteness.

``encode_tensor``/``decode_tensor`` give the same thing as one self-describing byte string
(``u32 header length | msgpack descriptor | payload``), for places that carry a lone tensor.

:class:`WireConfig` is the ``[wire]`` config section: the codecs this node sends with and the
receive caps it builds its :class:`WireLimits` from.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from protocol.codecs import _as_bytes, _view, get_codec
from protocol.errors import (
    MalformedMessage,
    OversizeError,
    ProtocolError,
    TensorError,
    UnknownCodec,
    short_repr,
)
from protocol.settings import ConfigError, check_positive, setting

MiB = 1 << 20

# Integer wire types: name → (torch dtype on the wire, bytes per value). Decoded ids are int64.
INT_WIRE_TYPES: dict[str, torch.dtype] = {"u8": torch.uint8, "u16": torch.uint16, "i32": torch.int32, "i64": torch.int64}


# Codecs a receiver accepts unless configured otherwise; hivemind's must be opted into by name.
BUILTIN_CODECS = frozenset({"fp32", "bf16", "fp16", "int8", "e3m0", "int2", "topk"})


@dataclass(frozen=True, kw_only=True)
class WireLimits:
    """Caps applied to everything decoded from a peer. Defaults suit activations and 4-bit fragments.

    Decoded tensors of one message hold at most ``max_decoded_bytes`` (float32 values, int64 ids);
    transient buffers while decoding add at most ~2.5 bytes per value (e3m0's codes and int32 gather
    indices), so the caps bound what a hostile peer can make us allocate.
    """

    max_frame_bytes: int = 64 * MiB  # one frame's body, headers and payloads included
    max_header_bytes: int = 1 * MiB  # the msgpack header of one message
    max_tensor_values: int = 1 << 27  # values in one decoded tensor (512 MiB as float32)
    max_decoded_bytes: int = 512 * MiB  # all decoded tensors of one message together
    codecs: frozenset[str] = BUILTIN_CODECS  # float codecs accepted from peers
    max_ndim: int = 4
    max_tensors: int = 8  # tensors and byte blobs in one message
    max_str_len: int = 512
    max_list_len: int = 4096
    max_token_id: int | None = None  # token ids must be < this (the vocabulary size) when set
    check_finite: bool = True  # reject NaN/inf in decoded float tensors

    def __post_init__(self) -> None:
        names = ("max_frame_bytes", "max_header_bytes", "max_tensor_values", "max_decoded_bytes", "max_ndim",
                 "max_tensors")
        for name in names:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"WireLimits.{name} must be positive, got {getattr(self, name)}")


DEFAULT_LIMITS = WireLimits()


@dataclass(kw_only=True)
class WireConfig:
    """What this node puts on the wire and what it accepts from peers (protocol/)."""

    SECTION = "wire"

    activation_codec: str = setting(
        "bf16", "Codec for boundary coefficients sent forward: bf16, fp32 (exact), fp16, int8, e3m0."
    )
    gradient_codec: str = setting("bf16", "Codec for boundary gradients ∂L/∂c sent backward (same choices).")
    fragment_codec: str = setting("e3m0", "Codec for DiLoCo pseudo-gradient fragments: e3m0 is 4.125 bits/value.")
    max_frame_mib: float = setting(64.0, "Largest frame accepted from a peer (MiB); larger ones are refused unread.")
    max_tensor_mvalues: float = setting(128.0, "Most values in one received tensor (Mi = 2^20 values).")
    max_decoded_mib: float = setting(512.0, "Most memory all tensors of one received message decode to (MiB).")
    frame_timeout_s: float = setting(60.0, "Deadline for receiving one whole frame (seconds); stalls are dropped.")
    check_finite: bool = setting(True, "Reject received float tensors holding NaN or inf.")

    def __post_init__(self) -> None:
        for name in ("activation_codec", "gradient_codec", "fragment_codec"):
            try:
                get_codec(getattr(self, name))
            except UnknownCodec as err:
                raise ConfigError(f"wire.{name}: {err}") from None
        check_positive(self, "max_frame_mib", "max_tensor_mvalues", "max_decoded_mib", "frame_timeout_s")

    def limits(self, vocab_size: int | None = None) -> WireLimits:
        """The :class:`WireLimits` these settings describe."""
        chosen = {self.activation_codec, self.gradient_codec, self.fragment_codec}
        return WireLimits(
            max_frame_bytes=int(self.max_frame_mib * MiB),
            max_tensor_values=int(self.max_tensor_mvalues * MiB),
            max_decoded_bytes=int(self.max_decoded_mib * MiB),
            codecs=BUILTIN_CODECS | chosen,  # a hivemind-* codec is accepted only when configured
            max_token_id=vocab_size,
            check_finite=self.check_finite,
        )


def int_wire_type(tensor: torch.Tensor) -> str:
    """Narrowest integer wire type that holds every value of ``tensor`` (token ids are ≥ 0)."""
    if tensor.numel() == 0:
        return "u8"
    lo, hi = int(tensor.min()), int(tensor.max())
    if lo >= 0 and hi < 1 << 8:
        return "u8"
    if lo >= 0 and hi < 1 << 16:
        return "u16"
    if -(1 << 31) <= lo and hi < 1 << 31:
        return "i32"
    return "i64"


def describe(tensor: torch.Tensor, codec: str | None = None) -> tuple[dict[str, Any], bytes]:
    """(descriptor, payload) for a CPU tensor; floats default to ``fp32``, integers to the narrowest type."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    tensor = tensor.detach()  # float codecs quantize on the tensor's device
    if tensor.is_floating_point():
        name = codec or "fp32"
        if name in INT_WIRE_TYPES:
            raise ValueError(f"{name!r} is an integer wire type; a float tensor needs a float codec")
        payload = get_codec(name).encode(tensor)
    else:
        if tensor.dtype == torch.bool or tensor.is_complex():
            raise ValueError(f"tensors of dtype {tensor.dtype} cannot be sent")
        if tensor.dtype == torch.uint64:
            raise ValueError("uint64 tensors cannot be sent; cast to int64 first")
        tensor = tensor.to(torch.int64)  # uint16/uint32 lack min/max; ids are small, the copy is cheap
        name = codec or int_wire_type(tensor)
        if name not in INT_WIRE_TYPES:
            raise ValueError(f"integer tensor needs an integer wire type {sorted(INT_WIRE_TYPES)}, got {name!r}")
        wire = INT_WIRE_TYPES[name]
        if tensor.numel() and (
            int(tensor.min()) < torch.iinfo(wire).min or int(tensor.max()) > torch.iinfo(wire).max
        ):
            raise ValueError(f"integer values do not fit wire type {name!r}")
        payload = _as_bytes(tensor.to(wire))
    return {"codec": name, "shape": list(tensor.shape)}, payload


def _check_shape(shape: Any, limits: WireLimits, what: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(type(s) is int for s in shape):
        raise MalformedMessage(f"{what}: shape must be a list of integers, got {short_repr(shape)}")
    if len(shape) > limits.max_ndim:
        raise OversizeError(f"{what}: {len(shape)} dimensions exceed the limit of {limits.max_ndim}")
    numel = 1
    for s in shape:
        if s < 0:
            raise TensorError(f"{what}: negative dimension in shape {shape}")
        if s > limits.max_tensor_values:
            raise OversizeError(f"{what}: dimension {s} exceeds the limit of {limits.max_tensor_values} values")
        numel *= s
    if numel > limits.max_tensor_values:
        raise OversizeError(
            f"{what}: shape {shape} declares {numel} values, over the limit of {limits.max_tensor_values}"
        )
    return tuple(shape)


def payload_nbytes(descriptor: Any, limits: WireLimits, what: str = "tensor") -> int:
    """Validate a descriptor and return its exact payload length (nothing is allocated)."""
    if not isinstance(descriptor, dict) or set(descriptor) != {"codec", "shape"}:
        raise MalformedMessage(f"{what}: descriptor must be a map with exactly 'codec' and 'shape'")
    shape = _check_shape(descriptor["shape"], limits, what)
    numel = 1
    for s in shape:
        numel *= s
    name = descriptor["codec"]
    if not isinstance(name, str):
        raise MalformedMessage(f"{what}: codec must be a string")
    if name in INT_WIRE_TYPES:
        return numel * INT_WIRE_TYPES[name].itemsize
    if name not in limits.codecs:
        raise UnknownCodec(f"{what}: codec {short_repr(name)} is not accepted here (accepted: {sorted(limits.codecs)})")
    return get_codec(name).payload_nbytes(numel)


def decoded_nbytes(descriptor: dict[str, Any]) -> int:
    """Bytes the decoded tensor of a validated descriptor occupies (float32 values or int64 ids)."""
    numel = 1
    for s in descriptor["shape"]:
        numel *= s
    return numel * (8 if descriptor["codec"] in INT_WIRE_TYPES else 4)


def materialise(descriptor: dict[str, Any], payload: bytes | memoryview, limits: WireLimits, what: str = "tensor") -> torch.Tensor:
    """Decode a validated descriptor + payload: float32 for float codecs, int64 for integer types."""
    expected = payload_nbytes(descriptor, limits, what)
    if decoded_nbytes(descriptor) > limits.max_decoded_bytes:
        raise OversizeError(f"{what}: decodes to {decoded_nbytes(descriptor)} bytes, over {limits.max_decoded_bytes}")
    if len(payload) != expected:
        raise TensorError(f"{what}: payload is {len(payload)} bytes, shape and codec need {expected}")
    shape, name = tuple(descriptor["shape"]), descriptor["codec"]
    if name in INT_WIRE_TYPES:
        numel = expected // INT_WIRE_TYPES[name].itemsize
        return _view(payload, INT_WIRE_TYPES[name], numel).to(torch.int64).reshape(shape)
    try:
        return get_codec(name).decode(payload, shape, check_finite=limits.check_finite)
    except ProtocolError as exc:
        raise type(exc)(f"{what}: {exc}") from None


_U32 = struct.Struct("<I")


def encode_tensor(tensor: torch.Tensor, codec: str | None = None) -> bytes:
    """One tensor as a self-describing byte string."""
    descriptor, payload = describe(tensor, codec)
    header = msgpack.packb(descriptor, use_bin_type=True)
    return _U32.pack(len(header)) + header + payload


def decode_tensor(data: bytes | memoryview, limits: WireLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """Inverse of :func:`encode_tensor`; raises only :class:`ProtocolError` on bad input."""
    descriptor, payload = split_header(data, limits, "tensor")
    return materialise(descriptor, payload, limits)


def split_header(data: bytes | bytearray | memoryview, limits: WireLimits, what: str) -> tuple[Any, memoryview]:
    """``u32 length | msgpack header | payload`` → (unpacked header, payload view), sizes checked first."""
    view = memoryview(data).cast("B")
    if len(view) > limits.max_frame_bytes:
        raise OversizeError(f"{what} of {len(view)} bytes exceeds the {limits.max_frame_bytes}-byte limit")
    if len(view) < 4:
        raise MalformedMessage(f"{what} of {len(view)} bytes is too short for a header")
    (hlen,) = _U32.unpack_from(view)
    if hlen > limits.max_header_bytes:
        raise OversizeError(f"{what} header of {hlen} bytes exceeds the {limits.max_header_bytes}-byte limit")
    if hlen > len(view) - 4:
        raise MalformedMessage(f"{what} header length {hlen} runs past the end of {len(view)} bytes")
    return unpack_header(view[4 : 4 + hlen]), view[4 + hlen :]


def unpack_header(raw: bytes | memoryview) -> Any:
    """msgpack → Python, with no extension types and every container bounded by the input size."""
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True, ext_hook=_refuse_ext)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise MalformedMessage(f"header is not valid msgpack ({type(exc).__name__}: {exc})"[:300]) from None


def _refuse_ext(code: int, data: bytes) -> Any:
    raise MalformedMessage(f"msgpack extension type {code} is not allowed")
