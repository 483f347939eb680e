"""The run config resolved against the methods registry: `load_config` and `config_from_dict` build the
registry-free schema of rankscope.config, the `method` section by `method_config` (its options are the
named method's own dataclass), then run the method's checks across sections.

`method: {name: relora, relora: {rank: 8}}` is the one form: an option directly under `method` (the flat
form of earlier releases, `method.rank=8`) is refused in one line that names the nested key to write.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from rankscope.config import MethodConfig, RunConfig, describe_fields as schema_fields, read_config_data, run_config
from rankscope.core.errors import ConfigError, RankscopeError
from rankscope.core.schema import build, unknown_key
from rankscope.methods.registry import METHODS, fsdp_methods, method_class, method_option_names


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults < YAML file (may name a `base:` file) < dotted overrides; validated."""
    return config_from_dict(read_config_data(path, overrides))


def config_from_dict(data: dict[str, Any], schedule: bool = True) -> RunConfig:
    """A validated RunConfig; `schedule=False` for a stored run's config (read, not trained again: the
    method's schedule is not checked, and flat options an earlier release stored for other methods are dropped)."""
    cfg = run_config(data, lambda section, where: method_config(section, where, stored=not schedule))
    check_method_run(cfg, schedule)
    return cfg


def check_method_run(cfg: RunConfig, schedule: bool = True) -> None:
    """The method's checks across sections: what train.parallel=fsdp allows, the method's own (`check_run`),
    and with `schedule` that a period the method exists for comes round in the run (`check_schedule`)."""
    cls = method_class(cfg.method.name)
    if cfg.train.parallel == "fsdp" and not cls.supports_fsdp:
        raise ConfigError(f"train.parallel=fsdp supports method.name in {fsdp_methods()}, not {cls.name!r}; use train.parallel=ddp")
    cls.check_run(cfg)
    if schedule:
        cls.check_schedule(cfg)


def method_config(data: Any, where: str = "method", stored: bool = False) -> MethodConfig:
    """`{name, <name>: {...}, <other method>: {...}}` -> MethodConfig: the named method's section built as its
    options, every other method's section checked the same way and kept as given (`MethodConfig.others`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    name = data.get("name", "full")
    if not isinstance(name, str):
        raise ConfigError(f"config key '{where}.name' must be str, got {name!r}")
    own = method_option_names(name)  # an unknown name lists the valid ones
    flat = {k: v for k, v in data.items() if k != "name" and k not in METHODS}
    if stored:  # an earlier release wrote other methods' options back flat, unused: not this run's
        flat = {k: v for k, v in flat.items() if k in own}
    if flat:
        raise ConfigError(flat_error(where, name, flat))
    sections: dict[str, dict[str, Any]] = {}
    built: dict[str, Any] = {}
    for key in [k for k in data if k in METHODS]:
        section = data[key] if data[key] is not None else {}
        if not isinstance(section, dict):
            raise ConfigError(f"{where}.{key} must be a mapping of {key}'s options, got {type(section).__name__}")
        built[key], sections[key] = checked_options(key, section, f"{where}.{key}"), section
    options = built[name] if name in built else checked_options(name, {}, f"{where}.{name}")
    return MethodConfig(name, options, {k: v for k, v in sections.items() if k != name})


def checked_options(name: str, section: dict[str, Any], where: str) -> Any:
    """Method `name`'s options from its section, validated: a bad value in any section is refused, not ignored."""
    options = build(method_class(name).config_class, section, where)
    if hasattr(options, "validate"):
        options.validate()
    return options


def flat_error(where: str, name: str, flat: dict[str, Any]) -> str:
    """The one line refusing options written directly under `method`: the nested key to write instead (under this
    run's method where it has the option, else under the method with fewest options that has it), or the valid keys."""
    key = sorted(flat)[0]
    having = {m: len(method_option_names(m)) for m in METHODS if key in method_option_names(m)}
    if not having:
        return str(unknown_key("config", f"{where}.{key}", ["name", *sorted(METHODS)],
                               f"(the options of method {name!r} go under {where}.{name}: {', '.join(sorted(method_option_names(name))) or 'none'})"))
    owner = name if name in having else min(having, key=having.get)
    return (f"method options go under the method's own section: write {where}.{owner}.{key}={override_text(flat[key])} "
            f"(YAML: {where}: {{name: {name}, {owner}: {{{key}: ...}}}}), not {where}.{key}")


def override_text(value: Any) -> str:
    """`value` as the right-hand side of a `key=value` override that parses back to it (one shell word
    where the value has no spaces): [wq,wk], 0.999, true."""
    if isinstance(value, list):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def switch_method(cfg: RunConfig, name: str) -> RunConfig:
    """A copy of `cfg` that runs method `name` (e.g. memory matching's reference method): its options are the
    section given for it beside the old one (`cfg.method.others`) over the old method's values of the options
    both methods have, over its defaults."""
    out = copy.deepcopy(cfg)
    if name == cfg.method.name:
        return out
    keep = method_option_names(name)
    old = out.method.options
    shared = {f.name: getattr(old, f.name) for f in dataclasses.fields(old) if f.name in keep} if old is not None else {}
    others = dict(out.method.others)
    if old is not None:
        others[cfg.method.name] = dataclasses.asdict(old)
    given = others.pop(name, {})
    out.method = MethodConfig(name, checked_options(name, {**shared, **given}, f"method.{name}"), others)
    return out


def describe_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted name, type, default, help) for every field of the run config, each method's options under
    `method.<name>.`, for `rankscope info --fields` and the study grid's check of its keys."""
    return schema_fields(cls, prefix, method_rows)


def method_rows(prefix: str) -> list[tuple[str, str, Any, str]]:
    rows = [(f"{prefix}name", "str", "full", f"training method: {', '.join(METHODS)} (see rankscope.methods)")]
    for name, m in METHODS.items():
        rows += schema_fields(m.config_class, f"{prefix}{name}.")
    return rows


def normalised_config(previous: dict) -> dict:
    """A stored config as this version resolves it (e.g. flat method options that earlier releases wrote), for
    comparing a run folder's config.yaml with a resumed run's; the stored form itself when it no longer loads."""
    try:
        return config_from_dict(json.loads(json.dumps(previous)), schedule=False).to_dict()
    except RankscopeError:
        return previous
