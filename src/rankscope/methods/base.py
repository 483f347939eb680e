"""The full-rank method, and the interface every other method overrides."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from rankscope.optim import build_adamw, check_coverage, param_groups
from rankscope.schedules import cosine_with_warmup


class Method:
    """Full-rank training: every parameter trained by AdamW, warm-up + cosine schedule."""

    name = "full"

    def __init__(self, cfg):
        self.cfg = cfg
        # listeners(event, step, model) -> dict | None; the trainer attaches callbacks here so that
        # e.g. the analysis can measure weights just before and just after a ReLoRA merge
        self.listeners: list = []
        # the run directory, set by the Trainer (methods that write files, e.g. ReLoRA's per-cycle updates)
        self.run_dir = None

    def emit(self, event: str, step: int, model: nn.Module) -> dict[str, Any]:
        """Tell listeners about a method event ('before_merge', 'after_merge', ...); merge their rows."""
        rows: dict[str, Any] = {}
        for listener in self.listeners:
            rows.update(listener(event, step, model) or {})
        return rows

    def prepare_model(self, model: nn.Module) -> None:
        """Wrap or freeze layers before the optimiser is built (full-rank: nothing to do)."""

    def build_optimizer(self, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
        groups = param_groups(model, self.cfg.train.weight_decay)
        check_coverage(model, groups)
        return build_adamw(groups, self.cfg.train, device)

    def maybe_switch(self, step: int, trainer) -> bool:
        """Called after each completed step and before loading a checkpoint of `step`: a method may
        restructure the model and replace `trainer.optimizer` (ReLoRA's full-rank warm start)."""
        return False

    def lr_multiplier(self, step: int) -> float:
        t = self.cfg.train
        return cosine_with_warmup(step, t.max_steps, t.warmup_steps, t.min_lr_ratio)

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Called after optimiser step `step` (1-based count of completed steps); returns loggable facts."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable method state saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def report(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from rankscope.optim import optimizer_state_bytes

        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"method": self.name, "trainable_params": trainable, "optimizer_state_bytes": optimizer_state_bytes(optimizer)}
