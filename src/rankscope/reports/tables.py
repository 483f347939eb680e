"""The report's tables of runs: (method, size) groups in order, a cell (mean ± sample std over seeds, each value with the
file and key it came from), the headline, per-domain and per-run tables with the line naming their source, and the two
renderings of any table (plain strings for the HTML template, a Markdown table)."""

from __future__ import annotations

import statistics
from typing import Any

from rankscope.reports.runs import Run
from rankscope.studies.findings.scale import size_order


def group_order(runs: list[Run]) -> list[tuple[str, str]]:
    """(method, size) groups: sizes smallest body first (findings.size_order: by non-embedding parameters, so `d32-L4`
    comes before `micro`), then full, lora, relora and the rest by name."""
    sizes = size_order(runs)
    methods = ["full", "lora", "relora"]
    rank = lambda g: (sizes.index(g[1]), methods.index(g[0]) if g[0] in methods else len(methods), g[0])  # noqa: E731
    return sorted({r.group for r in runs}, key=rank)


def cell(runs: list[Run], key: str) -> dict[str, Any] | None:
    """Mean ± sample std over the runs (seeds) that have `key`, with each value's source."""
    values = []
    for r in runs:
        v, src = r.value(key)
        if v is not None:
            values.append({"run": r.name, "seed": r.seed, "value": v, "source": src})
    if not values:
        return None
    xs = [v["value"] for v in values]
    return {"key": key, "mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs), "values": values}


# (column label, key, formatter) of the headline table
def _f(digits: int):
    return lambda x: f"{x:.{digits}f}"


def _mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


def _int(x: float) -> str:
    return f"{x:,.0f}"


HEADLINE = [
    ("final train loss", "final_train_loss", _f(4)),
    ("val loss", "val_loss_all", _f(4)),
    ("val bits/byte (macro)", "val_bpb_macro", _f(4)),
    ("BLiMP overall", "blimp_overall", _f(4)),
    ("tokens/s", "tokens_per_s", _int),
    ("peak memory (MiB)", "peak_memory_bytes", _mib),
    ("optimiser state (MiB)", "optimizer_state_bytes", _mib),
    ("trainable params", "trainable_params", _int),
    ("ReLoRA merges", "relora_merges", _int),
]


def fmt(c: dict[str, Any] | None, f) -> str:
    if c is None:
        return "–"
    s = f(c["mean"])
    if c["std"] is not None:
        s += f" ± {f(c['std'])}"
    return s


def _keys_with(runs: list[Run], prefix: str) -> list[str]:
    keys = set()
    for r in runs:
        keys |= {k for k in (*r.summary, *r.eval) if k.startswith(prefix)}
    return sorted(keys)


def build_tables(runs: list[Run]) -> list[dict[str, Any]]:
    """Tables of cells: {title, columns, rows: [{label, cells: [cell|None]}], formats}."""
    groups = group_order(runs)
    by_group = {g: [r for r in runs if r.group == g] for g in groups}
    glabel = {g: f"{g[0]} / {g[1]}" for g in groups}
    tables = []
    val_key = headline_val_key(runs)
    head = [(lab, val_key if key == "val_loss_all" else key, f) for lab, key, f in HEADLINE]
    head = [(lab, key, f) for lab, key, f in head if any(r.value(key)[0] is not None for r in runs)]
    tables.append({"title": "Headline: method x size (mean ± std over seeds)", "columns": ["method / size", "seeds", *[h[0] for h in head]],
                   "rows": [{"label": glabel[g], "n": len(by_group[g]), "cells": [cell(by_group[g], key) for _, key, _ in head]} for g in groups],
                   "formats": [h[2] for h in head], "note": val_source(runs, val_key)})
    for prefix, title, f in (("val_bpb", "Validation bits per byte per domain", _f(4)), ("val_loss", "Validation loss per domain", _f(4)),
                             ("blimp", "BLiMP accuracy per phenomenon (mean over its paradigms)", _f(4))):
        keys = [k for k in _keys_with(runs, prefix) if k not in ("val_loss",)]
        if prefix == "val_loss":
            keys = [k for k in keys if k.startswith("val_loss/") or k in ("val_loss_macro", "val_loss_all")]
        if not keys:
            continue
        keys = sorted(keys, key=lambda k: (not k.endswith(("_macro", "_overall", "_all")) and "/" not in k, k.endswith(("_macro", "overall", "_all")), k))
        tables.append({"title": title, "columns": ["metric", *[glabel[g] for g in groups]],
                       "rows": [{"label": k, "cells": [cell(by_group[g], k) for g in groups]} for k in keys], "formats": [f] * len(groups),
                       "note": eval_source(runs, keys[0])})
    per_run = [("final_train_loss", _f(4)), ("final_val_loss", _f(4)), ("val_loss_all", _f(4)), ("val_bpb_macro", _f(4)), ("blimp_overall", _f(4)),
               ("tokens_per_s", _int)]
    tables.append({"title": "Every run", "columns": ["run", *[k for k, _ in per_run]],
                   "rows": [{"label": r.name, "cells": [cell([r], k) for k, _ in per_run]} for g in groups for r in by_group[g]],
                   "formats": [f for _, f in per_run]})
    return tables


def headline_val_key(runs: list[Run]) -> str:
    """One validation loss for the headline: every scored token pooled where every run has it."""
    return "val_loss_all" if all(r.value("val_loss_all")[0] is not None for r in runs) else "final_val_loss"


def _estimate(r: Run, key: str) -> str:
    src = r.value(key)[1] or ""
    if key == "final_val_loss":
        return f"summary.json: the in-training estimate, mean loss of train.eval_batches={r.config.get('train', {}).get('eval_batches', '?')} val batches"
    if "eval.json" in src:
        return "eval.json: `rankscope eval`, every held-out document scored"
    cap = r.summary.get("eval_max_docs", r.config.get("eval", {}).get("max_docs", "?"))
    return f"summary.json: the in-training evaluation, first eval.max_docs={cap} documents per domain (0: all)"


def val_source(runs: list[Run], key: str) -> str:
    """The line under the headline naming where its validation loss comes from."""
    kinds: dict[str, list[str]] = {}
    for r in runs:
        kinds.setdefault(_estimate(r, key), []).append(r.name)
    what = "every scored token pooled (val_loss_all)" if key == "val_loss_all" else "final_val_loss"
    parts = [f"{k} ({len(v)} runs)" for k, v in kinds.items()]
    warn = " These are different estimates: compare cells of one source only." if len(kinds) > 1 else ""
    return f"val loss = {what}; source: {'; '.join(parts)}.{warn}"


def eval_source(runs: list[Run], key: str) -> str:
    kinds = {_estimate(r, key) for r in runs if r.value(key)[0] is not None}
    warn = " Different estimates are mixed here." if len(kinds) > 1 else ""
    return "Source: " + "; ".join(sorted(kinds)) + "." + warn



def table_view(t: dict[str, Any]) -> dict[str, Any]:
    """A table as plain strings for the template: rows of {text, title} (title: the cells' source files)."""
    rows = []
    for row in t["rows"]:
        cells = [{"text": str(row["label"]), "title": ""}] + ([{"text": str(row["n"]), "title": ""}] if "n" in row else [])
        cells += [{"text": fmt(c, f), "title": "; ".join(str(v.get("source", "")) for v in c.get("values", [])) if c else ""}
                  for c, f in zip(row["cells"], t["formats"])]
        rows.append(cells)
    return {"title": str(t["title"]), "note": str(t.get("note") or ""), "columns": [str(c) for c in t["columns"]], "rows": rows}


def md_text(value: Any) -> str:
    """`value` as one Markdown table cell or line: pipes escaped, line breaks made spaces (a quoted value cannot
    end its row or start a heading). HTML is escaped once, for the whole report.md, where it is written."""
    return " ".join(str(value).replace("|", "\\|").splitlines())


def _md_table(t: dict[str, Any]) -> str:
    lines = [f"### {md_text(t['title'])}", "", *([md_text(t["note"]), ""] if t.get("note") else []),
             "| " + " | ".join(md_text(c) for c in t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
    for row in t["rows"]:
        cells = [row["label"], *([str(row["n"])] if "n" in row else []), *[fmt(c, f) for c, f in zip(row["cells"], t["formats"])]]
        lines.append("| " + " | ".join(md_text(c) for c in cells) + " |")
    return "\n".join(lines)


