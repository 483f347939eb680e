"""Plots of the analysis tables (matplotlib, Agg backend).

  {metric}_{kind}.png   PER / condition number vs step: one row per component, one column per run
                        (methods side by side), one line per layer (per-head OV forms: mean over
                        heads; ov_product: condition number over the numerical rank)
  spectra_{kind}.png    s_i / s_max at chosen steps: one row per component, one column per run,
                        one line per step (mean over layers and heads); `rankscope report` draws
                        its spectra with the same spectra_figure
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from rankscope.analysis.components import order_components

PLOT_METRICS = ("per", "condition_number")
# the d x d product O_h V_g has rank <= head_dim, so its raw condition number is inf: plot the one
# over its numerical rank instead (as the in-loop callback logs it). pico-analyze's ov (hd x hd) and
# ov_layer (hd x d) are full rank in general and keep the plain condition number.
SUBSTITUTE = {("condition_number", "ov_product"): "condition_number_numerical"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(rows: dict[str, list], metric: str, kind: str) -> dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]]:
    """(run label, component, layer) -> (steps, values), averaged over heads (geometric means for condition numbers);
    non-finite values are not drawn."""
    acc: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run, method, step, layer, comp, k, m, v in zip(rows["run"], rows["method"], rows["step"], rows["layer"], rows["component"], rows["kind"], rows["metric"], rows["value"]):
        if m == SUBSTITUTE.get((metric, comp), metric) and k == kind and v is not None and np.isfinite(v):
            acc[(f"{run} ({method})", comp, layer)][step].append(v)
    out = {}
    for key, by_step in acc.items():
        steps = np.array(sorted(by_step))
        avg = (lambda v: float(np.exp(np.mean(np.log(v))))) if metric.startswith("condition") else np.mean
        out[key] = (steps, np.array([avg(by_step[s]) for s in steps]))
    return out


def plot_metric(rows: dict[str, list], metric: str, kind: str, path: Path) -> Path | None:
    data = curves(rows, metric, kind)
    if not data:
        return None
    plt = _plt()
    runs = sorted({k[0] for k in data})
    comps = order_components({k[1] for k in data})
    fig, axes = plt.subplots(len(comps), len(runs), figsize=(min(11.8, 3.2 * len(runs) + 0.8), 2.0 * len(comps) + 0.9), squeeze=False,
                             sharex="col", sharey="row", layout="constrained")
    cmap = plt.get_cmap("viridis")
    layers = sorted({k[2] for k in data})
    for (run, comp, layer), (x, y) in sorted(data.items()):
        ax = axes[comps.index(comp)][runs.index(run)]
        color = cmap(layers.index(layer) / max(1, len(layers) - 1))
        ax.plot(x, y, color=color, lw=1.2, label=f"L{layer}" if layer >= 0 else comp)
    for r, comp in enumerate(comps):
        axes[r][0].set_ylabel(f"{comp}\n{metric}")
        for c, run in enumerate(runs):
            ax = axes[r][c]
            if r == 0:
                ax.set_title(run, fontsize=9)
            if metric.startswith("condition"):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    for c in range(len(runs)):
        axes[-1][c].set_xlabel("step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    fig.suptitle(f"{metric} of {kind} matrices", fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def spectra_panels(spectra: dict[str, list], kind: str, label=lambda run, method: f"{run} ({method})") -> dict[tuple, list[np.ndarray]]:
    """(column label, component, step) -> the s / s_max arrays of each (layer, head) matrix.
    `label(run, method)` names the column a run's rows go to (None leaves them out)."""
    cur: dict[tuple, list[float]] = defaultdict(list)
    for run, method, step, layer, comp, head, k, v in zip(spectra["run"], spectra["method"], spectra["step"], spectra["layer"], spectra["component"],
                                                         spectra["head"], spectra["kind"], spectra["value"]):
        if k == kind and (col := label(run, method)) is not None:
            cur[(col, comp, step, layer, head)].append(v)
    acc: dict[tuple, list[np.ndarray]] = defaultdict(list)
    for (col, comp, step, _, _), s in cur.items():
        s = np.asarray(s)
        if s[0] > 0:
            acc[(col, comp, step)].append(s / s[0])
    return dict(acc)


def spectra_layout(n_comps: int, n_columns: int, max_cols: int = 4) -> tuple[int, int, bool]:
    """(rows, columns, wrapped) of the spectra grid: components x groups where there are 3+ groups; else the
    panels wrap into up to `max_cols` columns (one group's 5 components: a 2 x 3 grid, not one column of 5)."""
    if n_columns >= 3 or n_comps * n_columns <= 1:
        return n_comps, n_columns, False
    n = n_comps * n_columns
    cols = n if n <= max_cols else min((max_cols, max_cols - 1), key=lambda c: (math.ceil(n / c) * c - n, -c))  # fewest empty cells
    return math.ceil(n / cols), cols, True


def spectra_figure(acc: dict[tuple, list[np.ndarray]], columns: list[str], steps: list[int] | None = None, max_steps: int = 4,
                   floor: float = 1e-12, title: str | None = None):
    """Rows = components, columns = `columns`, one line per step (mean over the arrays of a panel); with fewer than three
    columns the panels wrap into a grid that fills the width (spectra_layout). Values below `floor` are drawn at `floor`.
    Major and minor tick labels share one size. The one spectra plot of `analyze` and `report`."""
    plt = _plt()
    comps = order_components({k[1] for k in acc})
    all_steps = sorted({k[2] for k in acc})
    chosen = sorted({min(all_steps, key=lambda h: abs(h - s)) for s in steps}) if steps else \
        sorted({all_steps[int(i)] for i in np.linspace(0, len(all_steps) - 1, min(max_steps, len(all_steps)))})
    nrows, ncols, wrapped = spectra_layout(len(comps), len(columns))
    width = 11.8 if wrapped else min(11.8, 2.7 * ncols + 0.8)  # a wrapped grid takes the page's width
    fig, grid = plt.subplots(nrows, ncols, figsize=(width, 2.0 * nrows + 0.9), squeeze=False, layout="constrained")
    panels = [(comp, col) for comp in comps for col in columns]  # row-major: a component's groups side by side
    where = {p: divmod(i, ncols) if wrapped else (comps.index(p[0]), columns.index(p[1])) for i, p in enumerate(panels)}
    cmap = plt.get_cmap("viridis")
    for (col, comp, step), ss in sorted(acc.items()):
        if step not in chosen or col not in columns or len({len(x) for x in ss}) != 1:
            continue
        r, c = where[(comp, col)]
        mean = np.mean(np.stack(ss), axis=0)
        grid[r][c].plot(np.arange(1, len(mean) + 1), np.clip(mean, floor, None), color=cmap(chosen.index(step) / max(1, len(chosen) - 1) * 0.9),
                        lw=1.2, label=f"step {step}")
    for (comp, col), (r, c) in where.items():
        ax = grid[r][c]
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.tick_params(which="both", labelsize=7)  # minor log labels (2x10^-1 ...) no larger than the decades'
        if wrapped:
            ax.set_title(f"{comp} ({col})", fontsize=8)
            if c == 0:
                ax.set_ylabel("s_i / s_max", fontsize=8)
            if r == nrows - 1 or (r + 1) * ncols + c >= len(panels):
                ax.set_xlabel("index i", fontsize=8)
        else:
            if r == 0:
                ax.set_title(col, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{comp}\ns_i / s_max", fontsize=8)
            if r == nrows - 1:
                ax.set_xlabel("index i", fontsize=8)
    for i in range(len(panels), nrows * ncols):  # the wrapped grid's empty cells
        grid[i // ncols][i % ncols].remove()
    handles, labels = grid[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside upper center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_spectra(spectra: dict[str, list], kind: str, path: Path, steps: list[int] | None = None, max_steps: int = 4) -> Path | None:
    acc = spectra_panels(spectra, kind)
    if not acc:
        return None
    fig = spectra_figure(acc, sorted({k[0] for k in acc}), steps, max_steps, title=f"singular value spectra of {kind} matrices (mean over layers)")
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path


def plot_all(rows: dict[str, list], spectra: dict[str, list], out: Path, spectra_steps: list[int] | None = None) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for kind in sorted(set(rows["kind"])):
        for metric in PLOT_METRICS:
            if (p := plot_metric(rows, metric, kind, out / f"{metric}_{kind}.png")) is not None:
                written[f"{metric}_{kind}"] = p
    for kind in sorted(set(spectra["kind"])):
        if (p := plot_spectra(spectra, kind, out / f"spectra_{kind}.png", spectra_steps)) is not None:
            written[f"spectra_{kind}"] = p
    return written
