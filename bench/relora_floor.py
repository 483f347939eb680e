"""How fast ReLoRA with adapter dropout *could* be against full-rank, from its parts, beside how fast it is.

ReLoRA freezes each adapted weight W, so a step skips W's gradient GEMM (dW = g^T x) and adds the factored
adapter's six thin products (r = rank) and one dropout mask per adapted linear:
  forward   h = (x * m) A^T            out += h (s B)^T
  backward  dB = s g^T h   dh = s g B  dA = dh^T (x * m)   dx += (dh A) * m
This script times each of those parts alone at every adapted shape of a preset, with N = batch x seq tokens,
in the precision of the step (bf16: the GEMMs on bf16 operands, as under autocast; the mask in fp32, the
residual stream's dtype), rounds interleaved, best of the rounds. Then, over all adapted linears of the model:

  saved   the frozen weights' gradient GEMMs (and in bf16 their casts to the fp32 gradient);
  thin    the six thin products, at the GEMM library's measured rate;
  masks   `paths.keep_mask` (what the dropped path draws), one per adapted linear;
  floor   (full-rank step - saved + thin + masks) / full-rank step: the ReLoRA / full-rank step ratio if every
          other extra of the factored form (x * m, the masked sum into dx, casts, autograd nodes) cost nothing
          and the thin products ran alone as fast as they do here;
and the ReLoRA / full-rank ratio of whole steps measured in the same run (bench/relora_vs_full.py's build).
A floor above 1.0 says that no rearrangement of the same library calls brings ReLoRA with dropout to
full-rank's step time at that shape: it takes thin products faster than the library's, or cheaper masks.

    python bench/relora_floor.py --presets pico-tiny-body --precision fp32 bf16 --threads 1
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from rankscope.adapters.paths import keep_mask
from rankscope.config import PRESETS

import lora_paths  # bench/, beside this file
import relora_vs_full


def adapted_shapes(preset: str) -> list[tuple[str, int, int]]:
    """(name, in, out) of each adapted linear of one block (bench/lora_paths.py's shapes, one row per linear)."""
    return [(name, i, o) for names, (i, o) in lora_paths.shapes(preset).items() for name in names.split(", ")]


def mean_us(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def parts(d_in: int, d_out: int, n: int, rank: int, dtype: torch.dtype, p: float) -> dict[str, callable]:
    """The timed parts of one adapted linear, on fresh random operands."""
    g0 = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g0).to(dtype)  # noqa: E731
    x, g, a, sb = r(n, d_in), r(n, d_out), r(rank, d_in), r(d_out, rank)
    h, dh, out = r(n, rank), r(n, rank), r(n, d_out)
    fp32 = dtype == torch.float32
    return {
        # saved by freezing W: its gradient GEMM, and under autocast the cast of the bf16 result to fp32
        "saved": (lambda: torch.mm(g.t(), x)) if fp32 else (lambda: torch.mm(g.t(), x).float()),
        "thin": lambda: (torch.mm(x, a.t()), out.addmm_(h, sb.t()), torch.mm(g.t(), h), torch.mm(g, sb),
                         torch.mm(dh.t(), x), torch.mm(dh, a)),
        "mask": lambda: keep_mask((n, d_in), p, torch.float32, scale=1.0 / (1.0 - p)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["pico-tiny-body"])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; best of them")
    ap.add_argument("--reps", type=int, default=10, help="calls per part and round")
    ap.add_argument("--steps", type=int, default=8, help="whole steps per method (after 2 untimed), interleaved")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.batch * args.seq
    print(f"cpu, {torch.get_num_threads()} thread(s), torch {torch.__version__}, N = {args.batch} x {args.seq} = {n} tokens, "
          f"rank {args.rank}, dropout {args.dropout}; parts: best of {args.rounds} interleaved rounds of {args.reps} calls, us")
    device = torch.device("cpu")
    for preset in args.presets:
        layers = PRESETS[preset]["n_layers"]
        for precision in args.precision:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            shapes = adapted_shapes(preset)
            fns = {name: parts(i, o, n, args.rank, dtype, args.dropout) for name, i, o in shapes}
            best = {(name, k): float("inf") for name in fns for k in fns[name]}
            for _ in range(args.rounds):
                for name, f in fns.items():
                    for k, fn in f.items():
                        best[name, k] = min(best[name, k], mean_us(fn, args.reps))
            # whole steps, interleaved, in the same run
            bargs = SimpleNamespace(seq=args.seq, dropout=args.dropout, compile=False)
            vocab = PRESETS[preset]["vocab_size"]
            tok = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
            xs, ys = tok[:, :-1], tok[:, 1:]
            built = {m: relora_vs_full.build(preset, m, bargs, device) for m in ("full", "relora")}
            times: dict[str, list[float]] = {"full": [], "relora": []}
            for i in range(2 + args.steps):
                for m in (("full", "relora") if i % 2 == 0 else ("relora", "full")):
                    _, model, _, opt = built[m]
                    t0 = time.perf_counter()
                    relora_vs_full.step(model, opt, xs, ys, device, precision)
                    if i >= 2:
                        times[m].append(time.perf_counter() - t0)
            t_full, t_relora = (min(times[m]) * 1e6 for m in ("full", "relora"))
            print(f"\n{preset}, {precision}: per adapted linear, us (x {layers} layers)")
            print(f"  {'linear':<7}{'in x out':>10}{'saved dW':>10}{'thin x6':>10}{'mask':>9}{'thin + mask - saved':>21}")
            tot = {"saved": 0.0, "thin": 0.0, "mask": 0.0}
            for name, i, o in shapes:
                s, t, mk = best[name, "saved"], best[name, "thin"], best[name, "mask"]
                tot["saved"] += s * layers
                tot["thin"] += t * layers
                tot["mask"] += mk * layers
                print(f"  {name:<7}{f'{i}x{o}':>10}{s:>10.0f}{t:>10.0f}{mk:>9.0f}{t + mk - s:>+21.0f}")
            ms = {k: v / 1e3 for k, v in tot.items()}
            print(f"  per step: saved {ms['saved']:.1f} ms, thin {ms['thin']:.1f} ms, masks {ms['mask']:.1f} ms")
            print(f"  whole steps, best of {args.steps}: full-rank {t_full / 1e3:.1f} ms, ReLoRA {t_relora / 1e3:.1f} ms: "
                  f"measured ReLoRA / full-rank {t_relora / t_full:.2f}")
            floor_thin = (t_full - tot["saved"] + tot["thin"]) / t_full
            floor = (t_full - tot["saved"] + tot["thin"] + tot["mask"]) / t_full
            print(f"  floor without masks (dropout 0 in the factored form): {floor_thin:.2f}; floor with the masks: {floor:.2f}")


if __name__ == "__main__":
    main()
