"""Device and precision choice, by what the hardware does well (never assumed).

`precision: auto` picks bf16 autocast on a CUDA device with bf16 support and on CPUs whose flags
advertise native bf16 dot products (avx512_bf16 or amx_bf16); elsewhere fp32. On AVX2-only CPUs a
bf16 matmul is ~100x slower than fp32, so the flag check matters. Master weights stay fp32.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path

import torch

from rankscope.errors import ConfigError


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"train.device={spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={spec!r} but CUDA is not available here; use train.device=cpu")
    return dev


def pick_precision(device: torch.device, spec: str) -> str:
    """'fp32' or 'bf16' (autocast with fp32 master weights)."""
    if spec != "auto":
        return spec
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "device": str(device), "python": platform.python_version(), "machine": platform.machine(),
            "cpu_bf16": cpu_has_fast_bf16(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
