"""Adaptive-rank ReLoRA: ReLoRA whose per-layer adapter ranks are re-chosen at every restart,
within a global budget of adapter parameters (equal-memory matching of methods: methods/memory.py).

Budget: sum_i r_i (m_i + n_i) <= B over the adapted (m_i x n_i) linears, B = method.rank_budget or,
when 0, what uniform method.rank uses. `method.rank_schedule`:
  adaptive  cycle 0 uses uniform ranks; at each merge the effective rank e_i (exp of the entropy of
            the normalised singular values; rankscope.spectral.effective_rank) of the
            cycle's merged update dW_i = (alpha / r_i) B_i A_i is measured (from the r x r core, no
            dense SVD), and the next cycle's ranks are r_i ∝ e_i, scaled to the budget
            (`allocate_ranks`: floor, clip to [rank_min, min(m_i, n_i)], trim the largest while over
            budget, then add ranks where the scaled target exceeds the rank most, while they fit).
            A layer whose update fills its rank evenly (e_i ≈ r_i) keeps or grows it; a layer whose
            update concentrates in a few directions gives rank to the others.
  grow      uniform ranks growing linearly per cycle from method.rank_min (cycle 0) to method.rank
            (last cycle), capped by the budget: more rank as training goes on.
Every adapted layer uses the scaling alpha / method.rank whatever its own rank r_i (alpha_i =
alpha * r_i / rank), so a layer's per-direction step does not jump when its rank changes; each
checkpoint stores every layer's rank and scaling (`adapters` in its metadata) for analysis and export.
A restart with new ranks replaces each LoRALinear by a new one around the merged base weight
(A re-drawn from (seed, cycle, layer index), B = 0) — the model function is unchanged — and
`after_step` asks the training loop to rebuild the optimiser (full-rank parameters keep their AdamW
state; LoRA moments start from zero, since the factors changed shape). The per-layer ranks are part
of the method state in each checkpoint: a model built after `load_state_dict` has the saved ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from rankscope.core.schema import check, option
from rankscope.core.errors import ConfigError
from rankscope.methods.base import Notify, StepEvents
from rankscope.methods.common import matches, target_linears  # noqa: F401  (matches: re-exported)
from rankscope.adapters.lora import LoRALinear, lora_modules, wrap_layers
from rankscope.methods.relora import ReLoRAConfig, ReLoRAMethod


@dataclass
class AdaptiveConfig(ReLoRAConfig):
    rank_budget: int = option(0, "total adapter parameters sum r_i (m_i + n_i) (0: what uniform method.rank uses)")
    rank_schedule: Literal["adaptive", "grow"] = option("adaptive", "adaptive: per-layer ranks from each cycle's update "
                                                        "effective rank, or uniform ranks growing per cycle")
    rank_min: int = option(1, "smallest per-layer rank (and grow's first-cycle rank)")

    def validate(self) -> None:
        super().validate()
        check(self.rank_budget >= 0 and 1 <= self.rank_min <= self.rank, "method.rank_budget >= 0 and 1 <= method.rank_min <= method.rank")


# --------------------------------------------------------------------------- ranks
def allocate_ranks(scores: dict[str, float], costs: dict[str, int], caps: dict[str, int], budget: int, rank_min: int) -> dict[str, int]:
    """Integer ranks r_i ∝ scores_i with sum r_i * costs_i <= budget, rank_min <= r_i <= caps_i."""
    if sum(min(rank_min, caps[n]) * costs[n] for n in scores) > budget:
        raise ConfigError(f"method.rank_budget={budget} cannot give every adapted layer method.rank_min={rank_min}; raise the budget or lower rank_min")
    if not any(s > 0 for s in scores.values()):
        scores = {n: 1.0 for n in scores}
    scale = budget / sum(scores[n] * costs[n] for n in scores)
    want = {n: scale * scores[n] for n in scores}
    ranks = {n: max(min(rank_min, caps[n]), min(caps[n], math.floor(want[n]))) for n in scores}
    used = lambda: sum(ranks[n] * costs[n] for n in ranks)  # noqa: E731
    while used() > budget:  # only the rank_min floor can overshoot: trim the most over-served layer
        n = max((n for n in ranks if ranks[n] > rank_min), key=lambda n: ranks[n] - want[n])
        ranks[n] -= 1
    while True:  # spend what flooring left, where the target exceeds the rank most
        free = budget - used()
        fits = [n for n in ranks if ranks[n] < caps[n] and costs[n] <= free]
        if not fits:
            return ranks
        n = max(fits, key=lambda n: (want[n] - ranks[n], -list(ranks).index(n)))
        ranks[n] += 1


@torch.no_grad()
def update_effective_rank(m: LoRALinear) -> float:
    """Effective rank of dW = scaling * B @ A from the r x r core (metrics.svdvals_factored)."""
    from rankscope.spectral import Spectra, effective_rank, svdvals_factored

    b, a = m.delta_factors(torch.float64)
    s = svdvals_factored(b[None], a[None])
    return float(effective_rank(Spectra(s, b.shape[0], a.shape[1], torch.finfo(torch.float64).eps))[0])


class AdaptiveReLoRAMethod(ReLoRAMethod):
    name = "adaptive"
    config_class = AdaptiveConfig
    supports_fsdp = False
    low_rank_updates = False  # the ranks change at every restart: no fixed bound on an update's rank

    def __init__(self, cfg):
        super().__init__(cfg)
        self.ranks: dict[str, int] = {}
        self.pending = False  # new ranks chosen at a merge, layers not yet re-wrapped
        self.last_effective_ranks: dict[str, float] = {}

    # ------------------------------------------------------------------ budget and schedules
    def budget(self, layers: dict[str, nn.Linear]) -> int:
        m = self.config
        return m.rank_budget or sum(min(m.rank, lin.in_features, lin.out_features) * (lin.in_features + lin.out_features) for lin in layers.values())

    def n_cycles(self) -> int:
        t, m = self.cfg.train, self.config
        return max(1, math.ceil((t.max_steps - m.warm_start_steps) / m.reset_every))

    def ranks_for(self, layers: dict[str, nn.Linear], cycle: int, scores: dict[str, float] | None = None) -> dict[str, int]:
        m = self.config
        costs = {n: lin.in_features + lin.out_features for n, lin in layers.items()}
        caps = {n: min(lin.in_features, lin.out_features) for n, lin in layers.items()}
        if m.rank_schedule == "grow":
            frac = cycle / (self.n_cycles() - 1) if self.n_cycles() > 1 else 1.0
            r = round(m.rank_min + (m.rank - m.rank_min) * min(1.0, frac))
            caps = {n: min(c, r) for n, c in caps.items()}
            return allocate_ranks({n: 1.0 for n in layers}, costs, caps, min(self.budget(layers), sum(caps[n] * costs[n] for n in layers)), m.rank_min)
        if scores is None:  # cycle 0: uniform
            caps = {n: min(c, m.rank) for n, c in caps.items()}
            scores = {n: 1.0 for n in layers}
        return allocate_ranks(scores, costs, caps, self.budget(layers), m.rank_min)

    # ------------------------------------------------------------------ wrapping
    def attach(self, model: nn.Module) -> None:
        m = self.config
        layers = target_linears(model, m.targets)
        if not self.ranks:
            self.ranks = self.ranks_for(layers, self.merges)
        wrap_layers(model, {n: self.ranks[n] for n in layers}, m.alpha / m.rank, m.dropout, self.cfg.train.seed, self.merges)
        self.switched = True

    @torch.no_grad()
    def merge_and_restart(self, step: int, model: nn.Module, notify: Notify | None = None) -> dict[str, Any]:
        modules = lora_modules(model)
        self.last_effective_ranks = {n: update_effective_rank(mod) for n, mod in modules.items()}
        rows = super().merge_and_restart(step, model, notify)
        layers = {n: mod.base for n, mod in modules.items()}
        new = self.ranks
        if step < self.cfg.train.max_steps:  # no re-wrap after the last step: nothing would train the new adapters
            new = self.ranks_for(layers, self.merges, self.last_effective_ranks if self.config.rank_schedule == "adaptive" else None)
        self.pending = new != self.ranks
        self.ranks = new
        rows.update({"adaptive_rank_mean": sum(new.values()) / len(new), "adaptive_rank_min": min(new.values()),
                     "adaptive_rank_max": max(new.values()),
                     "adaptive_update_erank_mean": sum(self.last_effective_ranks.values()) / len(new)})
        return rows

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, notify: Notify | None = None) -> StepEvents:
        """ReLoRA's step; when a merge chose new ranks, re-wrap the layers to them and ask the
        training loop for a new optimiser."""
        events = super().after_step(step, model, optimizer, notify)
        if self.pending:
            self.pending = False
            self.attach(model)
            events.rebuild_optimizer = True
        return events

    # ------------------------------------------------------------------ bookkeeping
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ranks": dict(self.ranks), "pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.ranks = {k: int(v) for k, v in state.get("ranks", self.ranks).items()}
        self.pending = bool(state.get("pending", False))

    def report(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        layers = target_linears(model, self.config.targets)
        used = sum(self.ranks[n] * (lin.in_features + lin.out_features) for n, lin in layers.items()) if self.ranks else 0
        return {**super().report(model, optimizer), "adaptive_ranks": dict(self.ranks), "adaptive_adapter_params": used, "adaptive_rank_budget": self.budget(layers)}
