"""Run naming: a study point's folder name from its grid values (`method=relora,lr=3e-3,seed=1`), or the study's
`run_name` template filled with them (`{method}-lr{lr}-s{seed}`)."""

from __future__ import annotations

import re
from typing import Any

from rankscope.core.errors import ConfigError


def format_value(v: Any) -> str:
    """A value as it reads in a folder name: 3e-3, 0.5, relora, true."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if v != 0 and (abs(v) < 0.1 or abs(v) >= 1e5):
            mant, exp = f"{v:.6e}".split("e")
            return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "+".join(format_value(x) for x in v)
    return str(v)


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The last dotted part of each key (the section for `*.name`: method.name -> method), or the whole key
    where two keys share a short name."""
    last = [k.split(".")[-2] if k.endswith(".name") and k.count(".") else k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _clean(name: str) -> str:
    return name.replace("/", "-").replace(" ", "") or "base"


def point_name(values: dict[str, Any], template: str | None = None) -> str:
    """`method=relora,lr=3e-3,seed=1`, or the study's `run_name` template filled with the values."""
    short = _short_keys(list(values))
    if template is None:
        return _clean(",".join(f"{short[k]}={format_value(v)}" for k, v in values.items()))
    lookup = {**{k: v for k, v in values.items()}, **{s: values[k] for k, s in short.items()}}

    def fill(m: re.Match) -> str:
        key = m.group(1)
        if key not in lookup:
            raise ConfigError(f"run_name template {template!r} names {{{key}}}, which is not a grid or tuned field; "
                              f"use one of {', '.join('{' + k + '}' for k in sorted(lookup))}")
        return format_value(lookup[key])

    return _clean(re.sub(r"\{([^{}]+)\}", fill, template))
