"""The `lora` method: LoRA adapters on the targeted linears (no restarts); the layer itself, its fast
paths and its stored format are rankscope.adapters'.

ReLoRA (Lialin et al. 2023) trains embeddings, norms and the LM head full-rank; only the targeted
linears get adapters. An optional full-rank warm start trains everything for `warm_start_steps`
before the adapters are attached (`after_step` then asks the training loop to rebuild the optimiser).

Each checkpoint's meta holds every adapted layer's rank and scaling (`adapter_facts`, through
rankscope.adapters.stored.adapter_layout), so a model is rebuilt from the checkpoint alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from rankscope.adapters.lora import capture_effective_grads, effective_grads, lora_modules, lora_parameters, wrap_linears
from rankscope.adapters.stored import adapter_layout
from rankscope.config import check, option
from rankscope.core.errors import ConfigError
from rankscope.methods.base import Method, Notify, StepEvents
from rankscope.model import DEFAULT_TARGETS
from rankscope.optim import build_adamw, check_coverage, optimizer_state_bytes, param_groups

__all__ = ["DEFAULT_TARGETS", "LoRAConfig", "LoRAMethod"]


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


class LoRAMethod(Method):
    """LoRA on the targeted linears; embeddings, norms and the LM head trained full-rank."""

    name = "lora"
    config_class = LoRAConfig
    memory_knob = "rank"
    low_rank_updates = True

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

    # ------------------------------------------------------------------ what the training loop asks of adapters
    def adapter_facts(self, model: nn.Module) -> dict[str, dict[str, float]]:
        return adapter_layout(model)

    def capture_grads(self, model: nn.Module, on: bool) -> None:
        capture_effective_grads(model, on)  # the effective weight's gradient, W0 + (alpha/r) B A

    def captured_grads(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return effective_grads(model)

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


