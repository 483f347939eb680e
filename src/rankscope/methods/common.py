"""Pieces several methods share: seeded generators and the selection of targeted linears."""

from __future__ import annotations

from fnmatch import fnmatch

import numpy as np
import torch
import torch.nn as nn

from rankscope.core.errors import ConfigError
from rankscope.model import DEFAULT_TARGETS


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from integers (seed, purpose, cycle, index): identical on every
    process and device, so re-drawn adapters and pruning masks agree across distributed ranks."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1))
    return g


def target_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """Targeted linears by module name in model order; a wrapped one (any module holding its
    linear as `.base`, e.g. a LoRALinear) is given by its base linear."""
    out = {}
    for name, m in model.named_modules():
        attr = name.rsplit(".", 1)[-1]
        if attr not in targets or name.endswith(".base"):
            continue
        if isinstance(getattr(m, "base", None), nn.Linear):
            out[name] = m.base
        elif isinstance(m, nn.Linear):
            out[name] = m
    if not out:
        raise ConfigError(f"method.targets={targets} matches no linear layer; valid names: {', '.join(DEFAULT_TARGETS)}")
    return out


def matches(name: str, patterns: list[str]) -> bool:
    """`wv` matches any `...wv`; `blocks.0.*` (fnmatch) matches module names."""
    return any(name.rsplit(".", 1)[-1] == p or fnmatch(name, p) for p in patterns)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
