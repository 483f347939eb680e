"""Rows of the rank tests (rank, rank-matched): per size and (kind, component), the phase mean of a metric from each run's
analysis/rank_metrics.parquet (geometric for condition numbers), its log ratio seed by seed, and the notes a reader needs:
the object compared, the update windows, rank-deficient matrices and the rank bound."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rankscope.studies.findings.rows import _finish, _not_measured, _pairs
from rankscope.studies.findings.verdicts import UPDATE_KINDS, _object

GEOMETRIC = ("condition_number", "condition_number_numerical")  # ratios spanning decades: summarised by geometric means


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
