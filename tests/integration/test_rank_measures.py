"""Rank measures that measure learning (issue 28, item 4): numerical-rank condition numbers, the rank-deficient
flag, the rank-matched truncation, geometric summaries with non-finite counts, update-window labels, OV of
updates, and the paper's own adapter-vs-gradient comparison on a tiny pair of real runs."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import tiny_config, write_rank_table
from scipy import stats as ss

from rankscope.analysis import analyze_run, analyze_runs, matrix_metrics
from rankscope.analysis import components as C
from rankscope.analysis.compare import cycle_end_steps, early_cycle_end_steps, summarise, truncated_per, window_label
from rankscope.methods import load_config
from rankscope.studies.findings import GRADIENT_NOTE, PAPER_RULES, evaluate_findings, findings_tables, validate_findings
from rankscope.reports.runs import Run, load_run


def known(m, n, s, dtype=np.float64, seed=0):
    """U diag(s) V^T with random orthonormal U (m x k), V (n x k): a matrix whose singular values are `s`."""
    rng = np.random.default_rng(seed)
    k = len(s)
    U = np.linalg.qr(rng.standard_normal((m, k)))[0]
    V = np.linalg.qr(rng.standard_normal((n, k)))[0]
    return ((U * np.asarray(s)) @ V.T).astype(dtype)


# ------------------------------------------------------------------ numerical rank and condition numbers
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numerical_condition_number_against_numpy_on_a_known_spectrum(dtype):
    """threshold sigma_i > sigma_1 * max(m, n) * eps(dtype the matrix was formed in), as numpy.linalg.matrix_rank"""
    m, n = 40, 24
    eps = np.finfo(dtype).eps
    tol_rel = max(m, n) * eps
    # 6 values well above the threshold, then two a decade below it: numerical rank 6, rank-deficient
    s = [8.0, 5.0, 2.0, 1.0, 0.5, 0.25] + [0.1 * tol_rel * 8.0] * 2
    W = known(m, n, s, dtype)
    got = {k: float(v[0]) for k, v in matrix_metrics(torch.from_numpy(W)).items()}  # decomposed in fp64
    assert got["numerical_rank"] == np.linalg.matrix_rank(W) == 6
    assert got["condition_number_numerical"] == pytest.approx(8.0 / 0.25, rel=1e-4 if dtype == np.float32 else 1e-10)
    assert got["rank_deficient"] == 1.0
    assert got["condition_number"] > 1e3 * got["condition_number_numerical"]  # the raw one: s_min is rounding noise
    # a well-conditioned full-rank matrix: nothing below the floor, both condition numbers agree with numpy
    F = known(m, n, np.linspace(3.0, 1.0, n), dtype, seed=1)
    full = {k: float(v[0]) for k, v in matrix_metrics(torch.from_numpy(F)).items()}
    assert full["rank_deficient"] == 0.0 and full["numerical_rank"] == np.linalg.matrix_rank(F) == n
    assert full["condition_number"] == pytest.approx(np.linalg.cond(F.astype(np.float64)), rel=1e-5)
    assert full["condition_number_numerical"] == pytest.approx(full["condition_number"], rel=1e-12)


def test_fp32_matrix_in_an_fp64_svd_uses_fp32_eps():
    """An fp32-formed rank-3 matrix has fp32 rounding noise (~1e-7 relative), far above the fp64 floor: numpy on the
    fp64 cast calls it full rank, on the fp32 matrix rank 3; the analysis (eps of the formed dtype) says 3."""
    W32 = known(30, 20, [4.0, 2.0, 1.0], np.float32)
    assert np.linalg.matrix_rank(W32.astype(np.float64)) > 3 and np.linalg.matrix_rank(W32) == 3
    got = matrix_metrics(torch.from_numpy(W32), ["numerical_rank", "rank_deficient", "condition_number_numerical"])
    assert float(got["numerical_rank"][0]) == 3 and float(got["rank_deficient"][0]) == 1.0
    assert float(got["condition_number_numerical"][0]) == pytest.approx(4.0, rel=1e-5)


# ------------------------------------------------------------------ rank-matched truncation
@pytest.mark.parametrize("k", [1, 3, 5, 12])
def test_truncated_per_is_the_per_of_the_rank_k_truncation(k):
    m, n = 30, 12
    s = np.array([9.0, 7.0, 4.0, 3.5, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3, 0.2, 0.1])
    W = known(m, n, s)
    U, sv, Vt = np.linalg.svd(W, full_matrices=False)
    Wk = (U[:, :k] * sv[:k]) @ Vt[:k]  # Eckart-Young: the best rank-k approximation
    sk = np.linalg.svd(Wk, compute_uv=False)
    sk = sk[sk > max(m, n) * np.finfo(float).eps * sk[0]]
    p = sk / sk.sum()
    want = math.exp(-(p * np.log(p)).sum()) / min(m, n)
    assert truncated_per(sv, k) == pytest.approx(want, rel=1e-9)
    if k >= n:  # no truncation: the plain PER
        assert truncated_per(sv, k) == pytest.approx(float(matrix_metrics(torch.from_numpy(W), ["per"])["per"][0]), rel=1e-9)
    assert truncated_per(sv, 0) == 0.0 and truncated_per(np.zeros(4), 2) == 0.0


# ------------------------------------------------------------------ summaries
def test_geometric_mean_summary_counts_what_it_leaves_out():
    vals = [2.0, 50.0, 1e4, math.inf, math.nan, None, 0.0, -1.0]
    g = summarise(vals, "geometric")
    assert g.value == pytest.approx(ss.gmean([2.0, 50.0, 1e4]), rel=1e-12)
    assert (g.n, g.non_finite, g.non_positive) == (3, 3, 2)
    a = summarise(vals, "arithmetic")
    assert a.value == pytest.approx(np.mean([2.0, 50.0, 1e4, 0.0, -1.0])) and (a.n, a.non_finite) == (5, 3)
    assert summarise([math.inf], "geometric").value is None
    with pytest.raises(Exception, match="geometric"):
        summarise([1.0], "median")


# ------------------------------------------------------------------ synthetic rank tables for findings
def run(tmp_path, method, seed, max_steps=400, method_cfg=None):
    d = tmp_path / f"{method}-{seed}"
    d.mkdir(exist_ok=True)
    config = {"train": {"max_steps": max_steps}, "method": {"name": method, **(method_cfg or {})}}
    return Run(d, d.name, method, "micro", seed, config, {"parameters": 508_480})


def write(r, rows, spectra=None):
    write_rank_table(r, rows)
    if spectra is not None:
        sc = {c: [] for c in ("run", "method", "step", "layer", "component", "head", "kind", "index", "value")}
        for (step, layer, comp, kind), s in spectra.items():
            for i, v in enumerate(s):
                for c, val in zip(sc, (r.name, r.method, step, layer, comp, -1, kind, i, float(v))):
                    sc[c].append(val)
        pq.write_table(pa.table(sc), r.dir / "analysis" / "spectra.parquet")


def rule(**kw):
    base = {"id": "d", "finding": "d", "test": "rank", "kind": "update", "component": "wv", "metric": "per", "phase": "early",
            "claim": "lower"}
    return validate_findings({"rules": [{**base, **kw}]})


def test_condition_numbers_are_geometric_means_and_non_finite_values_are_counted(tmp_path):
    runs, want = [], []
    for k in range(3):
        f, r = run(tmp_path, "full", k), run(tmp_path, "relora", k)
        runs += [f, r]
        fv, rv = [10.0 + k, 1000.0], [30.0, 40.0 + 5 * k]
        write(f, [(40, la, "wv", "update", "condition_number_numerical", v) for la, v in enumerate(fv)])
        write(r, [(40, la, "wv", "update", "condition_number_numerical", v) for la, v in enumerate(rv)]
              + [(40, 2, "wv", "update", "condition_number_numerical", math.inf)])
        want.append(math.log(ss.gmean(rv) / ss.gmean(fv)))  # not the ratio of arithmetic means
    (res,) = evaluate_findings(runs, rule(metric="condition_number_numerical", claim="higher"))
    assert [res["per_seed"][str(k)] for k in range(3)] == pytest.approx(want, rel=1e-12)
    assert res["summary"] == "geometric mean" and res["non_finite"] == {"relora": 3, "full": 0}
    assert "non-finite values left out" in res["reason"]


def test_raw_condition_number_at_the_rounding_floor_is_rank_deficient_not_an_effect(tmp_path):
    runs = []
    for k in range(3):
        f, r = run(tmp_path, "full", k), run(tmp_path, "relora", k)
        runs += [f, r]
        write(f, [(40, la, "wv", "update", m, v) for la in (0, 1) for m, v in (("condition_number", 20.0 + k), ("rank_deficient", 0.0))])
        write(r, [(40, 0, "wv", "update", "condition_number", 3e6), (40, 0, "wv", "update", "rank_deficient", 1.0),
                  (40, 1, "wv", "update", "condition_number", 50.0), (40, 1, "wv", "update", "rank_deficient", 0.0)])
    (res,) = evaluate_findings(runs, rule(metric="condition_number", claim="higher"))
    assert res["verdict"] == "rank-deficient" and res["estimate"] is None and res["lo"] is None
    assert res["rank_deficient"] == {"relora": {"deficient": 3, "matrices": 6}, "full": {"deficient": 0, "matrices": 6}}
    # with no matrix at the floor the same rule gives a finite effect
    for r in runs[1::2]:
        write(r, [(40, la, "wv", "update", m, v) for la in (0, 1) for m, v in (("condition_number", 50.0), ("rank_deficient", 0.0))])
    (ok,) = evaluate_findings(runs, rule(metric="condition_number", claim="higher"))
    assert ok["verdict"] != "rank-deficient" and ok["estimate"] is not None


def test_rank_matched_rule_truncates_the_reference_to_the_methods_numerical_rank(tmp_path):
    runs, want = [], []
    rng = np.random.default_rng(0)
    for k in range(3):
        f, r = run(tmp_path, "full", k), run(tmp_path, "relora", k)
        runs += [f, r]
        spectra, rows_r, tr, mr = {}, [], [], []
        for la, rank in ((0, 2), (1, 3)):
            s = np.sort(rng.uniform(0.1, 2.0, 8))[::-1]
            spectra[(40, la, "wv", "update")] = s
            per_r = 0.1 + 0.01 * la + 0.02 * k
            rows_r += [(40, la, "wv", "update", "numerical_rank", float(rank)), (40, la, "wv", "update", "per", per_r)]
            p = s[:rank] / s[:rank].sum()
            tr.append(math.exp(-(p * np.log(p)).sum()) / 8)  # numpy, the formula in docs/metrics.md
            mr.append(per_r)
        write(f, [(40, la, "wv", "update", "per", 0.9) for la in (0, 1)], spectra)
        write(r, rows_r)
        want.append(math.log(np.mean(mr) / np.mean(tr)))
    (res,) = evaluate_findings(runs, rule(test="rank-matched"))
    assert [res["per_seed"][str(k)] for k in range(3)] == pytest.approx(want, rel=1e-12)
    assert res["object"] == "update vs rank-matched update" and "rank-matched full" in findings_tables(runs, None, [res])[1]["rows"][0]["label"]
    assert res["verdict"] != "confirmed (implied by the rank bound)"  # the point of the control: no bound shortcut
    (gone,) = evaluate_findings(runs, rule(test="rank-matched", kind="cumulative_update"))
    assert gone["verdict"] == "not measured"


def test_gradient_rows_are_labelled_and_do_not_count_toward_update_verdicts(tmp_path):
    runs = []
    for k in range(3):
        f, r = run(tmp_path, "full", k), run(tmp_path, "relora", k)
        runs += [f, r]
        for x, v in ((f, 0.5), (r, 0.3 + 0.01 * k)):
            write(x, [(40, 0, "wv", kind, "per", v) for kind in ("grad", "cumulative_update")])
    res = evaluate_findings(runs, rule(kind=["grad", "cumulative_update"]))
    grad, upd = res
    assert grad["object"] == "gradient" and grad["counts_toward_verdict"] is False and GRADIENT_NOTE in grad["reason"]
    assert upd["object"] == "update" and upd["counts_toward_verdict"] is True and upd["note"] is None


# ------------------------------------------------------------------ windows
def test_cycle_end_steps_and_window_labels():
    cfg = load_config(None, ["method.name=relora", "method.relora.reset_every=32", "method.relora.restart_warmup_steps=2",
                             "train.max_steps=320"])
    assert cycle_end_steps(cfg) == list(range(32, 321, 32)) and early_cycle_end_steps(cfg) == [32, 64]
    warm = load_config(None, ["method.name=relora", "method.relora.reset_every=10", "method.relora.warm_start_steps=5",
                              "method.relora.restart_warmup_steps=2", "train.max_steps=40"]).to_dict()
    assert cycle_end_steps(warm) == [15, 25, 35]
    assert cycle_end_steps(load_config(None, ["method.name=full", "train.max_steps=320"])) == []
    ends = [32, 64, 96]
    assert window_label(0, 32, ends) == "one cycle" and window_label(32, 64, ends) == "one cycle"
    assert window_label(0, 8, ends) == "within one cycle" and window_label(16, 32, ends) == "within one cycle"
    assert window_label(32, 96, ends) == "spans 1 merge" and window_label(16, 96, ends) == "spans 2 merges"
    assert window_label(5, 15, [15, 25], first=5) == "one cycle" and window_label(0, 40, []) == "no cycles"


def test_update_rows_name_their_windows(tmp_path):
    """The paper-cpu windows of issue 28: (0,8], (8,16], (16,32] lie within the first cycle, (32,96] spans a merge."""
    runs = []
    relora = {"relora": {"reset_every": 32}}
    for k in range(2):
        f, r = run(tmp_path, "full", k, 320), run(tmp_path, "relora", k, 320, relora)
        runs += [f, r]
        steps = ((8, 0), (16, 8), (32, 16), (96, 32))
        for x in (f, r):
            write(x, [(s, 0, "wv", "update", m, v) for s, a in steps for m, v in (("per", 0.5), ("window_start", float(a)))])
    (res,) = evaluate_findings(runs, rule())
    assert [(w["start"], w["end"], w["label"]) for w in res["windows"]] == [
        (0, 8, "within one cycle"), (8, 16, "within one cycle"), (16, 32, "within one cycle")]
    assert res["window"] == "within one cycle" and "(16, 32] within one cycle" in res["reason"]
    (end,) = evaluate_findings(runs, rule(phase="end"))
    assert end["window"] == "spans 1 merge"


def fake_checkpoints(root, cfg, steps_merges):
    from rankscope.store.checkpoint import save_checkpoint
    from rankscope.model import Decoder

    torch.manual_seed(cfg.train.seed)
    base = {k: v for k, v in Decoder(cfg.model).state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for step, merges in steps_merges:
        state = {k: v + 0.01 * step * torch.randn(v.shape, generator=g) if v.dim() == 2 else v for k, v in base.items()}
        save_checkpoint(root / "checkpoints", step, {"model": state}, {"config": cfg.to_dict(), "method_name": "full",
                                                                     "method": {"merges": merges}})
        base = state


def test_analysis_writes_window_rows_and_ov_of_updates(tmp_path):
    cfg = load_config(None, ["model.d_model=16", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=32",
                             "model.vocab_size=32", "model.max_seq_len=16", "train.seq_len=8"])
    fake_checkpoints(tmp_path, cfg, [(8, 0), (32, 1), (96, 3)])
    res = analyze_run(tmp_path, kinds=("weight", "update", "cumulative_update"), metrics=["per", "numerical_rank"], cache=False)
    rows = list(zip(*(res.rows[c] for c in ("step", "layer", "component", "kind", "metric", "value"))))
    win = {(s, m): v for s, la, c, k, m, v in rows if c == "wv" and k == "update" and m.startswith("window")}
    assert win == {(8, "window_start"): 0.0, (8, "window_merges"): 0.0, (32, "window_start"): 8.0, (32, "window_merges"): 1.0,
                   (96, "window_start"): 32.0, (96, "window_merges"): 2.0}
    # OV of a cumulative update: ov_h(W_t) - ov_h(W_0) for every head, checked against numpy at step 96
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "checkpoints/step_000096/model.safetensors"))
    init = C.init_weights(cfg.to_dict())
    layout = (4, 2, 4)
    d = C.ov_heads(w["blocks.0.attn.wo.weight"], w["blocks.0.attn.wv.weight"], *layout) - C.ov_heads(init["blocks.0.attn.wo"], init["blocks.0.attn.wv"], *layout)
    got = [v for s, la, c, k, m, v in rows if (s, c, k, m) == (96, "ov", "cumulative_update", "per")]
    want = []
    for mat in d.double().numpy():
        s = np.linalg.svd(mat, compute_uv=False)
        p = s / s.sum()
        want.append(math.exp(-(p * np.log(p)).sum()) / 4)
    assert got == pytest.approx(want, rel=1e-5)
    kinds = {(c, k) for s, la, c, k, m, v in rows}
    assert {("ov_layer", "update"), ("ov_product", "update"), ("ov", "update")} <= kinds
    prod_rank = [v for s, la, c, k, m, v in rows if (c, k, m) == ("ov_product", "update", "numerical_rank")]
    assert prod_rank and max(prod_rank) <= 2 * 4  # O_t V_t - O_0 V_0 has rank <= 2 hd


# ------------------------------------------------------------------ the paper's comparison on a tiny pair of runs
@pytest.fixture(scope="module")
def pair(tmp_path_factory, data_dir):
    from rankscope.train.loop import train

    root = tmp_path_factory.mktemp("pair")
    common = ["train.max_steps=20", "checkpoint.every=10", "checkpoint.save_grads=true", "train.seed=0"]
    train(tiny_config(data_dir, *common, "method.name=full"), root / "full", log=lambda s: None)
    train(tiny_config(data_dir, *common, "method.name=relora", "method.relora.rank=4", "method.relora.alpha=8",
                      "method.relora.reset_every=10", "method.relora.restart_warmup_steps=2", "method.relora.save_cycle_updates=true"),
          root / "relora", log=lambda s: None)
    for name in ("full", "relora"):
        analyze_runs([root / name], plots=False, log=None, kinds=("grad", "update", "cycle_update"), metrics=["per", "numerical_rank"])
    return [load_run(root / "full"), load_run(root / "relora")]


def np_per(mat):
    s = np.linalg.svd(np.asarray(mat, dtype=np.float64), compute_uv=False)
    p = s[s > 0] / s.sum()
    return math.exp(-(p * np.log(p)).sum()) / min(mat.shape)


def test_the_paper_comparison_row_on_a_tiny_pair_of_runs(pair):
    from safetensors.torch import load_file

    full, relora = pair
    paper = next(r for r in PAPER_RULES if r["id"] == "d-per-as-paper")
    spec = validate_findings({"rules": [{**paper, "component": ["wv"], "phase": "end"}]})
    (row,) = evaluate_findings(pair, spec)
    # independently: ReLoRA's adapter update s*B*A of the cycle ending at step 20 against full-rank's gradient at step 20
    upd = load_file(str(relora.dir / "relora_updates/cycle_0002_step_000020.safetensors"))
    grads = load_file(str(full.dir / "checkpoints/step_000020/grads.safetensors"))
    layers = sorted(k for k in upd if k.endswith("attn.wv"))
    mine = np.mean([np_per(upd[k].numpy()) for k in layers])
    theirs = np.mean([np_per(grads[f"{k}.weight"].numpy()) for k in layers])
    assert row["per_seed"]["0"] == pytest.approx(math.log(mine / theirs), rel=1e-6)
    assert row["object"] == "cycle_update vs grad" and row["counts_toward_verdict"] is False
    assert "as the paper measured it" in row["reason"] and "two different objects" in row["reason"]
    assert "as the paper measured it" in findings_tables(pair, None, [row])[1]["rows"][0]["label"]
    # ReLoRA's update over the window (10, 20] is one cycle (a checkpoint at each cycle end), and it is that cycle's s*B*A
    (upd_row,) = evaluate_findings(pair, validate_findings({"rules": [{**paper, "id": "u", "kind": "update", "component": "wv",
                                                                       "phase": "end"}]}))
    assert upd_row["windows"] == [{"start": 10, "end": 20, "label": "one cycle"}]
    meta = json.loads((relora.dir / "checkpoints/step_000020/meta.json").read_text())
    assert meta["method"]["merges"] == 2
    # despite the fp32 rounding of each merge, the threshold finds the construction rank r = 4 of every one-cycle update
    t = pq.read_table(relora.dir / "analysis" / "rank_metrics.parquet").to_pydict()
    ranks = [v for c, k, m, v in zip(t["component"], t["kind"], t["metric"], t["value"])
             if k in ("update", "cycle_update") and m == "numerical_rank" and c in C.TARGETS]
    assert len(ranks) >= 2 * 2 * 7 * 2 and set(ranks) == {4.0}
