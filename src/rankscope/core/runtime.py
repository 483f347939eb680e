"""Device and precision choice, by what the hardware does well (never assumed).

`pick_precision(device, "auto")` is the static choice: bf16 autocast on a CUDA device with bf16
support and on CPUs whose flags advertise native bf16 dot products (avx512_bf16 or amx_bf16);
elsewhere fp32 (on AVX2-only CPUs a bf16 matmul is ~100x slower). Flags say what a CPU can do, not
what is fastest for a given model: runs long enough to repay it time both candidates instead
(rankscope.train.autotune), and only shorter runs use this static choice. Master weights stay fp32.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path

import torch

from rankscope.core.errors import ConfigError


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


def pick_device(spec: str, local_rank: int | None = None, what: str = "train.device") -> torch.device:
    """`local_rank` (torchrun) picks cuda:LOCAL_RANK when the device is CUDA; `what` names the option in errors."""
    if spec in ("auto", "cuda") and local_rank is not None and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"{what}={spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}={spec!r} but CUDA is not available here; use {what}=cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{what}={spec!r}: only cpu and cuda devices are supported; use auto, cpu, cuda or cuda:N")
    return dev


def pick_precision(device: torch.device, spec: str) -> str:
    """'fp32' or 'bf16' (autocast with fp32 master weights): the static choice, used where `auto` is not
    timed (short runs, torchrun; rankscope.train.autotune times the rest). bf16 on a GPU that supports it;
    fp32 on a CPU, whatever its flags say: bf16 autocast is not reliably faster on CPUs with bf16
    instructions and far slower on those without (bench/README.md, "Measurements behind the code")."""
    if spec != "auto":
        return spec
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


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


# dense peak FLOP/s of known GPUs (vendor datasheets, no sparsity), for MFU
GPU_PEAKS = {"H100": {"bf16": 989e12, "fp32": 67e12}, "H200": {"bf16": 989e12, "fp32": 67e12},
             "A100": {"bf16": 312e12, "fp32": 19.5e12}, "L4": {"bf16": 121e12, "fp32": 30e12}}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's peak for `precision`, where known (GPUs by name); None on CPUs, whose peak
    bench/throughput.py measures instead of guessing."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAKS.items():
        if key in name:
            return peaks[precision]
    return None


def flops_per_token(n_params: int, vocab_size: int, d_model: int, n_layers: int, seq_len: int) -> int:
    """Training FLOPs per token (PaLM appendix B): 6 N for the non-embedding weights, forward and
    backward, plus 12 L d T for attention's scores and values. The V x d token embedding (a lookup) is left
    out; with tied embeddings that also leaves out the output projection's matmul (an undercount)."""
    return 6 * n_params - 6 * vocab_size * d_model + 12 * n_layers * d_model * seq_len


def mfu(tokens_per_s: float, per_token: float, peak: float, world_size: int = 1) -> float:
    """Model FLOPs utilisation: the model FLOP/s achieved over all ranks' peak (rankscope.core.runtime.peak_flops)."""
    return tokens_per_s * per_token / (peak * world_size)
