"""The series the report's figures draw, read from the runs: loss against tokens (metrics.jsonl), and PER and condition
number against step, mean over layers and heads (geometric for condition numbers), from the analysis tables of the
runs' checkpoints where every run has one, else (weights only) the in-loop rows of metrics.jsonl."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np


def mean_band(series: list[dict[float, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x, mean, min, max over the series (seeds) at the x values every series has."""
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not common:
        return (np.array([]),) * 4
    ys = np.array([[s[x] for x in common] for s in series])
    return np.array(common), ys.mean(0), ys.min(0), ys.max(0)


def loss_series(run, key: str) -> dict[float, float]:
    return {float(r["tokens"]): float(r[key]) for r in run.rows
            if isinstance(r.get(key), (int, float)) and "tokens" in r and math.isfinite(r[key]) and r["tokens"] > 0}


def _cond_of(values: dict[str, dict[int, list[float]]]) -> dict[int, list[float]]:
    """The plain condition number where every value is finite; else the one over the numerical rank
    (a d x d OV product has rank <= head_dim, so its s_min is ~0)."""
    plain = values.get("condition_number", {})
    if plain and all(math.isfinite(v) for vs in plain.values() for v in vs):
        return plain
    return values.get("condition_number_numerical", {})


KINDS = ("weight", "update", "cumulative_update", "grad")  # drawn, in this order, where the analysis has them
KIND_NAMES = {"weight": "weights", "update": "updates between checkpoints", "cumulative_update": "cumulative updates (W_t - W_0)",
              "grad": "gradients"}


def rank_series(run, use_analysis: bool = True, kind: str = "weight") -> tuple[dict[tuple[str, str], dict[float, float]], str]:
    """(metric per|cond, component) -> {step: value} (mean over layers and heads, geometric for cond) and the source:
    the analysis table of the run's checkpoints (matrices of `kind`) when `rankscope analyze` ran, else
    (weights only) the in-loop rows `rank/<metric>/<component>` of metrics.jsonl."""
    path = run.dir / "analysis" / "rank_metrics.parquet"
    out: dict[tuple[str, str], dict[float, float]] = {}
    if use_analysis and path.is_file():
        from rankscope.analysis.run import load_table

        t = load_table(path)
        acc: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        for name, step, comp, k, metric, v in zip(t["run"], t["step"], t["component"], t["kind"], t["metric"], t["value"]):
            if name == run.name and k == kind and v is not None and metric in ("per", "condition_number", "condition_number_numerical"):
                acc[comp][metric][step].append(v)
        for comp, by_metric in acc.items():
            for m, values in (("per", by_metric.get("per", {})), ("cond", _cond_of(by_metric))):
                avg = np.mean if m == "per" else (lambda v: np.exp(np.mean(np.log(v))))  # condition numbers: geometric mean
                finite = {float(s): float(avg(v)) for s, v in values.items() if all(math.isfinite(x) and (m == "per" or x > 0) for x in v)}
                if finite:
                    out[(m, comp)] = finite
        if out or kind != "weight":
            return out, str(path)
    if kind != "weight":
        return out, ""
    for r in run.rows:
        for k, v in r.items():
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == "rank" and parts[1] in ("per", "cond") and isinstance(v, (int, float)) and math.isfinite(v):
                out.setdefault((parts[1], parts[2]), {})[float(r["step"])] = float(v)
    return out, f"{run.dir / 'metrics.jsonl'} (in-loop rank/* rows)"


def rank_kinds(runs) -> list[str]:
    """The KINDS the runs' analysis tables hold (weights always: the in-loop rows stand in for them)."""
    found = {"weight"}
    if analysed(runs):
        from rankscope.analysis.run import load_table

        for r in runs:
            found |= set(load_table(r.dir / "analysis" / "rank_metrics.parquet")["kind"])
    return [k for k in KINDS if k in found]


def analysed(runs) -> bool:
    """Use the analysis tables only when every run has one: seeds must be averaged at the same steps."""
    return all((r.dir / "analysis" / "rank_metrics.parquet").is_file() for r in runs)
