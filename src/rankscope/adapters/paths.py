"""The LoRA layer's fast forward paths: the FLOP cost model that picks one (`choose_path`), the
'hybrid' path's custom autograd Function (`_MergedLoRA`), and the factored form with adapter dropout
as one (`_DroppedLoRA`, with its mask from `keep_mask`). All compute the same function as the factored
form `base(x) + s B A drop(x)`; rankscope.adapters.lora.LoRALinear calls them.

  factored  the plain form; the only one with adapter dropout (its mask acts on x alone). On a CPU,
            with dropout active, it runs as `_DroppedLoRA`: the same six thin products, with the base
            and adapter outputs summed in one addmm, no autograd node per elementwise step, and a
            mask drawn at 24-bit resolution in one vectorised pass (`keep_mask`);
  merged    `F.linear(x, W + dW)`: one dense matmul forward and one for the input gradient, as a
            full-rank layer; autograd then forms the dense dW' = g^T x (which full-rank training
            computes too) and derives dA, dB from it with two thin (out x in x r) products;
  hybrid    the merged forward and input gradient, with dA = s (g B)^T x and dB = s g^T (x A^T) from
            four thin products over the tokens instead of the dense dW' (`_MergedLoRA`): the frozen
            weight's gradient, a third of a full-rank layer's FLOPs, is never formed.
With dropout off (p = 0, or eval mode) `choose_path` picks merged or hybrid per layer and per call
by a FLOP cost model (thin matmuls weighted by THIN_PENALTY, calibrated on CPU by
bench/lora_paths.py): hybrid pays where in x out >> r (in + out): mini's q/o and FFN linears,
pico-tiny's FFN linears and every linear of pico-small. A trainable base weight (not the case in any
shipped method) is never hybrid.
"""

from __future__ import annotations

import contextlib
import math
import struct

import torch
import torch.nn.functional as F

from rankscope.kernels import dropout_mask

# A thin matmul (one dimension r) runs at a fraction of a dense matmul's FLOP rate: fitted from
# bench/lora_paths.py, fwd+bwd of one layer at the adapted shapes of micro, mini, pico-tiny and pico-small
# (the fit, its machine and how often it picks the faster path: bench/README.md, "Measurements behind the code").
THIN_PENALTY = 2.0


def choose_path(tokens: int, d_in: int, d_out: int, rank: int, backward: bool = True) -> str:
    """'merged', 'hybrid' or 'factored', whichever the FLOP cost model says is cheapest with dropout
    off (the frozen W's forward matmul and input gradient are common to all and left out).
    With a backward pass:
      merged: W' = W + sBA, dense dW' = g^T x (2 N in out) and dA, dB from it (6 r in out in all);
      hybrid: W' (2 r in out) and four thin products over the tokens for dA, dB (4 N r (in + out));
      factored: six thin products (6 N r (in + out)), no W'; it wins only for few tokens.
    Forward only (evaluation): merged builds W' (2 r in out); factored runs 2 N r (in + out), thin."""
    thin = THIN_PENALTY * 2 * tokens * rank * (d_in + d_out)
    if backward:
        costs = {"merged": 2 * tokens * d_in * d_out + 6 * rank * d_in * d_out,
                 "hybrid": 2 * thin + 2 * rank * d_in * d_out, "factored": 3 * thin}
    else:
        costs = {"merged": 2 * rank * d_in * d_out, "factored": thin}
    return min(costs, key=costs.get)  # ties: the first (merged)


def _no_autocast(device_type: str):
    """Autocast off (a bf16 region would silently run fp32 arithmetic in bf16); a no-op context
    where it is off already, so the fp32 step pays nothing for it."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else contextlib.nullcontext()


def _merged_weight(base: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor, scaling: float) -> torch.Tensor:
    """W' = base + scaling * B @ A in one addmm, in the factors' dtype (fp32 or wider): the arithmetic
    of `LoRALinear.delta_weight(base=...)` and of the hybrid path's forward. Autocast must be off."""
    return torch.addmm(base.to(lora_A.dtype), lora_B, lora_A, alpha=scaling)


class _MergedLoRA(torch.autograd.Function):
    """The 'hybrid' path: y = x (W + s B A)^T + bias with the merged form's two dense matmuls (forward,
    input gradient) and dA, dB from thin products over the tokens; the frozen W and bias get no
    gradient. `dtype` is the compute dtype (autocast's, else the inputs'); W' is formed in fp32
    (`_merged_weight`, inside the function: no autograd node for it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dtype: torch.dtype):
        with _no_autocast(x.device.type):
            w = _merged_weight(weight, lora_B, lora_A, scaling).to(dtype)
            xc = x.to(dtype)
            out = F.linear(xc, w, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(xc, w, lora_A, lora_B)
        ctx.scaling, ctx.x_dtype = scaling, x.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        xc, w, lora_A, lora_B = ctx.saved_tensors
        with _no_autocast(g.device.type):
            g = g.to(w.dtype)
            g2, x2 = g.reshape(-1, g.shape[-1]), xc.reshape(-1, xc.shape[-1])
            gx = (g @ w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
            ga = gb = None
            if ctx.needs_input_grad[3]:  # dA = s (g B)^T x  (r x in)
                ga = torch.mm((g2 @ lora_B.to(w.dtype)).t(), x2).to(lora_A.dtype).mul_(ctx.scaling)
            if ctx.needs_input_grad[4]:  # dB = s g^T (x A^T)  (out x r)
                gb = torch.mm(g2.t(), x2 @ lora_A.to(w.dtype).t()).to(lora_B.dtype).mul_(ctx.scaling)
        return gx, None, None, ga, gb, None, None


_FIELD = (1 << 24) - 1  # a float32 uniform draw is (24 random bits) / 2^24 (ATen's uniform_real_distribution)


def keep_mask(shape: tuple[int, ...], p: float, dtype: torch.dtype, device: torch.device | str = "cpu",
              scale: float = 1.0) -> torch.Tensor:
    """`scale` (in `dtype`) or 0: each element kept with probability 1 - p, independently. Exactly the
    distribution of `torch.rand(shape) >= p` (fp32): that draw is u = k / 2^24 with k a uniform 24-bit
    integer, kept iff k >= ceil(float32(p) 2^24). Seeded from the global generator, so resume stays bit-exact.
    On a CPU k comes from Philox (`rankscope.kernels.dropout_mask`: one seed drawn from the generator, then
    the whole mask in one vectorised pass, k's bytes compared most significant first): dropout of a 2048 x 96
    input, forward + backward, took 0.39 ms against 0.99 ms with `rand >= p` on the EPYC of 2026-12-03
    (bench/lora_paths.py --dropout; bench/results/lora_paths_pico_tiny_body_dec03.txt, one Philox word per
    element then). Elsewhere, or where the kernel cannot be built, each int64 draw of the generator (63 random
    bits) gives two k (bits 0-23 and 32-55, as the two int32 halves of it): 0.64 ms against 0.96 ms in the same
    measurement a day earlier (bench/results/lora_paths_pico_tiny_body_quiet.txt)."""
    if dropout_mask.supported(dtype, device):
        return dropout_mask.mask(tuple(shape), _threshold(p), scale, dtype)
    n = math.prod(shape)
    k = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_().view(torch.int32)[:n]
    mask = k.bitwise_and_(_FIELD).ge_(_threshold(p)).to(dtype).view(shape)
    return mask if scale == 1.0 else mask.mul_(scale)


def _threshold(p: float) -> int:
    """The least 24-bit k whose fp32 uniform k / 2^24 is >= p, as `rand >= p` compares (p rounded to fp32)."""
    return math.ceil(struct.unpack("f", struct.pack("f", p))[0] * 2 ** 24)


class _DroppedLoRA(torch.autograd.Function):
    """The factored path with adapter dropout: y = x W^T + bias + s ((x * mask) A^T) B^T, `mask` the
    inverted-dropout mask (0 or 1 / (1 - p), x's shape and dtype). The frozen W and bias get no gradient.
    `dtype` is the compute dtype (autocast's, else the inputs'); x * mask is formed in x's dtype and then
    cast, as `F.linear` under autocast casts `drop(x)`. Forward: the base GEMM, then the adapter added by
    one addmm into its output. Backward: dB = s g^T h, dA = s (g B)^T (x * mask), dx = g W + (s (g B) A) * mask."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, mask, scaling: float, dtype: torch.dtype):
        with _no_autocast(x.device.type):
            x2 = x.reshape(-1, x.shape[-1])
            m2 = mask.reshape(x2.shape)
            xd = (x2 * m2).to(dtype)
            a, sb = lora_A.to(dtype), (lora_B * scaling).to(dtype)
            h = xd @ a.t()  # (N, r)
            w = weight.to(dtype)
            out = F.linear(x2.to(dtype), w, None if bias is None else bias.to(dtype))
            out.addmm_(h, sb.t())
        ctx.save_for_backward(w, a, sb, xd, h, m2)
        ctx.scaling, ctx.x_shape, ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = scaling, x.shape, x.dtype, lora_A.dtype, lora_B.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, g):
        w, a, sb, xd, h, m2 = ctx.saved_tensors
        gx = ga = gb = None
        with _no_autocast(g.device.type):
            g2 = g.reshape(-1, g.shape[-1]).to(a.dtype)
            if ctx.needs_input_grad[4]:  # dB = s g^T h  (out x r)
                gb = torch.mm(g2.t(), h).to(ctx.b_dtype).mul_(ctx.scaling)
            dh = g2 @ sb  # (N, r): s g B
            if ctx.needs_input_grad[3]:  # dA = (s g B)^T (x * mask)  (r x in)
                ga = torch.mm(dh.t(), xd).to(ctx.a_dtype)
            if ctx.needs_input_grad[0]:
                gx = (g2 @ w).to(ctx.x_dtype)
                gx.addcmul_((dh @ a).to(ctx.x_dtype), m2)
                gx = gx.view(ctx.x_shape)
        return gx, None, None, ga, gb, None, None, None
