"""`rankscope analyze RUN_DIR [RUN_DIR ...] [-o OUT]`: rank metrics table, spectra and plots."""

from __future__ import annotations

import argparse

from rankscope.cli import verb


def _args(p: argparse.ArgumentParser) -> None:
    from rankscope.analysis.metrics import METRICS
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


@verb("analyze", "rank metrics (PER, condition numbers, ...) of every checkpoint: table, spectra, plots", _args)
def cmd_analyze(args) -> None:
    from rankscope.analysis.run import analyze_runs

    written = analyze_runs(args.runs, args.output, plots=not args.no_plots, spectra_steps=args.spectra_steps, cache=not args.no_cache,
                           kinds=tuple(args.kinds), metrics=args.metrics, dtype="float32" if args.fp32 else "float64", device=args.device,
                           include_embeddings=args.embeddings, cumulative_from=args.cumulative_from, workers=args.workers, steps=args.steps)
    for name, path in written.items():
        print(f"{name:32s} {path}")
