"""Training methods. A method = how the model is adapted + its optimiser groups + its schedule
+ what happens after each step (merges, resets, re-drawn supports). Registered by name:
`method.name` in the config picks one; an unknown name lists the valid ones.
"""

from __future__ import annotations

from typing import Callable

from rankscope.errors import ConfigError
from rankscope.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def wrap(cls: type[Method]) -> type[Method]:
        METHODS[name] = cls
        cls.name = name
        return cls

    return wrap


def build_method(cfg) -> Method:
    _load_builtin()
    if cfg.method.name not in METHODS:
        raise ConfigError(f"unknown method.name {cfg.method.name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[cfg.method.name](cfg)


def _load_builtin() -> None:
    # importing a method module registers it
    import rankscope.methods.base  # noqa: F401
    for mod in ("lora", "relora", "sparse", "galore", "adaptive", "hybrid"):
        try:
            __import__(f"rankscope.methods.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"rankscope.methods.{mod}":
                raise


register_method("full")(Method)
