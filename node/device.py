"""Device choice and mixed precision: CPU by default, CUDA with bf16 autocast where a GPU exists."""

from __future__ import annotations

import contextlib

import torch

from node.config import ConfigError


def resolve_device(spec: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' → a usable device; a CUDA request without CUDA is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={spec!r} but this torch build sees no CUDA device (use 'cpu' or 'auto')")
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (weights and optimizer stay fp32); plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
