"""Pieces the adapters and the methods share: seeded generators and module replacement. They sit here,
below both, so that `rankscope.adapters` never imports `rankscope.methods` (whose package import loads
every method, some of which wrap layers with these adapters)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from integers (seed, purpose, cycle, index): identical on every
    process and device, so re-drawn adapters and pruning masks agree across distributed ranks."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1))
    return g


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
