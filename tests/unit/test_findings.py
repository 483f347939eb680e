import math

import numpy as np
import pytest

from helpers import write_rank_table
from rankscope.studies import stats
from rankscope.core.errors import ConfigError
from rankscope.studies.findings import OPPOSITE, PAPER_RULES, decide, evaluate_findings, findings_tables, validate_findings, verdict_counts
from rankscope.reports.runs import Run
from rankscope.reports.tables import _md_table, table_view

PARAMS = {"micro": 508_480, "milli": 1_070_112, "mini": 2_524_800}


def run(tmp_path, method, size, seed, **summary):
    d = tmp_path / f"{method}-{size}-{seed}"
    d.mkdir(exist_ok=True)
    return Run(d, d.name, method, size, seed, {"train": {"max_steps": 400}}, {"parameters": PARAMS[size], **summary})


def spec(*rules, **extra):
    return validate_findings({"rules": list(rules), **extra})


# ------------------------------------------------------------------ the verdict rule at its boundaries
@pytest.mark.parametrize(
    "lo,hi,claim,m,verdict",
    [
        (0.01, 0.2, "higher", 0.0, "confirmed"),
        (0.0, 0.2, "higher", 0.0, "inconclusive"),  # touching 0 is not "entirely above"
        (-0.2, -0.01, "higher", 0.0, OPPOSITE),
        (-0.2, 0.0, "higher", 0.0, "inconclusive"),
        (-0.1, 0.1, "higher", 0.0, "inconclusive"),
        (0.05, 0.2, "higher", 0.05, "inconclusive"),  # at the minimum effect: not beyond it
        (0.0501, 0.2, "higher", 0.05, "confirmed"),
        (0.01, 0.2, "higher", 0.05, "inconclusive"),  # above 0, not above the minimum effect
        (-0.2, -0.01, "lower", 0.0, "confirmed"),
        (-0.2, 0.0, "lower", 0.0, "inconclusive"),
        (0.0001, 0.2, "lower", 0.0, OPPOSITE),
        (-0.2, -0.05, "lower", 0.05, "inconclusive"),
        (-0.2, -0.0501, "lower", 0.05, "confirmed"),
    ],
)
def test_decide_at_its_boundaries(lo, hi, claim, m, verdict):
    assert decide(lo, hi, claim, m, n=3)[0] == verdict


def test_decide_needs_two_points():
    assert decide(None, None, "higher", 0.0, n=1)[0] == "inconclusive"
    assert decide(0.1, 0.2, "higher", 0.0, n=1)[0] == "inconclusive"


# ------------------------------------------------------------------ paired rules
def test_paired_rule_confirms_refutes_and_matches_the_t_interval(tmp_path):
    from scipy import stats as ss

    full = [4.00, 4.10, 3.95]
    rel = [4.12, 4.19, 4.10]
    runs = [run(tmp_path, "full", "micro", k, final_val_loss=v) for k, v in enumerate(full)]
    runs += [run(tmp_path, "relora", "micro", k, final_val_loss=v) for k, v in enumerate(rel)]
    higher = {"id": "a", "finding": "a", "test": "paired", "metric": "final_val_loss", "claim": "higher"}
    (res,) = evaluate_findings(runs, spec(higher))
    ci = ss.ttest_rel(rel, full).confidence_interval()
    assert res["verdict"] == "confirmed" and res["n"] == 3
    assert (res["lo"], res["hi"]) == pytest.approx((ci.low, ci.high)) and res["per_seed"]["1"] == pytest.approx(0.09)
    (res,) = evaluate_findings(runs, spec({**higher, "claim": "lower"}))
    assert res["verdict"] == OPPOSITE
    (res,) = evaluate_findings(runs, spec({**higher, "min_effect": 0.5}))
    assert res["verdict"] == "inconclusive"


def test_missing_metric_or_method_is_reported_not_dropped(tmp_path):
    runs = [run(tmp_path, "full", "micro", 0, final_val_loss=4.0), run(tmp_path, "relora", "micro", 0, final_val_loss=4.1),
            run(tmp_path, "full", "mini", 0, final_val_loss=3.5)]
    rule = {"id": "a", "finding": "a", "test": "paired", "metric": "blimp_overall", "claim": "lower"}
    res = evaluate_findings(runs, spec(rule))
    assert [r["size"] for r in res] == ["micro", "mini"]
    assert all(r["verdict"] == "not measured" for r in res)
    assert "blimp_overall" in res[0]["reason"] and "no finished relora runs at mini" in res[1]["reason"]
    (one,) = evaluate_findings(runs[:2], spec({**rule, "metric": "final_val_loss", "claim": "higher"}))
    assert one["verdict"] == "inconclusive" and "n = 1" in one["reason"]


@pytest.mark.parametrize("full,rel,verdict", [([0.51, 0.52, 0.50], [0.49, 0.50, 0.48], "inconclusive"),
                                               ([0.70, 0.72, 0.71], [0.60, 0.61, 0.62], "confirmed")])
def test_blimp_near_chance_is_not_testable(tmp_path, full, rel, verdict):
    runs = [run(tmp_path, "full", "micro", k, blimp_overall=v) for k, v in enumerate(full)]
    runs += [run(tmp_path, "relora", "micro", k, blimp_overall=v) for k, v in enumerate(rel)]
    rule = {"id": "c", "finding": "c", "test": "paired", "metric": "blimp_overall", "claim": "lower", "chance": 0.5, "margin": 0.05}
    (res,) = evaluate_findings(runs, spec(rule))
    assert res["verdict"] == verdict
    assert res["chance"]["means"]["full"] == pytest.approx(sum(full) / 3)
    if verdict == "inconclusive":  # even though the interval alone lies below 0
        assert res["hi"] < 0 and res["reason"].startswith("not testable at this scale")
    else:
        assert "distance from chance" in res["reason"]


# ------------------------------------------------------------------ slope
def test_slope_rule_fits_size_means_with_their_true_degrees_of_freedom(tmp_path):
    """Seeds are nested in sizes: the slope is fitted to one mean gap per size (k - 2 df), not to every (size, seed) gap."""
    from scipy import stats as ss

    gaps = {"micro": [0.10, 0.12, 0.11], "milli": [0.14, 0.19, 0.15], "mini": [0.20, 0.25, 0.22]}
    runs = []
    for size, gs in gaps.items():
        for k, g in enumerate(gs):
            runs += [run(tmp_path, "full", size, k, final_val_loss=4.0), run(tmp_path, "relora", size, k, final_val_loss=4.0 + g)]
    rule = {"id": "b", "finding": "b", "test": "slope", "metric": "final_val_loss", "claim": "higher"}
    (res,) = evaluate_findings(runs, spec(rule))
    x = [math.log(PARAMS[s]) for s in gaps]
    fit = ss.linregress(x, [sum(gs) / 3 for gs in gaps.values()])
    half = ss.t.ppf(0.975, 1) * fit.stderr
    assert res["estimate"] == pytest.approx(fit.slope) and (res["lo"], res["hi"]) == pytest.approx((fit.slope - half, fit.slope + half))
    assert res["n"] == 3 and res["df"] == 1 and res["p"] == pytest.approx(fit.pvalue) and res["unit"] == "gap per unit log(body parameters)"
    (two,) = evaluate_findings([r for r in runs if r.size != "milli"], spec(rule))
    assert two["verdict"] == "not measured" and "3 or more sizes" in two["reason"]


# ------------------------------------------------------------------ rank rules
def test_rank_rule_uses_the_early_phase_and_log_ratio_per_seed(tmp_path):
    runs, expected = [], []
    for k in range(3):
        f, r = run(tmp_path, "full", "micro", k), run(tmp_path, "relora", "micro", k)
        runs += [f, r]
        fr, rr = 0.5 + 0.01 * k, 0.3 + 0.02 * k
        # early phase: steps 40 and 100 (<= 400 / 4); step 200 and the inf value must not count
        write_rank_table(f, [(s, l, "wv", "cumulative_update", "per", fr + 0.001 * l) for s in (40, 100) for l in (0, 1)]
                   + [(200, 0, "wv", "cumulative_update", "per", 9.0), (0, 0, "wv", "cumulative_update", "per", 1.0)])
        write_rank_table(r, [(s, l, "wv", "cumulative_update", "per", rr + 0.001 * l) for s in (40, 100) for l in (0, 1)]
                   + [(100, 2, "wv", "cumulative_update", "per", float("inf")), (200, 0, "wv", "cumulative_update", "per", 0.1)])
        expected.append(math.log((rr + 0.0005) / (fr + 0.0005)))
    rule = {"id": "d", "finding": "d", "test": "rank", "kind": ["cumulative_update", "grad"], "component": ["wv", "ov"],
            "metric": "per", "phase": "early", "claim": "lower"}
    res = evaluate_findings(runs, spec(rule))
    assert [(r["kind"], r["component"]) for r in res] == [("cumulative_update", "wv"), ("cumulative_update", "ov"),
                                                          ("grad", "wv"), ("grad", "ov")]
    wv = res[0]
    assert [wv["per_seed"][str(k)] for k in range(3)] == pytest.approx(expected)
    assert wv["verdict"] == "confirmed" and "non-finite values left out" in wv["reason"]
    assert all(r["verdict"] == "not measured" and "not measured" in r["reason"] for r in res[1:])
    (end,) = evaluate_findings(runs, spec({**rule, "kind": "cumulative_update", "component": "wv", "phase": "end"}))
    assert end["per_seed"]["0"] == pytest.approx(math.log(0.1 / 9.0))  # the last common checkpoint, step 200


@pytest.mark.parametrize("bound, verdict", [(0.25, "confirmed (implied by the rank bound)"), (0.6, "confirmed")])
def test_rank_rule_reports_the_rank_bound_and_flags_a_result_it_forces(tmp_path, bound, verdict):
    """A rank-r update has PER <= r / min(m, n): where that bound lies below full-rank's PER at every seed,
    a lower PER is implied by construction and the verdict says so; a looser bound leaves it plain."""
    runs = []
    for k in range(3):
        f, r = run(tmp_path, "full", "micro", k), run(tmp_path, "relora", "micro", k)
        runs += [f, r]
        write_rank_table(f, [(40, 0, "wv", "update", "per", 0.5 + 0.01 * k)])
        write_rank_table(r, [(40, 0, "wv", "update", "per", 0.2 + 0.002 * k), (40, 0, "wv", "update", "rank_bound", bound)])
    rule = {"id": "d", "test": "rank", "kind": "update", "component": "wv", "metric": "per", "phase": "early", "claim": "lower"}
    (res,) = evaluate_findings(runs, spec(rule))
    assert res["verdict"] == verdict and f"PER <= {bound:g} by construction" in res["reason"]


def test_condition_number_of_a_rank_deficient_update_is_flagged(tmp_path):
    runs = []
    for k in range(3):
        f, r = run(tmp_path, "full", "micro", k), run(tmp_path, "relora", "micro", k)
        runs += [f, r]
        write_rank_table(f, [(40, 0, "wv", "update", "condition_number", 30.0 + k)])
        write_rank_table(r, [(40, 0, "wv", "update", "condition_number", 1e15 * (1 + k)), (40, 0, "wv", "update", "rank_bound", 0.25)])
    rule = {"id": "d", "test": "rank", "kind": "update", "component": "wv", "metric": "condition_number", "phase": "early",
            "claim": "higher"}
    (res,) = evaluate_findings(runs, spec(rule))
    # a raw s_min at the rounding floor is reported as rank-deficient, never as a finite effect (issue 28)
    assert res["verdict"] == "rank-deficient" and res["estimate"] is None and "3 of 3 relora matrices" in res["reason"]


def test_rank_rule_without_analysis_says_so(tmp_path):
    runs = [run(tmp_path, "full", "micro", 0), run(tmp_path, "relora", "micro", 0)]
    rule = {"id": "d", "test": "rank", "kind": "grad", "component": "wv", "metric": "per", "claim": "lower"}
    (res,) = evaluate_findings(runs, spec(rule))
    assert res["verdict"] == "not measured" and "rankscope analyze" in res["reason"]


# ------------------------------------------------------------------ validation and tables
@pytest.mark.parametrize("rules,message", [
    ([{"test": "paired", "metric": "x", "claim": "up"}], "claim must be"),
    ([{"test": "anova", "metric": "x", "claim": "higher"}], "test must be"),
    ([{"test": "rank", "metric": "per", "claim": "lower", "component": "wv"}], "needs kind"),
    ([{"test": "paired", "metric": "x", "claim": "lower", "chance": 0.5}], "chance and margin"),
    ([{"test": "paired", "metric": "x", "claim": "lower", "bogus": 1}], r"unknown findings key .*rules\[0\]\.bogus"),
    ([{"id": "a", "test": "paired", "metric": "x", "claim": "lower"},
      {"id": "a", "test": "paired", "metric": "y", "claim": "lower"}], "used twice"),
])
def test_bad_rules_are_one_line_errors(rules, message):
    with pytest.raises(ConfigError, match=message):
        validate_findings({"rules": rules})


def test_paper_rules_are_the_default_and_valid():
    s = validate_findings({})
    assert [r["id"] for r in s["rules"]] == [r["id"] for r in PAPER_RULES] and s["method"] == "relora" and s["reference"] == "full"
    assert {r["finding"] for r in s["rules"]} == {"a", "b", "c", "d"}


def test_findings_tables_render_in_the_report_format(tmp_path):
    runs = [run(tmp_path, m, "micro", k, final_val_loss=4.0 + (0.1 if m == "relora" else 0) + 0.01 * k * (m == "relora"))
            for m in ("full", "relora") for k in range(3)]
    sweep = {"findings": spec(*PAPER_RULES[:2]),
             "tuning": {"field": "train.lr", "seed": 0, "overrides": ["train.max_steps=150"], "metric": "final_val_loss", "widen": 2,
                        "cells": [{"label": "method=full",
                                   "tried": [{"value": 1e-3, "loss": 4.2, "run_dir": "a"}, {"value": 2e-3, "loss": None, "run_dir": "b"}],
                                   "chosen": 1e-3, "position": "edge", "edge_side": "low"}]}}
    tables = findings_tables(runs, sweep)
    assert [t["title"].split(":")[0].split(" ")[0] for t in tables] == ["Scale", "Findings", "Tuned", "Paired"]
    for t in tables:
        assert all(len(r["cells"]) == len(t["formats"]) == len(t["columns"]) - 1 for r in t["rows"])
        table_view(t), _md_table(t)  # both renderers take every table
    md = _md_table(tables[1])
    note = tables[1]["note"]
    assert "At a glance" in note and "a-val-loss (a, primary): inconclusive 1" in note and "(not a verdict: not measured 1)" in note
    assert "a primary endpoint needs >= 5 paired seeds" in md and "not measured" in md  # 3 seeds; bpb was not measured
    assert "failed" in _md_table(tables[2]) and "edge (low end" in _md_table(tables[2])
    assert "tuning horizon 150 steps, main horizon 400 steps" in tables[2]["title"] and "IS a main seed" in tables[2]["title"]
    assert "not confirmed at the main horizon" in _md_table(tables[2])
    assert "25,800" in _md_table(tables[0])
    assert findings_tables(runs, None) == []


def test_report_puts_findings_first_and_reads_stages_from_sweep_json(tmp_path):
    """A staged study's folder (written by hand): tuning runs stay out of the runs, control runs are their own
    method row, each cell's own tuned lr does not split the groups, and report.json carries the verdicts."""
    import json

    import yaml

    from rankscope.reports.report import write_report
    from rankscope.studies.record import write_sweep_summary
    from rankscope.studies.study import Point, Study

    root = tmp_path / "runs"
    points = []
    lr = {"full": 2e-3, "relora": 8e-3}
    for stage, method, size, seed in [("main", m, s, k) for m in ("full", "relora") for s in ("micro", "mini") for k in range(3)] + \
                                     [("control", "relora", "micro", 0), ("control", "relora", "micro", 1), ("tune", "full", "micro", 0)]:
        rate = lr["full"] if stage == "control" else lr[method]
        name = f"method={method},preset={size},seed={seed},lr={rate:g}"
        d = root / {"main": "", "control": "control", "tune": "tune"}[stage] / name
        d.mkdir(parents=True)
        train = {"seed": seed, "lr": rate, "max_steps": 4 if stage == "tune" else 8}
        cfg = {"model": {"preset": size}, "method": {"name": method}, "train": train}
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        gap = 0.1 * (method == "relora") * (1 + (size == "mini"))  # a gap that doubles with size
        loss = 4.0 - 0.3 * (size == "mini") + gap + 0.01 * seed + 0.05 * (stage == "control") + 0.004 * seed ** 2 * (method == "relora")
        (d / "summary.json").write_text(json.dumps({"steps": 8, "final_val_loss": loss, "parameters": PARAMS[size]}))
        points.append(Point(name, {"method.name": method}, cfg, d, status="done", stage=stage))
    control_rule = {"id": "a-control", "finding": "a", "test": "paired", "claim": "higher", "metric": "final_val_loss", "method": "relora (control)"}
    study = Study(root / "study.yaml", "t", points, [], [], [], 1, root,
                  findings=validate_findings({"rules": [*PAPER_RULES[:3], control_rule]}))
    write_sweep_summary(study)
    sweep = json.loads((root / "sweep.json").read_text())
    sweep["tuning"] = {"field": "train.lr", "seed": 0, "overrides": [], "metric": "final_val_loss", "widen": 2,
                       "cells": [{"label": "method=full", "tried": [{"value": 2e-3, "loss": 4.0, "run_dir": "x"}], "chosen": 2e-3,
                                  "position": "interior", "edge_side": None}]}
    (root / "sweep.json").write_text(json.dumps(sweep))
    out = tmp_path / "report"
    write_report([root], out, log=lambda *_: None)
    data = json.loads((out / "report.json").read_text())
    assert data["tables"][0]["title"].startswith("Scale") and data["tables"][1]["title"].startswith("Findings")
    assert data["tables"][2]["title"].startswith("Tuned train.lr")
    assert {r["method"] for r in data["runs"]} == {"full", "relora", "relora (control)"} and len(data["runs"]) == 14
    assert {r["size"] for r in data["runs"]} == {"micro", "mini"}  # the tuned lr is not a dimension
    verdicts = {(r["id"], r["size"]): r["verdict"] for r in data["study_findings"]}
    # the paper's (a) is a primary endpoint: 3 seeds are too few for a verdict, however clear the interval
    assert verdicts[("a-val-loss", "micro")] == verdicts[("a-val-loss", "mini")] == "inconclusive"
    assert verdicts[("a-val-bpb", "micro")] == "not measured" and verdicts[("b-val-loss", "across sizes")] == "not measured"
    assert verdicts[("a-control", "micro")] == "confirmed" and verdicts[("a-control", "mini")] == "not measured"
    html = (out / "report.html").read_text()
    assert html.index("At a glance") < html.index("Primary endpoints") < html.index("Headline")  # the summary leads
    assert html.index("Headline") < html.index("Findings: pre-registered")  # every row, collapsed under Tables


def test_a_pair_of_different_estimates_is_not_measured(tmp_path):
    """eval.json (every held-out document) for one run and the in-training summary.json for its partner: not a difference."""
    runs = []
    for k in range(3):
        f, r = run(tmp_path, "full", "micro", k, val_bpb_macro=3.0 + 0.01 * k), run(tmp_path, "relora", "micro", k, val_bpb_macro=2.9)
        if k == 0:
            r.eval = {"val_bpb_macro": 2.95}
        runs += [f, r]
    rule = {"id": "a", "test": "paired", "metric": "val_bpb_macro", "claim": "higher"}
    (res,) = evaluate_findings(runs, spec(rule))
    assert res["verdict"] == "not measured" and "mix estimates from eval.json and summary.json" in res["reason"]
    for r in runs:
        r.eval = {}
    (res,) = evaluate_findings(runs, spec(rule))
    assert res["verdict"] != "not measured" and "mix" not in res["reason"]


# ------------------------------------------------------------------ families, adjusted p, TOST, power, (e)
def paired_runs(tmp_path, gaps: dict[str, list[float]], metric="final_val_loss"):
    runs = []
    for size, gs in gaps.items():
        for k, g in enumerate(gs):
            runs += [run(tmp_path, "full", size, k, **{metric: 4.0 + 0.01 * k}), run(tmp_path, "relora", size, k, **{metric: 4.0 + 0.01 * k + g})]
    return runs


def test_holm_across_primaries_decides_and_both_p_values_are_kept(tmp_path):
    from scipy import stats as ss
    from statsmodels.stats.multitest import multipletests

    gaps = {"micro": [-0.05, -0.20, -0.11, -0.30, -0.04], "milli": [0.04, -0.09, 0.05, -0.03, 0.02], "mini": [0.3, 0.1, 0.25, 0.2, 0.15]}
    runs = paired_runs(tmp_path, gaps)
    rule = {"id": "a", "finding": "a", "test": "paired", "metric": "final_val_loss", "claim": "higher", "primary": True}
    res = evaluate_findings(runs, spec(rule))
    raw = [ss.ttest_1samp(g, 0).pvalue for g in gaps.values()]
    assert [r["p"] for r in res] == pytest.approx(raw)
    assert [r["p_adj"] for r in res] == pytest.approx(list(multipletests(raw, method="holm")[1]))
    assert all(r["family"] == "primary" and r["correction"] == "holm" and r["family_size"] == 3 for r in res)
    assert raw[0] < 0.05 < res[0]["p_adj"] and res[0]["lo"] < res[0]["hi"] < 0  # the raw interval excludes 0 ...
    assert res[0]["verdict"] == "inconclusive"  # ... but not after Holm over the three sizes
    assert res[2]["verdict"] == "confirmed" and res[2]["verdict_text"].startswith("confirmed at ")
    assert res[1]["verdict"] == "inconclusive" and res[1]["mde"] == pytest.approx(stats.mde(gaps["milli"], 0.05 / 3))  # at alpha / m
    assert "detectable at 80% power" in res[1]["reason"]
    sec = evaluate_findings(runs, spec({**rule, "primary": False}))  # the same rows as secondaries: Benjamini-Hochberg
    assert [r["p_adj"] for r in sec] == pytest.approx(list(multipletests(raw, method="fdr_bh")[1]))
    assert sec[0]["family"] == "secondary (a)" and sec[0]["role"] == "secondary (exploratory)"


def test_a_primary_endpoint_needs_five_paired_seeds(tmp_path):
    runs = paired_runs(tmp_path, {"micro": [0.3, 0.32, 0.31, 0.29]})
    rule = {"id": "a", "finding": "a", "test": "paired", "metric": "final_val_loss", "claim": "higher", "primary": True}
    (res,) = evaluate_findings(runs, spec(rule))
    assert res["p_adj"] < 0.001 and res["verdict"] == "inconclusive" and "needs >= 5 paired seeds" in res["reason"]
    (sec,) = evaluate_findings(runs, spec({**rule, "primary": False}))
    assert sec["verdict"] == "confirmed"


def test_tost_gives_no_meaningful_difference_within_the_sesoi(tmp_path):
    from statsmodels.stats.weightstats import ttost_paired

    gaps = [0.004, -0.003, 0.001, 0.002, -0.001, 0.0]
    runs = paired_runs(tmp_path, {"micro": gaps})
    rule = {"id": "a", "finding": "a", "test": "paired", "metric": "final_val_loss", "claim": "higher", "primary": True, "sesoi": 0.02}
    (res,) = evaluate_findings(runs, spec(rule))
    full = [4.0 + 0.01 * k for k in range(6)]
    ref = ttost_paired(np.array([f + g for f, g in zip(full, gaps)]), np.array(full), -0.02, 0.02)[0]
    assert res["tost"]["p"] == pytest.approx(ref, rel=1e-8) and res["verdict"] == "no meaningful difference"
    assert "no meaningful difference (within ±0.02) at" in res["verdict_text"]
    (wide,) = evaluate_findings(runs, spec({**rule, "sesoi": 0.0005}))
    assert wide["verdict"] == "inconclusive"


def test_opposite_direction_is_not_reproduced_with_its_scale(tmp_path):
    runs = paired_runs(tmp_path, {"micro": [-0.3, -0.32, -0.31, -0.29, -0.35]})
    for r in runs:
        r.config = {"model": {"vocab_size": 2048, "d_model": 64}, "train": {"max_steps": 400}}
        r.summary["tokens"] = 655_360
    rule = {"id": "a", "finding": "a", "test": "paired", "metric": "final_val_loss", "claim": "higher", "primary": True}
    (res,) = evaluate_findings(runs, spec(rule))
    body = PARAMS["micro"] - 2 * 2048 * 64
    assert res["verdict"] == OPPOSITE
    assert res["verdict_text"] == f"not reproduced at {body / 1e3:.3g}k body parameters, 655k tokens ({655_360 / body:.3g} tokens per " \
                                  "body parameter): the opposite direction"
    assert "below -0" not in decide(-0.2, -0.1, "lower", 0.0, 3)[1]


def test_finding_e_slope_against_log_tokens_per_body_parameter_with_a_labelled_extrapolation(tmp_path):
    from statsmodels.regression.linear_model import OLS
    from statsmodels.tools.tools import add_constant

    runs, xs, means = [], [], []
    for steps, gs in ((100, [-0.20, -0.25, -0.22, -0.18, -0.21]), (560, [-0.10, -0.14, -0.12, -0.08, -0.11]),
                      (3200, [-0.03, -0.01, -0.05, -0.02, 0.0])):
        size = f"micro max_steps={steps}"
        for k, g in enumerate(gs):
            for m, v in (("full", 4.0 + 0.01 * k), ("relora", 4.0 + 0.01 * k + g)):
                d = tmp_path / f"{m}-{steps}-{k}"
                d.mkdir()
                runs.append(Run(d, d.name, m, size, k, {"model": {"vocab_size": 2048, "d_model": 64}, "train": {"max_steps": steps}},
                                {"parameters": PARAMS["micro"], "tokens": steps * 2048, "final_val_loss": v}))
        xs.append(math.log(steps * 2048 / (PARAMS["micro"] - 2 * 2048 * 64)))
        means.append(sum(gs) / 5)
    rule = {"id": "e", "finding": "e", "test": "slope", "axis": "tokens_per_param", "metric": "final_val_loss", "claim": "higher",
            "primary": True, "extrapolate_to": 25800}
    (res,) = evaluate_findings(runs, spec(rule))
    ols = OLS(np.array(means), add_constant(np.array(xs))).fit()
    assert res["estimate"] == pytest.approx(ols.params[1]) and res["df"] == 1 and res["size"] == "across token budgets"
    assert res["unit"] == "gap per unit log(tokens per body parameter)" and res["p"] == pytest.approx(ols.pvalues[1])
    ex = res["extrapolation"]
    pred = ols.get_prediction(np.array([[1.0, math.log(25800)]])).summary_frame(alpha=0.05)
    assert ex["estimate"] == pytest.approx(float(pred["mean"].iloc[0])) and ex["lo"] == pytest.approx(float(pred["mean_ci_lower"].iloc[0]))
    assert ex["label"].startswith("EXTRAPOLATION") and "EXTRAPOLATION" in res["reason"]


def test_macro_bits_per_byte_leaves_held_out_domains_out(tmp_path):
    runs = []
    for k in range(3):
        for m, base in (("full", 3.0), ("relora", 3.1)):
            r = run(tmp_path, m, "micro", k, **{"val_bpb_macro": 9.0, "val_bpb/web": base + 0.01 * k, "val_bpb/austen": base + 0.02 * k * k,
                                                 "val_bpb/python": 7.0 if m == "full" else 5.0})
            r.config["data"] = {"eval_only_domains": ["python"]}
            runs.append(r)
    (res,) = evaluate_findings(runs, spec({"id": "a", "test": "paired", "metric": "val_bpb_macro", "claim": "higher"}))
    assert res["estimate"] == pytest.approx(0.1) and "held-out domains left out" in res["sources"][0]


def test_two_runs_of_one_seed_are_an_error_not_the_last_one(tmp_path):
    runs = paired_runs(tmp_path, {"micro": [0.1, 0.2]})
    runs.append(run(tmp_path, "relora", "mini", 0, final_val_loss=1.0))
    runs.append(Run(tmp_path / "stray", "stray", "relora", "micro", 0, {}, {"parameters": 1, "final_val_loss": 0.0}))
    with pytest.raises(ConfigError, match="two runs of relora at micro, seed 0: .* and .*stray"):
        evaluate_findings(runs, spec({"id": "a", "test": "paired", "metric": "final_val_loss", "claim": "higher"}))


def test_controls_at_the_main_lr_are_not_a_second_test_and_stand_in_for_the_control_slope(tmp_path):
    """Control runs whose lr equals the main runs' are the same runs: their paired rows read "= main" and are not counted,
    and the control's slope uses the main runs at those sizes (one copy, not two)."""
    gaps = {"micro": [0.10, 0.12, 0.11, 0.13, 0.09], "milli": [0.14, 0.19, 0.15, 0.16, 0.2], "mini": [0.20, 0.25, 0.22, 0.3, 0.21]}
    runs = paired_runs(tmp_path, gaps)
    for r in runs:
        r.config["train"]["lr"] = 2e-3 if r.method == "full" or r.size != "mini" else 8e-3
    for k in range(5):  # ReLoRA at full-rank's lr: a real second run only at mini, where the lrs differ
        for size in gaps:
            d = tmp_path / f"control-{size}-{k}"
            d.mkdir()
            runs.append(Run(d, d.name, "relora (control)", size, k, {"train": {"max_steps": 400, "lr": 2e-3}},
                            {"parameters": PARAMS[size], "final_val_loss": 4.0 + 0.01 * k + (gaps[size][k] if size != "mini" else 0.5)}))
    rules = [{"id": "a-c", "finding": "a", "test": "paired", "metric": "final_val_loss", "claim": "higher", "method": "relora (control)"},
             {"id": "b-c", "finding": "b", "test": "slope", "metric": "final_val_loss", "claim": "higher", "method": "relora (control)"}]
    res = evaluate_findings(runs, spec(*rules))
    rows = {(r["id"], r["size"]): r for r in res}
    assert rows[("a-c", "micro")]["verdict"] == rows[("a-c", "milli")]["verdict"] == "= main"
    assert "equals the main lr" in rows[("a-c", "micro")]["reason"] and rows[("a-c", "mini")]["verdict"] != "= main"
    slope = rows[("b-c", "across sizes")]
    means = {g["group"]: g["mean_gap"] for g in slope["group_means"]}
    assert means["micro"] == pytest.approx(sum(gaps["micro"]) / 5) and means["mini"] == pytest.approx(0.5)
    assert "b-c (b, secondary): inconclusive 1" in verdict_counts(res) or "b-c (b, secondary): confirmed 1" in verdict_counts(res)
    assert "(not a verdict: = main 2)" in verdict_counts(res)


def test_gradient_and_cross_object_rows_are_adjusted_apart_and_counted_apart():
    from rankscope.studies.findings import verdict_counts
    from rankscope.studies.findings.families import _family

    upd = {"id": "d-per", "finding": "d", "primary": False, "verdict": "confirmed", "counts_toward_verdict": True}
    grad = {"id": "d-per", "finding": "d", "primary": False, "verdict": "confirmed", "counts_toward_verdict": False, "object": "gradient"}
    assert _family(upd) == "secondary (d)" and _family(grad).startswith("not counted (d, gradient")
    line = verdict_counts([upd, grad])
    assert "confirmed 1" in line and "not counted: confirmed 1" in line
    assert line.index("not counted") > line.index("(not a verdict")  # the gradient row sits apart from the verdicts


def test_a_gradient_rule_cannot_be_the_primary_endpoint():
    rule = {"id": "d-grad", "finding": "d", "test": "rank", "metric": "per", "claim": "lower", "kind": "grad",
            "component": "attn.v", "primary": True}
    with pytest.raises(ConfigError, match="cannot be the primary endpoint"):
        validate_findings({"method": "relora", "reference": "full", "rules": [rule]})


def test_paper_rules_ask_for_no_ov_circuit_that_analyze_does_not_form():
    from rankscope.analysis.components import OV_FORMS, OV_KINDS

    for rule in PAPER_RULES:
        kinds = [rule["kind"]] if isinstance(rule.get("kind"), str) else rule.get("kind") or []
        comps = [rule["component"]] if isinstance(rule.get("component"), str) else rule.get("component") or []
        for kind in [*kinds, rule.get("reference_kind", kinds[0] if kinds else None)]:
            if kind and kind not in OV_KINDS:
                assert not set(comps) & set(OV_FORMS), (rule["id"], kind)


def test_body_parameters_are_the_architectures_not_the_adapters(tmp_path):
    """A LoRA run's parameter count includes its adapter factors; the scale box counts the model's body by
    arithmetic from the config's shape (micro: 246,336 = the full run's count less its two embeddings)."""
    from rankscope.config import PRESETS
    from rankscope.studies.findings.scale import body_params

    model = {**PRESETS["micro"], "tie_embeddings": False}
    full = Run(tmp_path, "full", "full", "micro", 0, {"model": model}, {"parameters": 508_480})
    lora = Run(tmp_path, "lora", "lora", "micro", 0, {"model": model}, {"parameters": 508_480 + 45_056})
    assert body_params(full) == body_params(lora) == 508_480 - 2 * 2048 * 64 == 246_336
    shapeless = Run(tmp_path, "x", "full", "micro", 0, {"model": {"vocab_size": 2048, "d_model": 64}}, {"parameters": 508_480})
    assert body_params(shapeless) == 246_336  # no shape: all parameters less the embeddings


def test_the_scale_box_gives_tokens_per_parameter_beside_each_size(tmp_path):
    """Each size's tokens per body parameter stands beside that size's name, in the parameter row's order (a bare sorted
    list put the smallest model's 4.02 beside the largest model's name); ReLoRA cycles sort by length, not as text."""
    from rankscope.config import PRESETS
    from rankscope.studies.findings.scale import shape_body_params
    from rankscope.studies.findings.tables import scale_box

    runs = []
    for size, d in (("small", 32), ("large", 64)):
        model = {**PRESETS["micro"], "d_model": d, "tie_embeddings": False}
        for method, every in (("full", None), ("relora", 20 if d == 32 else 5)):
            cfg = {"model": model, "method": {"name": method, **({"relora": {"reset_every": every}} if every else {})},
                   "train": {"max_steps": 100, "batch_size": 4, "seq_len": 8}}
            runs.append(Run(tmp_path, f"{method}-{size}", method, size, 0, cfg, {"tokens": 3200}))
    ours = scale_box(runs, "full")["scale"]
    small, large = (shape_body_params({**PRESETS["micro"], "d_model": d}) for d in (32, 64))
    assert ours["body (non-embedding) parameters"].index("(small)") < ours["body (non-embedding) parameters"].index("(large)")
    assert ours["tokens per body parameter"] == f"{3200 / small:.3g} (small), {3200 / large:.3g} (large)"
    assert ours["ReLoRA cycle length"].startswith("5 steps") and "; 20 steps" in ours["ReLoRA cycle length"]
