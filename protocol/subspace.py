"""The subspace boundary codec (Protocol Models, DESIGN §1.1).

Every residual stream ``x`` of a subspace-constrained model satisfies
``x − T_fixed[ids] ∈ span(U)``, so a stage boundary sends the k coefficients
``c = (x − T_fixed[ids]) · U`` per token (plus the ids) and the receiver rebuilds
``x = c · Uᵀ + T_fixed[ids]``. Gradients cross the other way as ``∂L/∂c = (∂L/∂x) · U``
and are expanded back with ``∂L/∂x ≈ (∂L/∂c) · Uᵀ`` (exact on every direction the upstream
stage can influence, which is all of span(U)).

``U`` and ``T_fixed`` are a pure function of ``(seed, vocab_size, d, k)``: every peer builds the same
tensors locally and nothing is sent to agree on them, and ``basis_fingerprint`` lets peers confirm
bit-equality. ``U`` (d×k, small) is generated on the CPU in float64 with a seeded ``torch.Generator``
(QR) and then cast and moved. ``T_fixed`` (V×d: 2 GiB in fp32 for an 8b model, on every stage) is
generated where it is used, with integer and IEEE-exact float operations only, so a GPU and a CPU build
the same bits: a counter-based 32-bit hash of (seed, entry index) picks a point of a piecewise-linear
inverse normal CDF (2^16 segments, from a quantile table computed on the CPU in float64). The entries
are N(0, std²) up to that discretisation (tails cut at ±4.3 std).

Plain functions on tensors; no ``torch.nn`` modules, so the wire layer and tests can use them alone.
"""

from __future__ import annotations

import hashlib
import math

import torch

# Distinct streams for the two seed-derived tensors, so changing one's shape never changes the other.
_BASIS_STREAM = 0x5B
_TABLE_STREAM = 0x7F
_TABLE_LEFT_STREAM, _TABLE_RIGHT_STREAM = 0x3D, 0x4E  # the factors of a low-rank table


def _generator(seed: int, stream: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed((int(seed) * 1_000_003 + stream) % (2**63 - 1))
    return gen


def make_basis(seed: int, d: int, k: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Orthonormal ``U ∈ R^{d×k}`` derived from ``seed`` (QR of a Gaussian matrix, signs fixed)."""
    if not 0 < k <= d:
        raise ValueError(f"subspace rank k={k} must be in 1..d={d}")
    gauss = torch.randn(d, k, generator=_generator(seed, _BASIS_STREAM), dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    # QR is unique only up to column signs; pin them so every LAPACK gives the same U.
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return q.to(dtype).contiguous().to(device)


_MASK32 = 0xFFFFFFFF
_SEGMENTS = 1 << 16  # pieces of the inverse normal CDF; the low 16 bits of a hash place a point in one
_TABLE_CHUNK = 1 << 22  # entries generated at once (bounds the int64 temporaries to ~100 MB)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x·c mod 2^32`` for int64 tensors holding 32-bit values, without int64 overflow (exact anywhere)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * (c & 0xFFFF)) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser with full avalanche (xor-shift / multiply), on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _normal_quantiles() -> torch.Tensor:
    """Φ⁻¹ at 2^16 + 1 evenly spaced probabilities (midpoints of 2^16 + 1 cells), fp32, from float64 on the CPU."""
    p = (torch.arange(_SEGMENTS + 1, dtype=torch.float64) + 0.5) / (_SEGMENTS + 1)
    return torch.special.ndtri(p).to(torch.float32)


def make_fixed_table(seed: int, vocab_size: int, d: int, std: float, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu", rank: int | None = None) -> torch.Tensor:
    """Frozen token table ``T_fixed ∈ R^{V×d}``, generated on ``device``; the same bits on every device (see
    the module docstring). ``rank`` None: i.i.d. ~N(0, std²) entries (full rank). ``rank`` r: the product
    ``A·B·std/√r`` of i.i.d. N(0, 1) factors A (V×r) and B (r×d), so entries still have std ``std``; it is
    summed one rank-1 term at a time with separate IEEE multiplies and adds (no matmul, whose summation
    order differs between libraries and devices), which costs V·d·r operations."""
    if rank is None:
        return (_normal_entries(seed, _TABLE_STREAM, vocab_size * d, device) * std).view(vocab_size, d).to(dtype)
    if not 0 < rank <= min(vocab_size, d):
        raise ValueError(f"table rank {rank} must be in 1..min(V={vocab_size}, d={d})")
    left = _normal_entries(seed, _TABLE_LEFT_STREAM, vocab_size * rank, device).view(vocab_size, rank)
    right = _normal_entries(seed, _TABLE_RIGHT_STREAM, rank * d, device).view(rank, d)
    out = torch.zeros(vocab_size, d, dtype=torch.float32, device=device)
    for j in range(rank):
        term = left[:, j : j + 1] * right[j : j + 1, :]
        out += term
    return (out * (std / math.sqrt(rank))).to(dtype).contiguous()


def _normal_entries(seed: int, stream: int, n: int, device: torch.device | str) -> torch.Tensor:
    """``n`` entries ~N(0, 1) (fp32, flat) of one seeded stream: a hash of (seed, stream, index) placed on
    the piecewise-linear inverse normal CDF, with integer and IEEE-exact float operations only."""
    if n >= 1 << 32:
        raise ValueError(f"{n} table entries are over 2^32; the generator counts in 32 bits")
    key = int(_hash32(torch.tensor([(int(seed) * 1_000_003 + stream) & _MASK32]))[0])
    quantiles = _normal_quantiles().to(device)
    out = torch.empty(n, dtype=torch.float32, device=device)
    for start in range(0, n, _TABLE_CHUNK):
        index = torch.arange(start, min(n, start + _TABLE_CHUNK), dtype=torch.int64, device=device)
        h = _hash32(_hash32(index) ^ key)
        low, frac = quantiles[h >> 16], ((h & 0xFFFF).to(torch.float32) * 2 + 1) / (2 * _SEGMENTS)
        # Separate IEEE operations (no fused multiply-add): bit-identical on the CPU and on CUDA.
        out[start : start + len(index)] = low + (quantiles[(h >> 16) + 1] - low) * frac
    return out


def basis_fingerprint(*tensors: torch.Tensor) -> str:
    """Short hash of the exact bytes of the given tensors (peers compare it to agree on U/T_fixed)."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def table_rows(table: torch.Tensor, ids: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
    """``gain·T_fixed[ids]`` in fp32 (``gain`` None: the table's rows as they are)."""
    rows = table[ids].float()
    return rows if gain is None else rows * gain


def encode(x: torch.Tensor, ids: torch.Tensor, basis: torch.Tensor, table: torch.Tensor | None,
           gain: torch.Tensor | None = None) -> torch.Tensor:
    """Residual stream ``x`` (…, n, d) and token ids (…, n) → coefficients (…, n, k); ``gain`` scales the
    table (a stage's learned gain on T_fixed)."""
    if table is not None:
        # In fp32: x is mostly T_fixed, so subtracting in bf16 would cancel away the part that is sent.
        x = x.float() - table_rows(table, ids, gain)
    return x @ basis.to(x.dtype)


def decode(coefficients: torch.Tensor, ids: torch.Tensor, basis: torch.Tensor, table: torch.Tensor | None,
           gain: torch.Tensor | None = None) -> torch.Tensor:
    """Coefficients (…, n, k) and token ids (…, n) → residual stream (…, n, d)."""
    x = coefficients @ basis.to(coefficients.dtype).T
    if table is not None:
        # The stream stays fp32 (as the table) even when coefficients arrive as bf16.
        x = x.float() + table_rows(table, ids, gain)
    return x


def encode_grad(grad_x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``∂L/∂x`` (…, n, d) → ``∂L/∂c`` (…, n, k): the gradient an upstream stage needs."""
    return grad_x @ basis.to(grad_x.dtype)


def decode_grad(grad_c: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``∂L/∂c`` (…, n, k) → the part of ``∂L/∂x`` (…, n, d) the upstream stage can act on."""
    return grad_c @ basis.to(grad_c.dtype).T


def boundary_bytes(tokens: int, k: int, coeff_bytes: int = 2, vocab_size: int = 256) -> int:
    """Bytes one boundary message carries for ``tokens`` tokens: k coefficients plus the token id each."""
    return tokens * (k * coeff_bytes + id_bytes(vocab_size))


def id_bytes(vocab_size: int) -> int:
    """Smallest unsigned integer width (bytes) that holds every token id of the vocabulary."""
    return 1 if vocab_size <= 2**8 else 2 if vocab_size <= 2**16 else 4
