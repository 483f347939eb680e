"""Training methods. A method = how the model is adapted + its optimiser groups + its schedule
+ what happens after each step (merges, resets, re-drawn supports), one module each, with its own
config dataclass (`method.<name>` in the YAML) and capabilities (`supports_fsdp`, `memory_knob`, ...).

`registry.METHODS` lists the package's methods in one place (a new method is one file plus one line
there; `register_method` adds one from outside the package, docs/adding-a-method.md); a second method
of the same name is refused. `method.name` picks one; an unknown name lists the valid ones.
`runconfig` resolves the run config's `method` section against the registry: `load_config` and
`config_from_dict` are there (rankscope.config is the registry-free schema below it).
"""

from __future__ import annotations

from rankscope.methods.base import Method
from rankscope.methods.registry import (
    METHODS, check_method, fsdp_methods, method_class, method_option_names, register_method, registry_of,
)
from rankscope.methods.runconfig import (
    check_method_run, config_from_dict, describe_fields, load_config, method_config, switch_method,
)

__all__ = ["METHODS", "Method", "build_method", "build_model", "check_method", "check_method_run", "config_from_dict",
           "describe_fields", "fsdp_methods", "load_config", "method_class", "method_config", "method_option_names",
           "register_method", "registry_of", "switch_method"]


def build_method(cfg) -> Method:
    return method_class(cfg.method.name)(cfg)


def build_model(cfg, method_state: dict | None = None, device=None, init: dict | None = None):
    """The run's model and method: the Decoder from `cfg.train.seed`, then the method's structure
    (adapters, ...) for its state `method_state` (a checkpoint's; None: a fresh run). Training,
    resuming, loading, memory matching and export all build through here. `init`: dense weights
    loaded before the method adapts the model (a fine-tune's base, rankscope.train.finetune). Returns (model, method)."""
    import torch

    from rankscope.model import Decoder

    torch.manual_seed(cfg.train.seed)
    model = Decoder(cfg.model)
    if init is not None:
        model.load_state_dict(init)
    method = build_method(cfg)
    if method_state:
        method.load_state_dict(method_state)
    method.prepare_model(model)
    if device is not None:
        model.to(device)
    return model, method
