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

Tests (rankscope.studies.stats does the arithmetic):
  paired  per size: d_k = metric(method, seed k) - metric(reference, seed k); the mean of d_k and its t interval
          (bootstrap beside it where n >= 5). Metrics are read as the report reads them (eval.json, else summary.json);
          a pair whose values come from different files is "not measured". val_bpb_macro / val_loss_macro average the
          training domains only (held-out domains, data.eval_only_domains, are left out). With `chance` and `margin`:
          where both methods' mean lies within `margin` of `chance`, the verdict is inconclusive, "not testable at this
          scale"; the distance from chance is always stated.
  slope   across groups (sizes, or token budgets with `axis: tokens_per_param`): one point per group, x = log(body
          parameters) or log(tokens per body parameter) of the reference runs, y = the mean gap over the group's seeds;
          OLS with k - 2 degrees of freedom (seed is nested in group), k >= 3 groups. `claim: higher` means the gap grows
          along x. `extrapolate_to: X` adds the line's value at X with its interval, labelled an extrapolation.
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

Families and verdicts (apply_statistics): each finding pre-registers at most one primary rule (`primary: true`); its rows
form the primary family, Holm-adjusted across all findings; every other row is secondary (exploratory), adjusted within
its finding by `secondary_correction` (bh: Benjamini-Hochberg, default; or holm). The verdict uses the adjusted p (alpha =
1 - confidence): confirmed (the interval also beyond `min_effect`), "not reproduced: opposite direction", "no meaningful
difference" (TOST against the rule's pre-registered `sesoi`, adjusted in the same family), or inconclusive with the
minimum detectable effect at 80% power. A primary endpoint needs >= min_primary_seeds (5) paired seeds. A control row
whose lr equals the main lr is "= main"; it and "not measured" are not verdicts and are not counted as such. Every verdict
names the scale it was tested at; rows missing data say why; no row is dropped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from rankscope.studies import stats
from rankscope.core.errors import ConfigError

CONTROL_SUFFIX = " (control)"  # the method label of a study's control runs (e.g. ReLoRA at full-rank's tuned LR)
TESTS = ("paired", "slope", "rank", "rank-matched")
RANK_TESTS = ("rank", "rank-matched")  # rules evaluated per (kind, component) from rank_metrics.parquet
CLAIMS = ("higher", "lower")
PHASES = ("early", "end")
RULE_KEYS = {"id", "finding", "test", "metric", "claim", "min_effect", "chance", "margin", "kind", "component", "phase", "method",
             "reference", "description", "reference_kind", "primary", "sesoi", "axis", "extrapolate_to"}
SPEC_KEYS = {"method", "reference", "confidence", "rules", "secondary_correction", "min_primary_seeds"}
SLOPE_AXES = ("params", "tokens_per_param")  # x of a slope rule: log(body parameters) or log(tokens per body parameter)
OPPOSITE = "not reproduced: opposite direction"
EQUIVALENT = "no meaningful difference"
SAME_AS_MAIN = "= main"
RANK_DEFICIENT = "rank-deficient"
VERDICTS = ("confirmed", "confirmed (implied by the rank bound)", OPPOSITE, EQUIVALENT, "inconclusive", RANK_DEFICIENT, "not measured",
            SAME_AS_MAIN)
NOT_A_VERDICT = ("not measured", SAME_AS_MAIN, RANK_DEFICIENT)  # rows that test nothing: listed, never counted as verdicts
MIN_PRIMARY_SEEDS = 5

# Weiss et al. (2025): ReLoRA (a) has higher loss / bits-per-byte, (b) more so at the larger size, (c) lower BLiMP,
# (d) lower PER and higher condition numbers early in training, for updates and for gradients.
PAPER_RULES: list[dict[str, Any]] = [
    {"id": "a-val-loss", "finding": "a", "test": "paired", "metric": "final_val_loss", "claim": "higher", "primary": True, "sesoi": 0.02},
    {"id": "a-val-bpb", "finding": "a", "test": "paired", "metric": "val_bpb_macro", "claim": "higher", "sesoi": 0.02},
    {"id": "b-val-loss", "finding": "b", "test": "slope", "metric": "final_val_loss", "claim": "higher", "primary": True, "sesoi": 0.02},
    {"id": "c-blimp", "finding": "c", "test": "paired", "metric": "blimp_overall", "claim": "lower", "chance": 0.5, "margin": 0.05,
     "primary": True, "sesoi": 0.01},
    {"id": "d-per", "finding": "d", "test": "rank", "kind": ["cumulative_update"], "component": ["wv", "wo", "ov", "w2"],
     "metric": "per", "phase": "early", "claim": "lower"},
    {"id": "d-per-grad", "finding": "d", "test": "rank", "kind": ["grad"], "component": ["wv", "wo", "w2"],  # no OV of a gradient
     "metric": "per", "phase": "early", "claim": "lower"},
    {"id": "d-cond", "finding": "d", "test": "rank", "kind": ["cumulative_update"], "component": ["wv", "wo", "ov", "w2"],
     "metric": "condition_number", "phase": "early", "claim": "higher"},
    {"id": "d-cond-grad", "finding": "d", "test": "rank", "kind": ["grad"], "component": ["wv", "wo", "w2"],
     "metric": "condition_number", "phase": "early", "claim": "higher"},
    # over the numerical rank (the raw one is "rank-deficient" where s_min is rounding noise), geometric means
    {"id": "d-cond-numerical", "finding": "d", "test": "rank", "kind": ["cumulative_update"], "component": ["wv", "wo", "ov", "w2"],
     "metric": "condition_number_numerical", "phase": "early", "claim": "higher"},
    # the stronger null: full-rank's update cut to ReLoRA's numerical rank at the same step
    # (d)'s primary endpoint: lower PER beyond what the rank bound forces (log ratio; sesoi: a 10% ratio)
    {"id": "d-per-rank-matched", "finding": "d", "test": "rank-matched", "kind": ["update"],
     "component": ["wv", "wo", "w2"], "metric": "per", "phase": "early", "claim": "lower", "primary": True, "sesoi": 0.1},
    {"id": "d-per-rank-matched-cumulative", "finding": "d", "test": "rank-matched", "kind": ["cumulative_update"],
     "component": ["ov", "wv", "wo", "w2"], "metric": "per", "phase": "early", "claim": "lower", "sesoi": 0.1},
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
    corr = spec.get("secondary_correction", "bh")
    if corr not in stats.CORRECTIONS:
        raise ConfigError(f"{where}: findings.secondary_correction must be one of {', '.join(stats.CORRECTIONS)} (Holm or Benjamini-Hochberg)")
    min_seeds = spec.get("min_primary_seeds", MIN_PRIMARY_SEEDS)
    if not isinstance(min_seeds, int) or isinstance(min_seeds, bool) or min_seeds < 2:
        raise ConfigError(f"{where}: findings.min_primary_seeds must be an integer >= 2 (default {MIN_PRIMARY_SEEDS})")
    out = {"method": str(spec.get("method", "relora")), "reference": str(spec.get("reference", "full")), "confidence": conf,
           "secondary_correction": corr, "min_primary_seeds": min_seeds, "rules": []}
    rules = spec.get("rules", PAPER_RULES)
    if not isinstance(rules, list) or not rules:
        raise ConfigError(f"{where}: findings.rules must be a non-empty list of rules (see docs/studies.md)")
    ids = set()
    for i, rule in enumerate(rules):
        out["rules"].append(_validate_rule(rule, f"{where}: findings.rules[{i}]"))
        if out["rules"][-1]["id"] in ids:
            raise ConfigError(f"{where}: findings rule id {out['rules'][-1]['id']!r} is used twice; give each rule its own id")
        ids.add(out["rules"][-1]["id"])
    primaries: dict[str, str] = {}
    for r in out["rules"]:
        if r["primary"]:
            if r["finding"] in primaries:
                raise ConfigError(f"{where}: finding ({r['finding']}) has two primary rules ({primaries[r['finding']]}, {r['id']}); "
                                  "pre-register one primary endpoint per finding and mark the others `primary: false`")
            primaries[r["finding"]] = r["id"]
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
    if not isinstance(r.get("primary", False), bool):
        raise ConfigError(f"{where}: primary must be true or false (one pre-registered primary endpoint per finding)")
    r["primary"] = r.get("primary", False)
    if "sesoi" in r and (not isinstance(r["sesoi"], (int, float)) or isinstance(r["sesoi"], bool) or r["sesoi"] <= 0):
        raise ConfigError(f"{where}: sesoi (the smallest effect of interest, for the TOST equivalence test) must be a number > 0")
    if r["test"] == "slope":
        r.setdefault("axis", "params")
        if r["axis"] not in SLOPE_AXES:
            raise ConfigError(f"{where}: axis must be one of {', '.join(SLOPE_AXES)} (x = log of it)")
        x0 = r.get("extrapolate_to")
        if x0 is not None and (not isinstance(x0, (int, float)) or isinstance(x0, bool) or x0 <= 0):
            raise ConfigError(f"{where}: extrapolate_to must be a positive number on the axis (e.g. 25800 tokens per body parameter)")
    elif "axis" in r or "extrapolate_to" in r:
        raise ConfigError(f"{where}: axis and extrapolate_to belong to slope rules (test: slope)")
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
        if r["primary"] and any(not _object(k, r.get("reference_kind", k))[1] for k in r["kind"]):
            raise ConfigError(f"{where}: a gradient row, or one comparing two different objects, is not counted toward a verdict, "
                              "so it cannot be the primary endpoint: set primary: false")
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
        return "confirmed", f"the interval lies above {min_effect:g}" if claim == "higher" else f"the interval lies below {-min_effect or 0:g}"
    if b < 0:
        return OPPOSITE, "the interval lies on the other side of 0"
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
    return size_order(runs)


def shape_body_params(model: dict[str, Any]) -> int | None:
    """Non-embedding parameters of a model section (its preset's shape with any field overridden), by arithmetic:
    per block q/k/v/o (grouped-query k, v), the SwiGLU's three linears and two norm gains, and a final norm."""
    from rankscope.config import PRESETS

    shape = {**PRESETS.get(model.get("preset") or "", {}), **{k: v for k, v in model.items() if v is not None}}
    try:
        d, f, L = int(shape["d_model"]), int(shape["ffn_dim"]), int(shape["n_layers"])
        kv = int(shape["n_kv_heads"]) * (d // int(shape["n_heads"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return L * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d


def size_order(runs: list[Any]) -> list[str]:
    """The runs' size labels, smallest model body first (non-embedding parameters: summary.json's count less the
    embeddings, else the config's shape; the preset's place in config.PRESETS where neither is known); labels as given."""
    from rankscope.config import PRESETS

    order = list(PRESETS)
    sizes = list(dict.fromkeys(r.size for r in runs))
    params: dict[str, float] = {}
    for r in runs:
        n = body_params(r) or shape_body_params(((r.config or {}).get("model") or {}) if isinstance((r.config or {}).get("model"), dict) else {})
        if n:
            params[r.size] = min(params.get(r.size, math.inf), n)
    if len(params) < len(sizes):  # a size without a count: fall back to the preset's name (the config's shape is unknown)
        for s in sizes:
            base = s.split(" ")[0]
            if s not in params and base in PRESETS:
                params[s] = shape_body_params({"preset": base}) or math.inf
    return sorted(sizes, key=lambda s: (params.get(s, math.inf), order.index(s.split(" ")[0]) if s.split(" ")[0] in order else len(order),
                                        sizes.index(s)))


def _by_seed(runs: list[Any], method: str, size: str) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for r in runs:
        if r.method == method and r.size == size:
            if r.seed in out:  # never the last one silently: rankscope.reports.report.collect refuses or excludes duplicates first
                raise ConfigError(f"two runs of {method} at {size}, seed {r.seed}: {out[r.seed].dir} and {r.dir}; "
                                  "remove one, or report with --exclude-duplicates")
            out[r.seed] = r
    return out


# --------------------------------------------------------------------------- scale
def body_params(run: Any) -> int | None:
    """Non-embedding parameters: all parameters less the token embedding and (untied) output head."""
    m = (run.config or {}).get("model") or {}
    total, v, d = run.summary.get("parameters"), m.get("vocab_size"), m.get("d_model")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (total, v, d)):
        return None
    return total - v * d * (1 if m.get("tie_embeddings") else 2)


def _si(x: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _span(xs: list[float]) -> str:
    lo, hi = min(xs), max(xs)
    return _si(lo) if _si(lo) == _si(hi) else f"{_si(lo)}-{_si(hi)}"


def scale_phrase(runs: list[Any], reference: str | None = None) -> str:
    """What a row tested, in words: `61.7k body parameters, 655k tokens (10.6 tokens per body parameter)`; parameters are
    counted on the reference method's runs (an adapter method's count includes its adapters)."""
    runs = _model_runs(runs, reference)
    bodies = [b for b in map(body_params, runs) if b]
    tokens = [float(r.summary["tokens"]) for r in runs if isinstance(r.summary.get("tokens"), (int, float))]
    parts = []
    if bodies:
        parts.append(f"{_span(bodies)} body parameters")
    if tokens:
        parts.append(f"{_span(tokens)} tokens")
    if bodies and tokens:
        per = [float(r.summary["tokens"]) / b for r in runs if (b := body_params(r)) and isinstance(r.summary.get("tokens"), (int, float))]
        parts[-1] += f" ({_span(per)} tokens per body parameter)"
    return ", ".join(parts) or "this study's scale"


# Weiss et al. (2025): the paper's scale (shared/reference/README.md, "Scale"), beside this study's in every findings table
PAPER_SCALE = {"body (non-embedding) parameters": "1.62M (pico-tiny), 25.9M (pico-small)", "tokens per run": "41.9B",
               "tokens per body parameter": "25,800 (pico-tiny), 1,620 (pico-small)",
               "ReLoRA cycle length": "2,000 steps (4.19B tokens), 10 cycles"}


def _model_runs(runs: list[Any], reference: str | None) -> list[Any]:
    """The runs whose parameter count is the model's alone: the reference method's (an adapter method's count includes its
    adapters), else all."""
    ref = [r for r in runs if reference and r.method == reference]
    return ref or runs


def scale_box(runs: list[Any], reference: str | None = None) -> dict[str, Any]:
    """This study's scale against the paper's, as a report table: the first thing a findings table is read with."""
    sizes = _sizes(runs)
    model_runs = _model_runs(runs, reference)
    per_size = {s: [r for r in model_runs if r.size == s] for s in sizes}
    bodies = {s: sorted({b for b in map(body_params, rs) if b}) for s, rs in per_size.items()}
    tokens = sorted({int(r.summary["tokens"]) for r in runs if isinstance(r.summary.get("tokens"), (int, float))})
    per = sorted({round(float(r.summary["tokens"]) / b, 6) for r in model_runs
                  if (b := body_params(r)) and isinstance(r.summary.get("tokens"), (int, float))})
    cycles = set()
    for r in runs:
        mcfg, tcfg = (r.config or {}).get("method") or {}, (r.config or {}).get("train") or {}
        every = (mcfg.get("relora") or {}).get("reset_every") or mcfg.get("reset_every")  # nested (today) or flat (older runs)
        if mcfg.get("name") == "relora" and every:
            every, steps = int(every), int(tcfg.get("max_steps") or 0)
            tok = every * int(tcfg.get("batch_size") or 0) * int(tcfg.get("seq_len") or 0)
            cycles.add(f"{every} steps ({_si(tok)} tokens), {steps // every if every else 0} cycles")
    ours = {"body (non-embedding) parameters": ", ".join(f"{_si(b[0])} ({s})" for s, b in bodies.items() if b) or "-",
            "tokens per run": ", ".join(_si(t) for t in tokens) or "-",
            "tokens per body parameter": ", ".join(f"{x:.3g}" for x in per) or "-",
            "ReLoRA cycle length": "; ".join(sorted(cycles)) or "-"}
    rows = [{"label": k, "cells": [_cell(ours[k]), _cell(PAPER_SCALE[k], ["Weiss et al. (2025); shared/reference/README.md"])]}
            for k in PAPER_SCALE]
    return {"title": "Scale: this study beside the paper's (every verdict below holds at this study's scale only)",
            "columns": ["", "this study", "the paper (Weiss et al. 2025)"], "rows": rows, "formats": [_text, _text],
            "scale": ours, "paper_scale": PAPER_SCALE}


# --------------------------------------------------------------------------- metric values
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


def evaluate_findings(runs: list[Any], spec: dict[str, Any], same_as_main: dict[tuple[str, str], str] | None = None) -> list[dict[str, Any]]:
    """One result row per (rule, size) — per (rule, kind, component, size) for rank rules, one per slope rule — then the
    statistics over all rows (apply_statistics: families, adjusted p, TOST, minimum detectable effect, verdicts).

    same_as_main: {(control method label, size): why} where a control's lr equals the main lr (its runs are the main
    runs): such rows are "= main", not a second test. Control runs whose lr equals the main runs' are found here too."""
    spec = validate_findings(spec)  # idempotent: sweep.json holds the normalised spec
    same = dict(same_as_main or {})
    same.update(_equal_lr_controls(runs, same))
    out: list[dict[str, Any]] = []
    cache: dict[Path, Any] = {}
    for rule in spec["rules"]:
        method, ref = rule.get("method", spec["method"]), rule.get("reference", spec["reference"])
        base = {"id": rule["id"], "finding": rule["finding"], "test": rule["test"], "metric": rule["metric"], "claim": rule["claim"],
                "method": method, "reference": ref, "min_effect": rule["min_effect"], "confidence": spec["confidence"],
                "primary": rule["primary"], "sesoi": rule.get("sesoi")}
        if rule["test"] == "slope":
            out.append(_slope(_stand_in(runs, method, same), rule, base, method, ref, same))
            continue
        for size in _sizes(runs):
            if (method, size) in same:
                out.append(_same_as_main({**base, "size": size}, same[(method, size)]))
            elif rule["test"] == "paired":
                out.append(_paired(runs, rule, {**base, "size": size}, method, ref))
            else:
                for kind in rule["kind"]:
                    for comp in rule["component"]:
                        out.append(_rank(runs, rule, {**base, "size": size, "kind": kind, "component": comp, "phase": rule["phase"]},
                                         method, ref, cache))
    return apply_statistics(out, spec, runs)


def _lr(run: Any) -> Any:
    return ((run.config or {}).get("train") or {}).get("lr")


def _equal_lr_controls(runs: list[Any], known: dict[tuple[str, str], str]) -> dict[tuple[str, str], str]:
    """(control label, size) whose control runs train at the main runs' lr: the same runs twice (bit-identical)."""
    out = {}
    for r in runs:
        if not r.method.endswith(CONTROL_SUFFIX) or (r.method, r.size) in known:
            continue
        main = [m for m in runs if m.method == r.method[: -len(CONTROL_SUFFIX)] and m.size == r.size]
        lrs = {_lr(m) for m in main}
        if main and len(lrs) == 1 and _lr(r) in lrs and _lr(r) is not None:
            out[(r.method, r.size)] = f"the control's lr ({_lr(r):g}) equals the main lr at {r.size}: the same runs, not a second test"
    return out


def _stand_in(runs: list[Any], method: str, same: dict[tuple[str, str], str]) -> list[Any]:
    """For a control's slope: the main runs stand in at the sizes where the control lr equals the main lr."""
    import copy

    extra = []
    for (label, size) in same:
        if label == method:
            for r in runs:
                if r.method == label[: -len(CONTROL_SUFFIX)] and r.size == size:
                    alias = copy.copy(r)
                    alias.method = label
                    extra.append(alias)
    return [r for r in runs if not any(r.method == lab and r.size == sz for lab, sz in same if lab == method)] + extra


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


# --------------------------------------------------------------------------- families, adjusted p, TOST, power
def _family(row: dict[str, Any]) -> str:
    if not row.get("counts_toward_verdict", True):  # gradients, or two different objects: described, adjusted apart
        return f"not counted ({row['finding']}, {row.get('object') or 'other object'})"
    return "primary" if row.get("primary") else f"secondary ({row['finding']})"


def _role(row: dict[str, Any]) -> str:
    if not row.get("counts_toward_verdict", True):
        return "descriptive (not counted toward a verdict about updates)"
    return "primary" if row.get("primary") else "secondary (exploratory)"


def _tost_slope(row: dict[str, Any], sesoi: float) -> float | None:
    from scipy import stats as ss

    est, se, df = row.get("estimate"), row.get("stderr"), row.get("df")
    if est is None or not se or not df:
        return None
    return float(max(ss.t.sf((est + sesoi) / se, df), ss.t.cdf((est - sesoi) / se, df)))


def apply_statistics(rows: list[dict[str, Any]], spec: dict[str, Any], runs: list[Any] | None = None) -> list[dict[str, Any]]:
    """Families (Holm across the primary endpoints; secondary_correction within each finding's secondaries), raw and adjusted
    p-values, TOST against the rule's sesoi, the minimum detectable effect at 80% power, and the verdict on the adjusted p.

    Verdict (claim higher; lower flips the signs), at level alpha = 1 - confidence, on adjusted p:
      p_adj < alpha and the interval beyond min_effect on the claimed side: confirmed (the rank bound's label kept);
      p_adj < alpha on the other side: "not reproduced: opposite direction";
      else, where a sesoi is pre-registered and the TOST p (adjusted in the same family) < alpha: "no meaningful difference";
      else inconclusive, with the minimum detectable effect. A primary endpoint with fewer than min_primary_seeds paired seeds
      (or, for a slope, fewer than 3 groups of that many) is inconclusive whatever its p.
    Every decisive verdict's text names the scale it was tested at (verdict_text)."""
    alpha = 1 - spec["confidence"]
    corr = spec.get("secondary_correction", "bh")
    for r in rows:
        r["family"], r["role"] = _family(r), _role(r)
        r["correction"] = "holm" if r.get("primary") else corr
        r.update({"p": None, "p_adj": None, "tost": None, "mde": None})
        if r["verdict"] in NOT_A_VERDICT:
            continue
        xs = list(r["per_seed"].values())
        if r["test"] == "slope":
            r["p"] = r.get("p_fit")
            if r.get("sesoi"):
                r["tost"] = {"sesoi": r["sesoi"], "p": _tost_slope(r, r["sesoi"]), "p_adj": None}
        else:
            r["p"] = stats.t_test_p(xs)
            if r.get("sesoi"):
                r["tost"] = {"sesoi": r["sesoi"], "p": stats.tost_p(xs, r["sesoi"]), "p_adj": None}
    for fam in dict.fromkeys(r["family"] for r in rows):
        members = [r for r in rows if r["family"] == fam and r["p"] is not None]
        adjust = stats.CORRECTIONS[members[0]["correction"]] if members else None
        for r, pa in zip(members, adjust([r["p"] for r in members]) if members else []):
            r["p_adj"], r["family_size"] = pa, len(members)
        tosts = [r for r in rows if r["family"] == fam and r["tost"] and r["tost"]["p"] is not None]
        for r, pa in zip(tosts, adjust([r["tost"]["p"] for r in tosts]) if tosts else []):
            r["tost"]["p_adj"] = pa
        for r in members:  # the MDE at the family's strictest level alpha / m (what the smallest p must beat after adjustment)
            r["mde_alpha"] = level = alpha / len(members)
            if r["test"] == "slope":
                m = stats.power_multiplier(r["df"], level) if r.get("stderr") and r.get("df") else None
                r["mde"] = None if m is None else m * r["stderr"]
            else:
                xs = list(r["per_seed"].values())
                r["mde"] = stats.mde(xs, level) if len(xs) >= 2 else None
    by_size = {}
    for run in runs or []:
        by_size.setdefault(run.size, []).append(run)
    for r in rows:
        scale = scale_phrase(by_size.get(r["size"], runs or []) if r["test"] != "slope" else runs or [], r.get("reference"))
        r["scale"] = scale
        if r["verdict"] in NOT_A_VERDICT:
            r["verdict_text"] = r["verdict"]
            continue
        _decide_adjusted(r, alpha, spec["min_primary_seeds"])
        r["verdict_text"] = {"confirmed": f"confirmed at {scale}", OPPOSITE: f"not reproduced at {scale}: the opposite direction",
                             EQUIVALENT: f"no meaningful difference (within ±{r.get('sesoi') or 0:g}) at {scale}"}.get(
                                 r["verdict"], f"{r['verdict']} at {scale}" if r["verdict"].startswith("confirmed") else r["verdict"])
    return rows


def _decide_adjusted(r: dict[str, Any], alpha: float, min_seeds: int) -> None:
    before = r["verdict"]
    p, pa = r["p"], r["p_adj"]
    fam = f"{r['correction'].upper() if r['correction'] == 'bh' else 'Holm'} over {r.get('family_size', 1)} in {r['family']}"
    if p is None:
        r["verdict"] = "inconclusive"
        r["reason"] = (r["reason"] + "; " if r["reason"] else "") + "no p-value (fewer than 2 paired values, or no spread)"
        return
    ptxt = f"p = {p:.3g}, adjusted {pa:.3g} ({fam})"
    n_ok = (r["n"] >= min_seeds) if r["test"] != "slope" else (r["n"] >= 3 and r.get("seeds_per_group", 0) >= min_seeds)
    est = r["estimate"] if r["claim"] == "higher" else -r["estimate"]
    lo = (r["lo"] if r["claim"] == "higher" else -r["hi"]) if r["lo"] is not None else None
    if r.get("not_testable"):
        r["verdict"] = "inconclusive"
        r["reason"] = f"{r['reason']}; {ptxt}"
    elif r.get("primary") and not n_ok:
        r["verdict"] = "inconclusive"
        need = f">= {min_seeds} paired seeds" + (" in each of >= 3 groups" if r["test"] == "slope" else "")
        r["reason"] = f"a primary endpoint needs {need}; {ptxt}"
    elif pa < alpha and r["tost"] and r["tost"].get("p_adj") is not None and r["tost"]["p_adj"] < alpha:
        r["verdict"] = EQUIVALENT  # significant, yet the whole interval lies inside the pre-registered +-sesoi: too small to matter
        r["reason"] = (f"TOST p = {r['tost']['p']:.3g}, adjusted {r['tost']['p_adj']:.3g}: the effect is nonzero ({ptxt}) but lies "
                       f"within ±{r['sesoi']:g} (sesoi)")
    elif pa < alpha and est > 0:
        if lo is not None and lo > r["min_effect"]:
            r["verdict"] = before if before.startswith("confirmed") else "confirmed"
            r["reason"] = f"{ptxt}; " + r["reason"]
        else:
            r["verdict"] = "inconclusive"
            r["reason"] = f"{ptxt}; the interval excludes 0 but not the pre-registered minimum effect {r['min_effect']:g}"
    elif pa < alpha:
        r["verdict"] = OPPOSITE
        r["reason"] = f"{ptxt}; the interval lies on the other side of 0" + _tail(r["reason"])
    elif r["tost"] and r["tost"].get("p_adj") is not None and r["tost"]["p_adj"] < alpha:
        r["verdict"] = EQUIVALENT
        r["reason"] = f"TOST p = {r['tost']['p']:.3g}, adjusted {r['tost']['p_adj']:.3g}: the effect lies within ±{r['sesoi']:g} (sesoi); {ptxt}"
    else:
        r["verdict"] = "inconclusive"
        mde = (f"; detectable at 80% power (at the family's level {r['mde_alpha']:.2g}): effects of {r['mde']:.3g} or more"
               if r.get("mde") is not None else "")
        sesoi = "" if r.get("sesoi") else "; no sesoi pre-registered, so no equivalence test"
        r["reason"] = f"{ptxt}, not below {alpha:g}{mde}{sesoi}" + _tail(r["reason"])


def _tail(reason: str) -> str:
    """What a row's reason adds beyond the interval rule (ratios, notes, rank bounds, distance from chance)."""
    parts = []
    for p in reason.split("; "):
        if p.startswith(("the interval", "n = ")):
            p = p[p.index("("):] if "(" in p else ""  # the interval rule's words go; what it says in brackets stays
        if p:
            parts.append(p)
    return ("; " + "; ".join(parts)) if parts else ""


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
    """+0.1234 style; float round-off of a zero difference (5.551e-17 from 0.3 - 0.1 - 0.2) prints as 0."""
    if isinstance(x, (int, float)) and abs(x) < 1e-12:
        return "0"
    return f"{x:+.4g}" if isinstance(x, (int, float)) else str(x)


def _text(x: Any) -> str:
    return str(x)


def _interval(x: Any) -> str:
    return f"[{_signed(x[0])}, {_signed(x[1])}]"


def _what(r: dict[str, Any]) -> str:
    if r["test"] in RANK_TESTS:
        ref = (f"rank-matched {r['reference']}" if r["test"] == "rank-matched"
               else f"{r['reference']} {r['reference_kind']}" if r.get("reference_kind", r["kind"]) != r["kind"] else r["reference"])
        paper = ", as the paper measured it" if r.get("note") == PAPER_NOTE else ""
        return f"({r['finding']}) {r['metric']} of {r['kind']} {r['component']}, {r['phase']}{paper}: log({r['method']} / {ref})"
    if r["test"] == "slope":
        x = "log(tokens per body parameter)" if r.get("axis") == "tokens_per_param" else "log(body parameters)"
        return f"({r['finding']}) slope of {r['metric']} gap ({r['method']} - {r['reference']}) vs {x}"
    return f"({r['finding']}) {r['metric']}: {r['method']} - {r['reference']}"


def study_findings(runs: list[Any], sweep: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The evaluated rules of a study's sweep.json (none where it pre-registered no findings)."""
    spec = (sweep or {}).get("findings")
    if not spec:
        return []
    same: dict[tuple[str, str], str] = {}
    by_name = {r.name: r for r in runs}
    for row in (sweep or {}).get("runs", []):
        main = by_name.get(str(row.get("same_as") or ""))
        if row.get("status") == SAME_AS_MAIN and main is not None:
            same[(main.method + CONTROL_SUFFIX, main.size)] = (f"the control's lr equals the main lr at {main.size}: "
                                                               "not run twice, not a second test")
    return evaluate_findings(runs, spec, same)


def verdict_counts(results: list[dict[str, Any]]) -> str:
    """One part per rule id: how many of its rows got each verdict, e.g. `a-val-loss (a, primary): confirmed 2, inconclusive 1`;
    rows that test nothing ("not measured", "= main") are counted after a semicolon, apart from the verdicts."""
    by_rule: dict[str, dict[str, int]] = {}
    for r in results:
        counts = by_rule.setdefault(f"{r['id']} ({r['finding']}, {'primary' if r.get('primary') else 'secondary'})", {})
        v = r["verdict"] if r.get("counts_toward_verdict", True) or r["verdict"] in NOT_A_VERDICT else f"not counted: {r['verdict']}"
        counts[v] = counts.get(v, 0) + 1
    order = {v: i for i, v in enumerate(VERDICTS)}
    parts = []
    for rule, c in by_rule.items():
        tested = ", ".join(f"{v} {n}" for v, n in sorted(c.items(), key=lambda kv: order.get(kv[0], 99))
                           if v not in NOT_A_VERDICT and not v.startswith("not counted"))
        untested = ", ".join([f"{v} {c[v]}" for v in NOT_A_VERDICT if v in c] + [f"{v} {n}" for v, n in c.items() if v.startswith("not counted")])
        parts.append(f"{rule}: {tested or 'no verdict'}" + (f" (not a verdict: {untested})" if untested else ""))
    return "; ".join(parts)


def _horizon(overrides: list[str], runs: list[Any]) -> tuple[int | None, int | None]:
    """(tuning steps, main steps): train.max_steps of the tuning overrides (else the main runs'), and of the main runs."""
    main = sorted({int(((r.config or {}).get("train") or {}).get("max_steps") or 0) for r in runs} - {0})
    main_steps = main[-1] if main else None
    tune = next((int(o.split("=", 1)[1]) for o in overrides if o.startswith("train.max_steps=")), main_steps)
    return tune, main_steps


def tuning_table(runs: list[Any], tuning: dict[str, Any]) -> dict[str, Any]:
    """The tuned-value table: per cell the values tried, their losses, the choice, its position and whether it was confirmed at
    the main horizon; the title names the tuning horizon beside the main one and whether the tuning seed is a main seed."""
    rows = []
    for ct in tuning.get("cells", []):
        tried = ", ".join(f"{d['value']:g}" for d in ct["tried"])
        losses = ", ".join("failed" if d["loss"] is None else f"{d['loss']:.4f}" for d in ct["tried"])
        pos = ct["position"] + (f" ({ct['edge_side']} end, widened {tuning['widen']}x)" if ct.get("edge_side") else "")
        conf = ct.get("confirm")
        if conf and conf.get("tried"):
            at = ", ".join(f"{d['value']:g}: {'failed' if d['loss'] is None else format(d['loss'], '.4f')}" for d in conf["tried"])
            confirmed = f"{'same' if conf.get('short_choice') == ct['chosen'] else 'CHANGED'} at the main horizon ({at})"
        elif not any(o.startswith("train.max_steps=") for o in tuning.get("overrides") or []):
            confirmed = "tuned at the main horizon"
        else:
            confirmed = "not confirmed at the main horizon"
        rows.append({"label": ct["label"], "cells": [_cell(tried), _cell(losses, [d["run_dir"] for d in ct["tried"]]),
                                                     _cell(ct["chosen"]), _cell(pos), _cell(confirmed)]})
    steps_tune, steps_main = _horizon(tuning.get("overrides", []), runs)
    seeds = sorted({r.seed for r in runs})
    leak = (f"; the tuning seed {tuning['seed']} IS a main seed (the choice saw that seed's data)" if tuning.get("seed") in seeds
            else f"; tuning seed {tuning.get('seed')} is not a main seed")
    short = any(o.startswith("train.max_steps=") for o in tuning.get("overrides") or [])
    horizon = (f"tuning horizon {steps_tune} steps, main horizon {steps_main} steps" if short and steps_main
               else "tuned at each cell's main horizon")
    return {"title": f"Tuned {tuning['field']} per cell ({horizon}{leak}; lowest {tuning['metric']} from summary.json)",
            "columns": ["cell", "values tried", tuning["metric"], "chosen", "position", "at the main horizon"], "rows": rows,
            "formats": [_text, _text, lambda x: f"{x:g}", _text, _text], "horizon": {"tune_steps": steps_tune, "main_steps": steps_main},
            "tuning_seed_in_main_seeds": tuning.get("seed") in seeds}


def _secondary_name(results: list[dict[str, Any]]) -> str:
    names = {r["correction"] for r in results if not r.get("primary") and r.get("correction")}
    return " / ".join({"holm": "Holm", "bh": "Benjamini-Hochberg"}[n] for n in sorted(names)) or "Benjamini-Hochberg"


def findings_tables(runs: list[Any], sweep: dict[str, Any] | None, results: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The findings table, the tuned-value table and the per-seed paired differences, as report.py tables.

    Empty where the study pre-registered no findings and tuned nothing (plain run folders)."""
    tables = []
    results = study_findings(runs, sweep) if results is None else results
    if results:
        tables.append(scale_box(runs, results[0].get("reference")))
        rows = []
        for r in results:
            iv = (r["lo"], r["hi"]) if r["lo"] is not None else None
            claim = f"{r['method']} {r['claim']}" + (f" by > {r['min_effect']:g}" if r["min_effect"] else "")
            ps = f"{r['p']:.3g} / {r['p_adj']:.3g} ({r['correction']})" if r.get("p_adj") is not None else None
            mde = f"{r['mde']:.3g}" if r.get("mde") is not None else None
            rows.append({"label": _what(r), "cells": [_cell(r["size"]), _cell(r["role"]), _cell(claim), _cell(r["n"]),
                                                      _cell(r["estimate"], r["sources"]), _cell(iv), _cell(ps), _cell(mde),
                                                      _cell(r.get("verdict_text", r["verdict"])), _cell(r["reason"])]})
        conf = f"{results[0]['confidence']:.0%}"
        tables.append({"title": f"Findings: pre-registered rules, {conf} intervals over paired seeds (rankscope.studies.findings)",
                       "note": ("Verdicts on adjusted p: Holm across the primary endpoints, "
                                f"{_secondary_name(results)} within each finding's secondary (exploratory) rows; the interval is "
                                "unadjusted. MDE: the smallest effect a test of this row's n detects with 80% power at its "
                                "family's strictest level (alpha / rows in the family). "
                                "At a glance (rows per verdict, by rule): " + verdict_counts(results)),
                       "columns": ["finding", "size", "role", "claim", "n", "estimate", f"{conf} interval", "p / adjusted p", "MDE",
                                   "verdict", "why"], "rows": rows,
                       "formats": [_text, _text, _text, _text, _signed, _interval, _text, _text, _text, _text]})
    tuning = (sweep or {}).get("tuning")
    if tuning:
        tables.append(tuning_table(runs, tuning))
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
