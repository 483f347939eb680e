"""Optimiser parameter groups (asserted to cover every trainable parameter exactly once) and AdamW."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from rankscope.config import TrainConfig
from rankscope.model import DEFAULT_TARGETS


def param_groups(model: nn.Module, weight_decay: float, exclude: set[int] | None = None) -> list[dict]:
    """Decay 2-D weights (linears, embeddings); never norms. `exclude` holds ids of parameters
    another group owns (e.g. LoRA factors with their own settings)."""
    exclude = exclude or set()
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen or id(p) in exclude:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}, {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def check_coverage(model: nn.Module, groups: list[dict]) -> None:
    """Every trainable parameter in exactly one group (nanochat's habit): silent omissions are bugs."""
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups)), "a parameter is in two optimiser groups"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    missing = trainable - set(in_groups)
    assert not missing, f"{len(missing)} trainable parameters are in no optimiser group"
    assert set(in_groups) <= trainable, "an optimiser group holds a frozen parameter"


def build_adamw(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """torch's fused AdamW on CPU and CUDA, for full-rank and adapter groups alike: one kernel per
    tensor instead of foreach's sequence of list ops, a fraction of foreach's step time on a CPU
    (bench/README.md, "Measurements behind the code"). Also for FSDP's sharded (DTensor) parameters, so DDP and FSDP runs round alike."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Each group's learning rate: `lr` times the group's `lr_scale` (1 unless a method sets one)."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def targeted_weights(model: nn.Module, targets: list[str]) -> list[nn.Parameter]:
    """The weight of every nn.Linear whose attribute name is in `targets`, in model order."""
    found = [m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    return list({id(p): p for p in found}.values())


def targeted_groups(model: nn.Module, cfg: TrainConfig, targets: list[str], name: str, **flags) -> list[dict]:
    """Default groups for everything, plus one group `name` (with `flags`) holding the targeted
    linears' weights: how SO and GaLore hand their matrices to their own optimiser rules."""
    special = targeted_weights(model, targets)
    if not special:
        from rankscope.core.errors import ConfigError

        raise ConfigError(f"method.targets={targets} matches no linear layer; valid names: {', '.join(DEFAULT_TARGETS)}")
    groups = param_groups(model, cfg.weight_decay, exclude={id(p) for p in special})
    groups.append({"params": special, "weight_decay": cfg.weight_decay, "name": name, **flags})
    check_coverage(model, groups)
    return groups


# --------------------------------------------------------------------------- split AdamW
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
    (SO's sparse supports, GaLore's projection); the loop, the step counter and the dense groups
    (embeddings, norms, head: `dense_adamw_`) are shared. Parameters are numbered in group order.
    State keys in `index_keys` hold int64 indices and stay int64 through `load_state_dict`."""

    flag = ""
    index_keys: tuple[str, ...] = ()

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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts every floating-point parameter's state to the parameter's dtype, which would
        # turn int64 supports into floats: keep them aside and restore them as int64
        kept = {(k, key): s.pop(key) for k, s in state_dict["state"].items() for key in self.index_keys if key in s}
        try:
            super().load_state_dict(state_dict)
        finally:
            for (k, key), s in kept.items():
                state_dict["state"][k][key] = s
        params = [p for g in self.param_groups for p in g["params"]]
        for (k, key), s in kept.items():
            self.state[params[int(k)]][key] = s.to(device=params[int(k)].device, dtype=torch.long)
