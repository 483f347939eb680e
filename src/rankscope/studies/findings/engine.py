"""The verdict engine: every rule of a findings spec evaluated on a set of runs (rows of each test, then the statistics of
the families), for a study's sweep.json (its pre-registered rules) and for plain run folders alike (the paper's rules,
PAPER_RULES, where the runs hold both the reference and the method under test; none for a single method)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from rankscope.studies.findings.families import apply_statistics
from rankscope.studies.findings.rank import _rank
from rankscope.studies.findings.rows import _paired, _same_as_main, _slope
from rankscope.studies.findings.rules import validate_findings
from rankscope.studies.findings.scale import _sizes
from rankscope.studies.findings.verdicts import CONTROL_SUFFIX, SAME_AS_MAIN


def read_sweep(paths: Iterable[str | Path]) -> dict[str, Any] | None:
    """The first sweep.json found among study directories (None for plain run directories)."""
    for p in map(Path, paths):
        if (p / "sweep.json").is_file():
            return json.loads((p / "sweep.json").read_text())
    return None


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


def default_spec(runs: list[Any]) -> dict[str, Any] | None:
    """The paper's rules (reference full, method relora) for runs that pre-registered none, where both methods ran;
    None otherwise (a single run, or one method only: nothing to compare)."""
    spec = validate_findings({})
    methods = {r.method for r in runs}
    return spec if {spec["method"], spec["reference"]} <= methods else None


def report_findings(runs: list[Any], sweep: dict[str, Any] | None) -> tuple[list[dict[str, Any]], bool]:
    """(rows, pre-registered): a study's pre-registered rules where its sweep.json states them, else the paper's rules
    applied to the runs as they are (default_spec), else no rows."""
    if (sweep or {}).get("findings"):
        return study_findings(runs, sweep), True
    spec = default_spec(runs)
    return (evaluate_findings(runs, spec) if spec else []), False
