r"""SO, sparse optimisation (Mrabah et al. 2025, "Sparsity Outperforms Low-Rank Projections in
Few-Shot Adaptation"), as a pretraining method, in two variants (docs/methods.md compares them
with the authors' code, nairouz/SO optimizers/SparseOptimizer.py):

`so` (SOAdam) — the authors' algorithm. Per 2-D weight of the targeted linears, with
k = floor(density * numel) (the authors' int(); k = 0 is refused with a ConfigError):
  G  the gradient support: k entries drawn at random every `support_every` steps ("local
     randomness"), from a CPU generator seeded by (seed, 5, period, parameter index), so every
     process and every resume draws the same G
  M  the momentum support: k entries re-selected after every step as the top-k by |m| of M u G
     ("global importance"; ties go to the lower flat index)
  each step, with step number t (one counter per tensor) and U = M u G (k to 2k entries):
     g_i = grad_i (+ wd * w_i, coupled L2) for i in G,  g_i = 0 for i in M \ G
     m_i <- b1 m_i + (1 - b1) g_i,  v_i <- b2 v_i + (1 - b2) g_i^2      (m = v = 0 for i in G \ M)
     w_i <- w_i - lr / (1 - b1^t) * m_i / (sqrt(v_i) / sqrt(1 - b2^t) + eps)   for every i in U
  so entries in M \ G move on their decayed momentum alone. Entries that leave M u G lose (m, v)
  (as in the authors' code); if drawn again they restart from m = v = 0, with the tensor's step
  count t for bias correction (also as the authors). Weight decay is the authors' coupled L2 on G
  by default; `weight_decay_mode="decoupled"` decays the weights of U by (1 - lr * wd) instead.
  Two bugs of the reference code are not reproduced: its lexicographic re-ordering chains two
  unstable sorts (a gradient can be added to the moment of another entry of the same row; here
  G and M are paired by flat index with searchsorted), and its dense branch divides the first
  moment by the bias correction twice (here dense parameters get plain AdamW).
  State per weight: `support` (int64), `exp_avg`, `exp_avg_sq` of capacity min(2k, numel), as
  the authors preallocate 2k (between steps M sits sorted in the first k slots, the rest is
  zero; a step fills up to 2k slots with U), `grad_support` (int64, k) and `step`.

`so_single` (SparseAdamW) — rankscope's earlier single-support variant: one random support S of
k = round(density * numel) entries (at least 1), the only entries that move and the only ones
with moments, re-drawn every `support_every` steps; at refresh number j
  1. I = the round(moment_keep * k) indices of S with largest |m| (torch.topk; ties by index order)
  2. R = the first k - |I| indices of a random permutation of all entries that are not in I,
         the permutation drawn on the CPU from a generator seeded by (seed, 3, j, parameter index)
  3. S' = sorted(I u R); for i in S' n S the moments (m_i, v_i) are carried over, entries new to
         the support start from m = v = 0
  The step counter is per parameter and kept. The first draw (step 0) is R alone. Weight decay
  acts on the support only (decoupled by default here, coupled L2 as an option). With density
  1.0 and no re-draw inside the run the update is AdamW's, entry for entry.

State tensors are plain tensors, so rankscope.store.checkpoint saves and resumes them bit-exactly.
Every other parameter (embeddings, norms, head, non-targeted linears) is trained densely by AdamW
in the same optimiser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from rankscope.core.schema import check, option
from rankscope.core.errors import ConfigError
from rankscope.methods.base import Method, Notify, StepEvents, schedule_must_fit
from rankscope.methods.common import seeded_generator
from rankscope.model import DEFAULT_TARGETS
from rankscope.optim import SplitAdamW, adamw_update_, optimizer_state_bytes, targeted_groups

__all__ = ["SOConfig", "SingleSupportConfig", "SOAdam", "SparseAdamW", "SplitAdamW"]



@dataclass
class SOConfig:
    targets: list[str] = option(DEFAULT_TARGETS, "linear layers whose weights are trained sparsely (by name)")
    density: float = option(0.05, "support size k per targeted weight = floor(density * numel) (so; must be >= 1) "
                                  "or round, at least 1 (so_single)")
    support_every: int = option(50, "steps between re-draws of the random gradient support (the authors' T); so_single: of its one support")
    so_betas: list[float] = option([0.9, 0.999], "Adam (beta1, beta2) of the sparse weights (the authors' defaults); "
                                                 "other weights use train.beta1/2")
    so_weight_decay: float = option(0.0, "weight decay of the sparse weights (the authors' default 0); other weights use train.weight_decay")
    so_weight_decay_mode: Literal["coupled", "decoupled"] = option("coupled", "coupled = L2 added to the gradient (the authors'); "
                                                                   "decoupled = AdamW's, on the entries that move")

    def validate(self) -> None:
        check(0 < self.density <= 1, f"method.density={self.density} must be in (0, 1]")
        check(len(self.so_betas) == 2 and all(0 <= b < 1 for b in self.so_betas),
              f"method.so_betas={self.so_betas} must be two values in [0, 1), e.g. [0.9, 0.999]")
        check(self.so_weight_decay >= 0, "method.so_weight_decay must be >= 0")
        check(self.support_every > 0, f"method.support_every={self.support_every} must be positive")


@dataclass
class SingleSupportConfig(SOConfig):
    moment_keep: float = option(0.25, "fraction of the support kept at a re-draw, the entries of largest |first moment| (with their moments)")

    def validate(self) -> None:
        super().validate()
        check(0 <= self.moment_keep <= 1, f"method.moment_keep={self.moment_keep} must be in [0, 1]")


INDEX_BYTES = 8  # int64 support indices
SO_STREAM, SINGLE_STREAM = 5, 3  # purpose keys of seeded_generator for the two variants' draws


def support_size(numel: int, density: float) -> int:
    """so_single: k = round(density * numel), at least 1."""
    return max(1, min(numel, round(density * numel)))


def so_support_size(numel: int, density: float) -> int:
    """so: k = floor(density * numel), as the authors' int(numel * density_ratio); may be 0."""
    return min(numel, math.floor(density * numel))


def so_state_bytes(numel: int, density: float, element_size: int = 4) -> int:
    """Bytes SOAdam allocates for one weight (without `step`): min(2k, numel) slots of index, m, v
    plus the k indices of G."""
    k = so_support_size(numel, density)
    return min(2 * k, numel) * (INDEX_BYTES + 2 * element_size) + k * INDEX_BYTES


def single_state_bytes(numel: int, density: float, element_size: int = 4) -> int:
    """Bytes SparseAdamW (so_single) allocates for one weight (without `step`): k of index, m, v."""
    return support_size(numel, density) * (INDEX_BYTES + 2 * element_size)


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


def draw_gradient_support(numel: int, k: int, seed: int, index: int, period: int) -> torch.Tensor:
    """so's G for `period` (= step // support_every) of parameter `index`: the first k entries of
    torch.randperm(numel) from seeded_generator(seed, 5, period, index), sorted (CPU, int64)."""
    perm = torch.randperm(numel, generator=seeded_generator(seed, SO_STREAM, period, index))
    return torch.sort(perm[:k]).values


def member(sorted_ids: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position of each query in `sorted_ids`, whether it is there): pairing by flat index, never
    by sort order (the reference code's pairing bug)."""
    if sorted_ids.numel() == 0:
        return torch.zeros_like(query), torch.zeros(query.shape, dtype=torch.bool, device=query.device)
    pos = torch.searchsorted(sorted_ids, query).clamp_max(sorted_ids.numel() - 1)
    return pos, sorted_ids[pos] == query


def min_density(numel: int) -> float:
    """The smallest 4-digit density whose k = floor(density * numel) is >= 1 (rounded up, so the hint works)."""
    return math.ceil(1e4 / numel) / 1e4


def check_support_sizes(model: nn.Module, params: list[torch.Tensor], density: float) -> None:
    """so refuses a targeted weight whose k = floor(density * numel) is 0 (it would never move)."""
    names = {id(p): n for n, p in model.named_parameters()}
    empty = [p for p in params if so_support_size(p.numel(), density) == 0]
    if empty:
        need = min_density(min(p.numel() for p in params))
        raise ConfigError(f"method.density={density} gives k = floor(density * numel) = 0 entries for {names.get(id(empty[0]), 'a weight')} "
                          f"({empty[0].numel()} entries) and {len(empty) - 1} other weights, which would never be trained; "
                          f"raise method.density to at least {need:.3g}")


def support_grad(p: torch.Tensor, idx: torch.Tensor, value: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """The gradient at flat indices `idx`, plus the coupled L2 term wd * w (the authors' weight
    decay, `weight_decay_mode="coupled"`)."""
    grad = p.grad.reshape(-1)[idx]
    if group["weight_decay_mode"] == "coupled" and group["weight_decay"] != 0:
        grad = grad.add(value, alpha=group["weight_decay"])
    return grad


class SOAdam(SplitAdamW):
    """Adam whose groups with `sparse=True` follow the authors' SO: a random gradient support G
    (re-drawn every `support_every` steps) and a momentum support M (the top-k by |m| of M u G,
    re-selected every step); Adam moves every entry of M u G (rule in the module docstring).

    Group options: lr, betas, eps, weight_decay, weight_decay_mode ("coupled" L2, the authors', or
    "decoupled"), sparse (bool), density, support_every, seed.
    """

    flag = "sparse"
    index_keys = ("support", "grad_support")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 weight_decay_mode: str = "coupled", density: float = 1.0, support_every: int = 5, seed: int = 0):
        if weight_decay_mode not in ("coupled", "decoupled"):
            raise ConfigError(f"weight_decay_mode={weight_decay_mode!r}; valid: coupled, decoupled")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, weight_decay_mode=weight_decay_mode,
                        sparse=False, density=density, support_every=support_every, seed=seed)
        super().__init__(params, defaults)
        for g in self.param_groups:
            for p in g["params"] if g["sparse"] else ():
                if so_support_size(p.numel(), g["density"]) == 0:
                    raise ConfigError(f"density={g['density']} gives k = floor(density * numel) = 0 for a {tuple(p.shape)} weight; "
                                      f"raise the density to at least {min_density(p.numel()):g}")

    def special_step(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> None:
        n = p.numel()
        k = so_support_size(n, group["density"])
        done = int(state["step"].item())
        if "support" not in state:
            cap = min(2 * k, n)
            state["support"] = torch.zeros(cap, dtype=torch.long, device=p.device)
            state["exp_avg"] = torch.zeros(cap, dtype=p.dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(cap, dtype=p.dtype, device=p.device)
        if done % group["support_every"] == 0:  # local randomness: a fresh G every T steps
            state["grad_support"] = draw_gradient_support(n, k, group["seed"], index, done // group["support_every"]).to(p.device)
        slots, m_buf, v_buf = state["support"], state["exp_avg"], state["exp_avg_sq"]
        M = slots[: k if done else 0]  # no momentum support before the first step
        G = state["grad_support"]
        U = torch.unique(torch.cat([M, G]))  # sorted, k to 2k entries
        u = U.numel()
        pos_m, in_m = member(M, U)
        pos_g, in_g = member(G, U)
        # the moments of U: M's carried over (paired by index), zero for entries new in G
        m_u, v_u = torch.zeros(u, dtype=m_buf.dtype, device=p.device), torch.zeros(u, dtype=v_buf.dtype, device=p.device)
        m_u[in_m], v_u[in_m] = m_buf[pos_m[in_m]], v_buf[pos_m[in_m]]
        slots[:u], m_buf[:u], v_buf[:u] = U, m_u, v_u
        m, v = m_buf[:u], v_buf[:u]
        flat = p.view(-1)
        value = flat[U]
        grad = torch.zeros_like(value)
        grad[in_g] = support_grad(p, U[in_g], value[in_g], group)  # zero gradient on M \ G
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if group["weight_decay_mode"] == "decoupled" and wd != 0:
            value.mul_(1 - lr * wd)
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        state["step"] += 1
        t = done + 1
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        value.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
        flat.index_copy_(0, U, value)
        # global importance: the next M is the top-k of |m| over U (stable sort: ties to the lower index)
        top = torch.sort(torch.sort(m.abs(), descending=True, stable=True).indices[:k]).values
        new_ids, new_m, new_v = U[top], m[top], v[top]
        for buf in (slots, m_buf, v_buf):  # canonical state between steps: M in the first k slots, zeros after
            buf.zero_()
        slots[:k], m_buf[:k], v_buf[:k] = new_ids, new_m, new_v


class SparseAdamW(SplitAdamW):
    """so_single: AdamW whose groups with `sparse=True` update each parameter only on one moving
    random support (rule in the module docstring).

    Group options: lr, betas, eps, weight_decay, weight_decay_mode ("decoupled" or "coupled"),
    sparse (bool), density, support_every, moment_keep, seed. Parameters are numbered in group
    order (the index seeding their supports).
    """

    flag = "sparse"
    index_keys = ("support",)

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 density: float = 1.0, support_every: int = 100, moment_keep: float = 0.0, seed: int = 0,
                 weight_decay_mode: str = "decoupled"):
        if weight_decay_mode not in ("coupled", "decoupled"):
            raise ConfigError(f"weight_decay_mode={weight_decay_mode!r}; valid: coupled, decoupled")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, sparse=False, density=density,
                        support_every=support_every, moment_keep=moment_keep, seed=seed, weight_decay_mode=weight_decay_mode)
        super().__init__(params, defaults)

    @torch.no_grad()
    def refresh(self, p: torch.Tensor, group: dict, index: int, refresh_no: int) -> None:
        """Re-draw the support of `p` (rule in the module docstring)."""
        state = self.state[p]
        n = p.numel()
        k = support_size(n, group["density"])
        g = seeded_generator(group["seed"], SINGLE_STREAM, refresh_no, index)
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
        pos, stays = member(old, new)
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
        value = flat[idx]
        grad = support_grad(p, idx, value, group)
        wd = group["weight_decay"] if group["weight_decay_mode"] == "decoupled" else 0.0
        state["step"] += 1
        (beta1, beta2) = group["betas"]
        adamw_update_(value, grad, state["exp_avg"], state["exp_avg_sq"], done + 1, group["lr"], beta1, beta2, group["eps"], wd)
        flat.index_copy_(0, idx, value)


class SparseMethodBase(Method):
    """Targeted linears' weights: a sparse optimiser group (so_betas, so_weight_decay,
    so_weight_decay_mode); everything else: dense AdamW with the train.* settings."""

    supports_fsdp = False
    memory_knob = "density"
    support_key = "support"  # the optimiser-state entry that holds a weight's support indices

    @staticmethod
    def state_bytes(numel: int, density: float, element_size: int = 4) -> int:
        """Bytes the method's sparse optimiser allocates for one weight of `numel` entries (memory matching)."""
        return single_state_bytes(numel, density, element_size)

    @classmethod
    def smallest_density(cls, sizes: list[int]) -> float:
        """The smallest density the method accepts on weights of `sizes` entries (a support rounds to >= 1 entry)."""
        return 1e-12

    @classmethod
    def check_schedule(cls, cfg) -> None:
        schedule_must_fit(cfg, "support_every", cfg.method.options.support_every, cfg.train.max_steps,
                          "the random support would be drawn once and never re-drawn")

    def sparse_groups(self, model: nn.Module) -> list[dict]:
        t, m = self.cfg.train, self.config
        groups = targeted_groups(model, t, m.targets, "sparse", sparse=True)
        groups[-1].update(betas=tuple(m.so_betas), weight_decay=m.so_weight_decay, weight_decay_mode=m.so_weight_decay_mode)
        return groups

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, notify: Notify | None = None) -> StepEvents:
        # the (gradient) support is re-drawn at the start of the next step; log it at the boundary
        every = self.config.support_every
        return StepEvents({"so_support_refresh": step // every} if step % every == 0 else {})

    def report(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        sparse = [p for g in optimizer.param_groups if g.get("sparse") for p in g["params"]]
        states = [optimizer.state[p] for p in sparse if "support" in optimizer.state.get(p, {})]
        key = self.support_key
        return {"method": self.name, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "optimizer_state_bytes": optimizer_state_bytes(optimizer), "so_density": self.config.density,
                "so_support_entries": sum(s[key].numel() for s in states), "so_moment_slots": sum(s["exp_avg"].numel() for s in states),
                "so_sparse_params": sum(p.numel() for p in sparse)}


class SparseMethod(SparseMethodBase):
    """The authors' SO (two supports, importance-pruned momentum) on the targeted linears' weights."""

    name = "so"
    config_class = SOConfig
    support_key = "grad_support"

    @staticmethod
    def state_bytes(numel: int, density: float, element_size: int = 4) -> int:
        return so_state_bytes(numel, density, element_size)

    @classmethod
    def smallest_density(cls, sizes: list[int]) -> float:
        """SO needs k = floor(d * numel) >= 1 on every weight."""
        d = 1.0 / min(sizes)
        while any(so_support_size(n, d) == 0 for n in sizes):  # floating point: d * n may fall just below 1
            d = math.nextafter(d, 2.0)
        return d

    def build_optimizer(self, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
        t, m = self.cfg.train, self.config
        groups = self.sparse_groups(model)
        check_support_sizes(model, groups[-1]["params"], m.density)
        return SOAdam(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, density=m.density,
                      support_every=m.support_every, seed=t.seed)


class SingleSupportMethod(SparseMethodBase):
    """rankscope's single-support variant (one support, moment_keep carry-over at re-draws)."""

    name = "so_single"
    config_class = SingleSupportConfig

    def build_optimizer(self, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
        t, m = self.cfg.train, self.config
        return SparseAdamW(self.sparse_groups(model), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, density=m.density,
                           support_every=m.support_every, moment_keep=m.moment_keep, seed=t.seed)
