"""What the training loop does with a step's gradients besides stepping: clip them, name the first
non-finite one when a step blows up, and snapshot them for checkpoint.save_grads. Every function
works on a plain, DDP-wrapped or FSDP-sharded model (rankscope.parallel.sharding) and is collective where
the gradients are sharded or the ranks must agree."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from rankscope.parallel import distributed, sharding
from rankscope.parallel.distributed import DistInfo
from rankscope.core.errors import TrainingError


def clip_grads(model: nn.Module, max_norm: float) -> float:
    """Clip the total gradient norm to `max_norm` (0: no clipping); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return float(sharding.full(norm))  # under FSDP the norm is a DTensor (already reduced)


def first_bad_grad(model: nn.Module, sharded: bool, device: torch.device) -> str:
    """The name of the first parameter with a non-finite gradient (under FSDP every rank is asked
    about its shard, so all ranks must call it)."""
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        bad = not torch.isfinite(sharding.local(p.grad)).all()
        if distributed.any_rank_true(bad, device) if sharded else bad:
            return name
    return "none (the loss itself overflowed)"


def check_finite(loss: float, norm: float | None, step: int, model: nn.Module, sharded: bool, device: torch.device) -> None:
    """Stop a step whose loss (the ranks' mean) or gradient norm (None: not yet computed) is not finite,
    with a TrainingError naming the first non-finite gradient. Every rank sees the same values, so all raise."""
    if not math.isfinite(loss):
        bad = first_bad_grad(model, sharded, device)
        raise TrainingError(f"non-finite loss ({loss}) at step {step + 1}; first non-finite gradient: {bad}. "
                            "Lower train.lr or use train.precision=fp32; the last good checkpoint is kept")
    if norm is not None and not math.isfinite(norm):
        bad = first_bad_grad(model, sharded, device)
        raise TrainingError(f"non-finite gradient norm at step {step + 1} in {bad}; "
                            "lower train.lr or set train.grad_clip; the last good checkpoint is kept")


def gradient_snapshot(model: nn.Module, dist: DistInfo, captured: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The 2-D gradients of this step's loss (summed over micro-batches, averaged over ranks as
    DDP / FSDP average them), before clipping, fp32 on rank 0's CPU (None elsewhere); under FSDP
    gathered one tensor at a time. `captured` adds the method's gradients of frozen weights
    (Method.captured_grads: for LoRA-wrapped linears `<name>.base.weight`, the gradient with respect
    to the effective weight), each rank's own, all-reduced here."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.grad is not None and p.dim() == 2:
            g = sharding.full(p.grad)
            if dist.is_main:
                out[name] = g.float().cpu().clone()
    for name, g in captured.items():
        if dist.enabled:  # each rank holds its micro-batches' sum: average as DDP does
            torch.distributed.all_reduce(g)
            g = g / dist.world_size
        if dist.is_main:
            out[name] = g.float().cpu().clone()
    return out if dist.is_main else None
