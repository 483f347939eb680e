"""Exact forms of causal GQA attention at the pico body's shape, forward + backward, side by side.

    .venv/bin/python bench/attention_paths.py [--batch 16] [--seq 128] [--heads 12] [--kv-heads 4] [--head-dim 8] [--rounds 3]

Forms (all the same function; the max deviation from the first is printed, fp64 then timed in fp32):
  flash      F.scaled_dot_product_attention(is_causal, enable_gqa): CPU's flash kernel (what the model uses);
  bmm        one baddbmm with the causal mask as bias, softmax, one bmm; the g query heads of a KV head as rows;
  chunked    flash-style by hand: per chunk of (batch, KV head) pairs that fits in cache, logsumexp saved,
             scores recomputed in backward;
  flash bf16 the flash kernel on bf16 q, k, v (what bf16 autocast gives it);
  kernel     rankscope.kernels.causal_attention (C++, head dim 8; what the model uses on a CPU since issue 27's
             second round), where it builds.
Times are median CPU seconds of this process (time.process_time) over `--reps`, best of `--rounds`.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F


class ChunkedAttention(torch.autograd.Function):
    """q (N, gT, hd), k, v (N, T, hd), mask (gT, T) additive; the N pairs in chunks."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, chunk):
        out, lse = torch.empty_like(q), q.new_empty(q.shape[:2])
        for i in range(0, q.shape[0], chunk):
            s = torch.baddbmm(mask, q[i:i + chunk], k[i:i + chunk].transpose(1, 2), alpha=scale)
            lse_c = torch.logsumexp(s, -1, keepdim=True)
            torch.bmm((s - lse_c).exp_(), v[i:i + chunk], out=out[i:i + chunk])
            lse[i:i + chunk] = lse_c.squeeze(-1)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, mask, out, lse = ctx.saved_tensors
        do = do.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = (do * out).sum(-1, keepdim=True)
        for i in range(0, q.shape[0], ctx.chunk):
            sl = slice(i, i + ctx.chunk)
            p = (torch.baddbmm(mask, q[sl], k[sl].transpose(1, 2), alpha=ctx.scale) - lse[sl].unsqueeze(-1)).exp_()
            torch.bmm(p.transpose(1, 2), do[sl], out=dv[sl])
            ds = p.mul_(torch.bmm(do[sl], v[sl].transpose(1, 2)).sub_(delta[sl]))
            torch.bmm(ds, k[sl], out=dq[sl]).mul_(ctx.scale)
            torch.bmm(ds.transpose(1, 2), q[sl], out=dk[sl]).mul_(ctx.scale)
        return dq, dk, dv, None, None, None


def forms(B: int, H: int, KV: int, T: int, hd: int):
    g = H // KV

    def mask(q):
        return torch.full((T, T), float("-inf"), dtype=q.dtype).triu_(1).repeat(g, 1)  # (g T, T)

    def flash(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def bmm(q, k, v):
        s = torch.baddbmm(mask(q), q.reshape(B * KV, g * T, hd), k.reshape(B * KV, T, hd).transpose(1, 2), alpha=hd ** -0.5)
        return torch.bmm(s.softmax(-1), v.reshape(B * KV, T, hd)).view(B, H, T, hd)

    def chunked(q, k, v):
        return ChunkedAttention.apply(q.reshape(B * KV, g * T, hd), k.reshape(B * KV, T, hd), v.reshape(B * KV, T, hd),
                                      mask(q), hd ** -0.5, 4).view(B, H, T, hd)

    forms = {"flash": flash, "bmm": bmm, "chunked": chunked}
    from rankscope.kernels import causal_attention as ca

    if ca.extension() is not None and hd == ca.HEAD_DIM:  # the model's CPU path at head dim 8
        forms["kernel"] = ca.causal_attention
    return forms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("batch", 16), ("seq", 128), ("heads", 12), ("kv-heads", 4), ("head-dim", 8), ("rounds", 3), ("reps", 6)):
        ap.add_argument(f"--{name}", type=int, default=default)
    args = ap.parse_args()
    torch.set_num_threads(1)
    B, H, KV, T, hd = args.batch, args.heads, args.kv_heads, args.seq, args.head_dim
    fs = forms(B, H, KV, T, hd)
    gen = torch.Generator().manual_seed(0)
    q64, k64, v64 = (torch.randn(B, h, T, hd, generator=gen, dtype=torch.float64, requires_grad=True) for h in (H, KV, KV))
    do64 = torch.randn(B, H, T, hd, generator=gen, dtype=torch.float64)
    ref = torch.autograd.grad(fs["flash"](q64, k64, v64), (q64, k64, v64), do64)
    for name, f in fs.items():
        got = torch.autograd.grad(f(q64, k64, v64), (q64, k64, v64), do64)
        print(f"{name:8s} fp64 max |grad - flash's| {max((a - b).abs().max().item() for a, b in zip(got, ref)):.1e}")

    def timed(f, q, k, v, do):
        f(q, k, v)
        ts = []
        for _ in range(args.reps):
            t0 = time.process_time()
            torch.autograd.grad(f(q, k, v), (q, k, v), do)
            ts.append(time.process_time() - t0)
        return sorted(ts)[len(ts) // 2]

    fp32 = [t.detach().float().requires_grad_() for t in (q64, k64, v64)] + [do64.float()]
    bf16 = [t.detach().bfloat16().requires_grad_() for t in (q64, k64, v64)] + [do64.bfloat16()]
    best: dict[str, float] = {}
    print(f"# B {B}, heads {H}/{KV} KV, T {T}, head dim {hd}, 1 thread, load average {os.getloadavg()[0]:.1f}")
    for _ in range(args.rounds):
        now = {name: timed(f, *fp32) for name, f in fs.items()}
        now["flash bf16"] = timed(fs["flash"], *bf16)
        for name, s in now.items():
            best[name] = min(best.get(name, float("inf")), s)
        print("  ".join(f"{n} {s * 1e3:.1f} ms" for n, s in now.items()), flush=True)
    flash = best["flash"]
    print(f"best: {', '.join(f'{n} {s * 1e3:.1f} ms ({s / flash:.2f}x flash)' for n, s in best.items())}; "
          f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
