"""Studies: a base config and a grid over any config fields, run as one sweep.

A study file (YAML):

    name: paper-cpu                 # runs go to <runs_dir>/<point name>/ (default runs/<name>)
    base: ../configs/mini.yaml      # config every point starts from (relative to the study file)
    overrides: [train.max_steps=300]          # applied to every point
    grid:                           # the cartesian product of these values
      method.name: [full, relora]
      model.preset: [micro, mini]
      train.seed: [0, 1]
    when:                           # extra overrides for points matching key=value
      model.preset=mini: [train.lr=2e-3]
    match_memory: relora            # optional: bytes, or a method name whose optimiser state every
                                    # point's rank / density is matched to (methods.memory.apply_memory_match)
    after: [eval, analyze]          # steps run on each finished run (see STEPS)
    eval_args: [--blimp, ../shared/data/blimp, --blimp-max-pairs, "100"]
    parallel: 2                     # runs at once (threads are split between them)

`rankscope sweep STUDY.yaml` runs every point in its own directory (its resolved config,
environment and git commit are recorded by the trainer), skips finished runs, resumes interrupted
ones, and reports failed runs without stopping the others.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rankscope.config import config_from_dict, describe_fields, merge_dicts, parse_overrides, read_yaml
from rankscope.errors import ConfigError

STUDY_KEYS = {"name", "base", "overrides", "grid", "when", "after", "eval_args", "analyze_args", "parallel", "runs_dir", "description", "match_memory", "slurm"}
STEPS = ("eval", "analyze")


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


def _short(key: str) -> str:
    return key.split(".")[-1]


def point_name(values: dict[str, Any]) -> str:
    parts = [f"{_short(k)}-{v}" for k, v in values.items()]
    return "_".join(parts).replace("/", "-").replace(" ", "") or "base"


def load_study(path: str | Path, runs_dir: str | Path | None = None) -> Study:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} not found; give a YAML file such as studies/paper-cpu.yaml")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"study file {path} must hold a mapping (name, base, grid, ...)")
    unknown = set(spec) - STUDY_KEYS
    if unknown:
        raise ConfigError(f"unknown study key(s) {', '.join(sorted(unknown))} in {path}; valid keys: {', '.join(sorted(STUDY_KEYS))}")
    name = spec.get("name") or path.stem
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not grid or any(not isinstance(v, list) or not v for v in grid.values()):
        raise ConfigError(f"study {path}: `grid` must map config fields to non-empty lists of values, e.g. method.name: [full, relora]")
    valid = {row[0] for row in describe_fields()}
    for key in grid:
        if key not in valid:
            raise ConfigError(f"study {path}: grid field {key!r} is not a config field; see `rankscope info --fields`")
    base = read_yaml(path.parent / spec["base"]) if spec.get("base") else {}
    base = merge_dicts(base, parse_overrides(list(spec.get("overrides") or [])))
    when = spec.get("when") or {}
    after = list(spec.get("after") or [])
    for step in after:
        if step not in STEPS:
            raise ConfigError(f"study {path}: unknown `after` step {step!r}; valid: {', '.join(STEPS)}")
    root = Path(runs_dir or spec.get("runs_dir") or Path("runs") / name)
    points = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        over = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]
        for cond, extra in when.items():
            k, _, v = str(cond).partition("=")
            if k in values and str(values[k]) == v:
                over += list(extra)
        cfg_dict = merge_dicts(base, parse_overrides(over))
        cfg = config_from_dict(cfg_dict)  # validate every point before running any
        if spec.get("match_memory") is not None:  # equal optimiser memory: rank / density per point
            from rankscope.methods.memory import apply_memory_match

            cfg = apply_memory_match(cfg, spec["match_memory"])
        pname = point_name(values)
        points.append(Point(pname, values, cfg.to_dict(), root / pname))
    return Study(path, name, points, after, [str(a) for a in spec.get("eval_args") or []],
                 [str(a) for a in spec.get("analyze_args") or []], int(spec.get("parallel") or 1), root)


def point_state(point: Point, study: Study) -> str:
    """done / partial / left, and refuse a run directory that belongs to another study."""
    marker = point.run_dir / "study.json"
    if marker.exists():
        owner = json.loads(marker.read_text()).get("study")
        if owner != study.name:
            raise ConfigError(f"{point.run_dir} belongs to study {owner!r}, not {study.name!r}; use another runs_dir (--runs-dir)")
    elif point.run_dir.exists() and any(point.run_dir.iterdir()):
        raise ConfigError(f"{point.run_dir} holds a run that is not part of study {study.name!r}; use another runs_dir (--runs-dir)")
    summary = point.run_dir / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("steps") == point.config["train"]["max_steps"]:
        done = json.loads(marker.read_text()).get("steps_done", []) if marker.exists() else []
        return "done" if all(s in done for s in study.after) else "partial"
    return "left"


def _commands(point: Point, study: Study, threads: int) -> list[tuple[str, list[str]]]:
    py = [sys.executable, "-m", "rankscope"]
    cfg_path = point.run_dir / "study-config.yaml"
    cmds = [("train", [*py, "train", str(cfg_path), "-o", str(point.run_dir), "train.progress=false", f"train.threads={threads}"])]
    if "eval" in study.after:
        cmds.append(("eval", [*py, "eval", str(point.run_dir), "--json", str(point.run_dir / "eval.json"), *study.eval_args]))
    if "analyze" in study.after:
        cmds.append(("analyze", [*py, "analyze", str(point.run_dir), *study.analyze_args]))
    return cmds


def _start(point: Point, study: Study, threads: int) -> None:
    point.run_dir.mkdir(parents=True, exist_ok=True)
    (point.run_dir / "study-config.yaml").write_text(yaml.safe_dump(point.config, sort_keys=False))
    marker = point.run_dir / "study.json"
    old = json.loads(marker.read_text()) if marker.exists() else {}
    marker.write_text(json.dumps({"study": study.name, "study_file": str(study.path), "point": point.values, "steps_done": old.get("steps_done", [])}, indent=1))


def _mark_done(point: Point, step: str) -> None:
    marker = point.run_dir / "study.json"
    data = json.loads(marker.read_text())
    data["steps_done"] = sorted(set(data.get("steps_done", [])) | {step})
    marker.write_text(json.dumps(data, indent=1))


def run_point(point: Point, study: Study, threads: int) -> None:
    """Train (or resume) one point, then its `after` steps; a failure is recorded, not raised."""
    _start(point, study, threads)
    t0 = time.time()
    done = json.loads((point.run_dir / "study.json").read_text()).get("steps_done", [])
    log = open(point.run_dir / "sweep.log", "a")
    try:
        for step, cmd in _commands(point, study, threads):
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
                _mark_done(point, step)
        point.status = "done"
    finally:
        log.close()
        point.seconds = time.time() - t0


def run_study(study: Study, parallel: int | None = None, show=print, launcher=None) -> list[Point]:
    """`launcher` (e.g. rankscope.slurm.SlurmLauncher): `launcher.run(points, study)` runs the points
    left and blocks until each has its status; None runs them here as subprocesses."""
    if launcher is not None:
        todo = [p for p in study.points if point_state(p, study) != "done"]
        for p in study.points:
            if p not in todo:
                p.status = "done"
        show(f"study {study.name}: {len(study.points)} runs, {len(study.points) - len(todo)} done, {len(todo)} to run -> {study.runs_dir}")
        launcher.run(todo, study)
        write_sweep_summary(study)
        for p in study.points:
            if p.status == "failed":
                show(f"FAILED {p.name}: {p.error}")
        return study.points
    parallel = max(1, parallel or study.parallel)
    threads = max(1, (os.cpu_count() or 1) // parallel)
    todo = []
    for p in study.points:
        p.status = point_state(p, study)
        if p.status != "done":
            todo.append(p)
    show(f"study {study.name}: {len(study.points)} runs, {len(study.points) - len(todo)} done, {len(todo)} to run, {parallel} at a time -> {study.runs_dir}")
    from concurrent.futures import ThreadPoolExecutor

    with _Progress(study.points, show) as progress, ThreadPoolExecutor(parallel) as pool:
        futures = []
        for p in todo:
            def work(p=p):
                p.status = "running"
                progress.refresh()
                run_point(p, study, threads)
                progress.refresh()

            futures.append(pool.submit(work))
        for f in futures:
            f.result()
    write_sweep_summary(study)
    failed = [p for p in study.points if p.status == "failed"]
    for p in failed:
        show(f"FAILED {p.name}: {p.error}  (log: {p.run_dir / 'sweep.log'})")
    return study.points


def write_sweep_summary(study: Study) -> Path:
    rows = [{"name": p.name, "values": p.values, "status": p.status, "error": p.error, "run_dir": str(p.run_dir), "seconds": round(p.seconds, 1)} for p in study.points]
    study.runs_dir.mkdir(parents=True, exist_ok=True)
    out = study.runs_dir / "sweep.json"
    jobs = json.loads(out.read_text()).get("jobs") if out.exists() else None  # SLURM job records (rankscope.slurm)
    out.write_text(json.dumps({"study": study.name, "study_file": str(study.path), "runs": rows, **({"jobs": jobs} if jobs else {})}, indent=1))
    return out


class _Progress:
    """A live table of runs (rich) on a terminal; plain status lines otherwise."""

    def __init__(self, points: list[Point], show):
        self.points, self.show, self.live = points, show, None

    def table(self):
        from rich.table import Table

        t = Table(title="sweep")
        for col in ("run", "status", "seconds"):
            t.add_column(col)
        for p in self.points:
            colour = {"done": "green", "running": "yellow", "failed": "red"}.get(p.status, "white")
            t.add_row(p.name, f"[{colour}]{p.status}[/]", f"{p.seconds:.0f}" if p.seconds else "")
        return t

    def __enter__(self):
        if sys.stdout.isatty():
            from rich.live import Live

            self.live = Live(self.table(), refresh_per_second=2)
            self.live.__enter__()
        return self

    def refresh(self):
        if self.live is not None:
            self.live.update(self.table())
        else:
            counts = {s: sum(p.status == s for p in self.points) for s in ("done", "running", "left", "partial", "failed")}
            self.show("sweep: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)


# --------------------------------------------------------------------------- CLI verb
def _sweep_args(p) -> None:
    p.add_argument("study", help="study YAML, e.g. studies/paper-cpu.yaml")
    p.add_argument("--parallel", type=int, help="runs at once (default: the study's `parallel`)")
    p.add_argument("--runs-dir", help="where the runs go (default: the study's runs_dir or runs/<name>)")
    p.add_argument("--list", action="store_true", help="only list the points and their state")
    from rankscope.slurm import add_args

    add_args(p)


def _register() -> None:
    from rankscope.cli import verb

    @verb("sweep", "run every point of a study grid (skips finished runs, resumes interrupted ones)", _sweep_args)
    def cmd_sweep(args) -> None:
        study = load_study(args.study, args.runs_dir)
        if args.list:
            for p in study.points:
                print(f"{point_state(p, study):8s} {p.run_dir}")
            return
        launcher = None
        if args.launcher == "slurm" or args.dry_run or args.status:
            from rankscope import slurm

            res = slurm.resources_from_args(args.study, args)
            if args.dry_run:
                for p in study.points:
                    print(f"# ---- {p.name}: {p.run_dir}\n{slurm.sbatch_script(p, study, res)}")
                return
            if args.status:
                print(slurm.format_status(slurm.status_rows(study, slurm.SlurmLauncher(res, require_sbatch=False))))
                return
            launcher = slurm.SlurmLauncher(res)
        points = run_study(study, args.parallel, launcher=launcher)
        failed = sum(p.status == "failed" for p in points)
        print(f"sweep finished: {len(points) - failed} ok, {failed} failed; summary {study.runs_dir / 'sweep.json'}")
        if failed:
            raise SystemExit(1)


_register()
