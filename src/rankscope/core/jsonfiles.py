"""Reading the small JSON / YAML files of run and study folders (summary.json, eval.json, sweep.json,
config.yaml, metrics.jsonl) so that a truncated, hand-edited or foreign file is one line naming the file
and the fix, never a traceback from deep inside the code that used it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from rankscope.core.errors import DataError, RankscopeError
from rankscope.core.schema import safe_load  # duplicate keys refused


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:100]


def _read_mapping(path: str | Path, fmt: str, parse, bad: tuple[type[Exception], ...], fix: str,
                  error: type[RankscopeError]) -> dict[str, Any]:
    """`parse(text)` of `path`, which must give a mapping (None: an empty one); `error` naming the file,
    what is wrong with it and `fix` otherwise."""
    path = Path(path)
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} does not exist; {fix}") from None
    except (OSError, UnicodeDecodeError, RecursionError, *bad) as e:
        raise error(f"{path} is not valid {fmt} ({_first_line(e)}); {fix}") from None
    if data is None and fmt == "YAML":
        return {}
    if not isinstance(data, dict):
        raise error(f"{path} holds a {fmt} {type(data).__name__}, not {'an object' if fmt == 'JSON' else 'a mapping'}; {fix}")
    return data


def read_json_object(path: str | Path, fix: str, error: type[RankscopeError] = DataError) -> dict[str, Any]:
    """The JSON object in `path`; `error` naming the file, what is wrong with it and `fix` otherwise."""
    return _read_mapping(path, "JSON", json.loads, (ValueError,), fix, error)


def read_yaml_mapping(path: str | Path, fix: str, error: type[RankscopeError] = DataError) -> dict[str, Any]:
    """The YAML mapping in `path` (an empty file is an empty mapping); `error` otherwise."""
    return _read_mapping(path, "YAML", safe_load, (yaml.YAMLError,), fix, error)


def read_jsonl_objects(path: str | Path, skipped: list[int] | None = None) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, one per line. Lines that are not one (a torn last line of an
    interrupted run, undecodable bytes, a bare number) are skipped, their line numbers appended to
    `skipped` for the caller to report: a metrics log stays readable."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if isinstance(row, dict):
            out.append(row)
        elif skipped is not None:
            skipped.append(n)
    return out
