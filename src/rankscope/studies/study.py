"""Studies: a base config and a grid over any config fields, run as one sweep, optionally in stages.

The format, with a full example, is documented in docs/studies.md. In short (YAML):

    name: paper-cpu                 # runs go to <runs_dir>/<point name>/ (default runs/<name>)
    base: ../configs/mini.yaml      # config every point starts from (relative to the study file)
    overrides: [train.max_steps=300]          # applied to every point
    grid:                           # the cartesian product of these values
      method.name: [full, relora]
      model.preset: [micro, mini]
      train.seed: [0, 1]
    when:                           # extra overrides for points matching key=value
      model.preset=mini: [train.warmup_steps=20]
    run_name: "{method}-{preset}-s{seed}"   # optional folder-name template ({short or dotted key});
                                    # default: method=relora,preset=mini,seed=1
    match_memory: relora            # optional: bytes, or a method name whose optimiser state every
                                    # point's rank / density is matched to (methods.memory.apply_memory_match)
    after: [eval, analyze]          # steps run on each finished main/control run (see STEPS)
    eval_args: [--blimp, ../shared/data/blimp, --blimp-max-pairs, "100"]
    parallel: 2                     # runs at once (threads are split between them)
    tune:                           # optional tuning stage, run first
      field: train.lr               # tuned on a log grid
      grid: [1.0e-3, 2.0e-3, 4.0e-3]
      cell: [method.name, model.preset]   # fields that define a cell (default: every grid field but train.seed)
      seed: 1000                    # the one seed of the tuning runs (default 1000, outside the main seeds)
      overrides: [train.max_steps=150]    # the short budget
      metric: final_val_loss        # summary.json key, lower is better
      widen: 2                      # automatic widenings per edge, by the grid's end ratio
      confirm: 2                    # optional: each cell's best 2 values re-run at the main budget; chosen there
    control:                        # optional: ReLoRA at full-rank's tuned value (the paper's convention)
      where: {method.name: relora}
      lr_from: {method.name: full}
    findings: {...}                 # pre-registered rules (rankscope.studies.findings)
    pretrain: {config: ../configs/english-cpu.yaml}   # optional: a fine-tuning study; its base is trained first into
                                    # <runs_dir>/pretrain/base and each point runs `rankscope finetune` from it

Stages. Without `tune:` a study has one stage, `main`. With it, `run_study` runs
  1. tune: per cell, every value of tune.grid (one seed, tune.overrides), in <runs_dir>/tune/. Where a
     cell's best value (lowest `metric`; a failed or diverged run counts as +inf) is the lowest or
     highest value tried, the grid is extended on that side by the grid's end ratio (grid[1]/grid[0]
     below, grid[-1]/grid[-2] above) and the new point is run, at most `widen` times per side. The
     chosen value is `interior` (it has a tried neighbour on both sides) or `edge` (the bound was reached);
  2. main: every grid point at its cell's chosen value, in <runs_dir>/;
  3. control: the grid points matching `control.where` at the value chosen for the cell named by
     replacing their fields with `control.lr_from`, in <runs_dir>/control/.
Every choice (cell, values tried, their losses and runs, chosen value, interior/edge) goes to
<runs_dir>/sweep.json under `tuning`. Finished runs are skipped and interrupted ones resumed in every
stage, so re-running a sweep re-reads the finished tuning runs and re-derives the same choices.

Launchers. A stage's points are executed by a launcher: any object with

    run(points: list[Point], study: Study) -> None

that blocks until every point has finished and has its `status` ("done" / "failed"), `error` and
`seconds` set. `LocalLauncher` runs them as subprocesses on this machine, `parallel` at a time
(`point_commands` gives each point's command lines, `prepare_point` writes its run folder, config
and study.json marker, `mark_step_done` records a finished `after` step). `run_study(study, launcher=...)`
runs the stages in order through it. Point and Study fields are a stable interface.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from rankscope.config import merge_dicts, parse_overrides, read_yaml, safe_load
from rankscope.methods import config_from_dict, describe_fields
from rankscope.core.errors import ConfigError
from rankscope.core.jsonfiles import read_json_object

SAME_AS_MAIN = "= main"  # rankscope.studies.findings.SAME_AS_MAIN: a control point whose lr equals its main point's (not run)

STUDY_KEYS = {"name", "base", "overrides", "grid", "when", "after", "eval_args", "analyze_args", "parallel", "runs_dir", "description",
              "match_memory", "tune", "control", "findings", "run_name", "slurm", "pretrain", "expect_unmeasured"}
TUNE_KEYS = {"field", "grid", "cell", "seed", "overrides", "metric", "widen", "confirm"}
TUNE_SEED = 1000  # the default tuning seed: outside the main seeds, so the choice never sees a main seed's data
CONTROL_KEYS = {"where", "lr_from"}
STEPS = ("eval", "analyze")
STAGES = ("tune", "confirm", "main", "control")
STAGE_DIRS = {"tune": "tune", "confirm": "tune-confirm", "main": "", "control": "control"}


@dataclass
class Point:
    name: str
    values: dict[str, Any]
    config: dict[str, Any]
    run_dir: Path
    status: str = "left"
    error: str | None = None
    seconds: float = 0.0
    steps_done: list[str] = field(default_factory=list)
    stage: str = "main"  # tune / main / control
    cell: dict[str, Any] | None = None  # the tuning cell whose chosen value this point uses (staged studies)
    same_as: str | None = None  # a control point whose lr equals its main point's: that point's name (not run)


@dataclass
class TuneSpec:
    field: str
    grid: list[float]
    cell: list[str]
    seed: int
    overrides: list[str]
    metric: str = "final_val_loss"
    widen: int = 2
    confirm: int = 0  # re-run the best `confirm` values of each cell at the main horizon (tuning seed) and choose among them


@dataclass
class ControlSpec:
    where: dict[str, Any]
    lr_from: dict[str, Any]


@dataclass
class CellTuning:
    """The tuning record of one cell: what was tried, what it gave, what was chosen."""

    cell: dict[str, Any]
    label: str
    initial_grid: list[float]
    tried: list[dict[str, Any]] = field(default_factory=list)  # {value, loss, status, run_dir, error}
    chosen: float | None = None
    position: str = "pending"  # interior / edge / failed / pending
    edge_side: str | None = None  # low / high where position == edge
    widenings: dict[str, int] = field(default_factory=lambda: {"low": 0, "high": 0})
    confirm: dict[str, Any] | None = None  # {values, tried: [{value, loss, status, run_dir}], short_choice} at the main horizon


@dataclass
class Study:
    path: Path
    name: str
    points: list[Point]
    after: list[str]
    eval_args: list[str]
    analyze_args: list[str]
    parallel: int
    runs_dir: Path
    grid: dict[str, list[Any]] = field(default_factory=dict)
    tune: TuneSpec | None = None
    control: ControlSpec | None = None
    findings: dict[str, Any] = field(default_factory=dict)
    run_name: str | None = None
    tuning: list[CellTuning] = field(default_factory=list)
    base: dict[str, Any] = field(default_factory=dict)
    when: dict[str, Any] = field(default_factory=dict)
    match_memory: Any = None
    pretrain: list[str] | None = None  # `pretrain:` the train command line (config, overrides) of a fine-tuning study's base
    expect_unmeasured: list[str] = field(default_factory=list)  # findings rule ids the pre-flight check may find unmeasurable

    def planned(self) -> list[tuple[dict[str, Any], Point]]:
        """(grid values, main point) for every main run, a tuned field at its first grid value (rankscope.studies.preflight reads
        the study through this and `tuning_configs`, so it never imports this module)."""
        out = []
        for values in grid_values(self):
            if self.tune is not None:
                values = {**values, self.tune.field: self.tune.grid[0]}
            out.append((values, build_point(self, values, "main")))
        return out

    def tuning_configs(self) -> list[dict[str, Any]]:
        """The config of every tuning run (each grid value of each main point, with the tuning overrides)."""
        if self.tune is None:
            return []
        extra = list(self.tune.overrides or [])
        return [build_point(self, {**values, self.tune.field: v}, "main", extra).config
                for values in grid_values(self) for v in self.tune.grid]


class Launcher(Protocol):
    def run(self, points: list[Point], study: Study) -> None: ...


# --------------------------------------------------------------------------- names
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


# --------------------------------------------------------------------------- loading
def load_study(path: str | Path, runs_dir: str | Path | None = None) -> Study:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} not found; give a YAML file such as studies/paper-cpu.yaml")
    try:
        spec = safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"study file {path} is not valid YAML ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"study file {path} must hold a mapping (name, base, grid, ...)")
    unknown = set(spec) - STUDY_KEYS
    if unknown:
        raise ConfigError(f"unknown study key(s) {', '.join(sorted(unknown))} in {path}; valid keys: {', '.join(sorted(STUDY_KEYS))}")
    name = spec.get("name") or path.stem
    if not isinstance(name, str) or not re.fullmatch(r"[\w.+=,@-]+", name) or name.startswith("."):  # one folder (and SLURM job) name
        raise ConfigError(f"study {path}: `name` {name!r} must be one folder name of letters, digits and _ . - + = , @ "
                          "(not starting with a dot); runs go to runs/<name> unless runs_dir says otherwise")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not grid or any(not isinstance(v, list) or not v for v in grid.values()):
        raise ConfigError(f"study {path}: `grid` must map config fields to non-empty lists of values, e.g. method.name: [full, relora]")
    valid = {row[0] for row in describe_fields()}
    for key in grid:
        if key not in valid:
            raise ConfigError(f"study {path}: grid field {key!r} is not a config field; see `rankscope info --fields`")
    if spec.get("base") is not None and not isinstance(spec["base"], str):
        raise ConfigError(f"study {path}: `base` must name one YAML config file (relative to the study file), got {spec['base']!r}")
    base = read_yaml(path.parent / spec["base"]) if spec.get("base") else {}
    base = merge_dicts(base, parse_overrides(list(spec.get("overrides") or [])))
    root = Path(runs_dir or spec.get("runs_dir") or Path("runs") / (spec.get("name") or path.stem))
    pretrain = _load_pretrain(spec.get("pretrain"), path)
    if pretrain is not None:  # a fine-tuning study: every point adapts the base the study pretrains first
        base = merge_dicts(base, {"finetune": {"base": str(pretrain_dir(root))}})
    after = list(spec.get("after") or [])
    for step in after:
        if step not in STEPS:
            raise ConfigError(f"study {path}: unknown `after` step {step!r}; valid: {', '.join(STEPS)}")
    template = spec.get("run_name")
    if template is not None and not isinstance(template, str):
        raise ConfigError(f"study {path}: `run_name` must be a string template such as \"{{method}}-lr{{lr}}-s{{seed}}\"")
    parallel = spec.get("parallel", 1)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise ConfigError(f"study {path}: `parallel` must be a whole number >= 1 (runs at once), got {parallel!r}")
    tuned = spec["tune"].get("field") if isinstance(spec.get("tune"), dict) else None
    _check_when(spec.get("when"), [*grid, tuned], valid, path)
    study = Study(path, name, [], after, [str(a) for a in spec.get("eval_args") or []], [str(a) for a in spec.get("analyze_args") or []],
                  int(spec.get("parallel") or 1), root, grid=grid, run_name=template, base=base, when=spec.get("when") or {},
                  match_memory=spec.get("match_memory"), pretrain=pretrain,
                  expect_unmeasured=[str(x) for x in spec.get("expect_unmeasured") or []])
    study.tune = _load_tune(spec.get("tune"), grid, base, path, valid)
    study.control = _load_control(spec.get("control"), study, path)
    if spec.get("findings") is not None:
        from rankscope.studies.findings import validate_findings

        study.findings = validate_findings(spec["findings"], where=f"study {path}")
    if study.tune is None:
        study.points = [build_point(study, values, "main") for values in grid_values(study)]
    else:
        # validate every main point now, at the grid's first tuned value
        _check_unique([build_point(study, {**values, study.tune.field: study.tune.grid[0]}, "main") for values in grid_values(study)], path)
        study.points = [tune_point(study, c, v) for c in tune_cells(study) for v in study.tune.grid]
    _check_unique(study.points, path)
    return study


def _load_pretrain(spec: Any, path: Path) -> list[str] | None:
    """`pretrain: {config: FILE, overrides: [...]}` -> the config path (relative to the study file) and overrides."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("config"), str) or set(spec) - {"config", "overrides"}:
        raise ConfigError(f"study {path}: pretrain must be a mapping with `config: FILE` and optional `overrides: [...]`")
    config = path.parent / spec["config"]
    overrides = [str(o) for o in spec.get("overrides") or []]
    from rankscope.methods import load_config

    load_config(config, overrides)  # validated now, before any run
    return [str(config), *overrides]


def pretrain_dir(runs_dir: Path) -> Path:
    """Where a fine-tuning study's base is trained: <runs_dir>/pretrain/base (two levels down, so that a report of
    the study folder does not take the base for one of its fine-tunes)."""
    return runs_dir / "pretrain" / "base"


def run_pretrain(study: Study, show=print) -> None:
    """Train (or resume) a fine-tuning study's base in <runs_dir>/base, unless it is finished."""
    from rankscope.methods import load_config

    out = pretrain_dir(study.runs_dir)
    if training_finished(out, load_config(study.pretrain[0], study.pretrain[1:]).train.max_steps):
        return
    show(f"study {study.name}, stage pretrain: the base -> {out}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.log", "a") as log:
        cmd = [sys.executable, "-m", "rankscope", "train", study.pretrain[0], *study.pretrain[1:], "-o", str(out), "train.progress=false"]
        res = subprocess.run(cmd, stdout=log, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.write(res.stderr)
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        raise ConfigError(f"pretraining the study's base failed: {lines[-1] if lines else res.returncode} (log: {out / 'sweep.log'})")


def _load_tune(tune: Any, grid: dict[str, list], base: dict[str, Any], path: Path, valid: set[str]) -> TuneSpec | None:
    if tune is None:
        return None
    where = f"study {path}: tune"
    if not isinstance(tune, dict):
        raise ConfigError(f"{where} must be a mapping with field, grid, ... (see docs/studies.md)")
    unknown = set(tune) - TUNE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid keys: {', '.join(sorted(TUNE_KEYS))}")
    fld = tune.get("field", "train.lr")
    if fld not in valid:
        raise ConfigError(f"{where}.field {fld!r} is not a config field; see `rankscope info --fields`")
    if fld in grid:
        raise ConfigError(f"{where}.field {fld!r} is also a grid field; take it out of `grid` (the tuning stage chooses it)")
    values = tune.get("grid")
    numbers = isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)
    if not numbers or len(values) < 2:
        raise ConfigError(f"{where}.grid must list at least 2 positive numbers (a log grid), e.g. [1.0e-3, 2.0e-3, 4.0e-3]")
    values = sorted(float(v) for v in values)
    if len(set(values)) != len(values):
        raise ConfigError(f"{where}.grid repeats a value; list each value once")
    cell = tune.get("cell", [k for k in grid if k != "train.seed"])
    if not isinstance(cell, list) or any(k not in grid for k in cell):
        raise ConfigError(f"{where}.cell must list grid fields ({', '.join(grid)}), e.g. [method.name, model.preset]")
    if "train.seed" in cell:
        raise ConfigError(f"{where}.cell must not hold train.seed: the tuning runs use one seed (tune.seed)")
    seeds = grid.get("train.seed") or [base.get("train", {}).get("seed", 0)]
    seed = tune.get("seed", TUNE_SEED if TUNE_SEED not in seeds else max(s for s in seeds if isinstance(s, int)) + 1)
    widen = tune.get("widen", 2)
    confirm = tune.get("confirm", 0)
    if not isinstance(confirm, int) or isinstance(confirm, bool) or confirm < 0 or confirm == 1:
        raise ConfigError(f"{where}.confirm must be 0 (not confirmed) or an integer >= 2: the best values re-run at the main horizon")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{where}.seed must be an integer")
    if not isinstance(widen, int) or isinstance(widen, bool) or widen < 0:
        raise ConfigError(f"{where}.widen must be an integer >= 0 (automatic widenings per edge)")
    metric = tune.get("metric", "final_val_loss")
    if not isinstance(metric, str):
        raise ConfigError(f"{where}.metric must name a summary.json key such as final_val_loss")
    parts = metric.split("_")
    if "test" in parts or "val" not in parts:  # a choice made on (or derived from) test data leaks into every figure scored on it
        raise ConfigError(f"{where}.metric {metric!r} is not a validation figure; tune on one (final_val_loss, fewshot_val_loss)")
    overrides = [str(o) for o in tune.get("overrides") or []]
    parse_overrides(overrides)
    return TuneSpec(fld, values, list(cell), seed, overrides, metric, widen, confirm)


def _load_control(control: Any, study: Study, path: Path) -> ControlSpec | None:
    if control is None:
        return None
    where = f"study {path}: control"
    if study.tune is None:
        raise ConfigError(f"{where} needs a `tune:` stage (it runs points at another cell's tuned value)")
    shaped = isinstance(control, dict) and not set(control) - CONTROL_KEYS
    if not shaped or not all(isinstance(control.get(k), dict) and control.get(k) for k in CONTROL_KEYS):
        raise ConfigError(f"{where} must be a mapping with `where: {{field: value}}` and `lr_from: {{field: value}}`, "
                          "e.g. where: {method.name: relora}, lr_from: {method.name: full}")
    for key in ("where", "lr_from"):
        for k, v in control[key].items():
            if k not in study.grid or v not in study.grid[k]:
                raise ConfigError(f"{where}.{key}: {k}={v!r} is not a value of the grid ({k}: {study.grid.get(k)})")
    if any(k not in study.tune.cell for k in control["lr_from"]):
        raise ConfigError(f"{where}.lr_from may only name cell fields ({', '.join(study.tune.cell)})")
    return ControlSpec(dict(control["where"]), dict(control["lr_from"]))


def _check_when(when: Any, grid: list[str], valid: set[str], path: Path) -> None:
    """`when:` maps `field=value` (a grid field) to a list of overrides; anything else would be dropped in silence."""
    if when is None:
        return
    if not isinstance(when, dict):
        raise ConfigError(f"study {path}: `when` must map field=value to a list of overrides, e.g. \"method.name=relora\": [method.relora.rank=32]")
    for cond, more in when.items():
        key, eq, _ = str(cond).partition("=")
        if not eq or key not in valid:
            raise ConfigError(f"study {path}: `when` key {cond!r} must be written field=value with a config field, "
                              "e.g. \"method.name=relora\"")
        if key not in grid:
            raise ConfigError(f"study {path}: `when` key {cond!r} names {key}, which is neither a grid field nor the tuned one; its overrides would never apply")
        if not isinstance(more, list) or not all(isinstance(o, str) and "=" in o for o in more):
            raise ConfigError(f"study {path}: `when` {cond!r} must hold a list of key=value overrides, got {more!r}")


def _check_unique(points: list[Point], path: Path) -> None:
    seen: dict[Path, Point] = {}
    for p in points:
        if p.run_dir in seen and seen[p.run_dir].values != p.values:
            raise ConfigError(f"study {path}: points {seen[p.run_dir].values} and {p.values} get the same folder {p.run_dir}; "
                              "put every grid (and tuned) field into `run_name`")
        seen[p.run_dir] = p


def grid_values(study: Study) -> list[dict[str, Any]]:
    return [dict(zip(study.grid, combo)) for combo in itertools.product(*study.grid.values())]


def build_point(study: Study, values: dict[str, Any], stage: str, extra: list[str] | None = None,
                cell: dict[str, Any] | None = None) -> Point:
    """A validated point: base < grid values < matching `when` < stage overrides (extra)."""
    over = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]
    for cond, more in study.when.items():
        k, _, v = str(cond).partition("=")
        if k in values and str(values[k]) == v:
            over += list(more)
    over += list(extra or [])
    if study.tune is not None and study.tune.field in values:  # the tuned value wins over `when` and budgets
        over.append(f"{study.tune.field}={json.dumps(values[study.tune.field])}")
    with warnings.catch_warnings():  # flat method options are the form a grid over methods needs (docs/studies.md): no notice
        warnings.filterwarnings("ignore", "flat method options", FutureWarning)
        cfg = config_from_dict(merge_dicts(study.base, parse_overrides(over)))  # validate every point before running any
    if study.match_memory is not None:  # equal optimiser memory: rank / density per point
        from rankscope.methods.memory import apply_memory_match

        cfg = apply_memory_match(cfg, study.match_memory)
    pname = point_name(values, study.run_name)
    if pname in (".", ".."):
        raise ConfigError(f"study {study.path}: point name {pname!r} is not a folder of its own; change run_name or the grid value")
    run_dir = study.runs_dir / STAGE_DIRS[stage] / pname if STAGE_DIRS[stage] else study.runs_dir / pname
    return Point(pname, values, cfg.to_dict(), run_dir, stage=stage, cell=cell)


# --------------------------------------------------------------------------- tuning
def cell_of(study: Study, values: dict[str, Any]) -> dict[str, Any]:
    return {k: values[k] for k in study.tune.cell}


def cell_label(cell: dict[str, Any]) -> str:
    return point_name(cell) if cell else "all"


def tune_cells(study: Study) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for values in grid_values(study):
        c = cell_of(study, values)
        if c not in out:
            out.append(c)
    return out


def tune_point(study: Study, cell: dict[str, Any], value: float) -> Point:
    """A tuning run: the cell's fields, the other grid fields at their first value, one seed, the short budget."""
    t = study.tune
    values = {k: (cell[k] if k in cell else vs[0]) for k, vs in study.grid.items()}
    values["train.seed"] = t.seed
    values[t.field] = value
    return build_point(study, values, "tune", t.overrides, cell)


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def tune_decision(initial: list[float], losses: dict[float, float | None],
                  widen: int) -> tuple[float | None, str, float | None, str | None]:
    """What to do with a cell's results: (next value to run or None, position, chosen, edge side).

    `losses` maps each tried value to its loss (None or non-finite: failed / diverged, counts as +inf).
    The best value is the lowest loss (ties: the smaller value). At the lowest or highest tried value,
    the grid is widened by its end ratio while fewer than `widen` values lie beyond that end of the
    initial grid; then the position is `edge`. Otherwise it is `interior`. No finite loss: `failed`.
    """
    tried = sorted(losses)
    score = {v: (losses[v] if losses[v] is not None and math.isfinite(losses[v]) else math.inf) for v in tried}
    if all(s == math.inf for s in score.values()):
        return None, "failed", None, None
    best = min(tried, key=lambda v: (score[v], v))
    if best == tried[0]:
        if sum(v < initial[0] for v in tried) < widen:
            return _round(tried[0] / (initial[1] / initial[0])), "pending", None, None
        return None, "edge", best, "low"
    if best == tried[-1]:
        if sum(v > initial[-1] for v in tried) < widen:
            return _round(tried[-1] * (initial[-1] / initial[-2])), "pending", None, None
        return None, "edge", best, "high"
    return None, "interior", best, None


def read_metric(point: Point, metric: str) -> float | None:
    path = point.run_dir / "summary.json"
    if point.status != "done" or not path.is_file():
        return None
    v = read_json_object(path, SUMMARY_FIX, ConfigError).get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def run_tuning(study: Study, launcher: Launcher, show=print) -> list[CellTuning]:
    """Run the tuning stage to its end (widening where needed); record each cell's choice in study.tuning."""
    t = study.tune
    cells = [CellTuning(c, cell_label(c), list(t.grid)) for c in tune_cells(study)]
    values = {ct.label: list(t.grid) for ct in cells}
    points: dict[Path, Point] = {p.run_dir: p for p in study.points if p.stage == "tune"}
    for round_no in itertools.count(1):
        wanted = [tune_point(study, ct.cell, v) for ct in cells for v in values[ct.label]]
        for p in wanted:
            points.setdefault(p.run_dir, p)
        wanted = [points[p.run_dir] for p in wanted]
        # a run that failed in this sweep is not retried in the next round (a new sweep retries it)
        todo = [p for p in wanted if p.status not in ("done", "failed") and _refresh(p, study) != "done"]
        study.points = [*points.values(), *[p for p in study.points if p.stage != "tune"]]
        _stage_header(study, "tune", wanted, todo, show, f" round {round_no}")
        if todo:
            launcher.run(todo, study)
        widened = False
        for ct in cells:
            by_value = {p.values[t.field]: p for p in wanted if p.cell == ct.cell}
            losses = {v: read_metric(by_value[v], t.metric) for v in values[ct.label]}
            ct.tried = [{"value": v, "loss": losses[v], "status": by_value[v].status, "error": by_value[v].error,
                         "run_dir": str(by_value[v].run_dir)} for v in sorted(losses)]
            nxt, ct.position, ct.chosen, ct.edge_side = tune_decision(t.grid, losses, t.widen)
            ct.widenings = {"low": sum(v < t.grid[0] for v in losses), "high": sum(v > t.grid[-1] for v in losses)}
            if nxt is not None:
                values[ct.label].append(nxt)
                widened = True
        write_sweep_summary(study)
        if not widened:
            break
    study.tuning = cells
    if t.confirm:
        confirm_choices(study, cells, launcher, show)
    for ct in cells:
        side = f", {ct.edge_side} end" if ct.edge_side else ""
        where = f"{ct.chosen:g} ({ct.position}{side})" if ct.chosen is not None else "none (every run failed)"
        tried = ", ".join(f"{d['value']:g}" for d in ct.tried)
        show(f"tuned {t.field} for {ct.label}: {where} of {tried}")
    return cells


def confirm_choices(study: Study, cells: list[CellTuning], launcher: Launcher, show=print) -> None:
    """Re-run each cell's best `tune.confirm` values at the main horizon (the main budget, the tuning seed) and choose the
    best of them there; the short-horizon choice is kept in `confirm.short_choice`, the runs in <runs_dir>/tune-confirm/."""
    t = study.tune
    wanted: dict[str, list[Point]] = {}
    for ct in cells:
        finite = sorted((d for d in ct.tried if d["loss"] is not None and math.isfinite(d["loss"])), key=lambda d: (d["loss"], d["value"]))
        if ct.chosen is None or len(finite) < 2:
            continue
        values = {k: (ct.cell[k] if k in ct.cell else vs[0]) for k, vs in study.grid.items()}
        values["train.seed"] = t.seed
        wanted[ct.label] = [build_point(study, {**values, t.field: d["value"]}, "confirm", cell=ct.cell) for d in finite[: t.confirm]]
    points = [p for ps in wanted.values() for p in ps]
    known = {p.run_dir: p for p in study.points}
    points = [known.get(p.run_dir, p) for p in points]
    study.points = [*[p for p in study.points if p.run_dir not in {q.run_dir for q in points}], *points]
    todo = [p for p in points if p.status not in ("done", "failed") and _refresh(p, study) != "done"]
    _stage_header(study, "confirm", points, todo, show)
    if todo:
        launcher.run(todo, study)
    by_dir = {p.run_dir: p for p in points}
    for ct in cells:
        if ct.label not in wanted:
            continue
        runs = [by_dir[p.run_dir] for p in wanted[ct.label]]
        tried = [{"value": p.values[t.field], "loss": read_metric(p, t.metric), "status": p.status, "run_dir": str(p.run_dir)} for p in runs]
        ok = [d for d in tried if d["loss"] is not None and math.isfinite(d["loss"])]
        ct.confirm = {"values": [d["value"] for d in tried], "tried": tried, "short_choice": ct.chosen}
        if ok:
            ct.chosen = min(ok, key=lambda d: (d["loss"], d["value"]))["value"]
    write_sweep_summary(study)


def staged_points(study: Study) -> list[Point]:
    """The main and control points at the tuned values (after run_tuning); cells without a choice fail."""
    t = study.tune
    chosen = {ct.label: ct for ct in study.tuning}
    out: list[Point] = []

    def add(values: dict[str, Any], stage: str, cell: dict[str, Any]) -> None:
        ct = chosen[cell_label(cell)]
        if ct.chosen is None:
            p = build_point(study, {**values, t.field: t.grid[0]}, stage, cell=cell)
            p.status, p.error = "failed", f"not run: tuning {t.field} for {ct.label} found no finite {t.metric} (see sweep.json tuning)"
            out.append(p)
        else:
            out.append(build_point(study, {**values, t.field: ct.chosen}, stage, cell=cell))

    for values in grid_values(study):
        add(values, "main", cell_of(study, values))
    if study.control is not None:
        mains = {json.dumps(p.values, sort_keys=True, default=str): p for p in out}
        for values in grid_values(study):
            if all(values[k] == v for k, v in study.control.where.items()):
                own, other = chosen[cell_label(cell_of(study, values))], chosen[cell_label({**cell_of(study, values), **study.control.lr_from})]
                if own.chosen is not None and own.chosen == other.chosen:  # the same runs again: recorded, not run, not a test
                    main = mains[json.dumps({**values, t.field: own.chosen}, sort_keys=True, default=str)]
                    p = build_point(study, {**values, t.field: own.chosen}, "control", cell={**cell_of(study, values), **study.control.lr_from})
                    p.status, p.same_as = SAME_AS_MAIN, main.name
                    p.error = f"{t.field} {own.chosen:g} equals the main run's: the control is the main run {main.name}"
                    out.append(p)
                else:
                    add(values, "control", {**cell_of(study, values), **study.control.lr_from})
    return out


# --------------------------------------------------------------------------- running one point
def _after(point: Point, study: Study) -> list[str]:
    return [] if point.stage in ("tune", "confirm") else study.after


SUMMARY_FIX = "delete it and run the sweep again: the point's training resumes from its last checkpoint and rewrites it"


def read_marker(marker: Path, study: Study) -> dict[str, Any]:
    """A point's study.json (owner study, steps done); a corrupt one names the two ways out."""
    data = read_json_object(marker, f"write {{\"study\": \"{study.name}\"}} into it to keep the run (its eval/analyze steps "
                                    "then run again), or delete its folder to run the point afresh", ConfigError)
    if not isinstance(data.get("steps_done", []), list):
        raise ConfigError(f"{marker}: steps_done must be a list of step names; write [] to run them again")
    return data


def training_finished(run_dir: Path, max_steps: int) -> bool:
    """Whether the run in `run_dir` trained all `max_steps` (its summary.json says so)."""
    summary = run_dir / "summary.json"
    return summary.exists() and read_json_object(summary, SUMMARY_FIX, ConfigError).get("steps") == max_steps


def point_state(point: Point, study: Study) -> str:
    """done / partial / left, and refuse a run directory that belongs to another study."""
    marker = point.run_dir / "study.json"
    if marker.exists():
        owner = read_marker(marker, study).get("study")
        if owner != study.name:
            raise ConfigError(f"{point.run_dir} belongs to study {owner!r}, not {study.name!r}; use another runs_dir (--runs-dir)")
    elif point.run_dir.exists() and any(p.name != ".rankscope.core.lock" for p in point.run_dir.iterdir()):  # a lock file alone: no run
        raise ConfigError(f"{point.run_dir} holds a run that is not part of study {study.name!r}; use another runs_dir (--runs-dir)")
    if training_finished(point.run_dir, point.config["train"]["max_steps"]):
        done = read_marker(marker, study).get("steps_done", []) if marker.exists() else []
        return "done" if all(s in done for s in _after(point, study)) else "partial"
    return "left"


def _refresh(point: Point, study: Study) -> str:
    point.status = point_state(point, study)
    return point.status


def point_commands(point: Point, study: Study, threads: int) -> list[tuple[str, list[str]]]:
    """(step, argv) of each command a point runs: train, then its `after` steps."""
    py = [sys.executable, "-m", "rankscope"]
    cfg_path = point.run_dir / "study-config.yaml"
    base = (point.config.get("finetune") or {}).get("base")  # a fine-tuning point (rankscope.train.finetune)
    verb = ["finetune", str(base), "--config", str(cfg_path)] if base else ["train", str(cfg_path)]
    cmds = [("train", [*py, *verb, "-o", str(point.run_dir), "train.progress=false", f"train.threads={threads}"])]
    after = _after(point, study)
    if "eval" in after:
        cmds.append(("eval", [*py, "eval", str(point.run_dir), "--json", str(point.run_dir / "eval.json"), *study.eval_args]))
    if "analyze" in after:
        cmds.append(("analyze", [*py, "analyze", str(point.run_dir), *study.analyze_args]))
    return cmds


def prepare_point(point: Point, study: Study, threads: int = 1) -> None:
    """Create the run folder with its study-config.yaml and study.json marker (keeping finished steps)."""
    point.run_dir.mkdir(parents=True, exist_ok=True)
    (point.run_dir / "study-config.yaml").write_text(yaml.safe_dump(point.config, sort_keys=False))
    marker = point.run_dir / "study.json"
    old = read_marker(marker, study) if marker.exists() else {}
    marker.write_text(json.dumps({"study": study.name, "study_file": str(study.path), "stage": point.stage, "point": point.values,
                                  "steps_done": old.get("steps_done", [])}, indent=1))


def mark_step_done(point: Point, step: str) -> None:
    marker = point.run_dir / "study.json"
    data = json.loads(marker.read_text())
    data["steps_done"] = sorted(set(data.get("steps_done", [])) | {step})
    marker.write_text(json.dumps(data, indent=1))


def run_point(point: Point, study: Study, threads: int) -> None:
    """Train (or resume) one point, then its `after` steps; a failure is recorded, not raised."""
    prepare_point(point, study, threads)
    t0 = time.time()
    done = json.loads((point.run_dir / "study.json").read_text()).get("steps_done", [])
    log = open(point.run_dir / "sweep.log", "a")
    try:
        for step, cmd in point_commands(point, study, threads):
            if step != "train" and step in done:
                continue
            # eval / analyze get the run's share of the cores too: torch's default (all cores) in
            # `parallel` processes at once oversubscribes the CPU several times over
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
            res = subprocess.run(cmd, stdout=log, stderr=subprocess.PIPE, text=True, env=env)
            log.write(res.stderr)
            if res.returncode != 0:
                lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
                point.status, point.error = "failed", f"{step}: {lines[-1] if lines else f'exit code {res.returncode}'}"
                return
            if step != "train":
                mark_step_done(point, step)
        point.status = "done"
    finally:
        log.close()
        point.seconds = time.time() - t0


class LocalLauncher:
    """Runs points as subprocesses on this machine, `parallel` at a time (threads split between them)."""

    def __init__(self, parallel: int | None = None, show=print):
        self.parallel, self.show = parallel, show

    def run(self, points: list[Point], study: Study) -> None:
        if not points:
            return
        from concurrent.futures import ThreadPoolExecutor

        parallel = max(1, self.parallel or study.parallel)
        threads = max(1, (os.cpu_count() or 1) // parallel)
        with _Progress(points, self.show, points[0].stage, parallel) as progress, ThreadPoolExecutor(parallel) as pool:
            def work(p: Point) -> None:
                p.status = "running"
                progress.refresh()
                run_point(p, study, threads)
                progress.refresh()

            for f in [pool.submit(work, p) for p in points]:
                f.result()


# --------------------------------------------------------------------------- the sweep
def _stage_header(study: Study, stage: str, points: list[Point], todo: list[Point], show, extra: str = "") -> None:
    show(f"study {study.name}, stage {stage}{extra}: {len(points)} runs, {len(points) - len(todo)} done, {len(todo)} to run "
         f"-> {study.runs_dir / STAGE_DIRS[stage] if STAGE_DIRS[stage] else study.runs_dir}")


def run_study(study: Study, launcher: Launcher | None = None, parallel: int | None = None, show=print) -> list[Point]:
    """Run the study's stages in order (tune, main, control) through `launcher` (default LocalLauncher)."""
    launcher = launcher or LocalLauncher(parallel, show)
    if study.pretrain is not None:
        run_pretrain(study, show)
    if study.tune is not None:
        run_tuning(study, launcher, show)
        study.points = [p for p in study.points if p.stage in ("tune", "confirm")] + staged_points(study)
    for stage in ("main", "control"):
        points = [p for p in study.points if p.stage == stage]
        if not points:
            continue
        for p in points:
            if p.status not in ("failed", SAME_AS_MAIN):
                _refresh(p, study)
        todo = [p for p in points if p.status not in ("done", "failed", SAME_AS_MAIN)]
        _stage_header(study, stage, points, todo, show)
        if todo:
            launcher.run(todo, study)
        write_sweep_summary(study)
    write_sweep_summary(study)
    for p in study.points:
        if p.status == "failed":
            show(f"FAILED {p.stage} {p.name}: {p.error}  (log: {p.run_dir / 'sweep.log'})")
    return study.points


def write_sweep_summary(study: Study) -> Path:
    """<runs_dir>/sweep.json: every run (with its stage), the tuning choices and the pre-registered findings rules.

    A run's `name` is its folder relative to runs_dir (tune/NAME, control/NAME, or NAME)."""
    rows = []
    for p in study.points:
        rel = str(p.run_dir.relative_to(study.runs_dir)) if p.run_dir.is_relative_to(study.runs_dir) else p.name
        rows.append({"name": rel, "stage": p.stage, "values": p.values, "cell": p.cell, "status": p.status, "error": p.error,
                     "run_dir": str(p.run_dir), "seconds": round(p.seconds, 1), **({"same_as": p.same_as} if p.same_as else {})})
    data: dict[str, Any] = {"study": study.name, "study_file": str(study.path), "runs": rows}
    if study.tune is not None:
        data["tuning"] = {**asdict(study.tune), "metric_source": "summary.json", "lower_is_better": True,
                          "cells": [asdict(ct) for ct in study.tuning]}
    if study.control is not None:
        data["control"] = asdict(study.control)
    if study.findings:
        data["findings"] = study.findings
    study.runs_dir.mkdir(parents=True, exist_ok=True)
    out = study.runs_dir / "sweep.json"
    if out.exists() and "jobs" in (old := read_json_object(out, "delete it: it is rewritten from the run folders "
                                                             "(SLURM job records in it are lost; finished runs are kept)", ConfigError)):
        data["jobs"] = old["jobs"]  # SLURM job records of rankscope.studies.slurm, kept across rewrites
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(out)
    return out


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Progress:
    """Runs done of total with an ETA: a live table (rich) on a terminal; plain lines otherwise."""

    def __init__(self, points: list[Point], show, stage: str = "main", parallel: int = 1):
        self.points, self.show, self.stage, self.parallel, self.live = points, show, stage, parallel, None
        self.t0 = time.time()
        self.lock = threading.Lock()

    def line(self) -> str:
        counts = {s: sum(p.status == s for p in self.points) for s in ("done", "running", "failed")}
        finished = counts["done"] + counts["failed"]
        total = len(self.points)
        elapsed = time.time() - self.t0
        left = total - finished
        if finished and left:
            # runs finish `parallel` at a time: the rate seen so far already includes that
            eta = f"ETA {_duration(elapsed / finished * left)}"
        else:
            eta = "ETA –" if left else "finished"
        width = 20
        bar = "#" * int(width * finished / total) + "." * (width - int(width * finished / total)) if total else ""
        failed = f", {counts['failed']} failed" if counts["failed"] else ""
        return (f"sweep {self.stage} [{bar}] {finished}/{total} runs finished{failed}, {counts['running']} running, "
                f"{_duration(elapsed)} elapsed, {eta}")

    def table(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        t = Table(title=f"sweep ({self.stage})")
        for col in ("run", "status", "seconds"):
            t.add_column(col)
        for p in self.points:
            colour = {"done": "green", "running": "yellow", "failed": "red"}.get(p.status, "white")
            t.add_row(p.name, f"[{colour}]{p.status}[/]", f"{p.seconds:.0f}" if p.seconds else "")
        return Group(t, Text(self.line()))  # Text: the [###...] bar is not rich markup

    def __enter__(self):
        if sys.stdout.isatty():
            from rich.live import Live

            self.live = Live(self.table(), refresh_per_second=2)
            self.live.__enter__()
        return self

    def refresh(self):
        with self.lock:
            if self.live is not None:
                self.live.update(self.table())
            else:
                self.show(self.line())

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)


# --------------------------------------------------------------------------- CLI verb
def add_sweep_args(p) -> None:
    p.add_argument("study", help="study YAML, e.g. studies/paper-cpu.yaml (format: docs/studies.md)")
    p.add_argument("--parallel", type=int, help="runs at once (default: the study's `parallel`)")
    p.add_argument("--runs-dir", help="where the runs go (default: the study's runs_dir or runs/<name>)")
    p.add_argument("--list", action="store_true", help="only list the points and their state")
    p.add_argument("--check", action="store_true", help="only the pre-flight check: is each findings rule measurable, "
                                                        "and the sweep's estimated wall time (rankscope.studies.preflight)")
    from rankscope.studies.slurm import add_args

    add_args(p)


def list_points(study: Study, show=print) -> None:
    for p in study.points:
        show(f"{point_state(p, study):8s} {p.stage:7s} {p.run_dir}")
    if study.tune is not None:
        n_main = len(grid_values(study))
        n_control = sum(all(v[k] == x for k, x in study.control.where.items()) for v in grid_values(study)) if study.control else 0
        show(f"then {n_main} main runs{f' and {n_control} control runs' if n_control else ''} at the tuned {study.tune.field} "
             f"(tuning may add up to {study.tune.widen} values per edge and cell)")


def cmd_sweep(args) -> None:
    if args.parallel is not None and args.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
    study = load_study(args.study, args.runs_dir)
    if args.list:
        list_points(study)
        return
    from rankscope.studies.preflight import run_preflight

    run_preflight(study, args.parallel, timing=not (args.status or args.dry_run))  # before any compute; --check: only this
    if args.check:
        return
    launcher = None
    if args.launcher == "slurm" or args.dry_run or args.status:
        from rankscope.studies import slurm

        launcher = slurm.cli_launcher(study, args)
        if launcher is None:  # --dry-run / --status printed what was asked
            return
    from rankscope.core.paths import check_output_dir

    check_output_dir(study.runs_dir, "--runs-dir" if args.runs_dir else f"runs_dir of {study.path}")
    from rankscope.core import lock

    held = lock.acquire(study.runs_dir, f"sweep folder {study.runs_dir}", "wait for that sweep to end, or use another --runs-dir")
    try:
        points = run_study(study, launcher=launcher, parallel=args.parallel)
    finally:
        held.release()
    failed = sum(p.status == "failed" for p in points)
    print(f"sweep finished: {len(points) - failed} ok, {failed} failed; summary {study.runs_dir / 'sweep.json'}")
    if failed:
        raise SystemExit(1)
