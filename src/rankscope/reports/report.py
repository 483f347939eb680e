"""`rankscope report RUN_OR_STUDY_DIR ... -o REPORT_DIR`: runs side by side.

Reads finished runs (summary.json, metrics.jsonl, eval.json from `rankscope eval`, and
analysis/{rank_metrics,spectra}.parquet from `rankscope analyze`), groups them by method and model
size (method.name x model.preset; mean ± sample std over seeds) and writes into REPORT_DIR:

  report.html   one self-contained page: tables, and plots embedded as base64 PNG
  report.md     the same tables, with the PNGs beside it
  report.json   every table cell with the per-run values it aggregates and the file + key each
                value came from, so any number can be traced back to a run
  *.png         loss vs tokens, BLiMP per phenomenon, PER / condition number vs step, spectra

Evaluation values (val_*, blimp*) come from RUN/eval.json (the post-training `rankscope eval`)
where it exists, else from summary.json (the in-training evaluation at the last step, over the
first eval.max_docs documents per domain); a line under each table names which. The headline's one
validation loss is `val_loss_all` (every scored token pooled) where every run has it, else the
8-batch in-training estimate `final_val_loss`, and says so. The page opens with a summary (the
findings' verdict counts and primary rows where a study pre-registered findings, the headline table)
and any failed runs, then the key figures (loss; PER of weights, updates, gradients), the scale box
beside the paper's own numbers (Weiss et al. 2025, at pico scale; labelled and never mixed into this
study's numbers), the other figures, and last the long tables (every findings row, per-seed
differences, the paper's claims checked, per-domain tables, every run; collapsed in the HTML).
Sizes are ordered by non-embedding parameters (findings.size_order), labels as given. Every value
reaches report.html through one escaping path, the jinja2 template in rankscope.reports.html.
"""

from __future__ import annotations

import html
import json
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from rankscope.core.errors import RankscopeError
from rankscope.studies.findings import CONTROL_SUFFIX, SAME_AS_MAIN
from rankscope.core.jsonfiles import read_json_object, read_jsonl_objects, read_yaml_mapping
from rankscope.core.paths import check_output_dir


class ReportError(RankscopeError):
    """Nothing to report on, or an unreadable run."""


# Weiss et al. (2025), "Investigating ReLoRA", pico-decoder at step 20k (their Table/Figures).
PAPER_REFERENCE = {
    "citation": "Weiss et al. (2025), Investigating ReLoRA: Effects on the Learning Dynamics of Small Language Models",
    "scale": "pico-tiny (d=96) / pico-small (d=384), 12 layers, 20k steps x 1024 x 2048 tokens on Dolma",
    "blimp_step_20k": {("full", "pico-tiny"): 0.6504, ("full", "pico-small"): 0.7014, ("relora", "pico-tiny"): 0.6236, ("relora", "pico-small"): 0.6308},
    "paloma_ppl_relora": {"pico-tiny": 228.09, "pico-small": 83.55},
}


# --------------------------------------------------------------------------- runs
@dataclass
class Run:
    dir: Path
    name: str
    method: str
    size: str
    seed: int
    config: dict[str, Any]
    summary: dict[str, Any]
    eval: dict[str, Any] = field(default_factory=dict)  # eval.json "metrics" (flat keys)
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl

    @property
    def group(self) -> tuple[str, str]:
        return self.method, self.size

    def value(self, key: str) -> tuple[float | None, str | None]:
        """(value, 'file#key') of a metric: eval keys from eval.json when present, else summary.json."""
        if key in self.eval and _is_eval_key(key):
            return _num(self.eval[key]), f"{self.dir / 'eval.json'}#metrics.{key}"
        if key in self.summary:
            return _num(self.summary[key]), f"{self.dir / 'summary.json'}#{key}"
        return None, None

    def merge_steps(self) -> list[tuple[int, int]]:
        """(step, tokens) of every ReLoRA merge-and-restart (rows with `relora_merge`)."""
        return [(int(r["step"]), int(r.get("tokens", 0))) for r in self.rows if "relora_merge" in r]


def _is_eval_key(key: str) -> bool:
    return key.startswith(("val_", "test_", "blimp"))


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows; torn or foreign lines skipped (rankscope.core.jsonfiles.read_jsonl_objects) and counted
    in a one-line warning."""
    skipped: list[int] = []
    rows = read_jsonl_objects(path, skipped)
    if skipped:
        warnings.warn(f"{path}: {len(skipped)} line(s) are not JSON objects and were left out of the report "
                      f"(the first at line {skipped[0]})", stacklevel=2)
    return rows


SWEEP_FIX = "re-run `rankscope sweep STUDY` to rewrite it (finished runs are kept), or delete it and report the run folders"


def read_sweep_json(path: Path) -> dict[str, Any]:
    """A study's sweep.json, checked for what the report reads: `runs`, a list of objects with a `name`,
    and `tuning`, an object with a `field` where present."""
    data = read_json_object(path, SWEEP_FIX, ReportError)
    runs = data.get("runs", [])
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str) and r["name"] for r in runs):
        raise ReportError(f"{path}: `runs` must be a list of objects with a name; {SWEEP_FIX}")
    tuning = data.get("tuning")
    if tuning and not (isinstance(tuning, dict) and isinstance(tuning.get("field"), str)):
        raise ReportError(f"{path}: `tuning` must be an object with a field; {SWEEP_FIX}")
    return {**data, "runs": runs}


def size_label(model: dict[str, Any]) -> str:
    """The preset's name where the model is that preset, else its shape (`d48-L12`): a preset with a field overridden (a
    narrower width at the same depth) is another size, never the preset's."""
    from rankscope.config import PRESETS

    preset = model.get("preset")
    body = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")
    if preset and all(model.get(k, v) == v for k, v in PRESETS.get(preset, {}).items() if k in body):
        return preset
    return f"d{model.get('d_model')}-L{model.get('n_layers')}"


def load_run(run_dir: Path) -> Run:
    cfg_path, sum_path = run_dir / "config.yaml", run_dir / "summary.json"
    if not cfg_path.is_file() or not sum_path.is_file():
        raise ReportError(f"{run_dir} is not a finished run (needs config.yaml and summary.json)")
    config = read_yaml_mapping(cfg_path, "restore the run's config.yaml, or leave the run out of the report", ReportError)
    summary = read_json_object(sum_path, "delete it and re-run `rankscope train` with the run's config to rewrite it, "
                               "or leave the run out", ReportError)
    ev = {}
    if (run_dir / "eval.json").is_file():
        ev = read_json_object(run_dir / "eval.json", "re-run `rankscope eval RUN --json RUN/eval.json`, or delete it", ReportError)
        ev = ev.get("metrics") if isinstance(ev.get("metrics"), dict) else {}
    sections = {k: config.get(k) for k in ("model", "train", "method")}
    for k, v in sections.items():
        if v is not None and not isinstance(v, dict):
            raise ReportError(f"{cfg_path}: section {k} is not a mapping (got {type(v).__name__}); restore the run's config.yaml")
    model, train, method = (sections[k] or {} for k in ("model", "train", "method"))
    try:
        seed = int(train.get("seed", 0))
    except (TypeError, ValueError):
        raise ReportError(f"{cfg_path}: train.seed={train.get('seed')!r} is not an integer; restore the run's config.yaml") from None
    return Run(run_dir, run_dir.name, method.get("name", summary.get("method", "?")), size_label(model),
               seed, config, summary, ev, read_jsonl(run_dir / "metrics.jsonl"))


def _is_run_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.yaml").is_file()


def collect(paths: list[str | Path], exclude_duplicates: bool = False) -> tuple[list[Run], list[dict[str, Any]]]:
    """Finished runs and the runs that failed, did not finish or were excluded, from run dirs and study dirs.

    A study directory's runs are the runs its sweep.json names: any other run folder in it (a leftover of an earlier
    sweep, a re-tuned point) is listed as excluded, by name, and never reported. Two runs with the same method, size
    (with any other dimension) and seed are an error naming both folders; with exclude_duplicates the one met first (the
    sweep's own before any other) is kept and the other listed as excluded."""
    runs: list[Run] = []
    problems: list[dict[str, Any]] = []
    seen: set[Path] = set()
    tuned: set[str] = set()
    unreadable: list[str] = []

    def add(run_dir: Path, status: str = "done", error: str | None = None, stage: str = "main") -> None:
        key = run_dir.resolve()
        if key in seen:
            return
        seen.add(key)
        if status == "done" and (run_dir / "summary.json").is_file():
            try:
                runs.append(load_run(run_dir))
            except ReportError as e:  # one unreadable run is listed, the others are still reported
                unreadable.append(str(e))
                problems.append({"run": run_dir.name, "dir": str(run_dir), "status": "unreadable", "error": str(e), "log": None})
                return
            if stage == "control":  # a study's control runs (rankscope.studies.study) are their own method row
                runs[-1].method += CONTROL_SUFFIX
        else:
            problems.append({"run": run_dir.name, "dir": str(run_dir), "status": status if status != "done" else "unfinished",
                             "error": error or "no summary.json (training did not finish)",
                             "log": str(run_dir / "sweep.log") if (run_dir / "sweep.log").exists() else None})

    for path in map(Path, paths):
        if not path.exists():
            raise ReportError(f"{path} does not exist; give run directories or study directories (with sweep.json)")
        if _is_run_dir(path):
            add(path)
            continue
        sweep = path / "sweep.json"
        named: set[Path] | None = None
        if sweep.is_file():
            data = read_sweep_json(sweep)
            named = {(path / row["name"]).resolve() for row in data["runs"]}
            if data.get("tuning"):  # each cell runs at its own tuned value: not a dimension that splits groups
                tuned.add(data["tuning"]["field"])
            for row in data["runs"]:
                if row.get("stage") in ("tune", "confirm") or row.get("status") == SAME_AS_MAIN:
                    continue  # tuning runs are in the tuned-value table; a control at the main lr is the main run
                run_dir = path / row["name"] if (path / row["name"]).is_dir() else Path(row.get("run_dir") or path / row["name"])
                if not run_dir.resolve().is_relative_to(path.resolve()):  # sweep.json names only runs of its own folder
                    raise ReportError(f"{sweep}: run {row['name']!r} points outside the study folder ({run_dir}); "
                                      f"{SWEEP_FIX}, or name that run folder on the command line to report it")
                add(run_dir, row.get("status", "done"), row.get("error"), row.get("stage", "main"))
        for sub in sorted(p for p in path.iterdir() if _is_run_dir(p)) if path.is_dir() else []:
            if named is not None and sub.resolve() not in named:
                if sub.resolve() not in seen:
                    seen.add(sub.resolve())
                    problems.append({"run": sub.name, "dir": str(sub), "status": "excluded",
                                     "error": f"not a run of the study: {sweep} does not name it", "log": None})
                continue
            add(sub)
    if not runs and not problems:
        raise ReportError(f"no runs found in {', '.join(map(str, paths))}; give run directories (config.yaml + summary.json) or a study directory (sweep.json)")
    if not runs and unreadable:
        raise ReportError(unreadable[0])
    if not runs:
        raise ReportError(f"no finished runs in {', '.join(map(str, paths))} ({len(problems)} failed or unfinished); see their sweep.log")
    label_other_dimensions(runs, tuned)
    return _unique_runs(runs, problems, exclude_duplicates), problems


def _unique_runs(runs: list[Run], problems: list[dict[str, Any]], exclude: bool) -> list[Run]:
    """Runs with one (method, size, seed) each: a second is an error naming both folders, or (exclude) listed and left out."""
    first: dict[tuple[str, str, int], Run] = {}
    kept = []
    for r in runs:
        key = (r.method, r.size, r.seed)
        if key not in first:
            first[key] = r
            kept.append(r)
        elif not exclude:
            raise ReportError(f"two runs of {r.method} at {r.size}, seed {r.seed}: {first[key].dir} and {r.dir}; remove the stray "
                              "one, or pass --exclude-duplicates to keep the first and list the other as excluded")
        else:
            problems.append({"run": r.name, "dir": str(r.dir), "status": "excluded",
                             "error": f"duplicate of {first[key].dir} ({r.method}, {r.size}, seed {r.seed})", "log": None})
    return kept


# fields that never split groups: seeds are averaged over, method fields belong to the method,
# and the rest do not change what is trained
_NOT_A_DIMENSION = ("train.seed", "method.", "model.", "data.cache_dir", "train.threads", "train.progress", "train.log_every",
                    "train.eval_every", "train.device", "train.tensorboard", "train.wandb", "checkpoint.", "eval.", "analysis.")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
    return out


def label_other_dimensions(runs: list[Run], ignore: set[str] | frozenset = frozenset()) -> None:
    """Runs that differ in more than method, size and seed (e.g. a grid over train.lr) must not be
    averaged together: such fields join the size label, e.g. `micro lr=0.001`."""
    flats = [_flat(r.config) for r in runs]
    keys = sorted({k for f in flats for k in f})
    varying = [k for k in keys if not k.startswith(_NOT_A_DIMENSION) and k not in ignore and len({f.get(k) for f in flats}) > 1]
    for r, f in zip(runs, flats):
        extra = " ".join(f"{k.split('.')[-1]}={json.loads(f[k]) if k in f else '-'}" for k in varying)
        if extra:
            r.size = f"{r.size} {extra}"


# --------------------------------------------------------------------------- tables
def group_order(runs: list[Run]) -> list[tuple[str, str]]:
    """(method, size) groups: sizes smallest body first (findings.size_order: by non-embedding parameters, so `d32-L4`
    comes before `micro`), then full, lora, relora and the rest by name."""
    from rankscope.studies.findings import size_order

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


def findings(runs: list[Run], rank_curves: dict) -> list[dict[str, Any]]:
    """The paper's claims checked on these runs: ReLoRA − full gaps per size (final values) and
    the early-training PER / condition number of the paper's components."""
    out = []
    sizes = list(dict.fromkeys(g[1] for g in group_order(runs)))
    for key, what in (("final_val_loss", "val loss"), ("final_train_loss", "train loss"), ("val_bpb_macro", "val bits/byte (macro)"), ("blimp_overall", "BLiMP overall")):
        for size in sizes:
            full = cell([r for r in runs if r.group == ("full", size)], key)
            rel = cell([r for r in runs if r.group == ("relora", size)], key)
            if full and rel:
                out.append({"claim": f"{what}: ReLoRA − full", "size": size, "value": rel["mean"] - full["mean"], "full": full, "relora": rel})
    for metric in ("per", "cond"):
        order = ("wv", "wo", "ov", "w2", "ov_layer", "ov_product", "wq", "wk", "w1", "w3")  # the paper's components first
        items = sorted(rank_curves.get(metric, {}).items(), key=lambda kv: (sizes.index(kv[0][0]) if kv[0][0] in sizes else len(sizes), order.index(kv[0][1]) if kv[0][1] in order else len(order), kv[0][1]))
        for (size, comp), by_method in items:
            if "full" in by_method and "relora" in by_method:
                fs, fv = by_method["full"]
                rs, rv = by_method["relora"]
                common = sorted(set(fs) & set(rs))
                if common:
                    early = common[: max(1, len(common) // 4)]  # the first quarter of the measured steps
                    f_mean = statistics.fmean(fv[fs.index(s)] for s in early)
                    r_mean = statistics.fmean(rv[rs.index(s)] for s in early)
                    out.append({"claim": f"{'PER' if metric == 'per' else 'condition number'} of {comp}, steps {early[0]:g}–{early[-1]:g}: ReLoRA / full",
                                "size": size, "value": r_mean / f_mean if f_mean else None, "full_value": f_mean, "relora_value": r_mean,
                                "final_ratio": rv[rs.index(common[-1])] / fv[fs.index(common[-1])] if fv[fs.index(common[-1])] else None})
    return out


# --------------------------------------------------------------------------- output
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


def paper_table() -> dict[str, Any]:
    """The paper's reference numbers as a report table (cells sourced to the paper)."""
    ref = PAPER_REFERENCE

    def c(v):
        return None if v is None else {"mean": v, "std": None, "n": 1, "values": [{"value": v, "source": ref["citation"]}]}

    rows = [{"label": f"{m} / {s} (paper)", "cells": [c(v), c(ref["paloma_ppl_relora"].get(s) if m == "relora" else None)]}
            for (m, s), v in ref["blimp_step_20k"].items()]
    return {"title": f"Reference — the PAPER's numbers, not this study's: {ref['citation']}; {ref['scale']}",
            "columns": ["method / size (paper)", "BLiMP at step 20k", "Paloma perplexity at step 20k"], "rows": rows,
            "formats": [_f(4), _f(2)], "note": "Paloma perplexity of full-rank models is not published in the paper's repository (–)."}


def _c(v: Any) -> dict[str, Any]:
    return {"mean": v, "std": None, "values": []}


def claims_table(items: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The paper's claims checked on these runs (see findings()), as a report table."""
    rows = []
    for it in items:
        if "full" in it:
            rows.append({"label": it["claim"], "cells": [_c(it["size"]), _c(it["value"]), it["full"], it["relora"]]})
        elif it["value"] is not None:
            rows.append({"label": it["claim"], "cells": [_c(it["size"]), {**_c(it["value"]), "final": it["final_ratio"]},
                                                         _c(it["full_value"]), _c(it["relora_value"])]})
    if not rows:
        return None
    text = lambda x: str(x)  # noqa: E731
    g = lambda x: f"{x:.4g}"  # noqa: E731
    for row in rows:  # the value column: a signed gap or a ratio (with the final ratio)
        v = row["cells"][1]
        v["mean"] = f"{v['mean']:+.4f}" if "final" not in v else f"{v['mean']:.3f} (at the end: {v['final']:.3f})" if v["final"] is not None else f"{v['mean']:.3f}"
    return {"title": "The paper's claims, checked on these runs", "columns": ["check", "size", "value", "full", "ReLoRA"], "rows": rows,
            "formats": [text, text, g, g]}


# figures shown right after the summary: loss, and PER of the paper's components, of updates and of gradients (finding (d))
KEY_FIGURES = ("loss_vs_tokens.png", "rank_per_paper.png", "rank_per_update.png", "rank_per_cumulative_update.png", "rank_per_grad.png")
LONG_FINDINGS = ("Findings:", "Paired differences per seed")  # every findings row and the per-seed table: long, after the figures


def summary_tables(top: list[dict[str, Any]], verdicts: list[dict[str, Any]],
                   tables: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(the summary's tables, the findings tables shown beside the paper's numbers, the report's other tables).

    With pre-registered findings the summary is the findings table's primary rows and the headline; without, the
    headline alone (a single-run report leads with the run). The full findings table and the per-seed table go with the long
    tables (write_report); the scale box and a tuning table stay beside the paper's numbers."""
    head = [t for t in tables if t["title"].startswith("Headline")]
    rest = [t for t in tables if t not in head]
    short = [t for t in top if not t.get("title", "").startswith(LONG_FINDINGS)]
    if not verdicts:
        return head, short, rest
    full = next((t for t in top if t.get("title", "").startswith("Findings")), None)
    summary = []
    if full is not None and len(full["rows"]) == len(verdicts):
        primary = [row for row, v in zip(full["rows"], verdicts) if v.get("primary")]
        if primary:
            summary.append({**full, "title": f"Primary endpoints ({len(primary)} of {len(verdicts)} findings rows; every row under Tables below)",
                            "note": "", "rows": primary})
    return summary + head, short, rest


def _jsonable(tables: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in t.items() if k != "formats"} for t in tables]


def write_report(paths: list[str | Path], out_dir: str | Path, spectra_steps: list[int] | None = None, log=print,
                 exclude_duplicates: bool = False, results_dir: str | Path | None = None) -> dict[str, Path]:
    from rankscope.reports import html as report_html
    from rankscope.reports import plots as P

    from rankscope.studies.findings import findings_tables, read_sweep, study_findings, verdict_counts
    if any(s < 0 for s in spectra_steps or []):  # checked before anything is read or written
        raise ReportError(f"--spectra-steps must be steps >= 0, got {min(spectra_steps)}")

    runs, problems = collect(paths, exclude_duplicates)
    out = check_output_dir(out_dir, "-o")
    sweep = read_sweep(paths)
    verdicts = study_findings(runs, sweep)  # the study's pre-registered rules; their tables come first
    top = findings_tables(runs, sweep, verdicts)
    tables = build_tables(runs)
    groups = group_order(runs)
    figures = [(title, fn, caption) for title, fn, caption in P.figures(runs, groups, out, spectra_steps) if fn is not None]
    found = findings(runs, P.rank_summary(runs, groups))
    claims = claims_table(found)
    ref = paper_table()
    ref_png = P.plot_paper_reference(out / "paper_reference.png")
    stamp = time.strftime("%Y-%m-%d %H:%M")
    excluded = [p for p in problems if p["status"] == "excluded"]
    intro = (f"{len(runs)} finished runs in {len(groups)} groups (method / size), {len(problems) - len(excluded)} failed or unfinished"
             + (f", {len(excluded)} excluded by name ({', '.join(p['run'] for p in excluded)})" if excluded else "") + ". "
             "Cells: mean ± sample std over seeds; the line under each table names the file its values come from. "
             "report.json lists every cell's per-run values and the file each came from.")
    no_findings = ("No pre-registered findings (a `findings:` block in a study file); "
                   + ("the paper's claims are compared on these runs, descriptively, in the table below." if claims else
                      "the paper's claims need full-rank and ReLoRA runs side by side, so none is checked here."))
    paper_note = ("The paper's numbers are at pico scale (11-66M parameters, 41.9B tokens); a CPU study is orders of magnitude smaller, "
                  "so compare directions, not values.")
    # Layout (issue 23): a short summary and the key figures first, then the findings tables beside the paper's numbers,
    # the other figures, and last the long tables (per-seed differences, the paper's claims, per-domain, every run).
    summary, short, long_tables = summary_tables(top, verdicts, tables)
    key_figs = [f for f in figures if f[1].name in KEY_FIGURES]
    other_figs = [f for f in figures if f[1].name not in KEY_FIGURES]
    counts = verdict_counts(verdicts) if verdicts else ""
    long_tables = [t for t in top if t.get("title", "").startswith(LONG_FINDINGS)] + ([claims] if claims else []) + long_tables

    # Markdown (linear, the same order)
    md = [f"# rankscope report ({stamp})", "", "Inputs: " + ", ".join(md_text(p) for p in paths), "", intro, ""]
    if counts:
        md += ["## Summary", "", "At a glance (rows per verdict, by rule): " + md_text(counts), ""]
    md += [_md_table(t) + "\n" for t in summary]
    if problems:
        md += ["### Failed, unfinished or excluded runs", "", "| run | status | error | log |", "|---|---|---|---|"]
        md += [f"| {p['run']} | {p['status']} | {(p['error'] or '').replace('|', '/')} | {p['log'] or ''} |" for p in problems] + [""]
    for title, fn, caption in key_figs:
        md += [f"### {md_text(title)}", "", f"![{md_text(title)}]({fn.name})", "", md_text(caption), ""]
    md += [_md_table(t) + "\n" for t in short] or [f"### Findings\n\n{no_findings}\n"]
    md += [_md_table(ref), "", paper_note, "", f"![paper reference]({ref_png.name})", ""]
    for title, fn, caption in other_figs:
        md += [f"### {md_text(title)}", "", f"![{md_text(title)}]({fn.name})", "", md_text(caption), ""]
    md += [_md_table(t) + "\n" for t in long_tables]
    (out / "report.md").write_text(html.escape("\n".join(md), quote=False))  # what it quotes shows as text, never as HTML

    # HTML (self-contained): every value goes through the template's autoescape
    fig_view = lambda fs: [{"title": t, "src": P.data_uri(fn), "caption": c} for t, fn, c in fs]  # noqa: E731
    page = report_html.render(
        stamp=stamp, inputs=", ".join(map(str, paths)), intro=intro, counts=counts, summary=[table_view(t) for t in summary],
        findings=[table_view(t) for t in short], no_findings=no_findings,
        paper=table_view(ref), paper_note=paper_note, paper_png=P.data_uri(ref_png), tables=[table_view(t) for t in long_tables],
        problems=[{k: str(p.get(k) or "") for k in ("run", "status", "error", "log")} for p in problems],
        key_figures=fig_view(key_figs), figures=fig_view(other_figs))
    (out / "report.html").write_text(page)

    data = {"generated": stamp, "inputs": [str(p) for p in paths],
            "runs": [{"name": r.name, "dir": str(r.dir), "method": r.method, "size": r.size, "seed": r.seed} for r in runs],
            "failed": problems, "findings_tables": _jsonable(top), "tables": _jsonable(top + tables), "findings": found,
            "study_findings": verdicts, "tuning": (sweep or {}).get("tuning"),
            "paper_reference": {"citation": PAPER_REFERENCE["citation"], "scale": PAPER_REFERENCE["scale"], "table": _jsonable([ref])[0]},
            "figures": [{"title": t, "file": fn.name, "caption": c} for t, fn, c in figures]}
    (out / "report.json").write_text(json.dumps(data, indent=1, default=str))
    log(f"report of {len(runs)} runs ({len(problems)} failed/unfinished/excluded): {out / 'report.html'}, {out / 'report.md'}")
    written = {"html": out / "report.html", "md": out / "report.md", "json": out / "report.json"}
    if results_dir is not None:  # the small folder to commit (rankscope.reports.results)
        from rankscope.reports.results import write_results

        written["results"] = write_results(results_dir, json.loads(json.dumps(data, default=str)), runs)
    return written


# --------------------------------------------------------------------------- CLI verb
def default_output(paths: list[str]) -> str:
    """reports/<name of the first run or study folder> (as `make demo` prints: runs/demo -> reports/demo)."""
    return str(Path("reports") / (Path(paths[0]).resolve().name or "report"))


def add_report_args(p) -> None:
    p.add_argument("paths", nargs="+", help="run directories and/or study directories (with sweep.json, or holding runs)")
    p.add_argument("-o", "--output", help="report folder (report.html, report.md, report.json, PNGs); default reports/<first path's name>")
    p.add_argument("--spectra-steps", nargs="+", type=int, help="steps whose singular-value spectra are plotted (default: up to 3 analysed steps)")
    p.add_argument("--exclude-duplicates", action="store_true",
                   help="where two runs share method, size and seed, keep the first and list the other as excluded (default: an error)")
    p.add_argument("--results", metavar="DIR", help="also write the checkable results folder (results/<study>/: report.json, runs.csv, "
                                                     "tuned_lr.csv, environment.json; rankscope.reports.results)")


def cmd_report(args) -> None:
    written = write_report(args.paths, args.output or default_output(args.paths), args.spectra_steps,
                           exclude_duplicates=args.exclude_duplicates, results_dir=args.results)
    for name, path in written.items():
        print(f"{name:5s} {path}")
