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
          d_k = log(mean(method) / mean(reference)) per seed, and its t interval. Condition numbers are summarised by
          geometric means, everything else by arithmetic means; non-finite values are left out and counted in the row
          (`non_finite`); a (kind, component, metric) the analysis did not measure is reported as "not measured".
          The raw `condition_number` of a matrix whose s_min sits at the rounding floor (analysis row rank_deficient = 1)
          measures floating point: such a row is "rank-deficient", never a finite effect (use condition_number_numerical).
          `reference_kind: grad` compares the method's `kind` with the reference's gradient, as the paper's notebooks did
          ("as the paper measured it"); gradient rows and such cross-object rows carry `counts_toward_verdict: false`
          and `object`; every `update` row names its windows (one cycle, within one cycle, spans N merges).
  rank-matched  as rank, metric per: the reference's matrix truncated to the method's numerical rank at the same
          (step, layer, head), PER of that top-k spectrum (from spectra.parquet), against the method's PER.

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
TESTS = ("paired", "slope", "rank", "rank-matched")
RANK_TESTS = ("rank", "rank-matched")  # rules evaluated per (kind, component) from rank_metrics.parquet
CLAIMS = ("higher", "lower")
PHASES = ("early", "end")
RULE_KEYS = {"id", "finding", "test", "metric", "claim", "min_effect", "chance", "margin", "kind", "component", "phase", "method",
             "reference", "description", "reference_kind"}
SPEC_KEYS = {"method", "reference", "confidence", "rules"}
VERDICTS = ("confirmed", "confirmed (implied by the rank bound)", "refuted", "inconclusive", "rank-deficient", "not measured")

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
    # over the numerical rank (the raw one is "rank-deficient" where s_min is rounding noise), geometric means
    {"id": "d-cond-numerical", "finding": "d", "test": "rank", "kind": ["cumulative_update"], "component": ["wv", "wo", "ov", "w2"],
     "metric": "condition_number_numerical", "phase": "early", "claim": "higher"},
    # the stronger null: full-rank's update cut to ReLoRA's numerical rank at the same step
    {"id": "d-per-rank-matched", "finding": "d", "test": "rank-matched", "kind": ["update", "cumulative_update"],
     "component": ["wv", "wo", "ov", "w2"], "metric": "per", "phase": "early", "claim": "lower"},
    # the paper's own comparison: ReLoRA's adapter update s*B*A per cycle against full-rank's gradient (different objects)
    {"id": "d-per-as-paper", "finding": "d", "test": "rank", "kind": ["cycle_update"], "reference_kind": "grad",
     "component": ["wv", "wo", "w2"], "metric": "per", "phase": "early", "claim": "lower"},
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
    if r["test"] in RANK_TESTS:
        for key in ("kind", "component"):
            v = r.get(key)
            v = [v] if isinstance(v, str) else v
            if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{where}: a rank rule needs {key}: a name or a list of names (e.g. kind: [cumulative_update, grad])")
            r[key] = v
        r.setdefault("phase", "early")
        if r["phase"] not in PHASES:
            raise ConfigError(f"{where}: phase must be one of {', '.join(PHASES)}")
        if "reference_kind" in r and (r["test"] != "rank" or not isinstance(r["reference_kind"], str)):
            raise ConfigError(f"{where}: reference_kind names one kind (e.g. grad), on a rank rule (test: rank)")
        if r["test"] == "rank-matched" and r["metric"] != "per":
            raise ConfigError(f"{where}: a rank-matched rule compares PER (metric: per)")
    elif any(k in r for k in ("kind", "component", "phase", "reference_kind")):
        raise ConfigError(f"{where}: kind, component, phase and reference_kind belong to rank rules (test: rank or rank-matched)")
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

            names = pq.read_schema(path).names
            t = pq.read_table(path, columns=[c for c in ("step", "layer", "head", "kind", "component", "metric", "value") if c in names])
            cache[path] = {c: t.column(c).to_pylist() for c in t.column_names}
            n = len(cache[path]["step"])
            for c in ("layer", "head"):
                cache[path].setdefault(c, [-1] * n)
    return cache[path], path


GEOMETRIC = ("condition_number", "condition_number_numerical")  # ratios spanning decades: summarised by geometric means
GRADIENT_NOTE = "gradient of the effective weight, not the applied update"
PAPER_NOTE = ("as the paper measured it: ReLoRA's adapter update s*B*A against full-rank's gradient, two different objects "
              "(a rank-r update has PER <= r / min(m, n) by construction; docs/metrics.md)")
UPDATE_KINDS = ("update", "cumulative_update", "cycle_update", "lora_update")


def _rows(table, kind, comp, metric, steps: set[int]) -> list[tuple[tuple[int, int, int], float]]:
    """((step, layer, head), value) of every row of one (kind, component, metric) at the given steps."""
    rows = zip(table["step"], table["layer"], table["head"], table["kind"], table["component"], table["metric"], table["value"])
    return [((int(s), int(la), int(h)), math.nan if v is None else float(v))
            for s, la, h, k, c, m, v in rows if k == kind and c == comp and m == metric and int(s) in steps]


def _values(table, kind, comp, metric, steps: set[int]) -> dict[tuple[int, int, int], float]:
    """(step, layer, head) -> value of one (kind, component, metric) at the given steps."""
    return dict(_rows(table, kind, comp, metric, steps))


def _phase_mean(table, rule, kind, comp, steps: set[int]) -> tuple[float | None, int, int]:
    """Mean of `rule['metric']` over layers, heads and steps: geometric for condition numbers, else arithmetic;
    (mean, values used, values left out: non-finite, or <= 0 for a geometric mean)."""
    from rankscope.analysis.compare import summarise

    vals = [v for _, v in _rows(table, kind, comp, rule["metric"], steps)]
    sm = summarise(vals, "geometric" if rule["metric"] in GEOMETRIC else "arithmetic")
    return sm.value, sm.n, sm.non_finite + sm.non_positive


def _steps(table, kind, comp, metric) -> set[int]:
    rows = zip(table["step"], table["kind"], table["component"], table["metric"])
    return {int(s) for s, k, c, m in rows if k == kind and c == comp and m == metric}


def _object(kind: str, ref_kind: str) -> tuple[str, bool, str | None]:
    """(what is compared, whether it counts toward a verdict about updates, label note) of a rank row."""
    if kind != ref_kind:
        paper = kind in UPDATE_KINDS and ref_kind == "grad"
        return f"{kind} vs {ref_kind}", False, PAPER_NOTE if paper else f"compares different objects ({kind} against {ref_kind})"
    if kind == "grad":
        return "gradient", False, GRADIENT_NOTE
    return ("update" if kind in UPDATE_KINDS else kind), True, None


def _windows(table, comp, steps: set[int], config) -> list[dict[str, Any]]:
    """The `update` windows (start, end] at `steps` with their label (one cycle, within one cycle, spans N merges)."""
    from rankscope.analysis.compare import cycle_end_steps, cycle_start, window_label

    starts = _values(table, "update", comp, "window_start", steps)
    ends, first = cycle_end_steps(config), cycle_start(config)
    seen = sorted({(int(v), s) for (s, _, _), v in starts.items() if math.isfinite(v)}, key=lambda w: w[1])
    return [{"start": a, "end": b, "label": window_label(a, b, ends, first)} for a, b in seen]


def _phase_steps(row, rr, common: set[int]) -> tuple[set[int], str]:
    if row["phase"] == "early":
        limit = int(rr.config.get("train", {}).get("max_steps", 0)) / 4
        return {s for s in common if 0 < s <= limit}, f"0 < step <= {limit:g}"
    return ({max(common)} if common else set()), "the last common checkpoint"


def _rank(runs, rule, row, method, ref, cache) -> dict[str, Any]:
    """A rank row (test rank or rank-matched), its object, window and counting notes in front of its reason."""
    return _labelled(_rank_row(runs, rule, row, method, ref, cache))


def _rank_row(runs, rule, row, method, ref, cache) -> dict[str, Any]:
    kind, comp, metric = row["kind"], row["component"], rule["metric"]
    ref_kind = rule.get("reference_kind", kind)
    obj, counts, note = _object(kind, ref_kind)
    row.update({"reference_kind": ref_kind, "object": obj, "counts_toward_verdict": counts, "note": note,
                "summary": "geometric mean" if metric in GEOMETRIC else "arithmetic mean"})
    if rule["test"] == "rank-matched":
        row.update({"object": "update vs rank-matched update" if kind in UPDATE_KINDS else f"{kind} vs rank-matched {kind}",
                    "note": f"{ref}'s {kind} truncated to {method}'s numerical rank at the same step"})
    pairs, why = _pairs(runs, method, ref, row["size"])
    if why:
        return _not_measured(row, why)
    diffs, sources, notes, bounds = {}, [], [], []
    non_finite, deficient, windows, unknown = {method: 0, ref: 0}, {method: [0, 0], ref: [0, 0]}, [], []
    for seed, rm, rr in pairs:
        (tm, pm), (tr, pr) = _rank_table(rm, cache), _rank_table(rr, cache)
        if tm is None or tr is None:
            missing = pm if tm is None else pr
            return _not_measured(row, f"not measured: {missing} is missing (run `rankscope analyze` on it)")
        m_metric = "numerical_rank" if rule["test"] == "rank-matched" else metric
        sm, sr = _steps(tm, kind, comp, m_metric), _steps(tr, ref_kind, comp, metric)
        if not sm or not sr:
            which, what = (pm, f"kind={kind} component={comp} metric={m_metric}") if not sm else (pr, f"kind={ref_kind} component={comp} metric={metric}")
            return _not_measured(row, f"not measured: {what} is not in {which}")
        steps, phase = _phase_steps(row, rr, sm & sr)
        if not steps:
            return _not_measured(row, f"not measured: no checkpoint with {phase} analysed in both runs of seed {seed}")
        if kind == "update":
            windows += [w for w in _windows(tm, comp, steps, rm.config) if w not in windows]
        if rule["test"] == "rank-matched":
            got = _rank_matched(tm, rr, kind, comp, steps)
            if isinstance(got, str):
                return _not_measured(row, f"not measured: {got}")
            mm, mr, left = got
            if left:
                notes.append(f"seed {seed}: {left} matrices without a {ref} spectrum left out")
        else:
            if metric == "condition_number":  # the raw s_min of a rank-deficient matrix is rounding noise
                for who, t, k in ((method, tm, kind), (ref, tr, ref_kind)):
                    flags = _values(t, k, comp, "rank_deficient", steps)
                    if not flags:
                        bound = _values(t, k, comp, "rank_bound", steps)
                        if not bound or not all(v < 1 for v in bound.values()):
                            unknown.append(str(pm if who == method else pr))
                            continue
                        flags = {key: 1.0 for key in bound}  # rank-deficient by construction
                    deficient[who][0] += sum(1 for v in flags.values() if v >= 0.5)
                    deficient[who][1] += len(flags)
            (mm, _, bad_m), (mr, _, bad_r) = _phase_mean(tm, rule, kind, comp, steps), _phase_mean(tr, rule, ref_kind, comp, steps)
            non_finite[method] += bad_m
            non_finite[ref] += bad_r
            if bad_m or bad_r:
                notes.append(f"seed {seed}: {bad_m + bad_r} non-finite values left out of the mean")
        if mm is None or mr is None or mm <= 0 or mr <= 0:
            notes.append(f"seed {seed}: no positive finite mean, pair left out")
            continue
        diffs[seed] = math.log(mm / mr)
        if metric in ("per", "condition_number") and rule["test"] == "rank" and kind == ref_kind:
            bound, _, _ = _phase_mean(tm, {**rule, "metric": "rank_bound"}, kind, comp, steps)
            if bound is not None:
                bounds.append((min(bound, 1.0), mr))
        sources += [f"{pm}#{kind}/{comp}/{m_metric}@steps {sorted(steps)}", f"{pr}#{ref_kind}/{comp}/{metric}@steps {sorted(steps)}"]
    row["non_finite"] = non_finite
    if windows:
        labels = sorted({w["label"] for w in windows})
        row["windows"], row["window"] = windows, labels[0] if len(labels) == 1 else "mixed: " + ", ".join(labels)
    elif kind == "update":
        row["windows"], row["window"] = [], "unknown (no window_start rows: re-run `rankscope analyze`)"
    if metric == "condition_number" and any(d[0] for d in deficient.values()):
        row["rank_deficient"] = {who: {"deficient": d[0], "matrices": d[1]} for who, d in deficient.items()}
        row = _not_measured(row, "")
        row["verdict"] = "rank-deficient"
        row["reason"] = ("rank-deficient: the raw s_min sits at the rounding floor (numerical rank < min(m, n)) in "
                         + ", ".join(f"{d[0]} of {d[1]} {who} matrices" for who, d in deficient.items() if d[1])
                         + "; the raw condition number measures floating point there, not learning (see condition_number_numerical)")
        return row
    if unknown:
        return _not_measured(row, f"not measured: {unknown[0]} has no rank_deficient rows, so a raw s_min at the rounding floor "
                                  "cannot be told apart (re-run `rankscope analyze`)")
    if not diffs:
        return _not_measured(row, "not measured: " + "; ".join(notes))
    row = _finish(row, diffs, sources)
    ratio = math.exp(row["estimate"])
    mean_word = "rank-matched " if rule["test"] == "rank-matched" else ""
    row["reason"] += (f"; {method} / {mean_word}{ref} = {ratio:.3g}x (geometric mean over seeds of the {row['summary']}s)"
                      + ("; " + "; ".join(notes) if notes else ""))
    if bounds and metric == "per":
        b, r = sum(x for x, _ in bounds) / len(bounds), sum(y for _, y in bounds) / len(bounds)
        row["reason"] += f"; {method}'s PER <= {b:.3g} by construction (rank bound; {ref}'s PER {r:.3g})"
        if row["verdict"] == "confirmed" and all(x < y for x, y in bounds):
            row["verdict"] = "confirmed (implied by the rank bound)"
    return row


def _labelled(row: dict[str, Any]) -> dict[str, Any]:
    """The row's window and object notes at the front of its reason, where a reader of the table sees them."""
    extra = []
    if row.get("note"):
        extra.append(row["note"])
    if row.get("windows"):
        extra.append("update windows " + ", ".join(f"({w['start']}, {w['end']}] {w['label']}" for w in row["windows"]))
    elif row.get("window"):
        extra.append(f"update window {row['window']}")
    if not row.get("counts_toward_verdict", True):
        extra.append("not counted toward a verdict about updates")
    if extra:
        row["reason"] = "; ".join(extra) + ("; " + row["reason"] if row["reason"] else "")
    return row


def _rank_matched(tm, rr, kind, comp, steps) -> tuple[float, float, int] | str:
    """Mean PER of the method's matrices and mean PER of the reference's same matrices (same step, layer, head)
    truncated to the method's numerical rank (analysis.compare.truncated_per), and how many had no spectrum;
    a string saying why where nothing can be compared."""
    from rankscope.analysis.compare import read_spectra, truncated_per

    ranks = _values(tm, kind, comp, "numerical_rank", steps)
    pers = _values(tm, kind, comp, "per", steps)
    path = Path(rr.dir) / "analysis" / "spectra.parquet"
    if not path.is_file():
        return f"{path} is missing (run `rankscope analyze` on it)"
    spectra = read_spectra(path, kind, comp, steps)
    mine, theirs, left = [], [], 0
    for key, k in sorted(ranks.items()):
        if key not in spectra or key not in pers or not math.isfinite(k) or not math.isfinite(pers[key]):
            left += 1
            continue
        mine.append(pers[key])
        theirs.append(truncated_per(spectra[key], int(k)))
    if not mine:
        return (f"{path} holds no {kind} {comp} spectra at steps {sorted(steps)} (analyse without --spectra-steps, "
                "which keeps only those steps' spectra)")
    return sum(mine) / len(mine), sum(theirs) / len(theirs), left


# --------------------------------------------------------------------------- tables for the report
def _cell(value: Any, sources: list[str] | None = None) -> dict[str, Any] | None:
    """A table cell in report.py's format (mean + per-run values with their source); None prints as '–'."""
    if value is None:
        return None
    return {"mean": value, "std": None, "n": 1, "values": [{"value": value, "source": s} for s in (sources or [])]}


def _signed(x: Any) -> str:
    return f"{x:+.4g}" if isinstance(x, (int, float)) else str(x)


def _text(x: Any) -> str:
    return str(x)


def _interval(x: Any) -> str:
    return f"[{x[0]:+.4g}, {x[1]:+.4g}]"


def _what(r: dict[str, Any]) -> str:
    if r["test"] in RANK_TESTS:
        ref = (f"rank-matched {r['reference']}" if r["test"] == "rank-matched"
               else f"{r['reference']} {r['reference_kind']}" if r.get("reference_kind", r["kind"]) != r["kind"] else r["reference"])
        paper = ", as the paper measured it" if r.get("note") == PAPER_NOTE else ""
        return f"({r['finding']}) {r['metric']} of {r['kind']} {r['component']}, {r['phase']}{paper}: log({r['method']} / {ref})"
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
