"""The LM head and next-token cross-entropy fused, in chunks of tokens.

`linear_cross_entropy(h, W, targets)` equals `F.cross_entropy((h @ W.T).float(), targets,
ignore_index=-100)` (the mean over non-ignored tokens) without materialising the (N x V) fp32
logits: each chunk of tokens computes its logits, its loss, and at once its logit gradient
softmax - onehot, which is folded into dL/dh and dL/dW and dropped. Nothing is recomputed in
backward, which only scales the stored gradients by the incoming one: the idea of Liger Kernel's
fused linear cross-entropy (Hsu et al. 2024), here in plain torch for CPU and GPU alike.

Under bf16 autocast the matmuls run in bf16 and softmax / log-sum-exp in fp32, as the unfused
head does; dL/dW is accumulated over chunks in fp32. Deviation from the unfused loss: the chunk
sums are added in another order (differences at fp32 rounding, tested to 1e-6).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# logits per chunk (tokens x vocab): 2^22 fp32 values = 16 MiB. At pico-tiny 4 x 256 on CPU
# (bench/fused_head.py) it gave the lowest peak memory of 2^22, 2^24, 2^26 (0.48x, 0.62x, 0.78x)
CHUNK_ELEMENTS = 1 << 22


def chunk_tokens(n_tokens: int, vocab: int) -> int:
    return max(1, min(n_tokens, CHUNK_ELEMENTS // vocab))


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, cdt, need_h, need_w):
        # h (N, d), weight (V, d), targets (N,)
        n, vocab = h.shape[0], weight.shape[0]
        n_valid = (targets != IGNORE_INDEX).sum()
        hc, wc = h.to(cdt), weight.to(cdt)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        step = chunk_tokens(n, vocab)
        for s in range(0, n, step):
            hs, t = hc[s:s + step], targets[s:s + step]
            logits = (hs @ wc.T).to(total.dtype)  # (n_chunk, V), fp32
            valid = t != IGNORE_INDEX
            safe = torch.where(valid, t, 0)
            picked = logits.gather(1, safe[:, None])[:, 0]
            # log-sum-exp as torch.logsumexp computes it (max, then exp of the difference), but in place
            # over the logits, whose exp then serves the gradient: one exp pass and no (n_chunk, V) temporary
            top = logits.amax(dim=-1)
            e = logits.sub_(top[:, None]).exp_()
            z = e.sum(dim=-1)
            total += ((top + z.log() - picked) * valid).sum()
            if not (need_h or need_w):
                continue
            # d(mean loss)/dlogits = (softmax - onehot) / n_valid, zero on ignored rows; in place
            w = valid.to(e.dtype) / n_valid
            g = e.mul_((w / z)[:, None])
            g[torch.arange(g.shape[0], device=g.device), safe] -= w
            gc = g.to(cdt)
            if need_h:
                grad_h[s:s + step] = gc @ wc
            if need_w:
                if gc.dtype == grad_w.dtype:
                    grad_w.addmm_(gc.T, hs)  # in place: no (V, d) temporary per chunk
                else:
                    grad_w += (gc.T @ hs).to(grad_w.dtype)
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.need = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.need
        grad_h = saved.pop(0) * grad_out if need_h else None
        grad_w = (saved.pop(0) * grad_out).to(ctx.weight_dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None


@torch._dynamo.disable  # a Python loop over chunks: runs eagerly, the model around it may compile
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight.T against targets (ignore_index -100).
    h (N, d), weight (V, d), targets (N,). Gradients for h and weight are computed in the forward
    pass when autograd will want them."""
    grad = torch.is_grad_enabled()
    need_h, need_w = grad and h.requires_grad, grad and weight.requires_grad
    cdt = _compute_dtype(h.device, h.dtype)
    with torch.autocast(h.device.type, enabled=False):  # dtypes are chosen explicitly above
        return _LinearCrossEntropy.apply(h, weight, targets, cdt, need_h, need_w)
