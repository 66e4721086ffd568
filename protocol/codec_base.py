"""The codec interface and the registry of codecs by name, apart from the codecs themselves.

:mod:`protocol.codecs` defines the built-in codecs and :func:`protocol.codecs.get_codec`;
:mod:`protocol.hivemind_compat` wraps hivemind's. Both subclass :class:`Codec` from here and add
themselves with :func:`register_codec`, so neither imports the other to be registered.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from protocol.errors import TensorError, short_repr

_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _as_bytes(tensor: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor of any dtype (copied to the CPU if needed)."""
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes()


def _view(payload: bytes | bytearray | memoryview, dtype: torch.dtype, count: int, offset: int = 0) -> torch.Tensor:
    """Zero-copy, read-only view of ``count`` elements of ``payload`` (callers copy before writing)."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():
        # frombuffer warns on read-only buffers (bytes); every caller copies via .to()/.clone()/ops.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(payload, dtype=dtype, count=count, offset=offset)


def all_finite(values: torch.Tensor) -> bool:
    """True when no value is NaN or ±inf.

    A sum propagates NaN/inf and runs ~10× faster than ``isfinite().all()``; only when the sum is not
    finite (a non-finite value, or finite values overflowing) is the exact check needed.
    """
    if values.numel() == 0 or bool(torch.isfinite(values.sum())):
        return True
    return bool(torch.isfinite(values).all())


def _check_input(tensor: torch.Tensor, codec: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"codec {codec!r} encodes torch tensors, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOAT_INPUTS:
        raise ValueError(f"codec {codec!r} encodes floating-point tensors, got {tensor.dtype}")
    # Stay on the tensor's device: quantizing on a GPU moves 8× fewer bytes to the host for e3m0.
    return tensor.detach()


class Codec(ABC):
    """Turns a float tensor's values into bytes and back. Stateless; one shared instance per name."""

    name: ClassVar[str]
    lossless: ClassVar[bool] = False  # exact for float32 input

    @abstractmethod
    def payload_nbytes(self, numel: int) -> int:
        """Exact payload length for ``numel`` values (checked before decoding allocates anything)."""

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> bytes:
        """Payload for the tensor's values (flattened in row-major order)."""

    @abstractmethod
    def _decode(self, payload: bytes | bytearray | memoryview, numel: int, check_finite: bool) -> torch.Tensor:
        """Flat float32 tensor of ``numel`` values; the length was already checked."""

    def decode(
        self,
        payload: bytes | bytearray | memoryview,
        shape: tuple[int, ...] | list[int],
        *,
        check_finite: bool = True,
    ) -> torch.Tensor:
        """Float32 tensor of ``shape`` from a payload; raises :class:`TensorError` on a length mismatch."""
        if not isinstance(shape, (tuple, list, torch.Size)) or not all(
            type(s) is int and 0 <= s < 1 << 62 for s in shape
        ):
            raise TensorError(f"{self.name}: shape must be a sequence of non-negative integers, got {short_repr(shape)}")
        shape = tuple(shape)
        numel = 1
        for s in shape:
            numel *= s
        expected = self.payload_nbytes(numel)
        if len(payload) != expected:
            raise TensorError(
                f"{self.name} payload for shape {list(shape)} must be {expected} bytes, got {len(payload)}"
            )
        return self._decode(payload, numel, check_finite).reshape(shape)

    def bits_per_value(self, numel: int) -> float:
        """Payload bits per value, block scales included (message headers are not)."""
        return 8.0 * self.payload_nbytes(numel) / max(numel, 1)


CODECS: dict[str, Codec] = {}  # name → the one shared instance


def register_codec(codec: Codec) -> None:
    """Add a codec under ``codec.name`` (names are unique; built-ins cannot be replaced)."""
    if codec.name in CODECS:
        raise ValueError(f"a codec named {codec.name!r} is already registered")
    CODECS[codec.name] = codec
