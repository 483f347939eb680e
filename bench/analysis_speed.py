"""Analysis speed on a pico-small-shaped checkpoint: batched torch vs a per-matrix numpy loop.

    python bench/analysis_speed.py [--layers 12] [--repeats 1] [--device cpu]

Both sides compute every registered metric of every matrix of the checkpoint: per layer wq, wk, wv,
wo, w1, w2, w3 and the 12 per-head OV circuits (d x d). The baseline forms each OV circuit and
calls numpy.linalg.svd once per matrix (fp64); the batched path stacks same-shape matrices, one
svdvals call per shape, and decomposes OV circuits from their factors. Also times `analyze_run`
per checkpoint (weights, updates and cumulative updates of two checkpoints, reading included).
Random weights; the ratio, not the absolute time, is the point (the CPU may be shared).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rankscope.analysis import components as C  # noqa: E402
from rankscope.spectral import METRICS  # noqa: E402
from rankscope.analysis.spectra import analyze_items  # noqa: E402
from rankscope.config import PRESETS  # noqa: E402
from rankscope.methods import load_config


def state_dict(layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    p = PRESETS["pico-small"]
    d, f, kv = p["d_model"], p["ffn_dim"], p["n_kv_heads"] * p["d_model"] // p["n_heads"]
    g = torch.Generator().manual_seed(seed)
    shapes = {"attn.wq": (d, d), "attn.wk": (kv, d), "attn.wv": (kv, d), "attn.wo": (d, d), "mlp.w1": (f, d), "mlp.w3": (f, d), "mlp.w2": (d, f)}
    return {f"blocks.{i}.{k}.weight": 0.02 * torch.randn(s, generator=g) for i in range(layers) for k, s in shapes.items()}


def numpy_metrics(W: np.ndarray) -> dict[str, float]:
    """The per-matrix baseline: one numpy SVD, then the same formulas as rankscope.spectral."""
    s = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    m, n = W.shape
    p = s / s.sum()
    nz = p[p > 0]
    erank = math.exp(-(nz * np.log(nz)).sum())
    tol = max(m, n) * np.finfo(np.float32).eps * s[0]
    above = s[s > tol]
    c = np.sort(np.abs(W).ravel())
    N = c.size
    k = np.arange(1, N + 1)
    return {"effective_rank": erank, "per": erank / min(m, n), "condition_number": s[0] / s[-1] if s[-1] > 0 else math.inf,
            "condition_number_numerical": s[0] / above.min(), "numerical_rank": len(above), "stable_rank": (s**2).sum() / s[0] ** 2,
            "spectral_norm": s[0], "frobenius_norm": np.sqrt((s**2).sum()), "nuclear_norm": s.sum(),
            "gini": 1 - 2 * ((c / c.sum()) * (N - k + 0.5) / N).sum(),
            "hoyer": (math.sqrt(N) - np.abs(W).sum() / np.linalg.norm(W)) / (math.sqrt(N) - 1)}


def baseline(weights: dict[str, torch.Tensor], layout) -> dict:
    out = {}
    for name, w in weights.items():
        out[name] = numpy_metrics(w.numpy())
    for name in weights:
        if name.endswith("attn.wo"):
            wv = weights[name.replace("wo", "wv")]
            for h, (A, B) in enumerate(C.ov_factors(weights[name], wv, *layout)):
                out[f"{name}.ov{h}"] = numpy_metrics((A @ B).numpy())
    return out


def timed(fn, repeats: int) -> tuple[float, object]:
    best, res = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t0)
    return best, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-run", action="store_true", help="skip the analyze_run timing")
    args = ap.parse_args()
    p = PRESETS["pico-small"]
    layout = (p["n_heads"], p["n_kv_heads"], p["d_model"] // p["n_heads"])
    weights, _ = C.effective_weights(state_dict(args.layers), None)
    items = C.weight_items(weights, layout)
    print(f"pico-small shapes, {args.layers} layers: {len(items)} matrices ({len(weights)} linears + {len(items) - len(weights)} OV circuits), "
          f"{len(METRICS)} metrics each, torch threads {torch.get_num_threads()}, device {args.device}")
    analyze_items(items[:2])  # warm-up
    t_np, ref = timed(lambda: baseline(weights, layout), args.repeats)
    t64, res = timed(lambda: analyze_items(items, dtype="float64", device=args.device), args.repeats)
    t32, _ = timed(lambda: analyze_items(items, dtype="float32", device=args.device), args.repeats)
    dense_only = [it for it in items if it.component != "ov"]
    t_dense, _ = timed(lambda: analyze_items(dense_only, dtype="float64", device=args.device), args.repeats)
    # agreement with the baseline (PER of every dense matrix, and of OV head 0 of layer 0)
    got = {f"blocks.{r.item.layer}.{'attn' if r.item.component.startswith('w') and r.item.component in ('wq', 'wk', 'wv', 'wo') else 'mlp'}.{r.item.component}": r.values["per"] for r in res if r.item.component != "ov"}
    worst = max(abs(got[k] - ref[k]["per"]) for k in got)
    ov0 = next(r for r in res if r.item.component == "ov" and r.item.layer == 0 and r.item.head == 0)
    print(f"  max |PER batched - PER numpy| over dense matrices: {worst:.2e}; OV L0 h0: {abs(ov0.values['per'] - ref['blocks.0.attn.wo.ov0']['per']):.2e}")
    print(f"  numpy per-matrix loop (fp64):       {t_np:8.3f} s")
    print(f"  batched torch, fp64:                {t64:8.3f} s   speed-up {t_np / t64:5.1f}x")
    print(f"  batched torch, fp32:                {t32:8.3f} s   speed-up {t_np / t32:5.1f}x")
    print(f"    (dense linears alone, fp64:       {t_dense:8.3f} s)")
    if args.skip_run:
        return
    from rankscope.analysis.run import analyze_run
    from rankscope.store.checkpoint import save_checkpoint

    cfg = load_config(None, ["model.preset=pico-small", f"model.n_layers={args.layers}"])
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        for step, seed in ((100, 1), (200, 2)):
            save_checkpoint(run / "checkpoints", step, {"model": state_dict(args.layers, seed)}, {"config": cfg.to_dict(), "method_name": "full"})
        t0 = time.perf_counter()
        res = analyze_run(run, kinds=("weight", "update", "cumulative_update"), device=args.device)
        t_run = time.perf_counter() - t0
        t0 = time.perf_counter()
        analyze_run(run, kinds=("weight", "update", "cumulative_update"), device=args.device)
        t_cached = time.perf_counter() - t0
    print(f"  analyze_run, 2 checkpoints x (weights + updates + cumulative updates), fp64: {t_run:.2f} s "
          f"= {t_run / 2:.2f} s per checkpoint ({len(res.rows['value'])} rows); cached re-run {t_cached:.2f} s")


if __name__ == "__main__":
    main()
