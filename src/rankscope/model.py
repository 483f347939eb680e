"""A LLaMA-style decoder as in Pico's pico-decoder: pre-norm RMSNorm, RoPE, SwiGLU, GQA, no biases.

Reads top to bottom: RMSNorm -> RoPE helpers -> Attention -> SwiGLU -> Block -> Decoder.
Linear names (wq, wk, wv, wo; w1 gate, w2 down, w3 up) are what methods target and what the
analysis reports; `rankscope.export` maps them to Hugging Face Llama names.

Precision: under bf16 autocast on a CPU the attention runs in fp32 (q, k, v cast up, `attention`):
CPU's flash kernel at head dim 8 is slower in bf16 than in fp32 (bench/attention_paths.py), which made
bf16 training slower than fp32, and the head-dim-8 kernel (rankscope.kernels.causal_attention) is fp32 /
fp64 only; bf16 linears with fp32 attention train faster than fp32
(bench/speedup.py; the figures: bench/README.md, "Measurements behind the code"). Where bf16 is used at all is still `train.precision: auto`'s timing.

Projections that share an input (issue 27; `project`), same maths and the same parameters (names,
shapes), tested equal to the plain per-layer path in fp64:
  FUSED_LINEARS: Q, K, V in one GEMM and the SwiGLU gate and up in one, the weights concatenated at
    forward (autograd splits the gradient back);
  GROUPED_ADAPTERS: a layer class's own `grouped_forward` (the LoRA layer: bases in one GEMM, the
    adapters' dropout masks in one draw, their A products in one bmm).
Both off: on this CPU at pico-tiny-body neither paid beyond the noise of a shared machine (0.94x and
1.00x, bench/speedup.py; bench/README.md); a quiet-machine or GPU measurement may turn them on.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rankscope.config import ModelConfig
from rankscope.kernels import causal_attention
from rankscope.losses import linear_cross_entropy

from rankscope.names import DEFAULT_TARGETS  # noqa: F401  (every linear of a block: the methods' default targets)

FUSED_LINEARS = False  # plain nn.Linear projections as one GEMM (did not pay on CPU at pico-tiny-body)
GROUPED_ADAPTERS = False  # LoRA adapters sharing an input as one group (within noise on CPU at pico-tiny-body)


def project(x: torch.Tensor, linears: list[nn.Module]) -> list[torch.Tensor]:
    """[m(x) for m in linears], as one GEMM on the concatenated weights where each m is a plain,
    hook-free, bias-free nn.Linear (the maths is the same: each output column is the same dot product),
    or by the layers' own `grouped_forward` (e.g. LoRA adapters sharing one input)."""
    if len(linears) > 1:
        kind = type(linears[0])
        if all(type(m) is kind and not m._forward_hooks and not m._forward_pre_hooks for m in linears):
            if FUSED_LINEARS and kind is nn.Linear and all(m.bias is None for m in linears):
                w = torch.cat([m.weight for m in linears])  # (sum of outs, in)
                return list(F.linear(x, w).split([m.out_features for m in linears], dim=-1))
            grouped = getattr(kind, "grouped_forward", None)
            if GROUPED_ADAPTERS and grouped is not None:
                return grouped(x, linears)
    return [m(x) for m in linears]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 for stability under bf16 autocast, as Llama does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, (max_seq_len, head_dim), in the rotate-half layout of HF Llama."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hd); rotates pairs (i, i + hd/2) by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention, q (B, nh, T, hd), k and v (B, nkv, T, hd) -> (B, nh, T, hd); query head h reads
    key/value head h // (nh / nkv) (GQA). Under CPU autocast in fp32, and fp32 out (the next linear
    casts it; see the module docstring). At head dim 8 on a CPU: rankscope.kernels.causal_attention, a
    C++ kernel (bench/attention_paths.py: about half the flash kernel's time); elsewhere, or where it cannot
    be built, torch's SDPA (on a CPU its flash kernel, which beat a bmm form and a chunked one by 1.5x, 1.9x)."""
    gqa = k.shape[1] != q.shape[1]
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return attention(q.float(), k.float(), v.float())
    if causal_attention.supported(q, k, v):  # head dim 8 on a CPU: rankscope.kernels.causal_attention
        return causal_attention.causal_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project(x, [self.wq, self.wk, self.wv])
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attention(q, k, v)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, d)
        return self.wo(y)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, [self.w1, self.w3])
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        x = x + self.mlp(self.mlp_norm(x))
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2 style: residual output projections scaled down by depth
                scale = (2 * self.cfg.n_layers) ** -0.5 if name.endswith(("wo.weight", "w2.weight")) else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V), or the mean next-token loss if targets given
        (head and loss fused in chunks of tokens: the (B*T, V) logits are never materialised)."""
        T = idx.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        h = self.norm(x)  # (B, T, d)
        if targets is None:
            return self.lm_head(h)
        return linear_cross_entropy(h.reshape(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1))

    def num_params(self, trainable_only: bool = False) -> int:
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            n += p.numel()
        return n
