"""hivemind's own tensor codecs as protoswarm codecs, and why it does not work the other way.

Importing this module registers two codecs, usable anywhere a codec name is accepted:

* ``hivemind-float16`` — ``hivemind.compression.Float16Compression`` (payload: float16 values);
* ``hivemind-uniform8bit`` — ``hivemind.compression.Uniform8BitQuantization`` (payload: int64
  codebook size, 256 float32 bucket means, one uint8 index per value).

They exist so that benchmarks compare protoswarm's codecs with hivemind's through one interface, and
so a swarm can opt into hivemind's formats by name: receivers accept them only when they are listed in
``WireLimits.codecs`` (e.g. ``BUILTIN_CODECS | HIVEMIND_CODECS``), never by default. Their payloads are checked (length, codebook
size, finiteness) before hivemind's ``extract`` sees them.

The other direction is not possible without patching hivemind: hivemind decodes every tensor with
``deserialize_torch_tensor``, which dispatches on ``runtime_pb2.Tensor.compression``, a closed
protobuf enum of six values (NONE, MEANSTD_16BIT, FLOAT16, QUANTILE_8BIT, UNIFORM_8BIT,
BLOCKWISE_8BIT). A ``CompressionBase`` subclass can *produce* a new format, but a receiving
hivemind averager cannot *read* it. So E3M0 fragments travel in protoswarm's own messages over
hivemind's P2P streams (DESIGN §4), not through hivemind's averager.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from hivemind.compression import CompressionInfo, Float16Compression, Uniform8BitQuantization
from hivemind.compression.base import CompressionBase
from hivemind.proto import runtime_pb2

from protocol.codec_base import CODECS, Codec, _check_input, _view, all_finite, register_codec
from protocol.errors import NonFiniteError, TensorError

# The formats hivemind can decode; tests pin this so a hivemind that opens its enum is noticed.
HIVEMIND_CODECS = frozenset({"hivemind-float16", "hivemind-uniform8bit"})  # add to WireLimits.codecs to accept
HIVEMIND_COMPRESSION_TYPES = ("NONE", "MEANSTD_16BIT", "FLOAT16", "QUANTILE_8BIT", "UNIFORM_8BIT", "BLOCKWISE_8BIT")


class _HivemindCodec(Codec):
    compression: ClassVar[CompressionBase]

    def encode(self, tensor: torch.Tensor) -> bytes:
        tensor = _check_input(tensor, self.name).to(torch.float32)
        serialized = self.compression.compress(tensor, CompressionInfo.from_tensor(tensor))
        return serialized.buffer

    def _extract(self, payload, numel: int) -> torch.Tensor:
        serialized = runtime_pb2.Tensor(
            buffer=bytes(payload), size=[numel], dtype="float32", compression=self.compression.compression_type
        )
        return self.compression.extract(serialized).to(torch.float32)


class HivemindFloat16(_HivemindCodec):
    name = "hivemind-float16"
    compression = Float16Compression()

    def payload_nbytes(self, numel: int) -> int:
        return 2 * numel

    def _decode(self, payload, numel: int, check_finite: bool) -> torch.Tensor:
        values = self._extract(payload, numel)
        if check_finite and not all_finite(values):
            raise NonFiniteError(f"{self.name} tensor holds NaN or inf values")
        return values


class HivemindUniform8Bit(_HivemindCodec):
    name = "hivemind-uniform8bit"
    compression = Uniform8BitQuantization()
    _BINS = 256

    def encode(self, tensor: torch.Tensor) -> bytes:
        tensor = _check_input(tensor, self.name)
        if tensor.numel() < 2:  # hivemind divides by numel − 1 (math domain error)
            raise ValueError(f"{self.name} (hivemind's own code) cannot encode fewer than 2 values")
        return super().encode(tensor)

    def payload_nbytes(self, numel: int) -> int:
        return 8 + 4 * self._BINS + numel

    def _decode(self, payload, numel: int, check_finite: bool) -> torch.Tensor:
        (bins,) = np.frombuffer(payload, dtype="<i8", count=1)
        if int(bins) != self._BINS:
            raise TensorError(f"{self.name} codebook must have {self._BINS} entries, got {int(bins)}")
        codebook = _view(payload, torch.float32, self._BINS, offset=8)
        if not bool(torch.isfinite(codebook).all()):
            raise NonFiniteError(f"{self.name} codebook holds NaN or inf values")
        return self._extract(payload, numel)


for _codec in (HivemindFloat16(), HivemindUniform8Bit()):
    if _codec.name not in CODECS:
        register_codec(_codec)
