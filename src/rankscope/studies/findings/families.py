"""Families and verdicts (apply_statistics): the primary rows form one family, Holm-adjusted across findings; every other
row is secondary, adjusted within its finding (Benjamini-Hochberg or Holm); gradient and cross-object rows are a family
apart. Each row gets its raw and adjusted p, a TOST against its sesoi, the minimum detectable effect at 80% power, and the
verdict on the adjusted p, in words that name the scale it was tested at."""

from __future__ import annotations

from typing import Any

from rankscope.studies import stats
from rankscope.studies.findings.scale import scale_phrase
from rankscope.studies.findings.verdicts import EQUIVALENT, NOT_A_VERDICT, OPPOSITE


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
        family = [r for r in rows if r["family"] == fam]
        members = [r for r in family if r["p"] is not None]
        adjust = stats.CORRECTIONS[family[0]["correction"]]  # one correction per family: its rows share one role
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
