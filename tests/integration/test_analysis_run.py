"""Analysing runs: tables, caching, cycle updates, the in-loop callback and `rankscope analyze`."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import tiny_config
from safetensors.torch import save_file

from rankscope.analysis import analyze_run, compare_subspaces, matrix_metrics
from rankscope.analysis import components as C
from rankscope.store.checkpoint import save_checkpoint
from rankscope.methods import load_config
from rankscope.model import Decoder

SMALL = ["model.d_model=16", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=32",
         "model.vocab_size=32", "model.max_seq_len=16", "train.seq_len=8", "method.name=lora", "method.lora.rank=2", "method.lora.alpha=4"]


def fake_lora_run(root, steps, seed=0):
    """A run directory with hand-written LoRA checkpoints (the LoRA module's key contract)."""
    cfg = load_config(None, SMALL)
    torch.manual_seed(cfg.train.seed)
    base = Decoder(cfg.model).state_dict()
    g = torch.Generator().manual_seed(seed)
    for step in steps:
        state = {}
        for key, t in base.items():
            name = key.removesuffix(".weight")
            if C.wanted(name, False):
                state[f"{name}.base.weight"] = t + 0.01 * step * torch.randn(t.shape, generator=g)
                state[f"{name}.lora_A"] = torch.randn(2, t.shape[1], generator=g)
                state[f"{name}.lora_B"] = 0.01 * torch.randn(t.shape[0], 2, generator=g)
            else:
                state[key] = t
        save_checkpoint(root / "checkpoints", step, {"model": state}, {"config": cfg.to_dict(), "method_name": "lora"})
    return cfg


def rows_of(res, **where):
    r = res.rows
    idx = [i for i in range(len(r["value"])) if all(r[k][i] == v for k, v in where.items())]
    return [r["value"][i] for i in idx]


def test_lora_run_table_and_cache(tmp_path):
    run = tmp_path / "lora_run"
    fake_lora_run(run, [10, 20])
    first = analyze_run(run, workers=2)
    assert first.computed == [10, 20] and first.cached == []
    assert set(first.rows["kind"]) == {"weight", "lora_update", "update", "cumulative_update"}
    assert set(first.rows["run"]) == {"lora_run"} and set(first.rows["method"]) == {"lora"}
    # the weight row is the metric of the effective weight W0 + (alpha/r) B A
    from safetensors.torch import load_file

    sd = load_file(str(run / "checkpoints/step_000020/model.safetensors"))
    W = sd["blocks.1.mlp.w2.base.weight"] + 2.0 * sd["blocks.1.mlp.w2.lora_B"] @ sd["blocks.1.mlp.w2.lora_A"]
    (per,) = rows_of(first, step=20, layer=1, component="w2", kind="weight", metric="per")
    assert per == pytest.approx(float(matrix_metrics(W, ["per"])["per"][0]), rel=1e-9)
    assert rows_of(first, step=20, layer=1, component="w2", kind="lora_update", metric="numerical_rank") == [2.0]
    # OV circuits: 4 heads x 2 layers, rank <= head_dim = 4
    ov = rows_of(first, step=10, component="ov", kind="weight", metric="numerical_rank")
    assert len(ov) == 8 and all(v == 4 for v in ov)
    assert len(set(first.spectra["step"])) == 2 and set(first.spectra["kind"]) == set(first.rows["kind"])

    # second run: everything from the cache; a new checkpoint adds only itself
    again = analyze_run(run)
    assert again.computed == [] and again.cached == [10, 20] and again.rows == first.rows
    fake_lora_run(run, [30], seed=5)
    third = analyze_run(run)
    assert third.computed == [30] and third.cached == [10, 20]
    fresh = analyze_run(run, cache=False)
    assert sorted(map(str, zip(*third.rows.values()))) == sorted(map(str, zip(*fresh.rows.values())))
    # other options are another cache key
    assert analyze_run(run, metrics=["per"]).computed == [10, 20, 30]


def test_cycle_updates_with_angles(tmp_path):
    run = tmp_path / "relora_run"
    fake_lora_run(run, [10])
    folder = run / "relora_updates"
    folder.mkdir()
    g = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(16, 16, generator=g)).Q
    for c in (1, 2):
        # cycle 2 shares the first direction of cycle 1 and is orthogonal otherwise
        cols = U[:, [0, 1]] if c == 1 else U[:, [0, 2]]
        dW = cols @ torch.randn(2, 16, generator=g)
        save_file({"blocks.0.attn.wv": dW[:8].clone(), "blocks.0.attn.wq": dW}, str(folder / f"cycle_{c:04d}_step_{10 * c:06d}.safetensors"))
    res = analyze_run(run, kinds=("cycle_update",), angles_rank=2)
    assert rows_of(res, step=20, component="wq", kind="cycle_update", metric="numerical_rank") == [2.0]
    mean, mn = rows_of(res, step=20, component="wq", metric="angle_to_prev_mean"), rows_of(res, step=20, component="wq", metric="angle_to_prev_min")
    assert mn[0] == pytest.approx(0.0, abs=1e-3) and mean[0] == pytest.approx(45.0, abs=1e-3)
    assert rows_of(res, step=10, metric="angle_to_prev_mean") == []
    assert res.cycles_computed == [10, 20] and res.computed == []
    assert analyze_run(run, kinds=("cycle_update",), angles_rank=2).cycles_cached == [10, 20]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    from rankscope.train.loop import train

    run = tmp_path_factory.mktemp("runs") / "full"
    cfg = tiny_config(data_dir, "train.max_steps=20", "checkpoint.every=10", "checkpoint.save_grads=true",
                      "analysis.every=5", "analysis.per_layer=true", "analysis.components=[wv,wo,ov,ov_product,w2]")
    train(cfg, run, log=lambda s: None)
    return cfg, run


def test_in_loop_metrics(trained):
    cfg, run = trained
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rank_rows = {r["step"]: r for r in rows if "rank/per/wv" in r}
    assert sorted(rank_rows) == [5, 10, 15, 20]
    r = rank_rows[10]
    for comp in ("wv", "wo", "ov", "w2"):
        assert 0 < r[f"rank/per/{comp}"] <= 1 and r[f"rank/cond/{comp}"] >= 1
    assert r["rank/per/ov_product"] <= cfg.model.head_dim / cfg.model.d_model + 1e-9
    assert r["rank/per/wv"] == pytest.approx(np.mean([r[f"rank/per/wv/L{i}"] for i in range(cfg.model.n_layers)]))


def test_analyze_trained_run_end_to_end(trained, tmp_path):
    import pyarrow.parquet as pq

    from rankscope.cli import main
    from rankscope.train.loop import Trainer

    cfg, run = trained
    out = tmp_path / "out"
    assert main(["analyze", str(run), "-o", str(out), "--spectra-steps", "10"]) == 0
    table = pq.read_table(out / "rank_metrics.parquet").to_pydict()
    assert set(table["kind"]) == {"weight", "grad", "update", "cumulative_update"}
    assert sorted(set(table["step"])) == [10, 20]
    assert set(pq.read_table(out / "spectra.parquet").to_pydict()["step"]) == {10}
    for name in ("per_weight.png", "condition_number_weight.png", "per_update.png", "spectra_weight.png"):
        assert (out / name).stat().st_size > 1000
    # in-loop and offline agree on PER of V at step 20 (mean over layers)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    in_loop = next(r for r in logged if r.get("step") == 20 and "rank/per/wv" in r)["rank/per/wv"]
    offline = [v for s, c, k, m, v in zip(table["step"], table["component"], table["kind"], table["metric"], table["value"]) if (s, c, k, m) == (20, "wv", "weight", "per")]
    assert np.mean(offline) == pytest.approx(in_loop, rel=1e-9)
    # the re-created initialisation is the trainer's
    init = C.init_weights(cfg.to_dict())
    trainer = Trainer(cfg, tmp_path / "fresh", log=lambda s: None)
    for name, w in init.items():
        assert torch.equal(w, trainer.model.get_submodule(name).weight.detach()), name
    # full-rank vs itself: zero principal angles
    cmp = compare_subspaces(run, run, 20, r=4)
    assert cmp["value"] and all(math.isclose(v, 0.0, abs_tol=1e-3) for v in cmp["value"])
    assert main(["analyze", str(tmp_path / "nope")]) == 2


def test_relora_merge_events(data_dir, tmp_path):
    from rankscope.train.loop import train

    cfg = tiny_config(data_dir, "train.max_steps=20", "method.name=relora", "method.relora.rank=4", "method.relora.reset_every=10",
                      "method.relora.restart_warmup_steps=2", "method.relora.save_cycle_updates=true", "analysis.every=10", "checkpoint.every=10")
    run = tmp_path / "relora"
    train(cfg, run, log=lambda s: None)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    merged = [r for r in rows if "rank/per/wv/before_merge" in r]
    assert merged and "rank/per/wv/after_merge" in merged[0]
    res = analyze_run(run)
    assert {"weight", "lora_update", "cycle_update"} <= set(res.rows["kind"])
    assert max(rows_of(res, kind="cycle_update", metric="numerical_rank")) <= 4
