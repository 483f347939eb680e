"""Pieces several methods share: the selection of targeted linears (seeded generators and module
replacement live below, in rankscope.adapters.common, which the adapters use too)."""

from __future__ import annotations

from fnmatch import fnmatch

import torch.nn as nn

from rankscope.adapters.common import replace_module, seeded_generator  # noqa: F401  (re-exported: the methods' seeded draws)
from rankscope.core.errors import ConfigError
from rankscope.model import DEFAULT_TARGETS


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
