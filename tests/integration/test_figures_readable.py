"""Figures a reader can read: tick labels that do not overlap, no one-dot panels, y-axes that do not zoom into
noise, lines that lie on each other both visible, and update / gradient PER beside the weights'."""

from __future__ import annotations

import itertools
import math

import matplotlib
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

matplotlib.use("Agg")

from rankscope.reports import plots as P# noqa: E402
from rankscope.reports.runs import Run  # noqa: E402
from test_report_figures import fake_runs  # noqa: E402


def tick_labels(ax):
    """The tick labels drawn: major and minor, inside the view limits, with text."""
    out = []
    for axis in (ax.xaxis, ax.yaxis):
        lo, hi = sorted(axis.get_view_interval())
        for ticks in (axis.get_major_ticks(), axis.get_minor_ticks()):
            for t in ticks:
                label = t.label1
                if lo <= t.get_loc() <= hi and label.get_visible() and label.get_text():
                    out.append((axis.axis_name, label))
    return out


def assert_no_overlap(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        labels = tick_labels(ax)
        for name in ("x", "y"):
            boxes = [(lab.get_text(), lab.get_window_extent(renderer)) for n, lab in labels if n == name]
            for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
                assert not a.overlaps(b), f"{name} tick labels {ta!r} and {tb!r} overlap"


def runs_over_tokens(tmp_path, first: int, last: int, n: int = 40):
    """Two methods whose rows span tokens first..last (log-spaced), like a demo's 2k..200k."""
    runs = []
    for method in ("full", "relora"):
        for seed in (0, 1):
            rows = []
            for i in range(n):
                tokens = first * (last / first) ** (i / (n - 1))
                rows.append({"step": i + 1, "tokens": tokens, "train_loss": 6 - math.log(tokens) / 5 + 0.01 * seed,
                             "val_loss": 6.1 - math.log(tokens) / 5})
            rows[-1]["val_bpb_macro"] = 3.0 + 0.01 * seed  # the final evaluation only: one dot
            runs.append(Run(tmp_path, f"{method}-{seed}", method, "micro", seed, {}, {}, {}, rows))
    return runs


@pytest.mark.parametrize("first, last", [(2048, 204800), (2048, 2e6), (40000, 120000), (1e5, 3e5)])
def test_token_ticks_do_not_overlap_and_read_as_100k_and_1M(tmp_path, first, last):
    runs = runs_over_tokens(tmp_path, first, last)
    fig = P.loss_figure(runs, sorted({r.group for r in runs}))
    assert_no_overlap(fig)
    texts = [lab.get_text() for ax in fig.axes for n, lab in tick_labels(ax) if n == "x"]
    assert texts and not any("e+" in t or "^" in t for t in texts), texts
    if last >= 1e6:
        assert "1M" in texts
    if first <= 1e5 <= last:
        assert "100k" in texts
    P._plt().close(fig)


def test_a_quantity_logged_once_is_not_a_one_dot_panel(tmp_path):
    runs = runs_over_tokens(tmp_path, 2048, 204800)
    fig = P.loss_figure(runs, sorted({r.group for r in runs}))
    assert [a.get_title() for a in fig.axes] == ["train loss", "val loss (8-batch est.)"]
    P._plt().close(fig)


def test_rank_figures_have_readable_ticks_and_a_minimum_span(tmp_path):
    runs = fake_runs(tmp_path)
    groups = sorted({r.group for r in runs})
    for metric in ("per", "cond"):
        fig = P.rank_figure(runs, groups, metric, ["wv", "wo", "ov", "w2"])
        assert_no_overlap(fig)
        P._plt().close(fig)
    flat = fake_runs(tmp_path, sizes=("micro",))
    for r in flat:  # PER constant to 1e-5: noise, drawn flat
        for i, row in enumerate(r.rows):
            row["rank/per/wv"] = 0.5 + 1e-5 * (i % 2)
    fig = P.rank_figure(flat, sorted({r.group for r in flat}), "per", ["wv"])
    lo, hi = fig.axes[0].get_ylim()
    assert hi - lo >= P.MIN_SPAN["per"] - 1e-12
    P._plt().close(fig)


def test_a_line_on_top_of_another_stays_visible(tmp_path):
    runs = fake_runs(tmp_path, sizes=("micro",), methods=("full", "relora"))
    for r in runs:
        if r.method == "relora":
            for row in r.rows:
                row["rank/per/wv"] -= 0.1  # relora differs from full ...
    twins = [Run(tmp_path, r.name + "-control", "relora (control)", r.size, r.seed, {}, {}, {}, r.rows)
             for r in runs if r.method == "relora"]  # ... its control is the same runs

    runs += twins
    fig = P.rank_figure(runs, sorted({r.group for r in runs}), "per", ["wv"])
    styles = [line.get_linestyle() for line in fig.axes[0].get_lines() if len(line.get_xdata()) > 2]
    assert styles.count("-") == 2 and styles.count("--") == 1, styles
    P._plt().close(fig)


def test_update_and_gradient_per_are_drawn_beside_the_weights(tmp_path):
    runs = fake_runs(tmp_path, sizes=("micro",))
    for r in runs:
        cols = {c: [] for c in ("run", "step", "component", "kind", "metric", "value")}
        for step in (1, 3, 8, 20, 40, 60):
            for kind in ("weight", "update", "cumulative_update", "grad"):
                for comp in ("wv", "wo", "w2"):
                    for metric, v in (("per", 0.3 + step / 200), ("condition_number", 10.0 + step)):
                        for c, x in zip(cols, (r.name, step, comp, kind, metric, v)):
                            cols[c].append(x)
        (r.dir / "analysis").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), r.dir / "analysis" / "rank_metrics.parquet")
        r.dir = r.dir  # every run reads the same folder's table, filtered by its name
    assert P.rank_kinds(runs) == ["weight", "update", "cumulative_update", "grad"]
    titles = [t for t, png, _ in P.figures(runs, sorted({r.group for r in runs}), tmp_path) if png is not None]
    for kind in ("updates between checkpoints", "cumulative updates", "gradients"):
        assert any(f"PER of {kind}" in t for t in titles), titles
        assert any(f"condition number of {kind}" in t for t in titles), titles
