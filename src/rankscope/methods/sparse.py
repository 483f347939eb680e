"""SO, sparse optimisation (Mrabah et al. 2025, "Sparsity Outperforms Low-Rank Projections in
Few-Shot Adaptation"), as a pretraining method: every 2-D weight of the targeted linears is updated
only on a small random support of k = round(density * numel) entries, re-drawn every
`support_every` steps, and AdamW moments exist only on that support.

The paper's two paradigms, as implemented here:
  local sparsity, global density     each step changes at most k entries of a weight ("local"),
                                     but the support moves, so over a run every entry can change
                                     ("global"); the union of supports grows towards the whole matrix
  local randomness, global importance  the support is drawn at random; at each re-draw the first
                                     moment is pruned by importance (|m|)

Exact re-draw rule (our reading of the paper, see docs/methods.md):
  with old support S (k indices) and its moments (m, v), at refresh number j
  1. I = the round(moment_keep * k) indices of S with largest |m| (torch.topk; ties by index order)
  2. R = the first k - |I| indices of a random permutation of all entries that are not in I,
         the permutation drawn on the CPU from a generator seeded by (seed, 3, j, parameter index),
         so every process and every resume draws the same support
  3. S' = sorted(I u R); for i in S' n S the moments (m_i, v_i) are carried over (entries that stay
         keep their history), entries new to the support start from m = v = 0
  The step counter (bias correction) is per parameter and is kept, as ReLoRA keeps it after a
  partial moment reset. The first draw (step 0) is R alone. Decoupled weight decay is applied on
  the support only, so entries off the support are exactly unchanged.

State of a sparse parameter: `support` (int64, k), `exp_avg`, `exp_avg_sq` (k values each, the
parameter's dtype) and `step` — plain tensors, so rankscope.checkpoint saves and resumes them
bit-exactly. With density 1.0 and no re-draw inside the run the update is AdamW's, entry for entry.
Every other parameter (embeddings, norms, head, non-targeted linears) is trained densely by AdamW
in the same optimiser.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from rankscope.methods import register_method
from rankscope.methods.base import Method
from rankscope.methods.lora import seeded_generator
from rankscope.optim import optimizer_state_bytes, targeted_groups


def support_size(numel: int, density: float) -> int:
    """k = round(density * numel), at least 1."""
    return max(1, min(numel, round(density * numel)))


def draw_support(numel: int, k: int, keep: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sorted int64 indices: `keep` plus the first k - len(keep) entries of a random permutation
    of the other indices (CPU generator: the same draw on every device)."""
    perm = torch.randperm(numel, generator=generator)
    if keep.numel():
        taken = torch.zeros(numel, dtype=torch.bool)
        taken[keep.cpu()] = True
        perm = perm[~taken[perm]]
    fresh = perm[: k - keep.numel()]
    return torch.sort(torch.cat([keep.cpu(), fresh])).values


@torch.no_grad()
def adamw_update_(value: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int,
                  lr: float, beta1: float, beta2: float, eps: float, wd: float) -> None:
    """One AdamW step (step number t >= 1) in place: torch.optim.AdamW's single-tensor arithmetic,
    in the same order (decoupled decay, lerp first moment, bias-corrected denominator)."""
    value.mul_(1 - lr * wd)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**t)
    denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
    value.addcdiv_(m, denom, value=-step_size)


def dense_adamw_(p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """Plain AdamW on a whole parameter: the groups SO and GaLore leave dense (embeddings, norms, head)."""
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1
    (beta1, beta2) = group["betas"]
    adamw_update_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"].item()), group["lr"], beta1, beta2, group["eps"], group["weight_decay"])


class SplitAdamW(torch.optim.Optimizer):
    """AdamW over param groups, where groups whose option `flag` is set take `special_step` instead
    (SO's sparse support, GaLore's projection); the loop, the step counter and the dense groups
    (embeddings, norms, head: `dense_adamw_`) are shared. Parameters are numbered in group order."""

    flag = ""

    def param_index(self) -> dict[int, int]:
        return {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def special_step(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = self.param_index()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                if group[self.flag]:
                    self.special_step(p, state, group, index[id(p)])
                else:
                    dense_adamw_(p, state, group)
        return loss


class SparseAdamW(SplitAdamW):
    """AdamW whose groups with `sparse=True` update each parameter only on a moving random support.

    Group options: lr, betas, eps, weight_decay, sparse (bool), density, support_every, moment_keep,
    seed. Parameters are numbered in group order (the index seeding their supports).
    """

    flag = "sparse"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 density: float = 1.0, support_every: int = 100, moment_keep: float = 0.0, seed: int = 0):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, sparse=False,
                        density=density, support_every=support_every, moment_keep=moment_keep, seed=seed)
        super().__init__(params, defaults)

    @torch.no_grad()
    def refresh(self, p: torch.Tensor, group: dict, index: int, refresh_no: int) -> None:
        """Re-draw the support of `p` (rule in the module docstring)."""
        state = self.state[p]
        n = p.numel()
        k = support_size(n, group["density"])
        g = seeded_generator(group["seed"], 3, refresh_no, index)
        if "support" not in state:
            support = draw_support(n, k, torch.empty(0, dtype=torch.long), g).to(p.device)
            state["support"] = support
            state["exp_avg"] = torch.zeros(k, dtype=p.dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(k, dtype=p.dtype, device=p.device)
            return
        old, m, v = state["support"], state["exp_avg"], state["exp_avg_sq"]
        n_keep = min(k, round(group["moment_keep"] * k))
        keep = old[torch.topk(m.abs(), n_keep, sorted=False).indices] if n_keep else old[:0]
        new = draw_support(n, k, keep, g).to(p.device)
        # carry (m, v) of indices in both supports; both index lists are sorted
        pos = torch.searchsorted(old, new).clamp_max(old.numel() - 1)
        stays = old[pos] == new
        m_new = torch.zeros(k, dtype=m.dtype, device=m.device)
        v_new = torch.zeros_like(m_new)
        m_new[stays], v_new[stays] = m[pos[stays]], v[pos[stays]]
        state["support"], state["exp_avg"], state["exp_avg_sq"] = new, m_new, v_new

    def special_step(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> None:
        """AdamW on the support only; the support is re-drawn every `support_every` steps."""
        done = int(state["step"].item())
        if done % group["support_every"] == 0:
            self.refresh(p, group, index, done // group["support_every"])
        idx = state["support"]
        flat = p.view(-1)
        grad, value = p.grad.reshape(-1)[idx], flat[idx]
        state["step"] += 1
        (beta1, beta2) = group["betas"]
        adamw_update_(value, grad, state["exp_avg"], state["exp_avg_sq"], done + 1, group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        flat.index_copy_(0, idx, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts every floating-point parameter's state to the parameter's dtype, which would
        # turn the int64 supports into floats: keep them aside and restore them as int64
        supports = {k: s.pop("support") for k, s in state_dict["state"].items() if "support" in s}
        try:
            super().load_state_dict(state_dict)
        finally:
            for k, s in supports.items():
                state_dict["state"][k]["support"] = s
        params = [p for g in self.param_groups for p in g["params"]]
        for k, s in supports.items():
            self.state[params[int(k)]]["support"] = s.to(device=params[int(k)].device, dtype=torch.long)


@register_method("so")
class SparseMethod(Method):
    """Targeted linears' weights: SparseAdamW on a moving support; everything else: dense AdamW."""

    def build_optimizer(self, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
        t, m = self.cfg.train, self.cfg.method
        groups = targeted_groups(model, t, m.targets, "sparse", sparse=True)
        return SparseAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, density=m.density,
                           support_every=m.support_every, moment_keep=m.moment_keep, seed=t.seed)

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        # the support is re-drawn at the start of the next step; log it at the boundary
        every = self.cfg.method.support_every
        return {"so_support_refresh": step // every} if step % every == 0 else {}

    def report(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        sparse = [p for g in optimizer.param_groups if g.get("sparse") for p in g["params"]]
        entries = sum(optimizer.state[p]["support"].numel() for p in sparse if "support" in optimizer.state.get(p, {}))
        return {"method": self.name, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "optimizer_state_bytes": optimizer_state_bytes(optimizer), "so_density": self.cfg.method.density,
                "so_support_entries": entries, "so_sparse_params": sum(p.numel() for p in sparse)}
