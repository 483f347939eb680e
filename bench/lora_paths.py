"""The three exact forms of a LoRA layer (dropout 0), timed side by side per layer shape.

For each adapted linear shape of the chosen presets (wq, wk/wv, w1/w3, w2 ...) and N = batch x seq
tokens: forward + backward of one layer on each path of `rankscope.adapters.lora.LoRALinear`
(factored, merged, hybrid) and of the trainable full-rank `nn.Linear` it replaces, rounds
interleaved, median reported; then what the cost model (`choose_path`, THIN_PENALTY) picks beside
the path that was fastest here. The optimiser step is left out (see bench/relora_vs_full.py).

    python bench/lora_paths.py --threads 1 [--presets micro mini pico-tiny pico-small] [--rank 16] [--dropout 0.1]

With --dropout P it also times the adapter-dropout mask (forward + backward of the masked input) per
input width: torch's `F.dropout` (bernoulli_), the uniform draw `rand >= p` (the mask before issue 27's
`paths.keep_mask`) and `LoRALinear.drop` (keep_mask: two 24-bit fields per 64-bit draw), same distribution.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from rankscope.config import PRESETS
from rankscope.adapters.lora import LoRALinear
from rankscope.adapters.paths import THIN_PENALTY, choose_path

PATHS = ("factored", "merged", "hybrid")


def shapes(preset: str) -> dict[str, tuple[int, int]]:
    """(in, out) of the adapted linears of a preset, by the layers that have that shape."""
    p = PRESETS[preset]
    d, f, hd = p["d_model"], p["ffn_dim"], p["d_model"] // p["n_heads"]
    by = {"wq, wo": (d, d), "wk, wv": (d, p["n_kv_heads"] * hd), "w1, w3": (d, f), "w2": (f, d)}
    return by


def time_layer(d_in: int, d_out: int, tokens: int, rank: int, rounds: int, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    full = nn.Linear(d_in, d_out, bias=False, device=device)
    layer = LoRALinear(nn.Linear(d_in, d_out, bias=False, device=device), rank, 2.0 * rank, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    x = torch.randn(tokens, d_in, device=device, requires_grad=True)
    g = torch.randn(tokens, d_out, device=device)

    def run(side: str) -> None:
        if side == "full":
            full(x).backward(g)
            full.weight.grad = None
        else:
            layer.forward_path = side
            layer(x).backward(g)
            layer.lora_A.grad = layer.lora_B.grad = None
        x.grad = None

    sides = ("full",) + PATHS
    times: dict[str, list[float]] = {s: [] for s in sides}
    for i in range(rounds + 2):
        for s in sides if i % 2 == 0 else sides[::-1]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(5):
                run(s)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 2:  # two warm-up rounds
                times[s].append((time.perf_counter() - t0) / 5)
    return {s: statistics.median(v) for s, v in times.items()}


def time_dropout(d_in: int, tokens: int, p: float, rounds: int, device: torch.device) -> dict[str, float]:
    layer = LoRALinear(nn.Linear(d_in, d_in, bias=False, device=device), 1, 1.0, dropout=p).train()
    x = torch.randn(tokens, d_in, device=device, requires_grad=True)
    g = torch.randn(tokens, d_in, device=device)
    fns = {"F.dropout": lambda: torch.nn.functional.dropout(x, p, True),
           "rand >= p": lambda: x * (torch.rand_like(x) >= p).to(x.dtype).mul_(1.0 / (1.0 - p)),
           "LoRALinear.drop": lambda: layer.drop(x)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(rounds + 2):
        for k, f in fns.items() if i % 2 == 0 else list(fns.items())[::-1]:
            t0 = time.perf_counter()
            for _ in range(5):
                f().backward(g)
                x.grad = None
            if i >= 2:
                times[k].append((time.perf_counter() - t0) / 5)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["micro", "mini", "pico-tiny", "pico-small"])
    ap.add_argument("--tokens", type=int, default=1024, help="batch x seq of one micro-batch (bench/relora_vs_full.py: 8 x 128)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dropout", type=float, default=0.0, help="also time the dropout mask at this p")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, N = {args.tokens} tokens, r = {args.rank}, "
          f"THIN_PENALTY = {THIN_PENALTY}; forward + backward of one layer, us (x the trainable full-rank layer)")
    head = f"{'preset':<11}{'layers':<9}{'in x out':>11}{'full':>9}" + "".join(f"{p:>17}" for p in PATHS) + f"{'fastest':>10}{'model picks':>13}"
    print(head)
    print("-" * len(head))
    agree = total = 0
    for preset in args.presets:
        for names, (d_in, d_out) in shapes(preset).items():
            t = time_layer(d_in, d_out, args.tokens, args.rank, args.rounds, device)
            fastest = min(("merged", "hybrid"), key=t.get)  # factored only matters with dropout
            picked = choose_path(args.tokens, d_in, d_out, args.rank)
            agree, total = agree + (picked == fastest), total + 1
            cells = "".join(f"{t[p] * 1e6:>9.0f} ({t[p] / t['full']:.2f})" for p in PATHS)
            print(f"{preset:<11}{names:<9}{f'{d_in}x{d_out}':>11}{t['full'] * 1e6:>9.0f}{cells}{fastest:>10}{picked:>13}", flush=True)
    print(f"the cost model picked the faster of merged / hybrid for {agree} of {total} shapes")
    if args.dropout > 0:
        print(f"\ndropout mask, p = {args.dropout}, forward + backward of the masked (N x in) input, us")
        widths = sorted({d_in for preset in args.presets for d_in, _ in shapes(preset).values()})
        for d_in in widths:
            t = time_dropout(d_in, args.tokens, args.dropout, args.rounds, device)
            print(f"in = {d_in:<6} F.dropout {t['F.dropout'] * 1e6:8.0f}   rand >= p {t['rand >= p'] * 1e6:8.0f}"
                  f"   LoRALinear.drop {t['LoRALinear.drop'] * 1e6:8.0f} us ({t['LoRALinear.drop'] / t['F.dropout']:.2f}x F.dropout, "
                  f"{t['LoRALinear.drop'] / t['rand >= p']:.2f}x rand >= p)", flush=True)


if __name__ == "__main__":
    main()
