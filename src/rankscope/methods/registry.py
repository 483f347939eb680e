"""The methods registry, in one visible place: `METHODS` lists every method class the package ships,
by name (full first, then the modules alphabetically). A method elsewhere joins with `register_method`.
Both refuse a second method of the same name, so no method silently replaces another.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from rankscope.core.errors import ConfigError
from rankscope.methods.adaptive import AdaptiveReLoRAMethod
from rankscope.methods.base import Method
from rankscope.methods.galore import GaLoreMethod
from rankscope.methods.hybrid import HybridReLoRAMethod
from rankscope.methods.lora import LoRAMethod
from rankscope.methods.relora import ReLoRAMethod
from rankscope.methods.sparse import SingleSupportMethod, SparseMethod


def check_method(cls, where: str) -> type[Method]:
    """`cls` itself if it is a Method subclass with a `name`; otherwise a TypeError naming `where`."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not isinstance(cls.name, str) or not cls.name:
        raise TypeError(f"{where} takes subclasses of rankscope.methods.base.Method with a `name`, not {cls!r}")
    return cls


def add_method(registry: dict[str, type[Method]], cls, where: str) -> type[Method]:
    """Put `cls` in `registry` under its name; a TypeError where another class has that name."""
    cls = check_method(cls, where)
    if registry.get(cls.name, cls) is not cls:
        raise TypeError(f"two methods are named {cls.name!r}: {registry[cls.name].__module__}.{registry[cls.name].__name__} "
                        f"and {cls.__module__}.{cls.__name__}; rename one")
    registry[cls.name] = cls
    return cls


def registry_of(classes: Iterable[type[Method]], where: str = "rankscope.methods.registry") -> dict[str, type[Method]]:
    """A registry (name -> class) of `classes`, in their order."""
    found: dict[str, type[Method]] = {}
    for cls in classes:
        add_method(found, cls, where)
    return found


METHODS: dict[str, type[Method]] = registry_of([
    Method,                # full: every parameter trained by AdamW (base.py)
    AdaptiveReLoRAMethod,  # adaptive
    GaLoreMethod,          # galore
    HybridReLoRAMethod,    # hybrid
    LoRAMethod,            # lora
    ReLoRAMethod,          # relora
    SparseMethod,          # so
    SingleSupportMethod,   # so_single
])


def register_method(cls: type[Method]) -> type[Method]:
    """Add a method class (its `name`, `config_class` and hooks; see methods/base.py) from outside the package."""
    return add_method(METHODS, cls, "register_method")


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"unknown method.name {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_option_names(name: str) -> set[str]:
    """The options of method `name` (the fields of its `method.<name>` section); unknown names raise ConfigError."""
    return {f.name for f in dataclasses.fields(method_class(name).config_class)}


def fsdp_methods() -> list[str]:
    return [n for n, cls in METHODS.items() if cls.supports_fsdp]
