"""The tuning stage: per cell (the `tune.cell` fields), every value of `tune.grid` at one seed and the short
budget, widened at an edge by the grid's end ratio (`tune_decision`), optionally confirmed at the main horizon;
then the main and control points at each cell's chosen value (`staged_points`). docs/studies.md, "Stages"."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

from rankscope.core.errors import ConfigError
from rankscope.core.jsonfiles import read_json_object
from rankscope.studies.points import SUMMARY_FIX, refresh
from rankscope.studies.progress import stage_header
from rankscope.studies.record import write_sweep_summary
from rankscope.studies.study import SAME_AS_MAIN, CellTuning, Launcher, Point, Study, build_point, cell_label, cell_of, grid_values, tune_cells, tune_point


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
        todo = [p for p in wanted if p.status not in ("done", "failed") and refresh(p, study) != "done"]
        study.points = [*points.values(), *[p for p in study.points if p.stage != "tune"]]
        stage_header(study, "tune", wanted, todo, show, f" round {round_no}")
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
        wanted[ct.label] = [tune_point(study, ct.cell, d["value"], "confirm") for d in finite[: t.confirm]]
    points = [p for ps in wanted.values() for p in ps]
    known = {p.run_dir: p for p in study.points}
    points = [known.get(p.run_dir, p) for p in points]
    study.points = [*[p for p in study.points if p.run_dir not in {q.run_dir for q in points}], *points]
    todo = [p for p in points if p.status not in ("done", "failed") and refresh(p, study) != "done"]
    stage_header(study, "confirm", points, todo, show)
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
