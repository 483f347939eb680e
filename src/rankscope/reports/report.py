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
8-batch in-training estimate `final_val_loss`, and says so.

Verdicts come from one engine, rankscope.studies.findings: a study's pre-registered rules (its sweep.json), else the
paper's rules applied to the runs where they hold full-rank and ReLoRA runs (titled as not pre-registered); a single
run or a single method gets no verdict, and the report says so in one line. The page opens with a summary (the verdict
counts and primary rows, the headline table) and any failed runs, then the key figures (loss; PER of weights, updates,
gradients), the scale box beside the paper's own numbers (Weiss et al. 2025, at pico scale; labelled and never mixed
into this study's numbers), the other figures, and last the long tables (every findings row, per-seed differences,
per-domain tables, every run; collapsed in the HTML). Sizes are ordered by non-embedding parameters
(findings.size_order), labels as given. Every value reaches report.html through one escaping path, the jinja2 template
in rankscope.reports.html.

Modules: runs (reading and collecting runs), tables (cells and tables of runs, their renderings), paper (the paper's
numbers), series and plots (figures), html (the page), results (the folder to commit); this one writes the report.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

from rankscope.core.paths import check_output_dir
from rankscope.reports.paper import PAPER_REFERENCE, paper_table
from rankscope.reports.runs import ReportError, collect
from rankscope.reports.tables import _md_table, build_tables, group_order, md_text, table_view
from rankscope.studies.findings import findings_tables, read_sweep, report_findings, verdict_counts

__all__ = ["KEY_FIGURES", "ReportError", "add_report_args", "cmd_report", "default_output", "summary_tables", "write_report"]

# figures shown right after the summary: loss, and PER of the paper's components, of updates and of gradients (finding (d))
KEY_FIGURES = ("loss_vs_tokens.png", "rank_per_paper.png", "rank_per_update.png", "rank_per_cumulative_update.png", "rank_per_grad.png")
LONG_FINDINGS = ("Findings:", "Paired differences per seed")  # every findings row and the per-seed table: long, after the figures


def summary_tables(top: list[dict[str, Any]], verdicts: list[dict[str, Any]],
                   tables: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(the summary's tables, the findings tables shown beside the paper's numbers, the report's other tables).

    With findings rows (pre-registered, or the paper's rules on plain runs) the summary is their primary rows and the
    headline; without, the headline alone (a single-run report leads with the run). The full findings table and the per-seed table go with the long
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



def no_findings_line(runs: list[Any], verdicts: list[dict[str, Any]], pre_registered: bool) -> str:
    """The one line said where nothing was tested (or where the rules were not pre-registered)."""
    if verdicts and not pre_registered:
        return ("No pre-registered findings (a `findings:` block in a study file); the paper's rules (PAPER_RULES) are applied "
                "to these runs as they are, and their tables are titled so.")
    return ("No pre-registered findings (a `findings:` block in a study file); "
            + ("a single run gets no verdict (a finding compares a method with a reference, seed by seed)." if len(runs) == 1 else
               "the paper's rules need full-rank and ReLoRA runs side by side, so none is tested here."))


def write_report(paths: list[str | Path], out_dir: str | Path, spectra_steps: list[int] | None = None, log=print,
                 exclude_duplicates: bool = False, results_dir: str | Path | None = None) -> dict[str, Path]:
    from rankscope.reports import html as report_html
    from rankscope.reports import plots as P

    if any(s < 0 for s in spectra_steps or []):  # checked before anything is read or written
        raise ReportError(f"--spectra-steps must be steps >= 0, got {min(spectra_steps)}")

    runs, problems = collect(paths, exclude_duplicates)
    out = check_output_dir(out_dir, "-o")
    sweep = read_sweep(paths)
    verdicts, pre_registered = report_findings(runs, sweep)  # the study's rules, else the paper's; their tables come first
    top = findings_tables(runs, sweep, verdicts, pre_registered)
    tables = build_tables(runs)
    groups = group_order(runs)
    figures = [(title, fn, caption) for title, fn, caption in P.figures(runs, groups, out, spectra_steps) if fn is not None]
    ref = paper_table()
    ref_png = P.plot_paper_reference(out / "paper_reference.png")
    stamp = time.strftime("%Y-%m-%d %H:%M")
    excluded = [p for p in problems if p["status"] == "excluded"]
    intro = (f"{len(runs)} finished runs in {len(groups)} groups (method / size), {len(problems) - len(excluded)} failed or unfinished"
             + (f", {len(excluded)} excluded by name ({', '.join(p['run'] for p in excluded)})" if excluded else "") + ". "
             "Cells: mean ± sample std over seeds; the line under each table names the file its values come from. "
             "report.json lists every cell's per-run values and the file each came from.")
    no_findings = no_findings_line(runs, verdicts, pre_registered)
    if verdicts and not pre_registered:
        intro += " " + no_findings
    paper_note = ("The paper's numbers are at pico scale (11-66M parameters, 41.9B tokens); a CPU study is orders of magnitude smaller, "
                  "so compare directions, not values.")
    # Layout (issue 23): a short summary and the key figures first, then the findings tables beside the paper's numbers,
    # the other figures, and last the long tables (per-seed differences, per-domain, every run).
    summary, short, long_tables = summary_tables(top, verdicts, tables)
    key_figs = [f for f in figures if f[1].name in KEY_FIGURES]
    other_figs = [f for f in figures if f[1].name not in KEY_FIGURES]
    counts = verdict_counts(verdicts) if verdicts else ""
    long_tables = [t for t in top if t.get("title", "").startswith(LONG_FINDINGS)] + long_tables

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
            "failed": problems, "findings_tables": _jsonable(top), "tables": _jsonable(top + tables),
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
