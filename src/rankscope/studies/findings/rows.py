"""Rows of the paired and slope tests: the metric of a run as the report reads it, the seeds both methods ran, and one
result row per (rule, size), or per slope rule across sizes or token budgets, before the statistics of the families."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rankscope.core.errors import ConfigError
from rankscope.studies import stats
from rankscope.studies.findings.scale import _sizes, body_params
from rankscope.studies.findings.verdicts import SAME_AS_MAIN, decide


def metric_value(run: Any, metric: str) -> tuple[float | None, str | None]:
    """(value, source) as Run.value reads it, except that val_bpb_macro / val_loss_macro average the training domains only:
    a run whose data hold held-out domains (data.eval_only_domains) has its macro recomputed from the per-domain values."""
    held = list(((run.config or {}).get("data") or {}).get("eval_only_domains") or [])
    prefix = {"val_bpb_macro": "val_bpb/", "val_loss_macro": "val_loss/"}.get(metric)
    if not held or prefix is None:
        return run.value(metric)
    for where, values in ((run.dir / "eval.json", run.eval), (run.dir / "summary.json", run.summary)):
        doms = {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix) and isinstance(v, (int, float))}
        train = {d: v for d, v in doms.items() if d not in held}
        if train:
            return sum(train.values()) / len(train), f"{where}#mean of {prefix}{{{','.join(sorted(train))}}} (held-out domains left out)"
    return None, None


def _by_seed(runs: list[Any], method: str, size: str) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for r in runs:
        if r.method == method and r.size == size:
            if r.seed in out:  # never the last one silently: rankscope.reports.runs.collect refuses or excludes duplicates first
                raise ConfigError(f"two runs of {method} at {size}, seed {r.seed}: {out[r.seed].dir} and {r.dir}; "
                                  "remove one, or report with --exclude-duplicates")
            out[r.seed] = r
    return out


def _same_as_main(row: dict[str, Any], why: str) -> dict[str, Any]:
    row = _not_measured(row, why)
    row["verdict"] = SAME_AS_MAIN
    return row


def _finish(row: dict[str, Any], diffs: dict[int, float], sources: list[str]) -> dict[str, Any]:
    iv = stats.t_interval(list(diffs.values()), row["confidence"])
    boot = stats.bootstrap_interval(list(diffs.values()), row["confidence"])
    verdict, reason = decide(iv.lo, iv.hi, row["claim"], row["min_effect"], iv.n)
    row.update({"n": iv.n, "per_seed": {str(k): v for k, v in diffs.items()}, "estimate": iv.estimate, "lo": iv.lo, "hi": iv.hi,
                "interval": "t",
                "bootstrap": None if boot is None else {"lo": boot.lo, "hi": boot.hi, "n_resamples": stats.BOOTSTRAP_RESAMPLES},
                "verdict": verdict, "reason": reason, "sources": sources})
    return row


def _not_measured(row: dict[str, Any], reason: str) -> dict[str, Any]:
    row.update({"n": 0, "per_seed": {}, "estimate": None, "lo": None, "hi": None, "interval": None, "bootstrap": None,
                "verdict": "not measured", "reason": reason, "sources": []})
    return row


def _pairs(runs, method, ref, size) -> tuple[list[tuple[int, Any, Any]], str | None]:
    m, r = _by_seed(runs, method, size), _by_seed(runs, ref, size)
    if not m or not r:
        return [], f"no finished {method if not m else ref} runs at {size}"
    seeds = sorted(set(m) & set(r))
    if not seeds:
        return [], f"no seed has both a {method} and a {ref} run at {size}"
    return [(s, m[s], r[s]) for s in seeds], None


def _paired(runs, rule, row, method, ref) -> dict[str, Any]:
    pairs, why = _pairs(runs, method, ref, row["size"])
    if why:
        return _not_measured(row, why)
    diffs, sources, means = {}, [], {method: [], ref: []}
    for seed, rm, rr in pairs:
        (vm, sm), (vr, sr) = metric_value(rm, rule["metric"]), metric_value(rr, rule["metric"])
        if vm is None or vr is None:
            continue
        diffs[seed] = vm - vr
        sources += [sm, sr]
        means[method].append(vm)
        means[ref].append(vr)
    if not diffs:
        return _not_measured(row, f"no pair at {row['size']} has {rule['metric']} (eval.json / summary.json)")
    mixed = _mixed_sources(sources)
    if mixed:
        return _not_measured(row, mixed)
    row = _finish(row, diffs, sources)
    if "chance" in rule:
        avg = {k: sum(v) / len(v) for k, v in means.items()}
        dist = ", ".join(f"{k} {v:.4f} ({v - rule['chance']:+.4f})" for k, v in avg.items())
        row["chance"] = {"chance": rule["chance"], "margin": rule["margin"], "means": avg}
        if all(abs(v - rule["chance"]) <= rule["margin"] for v in avg.values()):
            row["verdict"], row["not_testable"] = "inconclusive", True
            row["reason"] = f"not testable at this scale: {dist} lie within {rule['margin']:g} of chance {rule['chance']:g}"
        else:
            row["reason"] += f"; distance from chance {rule['chance']:g}: {dist}"
    return row


def _slope(runs, rule, row, method, ref, same=None) -> dict[str, Any]:
    """The slope of the gap on log(body parameters) (axis params) or log(tokens per body parameter) (axis tokens_per_param),
    fitted to one point per group (size or budget): the group's x and its seeds' mean gap; k - 2 degrees of freedom."""
    row["size"] = "across sizes" if rule["axis"] == "params" else "across token budgets"
    groups, sources, points, why = {}, [], [], []
    for size in _sizes(runs):
        pairs, _ = _pairs(runs, method, ref, size)
        xs, gaps = [], []
        for seed, rm, rr in pairs:
            (vm, sm), (vr, sr) = metric_value(rm, rule["metric"]), metric_value(rr, rule["metric"])
            body = body_params(rr) or rr.summary.get("parameters")
            tokens = rr.summary.get("tokens")
            x = body if rule["axis"] == "params" else (tokens / body if tokens and body else None)
            if vm is None or vr is None or not x:
                continue
            xs.append(math.log(float(x)))
            gaps.append(vm - vr)
            sources += [sm, sr]
            points.append({"size": size, "seed": seed, "x": xs[-1], "gap": gaps[-1]})
        if gaps:
            if len(set(xs)) > 1:
                why.append(f"{size}: runs differ in x")
            groups[size] = (sum(xs) / len(xs), gaps)
    unit = "log(body parameters)" if rule["axis"] == "params" else "log(tokens per body parameter)"
    row.update({"unit": f"gap per unit {unit}", "axis": rule["axis"]})
    mixed = _mixed_sources(sources)
    if mixed:
        return _not_measured(row, mixed)
    if len(groups) < 3:
        return _not_measured(row, f"needs paired {method} / {ref} runs at 3 or more {'sizes' if rule['axis'] == 'params' else 'budgets'} "
                                   f"with {rule['metric']} (one point per group, k - 2 degrees of freedom); found {len(groups)}")
    fit = stats.slope_of_means(groups, row["confidence"])
    iv = fit.interval
    verdict, reason = decide(iv.lo, iv.hi, rule["claim"], rule["min_effect"], iv.n)
    seeds = [len(g[1]) for g in groups.values()]
    row.update({"n": iv.n, "per_seed": {}, "points": points, "seeds_per_group": min(seeds), "df": iv.df, "stderr": iv.stderr,
                "group_means": [{"group": g, "x": x, "mean_gap": m, "seeds": n} for g, x, m, n in fit.points],
                "estimate": iv.estimate, "lo": iv.lo, "hi": iv.hi, "interval": f"ols-t on {iv.n} group means, {iv.df} df", "bootstrap": None,
                "verdict": verdict, "reason": reason + f" (slope of the {method} - {ref} gap per unit {unit}, {iv.n} groups of "
                                                       f"{min(seeds)}-{max(seeds)} seeds, {iv.df} df)" + "".join(f"; {w}, averaged" for w in why),
                "sources": sources, "p_fit": fit.p})
    if rule.get("extrapolate_to"):
        x0 = math.log(float(rule["extrapolate_to"]))
        pred = stats.predict_mean(fit, x0, row["confidence"])
        inside = min(x for _, x, _, _ in fit.points) <= x0 <= max(x for _, x, _, _ in fit.points)
        row["extrapolation"] = {"to": rule["extrapolate_to"], "log_x": x0, "estimate": pred.estimate, "lo": pred.lo, "hi": pred.hi,
                                "df": pred.df, "interval": "confidence interval of the fitted line's mean (not a prediction interval)",
                                "label": "interpolation" if inside else
                                "EXTRAPOLATION of a straight line far beyond the measured range, not a measurement"}
        if pred.lo is not None:
            row["reason"] += (f"; the line at {rule['extrapolate_to']:g} ({row['extrapolation']['label']}): {pred.estimate:+.3g} "
                              f"[{pred.lo:+.3g}, {pred.hi:+.3g}]")
    return row


def _mixed_sources(sources: list[str]) -> str:
    """Why a difference cannot be taken where its values come from different estimates (eval.json for some runs, the
    in-training summary.json for others); empty where they come from one."""
    files = {Path(s.split("#")[0]).name for s in sources if s}
    if len(files) > 1:
        return (f"not measured: the values mix estimates from {' and '.join(sorted(files))}; "
                "run `rankscope eval` on every run of the pair (or on none)")
    return ""
