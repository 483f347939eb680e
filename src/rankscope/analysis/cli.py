"""`rankscope analyze RUN_DIR [RUN_DIR ...] [-o OUT]`: rank metrics table, spectra and plots; prints a
compact table of the final PER and condition number of each component. Listed in rankscope.cli.VERBS."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_analyze_args(p: argparse.ArgumentParser) -> None:
    from rankscope.spectral import METRICS
    from rankscope.analysis.run import KINDS

    p.add_argument("runs", nargs="+", help="run directories (with checkpoints/)")
    p.add_argument("-o", "--output", help="output folder (default RUN/analysis for one run, ./analysis for several)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="matrices to analyse (default: all present)")
    p.add_argument("--metrics", nargs="+", choices=list(METRICS), help="metrics to compute (default: all)")
    p.add_argument("--steps", nargs="+", type=int, help="only these checkpoint steps")
    p.add_argument("--spectra-steps", nargs="+", type=int, help="steps whose spectra are written and plotted (default: all written, 4 plotted)")
    p.add_argument("--fp32", action="store_true", help="decompose in float32 instead of float64")
    p.add_argument("--device", default="cpu", help="device for the decompositions (cpu, cuda)")
    p.add_argument("--embeddings", action="store_true", help="also analyse embed and lm_head")
    p.add_argument("--cumulative-from", default="init", choices=["init", "first"], help="base of cumulative updates: re-created initialisation or first checkpoint")
    p.add_argument("--workers", type=int, default=2, help="checkpoint-reading threads")
    p.add_argument("--no-cache", action="store_true", help="recompute everything (and do not write the cache)")
    p.add_argument("--no-plots", action="store_true", help="write the tables only")


def study_runs(path: Path) -> list[Path]:
    """The run folders of a study folder (`rankscope sweep`'s runs_dir: main runs, then control/; tuning runs left
    out), each with checkpoints; [] for anything else."""
    if (path / "checkpoints").is_dir() or not path.is_dir():
        return []
    found = []
    for folder in (path, path / "control"):
        found += sorted(p for p in folder.iterdir() if (p / "checkpoints").is_dir()) if folder.is_dir() else []
    return found


def cmd_analyze(args) -> None:
    from rankscope.spectral import AnalysisError
    from rankscope.analysis.run import analyze_runs
    from rankscope.core.runtime import pick_device

    if args.workers < 1:
        raise AnalysisError(f"--workers must be >= 1, got {args.workers}")
    pick_device(args.device, what="--device")  # before any checkpoint is read
    studies = {r: study_runs(Path(r)) for r in args.runs}
    if any(studies.values()):  # a study folder: each of its runs analysed into its own RUN/analysis, as the sweep does
        if args.output:
            raise AnalysisError("-o does not apply to a study folder: each run's tables go to RUN/analysis (the report reads them there)")
        runs = [p for r in args.runs for p in (studies[r] or [Path(r)])]
        print(f"analysing {len(runs)} runs of {', '.join(r for r in args.runs if studies[r])} (each into RUN/analysis)")
        for run in runs:
            args.runs, args.output = [str(run)], None
            cmd_analyze(args)
        return
    written = analyze_runs(args.runs, args.output, plots=not args.no_plots, spectra_steps=args.spectra_steps, cache=not args.no_cache,
                           kinds=tuple(args.kinds), metrics=args.metrics, dtype="float32" if args.fp32 else "float64", device=args.device,
                           include_embeddings=args.embeddings, cumulative_from=args.cumulative_from, workers=args.workers, steps=args.steps)
    print_final_table(written["rows"])
    print("files: " + ", ".join(str(p) for p in written.values()))


def final_table(rows: dict[str, list]) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the compact summary: per run and component, PER and condition number of
    the weights at the run's last analysed step (mean over layers and heads, geometric for the condition number;
    the condition number over the numerical rank where the plain one is infinite, as for a d x d OV product)."""
    import math
    from collections import defaultdict

    from rankscope.analysis.components import order_components

    acc: dict[tuple, list[float]] = defaultdict(list)
    last: dict[str, int] = {}
    for run, step, kind in zip(rows["run"], rows["step"], rows["kind"]):
        if kind == "weight":
            last[run] = max(step, last.get(run, step))
    for run, step, comp, kind, metric, v in zip(rows["run"], rows["step"], rows["component"], rows["kind"], rows["metric"], rows["value"]):
        if kind == "weight" and step == last.get(run) and v is not None and metric in ("per", "condition_number", "condition_number_numerical"):
            acc[(run, comp, metric)].append(v)
    out = []
    for run in sorted(last):
        for comp in order_components({c for r, c, _ in acc if r == run}):
            per = acc.get((run, comp, "per"), [])
            cond = acc.get((run, comp, "condition_number"), [])
            if not cond or not all(math.isfinite(x) for x in cond):
                cond = [x for x in acc.get((run, comp, "condition_number_numerical"), []) if math.isfinite(x)]
            gm = math.exp(sum(math.log(x) for x in cond) / len(cond)) if cond and all(x > 0 for x in cond) else None
            out.append([run, str(last[run]), comp, f"{sum(per) / len(per):.4f}" if per else "–", f"{gm:.4g}" if gm is not None else "–"])
    return ["run", "step", "component", "PER", "condition number"], out


def print_final_table(path) -> None:
    from rich.console import Console
    from rich.table import Table

    from rankscope.analysis.run import load_table

    columns, body = final_table(load_table(path))
    table = Table(title="final rank metrics of the weights (mean over layers and heads; condition number: geometric mean)", box=None, pad_edge=False)
    for i, c in enumerate(columns):
        table.add_column(c, justify="right" if i in (1, 3, 4) else "left")
    for row in body:
        table.add_row(*row)
    Console(highlight=False).print(table)
