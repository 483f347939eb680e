"""Results you can check: a study's numbers as a small folder to commit (`rankscope report STUDY -o REPORT --results DIR`).

DIR (e.g. results/<study>/) gets:

  report.json       the report's data (every table cell with its per-run values and sources, every findings row with its
                    family, raw and adjusted p, minimum detectable effect, TOST and verdict)
  runs.csv          one line per reported run: name, method, size, seed, every config key (config.*), every metric of
                    summary.json and eval.json, and beside each metric the file it came from (<metric>.source)
  tuned_lr.csv      one line per (cell, value tried): loss, status, the chosen value, its position, and the main-horizon
                    confirmation where the study ran one
  environment.json  when and where it was made: date (UTC), CPU model, cores, load average, Python and library versions
  summary.md        the findings as markdown, rendered from report.json alone (render_summary)

Documents quote a results folder only through a generated block:

    <!-- results: results/<study> -->
    ... render_summary(results/<study>/report.json) ...
    <!-- end results -->

`python -m rankscope.reports.results docs/results.md` rewrites every such block from its folder; tests/unit/test_results.py fails when a
committed block and its folder disagree.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

from rankscope.core.errors import ConfigError
from rankscope.core.jsonfiles import read_json_object

# `<!-- results: DIR -->` quotes every row; `<!-- results: DIR primary -->` the scale box, the primary rows and the verdict counts
BLOCK = re.compile(r"<!-- results: (?P<dir>\S+)(?P<mode> primary)? -->\n.*?<!-- end results -->", re.S)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def run_rows(runs: list[Any]) -> list[dict[str, Any]]:
    """One flat row per run: identity, config.* keys, and every metric with its source file."""
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r.name, "method": r.method, "size": r.size, "seed": r.seed}
        row.update({f"config.{k}": v for k, v in _flat(r.config or {}).items()})
        metrics = {k: (v, "summary.json") for k, v in r.summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
        metrics.update({k: (v, "eval.json") for k, v in (r.eval or {}).items() if isinstance(v, (int, float)) and k.startswith(("val_", "test_",
                                                                                                                               "blimp"))})
        for k, (v, src) in sorted(metrics.items()):
            row[k], row[f"{k}.source"] = v, src
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for row in rows:
            w.writerow(row)


def tuning_rows(tuning: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = []
    for ct in (tuning or {}).get("cells", []):
        conf = {d["value"]: d for d in ((ct.get("confirm") or {}).get("tried") or [])}
        for d in ct["tried"]:
            c = conf.get(d["value"])
            rows.append({"cell": ct["label"], "field": tuning["field"], "value": d["value"], "loss": d["loss"], "status": d.get("status"),
                         "chosen": ct["chosen"], "position": ct["position"], "tuning_seed": tuning.get("seed"),
                         "tuning_overrides": " ".join(tuning.get("overrides") or []),
                         "main_horizon_loss": None if c is None else c["loss"]})
    return rows


def environment() -> dict[str, Any]:
    """Date (UTC), CPU model, cores, load average and versions of what made the numbers."""
    from importlib import metadata

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "numpy", "scipy", "statsmodels", "pyarrow", "tokenizers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "cpu": cpu, "cores": os.cpu_count(), "load_average_1_5_15": load,
            "python": sys.version.split()[0], "platform": platform.platform(), "versions": versions}


def write_results(out: str | Path, data: dict[str, Any], runs: list[Any]) -> Path:
    """The results folder of one report: report.json, runs.csv, tuned_lr.csv, environment.json, summary.md."""
    from rankscope.core.paths import check_output_dir

    out = check_output_dir(out, "--results")
    (out / "report.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    _write_csv(out / "runs.csv", run_rows(runs))
    tr = tuning_rows(data.get("tuning"))
    if tr:
        _write_csv(out / "tuned_lr.csv", tr)
    (out / "environment.json").write_text(json.dumps(environment(), indent=1) + "\n")
    (out / "summary.md").write_text(render_summary(data))
    return out


# --------------------------------------------------------------------------- the markdown a document quotes
def _num(x: Any, spec: str = "+.4g") -> str:
    return "–" if x is None else format(x, spec)


def render_summary(data: dict[str, Any], primary_only: bool = False) -> str:
    """Markdown from report.json alone (so a test can regenerate it): the scale box, the findings rows, the tuned values;
    with primary_only, the scale box, the primary rows and a count of every row's verdict (a short quote for a README)."""
    out: list[str] = []
    for t in data.get("findings_tables", []):
        if t["title"].startswith("Scale"):
            out += [f"**{t['title']}**", "", "| | " + " | ".join(t["columns"][1:]) + " |", "|---|---|---|"]
            out += ["| " + r["label"] + " | " + " | ".join(str(c["mean"]) if c else "–" for c in r["cells"]) + " |" for r in t["rows"]]
            out.append("")
    rows = data.get("study_findings") or []
    if primary_only:
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
        out.append(f"All {len(rows)} findings rows: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items(), key=lambda kv: -kv[1]))
                   + f"; {sum(1 for r in rows if r.get('primary'))} of them primary:")
        out.append("")
        rows = [r for r in rows if r.get("primary")]
    if rows:
        out += ["| rule | size | role | n | estimate | interval | p | adjusted p | MDE (80%) | verdict |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            what = r["id"] + (f" {r['kind']}/{r['component']}" if r.get("kind") else "")
            iv = f"[{_num(r['lo'])}, {_num(r['hi'])}]" if r.get("lo") is not None else "–"
            padj = "–" if r.get("p_adj") is None else f"{r['p_adj']:.3g} ({r.get('correction')})"
            out.append(f"| {what} | {r['size']} | {r.get('role', '')} | {r['n']} | {_num(r['estimate'])} | {iv} | {_num(r.get('p'), '.3g')} | "
                       f"{padj} | {_num(r.get('mde'), '.3g')} | {r.get('verdict_text', r['verdict'])} |")
            if r.get("extrapolation") and r["extrapolation"].get("lo") is not None:
                e = r["extrapolation"]
                out.append(f"| {what}: the line at {e['to']:g} | | {e['label']} | | {_num(e['estimate'])} | "
                           f"[{_num(e['lo'])}, {_num(e['hi'])}] | | | | |")
        out.append("")
    tuning = data.get("tuning")
    if tuning and not primary_only:
        table = next((t for t in data.get("findings_tables") or [] if "tuning_seed_in_main_seeds" in t), {})
        h = table.get("horizon") or {}
        leak = {True: "; it IS a main seed", False: "; not a main seed"}.get(table.get("tuning_seed_in_main_seeds"), "")
        out += [f"Tuned {tuning['field']} (seed {tuning.get('seed')}{leak}; tuned at {h.get('tune_steps', '?')} steps, main runs "
                f"{h.get('main_steps', '?')}; tuning overrides: {' '.join(tuning.get('overrides') or []) or 'none'}):", "",
                "| cell | tried | losses | chosen | position | at the main horizon |", "|---|---|---|---|---|---|"]
        confirmed = {row["label"]: (row["cells"][-1] or {}).get("mean") for row in table.get("rows", []) if row.get("cells")}
        for ct in tuning.get("cells", []):
            tried = ", ".join(f"{d['value']:g}" for d in ct["tried"])
            losses = ", ".join("failed" if d["loss"] is None else f"{d['loss']:.4f}" for d in ct["tried"])
            chosen = "–" if ct["chosen"] is None else f"{ct['chosen']:g}"
            out.append(f"| {ct['label']} | {tried} | {losses} | {chosen} | {ct['position']} | {confirmed.get(ct['label']) or 'not confirmed'} |")
        out.append("")
    return "\n".join(out)


def sync_docs(doc: str | Path, root: str | Path | None = None, check: bool = False) -> list[str]:
    """Rewrite (or with check, compare) every `<!-- results: DIR -->` block of `doc` from DIR/report.json; returns the DIRs whose
    block differed."""
    doc = Path(doc)
    # the repository: the nearest folder above the document with a pyproject.toml (README.md sits in it, docs/*.md one below)
    root = Path(root) if root else next((d for d in doc.resolve().parents if (d / "pyproject.toml").is_file()), doc.resolve().parent.parent)
    text = doc.read_text()
    stale: list[str] = []

    def fill(m: re.Match) -> str:
        report = root / m.group("dir") / "report.json"
        if not report.is_file():
            raise ConfigError(f"{doc} quotes {m.group('dir')}, which has no report.json: run `rankscope report RUNS -o OUT "
                              f"--results {m.group('dir')}` first, or remove the block")
        body = render_summary(read_json_object(report, "re-run `rankscope report ... --results` to rewrite it", ConfigError),
                              primary_only=bool(m.group("mode")))
        new = f"<!-- results: {m.group('dir')}{m.group('mode') or ''} -->\n{body}\n<!-- end results -->"
        if new != m.group(0):
            stale.append(m.group("dir"))
        return new

    new_text = BLOCK.sub(fill, text)
    if not check and new_text != text:
        doc.write_text(new_text)
    return stale


if __name__ == "__main__":  # python -m rankscope.reports.results docs/results.md [...]: regenerate the quoted results blocks
    for path in sys.argv[1:]:
        try:
            changed = sync_docs(path)
        except (ConfigError, OSError) as e:
            sys.exit(f"error: {e}")
        print(f"{path}: {'rewrote ' + ', '.join(changed) if changed else 'up to date'}")
