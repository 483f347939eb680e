"""Studies: a base config and a grid over any config fields, run as one sweep, optionally in stages.

The format, with a full example, is documented in docs/studies.md (and typed in rankscope.studies.spec). In short (YAML):

    name: paper-cpu                 # runs go to <runs_dir>/<point name>/ (default runs/<name>)
    base: ../configs/mini.yaml      # config every point starts from (relative to the study file)
    overrides: [train.max_steps=300]          # applied to every point
    method_options: {rank: 8, alpha: 16}      # shared across a grid over methods: each point's method takes those it has
    grid:                           # the cartesian product of these values
      method.name: [full, relora]
      model.preset: [micro, mini]
      train.seed: [0, 1]
    when:                           # extra overrides for points matching key=value
      model.preset=mini: [train.warmup_steps=20, method_options.rank=16]
    run_name: "{method}-{preset}-s{seed}"   # optional folder-name template ({short or dotted key});
                                    # default: method=relora,preset=mini,seed=1
    match_memory: relora            # optional: bytes, or a method name whose optimiser state every
                                    # point's rank / density is matched to (methods.memory.match_memory)
    after: [eval, analyze]          # steps run on each finished main/control run
    eval_args: [--blimp, ../shared/data/blimp, --blimp-max-pairs, "100"]
    parallel: 2                     # runs at once (threads are split between them)
    tune: {field: train.lr, grid: [1.0e-3, 2.0e-3, 4.0e-3], cell: [method.name], widen: 2, confirm: 2}
    control: {where: {method.name: relora}, lr_from: {method.name: full}}
    findings: {...}                 # pre-registered rules (rankscope.studies.findings)
    pretrain: {config: ../configs/english-cpu.yaml}   # optional: a fine-tuning study (its base is trained first)

This module is the study as the launchers see it: `load_study` builds every point (`build_point`: base <
overrides < method_options < grid values < matching `when` < stage overrides, validated as a run config). The
rest of the package, top to bottom: verb (`rankscope sweep`) > sweep (the stages in order) > local and slurm
(launchers; slurm_job runs inside a SLURM job) > tuning > points (the lifecycle both launchers share), record
(sweep.json), progress > study > spec, naming. A launcher is any object with `run(points, study)` that blocks
until every point has its `status` ("done" / "failed"), `error` and `seconds`. Point and Study fields are a
stable interface.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rankscope.methods import config_from_dict
from rankscope.core.errors import ConfigError
from rankscope.core.schema import merge_dicts, parse_overrides, read_yaml
from rankscope.studies.naming import point_name
from rankscope.studies.spec import SHARED, ControlSpec, TuneSpec, read_spec

SAME_AS_MAIN = "= main"  # rankscope.studies.findings.SAME_AS_MAIN: a control point whose lr equals its main point's (not run)
STAGES = ("tune", "confirm", "main", "control")
STAGE_DIRS = {"tune": "tune", "confirm": "tune-confirm", "main": "", "control": "control"}  # each stage's folder under runs_dir


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
    method_options: dict[str, Any] = field(default_factory=dict)  # shared across the grid's methods (docs/studies.md)

    def planned(self) -> list[tuple[dict[str, Any], Point]]:
        """(grid values, main point) for every main run, a tuned field at its first grid value (rankscope.studies.preflight reads
        the study through this and `tuning_configs`)."""
        out = []
        for values in grid_values(self):
            if self.tune is not None:
                values = {**values, self.tune.field: self.tune.grid[0]}
            out.append((values, build_point(self, values, "main")))
        return out

    def tuning_configs(self) -> list[dict[str, Any]]:
        """The config of every tuning run as `run_tuning` makes them: each grid value of each cell at the tuning seed and
        budget, then (with `tune.confirm`) that many values per cell at the main horizon (which ones is known only after
        tuning; the grid's first ones stand in). Widening at an edge adds runs that cannot be known in advance."""
        if self.tune is None:
            return []
        t = self.tune
        out = []
        for cell in tune_cells(self):
            out += [tune_point(self, cell, v).config for v in t.grid]
            out += [tune_point(self, cell, v, "confirm").config for v in t.grid[: t.confirm or 0]]
        return out


class Launcher(Protocol):
    def run(self, points: list[Point], study: Study) -> None: ...


# --------------------------------------------------------------------------- loading
def load_study(path: str | Path, runs_dir: str | Path | None = None) -> Study:
    path = Path(path)
    spec = read_spec(path)
    base = read_yaml(path.parent / spec.base) if spec.base else {}
    base = merge_dicts(base, parse_overrides(list(spec.overrides)))
    root = Path(runs_dir or spec.runs_dir or Path("runs") / spec.name)
    pretrain = _load_pretrain(spec.pretrain, path)
    if pretrain is not None:  # a fine-tuning study: every point adapts the base the study pretrains first
        base = merge_dicts(base, {"finetune": {"base": str(pretrain_dir(root))}})
    if spec.tune is not None:
        spec.tune.default_seed(spec.grid.get("train.seed") or [base.get("train", {}).get("seed", 0)])
        parse_overrides(spec.tune.overrides)
    study = Study(path, spec.name, [], list(spec.after), [str(a) for a in spec.eval_args], [str(a) for a in spec.analyze_args],
                  spec.parallel, root, grid=spec.grid, tune=spec.tune, control=spec.control, run_name=spec.run_name, base=base,
                  when=spec.when, match_memory=spec.match_memory, pretrain=pretrain,
                  expect_unmeasured=[str(x) for x in spec.expect_unmeasured], method_options=dict(spec.method_options))
    _check_method_options(study)
    if spec.findings is not None:
        from rankscope.studies.findings import validate_findings

        study.findings = validate_findings(spec.findings, where=f"study {path}")
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
    config = path.parent / spec.config
    overrides = [str(o) for o in spec.overrides]
    from rankscope.methods import load_config

    load_config(config, overrides)  # validated now, before any run
    return [str(config), *overrides]


def pretrain_dir(runs_dir: Path) -> Path:
    """Where a fine-tuning study's base is trained: <runs_dir>/pretrain/base (two levels down, so that a report of
    the study folder does not take the base for one of its fine-tunes)."""
    return runs_dir / "pretrain" / "base"


def _check_unique(points: list[Point], path: Path) -> None:
    seen: dict[Path, Point] = {}
    for p in points:
        if p.run_dir in seen and seen[p.run_dir].values != p.values:
            raise ConfigError(f"study {path}: points {seen[p.run_dir].values} and {p.values} get the same folder {p.run_dir}; "
                              "put every grid (and tuned) field into `run_name`")
        seen[p.run_dir] = p


def grid_values(study: Study) -> list[dict[str, Any]]:
    return [dict(zip(study.grid, combo)) for combo in itertools.product(*study.grid.values())]


# --------------------------------------------------------------------------- tuning cells (rankscope.studies.tuning runs them)
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


def tune_point(study: Study, cell: dict[str, Any], value: float, stage: str = "tune") -> Point:
    """A tuning run: the cell's fields, the other grid fields at their first value, one seed, the short budget (the tuning
    overrides); with stage "confirm", the same run at the main horizon."""
    t = study.tune
    values = {k: (cell[k] if k in cell else vs[0]) for k, vs in study.grid.items()}
    values["train.seed"] = t.seed
    values[t.field] = value
    return build_point(study, values, stage, t.overrides if stage == "tune" else None, cell)


# --------------------------------------------------------------------------- points
def build_point(study: Study, values: dict[str, Any], stage: str, extra: list[str] | None = None,
                cell: dict[str, Any] | None = None) -> Point:
    """A validated point: base (with `overrides`) < `method_options` < grid values < each matching `when` entry (its
    overrides, then its `method_options.*`) < stage overrides (extra) < the tuned value."""
    layers = point_layers(study, values, extra)
    # the point's method, from every override at once (as one list, so that two overrides that conflict are refused)
    method = merge_dicts(study.base, parse_overrides([o for kind, layer in layers if kind == "over" for o in layer])).get("method")
    raw = resolve_layers(study.base, layers, method.get("name", "full") if isinstance(method, dict) else "full")
    cfg = config_from_dict(raw)  # validate every point before running any
    if study.match_memory is not None:  # equal optimiser memory: rank / density per point
        cfg = _match_memory(study, cfg, layers)
    pname = point_name(values, study.run_name)
    if pname in (".", ".."):
        raise ConfigError(f"study {study.path}: point name {pname!r} is not a folder of its own; change run_name or the grid value")
    run_dir = study.runs_dir / STAGE_DIRS[stage] / pname if STAGE_DIRS[stage] else study.runs_dir / pname
    return Point(pname, values, cfg.to_dict(), run_dir, stage=stage, cell=cell)


def point_layers(study: Study, values: dict[str, Any], extra: list[str] | None) -> list[tuple[str, Any]]:
    """The layers of a point's config above the base, in order: ("over", [key=value, ...]) or ("shared", {option: value})."""
    layers: list[tuple[str, Any]] = [("shared", study.method_options),
                                     ("over", [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()])]
    for cond, more in study.when.items():
        k, _, v = str(cond).partition("=")
        if k in values and str(values[k]) == v:
            layers.append(("over", [o for o in more if not o.startswith(SHARED)]))
            layers.append(("shared", parse_overrides([o for o in more if o.startswith(SHARED)]).get(SHARED[:-1], {})))
    tuned = []
    if study.tune is not None and study.tune.field in values:  # the tuned value wins over `when` and budgets
        tuned = [f"{study.tune.field}={json.dumps(values[study.tune.field])}"]
    return [*layers, ("over", [*(extra or []), *tuned])]


def resolve_layers(base: dict[str, Any], layers: list[tuple[str, Any]], method: Any) -> dict[str, Any]:
    """`base` with each layer merged in turn; a shared layer writes the options that `method` has (its config class's
    fields) into `method.<method>`, as `method.<method>.KEY=VALUE` overrides would."""
    own = method_fields(method) or set()
    raw = base
    for kind, layer in layers:
        if kind == "over":
            raw = merge_dicts(raw, parse_overrides(layer))
        elif any(k in own for k in layer):
            raw = merge_dicts(raw, {"method": {method: {k: v for k, v in layer.items() if k in own}}})
    return raw


def method_fields(name: Any) -> set[str] | None:
    """The option names of method `name` (its config class's fields), or None for a name the registry lacks."""
    from rankscope.methods import METHODS

    return {f.name for f in dataclasses.fields(METHODS[name].config_class)} if isinstance(name, str) and name in METHODS else None


def _check_method_options(study: Study) -> None:
    """Every shared method option (the mapping's and the `when` entries') is an option of some method of the grid."""
    names = study.grid.get("method.name") or [(study.base.get("method") or {}).get("name", "full")]
    keys = list(study.method_options)
    for more in study.when.values():
        keys += list(parse_overrides([o for o in more if o.startswith(SHARED)]).get(SHARED[:-1], {}))
    known = {n: method_fields(n) for n in names}
    for key in keys:
        if not any(key in (f or set()) for f in known.values()):
            raise ConfigError(f"study {study.path}: method_options.{key} is an option of no method of the grid "
                              f"({', '.join(map(str, names))}); write options under `method_options` that at least one of them has")


def _match_memory(study: Study, cfg, layers: list[tuple[str, Any]]):
    """`cfg` with its rank / density matched to `match_memory`: bytes, or the optimiser state of the named method at this
    point (the point's config with that method, the study's shared method options filled in for it)."""
    from rankscope.methods.memory import apply_memory_match, measured_state_bytes, memory_knob

    target = study.match_memory
    if memory_knob(cfg.method.name) is None:  # a method without a knob (full) keeps its config
        return cfg
    if isinstance(target, str) and not target.isdigit():
        if target == cfg.method.name:
            return cfg
        ref = config_from_dict(resolve_layers(study.base, [*layers, ("over", [f"method.name={target}"])], target))
        target = measured_state_bytes(ref)
    return apply_memory_match(cfg, int(target))
