"""Causal GQA attention at head dim 8 on a CPU: a C++ kernel (causal_attention.cpp), built on first use.

At the pico body's head dim of 8 torch's CPU flash kernel spends most of its time on tiny GEMMs (every
product has a dimension of 8); attention took 42% of a full-rank fp32 step and 51% of a bf16 one
(bench/README.md, pico-tiny-body). This kernel computes the same exact softmax attention on whole
64-byte vectors: forward with a block of queries in the vector lanes (no horizontal sums), backward with
the keys in them (k and v transposed and zero padded to a multiple of 16 keys, so no loop has a scalar
remainder, and one pass per block of keys does all of its work). Forward keeps the log-sum-exp per
query, backward recomputes the probabilities from it, as flash attention does. It is
tested equal to `F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)` in fp64 (outputs and
gradients) and is registered as a torch.library custom op, so `torch.compile` keeps it in its graph.

`rankscope.model.attention` calls `causal_attention` where `supported` says so: a CPU, head dim 8, fp32
or fp64, `ENABLED`. The build (torch.utils.cpp_extension with ninja and the system's C++ compiler, about
30 s once, cached under torch's extensions folder per CPU feature set) is tried once per process; where it
fails the model keeps torch's flash kernel and says so once.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from rankscope.kernels import build

ENABLED = True  # off: torch's flash kernel everywhere (tests, benches)
HEAD_DIM = 8
PAD = 16  # keys padded to a multiple of this (causal_attention.cpp's PAD)
_SOURCE = Path(__file__).with_suffix(".cpp")


def extension():
    """The compiled module, or None where it cannot be built (tried once per process)."""
    # -ffast-math lets gcc fuse and reorder the sums (timed by hand on the EPYC of 2026-12-03, fp32, forward +
    # backward of one pico-body layer: 3.2 + 4.5 ms without it, 2.2 + 3.7 with it); -fno-finite-math-only keeps
    # NaN through the kernel's selects, so a NaN in q, k or v gives NaN outputs (tested), which the NaN-loss
    # guard needs.
    return build.extension(_SOURCE, "the head-dim-8 attention kernel", "torch's flash kernel",
                           ("-ffast-math", "-fno-finite-math-only"))


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
