"""The LoRA layer's fast forward paths: the FLOP cost model that picks one (`choose_path`), and the
'hybrid' path's custom autograd Function (`_MergedLoRA`). All three paths compute the same function as
the factored form `base(x) + s B A x`; rankscope.adapters.lora.LoRALinear calls them.

  factored  the plain form; the only one with adapter dropout (its mask acts on x alone);
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

import torch
import torch.nn.functional as F

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
