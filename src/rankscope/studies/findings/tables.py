"""The findings as report tables (rankscope.reports renders them): the scale box beside the paper's, every findings row,
the tuned values of a study, and the per-seed paired differences. A cell is the report's cell format (mean, per-run
values with their source)."""

from __future__ import annotations

from typing import Any

from rankscope.studies.findings.engine import study_findings
from rankscope.studies.findings.rules import RANK_TESTS
from rankscope.studies.findings.scale import PAPER_SCALE, _model_runs, _si, _sizes, body_params
from rankscope.studies.findings.verdicts import PAPER_NOTE, verdict_counts


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


def scale_box(runs: list[Any], reference: str | None = None) -> dict[str, Any]:
    """This study's scale against the paper's, as a report table: the first thing a findings table is read with."""
    sizes = _sizes(runs)
    model_runs = _model_runs(runs, reference)
    per_size = {s: [r for r in model_runs if r.size == s] for s in sizes}
    bodies = {s: sorted({b for b in map(body_params, rs) if b}) for s, rs in per_size.items()}
    tokens = sorted({int(r.summary["tokens"]) for r in runs if isinstance(r.summary.get("tokens"), (int, float))})
    per = {s: sorted({round(float(r.summary["tokens"]) / b, 6) for r in rs
                      if (b := body_params(r)) and isinstance(r.summary.get("tokens"), (int, float))}) for s, rs in per_size.items()}
    cycles = set()
    for r in runs:
        mcfg, tcfg = (r.config or {}).get("method") or {}, (r.config or {}).get("train") or {}
        every = (mcfg.get("relora") or {}).get("reset_every") or mcfg.get("reset_every")  # nested (today) or flat (older runs)
        if mcfg.get("name") == "relora" and every:
            every, steps = int(every), int(tcfg.get("max_steps") or 0)
            tok = every * int(tcfg.get("batch_size") or 0) * int(tcfg.get("seq_len") or 0)
            cycles.add((every, f"{every} steps ({_si(tok)} tokens), {steps // every if every else 0} cycles"))
    ours = {"body (non-embedding) parameters": ", ".join(f"{_si(b[0])} ({s})" for s, b in bodies.items() if b) or "-",
            "tokens per run": ", ".join(_si(t) for t in tokens) or "-",
            # per size, in the order of the parameter row (a bare sorted list read as if it were aligned with the sizes)
            "tokens per body parameter": ", ".join(f"{', '.join(f'{x:.3g}' for x in xs)} ({s})" for s, xs in per.items() if xs) or "-",
            "ReLoRA cycle length": "; ".join(text for _, text in sorted(cycles)) or "-"}
    rows = [{"label": k, "cells": [_cell(ours[k]), _cell(PAPER_SCALE[k], ["Weiss et al. (2025); shared/reference/README.md"])]}
            for k in PAPER_SCALE]
    return {"title": "Scale: this study beside the paper's (every verdict below holds at this study's scale only)",
            "columns": ["", "this study", "the paper (Weiss et al. 2025)"], "rows": rows, "formats": [_text, _text],
            "scale": ours, "paper_scale": PAPER_SCALE}


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


def findings_tables(runs: list[Any], sweep: dict[str, Any] | None, results: list[dict[str, Any]] | None = None,
                    pre_registered: bool = True) -> list[dict[str, Any]]:
    """The findings table, the tuned-value table and the per-seed paired differences, as report tables.

    Empty where there are no findings rows and nothing was tuned. `pre_registered` False: the rows are the paper's rules
    applied to runs that stated none (plain run folders), and the title says so."""
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
        what = "pre-registered rules" if pre_registered else "the paper's rules (PAPER_RULES), applied after the runs, not pre-registered"
        tables.append({"title": f"Findings: {what}, {conf} intervals over paired seeds (rankscope.studies.findings)",
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
