"""The one schema loader: every YAML file the lab reads (run configs, study files, findings rules, SLURM
resources) is a tree of `option()` dataclasses built by `build`, which refuses an unknown key, a wrong type or a
non-finite number in one line that names the key and lists the valid ones. `safe_load` / `read_yaml` refuse
duplicate keys; `parse_overrides` turns dotted `key=value` pairs into a nested dict.

A dataclass may shape its input before it is built (`schema_prepare(data, where)`, e.g. a model preset filling in
its fields), and a type may build itself (`schema_build(data, where)`, e.g. a section whose keys are
names from a registry). Nothing here knows any particular schema.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml

from rankscope.core.errors import ConfigError


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(type_ok(v, item) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _coerce_float(value: Any, tp: Any) -> Any:
    """YAML 1.1 reads `3e-4` (no dot) as a string and `1` as an int; a float field takes both."""
    if tp is not float and not (typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp)):
        return value
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            return float(value)
    except ValueError:
        return value
    except OverflowError:  # an integer beyond float's range: refused as not finite
        return math.inf
    return value


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def build(cls: type, data: Any, where: str = "", kind: str = "config") -> Any:
    """`cls(**data)`, checked: every key a field of `cls`, every value of its field's type (nested dataclasses built
    in turn). `where` is the dotted path of `data` in its file, `kind` the word the errors use ("config", "study")."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or kind} must be a mapping, got {type(data).__name__}")
    prepare = getattr(cls, "schema_prepare", None)
    if prepare is not None:
        data = prepare(data, where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise unknown_key(kind, path, names)
        kwargs[key] = build_value(hints[key], value, path, kind, fields[key].metadata.get("help", ""))
    return cls(**kwargs)


def unknown_key(kind: str, path: str, valid, hint: str = "") -> ConfigError:
    """The one line for a key a schema does not have: the key and the valid ones (`hint`: what to write instead)."""
    return ConfigError(f"unknown {kind} key {path!r}; valid keys here: {', '.join(valid)}" + (f" {hint}" if hint else ""))


def build_value(tp: Any, value: Any, path: str, kind: str = "config", help: str = "") -> Any:
    """One field's value, checked against its type `tp`; a wrong type's error quotes the field's help line."""
    builder = getattr(tp, "schema_build", None)
    if builder is not None:
        return builder(value or {}, path)
    if dataclasses.is_dataclass(tp):
        return build(tp, value or {}, path, kind)
    value = _coerce_float(value, tp)
    if not type_ok(value, tp):
        raise ConfigError(f"{kind} key {path!r} must be {type_name(tp)}, got {value!r}" + (f": {help}" if help else ""))
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{kind} key {path!r} must be a finite number, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:  # beyond every tensor's and C's int
        raise ConfigError(f"{kind} key {path!r} must be a whole number below 2**63, got one with {len(str(abs(value)))} digits")
    return value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-3", "method.name=relora"]` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like section.key=value, e.g. train.lr=1e-3")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return out


def merge_dicts(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last in silence)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(None, None, f"found duplicate key {key!r}; keep one", key_node.start_mark)
        return super().construct_mapping(node, deep)


def safe_load(text: str) -> Any:
    """yaml.safe_load, refusing duplicate keys: every YAML file rankscope reads goes through it."""
    loader = UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML file such as configs/micro.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass a YAML file such as configs/micro.yaml")
    if path.resolve() in _seen:
        raise ConfigError(f"config file {path} names itself as a base (directly or through others); break the `base:` cycle")
    try:
        data = safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    except (OSError, RecursionError) as e:
        raise ConfigError(f"config file {path} cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})") from None
    if data is None:  # an empty (or comments-only) file is a save gone wrong more often than a wish for every default
        raise ConfigError(f"config file {path} is empty; put sections in it (see configs/micro.yaml), or write {{}} for all defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model, data, train, ...)")
    base = data.pop("base", None)  # `base: other.yaml` inherits another config, relative to this file
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"config file {path}: `base:` must name a YAML file, got {base!r}")
    if base:
        data = merge_dicts(read_yaml(path.parent / base, (*_seen, path.resolve())), data)
    return data
