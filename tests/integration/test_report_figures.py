"""Report figures: small-multiple grids (rows = sizes, columns = components) whose every text lies
inside the canvas at the size the report shows them, and a report page that escapes every value."""

import json
import math

import matplotlib
import numpy as np

matplotlib.use("Agg")

from rankscope.reports import plots as P# noqa: E402
from rankscope.reports.report import write_report  # noqa: E402
from rankscope.reports.runs import Run  # noqa: E402

COMPONENTS = ("wq", "wk", "wv", "wo", "ov", "ov_layer", "ov_product", "w1", "w2", "w3", "custom_x")


def fake_runs(tmp_path, sizes=("micro", "mini"), methods=("full", "relora"), seeds=(0, 1), steps=60):
    """Runs held in memory: metrics.jsonl-style rows with losses and in-loop rank/* metrics."""
    runs = []
    for size in sizes:
        for method in methods:
            for seed in seeds:
                rows = []
                for step in range(5, steps + 1, 5):
                    row = {"step": step, "tokens": step * 2048, "train_loss": 7 / math.log(step + 2) + 0.01 * seed,
                           "val_loss": 7.2 / math.log(step + 2), "val_bpb_macro": 4 / math.log(step + 2)}
                    for i, c in enumerate(COMPONENTS):
                        row[f"rank/per/{c}"] = 0.9 - 0.003 * step * (1 + i / 10) - 0.01 * seed
                        row[f"rank/cond/{c}"] = 7.75 * 10 ** (1 + step / 20 + i / 5)  # spans decades, like the paper's
                    if method == "relora" and step % 20 == 0:
                        row["relora_merge"] = 1
                    rows.append(row)
                runs.append(Run(tmp_path, f"{method}-{size}-{seed}", method, size, seed, {}, {}, {}, rows))
    return runs


def assert_inside(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    box = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)  # every drawn artist, tick labels included
    assert box.x0 >= -0.5 and box.y0 >= -0.5 and box.x1 <= canvas.width + 0.5 and box.y1 <= canvas.height + 0.5, (box, canvas)
    texts = list(fig.texts) + [t for leg in fig.legends for t in leg.get_texts()]  # suptitle, figure legends
    texts += [t for a in fig.axes for t in (a.title, a._left_title, a._right_title, a.xaxis.label, a.yaxis.label)]
    texts += [t for a in fig.axes if a.get_legend() for t in a.get_legend().get_texts()]
    for ax in fig.axes:  # the tick labels matplotlib draws: those of ticks inside the view limits
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            texts += [t for loc, t in zip(axis.get_majorticklocs(), axis.get_majorticklabels()) if lo <= loc <= hi]
    checked = 0
    for t in texts:
        if not (t.get_visible() and t.get_text()):
            continue
        bb = t.get_window_extent(renderer)
        assert bb.x0 >= -0.5 and bb.y0 >= -0.5 and bb.x1 <= canvas.x1 + 0.5 and bb.y1 <= canvas.y1 + 0.5, (t.get_text(), bb, canvas)
        checked += 1
    assert checked > 10


def test_rank_figures_are_size_by_component_grids_in_the_paper_order(tmp_path):
    runs = fake_runs(tmp_path)
    groups = sorted({r.group for r in runs}, key=lambda g: (g[1] != "micro", g[0]))
    paper, other = P.rank_components(runs)
    assert paper == ["wv", "wo", "ov", "ov_layer", "w2"]
    assert other == ["wq", "wk", "w1", "w3", "ov_product", "custom_x"]  # unknown names are data too
    for metric in ("per", "cond"):
        for comps in (paper, other):
            fig = P.rank_figure(runs, groups, metric, comps)
            axes = fig.axes
            assert len(axes) == 2 * len(comps)  # rows = 2 sizes, columns = components
            assert [a.get_title() for a in axes[: len(comps)]] == [P.component_name(c) for c in comps]
            if metric == "cond":
                assert axes[0].get_yscale() == "log"
                labels = [t.get_text() for t in axes[0].get_yticklabels() if t.get_text()]
                assert labels and all("\\times" not in s and "^" not in s for s in labels)  # plain numbers, no 7.75x10^1
            assert_inside(fig)
            P._plt().close(fig)


def test_loss_figure_fits_and_marks_merges(tmp_path):
    runs = fake_runs(tmp_path)
    groups = sorted({r.group for r in runs})
    fig = P.loss_figure(runs, groups)
    assert len(fig.axes) == 2 * 3 and fig.axes[0].get_xscale() == "log"
    assert any(line.get_linestyle() == ":" for line in fig.axes[0].get_lines())  # a ReLoRA merge
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "min–max over seeds" in legend and any(s.startswith("relora") for s in legend)
    assert_inside(fig)
    P._plt().close(fig)


MARKUP = "<img src=x onerror=alert(1)>"


def test_every_field_of_the_report_is_escaped(tmp_path):
    """Markup in a run name, a config value, a metric name, a sweep status and error never reaches the page raw."""
    study = tmp_path / "study"
    names = []
    for i, method in enumerate(("full", "relora")):
        name = f"{MARKUP}{method}"
        d = study / name
        d.mkdir(parents=True)
        cfg = {"method": {"name": method}, "model": {"preset": "micro"}, "train": {"seed": 0, "eval_batches": 8},
               "data": {"corpus": f"{MARKUP}{i}"}}  # differs between runs: joins the size label
        d.joinpath("config.yaml").write_text(json.dumps(cfg))
        d.joinpath("summary.json").write_text(json.dumps({"final_train_loss": 5.0 + i, "final_val_loss": 5.1 + i,
                                                          f"blimp/{MARKUP}": 0.5, "blimp_overall": 0.5, f"val_bpb/{MARKUP}": 2.0}))
        d.joinpath("metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 10, "train_loss": 6.0}) + "\n")
        names.append(name)
    sweep = {"runs": [{"name": n, "run_dir": str(study / n), "status": "done"} for n in names]
             + [{"name": f"{MARKUP}broken", "run_dir": str(study / "nope"), "status": MARKUP, "error": f"error: {MARKUP}"}]}
    (study / "sweep.json").write_text(json.dumps(sweep))
    write_report([study], tmp_path / "out", log=lambda *_: None)
    page = (tmp_path / "out" / "report.html").read_text()
    assert MARKUP not in page and "<img src=x" not in page
    escaped = "&lt;img src=x onerror=alert(1)&gt;"
    assert page.count(escaped) >= 6  # run names, config label, metric names, status and error all shown, escaped
    for where in (f"{escaped}full", f"corpus={escaped}", f"blimp/{escaped}", f"val_bpb/{escaped}", f"error: {escaped}"):
        assert where in page, where


# --------------------------------------------------------------------------- issue 23: sizes, spectra grid, legend, layout
def fabricated_study(root, shapes, methods=("full", "relora"), seeds=(0,), steps=8):
    """Run folders as `rankscope train` leaves them (config.yaml, summary.json, metrics.jsonl), no training:
    shapes maps a folder tag to a model section (a preset, maybe with a field overridden), written out in full as train does."""
    from rankscope.config import PRESETS

    dirs = []
    for tag, model in shapes.items():
        for method in methods:
            for seed in seeds:
                d = root / f"{method}-{tag}-s{seed}"
                d.mkdir(parents=True)
                cfg = {"method": {"name": method}, "model": {**PRESETS[model["preset"]], **model}, "train": {"seed": seed, "eval_batches": 8}}
                d.joinpath("config.yaml").write_text(json.dumps(cfg))
                d.joinpath("summary.json").write_text(json.dumps({"final_train_loss": 5.0 + seed, "final_val_loss": 5.1, "blimp_overall": 0.5}))
                rows = [{"step": s, "tokens": 256 * s, "train_loss": 7 / math.log(s + 2)} for s in range(1, steps + 1)]
                d.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
                dirs.append(d)
    return dirs


def test_sizes_are_ordered_by_body_parameters_with_labels_kept(tmp_path):
    """A preset narrowed by an override (`d32-L4`) is smaller than the preset: tables and figures list it first."""
    from rankscope.studies.findings import size_order
    from rankscope.reports.runs import collect
    from rankscope.reports.tables import group_order

    shapes = {"mini": {"preset": "mini"}, "micro": {"preset": "micro"}, "d48": {"preset": "micro", "d_model": 48},
              "d32": {"preset": "micro", "d_model": 32}}
    dirs = fabricated_study(tmp_path / "runs", shapes)
    runs, _ = collect(dirs)
    assert size_order(runs) == ["d32-L4", "d48-L4", "micro", "mini"]  # old order: micro, mini, d32-L4, d48-L4
    assert [g[1] for g in group_order(runs)][::2] == ["d32-L4", "d48-L4", "micro", "mini"]
    write_report(dirs, tmp_path / "out", log=lambda *_: None)
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    head = next(t for t in data["tables"] if t["title"].startswith("Headline"))
    labels = [r["label"] for r in head["rows"]]
    assert [next(s for s in ("d32-L4", "d48-L4", "micro", "mini") if s in lab) for lab in labels][::2] == ["d32-L4", "d48-L4", "micro", "mini"]


def test_band_legend_only_where_a_group_has_two_runs(tmp_path):
    def legend(runs):
        groups = sorted({r.group for r in runs})
        fig = P.loss_figure(runs, groups)
        texts = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
        P._plt().close(fig)
        return texts

    assert P.BAND not in legend(fake_runs(tmp_path, sizes=("micro",), seeds=(0,)))  # one run each: no band to name
    assert P.BAND in legend(fake_runs(tmp_path, sizes=("micro",), seeds=(0, 1)))
    one = fake_runs(tmp_path, sizes=("micro",), seeds=(0,))
    captions = [c for _, _, c in P.figures(one, sorted({r.group for r in one}), tmp_path)]
    assert not any(P.BAND in c for c in captions) and "no band" in captions[0]


def test_val_loss_panel_has_its_own_token_range(tmp_path):
    """Validation starts at step 30 (merges at 20): its panel starts near the first validation point, with every point shown."""
    runs = fake_runs(tmp_path, sizes=("micro",), seeds=(0, 1))
    for r in runs:
        for row in r.rows:
            if row["step"] < 30:
                del row["val_loss"]
    fig = P.loss_figure(runs, sorted({r.group for r in runs}))
    train_ax, val_ax = fig.axes[0], fig.axes[1]
    first_val, last = 30 * 2048, 60 * 2048
    lo, hi = val_ax.get_xlim()
    assert first_val / 1.5 < lo <= first_val and hi >= last  # no blank left of the first point, nothing hidden
    assert train_ax.get_xlim()[0] <= 5 * 2048
    P._plt().close(fig)


def test_spectra_panels_fill_the_width_with_one_tick_label_size():
    from rankscope.analysis.plots import spectra_figure, spectra_layout

    assert spectra_layout(5, 1) == (2, 3, True)  # one group's five components: 2 x 3, not one column of 5
    assert spectra_layout(5, 2)[:2] == (3, 4)
    assert spectra_layout(5, 6) == (5, 6, False)
    rng = np.random.default_rng(0)
    acc = {("full / micro", comp, step): [np.sort(rng.uniform(0.3, 1, 16))[::-1]] for comp in ("wv", "wo", "ov", "ov_layer", "w2")
           for step in (10, 100)}  # spectra within one decade: matplotlib labels minor log ticks
    fig = spectra_figure(acc, ["full / micro"], floor=1e-4)
    visible = [a for a in fig.axes if a.get_visible()]
    assert len(visible) == 5 and len({round(a.get_position().y0, 3) for a in visible}) == 2  # two rows
    assert fig.get_size_inches()[0] >= 8  # fills the page's width
    fig.canvas.draw()
    sizes = {t.get_fontsize() for a in visible for t in a.yaxis.get_ticklabels(which="both") if t.get_visible() and t.get_text()}
    assert len(sizes) == 1, sizes  # minor (2x10^-1) and major labels alike
    assert_inside(fig)
    P._plt().close(fig)


def test_report_leads_with_summary_and_key_figures_and_collapses_long_tables(tmp_path):
    from rankscope.reports.report import summary_tables

    dirs = fabricated_study(tmp_path / "runs", {"micro": {"preset": "micro"}}, seeds=(0, 1))
    write_report(dirs, tmp_path / "out", log=lambda *_: None)
    page = (tmp_path / "out" / "report.html").read_text()
    order = [page.index(s) for s in ("<h3>Headline", 'alt="Loss vs tokens"', 'class="paper"', "<summary>Every run")]
    assert order == sorted(order), order
    assert "<h3>Every run" not in page.split("<details")[0]  # the long tables only inside <details>
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.index("### Headline") < md.index("![Loss vs tokens]") < md.index("### Every run")
    # with findings: the primary rows lead; the per-seed table goes with the long tables
    find = {"title": "Findings: rules", "columns": ["finding"], "rows": [{"label": "a"}, {"label": "b"}, {"label": "c"}], "formats": []}
    per_seed = {"title": "Paired differences per seed (x)", "rows": []}
    head, other = {"title": "Headline: x", "rows": []}, {"title": "Every run", "rows": []}
    summary, short, rest = summary_tables([{"title": "Scale"}, find, per_seed], [{"primary": True}, {"primary": False}, {"primary": True}],
                                          [head, other])
    assert [r["label"] for r in summary[0]["rows"]] == ["a", "c"] and summary[1] is head
    assert per_seed not in short and find not in short and {"title": "Scale"} in short and rest == [other]
