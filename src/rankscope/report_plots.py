"""Plots of `rankscope report` (matplotlib, Agg): one PNG per figure, grouped by method and size.

Curves are the mean over seeds with a min–max band; ReLoRA merge-and-restarts are dotted
vertical lines on every time axis. The paper's reference numbers get their own figure, titled as
the paper's (Weiss et al. 2025), never drawn on the same axes as this study's runs.
"""

from __future__ import annotations

import base64
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np

PAPER_COMPONENTS = ("wv", "wo", "ov", "w2")  # Weiss et al. 2025, §4: attention V, O, OV circuit, SwiGLU down
OTHER_COMPONENTS = ("wq", "wk", "w1", "w3")
COMPONENT_NAMES = {"wv": "attn V", "wo": "attn O", "ov": "OV circuit (per head, hd x hd)",
                   "ov_layer": "OV circuit (per layer)", "ov_product": "O_h V_g (d x d)", "w2": "SwiGLU down (w2)", "wq": "attn Q", "wk": "attn K", "w1": "SwiGLU gate (w1)", "w3": "SwiGLU up (w3)"}
METHOD_COLOURS = {"full": "tab:blue", "relora": "tab:orange", "lora": "tab:green"}
METRIC_NAMES = {"per": "PER", "cond": "condition number"}
FLOOR = 1e-4  # spectra plots: smaller s_i / s_max drawn here (the OV circuit's beyond rank head_dim are ~1e-16)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colour(method: str) -> str:
    return METHOD_COLOURS.get(method, "tab:gray")


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=80)
    _plt().close(fig)
    return path


# --------------------------------------------------------------------------- series
def mean_band(series: list[dict[float, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x, mean, min, max over the series (seeds) at the x values every series has."""
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not common:
        return (np.array([]),) * 4
    ys = np.array([[s[x] for x in common] for s in series])
    return np.array(common), ys.mean(0), ys.min(0), ys.max(0)


def loss_series(run, key: str) -> dict[float, float]:
    return {float(r["tokens"]): float(r[key]) for r in run.rows if key in r and "tokens" in r and r[key] is not None and math.isfinite(r[key])}


def rank_series(run, use_analysis: bool = True) -> tuple[dict[tuple[str, str], dict[float, float]], str]:
    """(metric per|cond, component) -> {step: value} (mean over layers and heads) and the source:
    the analysis table of the run's checkpoints (weights) when `rankscope analyze` ran, else the
    in-loop rows `rank/<metric>/<component>` of metrics.jsonl."""
    path = run.dir / "analysis" / "rank_metrics.parquet"
    out: dict[tuple[str, str], dict[float, float]] = {}
    if use_analysis and path.is_file():
        from rankscope.analysis.run import load_table

        t = load_table(path)
        acc: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for name, step, comp, kind, metric, v in zip(t["run"], t["step"], t["component"], t["kind"], t["metric"], t["value"]):
            if name != run.name or kind != "weight" or v is None or not math.isfinite(v):
                continue
            cond = "condition_number_numerical" if comp == "ov_product" else "condition_number"  # O_h V_g: rank <= head_dim
            m = "per" if metric == "per" else "cond" if metric == cond else None
            if m:
                acc[(m, comp)][step].append(v)
        out = {k: {float(s): float(np.mean(v)) for s, v in d.items()} for k, d in acc.items()}
        if out:
            return out, str(path)
    for r in run.rows:
        for k, v in r.items():
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == "rank" and parts[1] in ("per", "cond") and isinstance(v, (int, float)) and math.isfinite(v):
                out.setdefault((parts[1], parts[2]), {})[float(r["step"])] = float(v)
    return out, f"{run.dir / 'metrics.jsonl'} (in-loop rank/* rows)"


def analysed(runs) -> bool:
    """Use the analysis tables only when every run has one: seeds must be averaged at the same steps."""
    return all((r.dir / "analysis" / "rank_metrics.parquet").is_file() for r in runs)


def rank_summary(runs, groups) -> dict[str, dict[tuple[str, str], dict[str, tuple[list[float], list[float]]]]]:
    """metric -> (size, component) -> method -> (steps, mean over seeds)."""
    out: dict[str, dict] = {"per": defaultdict(dict), "cond": defaultdict(dict)}
    use = analysed(runs)
    for method, size in groups:
        members = [rank_series(r, use)[0] for r in runs if r.group == (method, size)]
        for key in sorted({k for m in members for k in m}):
            x, mean, _, _ = mean_band([m[key] for m in members if key in m])
            if len(x):
                out[key[0]][(size, key[1])][method] = (x.tolist(), mean.tolist())
    return {k: dict(v) for k, v in out.items()}


def _restarts(ax, runs, groups, size: str, x: str) -> None:
    """Dotted vertical lines at the ReLoRA merges of this size (x = 'step' or 'tokens')."""
    for method, s in groups:
        if s != size:
            continue
        members = [r for r in runs if r.group == (method, s)]
        marks = members[0].merge_steps() if members else []
        for i, (step, tokens) in enumerate(marks):
            ax.axvline(step if x == "step" else tokens, color=colour(method), ls=":", lw=0.8, alpha=0.6, label=f"{method} restart" if i == 0 else None)


# --------------------------------------------------------------------------- figures
def _tokens(v: float, _pos=None) -> str:
    return f"{v / 1e9:g}B" if abs(v) >= 1e9 else f"{v / 1e6:g}M" if abs(v) >= 1e6 else f"{v / 1e3:g}k" if abs(v) >= 1e3 else f"{v:g}"


def plot_losses(runs, groups, path: Path) -> Path | None:
    sizes = list(dict.fromkeys(g[1] for g in groups))
    plt = _plt()
    width = 5.2 * len(sizes) + 0.6
    fig, axes = plt.subplots(2, len(sizes), figsize=(width, 6.4), squeeze=False)
    drawn = False
    for c, size in enumerate(sizes):
        for r, (key, label) in enumerate((("train_loss", "train loss"), ("val_loss", "validation loss"))):
            ax = axes[r][c]
            tail = []
            for method, s in groups:
                if s != size:
                    continue
                members = [m for m in runs if m.group == (method, s)]
                x, mean, lo, hi = mean_band([loss_series(m, key) for m in members])
                if not len(x):
                    continue
                drawn = True
                ax.plot(x, mean, color=colour(method), lw=1.4, label=f"{method} (n={len(members)})")
                ax.fill_between(x, lo, hi, color=colour(method), alpha=0.2, lw=0)
                tail.extend(hi[x >= 0.1 * x[-1]].tolist() + lo.tolist())
            _restarts(ax, runs, groups, size, "tokens")
            if tail:  # the first 10% of training (loss ~ ln V) would flatten the rest of the curve
                ax.set_ylim(min(tail) - 0.05, max(tail) + 0.05)
            ax.set_title(f"{size}: {label}", fontsize=10)
            ax.xaxis.set_major_formatter(_plt().FuncFormatter(_tokens))
            ax.set_xlabel("tokens")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        return None
    fig.subplots_adjust(left=0.75 / width, right=0.98, top=0.94, bottom=0.08, hspace=0.35, wspace=0.22)
    return _save(fig, path)


def plot_rank(runs, groups, metric: str, components: tuple[str, ...], path: Path) -> tuple[Path | None, str]:
    series = {r.name: rank_series(r, analysed(runs)) for r in runs}
    present = [c for c in components if any((metric, c) in s[0] for s in series.values())]
    sizes = list(dict.fromkeys(g[1] for g in groups))
    if not present:
        return None, ""
    sources = sorted({"analysis tables (checkpoint weights)" if src.endswith(".parquet") else "in-loop metrics.jsonl rows" for s, src in series.values()})
    plt = _plt()
    width, height = 5.2 * len(sizes) + 0.6, 2.5 * len(present) + 0.6
    fig, axes = plt.subplots(len(present), len(sizes), figsize=(width, height), squeeze=False, sharex="col")
    for c, size in enumerate(sizes):
        for r, comp in enumerate(present):
            ax = axes[r][c]
            for method, s in groups:
                if s != size:
                    continue
                members = [series[m.name][0][(metric, comp)] for m in runs if m.group == (method, s) and (metric, comp) in series[m.name][0]]
                x, mean, lo, hi = mean_band(members)
                if len(x):
                    ax.plot(x, mean, color=colour(method), lw=1.4, marker=".", ms=3, label=method)
                    ax.fill_between(x, lo, hi, color=colour(method), alpha=0.2, lw=0)
            _restarts(ax, runs, groups, size, "step")
            if metric == "cond":
                ax.set_yscale("log")
            ax.set_title(f"{size}: {COMPONENT_NAMES.get(comp, comp)}", fontsize=9)
            ax.set_ylabel(METRIC_NAMES[metric], fontsize=8)
            ax.grid(alpha=0.3)
            if r == 0 and c == 0:
                ax.legend(fontsize=7)
        axes[-1][c].set_xlabel("step")
    fig.subplots_adjust(left=0.8 / width, right=0.98, top=1 - 0.35 / height, bottom=0.6 / height, hspace=0.45, wspace=0.22)
    return _save(fig, path), ", ".join(sources)


def plot_blimp(runs, groups, path: Path) -> Path | None:
    from rankscope.report import cell

    phen = sorted({k for r in runs for k in (*r.summary, *r.eval) if k.startswith("blimp/")})
    keys = phen + (["blimp_overall"] if any(r.value("blimp_overall")[0] is not None for r in runs) else [])
    if not keys:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(keys) + 2), 4.2))
    width = 0.8 / len(groups)
    hatches = ["", "//", "..", "xx"]
    sizes = list(dict.fromkeys(g[1] for g in groups))
    for i, g in enumerate(groups):
        members = [r for r in runs if r.group == g]
        cells = [cell(members, k) for k in keys]
        x = np.arange(len(keys)) + (i - (len(groups) - 1) / 2) * width
        mean = [c["mean"] if c else np.nan for c in cells]
        err = [c["std"] if c and c["std"] is not None else 0 for c in cells]
        ax.bar(x, mean, width, yerr=err, color=colour(g[0]), hatch=hatches[sizes.index(g[1]) % len(hatches)], edgecolor="black", lw=0.4,
               alpha=0.85, capsize=1.5, label=f"{g[0]} / {g[1]}")
    ax.axhline(0.5, color="k", lw=0.8, ls="--", label="chance")
    ax.set_xticks(np.arange(len(keys)), [k.removeprefix("blimp/").replace("_", " ") if k != "blimp_overall" else "OVERALL" for k in keys], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("BLiMP per phenomenon (this study; mean over seeds, bars = std)", fontsize=10)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.subplots_adjust(left=0.07, right=0.99, top=0.92, bottom=0.3)
    return _save(fig, path)


def plot_spectra(runs, groups, path: Path, steps: list[int] | None = None) -> Path | None:
    from rankscope.analysis.run import load_table

    acc: dict[tuple, list[np.ndarray]] = defaultdict(list)  # (group, comp, step) -> normalised spectra
    for r in runs:
        p = r.dir / "analysis" / "spectra.parquet"
        if not p.is_file():
            continue
        t = load_table(p)
        cur: dict[tuple, list[float]] = defaultdict(list)
        for name, step, layer, comp, head, kind, v in zip(t["run"], t["step"], t["layer"], t["component"], t["head"], t["kind"], t["value"]):
            if name == r.name and kind == "weight" and comp in PAPER_COMPONENTS:
                cur[(comp, step, layer, head)].append(v)
        for (comp, step, _, _), s in cur.items():
            s = np.asarray(s)
            if s[0] > 0:
                acc[(r.group, comp, step)].append(s / s[0])
    if not acc:
        return None
    have = sorted({k[2] for k in acc})
    chosen = [min(have, key=lambda h: abs(h - s)) for s in steps] if steps else [have[int(i)] for i in np.linspace(0, len(have) - 1, min(3, len(have)))]
    chosen = sorted(set(chosen))
    comps = [c for c in PAPER_COMPONENTS if any(k[1] == c for k in acc)]
    plt = _plt()
    width, height = 3.4 * len(groups) + 0.8, 2.3 * len(comps) + 0.7
    fig, axes = plt.subplots(len(comps), len(groups), figsize=(width, height), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for c, g in enumerate(groups):
        for r, comp in enumerate(comps):
            ax = axes[r][c]
            for j, step in enumerate(chosen):
                ss = acc.get((g, comp, step))
                if ss and len({len(s) for s in ss}) == 1:
                    mean = np.mean(np.stack(ss), axis=0)
                    ax.plot(np.arange(1, len(mean) + 1), np.clip(mean, FLOOR, None), color=cmap(j / max(1, len(chosen) - 1) * 0.9), lw=1.3, label=f"step {step}")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.set_title(f"{g[0]} / {g[1]}: {COMPONENT_NAMES[comp]}", fontsize=8)
            if c == 0:
                ax.set_ylabel("s_i / s_max", fontsize=8)
            if r == len(comps) - 1:
                ax.set_xlabel("index i", fontsize=8)
            if r == 0 and c == 0:
                ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.75 / width, right=0.99, top=1 - 0.4 / height, bottom=0.5 / height, hspace=0.5, wspace=0.35)
    return _save(fig, path)


def plot_paper_reference(path: Path) -> Path:
    from rankscope.report import PAPER_REFERENCE as ref

    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.5, 3.4), gridspec_kw={"width_ratios": [2, 1]})
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
    fig.subplots_adjust(left=0.09, right=0.98, top=0.83, bottom=0.1, wspace=0.35)
    return _save(fig, path)


def figures(runs, groups, out: Path, spectra_steps: list[int] | None = None) -> Iterator[tuple[str, Path | None, str]]:
    """(title, png or None, caption) of every figure of the report."""
    band = "Mean over seeds, band = min–max over seeds; dotted vertical lines: ReLoRA merge-and-restarts."
    yield "Loss vs tokens", plot_losses(runs, groups, out / "loss_vs_tokens.png"), band + " Y-axis starts after the first 10% of training."
    yield "BLiMP per phenomenon", plot_blimp(runs, groups, out / "blimp_phenomena.png"), "Accuracy per BLiMP phenomenon (mean over its paradigms) and overall; error bars: std over seeds; dashed: chance (0.5). Hatching marks the model size."
    for metric in ("per", "cond"):
        for label, comps in (("the paper's components (V, O, OV, w2)", PAPER_COMPONENTS), ("the other components (Q, K, w1, w3)", OTHER_COMPONENTS)):
            tag = "paper" if comps is PAPER_COMPONENTS else "other"
            png, src = plot_rank(runs, groups, metric, comps, out / f"rank_{metric}_{tag}.png")
            extra = " OV: condition number over its numerical rank (the d x d circuit has rank <= head_dim)." if metric == "cond" else ""
            yield f"{METRIC_NAMES[metric]} vs step: {label}", png, f"{band} Mean over layers (and heads). Source: {src}.{extra}"
    yield "Singular-value spectra", plot_spectra(runs, groups, out / "spectra.png", spectra_steps), f"s_i / s_max of the weights at chosen checkpoints, mean over layers, heads and seeds (from RUN/analysis/spectra.parquet); values below {FLOOR:g} are drawn at {FLOOR:g} (the OV circuit has rank <= head_dim)."
