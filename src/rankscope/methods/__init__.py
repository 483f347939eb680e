"""Training methods. A method = how the model is adapted + its optimiser groups + its schedule
+ what happens after each step (merges, resets, re-drawn supports), one module each, with its own
config dataclass (`method.<name>` in the YAML) and capabilities. The registry below is explicit:
`method.name` picks one; an unknown name lists the valid ones. `register_method` adds one from
outside the package (docs/adding-a-method.md).
"""

from __future__ import annotations

from rankscope.errors import ConfigError
from rankscope.methods.adaptive import AdaptiveReLoRAMethod
from rankscope.methods.base import Method
from rankscope.methods.galore import GaLoreMethod
from rankscope.methods.hybrid import HybridReLoRAMethod
from rankscope.methods.lora import LoRAMethod
from rankscope.methods.relora import ReLoRAMethod
from rankscope.methods.sparse import SingleSupportMethod, SparseMethod

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (Method, LoRAMethod, ReLoRAMethod, SparseMethod, SingleSupportMethod, GaLoreMethod, AdaptiveReLoRAMethod, HybridReLoRAMethod)
}


def register_method(cls: type[Method]) -> type[Method]:
    """Add a method class (its `name`, `config_class` and hooks; see methods/base.py) to the registry."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not isinstance(cls.name, str) or not cls.name:
        raise TypeError("register_method takes a subclass of rankscope.methods.base.Method with a `name`")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"unknown method.name {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def fsdp_methods() -> list[str]:
    return [n for n, cls in METHODS.items() if cls.supports_fsdp]


def build_method(cfg) -> Method:
    return method_class(cfg.method.name)(cfg)


def build_model(cfg, method_state: dict | None = None, device=None):
    """The run's model and method: the Decoder from `cfg.train.seed`, then the method's structure
    (adapters, ...) for its state `method_state` (a checkpoint's; None: a fresh run). Training,
    resuming, loading, memory matching and export all build through here. Returns (model, method)."""
    import torch

    from rankscope.model import Decoder

    torch.manual_seed(cfg.train.seed)
    model = Decoder(cfg.model)
    method = build_method(cfg)
    if method_state:
        method.load_state_dict(method_state)
    method.prepare_model(model)
    if device is not None:
        model.to(device)
    return model, method
