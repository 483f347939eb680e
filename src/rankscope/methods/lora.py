"""LoRA: a frozen linear plus a trainable low-rank update, and the `lora` method (no restarts).

`LoRALinear(base)` returns `base(x) + (alpha / r) * B(A(dropout(x)))` with A random (kaiming-uniform,
as peft) and B zero, so a wrapped model equals the base model at step 0 and B gets a gradient at
step 1 (A from step 2, once B is non-zero). `delta_weight()` is the only place
dW = (alpha / r) * B @ A is computed, always in fp32; `merge()` adds exactly that dW to the fp32
master weight and refuses non-finite results (peft's `safe_merge`).

Three ways to compute the same function (`forward_path`), all exact:
  factored  the form above; the only one with adapter dropout (its mask acts on x alone);
  merged    `F.linear(x, W + dW)`: one dense matmul forward and one for the input gradient, as a
            full-rank layer; autograd then forms the dense dW' = g^T x (which full-rank training
            computes too) and derives dA, dB from it with two thin (out x in x r) products;
  hybrid    the merged forward and input gradient, with dA = s (g B)^T x and dB = s g^T (x A^T) from
            four thin products over the tokens instead of the dense dW' (`_MergedLoRA`): the frozen
            weight's gradient, a third of a full-rank layer's FLOPs, is never formed.
With dropout off (p = 0, or eval mode) `choose_path` picks merged or hybrid per layer and per call
by a FLOP cost model (thin matmuls weighted by THIN_PENALTY, calibrated on CPU by
bench/lora_paths.py): hybrid pays where in x out >> r (in + out): mini's q/o and FFN linears,
pico-tiny's FFN linears and every linear of pico-small. A trainable base weight (not the case in any shipped method) is never hybrid.

Effective-weight gradients (checkpoint.save_grads): the base weight is frozen, so autograd gives
it no gradient. At snapshot steps only, `capture_effective_grads(model, True)` makes each wrapped
layer accumulate dL/dW = sum over tokens of grad_out x^T (a hook on its output, all micro-batches),
the gradient a dense weight in its place gets, which is the gradient with respect to the effective
weight W0 + (alpha/r) B A (with adapter dropout > 0: with respect to W0, the undropped path). Ordinary
steps run the plain forward. `effective_grads(model)` returns them under `<name>.base.weight`.

State-dict keys of a wrapped layer: `<name>.base.weight`, `<name>.lora_A`, `<name>.lora_B` — the
analysis and the Hugging Face export rely on these names and on `delta_weight` / `effective_weight`.

ReLoRA (Lialin et al. 2023) trains embeddings, norms and the LM head full-rank; only the targeted
linears get adapters. An optional full-rank warm start trains everything for `warm_start_steps`
before the adapters are attached (`after_step` then asks the training loop to rebuild the optimiser).

Each checkpoint's method state holds every adapted layer's rank and scaling (`adapters`), so a
model is rebuilt from the checkpoint alone and `merged_state_dict` merges any of them exactly.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from rankscope.config import check, option
from rankscope.train.distributed import all_ranks_true
from rankscope.core.errors import CheckpointError, ConfigError, RankscopeError
from rankscope.methods.base import Method, Notify, StepEvents
from rankscope.methods.common import replace_module, seeded_generator
from rankscope.optim import build_adamw, check_coverage, optimizer_state_bytes, param_groups
from rankscope.train.sharding import assign_, full, local, shard_of

__all__ = ["LoRAConfig", "LoRALinear", "LoRAMethod", "MergeError", "seeded_generator", "lora_modules", "merged_state_dict"]

DEFAULT_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


@dataclass
class LoRAConfig:
    rank: int = option(16, "LoRA rank r")
    alpha: float = option(32.0, "LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = option(0.1, "dropout on the LoRA input")
    targets: list[str] = option(DEFAULT_TARGETS, "linear layers that get adapters (by name)")
    warm_start_steps: int = option(0, "full-rank steps before switching to adapters")

    def validate(self) -> None:
        check(self.rank > 0 and self.alpha > 0, "method.rank and method.alpha must be positive")
        check(0 <= self.dropout < 1, f"method.dropout={self.dropout} must be in [0, 1)")
        check(self.warm_start_steps >= 0, f"method.warm_start_steps={self.warm_start_steps} must be >= 0")


class MergeError(RankscopeError):
    """A LoRA merge would write non-finite values into the base weight."""


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
        self.forward_path: str = "auto"  # 'auto' (choose_path), 'merged', 'hybrid' or 'factored'
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
        """The form this call uses: factored whenever dropout is active (its mask acts on x)."""
        if isinstance(self.dropout, nn.Dropout) and self.training:
            return "factored"
        if self.forward_path != "auto":
            return self.forward_path
        if self.base.weight.requires_grad:  # the hybrid form gives W no gradient: only for a frozen base
            return "factored"
        backward = torch.is_grad_enabled() and (x.requires_grad or self.lora_A.requires_grad)
        key = (x.numel() // x.shape[-1], backward)
        if torch.compiler.is_compiling():  # decided once at trace time; a cache write would re-trace
            return choose_path(key[0], self.base.in_features, self.base.out_features, self.rank, backward)
        if key not in self._auto_paths:  # eager: the cost model once per shape, not at every call
            self._auto_paths[key] = choose_path(key[0], self.base.in_features, self.base.out_features, self.rank, backward)
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
        paths = {m.path(x) for m in layers}
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
        p, else 1 / (1 - p), from uniform draws (fp32 where x is half precision, whose draws would be
        coarse), one call for all k from the global generator (so resume stays bit-exact)."""
        dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        keep = torch.rand((k, *x.shape), dtype=dt, device=x.device) >= p
        return keep.to(x.dtype).mul_(1.0 / (1.0 - p))

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """Inverted dropout with nn.Dropout's distribution while training: each element kept with
        probability 1 - p and scaled by 1 / (1 - p). For an fp32 input on a CPU the mask is drawn as
        uniform >= p, about 0.8x the time of `F.dropout`'s bernoulli_ (bench/lora_paths.py --dropout);
        that stream differs from nn.Dropout's but comes from the same global generator, so resume stays
        bit-exact. Elsewhere (CUDA's fused kernel, a bf16 input, whose uniform draws would be coarse)
        `F.dropout` itself."""
        if not (isinstance(self.dropout, nn.Dropout) and self.training):
            return x
        p = self.dropout.p
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return F.dropout(x, p, training=True)
        keep = (torch.rand_like(x) >= p).to(x.dtype).mul_(1.0 / (1.0 - p))
        return x * keep

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


# --------------------------------------------------------------------------- per-layer adapter facts
def adapter_layout(model: nn.Module) -> dict[str, dict[str, float]]:
    """{module name: {"rank": r, "scaling": alpha / r}} of every LoRALinear: saved in each
    checkpoint's method state (`adapters`), so a checkpoint is read without its config's rank."""
    return {name: {"rank": m.rank, "scaling": m.scaling} for name, m in lora_modules(model).items()}


def merged_state_dict(state: dict[str, torch.Tensor], adapters: dict[str, dict[str, float]]) -> dict[str, torch.Tensor]:
    """A plain dense state dict from a stored one: each layer of `adapters` ({name: {rank,
    scaling}}, `adapter_layout`) stored as `<name>.base.weight` + `lora_A` + `lora_B` becomes
    `<name>.weight` = its LoRALinear's `effective_weight()` (fp32: W + delta_weight()); other
    tensors pass through. The one merge analysis and export use."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, facts in adapters.items():
        keys = {k: next((c for c in (f"{name}.{k}", f"{name}.{k}.weight") if c in state), None) for k in ("base.weight", "lora_A", "lora_B")}
        if None in keys.values():
            raise CheckpointError(f"{name} is listed as a LoRA layer but the checkpoint lacks its base weight or lora_A/lora_B factors")
        base, a, b = (state[keys[k]] for k in ("base.weight", "lora_A", "lora_B"))
        rank = int(facts["rank"])
        if a.shape != (rank, base.shape[1]) or b.shape != (base.shape[0], rank):
            raise CheckpointError(f"{name}: LoRA factors A {tuple(a.shape)} and B {tuple(b.shape)} do not fit rank {rank} "
                                  f"on the {tuple(base.shape)} base weight")
        layer = LoRALinear.from_tensors(base, a, b, float(facts["scaling"]))
        out[f"{name}.weight"] = layer.effective_weight()
        used |= set(keys.values())
        if f"{name}.base.bias" in state:
            out[f"{name}.bias"] = state[f"{name}.base.bias"]
            used.add(f"{name}.base.bias")
    for key, t in state.items():
        if key in used:
            continue
        if ".lora_" in key or ".base." in key:
            raise CheckpointError(f"checkpoint tensor {key} is an adapter without its base weight or rank; cannot merge it")
        out[key] = t
    return out


def update_factors(state: dict[str, torch.Tensor], adapters: dict[str, dict[str, float]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (scaling * B, A)} in fp32: the thin factors of each layer's delta_weight(), for
    factored spectra (dW = (scaling B) A)."""
    return {n: (state[f"{n}.lora_B"].float() * float(f["scaling"]), state[f"{n}.lora_A"].float()) for n, f in adapters.items()}


def stored_adapters(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per-layer rank and scaling of a checkpoint: its `adapters` metadata, or (checkpoints written
    before it existed) the config's alpha / method.rank for every stored lora_A, whose rank must then
    be method.rank (adaptive runs: any rank, scaling alpha / method.rank, as they train)."""
    if isinstance(meta.get("adapters"), dict) and meta["adapters"]:
        return meta["adapters"]
    stored = {k.rsplit(".lora_A", 1)[0]: int(t.shape[0]) for k, t in state.items() if k.endswith((".lora_A", ".lora_A.weight"))}
    if not stored:
        return {}
    from rankscope.config import method_options

    cfg = meta.get("config") or {}
    method = method_options(cfg.get("method") or {})
    rank, alpha = method.get("rank"), method.get("alpha")
    if rank is None or alpha is None:
        raise CheckpointError("the checkpoint holds LoRA factors but its config has no method.rank / method.alpha")
    if (cfg.get("method") or {}).get("name") != "adaptive" and set(stored.values()) != {int(rank)}:
        raise CheckpointError(f"the checkpoint's LoRA factors have rank {sorted(set(stored.values()))} but its config says method.rank={rank}")
    return {n: {"rank": r, "scaling": float(alpha) / float(rank)} for n, r in stored.items()}


class LoRAMethod(Method):
    """LoRA on the targeted linears; embeddings, norms and the LM head trained full-rank."""

    name = "lora"
    config_class = LoRAConfig
    memory_knob = "rank"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.switched = False  # adapters attached (immediately unless warm_start_steps > 0)

    @classmethod
    def check_run(cls, cfg) -> None:
        if cfg.train.parallel == "fsdp" and cfg.method.options.warm_start_steps > 0:
            raise ConfigError(f"train.parallel=fsdp does not support a ReLoRA warm start (method.{cls.name}.warm_start_steps > 0); "
                              f"use train.parallel=ddp or method.{cls.name}.warm_start_steps=0")
        super().check_run(cfg)

    @classmethod
    def check_schedule(cls, cfg) -> None:
        warm, steps = cfg.method.options.warm_start_steps, cfg.train.max_steps
        if warm >= steps:
            raise ConfigError(f"method.{cls.name}.warm_start_steps={warm} covers the whole {steps}-step run: no step trains the "
                              f"adapters; lower method.{cls.name}.warm_start_steps below {steps} (e.g. {steps // 10}) "
                              "or use method.name=full")

    # ------------------------------------------------------------------ model and optimiser
    def prepare_model(self, model: nn.Module) -> None:
        # adapters now, unless a warm start comes first (or a loaded state says it is already over)
        if self.config.warm_start_steps == 0 or self.switched:
            self.attach(model)

    def attach(self, model: nn.Module) -> None:
        c = self.config
        wrap_linears(model, c.targets, c.rank, c.alpha, c.dropout, self.cfg.train.seed)
        self.switched = True

    def build_optimizer(self, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
        lora = lora_parameters(model)
        groups = param_groups(model, self.cfg.train.weight_decay, exclude={id(p) for p in lora})
        if lora:
            # ReLoRA decays the adapter factors like any 2-D weight; a separate group makes the
            # LoRA state easy to find for resets and reports
            groups.append({"params": lora, "weight_decay": self.cfg.train.weight_decay, "name": "lora"})
        check_coverage(model, groups)
        return build_adamw(groups, self.cfg.train, device)

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, notify: Notify | None = None) -> StepEvents:
        """After `warm_start_steps` full-rank steps, attach adapters and ask for a new optimiser
        (parameters that stay trainable, embeddings, norms, head, keep their AdamW state)."""
        if self.switched or step < self.config.warm_start_steps:
            return StepEvents({})
        self.attach(model)
        return StepEvents({}, rebuild_optimizer=True)

    # ------------------------------------------------------------------ bookkeeping
    def state_dict(self) -> dict[str, Any]:
        return {"switched": self.switched}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.switched = bool(state.get("switched", self.switched))

    def report(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        lora_ids = {id(p) for p in lora_parameters(model)}
        lora_state = sum(t.numel() * t.element_size() for p, s in optimizer.state.items() if id(p) in lora_ids
                         for t in s.values() if torch.is_tensor(t))
        return {"method": self.name, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "lora_params": sum(p.numel() for p in lora_parameters(model)), "adapted_layers": len(lora_modules(model)),
                "optimizer_state_bytes": optimizer_state_bytes(optimizer), "lora_optimizer_state_bytes": lora_state}


METHODS = [LoRAMethod]
