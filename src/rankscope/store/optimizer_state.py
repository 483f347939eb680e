"""An optimiser's state in a checkpoint: any torch optimiser's state_dict flattened into tensors (the
`optimizer.safetensors` file) and plain JSON (meta.json's `optimizer`), and loaded back with one error line
when it does not fit the run."""

from __future__ import annotations

from typing import Any

import torch

from rankscope.core.errors import CheckpointError


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten any optimiser's state_dict: tensors into a dict, everything else into JSON."""
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v
            else:
                plain[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "plain_state": plain}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    try:
        for key, t in tensors.items():
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = t
        for key, v in meta.get("plain_state", {}).items():
            idx, k = key.split(".", 1)
            state.setdefault(int(idx), {})[k] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"optimizer state does not match this run ({e}); resume with the config the run was started with") from None
