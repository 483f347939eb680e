"""The runs of a report: finished run folders read (config.yaml, summary.json, eval.json, metrics.jsonl), a study folder's
runs as its sweep.json names them (tuning runs and "= main" controls left out, stray folders excluded by name), failed or
unfinished runs listed, duplicates refused or excluded, and the fields beyond method, size and seed that split groups."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankscope.core.errors import RankscopeError
from rankscope.core.jsonfiles import read_json_object, read_jsonl_objects, read_yaml_mapping
from rankscope.studies.findings.verdicts import CONTROL_SUFFIX, SAME_AS_MAIN


class ReportError(RankscopeError):
    """Nothing to report on, or an unreadable run."""


@dataclass
class Run:
    dir: Path
    name: str
    method: str
    size: str
    seed: int
    config: dict[str, Any]
    summary: dict[str, Any]
    eval: dict[str, Any] = field(default_factory=dict)  # eval.json "metrics" (flat keys)
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl

    @property
    def group(self) -> tuple[str, str]:
        return self.method, self.size

    def value(self, key: str) -> tuple[float | None, str | None]:
        """(value, 'file#key') of a metric: eval keys from eval.json when present, else summary.json."""
        if key in self.eval and _is_eval_key(key):
            return _num(self.eval[key]), f"{self.dir / 'eval.json'}#metrics.{key}"
        if key in self.summary:
            return _num(self.summary[key]), f"{self.dir / 'summary.json'}#{key}"
        return None, None

    def merge_steps(self) -> list[tuple[int, int]]:
        """(step, tokens) of every ReLoRA merge-and-restart (rows with `relora_merge`)."""
        return [(int(r["step"]), int(r.get("tokens", 0))) for r in self.rows if "relora_merge" in r]


def _is_eval_key(key: str) -> bool:
    return key.startswith(("val_", "test_", "blimp"))


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows; torn or foreign lines skipped (rankscope.core.jsonfiles.read_jsonl_objects) and counted
    in a one-line warning."""
    skipped: list[int] = []
    rows = read_jsonl_objects(path, skipped)
    if skipped:
        warnings.warn(f"{path}: {len(skipped)} line(s) are not JSON objects and were left out of the report "
                      f"(the first at line {skipped[0]})", stacklevel=2)
    return rows


SWEEP_FIX = "re-run `rankscope sweep STUDY` to rewrite it (finished runs are kept), or delete it and report the run folders"


def read_sweep_json(path: Path) -> dict[str, Any]:
    """A study's sweep.json, checked for what the report reads: `runs`, a list of objects with a `name`,
    and `tuning`, an object with a `field` where present."""
    data = read_json_object(path, SWEEP_FIX, ReportError)
    runs = data.get("runs", [])
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str) and r["name"] for r in runs):
        raise ReportError(f"{path}: `runs` must be a list of objects with a name; {SWEEP_FIX}")
    tuning = data.get("tuning")
    if tuning and not (isinstance(tuning, dict) and isinstance(tuning.get("field"), str)):
        raise ReportError(f"{path}: `tuning` must be an object with a field; {SWEEP_FIX}")
    return {**data, "runs": runs}


def size_label(model: dict[str, Any]) -> str:
    """The preset's name where the model is that preset, else its shape (`d48-L12`): a preset with a field overridden (a
    narrower width at the same depth) is another size, never the preset's."""
    from rankscope.config import PRESETS

    preset = model.get("preset")
    body = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")
    if preset and all(model.get(k, v) == v for k, v in PRESETS.get(preset, {}).items() if k in body):
        return preset
    return f"d{model.get('d_model')}-L{model.get('n_layers')}"


def load_run(run_dir: Path) -> Run:
    cfg_path, sum_path = run_dir / "config.yaml", run_dir / "summary.json"
    if not cfg_path.is_file() or not sum_path.is_file():
        raise ReportError(f"{run_dir} is not a finished run (needs config.yaml and summary.json)")
    config = read_yaml_mapping(cfg_path, "restore the run's config.yaml, or leave the run out of the report", ReportError)
    summary = read_json_object(sum_path, "delete it and re-run `rankscope train` with the run's config to rewrite it, "
                               "or leave the run out", ReportError)
    ev = {}
    if (run_dir / "eval.json").is_file():
        ev = read_json_object(run_dir / "eval.json", "re-run `rankscope eval RUN --json RUN/eval.json`, or delete it", ReportError)
        ev = ev.get("metrics") if isinstance(ev.get("metrics"), dict) else {}
    sections = {k: config.get(k) for k in ("model", "train", "method")}
    for k, v in sections.items():
        if v is not None and not isinstance(v, dict):
            raise ReportError(f"{cfg_path}: section {k} is not a mapping (got {type(v).__name__}); restore the run's config.yaml")
    model, train, method = (sections[k] or {} for k in ("model", "train", "method"))
    try:
        seed = int(train.get("seed", 0))
    except (TypeError, ValueError):
        raise ReportError(f"{cfg_path}: train.seed={train.get('seed')!r} is not an integer; restore the run's config.yaml") from None
    return Run(run_dir, run_dir.name, method.get("name", summary.get("method", "?")), size_label(model),
               seed, config, summary, ev, read_jsonl(run_dir / "metrics.jsonl"))


def _is_run_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.yaml").is_file()


def collect(paths: list[str | Path], exclude_duplicates: bool = False) -> tuple[list[Run], list[dict[str, Any]]]:
    """Finished runs and the runs that failed, did not finish or were excluded, from run dirs and study dirs.

    A study directory's runs are the runs its sweep.json names: any other run folder in it (a leftover of an earlier
    sweep, a re-tuned point) is listed as excluded, by name, and never reported. Two runs with the same method, size
    (with any other dimension) and seed are an error naming both folders; with exclude_duplicates the one met first (the
    sweep's own before any other) is kept and the other listed as excluded."""
    runs: list[Run] = []
    problems: list[dict[str, Any]] = []
    seen: set[Path] = set()
    tuned: set[str] = set()
    unreadable: list[str] = []

    def add(run_dir: Path, status: str = "done", error: str | None = None, stage: str = "main") -> None:
        key = run_dir.resolve()
        if key in seen:
            return
        seen.add(key)
        if status == "done" and (run_dir / "summary.json").is_file():
            try:
                runs.append(load_run(run_dir))
            except ReportError as e:  # one unreadable run is listed, the others are still reported
                unreadable.append(str(e))
                problems.append({"run": run_dir.name, "dir": str(run_dir), "status": "unreadable", "error": str(e), "log": None})
                return
            if stage == "control":  # a study's control runs (rankscope.studies.study) are their own method row
                runs[-1].method += CONTROL_SUFFIX
        else:
            problems.append({"run": run_dir.name, "dir": str(run_dir), "status": status if status != "done" else "unfinished",
                             "error": error or "no summary.json (training did not finish)",
                             "log": str(run_dir / "sweep.log") if (run_dir / "sweep.log").exists() else None})

    for path in map(Path, paths):
        if not path.exists():
            raise ReportError(f"{path} does not exist; give run directories or study directories (with sweep.json)")
        if _is_run_dir(path):
            add(path)
            continue
        sweep = path / "sweep.json"
        named: set[Path] | None = None
        if sweep.is_file():
            data = read_sweep_json(sweep)
            named = {(path / row["name"]).resolve() for row in data["runs"]}
            if data.get("tuning"):  # each cell runs at its own tuned value: not a dimension that splits groups
                tuned.add(data["tuning"]["field"])
            for row in data["runs"]:
                if row.get("stage") in ("tune", "confirm") or row.get("status") == SAME_AS_MAIN:
                    continue  # tuning runs are in the tuned-value table; a control at the main lr is the main run
                run_dir = path / row["name"] if (path / row["name"]).is_dir() else Path(row.get("run_dir") or path / row["name"])
                if not run_dir.resolve().is_relative_to(path.resolve()):  # sweep.json names only runs of its own folder
                    raise ReportError(f"{sweep}: run {row['name']!r} points outside the study folder ({run_dir}); "
                                      f"{SWEEP_FIX}, or name that run folder on the command line to report it")
                add(run_dir, row.get("status", "done"), row.get("error"), row.get("stage", "main"))
        for sub in sorted(p for p in path.iterdir() if _is_run_dir(p)) if path.is_dir() else []:
            if named is not None and sub.resolve() not in named:
                if sub.resolve() not in seen:
                    seen.add(sub.resolve())
                    problems.append({"run": sub.name, "dir": str(sub), "status": "excluded",
                                     "error": f"not a run of the study: {sweep} does not name it", "log": None})
                continue
            add(sub)
    if not runs and not problems:
        raise ReportError(f"no runs found in {', '.join(map(str, paths))}; give run directories (config.yaml + summary.json) or a study directory (sweep.json)")
    if not runs and unreadable:
        raise ReportError(unreadable[0])
    if not runs:
        raise ReportError(f"no finished runs in {', '.join(map(str, paths))} ({len(problems)} failed or unfinished); see their sweep.log")
    label_other_dimensions(runs, tuned)
    return _unique_runs(runs, problems, exclude_duplicates), problems


def _unique_runs(runs: list[Run], problems: list[dict[str, Any]], exclude: bool) -> list[Run]:
    """Runs with one (method, size, seed) each: a second is an error naming both folders, or (exclude) listed and left out."""
    first: dict[tuple[str, str, int], Run] = {}
    kept = []
    for r in runs:
        key = (r.method, r.size, r.seed)
        if key not in first:
            first[key] = r
            kept.append(r)
        elif not exclude:
            raise ReportError(f"two runs of {r.method} at {r.size}, seed {r.seed}: {first[key].dir} and {r.dir}; remove the stray "
                              "one, or pass --exclude-duplicates to keep the first and list the other as excluded")
        else:
            problems.append({"run": r.name, "dir": str(r.dir), "status": "excluded",
                             "error": f"duplicate of {first[key].dir} ({r.method}, {r.size}, seed {r.seed})", "log": None})
    return kept


# fields that never split groups: seeds are averaged over, method fields belong to the method,
# and the rest do not change what is trained
_NOT_A_DIMENSION = ("train.seed", "method.", "model.", "data.cache_dir", "train.threads", "train.progress", "train.log_every",
                    "train.eval_every", "train.device", "train.tensorboard", "train.wandb", "checkpoint.", "eval.", "analysis.")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
    return out


def label_other_dimensions(runs: list[Run], ignore: set[str] | frozenset = frozenset()) -> None:
    """Runs that differ in more than method, size and seed (e.g. a grid over train.lr) must not be
    averaged together: such fields join the size label, e.g. `micro lr=0.001`."""
    flats = [_flat(r.config) for r in runs]
    keys = sorted({k for f in flats for k in f})
    varying = [k for k in keys if not k.startswith(_NOT_A_DIMENSION) and k not in ignore and len({f.get(k) for f in flats}) > 1]
    for r, f in zip(runs, flats):
        extra = " ".join(f"{k.split('.')[-1]}={json.loads(f[k]) if k in f else '-'}" for k in varying)
        if extra:
            r.size = f"{r.size} {extra}"

