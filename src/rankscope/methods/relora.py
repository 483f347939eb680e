"""ReLoRA (Lialin et al. 2023; as studied by Weiss et al. 2025): LoRA with periodic
merge-and-restart, optimiser-state resets and a jagged learning-rate schedule.

Every `reset_every` steps (counted from the moment adapters are attached):
  1. merge:   W <- W + (alpha / r) B A, in fp32 on the master weight (`LoRALinear.merge`)
  2. restart: A re-drawn from a generator seeded by (seed, cycle, layer index) — identical on every
              distributed rank — and B zeroed, so the model's function is unchanged by the restart
Every `optimizer_reset_every` steps (default: the same period), the AdamW state of the LoRA factors
only is reset (full-rank embeddings, norms and head keep theirs), by `method.optimizer_reset`:
  zero             moments zeroed AND the step counter reset to 0: the next update is a fresh Adam step
  random_prune     keep exactly round((1 - prune_fraction) * n) randomly chosen entries of each
                   parameter's moments (one mask shared by exp_avg and exp_avg_sq, so an entry either
                   keeps its whole history or restarts), deterministic generator; the step counter is
                   KEPT, as in ReLoRA's code and the paper: the survivors are still valid running
                   averages, and resetting the step would blow them up by the bias correction
                   (1/(1-beta1) for m, 1/sqrt(1-beta2) for v)
  magnitude_prune  keep the exact top-k entries by |value| of each moment tensor separately
                   (torch.topk on the flattened tensor: no size limit, unlike kthvalue/quantile);
                   step counter kept, as for random_prune
After each optimiser reset the learning rate re-warms linearly over `restart_warmup_steps`
(ReLoRA §3, `schedules.jagged_cosine`).

With `save_cycle_updates`, each cycle's merged update dW (fp32; keys = module names such as
`blocks.0.attn.wq`) is written to RUN/relora_updates/cycle_0001_step_002000.safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from rankscope.core.schema import check, option
from rankscope.parallel.distributed import is_main_process
from rankscope.core.errors import ConfigError
from rankscope.methods.base import Notify, StepEvents, emit, schedule_must_fit
from rankscope.methods.common import seeded_generator
from rankscope.adapters.lora import adapter_generator, lora_modules, lora_parameters
from rankscope.methods.lora import LoRAConfig, LoRAMethod
from rankscope.schedules import jagged_cosine
from rankscope.parallel.sharding import full, local, shard_of

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass
class ReLoRAConfig(LoRAConfig):
    reset_every: int = option(2000, "steps between merge-and-restart")
    optimizer_reset_every: int = option(0, "steps between optimiser resets (0: same as reset_every)")
    restart_warmup_steps: int = option(100, "re-warm-up steps after each restart")
    optimizer_reset: Literal["zero", "random_prune", "magnitude_prune"] = option("random_prune", "how LoRA optimiser state is reset")
    prune_fraction: float = option(0.999, "fraction of optimiser moments pruned (random_prune, magnitude_prune)")
    save_cycle_updates: bool = option(False, "save each cycle's merged update dW to RUN/relora_updates/")

    @property
    def optimizer_period(self) -> int:
        """Steps between optimiser resets: optimizer_reset_every, or reset_every when 0."""
        return self.optimizer_reset_every or self.reset_every

    def validate(self) -> None:
        super().validate()
        check(0 <= self.prune_fraction <= 1, f"method.prune_fraction={self.prune_fraction} must be in [0, 1]")
        check(self.reset_every > 0 and self.restart_warmup_steps >= 0,
              f"method.reset_every={self.reset_every} must be > 0 and method.restart_warmup_steps={self.restart_warmup_steps} >= 0")
        check(self.optimizer_reset_every >= 0, "method.optimizer_reset_every must be >= 0")
        # restart_warmup_steps <= the optimiser period: checked with the run (ReLoRAMethod.check_schedule), where the
        # message can name the method's own section


def keep_count(n: int, keep_fraction: float) -> int:
    return max(0, min(n, round(keep_fraction * n)))


@torch.no_grad()
def keep_random_(tensors: list[torch.Tensor], keep_fraction: float, generator: torch.Generator) -> int:
    """Zero all but exactly round(keep_fraction * n) entries, chosen at random by `generator` (CPU)
    and shared by all `tensors` (same shape). Returns the number kept."""
    n = tensors[0].numel()
    k = keep_count(n, keep_fraction)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:k]] = True
    for t in tensors:  # under FSDP every rank draws the same full mask and applies its rows
        local(t).mul_(shard_of(mask.view(t.shape), t))
    return k


@torch.no_grad()
def keep_top_magnitude_(t: torch.Tensor, keep_fraction: float) -> int:
    """Zero all but the exactly k = round(keep_fraction * n) entries of largest |value|. Uses
    torch.topk on the flattened tensor (works for any size; kthvalue/quantile cap at 2**24)."""
    n = t.numel()
    k = keep_count(n, keep_fraction)
    if k == n:
        return k
    if k == 0:
        t.zero_()
        return 0
    flat = full(t).reshape(-1)  # the top-k is global: under FSDP the moment is gathered first
    if k <= n - k:  # select the smaller side: topk cost grows with k
        mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
        mask[torch.topk(flat.abs(), k, sorted=False).indices] = True
    else:
        mask = torch.ones(n, dtype=torch.bool, device=flat.device)
        mask[torch.topk(flat.abs(), n - k, largest=False, sorted=False).indices] = False
    local(t).mul_(shard_of(mask.view(t.shape), t))
    return k


@torch.no_grad()
def reset_state_(state: dict[str, Any], mode: str, prune_fraction: float, generator: torch.Generator) -> tuple[int, int]:
    """Reset one parameter's AdamW state in place; returns (entries kept, entries) over its moments."""
    moments = [state[k] for k in MOMENTS if torch.is_tensor(state.get(k))]
    total = sum(m.numel() for m in moments)
    if mode == "zero":
        for m in moments:
            m.zero_()
        if torch.is_tensor(state.get("step")):
            state["step"].zero_()
        elif "step" in state:
            state["step"] = 0
        return 0, total
    if mode == "random_prune":
        return keep_random_(moments, 1.0 - prune_fraction, generator) * len(moments), total
    if mode == "magnitude_prune":
        return sum(keep_top_magnitude_(m, 1.0 - prune_fraction) for m in moments), total
    raise ValueError(f"unknown optimizer_reset mode {mode!r}")


class ReLoRAMethod(LoRAMethod):
    name = "relora"
    config_class = ReLoRAConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.merges = 0  # merge-and-restarts done (the cycle number of the adapters now training)
        self.optimizer_resets = 0
        self.pending_files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}

    @classmethod
    def check_schedule(cls, cfg) -> None:
        super().check_schedule(cfg)  # the warm start leaves adapter steps
        c = cfg.method.options
        steps = cfg.train.max_steps - c.warm_start_steps  # the steps adapters train: merges count from the switch
        def warmup(period: int) -> str:  # the paper's re-warm-up is 5% of a cycle (100 of 2000 steps)
            fits = c.restart_warmup_steps <= period and not c.optimizer_reset_every
            return "" if fits else f" method.{cfg.method.name}.restart_warmup_steps={max(1, round(period / 20))}"

        schedule_must_fit(cfg, "reset_every", c.reset_every, steps, "no merge-and-restart would happen and ReLoRA would train as LoRA",
                          also=warmup)
        if c.optimizer_reset_every:
            schedule_must_fit(cfg, "optimizer_reset_every", c.optimizer_reset_every, steps, "the optimiser state would never be reset")
        if c.restart_warmup_steps > c.optimizer_period:
            key, period = f"method.{cfg.method.name}", "optimizer_reset_every" if c.optimizer_reset_every else "reset_every"
            raise ConfigError(f"{key}.restart_warmup_steps={c.restart_warmup_steps} is longer than the {c.optimizer_period}-step cycle "
                              f"({key}.{period}) it re-warms; set {key}.restart_warmup_steps={max(1, round(c.optimizer_period / 20))} "
                              f"(5% of a cycle, the paper's ratio)")

    def lr_multiplier(self, step: int) -> float:
        t, c = self.cfg.train, self.config
        return jagged_cosine(step, t.max_steps, t.warmup_steps, t.min_lr_ratio, c.optimizer_period, c.restart_warmup_steps, c.warm_start_steps)

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, notify: Notify | None = None) -> StepEvents:
        since = step - self.config.warm_start_steps  # completed adapter steps
        if not self.switched or since <= 0:
            return super().after_step(step, model, optimizer, notify)  # the warm start's switch
        rows: dict[str, Any] = {}
        if since % self.config.reset_every == 0:
            rows.update(self.merge_and_restart(step, model, notify))
        if since % self.config.optimizer_period == 0:
            rows.update(self.reset_optimizer(model, optimizer))
        return StepEvents(rows)

    # ------------------------------------------------------------------ ReLoRA §3
    @torch.no_grad()
    def merge_and_restart(self, step: int, model: nn.Module, notify: Notify | None = None) -> dict[str, Any]:
        rows = emit(notify, "before_merge", step, model)
        cycle = self.merges + 1
        keep = self.config.save_cycle_updates and is_main_process()
        deltas = {}
        for index, (name, m) in enumerate(lora_modules(model).items()):
            delta = m.delta_weight()  # computed once: saved and merged
            if keep:
                deltas[name] = delta.cpu()
            m.merge(delta)
            m.reset_adapter(adapter_generator(self.cfg.train.seed, cycle, index))
        if keep:
            self.save_update(cycle, step, deltas)
        self.merges = cycle
        rows.update(emit(notify, "after_merge", step, model))
        rows["relora_merge"] = cycle
        return rows

    def reset_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        m = self.config
        self.optimizer_resets += 1
        kept = total = 0
        for index, p in enumerate(lora_parameters(model)):
            if optimizer.state.get(p):
                g = seeded_generator(self.cfg.train.seed, 2, self.optimizer_resets, index)
                k, n = reset_state_(optimizer.state[p], m.optimizer_reset, m.prune_fraction, g)
                kept, total = kept + k, total + n
        return {"relora_optimizer_reset": self.optimizer_resets, "relora_state_kept": kept / max(total, 1)}

    def save_update(self, cycle: int, step: int, deltas: dict[str, torch.Tensor]) -> None:
        """Hand this cycle's update to the training loop, which writes it (atomically: a resumed run
        rewrites the same bytes) to RUN/relora_updates/cycle_NNNN_step_NNNNNN.safetensors."""
        c = self.config
        meta = {"cycle": str(cycle), "step": str(step), "rank": str(c.rank), "scaling": str(c.alpha / c.rank)}
        path = f"relora_updates/cycle_{cycle:04d}_step_{step:06d}.safetensors"
        self.pending_files[path] = ({k: v.contiguous().cpu() for k, v in deltas.items()}, meta)

    def take_files(self) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
        out, self.pending_files = self.pending_files, {}
        return out

    # ------------------------------------------------------------------ bookkeeping
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "merges": self.merges, "optimizer_resets": self.optimizer_resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.merges = int(state.get("merges", 0))
        self.optimizer_resets = int(state.get("optimizer_resets", 0))

    def report(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {**super().report(model, optimizer), "relora_merges": self.merges, "relora_optimizer_resets": self.optimizer_resets}
