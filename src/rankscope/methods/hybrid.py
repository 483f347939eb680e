"""Hybrid-rank ReLoRA: the linears named by `method.full_rank_targets` are trained full-rank by
AdamW (no adapter, never merged or reset); the other linears of `method.targets` get ReLoRA.

A pattern is either an attribute name (`wv` matches every block's value projection) or an fnmatch
pattern over module names (`blocks.0.*`, `blocks.1[01].mlp.w2`). Motivation: Weiss et al. (2025)
find ReLoRA hurts most where full-rank training builds high-rank components (e.g. V/O, the OV
circuit); training exactly those full-rank tests whether the gap closes, at a known memory cost.
Everything else (merges, restarts, optimiser resets, jagged schedule, warm start, resume) is
ReLoRA's: the adapted layers are indexed in model order, as ReLoRA's restarts expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from rankscope.core.schema import option
from rankscope.core.errors import ConfigError
from rankscope.methods.common import matches, target_linears
from rankscope.adapters.lora import LoRALinear, wrap_layers
from rankscope.methods.relora import ReLoRAConfig, ReLoRAMethod


@dataclass
class HybridConfig(ReLoRAConfig):
    full_rank_targets: list[str] = option([], "linears trained full-rank (name like wv, or module pattern like blocks.0.*); "
                                          "the rest of method.targets get ReLoRA")


def split_targets(model: nn.Module, targets: list[str], full_rank: list[str]) -> tuple[list[str], list[str]]:
    """(adapted, full-rank) module names among the targeted linears, in model order."""
    layers = target_linears(model, targets)
    unused = [p for p in full_rank if not any(matches(n, [p]) for n in layers)]
    if unused:
        raise ConfigError(f"method.full_rank_targets {unused} match no targeted linear; examples: wv, blocks.0.*, blocks.1.attn.wo")
    full = [n for n in layers if matches(n, full_rank)]
    adapted = [n for n in layers if n not in full]
    if not adapted:
        raise ConfigError("method.hybrid.full_rank_targets covers every targeted linear: nothing is left for ReLoRA (use method.name=full)")
    return adapted, full


class HybridReLoRAMethod(ReLoRAMethod):
    name = "hybrid"
    config_class = HybridConfig
    supports_fsdp = False

    def attach(self, model: nn.Module) -> None:
        m = self.config
        adapted, _ = split_targets(model, m.targets, m.full_rank_targets)
        wrap_layers(model, {n: m.rank for n in adapted}, m.alpha / m.rank, m.dropout, self.cfg.train.seed, 0)
        self.switched = True

    def report(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        full = [n for n, mod in target_linears(model, self.config.targets).items() if not isinstance(model.get_submodule(n), LoRALinear)]
        return {**super().report(model, optimizer), "full_rank_layers": len(full),
                "full_rank_params": sum(model.get_submodule(n).weight.numel() for n in full)}
