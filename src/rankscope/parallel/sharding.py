"""FSDP2 (`fully_shard`): weights, gradients and AdamW state sharded over ranks, block by block.

With `train.parallel=fsdp` under torchrun, every decoder block is one `fully_shard` unit and the
root (embedding, final norm, LM head) another. Parameters become DTensors sharded on dim 0; a
block's weights are all-gathered for its forward and backward and freed after, and gradients are
reduce-scattered, so each rank holds 1/N of the weights, gradients and optimiser moments.

The code that touches weights outside forward/backward (ReLoRA merges and adapter re-draws,
optimiser-state pruning, checkpoints, gradient snapshots) goes through the helpers below, which
accept plain tensors and shards alike:

  full(t)           the whole tensor (an all-gather for a DTensor: every rank must call it)
  local(t)          this rank's shard (the tensor itself when unsharded)
  shard_of(x, like) this rank's part of a full tensor x, laid out as `like` (no communication)
  assign_(p, x)     write a full tensor x into a parameter or state tensor, sharded or not

Checkpoints hold full tensors in the same layout as unsharded runs (model keys and optimiser
indices), so a run saved under FSDP resumes under DDP or on one process, and the other way round.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def model_is_sharded(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached; collective for a DTensor (all ranks call it in the same order)."""
    return t.detach().full_tensor() if is_sharded(t) else t.detach()


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_sharded(t) else t


def shard_of(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of the full tensor `x` in the layout of `like` (x itself when `like` is
    plain). Every rank holds the same `x`, so each slices its own rows: no communication."""
    x = x.detach().to(device=like.device)
    if not is_sharded(like):
        return x
    return distribute_tensor(x, like.device_mesh, like.placements, src_data_rank=None).to_local()


@torch.no_grad()
def assign_(target: torch.Tensor, x: torch.Tensor) -> None:
    """target <- x, where x is the full value and target may be a shard."""
    local(target).copy_(shard_of(x, target))


# --------------------------------------------------------------------------- sharding a model
def shard_model(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """fully_shard each decoder block, then the root; in place (the module keeps its names).
    The model may still be on the CPU: fully_shard moves one unit at a time to `device` and keeps
    only this rank's shard there, so the whole model never has to fit on one GPU. Under bf16, weights are all-gathered in bf16 and
    gradients reduced in fp32; the fp32 shards stay the master copy that AdamW and ReLoRA's merges
    update."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": init_device_mesh(device.type, (dist.get_world_size(),))}
    if precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch of a gradient-accumulation step."""
    model.set_requires_gradient_sync(sync)


# --------------------------------------------------------------------------- full state dicts
def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with full tensors, on the CPU of rank 0 (empty elsewhere).
    Collective for a sharded model; the plain state dict otherwise."""
    if not model_is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank passes the same one) into a sharded or plain model."""
    if not model_is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def full_optimizer_tensors(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Gather every sharded optimiser-state tensor, one at a time (collective; the same key order
    on every rank); only a rank with `keep` (rank 0) holds the results, on its CPU."""
    out = {}
    for k, v in tensors.items():
        v = full(v).cpu() if is_sharded(v) else v
        if keep:
            out[k] = v
    return out


def shard_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn full optimiser-state tensors ("state.<index>.<key>", index in param-group order) into
    DTensors laid out as their parameter, where that parameter is sharded."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = {}
    for key, t in tensors.items():
        _, idx, _ = key.split(".", 2)
        p = params[int(idx)] if int(idx) < len(params) else None
        if p is not None and is_sharded(p) and tuple(t.shape) == tuple(p.shape):
            t = DTensor.from_local(shard_of(t.to(p.dtype), p), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        out[key] = t
    return out
