"""The stored adapter format: how a checkpoint keeps an adapted layer and how a reader turns it back
into dense weights, without building any method.

A LoRA layer `<name>` is stored as `<name>.base.weight`, `<name>.lora_A` (r x in) and `<name>.lora_B`
(out x r); each checkpoint's meta holds every adapted layer's rank and scaling (`adapters`, from
`adapter_layout`), so a model is rebuilt from the checkpoint alone and `merged_state_dict` merges any
of them exactly. Analysis, export, evaluation loading and the training loop's checkpoints read and
write this format through here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from rankscope.adapters.lora import LoRALinear, lora_modules
from rankscope.core.errors import CheckpointError


def adapter_layout(model: nn.Module) -> dict[str, dict[str, float]]:
    """{module name: {"rank": r, "scaling": alpha / r}} of every LoRALinear: saved in each
    checkpoint's method state (`adapters`), so a checkpoint is read without its config's rank."""
    return {name: {"rank": m.rank, "scaling": m.scaling} for name, m in lora_modules(model).items()}


def merged_state_dict(state: dict[str, torch.Tensor], adapters: dict[str, dict[str, float]]) -> dict[str, torch.Tensor]:
    """A plain dense state dict from a stored one: each layer of `adapters` ({name: {rank,
    scaling}}, `adapter_layout`) stored as `<name>.base.weight` + `lora_A` + `lora_B` becomes
    `<name>.weight` = its LoRALinear's `effective_weight()` (fp32: W + delta_weight()); other
    tensors pass through. The one merge analysis and export use."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, facts in adapters.items():
        keys = {k: next((c for c in (f"{name}.{k}", f"{name}.{k}.weight") if c in state), None) for k in ("base.weight", "lora_A", "lora_B")}
        if None in keys.values():
            raise CheckpointError(f"{name} is listed as a LoRA layer but the checkpoint lacks its base weight or lora_A/lora_B factors")
        base, a, b = (state[keys[k]] for k in ("base.weight", "lora_A", "lora_B"))
        rank = int(facts["rank"])
        if a.shape != (rank, base.shape[1]) or b.shape != (base.shape[0], rank):
            raise CheckpointError(f"{name}: LoRA factors A {tuple(a.shape)} and B {tuple(b.shape)} do not fit rank {rank} "
                                  f"on the {tuple(base.shape)} base weight")
        layer = LoRALinear.from_tensors(base, a, b, float(facts["scaling"]))
        out[f"{name}.weight"] = layer.effective_weight()
        used |= set(keys.values())
        if f"{name}.base.bias" in state:
            out[f"{name}.bias"] = state[f"{name}.base.bias"]
            used.add(f"{name}.base.bias")
    for key, t in state.items():
        if key in used:
            continue
        if ".lora_" in key or ".base." in key:
            raise CheckpointError(f"checkpoint tensor {key} is an adapter without its base weight or rank; cannot merge it")
        out[key] = t
    return out


def update_factors(state: dict[str, torch.Tensor], adapters: dict[str, dict[str, float]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (scaling * B, A)} in fp32: the thin factors of each layer's delta_weight(), for
    factored spectra (dW = (scaling B) A)."""
    return {n: (state[f"{n}.lora_B"].float() * float(f["scaling"]), state[f"{n}.lora_A"].float()) for n, f in adapters.items()}


def stored_adapters(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per-layer rank and scaling of a checkpoint: its `adapters` metadata, or (checkpoints written
    before it existed) the config's alpha / method.rank for every stored lora_A, whose rank must then
    be method.rank (adaptive runs: any rank, scaling alpha / method.rank, as they train)."""
    if isinstance(meta.get("adapters"), dict) and meta["adapters"]:
        return meta["adapters"]
    stored = {k.rsplit(".lora_A", 1)[0]: int(t.shape[0]) for k, t in state.items() if k.endswith((".lora_A", ".lora_A.weight"))}
    if not stored:
        return {}
    from rankscope.config import method_options

    cfg = meta.get("config") or {}
    method = method_options(cfg.get("method") or {})
    rank, alpha = method.get("rank"), method.get("alpha")
    if rank is None or alpha is None:
        raise CheckpointError("the checkpoint holds LoRA factors but its config has no method.rank / method.alpha")
    if (cfg.get("method") or {}).get("name") != "adaptive" and set(stored.values()) != {int(rank)}:
        raise CheckpointError(f"the checkpoint's LoRA factors have rank {sorted(set(stored.values()))} but its config says method.rank={rank}")
    return {n: {"rank": r, "scaling": float(alpha) / float(rank)} for n, r in stored.items()}
