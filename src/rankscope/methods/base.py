"""The full-rank method, and the interface every other method overrides.

A method is one module in `rankscope.methods` (listed once, in registry.METHODS): a config dataclass
(`config_class`, the YAML section `method.<name>`), its capabilities (`supports_fsdp`, `memory_knob`;
sparse methods also their state accounting) and the hooks below. A method
never sees the training loop: it changes the model and the optimiser it is handed, and tells the training loop
what it needs (rebuild the optimiser) through the events `after_step` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from rankscope.core.errors import ConfigError
from rankscope.optim import build_adamw, check_coverage, optimizer_state_bytes, param_groups
from rankscope.schedules import cosine_with_warmup

# notify(event, step, model) -> rows: how the training loop lets callbacks look at the model around a
# method's events ('before_merge', 'after_merge'); a method calls it, never the callbacks themselves
Notify = Callable[[str, int, nn.Module], "dict[str, Any] | None"]


@dataclass
class FullConfig:
    """Full-rank training has no options."""

    def validate(self) -> None:
        pass


class StepEvents(dict):
    """What `after_step` tells the training loop: the rows to log (the dict itself), and whether the model
    changed shape so the optimiser must be rebuilt (`Method.rebuild_optimizer`) and re-wrapped."""

    def __init__(self, rows: dict[str, Any] | None = None, rebuild_optimizer: bool = False):
        super().__init__(rows or {})
        self.rebuild_optimizer = rebuild_optimizer


class Method:
    """Full-rank training: every parameter trained by AdamW, warm-up + cosine schedule."""

    name = "full"
    config_class: type = FullConfig
    supports_fsdp = True  # the optimiser and weight surgery work on FSDP2 shards (rankscope.parallel.sharding)
    memory_knob: str | None = None  # the option methods.memory sets to match optimiser memory (rank, density)
    # adapters of one fixed rank r each (LoRA, ReLoRA, hybrid): an update is a sum of (merges x r)-rank terms,
    # so analysis bounds its rank (rankscope.analysis.bounds); not so where the ranks change (adaptive)
    low_rank_updates = False

    def __init__(self, cfg):
        self.cfg = cfg
        self.config = cfg.method.options  # this method's own section, method.<name>

    @classmethod
    def check_run(cls, cfg) -> None:
        """The method's own checks across config sections, at load time (e.g. what it allows under
        train.parallel=fsdp; whether it runs sharded at all is `supports_fsdp`, checked by the loader,
        rankscope.methods.runconfig.check_method_run)."""

    @classmethod
    def check_schedule(cls, cfg) -> None:
        """Does the method's schedule fit a run of train.max_steps steps? Refuse (ConfigError, one line
        naming the fix) where a period the method exists for never comes round: a ReLoRA run with no
        merge would silently be LoRA. Full-rank: the warm-up is checked by TrainConfig. Called when a
        config to train is loaded (check_method_run), not for the stored config of a run already trained."""

    def prepare_model(self, model: nn.Module) -> None:
        """Wrap or freeze layers before the optimiser is built (full-rank: nothing to do). Also used
        to rebuild a model from a checkpoint: after `load_state_dict`, it gives the saved structure."""

    def build_optimizer(self, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
        groups = param_groups(model, self.cfg.train.weight_decay)
        check_coverage(model, groups)
        return build_adamw(groups, self.cfg.train, device)

    def rebuild_optimizer(self, model: nn.Module, device: torch.device, old: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """A new optimiser for a restructured model; parameters that survived keep their state."""
        new = self.build_optimizer(model, device)
        for group in new.param_groups:
            for p in group["params"]:
                if p in old.state:
                    new.state[p] = old.state[p]
        return new

    def lr_multiplier(self, step: int) -> float:
        t = self.cfg.train
        return cosine_with_warmup(step, t.max_steps, t.warmup_steps, t.min_lr_ratio)

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, notify: Notify | None = None) -> StepEvents:
        """Called after optimiser step `step` (1-based count of completed steps)."""
        return StepEvents({})

    def adapter_facts(self, model: nn.Module) -> dict[str, dict[str, float]]:
        """Per-layer facts of the adapters the method wrapped ({name: {rank, scaling}}), written into each
        checkpoint's meta (`adapters`) so a reader merges it without the method (rankscope.adapters.stored).
        None wrapped: {}."""
        return {}

    def capture_grads(self, model: nn.Module, on: bool) -> None:
        """Start (on) or stop capturing the gradients of weights the method froze behind adapters, for
        checkpoint.save_grads (the training loop calls it around a snapshot step). Nothing frozen: no-op."""

    def captured_grads(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The captured gradients by state-dict key (this process's, not yet reduced over ranks); none: {}."""
        return {}

    def take_files(self) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
        """(tensors, metadata) the method wants written to the run folder as safetensors files, by
        path relative to it; handed over once (the training loop writes them, on rank 0)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable method state saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def report(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"method": self.name, "trainable_params": trainable, "optimizer_state_bytes": optimizer_state_bytes(optimizer)}


def schedule_must_fit(cfg, option: str, value: int, steps: int, what: str, per_run: int = 10,
                      also: Callable[[int], str] | None = None) -> None:
    """Refuse `method.<name>.<option>=value` unless value < steps (the steps the period runs in):
    otherwise `what` never happens. The fix suggests `per_run` periods per run (the paper's ratio:
    Weiss et al. merge 10 times in 20k steps); `also(suggested)` names further overrides the fix needs."""
    if value < steps:
        return
    key = f"method.{cfg.method.name}.{option}"
    suggest = max(1, steps // per_run)
    raise ConfigError(f"{key}={value} does not fit a {steps}-step run (train.max_steps={cfg.train.max_steps}): {what}; "
                      f"set {key}={suggest}{also(suggest) if also else ''} ({per_run} per run, the paper's ratio) "
                      f"or raise train.max_steps above {value + cfg.train.max_steps - steps}")


def emit(notify: Notify | None, event: str, step: int, model: nn.Module) -> dict[str, Any]:
    """Tell the training loop's `notify` about an event; the rows it returns (or none)."""
    return (notify(event, step, model) or {}) if notify is not None else {}
