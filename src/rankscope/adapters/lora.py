"""The LoRA layer: a frozen linear plus a trainable low-rank update (the peft / litgpt-sized file).

`LoRALinear(base)` returns `base(x) + (alpha / r) * B(A(dropout(x)))` with A random (kaiming-uniform,
as peft) and B zero, so a wrapped model equals the base model at step 0 and B gets a gradient at
step 1 (A from step 2, once B is non-zero). `delta_weight()` is the only place
dW = (alpha / r) * B @ A is computed, always in fp32; `merge()` adds exactly that dW to the fp32
master weight and refuses non-finite results (peft's `safe_merge`). Three exact ways to compute the
same function (`forward_path`: factored, merged, hybrid) live in rankscope.adapters.paths, and a fourth,
'dropped', for training with adapter dropout on a CPU (the factored maths as one autograd Function).

Effective-weight gradients (checkpoint.save_grads): the base weight is frozen, so autograd gives
it no gradient. At snapshot steps only, `capture_effective_grads(model, True)` makes each wrapped
layer accumulate dL/dW = sum over tokens of grad_out x^T (a hook on its output, all micro-batches),
the gradient a dense weight in its place gets, which is the gradient with respect to the effective
weight W0 + (alpha/r) B A (with adapter dropout > 0: with respect to W0, the undropped path). Ordinary
steps run the plain forward. `effective_grads(model)` returns them under `<name>.base.weight`.

State-dict keys of a wrapped layer: `<name>.base.weight`, `<name>.lora_A`, `<name>.lora_B` — the
stored format (rankscope.adapters.stored), which analysis and the Hugging Face export read.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from rankscope.adapters import paths
from rankscope.adapters.common import replace_module, seeded_generator
from rankscope.adapters.paths import _DroppedLoRA, _merged_weight, _MergedLoRA, _no_autocast, keep_mask
from rankscope.core.errors import RankscopeError
from rankscope.parallel.distributed import all_ranks_true
from rankscope.parallel.sharding import assign_, full, local, shard_of


class MergeError(RankscopeError):
    """A LoRA merge would write non-finite values into the base weight."""


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        if rank > min(base.in_features, base.out_features):
            raise RankscopeError(f"method.rank={rank} exceeds min(in, out)={min(base.in_features, base.out_features)} of a {base.out_features}x{base.in_features} linear")
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.capture_grad = False  # accumulate dL/dW of the base weight (snapshot steps only)
        self.effective_grad: torch.Tensor | None = None
        self.forward_path: str = "auto"  # 'auto' (choose_path; 'dropped' under CPU dropout), 'merged', 'hybrid' or 'factored'
        self._auto_paths: dict[tuple[int, bool], str] = {}  # choose_path by (tokens, backward)
        self.reset_adapter(generator)

    @classmethod
    def from_tensors(cls, base: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> "LoRALinear":
        """A layer around stored tensors (no global RNG drawn), with exactly the stored `scaling`."""
        lin = nn.utils.skip_init(nn.Linear, base.shape[1], base.shape[0], bias=False, device=base.device, dtype=base.dtype)
        with torch.no_grad():
            lin.weight.copy_(base)
        layer = cls(lin, lora_A.shape[0], scaling * lora_A.shape[0], generator=seeded_generator(0))
        layer.scaling = scaling
        with torch.no_grad():
            layer.lora_A.copy_(lora_A)
            layer.lora_B.copy_(lora_B)
        return layer

    @torch.no_grad()
    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """A <- kaiming-uniform(a=sqrt(5)) as peft (bound 1/sqrt(in)), B <- 0: the delta restarts at 0
        while A is random, so the next cycle learns from its first step. Drawn on the CPU so a
        given generator gives the same A on every device."""
        a = torch.empty(self.lora_A.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        assign_(self.lora_A, a)  # under FSDP each rank keeps its rows of the same draw
        self.lora_B.zero_()

    def path(self, x: torch.Tensor) -> str:
        """The form this call uses. With dropout active (its mask acts on x): 'dropped' (the factored
        maths as one autograd Function, `paths._DroppedLoRA`) for a frozen base on a CPU, unless
        `forward_path` is 'factored' (the plain autograd form: CUDA, a trainable base, tests)."""
        if isinstance(self.dropout, nn.Dropout) and self.training:
            frozen = not self.base.weight.requires_grad and (self.base.bias is None or not self.base.bias.requires_grad)
            return "dropped" if x.device.type == "cpu" and frozen and self.forward_path != "factored" else "factored"
        if self.forward_path != "auto":
            return self.forward_path
        if self.base.weight.requires_grad:  # the hybrid form gives W no gradient: only for a frozen base
            return "factored"
        backward = torch.is_grad_enabled() and (x.requires_grad or self.lora_A.requires_grad)
        key = (x.numel() // x.shape[-1], backward)
        if torch.compiler.is_compiling():  # decided once at trace time; a cache write would re-trace
            return paths.choose_path(key[0], self.base.in_features, self.base.out_features, self.rank, backward)
        if key not in self._auto_paths:  # eager: the cost model once per shape, not at every call
            self._auto_paths[key] = paths.choose_path(key[0], self.base.in_features, self.base.out_features, self.rank, backward)
        return self._auto_paths[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.path(x)
        if path == "merged":
            # exactly the same function; autograd reaches A and B through the addmm of W + s B A.
            # Under bf16 autocast F.linear casts the fp32 sum W + dW once.
            out = F.linear(x, self.delta_weight(grad=True, base=self.base.weight), self.base.bias)
        elif path == "hybrid":
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else torch.promote_types(x.dtype, self.merge_dtype())
            out = _MergedLoRA.apply(x, self.base.weight, self.base.bias, self.lora_A.to(self.merge_dtype()), self.lora_B.to(self.merge_dtype()),
                                    self.scaling, dtype)
        elif path == "dropped":  # adapter dropout on a CPU: the factored maths as one autograd Function
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.promote_types(x.dtype, self.lora_A.dtype)
            mask = self.group_masks(x, 1, self.dropout.p)[0]
            out = _DroppedLoRA.apply(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, mask, self.scaling, dtype)
        else:
            # the scale is folded into B (r columns) rather than applied to the (B, T, out) activations:
            # one full-size elementwise pass less per call. Under bf16 autocast F.linear casts the factors.
            out = self.base(x) + F.linear(F.linear(self.drop(x), self.lora_A), self.lora_B * self.scaling)
        if self.capture_grad and out.requires_grad:
            out.register_hook(partial(self._accumulate_grad, x.detach()))
        return out

    @staticmethod
    def grouped_forward(x: torch.Tensor, layers: list["LoRALinear"]) -> list[torch.Tensor]:
        """[m(x) for m in layers] for adapters that read one input (Q, K, V; the SwiGLU gate and up),
        with fewer, larger kernels and the same maths (rankscope.model.project calls it):
          factored (adapter dropout on): the frozen bases in one GEMM on their concatenated weights;
            every layer's dropout mask drawn in one call (`group_masks`: one independent mask per
            adapted linear, as peft, each element kept with probability 1 - p and scaled by 1 / (1 - p));
            the k down-projections x_i A_i^T in one bmm; then each layer's B_i (outputs differ in width);
          merged: the concatenated W_i + s_i B_i A_i in one GEMM.
        Anything else (hybrid, capture of effective gradients, biases, ranks or dtypes that differ) runs
        each layer's own forward."""
        paths = {"factored" if p == "dropped" else p for p in (m.path(x) for m in layers)}  # grouped: its own masks
        l0 = layers[0]
        plain = (len(paths) > 1 or paths == {"hybrid"} or any(m.capture_grad or m.base.bias is not None for m in layers)
                 or len({(m.rank, m.base.in_features, m.base.weight.dtype, type(m.dropout)) for m in layers}) > 1
                 or (paths == {"factored"} and isinstance(l0.dropout, nn.Dropout) and len({m.dropout.p for m in layers}) > 1))
        if plain:
            return [m(x) for m in layers]
        outs = [m.base.out_features for m in layers]
        if paths == {"merged"}:
            w = torch.cat([m.delta_weight(grad=True, base=m.base.weight) for m in layers])  # (sum outs, in)
            return list(F.linear(x, w).split(outs, dim=-1))
        lead, d = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d)  # (N, in)
        base = F.linear(x2, torch.cat([m.base.weight for m in layers])).split(outs, dim=-1)  # frozen: no dW
        active = isinstance(l0.dropout, nn.Dropout) and l0.training
        xs = x2.unsqueeze(0) * LoRALinear.group_masks(x2, len(layers), l0.dropout.p) if active else x2.unsqueeze(0)  # (k, N, in)
        a = torch.stack([m.lora_A for m in layers])  # (k, r, in)
        h = torch.matmul(xs, a.transpose(1, 2))  # (k, N, r); under autocast cast as F.linear casts
        return [(o + F.linear(h[i], m.lora_B * m.scaling)).view(*lead, n) for i, (o, m, n) in enumerate(zip(base, layers, outs))]

    @staticmethod
    def group_masks(x: torch.Tensor, k: int, p: float) -> torch.Tensor:
        """k independent inverted-dropout masks for x, (k, *x.shape) in x's dtype: 0 with probability
        p, else 1 / (1 - p) (`paths.keep_mask`: nn.Dropout's distribution at fp32 resolution whatever
        x's dtype), one call for all k from the global generator (so resume stays bit-exact)."""
        return keep_mask((k, *x.shape), p, x.dtype, x.device, scale=1.0 / (1.0 - p))

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """Inverted dropout with nn.Dropout's distribution while training: each element kept with
        probability 1 - p and scaled by 1 / (1 - p). On a CPU the mask comes from `group_masks`, about
        half the time of `F.dropout`'s bernoulli_ (bench/lora_paths.py --dropout); that stream differs
        from nn.Dropout's but comes from the same global generator, so resume stays bit-exact. On CUDA
        `F.dropout` itself (its kernel is fused)."""
        if not (isinstance(self.dropout, nn.Dropout) and self.training):
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.dropout.p, training=True)
        return x * self.group_masks(x, 1, self.dropout.p)[0]

    def _accumulate_grad(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """dL/dW += grad_out^T x over the (B*T) tokens, in fp32 (or wider): what F.linear's backward
        would give the base weight if it were trainable. Leaves the gradient flowing on untouched."""
        dt = torch.promote_types(g.dtype, self.merge_dtype())
        with torch.autocast(g.device.type, enabled=False):
            gw = g.reshape(-1, g.shape[-1]).to(dt).T @ x.reshape(-1, x.shape[-1]).to(dt)  # (out, in)
        self.effective_grad = gw if self.effective_grad is None else self.effective_grad + gw

    def merge_dtype(self) -> torch.dtype:
        """fp32, or the master weight's dtype where it is wider (float64 in exactness tests)."""
        return torch.promote_types(self.base.weight.dtype, torch.float32)

    def delta_weight(self, grad: bool = False, base: torch.Tensor | None = None) -> torch.Tensor:
        """dW = (alpha / r) * B @ A, (out, in), in fp32 — the only place it is computed; with `base`,
        base + dW in one addmm (the merged forward's W'). Always the full matrix: under FSDP the thin
        factors are all-gathered first (collective). With `grad` (the merged forward) the factors stay
        in the autograd graph: inside forward FSDP has already unsharded them, so nothing is gathered
        (`base` is only for that case: with `grad=False` under FSDP a local shard of W would meet full factors)."""
        dt = self.merge_dtype()
        b, a = (self.lora_B, self.lora_A) if grad else (full(self.lora_B), full(self.lora_A))
        with _no_autocast(a.device.type):
            if base is not None:
                return _merged_weight(base, b.to(dt), a.to(dt), self.scaling)
            return self.scaling * (b.to(dt) @ a.to(dt))

    def delta_factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaling * B, A), detached, in `dtype`: dW = their product, for factored spectra."""
        return full(self.lora_B).detach().to(dtype) * self.scaling, full(self.lora_A).detach().to(dtype)

    def effective_weight(self) -> torch.Tensor:
        """The dense weight this layer applies: W + dW, fp32 (full, also under FSDP)."""
        return full(self.base.weight).to(self.merge_dtype()) + self.delta_weight()

    @torch.no_grad()
    def merge(self, delta: torch.Tensor | None = None) -> None:
        """W <- W + dW in fp32 on the master weight (ReLoRA §3); `delta` is this layer's
        `delta_weight()` where the caller already has it. Does not touch A or B. Under FSDP each
        rank adds its rows of dW to its shard of W; a non-finite result on any rank stops all."""
        w = self.base.weight
        delta = self.delta_weight() if delta is None else delta
        merged = local(w).to(self.merge_dtype()) + shard_of(delta, w)
        if not all_ranks_true(bool(torch.isfinite(merged).all()), merged.device):
            raise MergeError("LoRA merge produced non-finite weights; lower train.lr or check the adapter (the last good checkpoint is kept)")
        local(w).copy_(merged.to(w.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling}, forward_path={self.forward_path}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear by module name (e.g. `blocks.0.attn.wq`), in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def capture_effective_grads(model: nn.Module, on: bool) -> None:
    """Start (on) or stop capturing every wrapped layer's effective-weight gradient; both clear it."""
    for m in lora_modules(model).values():
        m.capture_grad, m.effective_grad = on, None


def effective_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """The captured gradients by state-dict key `<name>.base.weight` (this process's, not yet reduced)."""
    return {f"{name}.base.weight": m.effective_grad for name, m in lora_modules(model).items() if m.effective_grad is not None}


def adapter_generator(seed: int, cycle: int, index: int) -> torch.Generator:
    """Generator of layer `index`'s A in `cycle` (0: at wrap; k: after the k-th merge)."""
    return seeded_generator(seed, 1, cycle, index)


def wrap_layers(model: nn.Module, ranks: dict[str, int], scaling: float, dropout: float, seed: int, cycle: int) -> dict[str, LoRALinear]:
    """(Re)place each named layer (an nn.Linear, or a LoRALinear whose base is kept) by a LoRALinear
    of the given rank and the common `scaling` (alpha_i = scaling * r_i); layer index = position in
    `ranks` (model order), as ReLoRA's restarts use."""
    for index, (name, rank) in enumerate(ranks.items()):
        m = model.get_submodule(name)
        base = m.base if isinstance(m, LoRALinear) else m
        replace_module(model, name, LoRALinear(base, int(rank), scaling * int(rank), dropout, adapter_generator(seed, cycle, index)))
    return lora_modules(model)


def wrap_linears(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, seed: int) -> dict[str, LoRALinear]:
    """Replace each nn.Linear whose attribute name is in `targets` by a LoRALinear wrapping it."""
    found = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets and not isinstance(m, LoRALinear)]
    if not found:
        raise RankscopeError(f"method.targets={targets} matches no linear layer; valid names: wq, wk, wv, wo, w1, w2, w3")
    return wrap_layers(model, {name: rank for name in found}, alpha / rank, dropout, seed, 0)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]
