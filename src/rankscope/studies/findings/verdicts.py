"""The words of a findings row: the verdicts (and the rows that are not verdicts), what a rank row compares, the interval
rule (`decide`), and the one-line count of verdicts per rule that heads every findings table."""

from __future__ import annotations

from typing import Any

CONTROL_SUFFIX = " (control)"  # the method label of a study's control runs (e.g. ReLoRA at full-rank's tuned LR)
OPPOSITE = "not reproduced: opposite direction"
EQUIVALENT = "no meaningful difference"
SAME_AS_MAIN = "= main"
RANK_DEFICIENT = "rank-deficient"
VERDICTS = ("confirmed", "confirmed (implied by the rank bound)", OPPOSITE, EQUIVALENT, "inconclusive", RANK_DEFICIENT, "not measured",
            SAME_AS_MAIN)
NOT_A_VERDICT = ("not measured", SAME_AS_MAIN, RANK_DEFICIENT)  # rows that test nothing: listed, never counted as verdicts
MIN_PRIMARY_SEEDS = 5
GRADIENT_NOTE = "gradient of the effective weight, not the applied update"
PAPER_NOTE = ("as the paper measured it: ReLoRA's adapter update s*B*A against full-rank's gradient, two different objects "
              "(a rank-r update has PER <= r / min(m, n) by construction; docs/metrics.md)")
UPDATE_KINDS = ("update", "cumulative_update", "cycle_update", "lora_update")


def _object(kind: str, ref_kind: str) -> tuple[str, bool, str | None]:
    """(what is compared, whether it counts toward a verdict about updates, label note) of a rank row."""
    if kind != ref_kind:
        paper = kind in UPDATE_KINDS and ref_kind == "grad"
        return f"{kind} vs {ref_kind}", False, PAPER_NOTE if paper else f"compares different objects ({kind} against {ref_kind})"
    if kind == "grad":
        return "gradient", False, GRADIENT_NOTE
    return ("update" if kind in UPDATE_KINDS else kind), True, None


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
