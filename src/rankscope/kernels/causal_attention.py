"""Causal GQA attention at head dim 8 on a CPU: a C++ kernel (causal_attention.cpp), built on first use.

At the pico body's head dim of 8 torch's CPU flash kernel spends most of its time on tiny GEMMs (every
product has a dimension of 8); attention took 42% of a full-rank fp32 step and 51% of a bf16 one
(bench/README.md, pico-tiny-body). This kernel computes the same exact softmax attention over whole
64-byte vectors of keys (k and v transposed and zero padded to a multiple of 16 keys, so no loop has a
scalar remainder, and one pass per block of keys does all of its work): forward keeps the log-sum-exp
per query, backward recomputes the probabilities from it, as flash attention does. It is
tested equal to `F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)` in fp64 (outputs and
gradients) and is registered as a torch.library custom op, so `torch.compile` keeps it in its graph.

`rankscope.model.attention` calls `causal_attention` where `supported` says so: a CPU, head dim 8, fp32
or fp64, `ENABLED`. The build (torch.utils.cpp_extension with ninja and the system's C++ compiler, about
30 s once, cached under torch's extensions folder per CPU feature set) is tried once per process; where it
fails the model keeps torch's flash kernel and says so once.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ENABLED = True  # off: torch's flash kernel everywhere (tests, benches)
HEAD_DIM = 8
PAD = 16  # keys padded to a multiple of this (causal_attention.cpp's PAD)
_SOURCE = Path(__file__).with_suffix(".cpp")
_state: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def extension():
    """The compiled module, or None where it cannot be built (tried once per process)."""
    if "ext" not in _state:
        _state["ext"] = None
        try:
            from torch.utils.cpp_extension import _get_build_directory, load

            # -march=native: named per CPU feature set, so a cache shared by different machines never
            # hands one of them code for instructions it lacks. -ffast-math lets gcc fuse and reorder the
            # sums (without it: 3.2 + 4.5 against 2.2 + 3.7 ms forward + backward per layer, fp32, on the
            # EPYC of 2026-12-03); -fno-finite-math-only keeps NaN through the kernel's selects, so a NaN
            # in q, k or v gives NaN outputs (tested), which the NaN-loss guard needs.
            name = f"rankscope_causal_attention_{hashlib.sha1(_cpu_flags().encode()).hexdigest()[:10]}"
            if not (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists():
                print("rankscope: building the head-dim-8 attention kernel (once per machine, about 30 s)", file=sys.stderr, flush=True)
            _state["ext"] = load(name=name, sources=[str(_SOURCE)], verbose=False,
                                 extra_cflags=["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only"])
        except Exception as e:  # no compiler or ninja: the flash kernel, said once
            warnings.warn(f"rankscope: the head-dim-8 attention kernel could not be built ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}); using torch's flash kernel", stacklevel=2)
    return _state["ext"]


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (ENABLED and q.device.type == "cpu" and q.shape[-1] == HEAD_DIM and q.dtype in (torch.float32, torch.float64)
            and k.dtype == v.dtype == q.dtype and q.shape[1] % k.shape[1] == 0 and extension() is not None)


@torch.library.custom_op("rankscope::causal_attention_fwd", mutates_args=())
def _fwd(q: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = extension().fwd(q, kt, vt, scale)
    return o, lse


@_fwd.register_fake
def _(q, kt, vt, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:-1])


@torch.library.custom_op("rankscope::causal_attention_bwd", mutates_args=())
def _bwd(q: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dkt, dvt = extension().bwd(q, kt, vt, o, lse, do, scale)
    return dq, dkt, dvt


@_bwd.register_fake
def _(q, kt, vt, o, lse, do, scale):
    return torch.empty_like(q), torch.empty_like(kt), torch.empty_like(vt)


def _setup_context(ctx, inputs, output):
    q, kt, vt, scale = inputs
    ctx.save_for_backward(q, kt, vt, *output)
    ctx.scale = scale


def _backward(ctx, do, dlse):
    q, kt, vt, o, lse = ctx.saved_tensors
    dq, dkt, dvt = _bwd(q, kt, vt, o, lse, do.contiguous(), ctx.scale)
    return dq, dkt, dvt, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(8) + causal mask) v; q (B, H, T, 8), k and v (B, KV, T, 8), H a multiple of KV."""
    o, _ = _fwd(q.contiguous(), _keys_major(k), _keys_major(v), HEAD_DIM ** -0.5)
    return o


def _keys_major(k: torch.Tensor) -> torch.Tensor:
    """k (B, KV, T, 8) as the kernel reads it: (B, KV, 8, Tp), contiguous, zero padded to Tp a multiple of
    PAD (autograd through the pad hands back the gradient of the first T columns)."""
    kt = k.transpose(-1, -2)
    pad = -kt.shape[-1] % PAD
    return F.pad(kt, (0, pad)).contiguous() if pad else kt.contiguous()
