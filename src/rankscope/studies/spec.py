"""The study-file format (docs/studies.md): `option()` dataclasses built by the one schema loader
(rankscope.core.schema.build, kind "study"), which refuses an unknown key or a wrong type in one line; each
dataclass's `validate()` holds the checks a type cannot say (a log grid, a validation metric, a folder name).
The findings rules stay a raw mapping here (rankscope.studies.findings builds them); the `slurm:` section is
built by rankscope.studies.slurm_resources, together with the launcher's command-line flags."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rankscope.core.errors import ConfigError
from rankscope.core.schema import build, check, option, safe_load

STEPS = ("eval", "analyze")
TUNE_SEED = 1000  # the default tuning seed: outside the main seeds, so the choice never sees a main seed's data
SHARED = "method_options."  # an override `method_options.KEY=VALUE` (in `when:`): a shared method option


@dataclass
class TuneSpec:
    """The tuning stage (`tune:`): a field tuned per cell on a log grid, widened at an edge."""

    field: str = option("train.lr", "config field tuned on a log grid")
    grid: list[Any] = option([], "at least 2 positive values, e.g. [1.0e-3, 2.0e-3, 4.0e-3]; widened at an edge by its end ratio")
    cell: list[str] | None = option(None, "grid fields that define a cell (default: every grid field but train.seed)")
    seed: int | None = option(None, f"the one seed of the tuning runs (default {TUNE_SEED}, outside the main seeds)")
    overrides: list[str] = option([], "overrides of the tuning runs only (the short budget)")
    metric: str = option("final_val_loss", "summary.json key chosen on, lower is better; a validation figure")
    widen: int = option(2, "automatic widenings per edge and cell")
    confirm: int = option(0, "0, or re-run each cell's best `confirm` (>= 2) values at the main budget and choose there")

    def validate(self) -> None:
        where = "tune"
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in self.grid)
        check(numbers and len(self.grid) >= 2,
              f"{where}.grid must list at least 2 positive numbers (a log grid), e.g. [1.0e-3, 2.0e-3, 4.0e-3]")
        self.grid = sorted(float(v) for v in self.grid)
        check(len(set(self.grid)) == len(self.grid), f"{where}.grid repeats a value; list each value once")
        check(self.confirm >= 0 and self.confirm != 1,
              f"{where}.confirm must be 0 (not confirmed) or an integer >= 2: the best values re-run at the main horizon")
        check(self.widen >= 0, f"{where}.widen must be an integer >= 0 (automatic widenings per edge)")
        parts = self.metric.split("_")
        # a choice made on (or derived from) test data leaks into every figure scored on it
        check("test" not in parts and "val" in parts,
              f"{where}.metric {self.metric!r} is not a validation figure; tune on one (final_val_loss, fewshot_val_loss)")
        check(not any(str(o).startswith(SHARED) for o in self.overrides),
              f"{where}.overrides: method options shared across the grid go under the study's `method_options:`")

    def fit(self, grid: dict[str, list], valid: set[str]) -> None:
        """Checks against the grid, and the default cell (every grid field but the seed)."""
        check(self.field in valid, f"tune.field {self.field!r} is not a config field; see `rankscope info --fields`")
        check(self.field not in grid, f"tune.field {self.field!r} is also a grid field; take it out of `grid` (the tuning stage chooses it)")
        if self.cell is None:
            self.cell = [k for k in grid if k != "train.seed"]
        check(all(k in grid for k in self.cell), f"tune.cell must list grid fields ({', '.join(grid)}), e.g. [method.name, model.preset]")
        check("train.seed" not in self.cell, "tune.cell must not hold train.seed: the tuning runs use one seed (tune.seed)")

    def default_seed(self, seeds: list[Any]) -> None:
        """`seed` unless given: TUNE_SEED, or one above the largest main seed where TUNE_SEED is one of them."""
        if self.seed is None:
            self.seed = TUNE_SEED if TUNE_SEED not in seeds else max(s for s in seeds if isinstance(s, int)) + 1


@dataclass
class ControlSpec:
    """The control stage (`control:`): the points matching `where` at the value tuned for the cell `lr_from` names."""

    where: dict = option({}, "grid values of the control points, e.g. {method.name: relora}")
    lr_from: dict = option({}, "cell fields whose tuned value the control points use, e.g. {method.name: full}")

    def validate(self) -> None:
        check(bool(self.where) and bool(self.lr_from),
              "control must be a mapping with `where: {field: value}` and `lr_from: {field: value}`, "
              "e.g. where: {method.name: relora}, lr_from: {method.name: full}")


@dataclass
class PretrainSpec:
    """`pretrain:` a fine-tuning study's base, trained first into <runs_dir>/pretrain/base."""

    config: str | None = option(None, "the base's run config (relative to the study file)")
    overrides: list[Any] = option([], "overrides of the base's config")

    def validate(self) -> None:
        check(isinstance(self.config, str), "pretrain must be a mapping with `config: FILE` and optional `overrides: [...]`")


@dataclass
class StudySpec:
    """A study file: a base config and a grid over config fields, run as one sweep, optionally in stages."""

    name: str | None = option(None, "the study's name: one folder (and SLURM job) name (default: the file's stem)")
    description: str | None = option(None, "one line on what the study measures")
    base: str | None = option(None, "the run config every point starts from (relative to the study file)")
    runs_dir: str | None = option(None, "where the runs go (default runs/<name>)")
    overrides: list[str] = option([], "key=value overrides of every point")
    method_options: dict = option({}, "options shared across a grid over methods: each point's method takes those it has")
    grid: dict = option({}, "config field -> non-empty list of values: the points are their cartesian product")
    when: dict = option({}, "`field=value` (a grid or tuned field) -> overrides of the matching points")
    run_name: str | None = option(None, "folder-name template, e.g. \"{method}-lr{lr}-s{seed}\"")
    match_memory: int | str | None = option(None, "bytes, or a method whose optimiser state every point's rank / density matches")
    after: list[str] = option([], f"steps run on each finished main and control run ({', '.join(STEPS)})")
    eval_args: list[Any] = option([], "arguments of `rankscope eval` (the eval step)")
    analyze_args: list[Any] = option([], "arguments of `rankscope analyze` (the analyze step)")
    parallel: int = option(1, "runs at once (CPU threads are split between them)")
    tune: TuneSpec = option(None, "the tuning stage (TuneSpec)")
    control: ControlSpec = option(None, "the control stage (ControlSpec); needs `tune`")
    findings: Any = option(None, "pre-registered rules (rankscope.studies.findings)")
    pretrain: PretrainSpec = option(None, "a fine-tuning study's base (PretrainSpec)")
    slurm: dict = option({}, "resources of each point's SLURM job (rankscope.studies.slurm_resources.SlurmResources)")
    expect_unmeasured: list[Any] = option([], "findings rule ids the pre-flight check may find unmeasurable")

    @staticmethod
    def schema_prepare(data: dict[str, Any], where: str) -> dict[str, Any]:
        """A key written with no value (`when:`) is its default, as an empty list or mapping would be."""
        return {k: v for k, v in data.items() if v is not None}

    def validate(self) -> None:
        from rankscope.methods import describe_fields

        name = self.name
        check(isinstance(name, str) and bool(re.fullmatch(r"[\w.+=,@-]+", name)) and not name.startswith("."),
              f"`name` {name!r} must be one folder name of letters, digits and _ . - + = , @ "
              "(not starting with a dot); runs go to runs/<name> unless runs_dir says otherwise")
        check(bool(self.grid) and all(isinstance(v, list) and v for v in self.grid.values()),
              "`grid` must map config fields to non-empty lists of values, e.g. method.name: [full, relora]")
        valid = {row[0] for row in describe_fields()}
        for key in self.grid:
            check(key in valid, f"grid field {key!r} is not a config field; see `rankscope info --fields`")
        for step in self.after:
            check(step in STEPS, f"unknown `after` step {step!r}; valid: {', '.join(STEPS)}")
        check(self.parallel >= 1, f"`parallel` must be a whole number >= 1 (runs at once), got {self.parallel!r}")
        check(all(isinstance(k, str) for k in self.method_options), "`method_options` must map option names to values, e.g. {rank: 16}")
        check(not any(o.startswith(SHARED) for o in self.overrides),
              "`overrides`: method options shared across the grid go under `method_options:`, e.g. method_options: {rank: 16}")
        for section in (self.tune, self.control, self.pretrain):
            if section is not None:
                section.validate()
        if self.tune is not None:
            self.tune.fit(self.grid, valid)
        self.check_when([*self.grid, self.tune.field if self.tune else None], valid)
        if self.control is not None:
            self.check_control()

    def check_when(self, fields: list[str | None], valid: set[str]) -> None:
        """`when:` maps `field=value` (a grid or tuned field) to a list of overrides; anything else would be dropped in silence."""
        for cond, more in self.when.items():
            key, eq, _ = str(cond).partition("=")
            check(bool(eq) and key in valid, f"`when` key {cond!r} must be written field=value with a config field, e.g. \"method.name=relora\"")
            check(key in fields, f"`when` key {cond!r} names {key}, which is neither a grid field nor the tuned one; its overrides would never apply")
            check(isinstance(more, list) and all(isinstance(o, str) and "=" in o for o in more),
                  f"`when` {cond!r} must hold a list of key=value overrides, got {more!r}")

    def check_control(self) -> None:
        check(self.tune is not None, "control needs a `tune:` stage (it runs points at another cell's tuned value)")
        for key in ("where", "lr_from"):
            for k, v in getattr(self.control, key).items():
                check(k in self.grid and v in self.grid[k], f"control.{key}: {k}={v!r} is not a value of the grid ({k}: {self.grid.get(k)})")
        check(all(k in self.tune.cell for k in self.control.lr_from), f"control.lr_from may only name cell fields ({', '.join(self.tune.cell)})")


def read_spec(path: Path) -> StudySpec:
    """The study file at `path`, built and validated; every error names the file."""
    if not path.is_file():
        raise ConfigError(f"study file {path} not found; give a YAML file such as studies/paper-cpu.yaml")
    try:
        data = safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"study file {path} is not valid YAML ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"study file {path} must hold a mapping (name, base, grid, ...)")
    try:
        spec = build(StudySpec, {"name": path.stem, **data}, "", kind="study")
        spec.validate()
    except ConfigError as e:
        raise ConfigError(f"study {path}: {e}") from None
    return spec
