"""Device choice, mixed precision and memory figures: CUDA with bf16 autocast where a GPU is, else the CPU.

``train.device`` is ``auto`` by default: the first CUDA device when torch sees one, else the CPU. An
explicit ``cuda`` / ``cuda:N`` that this machine cannot honour is an error naming the problem, never a
silent fallback to the CPU.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

import torch

from node.config import ConfigError

DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def resolve_device(spec: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' → a usable device; ConfigError when it is not usable here."""
    if not isinstance(spec, str) or not DEVICE_SPEC.match(spec):
        raise ConfigError(f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"train.device={spec!r} asks for CUDA, but {why} (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use 'cpu' or 'auto'")
    count = torch.cuda.device_count()
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= count:
        raise ConfigError(f"train.device={spec!r}: CUDA device {index} does not exist (this machine has {count}: "
                          f"cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (weights and optimizer stay fp32); plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_memory(device: torch.device) -> dict[str, Any]:
    """What a volunteer wants to know about the device's memory, in bytes.

    CUDA: tensors allocated now and at the peak (torch's allocator), the card's total and free memory.
    CPU: this process's resident memory now and at its peak (``VmRSS`` / ``VmHWM``) and the machine's
    total and available memory.
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {"device": str(device), "name": torch.cuda.get_device_name(device),
                "allocated_bytes": torch.cuda.memory_allocated(device),
                "peak_bytes": torch.cuda.max_memory_allocated(device), "total_bytes": total, "free_bytes": free}
    status = _proc_kib("/proc/self/status", ("VmRSS", "VmHWM"))
    meminfo = _proc_kib("/proc/meminfo", ("MemTotal", "MemAvailable"))
    return {"device": "cpu", "name": "cpu", "allocated_bytes": status.get("VmRSS", 0),
            "peak_bytes": status.get("VmHWM", 0), "total_bytes": meminfo.get("MemTotal", 0),
            "free_bytes": meminfo.get("MemAvailable", 0)}


def free_memory(device: torch.device) -> int:
    """Bytes a new stage could still take on ``device`` (free card memory; available host memory)."""
    return int(device_memory(device)["free_bytes"])


def _proc_kib(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    """``key: N kB`` lines of a /proc file, in bytes (empty where /proc is not there)."""
    out: dict[str, int] = {}
    try:
        with open(path) as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in keys:
                    out[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out
