"""The paper's metrics under the paper's names: pico-analyze's OV circuit, updates against updates at
cycle boundaries, effective-weight gradients, and the rank bound (docs/metrics.md)."""

import math

import numpy as np
import pytest
import torch
from helpers import tiny_config
from safetensors import safe_open
from safetensors.torch import load_file

from rankscope.analysis import analyze_run
from rankscope.analysis import components as C
from rankscope.analysis.spectra import analyze_items
from rankscope.methods import load_config
from rankscope.adapters.lora import capture_effective_grads, effective_grads, lora_modules, wrap_linears
from rankscope.model import Decoder


# --------------------------------------------------------------------------- an independent reference
def pico_ov_reference(wv: np.ndarray, wo: np.ndarray, n_heads: int, n_kv_heads: int, d_model: int):
    """pico-analyze's OVComponent.compute_ov_weights, re-derived in numpy from its definition: for
    head h reading KV head g = h // (n_heads // n_kv_heads), value rows g*hd:(g+1)*hd times output
    columns h*hd:(h+1)*hd; the layer form puts the heads side by side (dim 1)."""
    hd = d_model // n_heads
    heads = []
    for h in range(n_heads):
        g = h // (n_heads // n_kv_heads)
        heads.append(wv[g * hd:(g + 1) * hd, :] @ wo[:, h * hd:(h + 1) * hd])
    return heads, np.concatenate(heads, axis=1)


def pico_per(m: np.ndarray) -> float:
    """pico-analyze's PERMetric: exp(entropy of s / sum s) / len(s)."""
    s = np.linalg.svd(m, compute_uv=False)
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))) / len(s))


def pico_cond(m: np.ndarray) -> float:
    s = np.linalg.svd(m, compute_uv=False)
    return float(s.max() / s.min())


def values(results, component, head, metric):
    (v,) = [r.values[metric] for r in results if r.item.component == component and r.item.head == head]
    return v


def test_ov_matches_pico_analyze_on_random_gqa_weights():
    n_heads, n_kv, d = 4, 2, 16
    hd = d // n_heads
    rng = np.random.default_rng(0)
    wv, wo = rng.standard_normal((n_kv * hd, d)), rng.standard_normal((d, n_heads * hd))  # torch Linear (out, in)
    weights = {"blocks.0.attn.wv": torch.from_numpy(wv), "blocks.0.attn.wo": torch.from_numpy(wo)}
    items = C.weight_items(weights, (n_heads, n_kv, hd))
    res = analyze_items(items, ["per", "condition_number", "condition_number_numerical", "numerical_rank", "rank_bound"])
    heads, layer = pico_ov_reference(wv, wo, n_heads, n_kv, d)
    for h in range(n_heads):
        (it,) = [i for i in items if i.component == "ov" and i.head == h]
        assert it.shape == (hd, hd)
        np.testing.assert_allclose(it.mat.numpy(), heads[h], rtol=1e-12, atol=1e-12)
        assert values(res, "ov", h, "per") == pytest.approx(pico_per(heads[h]), rel=1e-10)
        assert values(res, "ov", h, "condition_number") == pytest.approx(pico_cond(heads[h]), rel=1e-8)
        assert values(res, "ov", h, "rank_bound") == 1.0
    # heads 0, 1 read KV head 0 and heads 2, 3 KV head 1: a mapping without GQA would differ
    assert not np.allclose(heads[1], wv[hd:2 * hd] @ wo[:, hd:2 * hd])
    (lay,) = [i for i in items if i.component == "ov_layer"]
    assert lay.shape == (hd, d) and lay.head == -1 and lay.layer == 0
    assert values(res, "ov_layer", -1, "per") == pytest.approx(pico_per(layer), rel=1e-10)
    assert values(res, "ov_layer", -1, "condition_number") == pytest.approx(pico_cond(layer), rel=1e-8)
    # the d x d product O_h V_g: same factors, other order; rank hd, PER over d, cond inf
    for h in range(n_heads):
        g = h // (n_heads // n_kv)
        prod = wo[:, h * hd:(h + 1) * hd] @ wv[g * hd:(g + 1) * hd, :]
        s = np.linalg.svd(prod, compute_uv=False)[:hd]
        p = s / s.sum()
        assert values(res, "ov_product", h, "per") == pytest.approx(float(np.exp(-np.sum(p * np.log(p)))) / d, rel=1e-8)
        assert math.isinf(values(res, "ov_product", h, "condition_number"))
        assert values(res, "ov_product", h, "condition_number_numerical") == pytest.approx(s[0] / s[-1], rel=1e-6)
        assert values(res, "ov_product", h, "numerical_rank") == hd and values(res, "ov_product", h, "rank_bound") == hd / d
        # the two orders share their non-zero eigenvalues, not their singular values
        ev_big = np.linalg.eigvals(prod)
        top = ev_big[np.argsort(-abs(ev_big))[:hd]]
        np.testing.assert_allclose(np.sort_complex(np.linalg.eigvals(heads[h])), np.sort_complex(top), rtol=1e-6, atol=1e-8)
        assert values(res, "ov", h, "per") != pytest.approx(values(res, "ov_product", h, "per") * d / hd, rel=1e-3)


# --------------------------------------------------------------------------- effective-weight gradients
SMALL = ["model.d_model=16", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=32",
         "model.vocab_size=32", "model.max_seq_len=16", "train.seq_len=12", "method.name=lora", "method.lora.rank=2",
         "method.lora.alpha=4", "method.lora.dropout=0"]


def test_effective_weight_grad_equals_the_merged_dense_grad():
    """A LoRA model and the dense model holding its effective weights compute the same function, so
    dL/dW_eff (captured) must equal the dense weight's gradient, also summed over micro-batches."""
    cfg = load_config(None, SMALL)
    torch.manual_seed(0)
    lora_model = Decoder(cfg.model)
    wrap_linears(lora_model, cfg.method.options.targets, 2, 4.0, 0.0, seed=0)
    lora_model.double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(lora_model).values():
            m.lora_B.copy_(0.3 * torch.randn(m.lora_B.shape, generator=g, dtype=torch.float64))
    dense = Decoder(cfg.model).double()
    state = {k: v for k, v in lora_model.state_dict().items() if ".lora_" not in k and ".base." not in k}
    for name, m in lora_modules(lora_model).items():
        state[f"{name}.weight"] = m.effective_weight()
    dense.load_state_dict(state)
    x = torch.randint(0, 32, (2, 2, 12), generator=g)
    y = torch.randint(0, 32, (2, 2, 12), generator=g)
    capture_effective_grads(lora_model, True)
    for micro in range(2):  # two micro-batches, each loss / 2, as the trainer accumulates
        (lora_model(x[micro], y[micro]) / 2).backward()
        (dense(x[micro], y[micro]) / 2).backward()
    got = effective_grads(lora_model)
    assert set(got) == {f"{n}.base.weight" for n in lora_modules(lora_model)} and len(got) == 14
    for name in lora_modules(lora_model):
        want = dense.get_submodule(name).weight.grad
        torch.testing.assert_close(got[f"{name}.base.weight"], want, rtol=1e-12, atol=1e-14)
        assert lora_model.get_submodule(name).base.weight.grad is None  # the base stays frozen
    capture_effective_grads(lora_model, False)
    assert effective_grads(lora_model) == {}
    lora_model(x[0], y[0]).backward()  # ordinary steps capture nothing
    assert effective_grads(lora_model) == {}


# --------------------------------------------------------------------------- updates from checkpoints
RUNS = ["train.max_steps=8", "checkpoint.every=4", "checkpoint.keep_last=5", "checkpoint.save_grads=true",
        "train.batch_size=1", "train.seq_len=32", "method.relora.rank=4", "method.relora.alpha=8", "method.relora.reset_every=4",
        "method.relora.restart_warmup_steps=1", "method.relora.save_cycle_updates=true"]
KINDS = ["weight", "update", "cumulative_update", "cycle_update", "grad"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, data_dir):
    from rankscope.train.loop import Trainer, train

    root = tmp_path_factory.mktemp("paper")
    out = {}
    for method in ("full", "relora"):
        cfg = tiny_config(data_dir, *RUNS, f"method.name={method}")
        init = {n: m.weight.detach().clone() for n, m in Trainer(cfg, root / f"init_{method}", log=lambda s: None).model.named_modules()
                if isinstance(m, torch.nn.Linear) and C.wanted(n.removesuffix(".base"), False)}
        train(cfg, root / method, log=lambda s: None)
        out[method] = (cfg, root / method, {n.removesuffix(".base"): w.double() for n, w in init.items()})
    return out


def effective(run, step, scaling):
    sd = {k: v.double() for k, v in load_file(str(run / f"checkpoints/step_{step:06d}/model.safetensors")).items()}
    out = {}
    for key, t in sd.items():
        if key.endswith(".base.weight"):
            name = key.removesuffix(".base.weight")
            out[name] = t + scaling * sd[f"{name}.lora_B"] @ sd[f"{name}.lora_A"]
        elif key.endswith(".weight") and t.dim() == 2 and C.wanted(key.removesuffix(".weight"), False):
            out[key.removesuffix(".weight")] = t
    return out


def per_cond(m: torch.Tensor, rank: int) -> tuple[float, float]:
    """PER, and s_1 / s_rank: the condition number, or for a matrix of rank < min(m, n) by
    construction the one over its rank (its s_min is rounding noise)."""
    s = np.linalg.svd(m.numpy(), compute_uv=False)
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))) / len(s)), float(s[0] / s[rank - 1])


def row(res, step, layer, comp, kind, metric):
    r = res.rows
    cols = ("step", "layer", "component", "head", "kind", "metric")
    hits = [r["value"][i] for i in range(len(r["value"])) if tuple(r[c][i] for c in cols) == (step, layer, comp, -1, kind, metric)]
    assert len(hits) == 1, (step, layer, comp, kind, metric, hits)
    return hits[0]


@pytest.mark.parametrize("method", ["full", "relora"])
def test_update_metrics_match_a_direct_computation(two_runs, method):
    cfg, run, init = two_runs[method]
    res = analyze_run(run, kinds=tuple(KINDS), cache=False)
    relora = two_runs["relora"][0].method.options  # both runs' config has the relora section; full's factors: none
    scaling = relora.alpha / relora.rank
    W = {s: effective(run, s, scaling) for s in (4, 8)}
    assert W[4].keys() == init.keys() and len(init) == 28
    cycles = sorted((run / "relora_updates").glob("*.safetensors")) if method == "relora" else []
    assert len(cycles) == (2 if method == "relora" else 0)
    for name in ("blocks.0.attn.wv", "blocks.1.attn.wo", "blocks.3.mlp.w2", "blocks.2.mlp.w1"):
        layer, comp = C.parse_module(name)
        k = min(W[8][name].shape)
        mats = {("update", 4): W[4][name] - init[name], ("update", 8): W[8][name] - W[4][name],
                ("cumulative_update", 8): W[8][name] - init[name], ("weight", 8): W[8][name]}
        grads = load_file(str(run / "checkpoints/step_000008/grads.safetensors"))
        mats[("grad", 8)] = grads[f"{name}.base.weight" if method == "relora" else f"{name}.weight"].double()
        if method == "relora":
            dW = load_file(str(cycles[1]))[name].double()
            torch.testing.assert_close(mats[("update", 8)], dW, rtol=0, atol=1e-6)  # one update = one cycle's merge
            mats[("cycle_update", 8)] = dW
        # the rank bound: r per merged cycle for ReLoRA's updates, the step's 32 tokens for a gradient
        r = relora.rank if method == "relora" else k
        want = {("update", 4): r, ("update", 8): r, ("cumulative_update", 8): 2 * r if method == "relora" else k, ("weight", 8): k,
                ("grad", 8): min(32, k), ("cycle_update", 8): r}
        for (kind, step), m in mats.items():
            per, cond = per_cond(m, want[(kind, step)])
            assert row(res, step, layer, comp, kind, "per") == pytest.approx(per, rel=1e-5), (kind, step, name)
            metric = "condition_number" if want[(kind, step)] == k else "condition_number_numerical"
            assert row(res, step, layer, comp, kind, metric) == pytest.approx(cond, rel=1e-3), (kind, step, name)
        for kind, step in mats:
            bound = want[(kind, step)]
            assert row(res, step, layer, comp, kind, "rank_bound") == bound / k, (kind, name)
            assert row(res, step, layer, comp, kind, "numerical_rank") <= bound
        if method == "relora":
            assert row(res, 8, layer, comp, "update", "numerical_rank") == r  # the bound is attained


def test_analyze_cli_all_kinds_and_grads_each_checkpoint(two_runs, tmp_path):
    import pyarrow.parquet as pq

    from rankscope.cli import main

    for method in ("full", "relora"):
        _, run, _ = two_runs[method]
        out = tmp_path / method
        assert main(["analyze", str(run), "-o", str(out), "--kinds", *KINDS, "--no-plots"]) == 0
        t = pq.read_table(out / "rank_metrics.parquet").to_pandas()
        assert set(t["kind"]) == (set(KINDS) if method == "relora" else set(KINDS) - {"cycle_update"})
        grad = t[(t.kind == "grad") & (t.metric == "per")]
        assert sorted(set(grad.step)) == [4, 8] and len(grad) == 2 * 28
        assert {"ov", "ov_layer", "ov_product"} <= set(t[t.kind == "weight"].component)
        for step in (4, 8):
            with safe_open(str(run / f"checkpoints/step_{step:06d}/grads.safetensors"), "pt") as fh:
                keys = set(fh.keys())
            assert sum(k.endswith(".base.weight") for k in keys) == (28 if method == "relora" else 0)


def test_save_grads_leaves_training_unchanged(two_runs, data_dir, tmp_path):
    from rankscope.train.loop import train

    cfg, run, _ = two_runs["relora"]
    other = tiny_config(data_dir, *RUNS, "method.name=relora", "checkpoint.save_grads=false")
    train(other, tmp_path / "nograds", log=lambda s: None)
    a = load_file(str(run / "checkpoints/step_000008/model.safetensors"))
    b = load_file(str(tmp_path / "nograds/checkpoints/step_000008/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "nograds/checkpoints/step_000008/grads.safetensors").exists()
