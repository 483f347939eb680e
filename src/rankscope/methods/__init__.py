"""Training methods. A method = how the model is adapted + its optimiser groups + its schedule
+ what happens after each step (merges, resets, re-drawn supports), one module each, with its own
config dataclass (`method.<name>` in the YAML) and capabilities.

The registry is built when this package is imported, by `discover_methods`: it imports every module
of the package and registers the classes each one lists in a module-level `METHODS = [...]` (so a new
method is one file dropped in here that ends with `METHODS = [TheMethod]`; base.py lists `Method`
itself, the full-rank method, and the shared modules common and memory list none).
`method.name` picks one; an unknown name lists the valid ones. `register_method` adds one from outside
the package (docs/adding-a-method.md).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Iterable

from rankscope.core.errors import ConfigError
from rankscope.methods.base import Method


def check_method(cls, where: str) -> type[Method]:
    """`cls` itself if it is a Method subclass with a `name`; otherwise a TypeError naming `where`."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not isinstance(cls.name, str) or not cls.name:
        raise TypeError(f"{where} takes subclasses of rankscope.methods.base.Method with a `name`, not {cls!r}")
    return cls


def methods_in(module) -> list[type[Method]]:
    """The methods `module` exports: the classes its module-level `METHODS` list names, in that order
    (none when it has no `METHODS`: a Method subclass the module defines but does not list is not one)."""
    listed = getattr(module, "METHODS", None)
    if listed is None:
        return []
    if not isinstance(listed, (list, tuple)):
        raise TypeError(f"{module.__name__}.METHODS must be a list of Method classes, not {type(listed).__name__}")
    return [check_method(cls, f"{module.__name__}.METHODS") for cls in listed]


def discover_methods(package: str = __name__, path: Iterable[str] | None = None) -> dict[str, type[Method]]:
    """Import each module of `package` (found on `path`, default the package's own folder) and collect
    the methods each lists in its `METHODS`, by name: base (the full-rank `Method`) first, then the
    modules in alphabetical order."""
    found: dict[str, type[Method]] = {}
    modules = pkgutil.iter_modules(__path__ if path is None else list(path))
    for info in sorted(modules, key=lambda m: (m.name != "base", m.name)):
        if info.name.startswith("_"):
            continue
        for cls in methods_in(importlib.import_module(f"{package}.{info.name}")):
            if found.get(cls.name, cls) is not cls:
                raise TypeError(f"two methods are named {cls.name!r}: {found[cls.name].__module__} and {cls.__module__}")
            found[cls.name] = cls
    return found


METHODS: dict[str, type[Method]] = discover_methods()


def register_method(cls: type[Method]) -> type[Method]:
    """Add a method class (its `name`, `config_class` and hooks; see methods/base.py) to the registry."""
    METHODS[check_method(cls, "register_method").name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"unknown method.name {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def fsdp_methods() -> list[str]:
    return [n for n, cls in METHODS.items() if cls.supports_fsdp]


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
