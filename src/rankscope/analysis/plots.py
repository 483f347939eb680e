"""Plots of the analysis tables (matplotlib, Agg backend).

  {metric}_{kind}.png   PER / condition number vs step: one row per component, one column per run
                        (methods side by side), one line per layer (per-head OV forms: mean over
                        heads; ov_product: condition number over the numerical rank)
  spectra_{kind}.png    s_i / s_max at chosen steps: one row per component, one column per run,
                        one line per step (mean over layers and heads)
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

PLOT_METRICS = ("per", "condition_number")
# the d x d product O_h V_g has rank <= head_dim, so its raw condition number is inf: plot the one
# over its numerical rank instead (as the in-loop callback logs it). pico-analyze's ov (hd x hd) and
# ov_layer (hd x d) are full rank in general and keep the plain condition number.
SUBSTITUTE = {("condition_number", "ov_product"): "condition_number_numerical"}
COMPONENT_ORDER = ("wq", "wk", "wv", "wo", "ov", "ov_layer", "ov_product", "w1", "w3", "w2", "embed", "lm_head")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ordered(components) -> list[str]:
    comps = set(components)
    return [c for c in COMPONENT_ORDER if c in comps] + sorted(comps - set(COMPONENT_ORDER))


def curves(rows: dict[str, list], metric: str, kind: str) -> dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]]:
    """(run label, component, layer) -> (steps, values), averaged over heads; non-finite values dropped."""
    acc: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run, method, step, layer, comp, k, m, v in zip(rows["run"], rows["method"], rows["step"], rows["layer"], rows["component"], rows["kind"], rows["metric"], rows["value"]):
        if m == SUBSTITUTE.get((metric, comp), metric) and k == kind and v is not None and np.isfinite(v):
            acc[(f"{run} ({method})", comp, layer)][step].append(v)
    out = {}
    for key, by_step in acc.items():
        steps = np.array(sorted(by_step))
        out[key] = (steps, np.array([np.mean(by_step[s]) for s in steps]))
    return out


def plot_metric(rows: dict[str, list], metric: str, kind: str, path: Path) -> Path | None:
    data = curves(rows, metric, kind)
    if not data:
        return None
    plt = _plt()
    runs = sorted({k[0] for k in data})
    comps = _ordered({k[1] for k in data})
    fig, axes = plt.subplots(len(comps), len(runs), figsize=(4.5 * len(runs), 2.6 * len(comps)), squeeze=False, sharex="col", sharey="row")
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
        fig.legend(handles, labels, loc="upper right", fontsize=7, ncol=2)
    fig.suptitle(f"{metric} of {kind} matrices", y=0.995)
    fig.subplots_adjust(left=0.12, right=0.88, top=0.94, bottom=0.06, hspace=0.35, wspace=0.25)  # tight_layout costs seconds
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_spectra(spectra: dict[str, list], kind: str, path: Path, steps: list[int] | None = None, max_steps: int = 4) -> Path | None:
    acc: dict[tuple, list[np.ndarray]] = defaultdict(list)
    cur: dict[tuple, list[float]] = defaultdict(list)
    for run, method, step, layer, comp, head, k, v in zip(spectra["run"], spectra["method"], spectra["step"], spectra["layer"], spectra["component"], spectra["head"], spectra["kind"], spectra["value"]):
        if k == kind:
            cur[(f"{run} ({method})", comp, step, layer, head)].append(v)
    for (run, comp, step, _, _), s in cur.items():
        s = np.asarray(s)
        if s[0] > 0:
            acc[(run, comp, step)].append(s / s[0])
    if not acc:
        return None
    plt = _plt()
    runs = sorted({k[0] for k in acc})
    comps = _ordered({k[1] for k in acc})
    all_steps = sorted({k[2] for k in acc})
    chosen = sorted(set(steps)) if steps else sorted({all_steps[int(i)] for i in np.linspace(0, len(all_steps) - 1, min(max_steps, len(all_steps)))})
    fig, axes = plt.subplots(len(comps), len(runs), figsize=(4.5 * len(runs), 2.6 * len(comps)), squeeze=False)
    cmap = plt.get_cmap("plasma")
    for (run, comp, step), ss in sorted(acc.items()):
        if step not in chosen:
            continue
        ax = axes[comps.index(comp)][runs.index(run)]
        mean = np.mean(np.stack(ss), axis=0)
        ax.plot(np.arange(1, len(mean) + 1), np.clip(mean, 1e-12, None), color=cmap(chosen.index(step) / max(1, len(chosen) - 1) * 0.85), lw=1.2, label=f"step {step}")
        ax.set_yscale("log")
    for r, comp in enumerate(comps):
        axes[r][0].set_ylabel(f"{comp}\ns_i / s_max")
        for c, run in enumerate(runs):
            if r == 0:
                axes[r][c].set_title(run, fontsize=9)
            axes[r][c].grid(alpha=0.3)
    for c in range(len(runs)):
        axes[-1][c].set_xlabel("index i")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=7)
    fig.suptitle(f"singular value spectra of {kind} matrices (mean over layers)", y=0.995)
    fig.subplots_adjust(left=0.12, right=0.88, top=0.94, bottom=0.06, hspace=0.35, wspace=0.25)  # tight_layout costs seconds
    fig.savefig(path, dpi=90)
    plt.close(fig)
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
