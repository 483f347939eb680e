"""The findings block of a study file, read through the one schema loader (rankscope.core.schema): `FindingsSpec` holds the
method, the reference, the confidence and the rules; each `Rule` is an `option()` dataclass whose `validate()` checks what a
type cannot (a rank rule's kinds, a slope rule's axis, one primary endpoint per finding). `validate_findings` returns the
normalised spec as plain data (dicts and lists), the form sweep.json keeps and the engine reads; the paper's rules
(PAPER_RULES) are the default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rankscope.core.errors import ConfigError
from rankscope.core.schema import build, check, option
from rankscope.studies import stats
from rankscope.studies.findings.verdicts import MIN_PRIMARY_SEEDS, _object

TESTS = ("paired", "slope", "rank", "rank-matched")
RANK_TESTS = ("rank", "rank-matched")  # rules evaluated per (kind, component) from rank_metrics.parquet
CLAIMS = ("higher", "lower")
PHASES = ("early", "end")
SLOPE_AXES = ("params", "tokens_per_param")  # x of a slope rule: log(body parameters) or log(tokens per body parameter)
RULE_EXAMPLE = "{id: a-loss, finding: a, test: paired, metric: final_val_loss, claim: higher}"

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



@dataclass
class Rule:
    """One pre-registered rule: a test of `metric` (method against reference) with the claimed direction."""

    id: str | int | None = option(None, "the rule's name, unique in the study (default: <finding>-<metric>)")
    finding: str | int | None = option(None, "the finding the rule belongs to, e.g. a (default: the id)")
    test: str | None = option(None, "paired (per size, seed by seed), slope (the gap across sizes or budgets), rank or rank-matched")
    metric: str | None = option(None, "the metric compared, e.g. final_val_loss (paired/slope) or per (rank)")
    claim: str | None = option(None, "higher or lower: the method's value against the reference's")
    min_effect: float = option(0.0, "the interval must lie beyond this (>= 0) for `confirmed`")
    chance: float | None = option(None, "a paired rule's chance level (with margin): both means near it is 'not testable'")
    margin: float | None = option(None, "how near chance (>= 0) a mean is 'at chance'")
    kind: str | list[str] | None = option(None, "rank rules: the matrix kinds (update, cumulative_update, grad, ...)")
    component: str | list[str] | None = option(None, "rank rules: the components (wv, wo, ov, w2, ...)")
    phase: str | None = option(None, "rank rules: early (0 < step <= max_steps / 4) or end (the last common checkpoint)")
    method: str | None = option(None, "the method under test, if not the spec's")
    reference: str | None = option(None, "the reference, if not the spec's")
    description: str | None = option(None, "free text, for the reader")
    reference_kind: str | None = option(None, "rank rules: compare the method's kind with this kind of the reference's (e.g. grad)")
    primary: bool = option(False, "the finding's one pre-registered primary endpoint (Holm across findings)")
    sesoi: float | None = option(None, "the smallest effect of interest (> 0), for the TOST equivalence test")
    axis: str | None = option(None, "slope rules: params (log body parameters, default) or tokens_per_param")
    extrapolate_to: float | None = option(None, "slope rules: also the fitted line's value at this x (> 0)")

    @classmethod
    def schema_prepare(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
        return {k: v for k, v in data.items() if v is not None}  # an explicit null is an absent key

    def validate(self, where: str) -> None:
        check(self.test in TESTS, f"{where}: test must be one of {', '.join(TESTS)}, got {self.test!r}")
        check(self.claim in CLAIMS, f"{where}: claim must be one of {', '.join(CLAIMS)} (the method's value against the reference's)")
        check(isinstance(self.metric, str), f"{where}: metric must name a metric, e.g. final_val_loss (paired/slope) or per (rank)")
        for key in ("min_effect", "margin"):
            check(getattr(self, key) is None or getattr(self, key) >= 0, f"{where}: {key} must be a number >= 0")
        check(self.sesoi is None or self.sesoi > 0,
              f"{where}: sesoi (the smallest effect of interest, for the TOST equivalence test) must be a number > 0")
        if self.test == "slope":
            check((self.axis or "params") in SLOPE_AXES, f"{where}: axis must be one of {', '.join(SLOPE_AXES)} (x = log of it)")
            check(self.extrapolate_to is None or self.extrapolate_to > 0,
                  f"{where}: extrapolate_to must be a positive number on the axis (e.g. 25800 tokens per body parameter)")
        else:
            check(self.axis is None and self.extrapolate_to is None, f"{where}: axis and extrapolate_to belong to slope rules (test: slope)")
        check((self.chance is None) == (self.margin is None) and (self.chance is None or self.test == "paired"),
              f"{where}: chance and margin go together, on a paired rule (e.g. chance: 0.5, margin: 0.05)")
        if self.test in RANK_TESTS:
            self._validate_rank(where)
        else:
            check(all(v is None for v in (self.kind, self.component, self.phase, self.reference_kind)),
                  f"{where}: kind, component, phase and reference_kind belong to rank rules (test: rank or rank-matched)")

    def _validate_rank(self, where: str) -> None:
        for key in ("kind", "component"):
            v = getattr(self, key)
            check(bool(v), f"{where}: a rank rule needs {key}: a name or a list of names (e.g. kind: [cumulative_update, grad])")
        check((self.phase or "early") in PHASES, f"{where}: phase must be one of {', '.join(PHASES)}")
        check(self.reference_kind is None or self.test == "rank",
              f"{where}: reference_kind names one kind (e.g. grad), on a rank rule (test: rank)")
        check(self.test != "rank-matched" or self.metric == "per", f"{where}: a rank-matched rule compares PER (metric: per)")
        kinds = [self.kind] if isinstance(self.kind, str) else self.kind
        check(not self.primary or all(_object(k, self.reference_kind or k)[1] for k in kinds),
              f"{where}: a gradient row, or one comparing two different objects, is not counted toward a verdict, "
              "so it cannot be the primary endpoint: set primary: false")

    def normalised(self, given: dict[str, Any]) -> dict[str, Any]:
        """The rule as the engine reads it: the keys given (in their order, their values as written), with id, finding,
        min_effect and primary filled in, kind and component as lists, and the default axis or phase of its test."""
        r = {k: v for k, v in given.items() if v is not None}
        r.setdefault("id", f"{r.get('finding', '?')}-{r['metric']}")
        r["id"], r["finding"] = str(r["id"]), str(r.get("finding", r["id"]))
        r["min_effect"] = float(r.get("min_effect", 0.0))
        r["primary"] = r.get("primary", False)
        if self.test == "slope":
            r.setdefault("axis", "params")
        if self.test in RANK_TESTS:
            for key in ("kind", "component"):
                r[key] = [r[key]] if isinstance(r[key], str) else r[key]
            r.setdefault("phase", "early")
        return r


@dataclass
class FindingsSpec:
    """A study's `findings:` block: what is compared and how sure a verdict must be; the rules default to the paper's."""

    method: str = option("relora", "the method under test")
    reference: str = option("full", "what it is compared with, seed by seed")
    confidence: float = option(0.95, "the intervals' confidence, in (0, 1); alpha = 1 - confidence")
    rules: list | None = option(None, "the pre-registered rules (default: the paper's, PAPER_RULES)")
    secondary_correction: str = option("bh", "the adjustment within a finding's secondary rows: bh (Benjamini-Hochberg) or holm")
    min_primary_seeds: int = option(MIN_PRIMARY_SEEDS, "paired seeds a primary endpoint needs for a verdict (>= 2)")

    def validate(self, where: str) -> None:
        check(0 < self.confidence < 1, f"{where}: findings.confidence must be a number in (0, 1), e.g. 0.95")
        check(self.secondary_correction in stats.CORRECTIONS,
              f"{where}: findings.secondary_correction must be one of {', '.join(stats.CORRECTIONS)} (Holm or Benjamini-Hochberg)")
        check(self.min_primary_seeds >= 2, f"{where}: findings.min_primary_seeds must be an integer >= 2 (default {MIN_PRIMARY_SEEDS})")
        check(self.rules is None or bool(self.rules), f"{where}: findings.rules must be a non-empty list of rules (see docs/studies.md)")


def validate_findings(spec: Any, where: str = "findings") -> dict[str, Any]:
    """The normalised findings spec ({method, reference, confidence, secondary_correction, min_primary_seeds, rules});
    one ConfigError line if it is wrong. Idempotent: sweep.json holds its output and the engine validates it again."""
    if spec in (True, "paper"):
        spec = {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: `findings` must be a mapping (method, reference, rules) or `paper`")
    if isinstance(spec.get("rules"), list) and not spec["rules"]:  # the loader's word for an empty list would be a type's
        raise ConfigError(f"{where}: findings.rules must be a non-empty list of rules (see docs/studies.md)")
    if "rules" in spec and not isinstance(spec["rules"], list):
        raise ConfigError(f"{where}: findings.rules must be a non-empty list of rules (see docs/studies.md)")
    s = build(FindingsSpec, spec, f"{where}: findings", kind="findings")
    s.validate(where)
    out = {k: v for k, v in dataclasses.asdict(s).items() if k != "rules"}
    out["rules"] = [_rule(rule, f"{where}: findings.rules[{i}]") for i, rule in enumerate(s.rules or PAPER_RULES)]
    _one_each(out["rules"], where)
    return out


def _rule(given: Any, where: str) -> dict[str, Any]:
    if not isinstance(given, dict):
        raise ConfigError(f"{where} must be a mapping such as {RULE_EXAMPLE}")
    rule = build(Rule, given, where, kind="findings")
    rule.validate(where)
    return rule.normalised(given)


def _one_each(rules: list[dict[str, Any]], where: str) -> None:
    """Each rule id once; at most one primary rule per finding."""
    ids: set[str] = set()
    primaries: dict[str, str] = {}
    for r in rules:
        check(r["id"] not in ids, f"{where}: findings rule id {r['id']!r} is used twice; give each rule its own id")
        ids.add(r["id"])
        if r["primary"]:
            check(r["finding"] not in primaries,
                  f"{where}: finding ({r['finding']}) has two primary rules ({primaries.get(r['finding'])}, {r['id']}); "
                  "pre-register one primary endpoint per finding and mark the others `primary: false`")
            primaries[r["finding"]] = r["id"]
