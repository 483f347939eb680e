"""Plots of `rankscope report` (matplotlib, Agg): small-multiple grids as in Weiss et al. (2025).

One figure per metric family: loss and bits-per-byte against tokens; PER against step; condition
number against step. In the rank figures rows are model sizes and columns are components (V, O,
the OV circuits and w2 first, the rest in a second figure); component names are data, so columns
are whatever the runs hold, in COMPONENT_ORDER. One colour per method; the line is the mean over
seeds and the band spans min to max over seeds; ReLoRA merge-and-restarts are dotted vertical
lines. Constrained layout keeps every label inside the canvas (tested). The paper's reference
numbers get their own figure, titled as the paper's, never drawn on the same axes as this study's.
"""

from __future__ import annotations

import base64
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np

from rankscope.analysis.components import PAPER_COMPONENTS, order_components
from rankscope.reports.paper import PAPER_REFERENCE
from rankscope.reports.series import KIND_NAMES, analysed, loss_series, mean_band, rank_kinds, rank_series
from rankscope.reports.tables import cell

COMPONENT_NAMES = {"wv": "V", "wo": "O", "ov": "OV (per head)", "ov_layer": "OV (per layer)", "ov_product": "OV (d x d product)",
                   "w2": "w2 (SwiGLU down)", "wq": "Q", "wk": "K", "w1": "w1 (SwiGLU gate)", "w3": "w3 (SwiGLU up)"}
METHOD_COLOURS = {"full": "tab:blue", "relora": "tab:orange", "lora": "tab:green", "so": "tab:red", "so_single": "tab:olive", "galore": "tab:purple",
                  "adaptive": "tab:brown", "hybrid": "tab:pink"}
METRIC_NAMES = {"per": "PER", "cond": "condition number"}
BAND = "min–max over seeds"
FLOOR = 1e-4  # spectra plots: smaller s_i / s_max drawn here (a d x d OV product beyond rank head_dim is ~1e-16)
DPI = 100  # the report shows PNGs at their pixel size up to 1200 px wide
MAX_WIDTH = 11.8  # inches at DPI: the page's 1200 px


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colour(method: str) -> str:
    return METHOD_COLOURS.get(method, "tab:gray")


def component_name(comp: str) -> str:
    return COMPONENT_NAMES.get(comp, comp)


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def grid(nrows: int, ncols: int, panel: tuple[float, float] = (2.7, 2.1)):
    """A constrained-layout figure of nrows x ncols panels, no wider than the report's page."""
    width = min(MAX_WIDTH, panel[0] * ncols + 0.8)
    return _plt().subplots(nrows, ncols, figsize=(width, panel[1] * nrows + 0.9), squeeze=False, layout="constrained")



# --------------------------------------------------------------------------- axes helpers
def _tokens(v: float, _pos=None) -> str:
    return f"{v / 1e9:g}B" if abs(v) >= 1e9 else f"{v / 1e6:g}M" if abs(v) >= 1e6 else f"{v / 1e3:g}k" if abs(v) >= 1e3 else f"{v:g}"


def _plain(v: float, _pos=None) -> str:
    """Log-axis tick labels as plain numbers (10, 100, 1k, 10k, 1M) instead of 10^k or 7.75x10^1."""
    return _tokens(v) if v >= 1000 else f"{v:g}"


def log_axis(axis) -> None:
    """Plain labels (100k, 1M) at the decades; where the data span less than about a decade, also at 2x and 5x
    (never every minor tick: 2e+03 4e+04 6e+04 printed over each other). Call after the data are drawn."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, numticks=6))
    axis.set_major_formatter(FuncFormatter(_plain))
    lo, hi = sorted(axis.get_view_interval())
    decades = [10.0 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)] if lo > 0 else []
    if lo > 0 and len([d for d in decades if lo <= d <= hi]) < 2:  # under two labelled decades: label 2x and 5x too
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0), numticks=6))
        axis.set_minor_formatter(FuncFormatter(_plain))
    else:
        axis.set_minor_formatter(NullFormatter())


MIN_SPAN = {"per": 0.05, "loss": 0.05}  # linear y-axes span at least this (PER: absolute; loss: a fraction of the value)


def min_span(ax, span: float, relative: bool = False) -> bool:
    """Widen a linear y-axis to at least `span` (times the mid value when `relative`) about its centre, so that
    noise of 1e-4 is not drawn as a trend; True where it widened (the caption says so)."""
    lo, hi = ax.get_ylim()
    need = span * abs((lo + hi) / 2) if relative else span
    if hi - lo >= need:
        return False
    mid = (lo + hi) / 2
    ax.set_ylim(mid - need / 2, mid + need / 2)
    return True


def _restarts(ax, runs, groups, size: str, x: str) -> bool:
    """Dotted vertical lines at the ReLoRA merges of this size (x = 'step' or 'tokens')."""
    drawn = False
    for method, s in groups:
        members = [r for r in runs if r.group == (method, s)] if s == size else []
        for step, tokens in members[0].merge_steps() if members else []:
            ax.axvline(step if x == "step" else tokens, color=colour(method), ls=":", lw=0.8, alpha=0.7)
            drawn = True
    return drawn


def has_band(runs, groups) -> bool:
    """A min-max band exists where some group holds two or more runs (seeds); with one run each there is none."""
    return any(len([r for r in runs if r.group == g]) >= 2 for g in groups)


def _legend(fig, methods: list[str], restarts: bool, counts: dict[str, str], band: bool = True) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], color=colour(m), lw=1.6, label=f"{m} {counts.get(m, '')}".strip()) for m in methods]
    if band:  # "min-max over seeds" only where a group has 2+ runs
        handles.append(Patch(color="gray", alpha=0.25, label=BAND))
    if restarts:
        handles.append(Line2D([], [], color="gray", ls=":", lw=0.8, label="ReLoRA merge"))
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize=8, frameon=False)


def _counts(runs, groups) -> dict[str, str]:
    seeds: dict[str, set[int]] = defaultdict(set)
    for r in runs:
        seeds[r.method].add(len([m for m in runs if m.group == r.group]))
    return {m: "(n=" + "/".join(map(str, sorted(s))) + ")" for m, s in seeds.items()}


def _draw(ax, series: list[dict[float, float]], method: str) -> bool:
    """The mean over seeds and its band. A line that lies on one already drawn on these axes (a control that
    is the same runs as its method) is drawn dashed and wider on top, so both colours show."""
    x, mean, lo, hi = mean_band(series)
    if not len(x):
        return False
    drawn = ax.__dict__.setdefault("_rankscope_lines", [])
    same = any(len(x) == len(px) and np.allclose(x, px) and np.allclose(mean, py, rtol=1e-6, atol=1e-12) for px, py in drawn)
    style = dict(ls=(0, (3, 3)), lw=2.4, zorder=3) if same else dict(lw=1.3)
    ax.plot(x, mean, color=colour(method), marker="." if len(x) <= 12 and not same else None, ms=3, **style)
    ax.fill_between(x, lo, hi, color=colour(method), alpha=0.25, lw=0)
    drawn.append((x, mean))
    return True


# --------------------------------------------------------------------------- figures
LOSS_PANELS = (("train_loss", "train loss"), ("val_loss", "val loss (8-batch est.)"), ("val_bpb_macro", "val bits/byte (macro)"))


def loss_figure(runs, groups):
    """Rows = sizes, columns = train loss, validation loss, validation bits per byte; x = tokens (log)."""
    sizes = list(dict.fromkeys(g[1] for g in groups))
    # a panel needs a line: a quantity logged once per run (the final bits/byte) is a table row, not a dot
    panels = [(k, lab) for k, lab in LOSS_PANELS if any(len(loss_series(r, k)) >= 2 for r in runs)]
    if not panels:
        return None
    fig, axes = grid(len(sizes), len(panels), (3.4, 2.2))
    restarts = False
    for r, size in enumerate(sizes):
        for c, (key, label) in enumerate(panels):
            ax = axes[r][c]
            tail, xs = [], []
            for method, s in groups:
                if s == size and _draw(ax, [loss_series(m, key) for m in runs if m.group == (method, s)], method):
                    x, _, lo, hi = mean_band([loss_series(m, key) for m in runs if m.group == (method, s)])
                    tail += hi[x >= x[-1] / 10].tolist() + lo.tolist()
                    xs += [x[0], x[-1]]
            restarts |= _restarts(ax, runs, groups, size, "tokens")
            if xs:  # each panel its own token range (validation starts later than training): merge lines never widen it
                ax.set_xlim(min(xs) / 1.15, max(xs) * 1.15)
            if tail:  # the first tenth of training (loss ~ ln V) would flatten the rest
                pad = 0.05 * (max(tail) - min(tail) or 1)
                ax.set_ylim(min(tail) - pad, max(tail) + pad)
                min_span(ax, MIN_SPAN["loss"], relative=True)
            ax.set_xscale("log")
            log_axis(ax.xaxis)
            ax.grid(alpha=0.3, which="major")
            ax.tick_params(which="both", labelsize=8)
            if r == 0:
                ax.set_title(label, fontsize=9)
            if c == 0:
                ax.set_ylabel(size, fontsize=9)
            if r == len(sizes) - 1:
                ax.set_xlabel("tokens", fontsize=8)
    _legend(fig, list(dict.fromkeys(g[0] for g in groups)), restarts, _counts(runs, groups), has_band(runs, groups))
    return fig


def rank_figure(runs, groups, metric: str, components: list[str], kind: str = "weight"):
    """Rows = sizes, columns = components present; PER on a linear axis (at least MIN_SPAN['per'] tall), condition
    number on a log axis (at least a factor 2); the matrices of `kind` (weights, updates, cumulative updates, gradients)."""
    use = analysed(runs)
    series = {r.name: rank_series(r, use, kind)[0] for r in runs}
    present = [c for c in components if any((metric, c) in s for s in series.values())]
    sizes = list(dict.fromkeys(g[1] for g in groups))
    if not present:
        return None
    fig, axes = grid(len(sizes), len(present))
    restarts = False
    for r, size in enumerate(sizes):
        for c, comp in enumerate(present):
            ax = axes[r][c]
            for method, s in groups:
                if s == size:
                    _draw(ax, [series[m.name][(metric, comp)] for m in runs if m.group == (method, s) and (metric, comp) in series[m.name]], method)
            restarts |= _restarts(ax, runs, groups, size, "step")
            if metric == "cond":
                ax.set_yscale("log")
                lo, hi = ax.get_ylim()
                if lo > 0 and hi / lo < 2:  # a factor 2 at least: 1.01x noise is not a trend
                    mid = math.sqrt(lo * hi)
                    ax.set_ylim(mid / math.sqrt(2), mid * math.sqrt(2))
                log_axis(ax.yaxis)
            else:
                min_span(ax, MIN_SPAN["per"])
            ax.grid(alpha=0.3, which="major")
            ax.tick_params(which="both", labelsize=8)
            ax.xaxis.set_major_formatter(_plt().FuncFormatter(_tokens))
            if r == 0:
                ax.set_title(component_name(comp), fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{size}\n{METRIC_NAMES[metric]}", fontsize=8)
            if r == len(sizes) - 1:
                ax.set_xlabel("step", fontsize=8)
    _legend(fig, list(dict.fromkeys(g[0] for g in groups)), restarts, _counts(runs, groups), has_band(runs, groups))
    return fig


def rank_components(runs) -> tuple[list[str], list[str]]:
    """(the paper's components present, the others present), each in COMPONENT_ORDER."""
    use = analysed(runs)
    comps = order_components({k[1] for r in runs for k in rank_series(r, use)[0]})
    return [c for c in comps if c in PAPER_COMPONENTS], [c for c in comps if c not in PAPER_COMPONENTS]


def blimp_figure(runs, groups):
    phen = sorted({k for r in runs for k in (*r.summary, *r.eval) if k.startswith("blimp/")})
    keys = phen + (["blimp_overall"] if any(r.value("blimp_overall")[0] is not None for r in runs) else [])
    if not keys:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(MAX_WIDTH, max(8, 0.75 * len(keys) + 2)), 4.4), layout="constrained")
    width = 0.8 / len(groups)
    hatches = ["", "//", "..", "xx"]
    sizes = list(dict.fromkeys(g[1] for g in groups))
    for i, g in enumerate(groups):
        cells = [cell([r for r in runs if r.group == g], k) for k in keys]
        x = np.arange(len(keys)) + (i - (len(groups) - 1) / 2) * width
        ax.bar(x, [c["mean"] if c else np.nan for c in cells], width, yerr=[c["std"] if c and c["std"] is not None else 0 for c in cells],
               color=colour(g[0]), hatch=hatches[sizes.index(g[1]) % len(hatches)], edgecolor="black", lw=0.4, alpha=0.85, capsize=1.5,
               label=f"{g[0]} / {g[1]}")
    ax.axhline(0.5, color="k", lw=0.8, ls="--", label="chance")
    labels = [k.removeprefix("blimp/").replace("_", " ") if k != "blimp_overall" else "OVERALL" for k in keys]
    ax.set_xticks(np.arange(len(keys)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("BLiMP per phenomenon (this study; mean over seeds, bars = std)", fontsize=10)
    ax.legend(fontsize=7, ncol=min(4, len(groups) + 1), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return fig


def spectra_figure(runs, groups, steps: list[int] | None = None):
    """s_i / s_max of the paper's components at chosen steps; rows = method / size, columns = components."""
    from rankscope.analysis.plots import spectra_figure as draw, spectra_panels
    from rankscope.analysis.run import load_table

    acc: dict[tuple, list[np.ndarray]] = defaultdict(list)
    for r in runs:
        p = r.dir / "analysis" / "spectra.parquet"
        if p.is_file():
            group = f"{r.method} / {r.size}"
            for (_, comp, step), ss in spectra_panels(load_table(p), "weight", lambda run, _m, name=r.name, g=group: g if run == name else None).items():
                if comp in PAPER_COMPONENTS:
                    acc[(group, comp, step)].extend(ss)
    labels = [f"{m} / {s}" for m, s in groups]
    return draw(acc, sorted({k[0] for k in acc}, key=labels.index), steps, max_steps=3, floor=FLOOR, title=None) if acc else None


def plot_paper_reference(path: Path) -> Path:
    ref = PAPER_REFERENCE
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.5, 3.4), gridspec_kw={"width_ratios": [2, 1]}, layout="constrained")
    sizes = ["pico-tiny", "pico-small"]
    for i, method in enumerate(("full", "relora")):
        vals = [ref["blimp_step_20k"][(method, s)] for s in sizes]
        bars = a.bar(np.arange(2) + (i - 0.5) * 0.38, vals, 0.38, color=colour(method), edgecolor="black", lw=0.4, label=method)
        a.bar_label(bars, fmt="%.4f", fontsize=7)
    a.set_xticks(range(2), sizes)
    a.set_ylim(0.5, 0.75)
    a.set_ylabel("BLiMP accuracy")
    a.set_title("BLiMP at step 20k", fontsize=9)
    a.legend(fontsize=7)
    vals = [ref["paloma_ppl_relora"][s] for s in sizes]
    bars = b.bar(range(2), vals, 0.5, color=colour("relora"), edgecolor="black", lw=0.4)
    b.bar_label(bars, fmt="%.2f", fontsize=7)
    b.set_xticks(range(2), sizes)
    b.set_ylabel("perplexity")
    b.set_title("ReLoRA Paloma perplexity", fontsize=9)
    fig.suptitle("THE PAPER'S numbers (Weiss et al. 2025), pico scale, 20k steps — not this study's runs", fontsize=9, color="darkred")
    return save(fig, path)


def figures(runs, groups, out: Path, spectra_steps: list[int] | None = None) -> Iterator[tuple[str, Path | None, str]]:
    """(title, png or None, caption) of every figure of the report."""
    band = (f"Rows: model size. Line: mean over seeds; band: {BAND}; dotted vertical lines: ReLoRA merge-and-restarts."
            if has_band(runs, groups) else
            "Rows: model size. One run per group (no band over seeds); dotted vertical lines: ReLoRA merge-and-restarts.")

    def png(fig, name: str) -> Path | None:
        return save(fig, out / name) if fig is not None else None

    yield ("Loss vs tokens", png(loss_figure(runs, groups), "loss_vs_tokens.png"),
           f"{band} Log token axis, each panel over its own token range (validation starts at the first evaluation); "
           "the y-axis starts after the first tenth of training. The validation loss here is the in-training "
           "estimate (mean of train.eval_batches batches), the bits per byte the in-training per-domain evaluation (macro average). A quantity measured once per run "
           "(a final evaluation) is a table row, not a one-dot panel; a y-axis is at least 5% of its value tall.")
    yield ("BLiMP per phenomenon", png(blimp_figure(runs, groups), "blimp_phenomena.png"),
           "Accuracy per BLiMP phenomenon (mean over its paradigms) and overall; error bars: std over seeds; dashed: chance (0.5). "
           "Hatching marks the model size.")
    paper, other = rank_components(runs)
    sources = sorted({"analysis tables (checkpoint weights)" if rank_series(r, analysed(runs))[1].endswith(".parquet") else "in-loop metrics.jsonl rows"
                      for r in runs})
    scale = {"per": f" Linear y-axis at least {MIN_SPAN['per']:g} tall (a flatter line is flat, not zoomed into).",
             "cond": " Log y-axis, at least a factor 2 tall; over the numerical rank where the plain condition number is infinite "
                     "(a d x d OV product has rank <= head_dim)."}
    for kind in rank_kinds(runs):
        # weights: the paper's components and the others; updates and gradients (finding (d)): the paper's components
        sets = (("the paper's components (V, O, OV, w2)", paper, "paper"), ("the other components", other, "other"))
        for metric in ("per", "cond"):
            for label, comps, tag in (sets if kind == "weight" else sets[:1]):
                fig = rank_figure(runs, groups, metric, comps, kind)
                name = f"rank_{metric}_{tag}.png" if kind == "weight" else f"rank_{metric}_{kind}.png"
                title = f"{METRIC_NAMES[metric]} vs step: {label}" if kind == "weight" else f"{METRIC_NAMES[metric]} of {KIND_NAMES[kind]} vs step"
                yield (title, png(fig, name),
                       f"{band} Columns: components; mean over layers (and heads). Source: "
                       f"{', '.join(sources) if kind == 'weight' else 'analysis tables (' + kind + ')'}.{scale[metric]} "
                       "A dashed line lies exactly on another method's line (e.g. a control that is the same runs).")
    yield ("Singular-value spectra", png(spectra_figure(runs, groups, spectra_steps), "spectra.png"),
           f"s_i / s_max of the weights at chosen checkpoints, mean over layers, heads and seeds (from RUN/analysis/spectra.parquet); "
           f"values below {FLOOR:g} are drawn at {FLOOR:g}.")
