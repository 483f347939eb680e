"""Pre-registered findings: each rule of a study file gets an estimate, a 95% interval and a verdict.

A study file states its rules before any run (`findings:`; the paper's four findings when `rules` is left out):

    findings:
      method: relora            # the method under test
      reference: full           # what it is compared with, seed by seed
      confidence: 0.95
      rules:
        - {id: a-loss, finding: a, test: paired, metric: final_val_loss, claim: higher}
        - {id: b-loss, finding: b, test: slope, metric: final_val_loss, claim: higher}
        - {id: c-blimp, finding: c, test: paired, metric: blimp_overall, claim: lower, chance: 0.5, margin: 0.05}
        - {id: d-per, finding: d, test: rank, kind: [cumulative_update, grad], component: [wv, wo, ov, w2],
           metric: per, phase: early, claim: lower}

Tests (rankscope.stats does the arithmetic):
  paired  per size: d_k = metric(method, seed k) - metric(reference, seed k); the mean of d_k and its t interval
          (bootstrap beside it where n >= 5). Metrics are read as the report reads them (eval.json, else summary.json).
          With `chance` and `margin`: where both methods' mean lies within `margin` of `chance`, the verdict is
          inconclusive, "not testable at this scale"; the distance from chance is always stated.
  slope   across sizes: OLS of every (size, seed) gap d_k on log(parameters of the reference model at that size),
          t interval with n - 2 degrees of freedom. `claim: higher` means the gap grows with size.
  rank    per size and for each (kind, component) named: from each run's analysis/rank_metrics.parquet
          (`rankscope analyze`), the mean of `metric` over layers, heads and the checkpoints of the phase that both
          runs of the pair have (early: 0 < step <= max_steps / 4; end: the last common checkpoint), then
          d_k = log(mean(method) / mean(reference)) per seed, and its t interval. Non-finite values are left out and
          counted in the row; a (kind, component, metric) the analysis did not measure is reported as "not measured".

Verdict (claim higher; for lower the signs flip): confirmed if the interval's lower end is above `min_effect`
(default 0), refuted if its upper end is below 0, inconclusive otherwise, and always inconclusive with n < 2.
Rows whose data are missing get the verdict "not measured" with the reason; no row is dropped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from rankscope import stats
from rankscope.errors import ConfigError

CONTROL_SUFFIX = " (control)"  # the method label of a study's control runs (e.g. ReLoRA at full-rank's tuned LR)
TESTS = ("paired", "slope", "rank")
CLAIMS = ("higher", "lower")
PHASES = ("early", "end")
RULE_KEYS = {"id", "finding", "test", "metric", "claim", "min_effect", "chance", "margin", "kind", "component", "phase", "method",
             "reference", "description"}
SPEC_KEYS = {"method", "reference", "confidence", "rules"}
VERDICTS = ("confirmed", "confirmed (implied by the rank bound)", "refuted", "inconclusive", "not measured")

# Weiss et al. (2025): ReLoRA (a) has higher loss / bits-per-byte, (b) more so at the larger size, (c) lower BLiMP,
# (d) lower PER and higher condition numbers early in training, for updates and for gradients.
PAPER_RULES: list[dict[str, Any]] = [
    {"id": "a-val-loss", "finding": "a", "test": "paired", "metric": "final_val_loss", "claim": "higher"},
    {"id": "a-val-bpb", "finding": "a", "test": "paired", "metric": "val_bpb_macro", "claim": "higher"},
    {"id": "b-val-loss", "finding": "b", "test": "slope", "metric": "final_val_loss", "claim": "higher"},
    {"id": "c-blimp", "finding": "c", "test": "paired", "metric": "blimp_overall", "claim": "lower", "chance": 0.5, "margin": 0.05},
    {"id": "d-per", "finding": "d", "test": "rank", "kind": ["cumulative_update", "grad"], "component": ["wv", "wo", "ov", "w2"],
     "metric": "per", "phase": "early", "claim": "lower"},
    {"id": "d-cond", "finding": "d", "test": "rank", "kind": ["cumulative_update", "grad"], "component": ["wv", "wo", "ov", "w2"],
     "metric": "condition_number", "phase": "early", "claim": "higher"},
]


# --------------------------------------------------------------------------- the rules
def validate_findings(spec: Any, where: str = "findings") -> dict[str, Any]:
    """The normalised findings spec ({method, reference, confidence, rules}); one ConfigError line if it is wrong."""
    if spec in (True, "paper"):
        spec = {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: `findings` must be a mapping (method, reference, rules) or `paper`")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown findings key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(SPEC_KEYS))}")
    conf = spec.get("confidence", 0.95)
    if not isinstance(conf, float) or not 0 < conf < 1:
        raise ConfigError(f"{where}: findings.confidence must be a number in (0, 1), e.g. 0.95")
    out = {"method": str(spec.get("method", "relora")), "reference": str(spec.get("reference", "full")), "confidence": conf, "rules": []}
    rules = spec.get("rules", PAPER_RULES)
    if not isinstance(rules, list) or not rules:
        raise ConfigError(f"{where}: findings.rules must be a non-empty list of rules (see docs/studies.md)")
    ids = set()
    for i, rule in enumerate(rules):
        out["rules"].append(_validate_rule(rule, f"{where}: findings.rules[{i}]"))
        if out["rules"][-1]["id"] in ids:
            raise ConfigError(f"{where}: findings rule id {out['rules'][-1]['id']!r} is used twice; give each rule its own id")
        ids.add(out["rules"][-1]["id"])
    return out


def _validate_rule(rule: Any, where: str) -> dict[str, Any]:
    if not isinstance(rule, dict):
        raise ConfigError(f"{where} must be a mapping such as "
                          "{id: a-loss, finding: a, test: paired, metric: final_val_loss, claim: higher}")
    unknown = set(rule) - RULE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(RULE_KEYS))}")
    r = dict(rule)
    if r.get("test") not in TESTS:
        raise ConfigError(f"{where}: test must be one of {', '.join(TESTS)}, got {r.get('test')!r}")
    if r.get("claim") not in CLAIMS:
        raise ConfigError(f"{where}: claim must be one of {', '.join(CLAIMS)} (the method's value against the reference's)")
    if not isinstance(r.get("metric"), str):
        raise ConfigError(f"{where}: metric must name a metric, e.g. final_val_loss (paired/slope) or per (rank)")
    r.setdefault("id", f"{r.get('finding', '?')}-{r['metric']}")
    r["id"], r["finding"] = str(r["id"]), str(r.get("finding", r["id"]))
    for key in ("min_effect", "chance", "margin"):
        if key in r and (not isinstance(r[key], (int, float)) or isinstance(r[key], bool) or (key != "chance" and r[key] < 0)):
            raise ConfigError(f"{where}: {key} must be a number{' >= 0' if key != 'chance' else ''}")
    r["min_effect"] = float(r.get("min_effect", 0.0))
    if ("chance" in r) != ("margin" in r) or ("chance" in r and r["test"] != "paired"):
        raise ConfigError(f"{where}: chance and margin go together, on a paired rule (e.g. chance: 0.5, margin: 0.05)")
    if r["test"] == "rank":
        for key in ("kind", "component"):
            v = r.get(key)
            v = [v] if isinstance(v, str) else v
            if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{where}: a rank rule needs {key}: a name or a list of names (e.g. kind: [cumulative_update, grad])")
            r[key] = v
        r.setdefault("phase", "early")
        if r["phase"] not in PHASES:
            raise ConfigError(f"{where}: phase must be one of {', '.join(PHASES)}")
    elif any(k in r for k in ("kind", "component", "phase")):
        raise ConfigError(f"{where}: kind, component and phase belong to rank rules (test: rank)")
    return r


def decide(lo: float | None, hi: float | None, claim: str, min_effect: float = 0.0, n: int = 0) -> tuple[str, str]:
    """(verdict, reason) from an interval on (method - reference), or on log(method / reference) for rank rules."""
    if n < 2 or lo is None or hi is None:
        return "inconclusive", f"n = {n}: too few paired seeds (or sizes) for an interval"
    # claim `lower` is claim `higher` on the negated difference
    a, b = (lo, hi) if claim == "higher" else (-hi, -lo)
    if a > min_effect:
        return "confirmed", f"the interval lies above {min_effect:g}" if claim == "higher" else f"the interval lies below {-min_effect:g}"
    if b < 0:
        return "refuted", "the interval lies on the other side of 0"
    if a > 0:
        return "inconclusive", f"the interval excludes 0 but not the pre-registered minimum effect {min_effect:g}"
    return "inconclusive", "the interval includes 0"


# --------------------------------------------------------------------------- evaluation
def read_sweep(paths: Iterable[str | Path]) -> dict[str, Any] | None:
    """The first sweep.json found among study directories (None for plain run directories)."""
    for p in map(Path, paths):
        if (p / "sweep.json").is_file():
            return json.loads((p / "sweep.json").read_text())
    return None


def _sizes(runs: list[Any]) -> list[str]:
    from rankscope.config import PRESETS

    order = list(PRESETS)
    sizes = list(dict.fromkeys(r.size for r in runs))
    return sorted(sizes, key=lambda s: (order.index(s.split(" ")[0]) if s.split(" ")[0] in order else len(order), sizes.index(s)))


def _by_seed(runs: list[Any], method: str, size: str) -> dict[int, Any]:
    return {r.seed: r for r in runs if r.method == method and r.size == size}


def evaluate_findings(runs: list[Any], spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One result row per (rule, size) — per (rule, kind, component, size) for rank rules, one per slope rule."""
    spec = validate_findings(spec)  # idempotent: sweep.json holds the normalised spec
    out: list[dict[str, Any]] = []
    cache: dict[Path, Any] = {}
    for rule in spec["rules"]:
        method, ref = rule.get("method", spec["method"]), rule.get("reference", spec["reference"])
        base = {"id": rule["id"], "finding": rule["finding"], "test": rule["test"], "metric": rule["metric"], "claim": rule["claim"],
                "method": method, "reference": ref, "min_effect": rule["min_effect"], "confidence": spec["confidence"]}
        if rule["test"] == "slope":
            out.append(_slope(runs, rule, base, method, ref))
            continue
        for size in _sizes(runs):
            if rule["test"] == "paired":
                out.append(_paired(runs, rule, {**base, "size": size}, method, ref))
            else:
                for kind in rule["kind"]:
                    for comp in rule["component"]:
                        out.append(_rank(runs, rule, {**base, "size": size, "kind": kind, "component": comp, "phase": rule["phase"]},
                                         method, ref, cache))
    return out


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
        (vm, sm), (vr, sr) = rm.value(rule["metric"]), rr.value(rule["metric"])
        if vm is None or vr is None:
            continue
        diffs[seed] = vm - vr
        sources += [sm, sr]
        means[method].append(vm)
        means[ref].append(vr)
    if not diffs:
        return _not_measured(row, f"no pair at {row['size']} has {rule['metric']} (eval.json / summary.json)")
    row = _finish(row, diffs, sources)
    row["reason"] += _mixed_sources(sources)
    if "chance" in rule:
        avg = {k: sum(v) / len(v) for k, v in means.items()}
        dist = ", ".join(f"{k} {v:.4f} ({v - rule['chance']:+.4f})" for k, v in avg.items())
        row["chance"] = {"chance": rule["chance"], "margin": rule["margin"], "means": avg}
        if all(abs(v - rule["chance"]) <= rule["margin"] for v in avg.values()):
            row["verdict"] = "inconclusive"
            row["reason"] = f"not testable at this scale: {dist} lie within {rule['margin']:g} of chance {rule['chance']:g}"
        else:
            row["reason"] += f"; distance from chance {rule['chance']:g}: {dist}"
    return row


def _slope(runs, rule, row, method, ref) -> dict[str, Any]:
    row["size"] = "across sizes"
    xs, ys, sources, sizes = [], [], [], []
    for size in _sizes(runs):
        pairs, _ = _pairs(runs, method, ref, size)
        for seed, rm, rr in pairs:
            (vm, sm), (vr, sr) = rm.value(rule["metric"]), rr.value(rule["metric"])
            params = rr.summary.get("parameters")
            if vm is None or vr is None or not params:
                continue
            xs.append(math.log(float(params)))
            ys.append(vm - vr)
            sources += [sm, sr]
            sizes.append(size)
    if len(set(sizes)) < 2:
        return _not_measured(row, f"needs paired {method} / {ref} runs at 2 or more sizes with {rule['metric']}; found {len(set(sizes))}")
    iv = stats.slope_interval(xs, ys, row["confidence"])
    verdict, reason = decide(iv.lo, iv.hi, rule["claim"], rule["min_effect"], iv.n)
    row.update({"n": iv.n, "per_seed": {}, "points": [{"size": s, "log_params": x, "gap": y} for s, x, y in zip(sizes, xs, ys)],
                "estimate": iv.estimate, "lo": iv.lo, "hi": iv.hi, "interval": f"ols-t, {iv.df} df", "bootstrap": None,
                "verdict": verdict, "reason": reason + " (slope of the gap per unit log(parameters))" + _mixed_sources(sources),
                "sources": sources})
    return row


def _mixed_sources(sources: list[str]) -> str:
    """A warning where the paired values come from different estimates (eval.json for some runs, the
    in-training summary.json for others), which a difference should not mix; empty otherwise."""
    files = {Path(s.split("#")[0]).name for s in sources if s}
    return f"; WARNING: values mix estimates from {' and '.join(sorted(files))}" if len(files) > 1 else ""


def _rank_table(run, cache: dict[Path, Any]):
    path = Path(run.dir) / "analysis" / "rank_metrics.parquet"
    if path not in cache:
        if not path.is_file():
            cache[path] = None
        else:
            import pyarrow.parquet as pq

            t = pq.read_table(path, columns=["step", "kind", "component", "metric", "value"])
            cache[path] = {c: t.column(c).to_pylist() for c in t.column_names}
    return cache[path], path


def _phase_mean(table, rule, kind, comp, steps: set[int]) -> tuple[float | None, int, int]:
    vals = [v for s, k, c, m, v in zip(table["step"], table["kind"], table["component"], table["metric"], table["value"])
            if k == kind and c == comp and m == rule["metric"] and int(s) in steps]
    finite = [v for v in vals if v is not None and math.isfinite(v)]
    return (sum(finite) / len(finite) if finite else None), len(finite), len(vals) - len(finite)


def _steps(table, kind, comp, metric) -> set[int]:
    rows = zip(table["step"], table["kind"], table["component"], table["metric"])
    return {int(s) for s, k, c, m in rows if k == kind and c == comp and m == metric}


def _rank(runs, rule, row, method, ref, cache) -> dict[str, Any]:
    pairs, why = _pairs(runs, method, ref, row["size"])
    if why:
        return _not_measured(row, why)
    kind, comp, metric = row["kind"], row["component"], rule["metric"]
    diffs, sources, notes, bounds = {}, [], [], []
    for seed, rm, rr in pairs:
        (tm, pm), (tr, pr) = _rank_table(rm, cache), _rank_table(rr, cache)
        if tm is None or tr is None:
            missing = pm if tm is None else pr
            return _not_measured(row, f"not measured: {missing} is missing (run `rankscope analyze` on it)")
        sm, sr = _steps(tm, kind, comp, metric), _steps(tr, kind, comp, metric)
        if not sm or not sr:
            which = pm if not sm else pr
            return _not_measured(row, f"not measured: kind={kind} component={comp} metric={metric} is not in {which}")
        common = sm & sr
        if row["phase"] == "early":
            limit = int(rr.config.get("train", {}).get("max_steps", 0)) / 4
            steps = {s for s in common if 0 < s <= limit}
            phase = f"0 < step <= {limit:g}"
        else:
            steps = {max(common)} if common else set()
            phase = "the last common checkpoint"
        if not steps:
            return _not_measured(row, f"not measured: no checkpoint with {phase} analysed in both runs of seed {seed}")
        (mm, _, bad_m), (mr, _, bad_r) = _phase_mean(tm, rule, kind, comp, steps), _phase_mean(tr, rule, kind, comp, steps)
        if bad_m or bad_r:
            notes.append(f"seed {seed}: {bad_m + bad_r} non-finite values left out")
        if mm is None or mr is None or mm <= 0 or mr <= 0:
            notes.append(f"seed {seed}: no positive finite mean, pair left out")
            continue
        diffs[seed] = math.log(mm / mr)
        if metric in ("per", "condition_number"):  # a rank-r update: PER <= r / min(m, n), cond = inf below full rank
            bound, _, _ = _phase_mean(tm, {**rule, "metric": "rank_bound"}, kind, comp, steps)
            if bound is not None:
                bounds.append((min(bound, 1.0), mr))
        sources += [f"{pm}#{kind}/{comp}/{metric}@steps {sorted(steps)}", f"{pr}#{kind}/{comp}/{metric}@steps {sorted(steps)}"]
    if not diffs:
        return _not_measured(row, "not measured: " + "; ".join(notes))
    row = _finish(row, diffs, sources)
    ratio = math.exp(row["estimate"])
    row["reason"] += f"; {method} / {ref} = {ratio:.3g}x (geometric mean over seeds)" + ("; " + "; ".join(notes) if notes else "")
    if bounds and metric == "per":
        b, r = sum(x for x, _ in bounds) / len(bounds), sum(y for _, y in bounds) / len(bounds)
        row["reason"] += f"; {method}'s PER <= {b:.3g} by construction (rank bound; {ref}'s PER {r:.3g})"
        if row["verdict"] == "confirmed" and all(x < y for x, y in bounds):
            row["verdict"] = "confirmed (implied by the rank bound)"
    elif bounds:  # condition number: a matrix below full rank has s_min ~ 0, so its cond is ~1/eps by construction
        deficient = all(x < 1.0 for x, _ in bounds)
        row["reason"] += f"; {method}'s mean rank bound {sum(x for x, _ in bounds) / len(bounds):.3g} of min(m, n)"
        if deficient:
            row["reason"] += " (rank-deficient by construction: s_min ~ 0)"
            if row["verdict"] == "confirmed":
                row["verdict"] = "confirmed (implied by the rank bound)"
    return row


# --------------------------------------------------------------------------- tables for the report
def _cell(value: Any, sources: list[str] | None = None) -> dict[str, Any] | None:
    """A table cell in report.py's format (mean + per-run values with their source); None prints as '–'."""
    if value is None:
        return None
    return {"mean": value, "std": None, "n": 1, "values": [{"value": value, "source": s} for s in (sources or [])]}


def _signed(x: Any) -> str:
    """+0.1234 style; float round-off of a zero difference (5.551e-17 from 0.3 - 0.1 - 0.2) prints as 0."""
    if isinstance(x, (int, float)) and abs(x) < 1e-12:
        return "0"
    return f"{x:+.4g}" if isinstance(x, (int, float)) else str(x)


def _text(x: Any) -> str:
    return str(x)


def _interval(x: Any) -> str:
    return f"[{_signed(x[0])}, {_signed(x[1])}]"


def _what(r: dict[str, Any]) -> str:
    if r["test"] == "rank":
        return f"({r['finding']}) {r['metric']} of {r['kind']} {r['component']}, {r['phase']}: log({r['method']} / {r['reference']})"
    if r["test"] == "slope":
        return f"({r['finding']}) slope of {r['metric']} gap ({r['method']} - {r['reference']}) vs log(params)"
    return f"({r['finding']}) {r['metric']}: {r['method']} - {r['reference']}"


def study_findings(runs: list[Any], sweep: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The evaluated rules of a study's sweep.json (none where it pre-registered no findings)."""
    spec = (sweep or {}).get("findings")
    return evaluate_findings(runs, spec) if spec else []


def verdict_counts(results: list[dict[str, Any]]) -> str:
    """One line per rule id: how many of its rows got each verdict, e.g. `a-val-loss (a): refuted 2, inconclusive 1`."""
    by_rule: dict[str, dict[str, int]] = {}
    for r in results:
        counts = by_rule.setdefault(f"{r['id']} ({r['finding']})", {})
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    order = {v: i for i, v in enumerate(VERDICTS)}
    return "; ".join(f"{rule}: " + ", ".join(f"{v} {n}" for v, n in sorted(c.items(), key=lambda kv: order.get(kv[0], 99)))
                     for rule, c in by_rule.items())


def findings_tables(runs: list[Any], sweep: dict[str, Any] | None, results: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The findings table, the tuned-value table and the per-seed paired differences, as report.py tables.

    Empty where the study pre-registered no findings and tuned nothing (plain run folders)."""
    tables = []
    results = study_findings(runs, sweep) if results is None else results
    if results:
        rows = []
        for r in results:
            iv = (r["lo"], r["hi"]) if r["lo"] is not None else None
            claim = f"{r['method']} {r['claim']}" + (f" by > {r['min_effect']:g}" if r["min_effect"] else "")
            rows.append({"label": _what(r), "cells": [_cell(r["size"]), _cell(claim), _cell(r["n"]), _cell(r["estimate"], r["sources"]),
                                                      _cell(iv), _cell(r["verdict"]), _cell(r["reason"])]})
        conf = f"{results[0]['confidence']:.0%}"
        tables.append({"title": f"Findings: pre-registered rules, {conf} intervals over paired seeds (rankscope.findings)",
                       "note": "At a glance (rows per verdict, by rule): " + verdict_counts(results),
                       "columns": ["finding", "size", "claim", "n", "estimate", f"{conf} interval", "verdict", "why"], "rows": rows,
                       "formats": [_text, _text, _text, _signed, _interval, _text, _text]})
    tuning = (sweep or {}).get("tuning")
    if tuning:
        rows = []
        for ct in tuning.get("cells", []):
            tried = ", ".join(f"{d['value']:g}" for d in ct["tried"])
            losses = ", ".join("failed" if d["loss"] is None else f"{d['loss']:.4f}" for d in ct["tried"])
            pos = ct["position"] + (f" ({ct['edge_side']} end, widened {tuning['widen']}x)" if ct.get("edge_side") else "")
            rows.append({"label": ct["label"], "cells": [_cell(tried), _cell(losses, [d["run_dir"] for d in ct["tried"]]),
                                                         _cell(ct["chosen"]), _cell(pos)]})
        budget = " ".join(tuning["overrides"]) or "main budget"
        tables.append({"title": f"Tuned {tuning['field']} per cell (seed {tuning['seed']}, {budget}; "
                                f"lowest {tuning['metric']} from summary.json)",
                       "columns": ["cell", "values tried", tuning["metric"], "chosen", "position"], "rows": rows,
                       "formats": [_text, _text, lambda x: f"{x:g}", _text]})
    paired = [r for r in results if r["per_seed"]]
    if paired:
        seeds = sorted({s for r in paired for s in r["per_seed"]}, key=int)
        rows = []
        for r in paired:
            boot = (r["bootstrap"]["lo"], r["bootstrap"]["hi"]) if r["bootstrap"] else None
            rows.append({"label": f"{_what(r)} at {r['size']}",
                         "cells": [_cell(r["per_seed"].get(s)) for s in seeds]
                         + [_cell(r["estimate"]), _cell((r["lo"], r["hi"]) if r["lo"] is not None else None), _cell(boot)]})
        tables.append({"title": "Paired differences per seed (method - reference; log ratio for rank metrics)",
                       "columns": ["comparison", *[f"seed {s}" for s in seeds], "mean", "t interval", "bootstrap interval (n >= 5)"],
                       "rows": rows, "formats": [_signed] * len(seeds) + [_signed, _interval, _interval]})
    return tables
