"""ReLoRA vs full-rank on the same preset, measured side by side in one process.

For each preset: step time (forward + backward + AdamW step; the two methods' steps interleaved so
machine noise hits both alike, median reported), peak memory and optimiser-state bytes.
Peak memory: on CUDA `max_memory_allocated` of a pass with only that model resident; on CPU the
persistent training state (parameters + gradients + optimiser state) after a step — CPU has no
per-tensor peak counter, and activations are the same for both methods up to the tiny LoRA path.

ReLoRA freezes the adapted matrices, so their weight gradients (a third of their matmul FLOPs)
are skipped and their AdamW moments do not exist; the embedding, norms and LM head are still
trained full-rank. The expected step-time ratio therefore depends on the share of FLOPs in the
adapted linears: high on `mini` (small vocab), low on pico-tiny (a 50k x 96 head dominates).

    python bench/relora_vs_full.py --threads 1 --precision fp32     # mini, pico-tiny on CPU (~1 min)
    python bench/relora_vs_full.py --device cuda --batch 16 --seq 512 --steps 20   # + pico-small
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rankscope.methods import load_config
from rankscope.methods import build_method
from rankscope.model import Decoder
from rankscope.optim import optimizer_state_bytes
from rankscope.core.runtime import autocast, pick_device, pick_precision


def build(preset: str, method: str, args, device):
    cfg = load_config(None, [f"model.preset={preset}", f"method.name={method}", f"train.seq_len={args.seq}", f"model.max_seq_len={args.seq}", "train.warmup_steps=0", "method.relora.rank=16", "method.relora.alpha=32",
                             "train.max_steps=400", "method.relora.reset_every=40", "method.relora.restart_warmup_steps=2",  # a schedule that fits (methods.relora.check_schedule)
                             f"method.relora.dropout={args.dropout}"])
    torch.manual_seed(0)
    model = Decoder(cfg.model)
    m = build_method(cfg)
    m.prepare_model(model)
    model.to(device)
    opt = m.build_optimizer(model, device)
    return cfg, (torch.compile(model) if args.compile else model), m, opt


def step(model, opt, x, y, device, precision):
    with autocast(device, precision):
        loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def adapted_flop_share(model) -> float:
    """Share of per-token linear-layer multiply-adds in the adapted (or adaptable) linears."""
    names = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    adapted = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and any(f".{k}." in n for k in names))
    head = model.lm_head.weight.numel()
    return adapted / (adapted + head)


def persistent_bytes(model, opt) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return params + grads + optimizer_state_bytes(opt)


def measure_memory(preset, method, args, device, precision, x, y) -> int:
    cfg, model, m, opt = build(preset, method, args, device)
    if device.type != "cuda":
        step(model, opt, x, y, device, precision)
        return persistent_bytes(model, opt)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        step(model, opt, x, y, device, precision)
    sync(device)
    return int(torch.cuda.max_memory_allocated(device))


def bench_preset(preset: str, args, device, precision) -> dict:
    vocab = load_config(None, [f"model.preset={preset}"]).model.vocab_size
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g).to(device)
    x, y = tok[:, :-1], tok[:, 1:]
    mem = {m: measure_memory(preset, m, args, device, precision, x, y) for m in ("full", "relora")}
    built = {m: build(preset, m, args, device) for m in ("full", "relora")}
    times: dict[str, list[float]] = {"full": [], "relora": []}
    for i in range(args.warmup + args.steps):
        order = ("full", "relora") if i % 2 == 0 else ("relora", "full")
        for m in order:
            _, model, _, opt = built[m]
            sync(device)
            t0 = time.perf_counter()
            step(model, opt, x, y, device, precision)
            sync(device)
            if i >= args.warmup:
                times[m].append(time.perf_counter() - t0)
    full_model, relora_model = (getattr(built[m][1], "_orig_mod", built[m][1]) for m in ("full", "relora"))
    rep = {m: built[m][2].report(getattr(built[m][1], "_orig_mod", built[m][1]), built[m][3]) for m in built}
    return {
        "preset": preset, "params": full_model.num_params(), "adapted_share": adapted_flop_share(full_model),
        "trainable_relora": relora_model.num_params(trainable_only=True),
        "t_full": statistics.median(times["full"]), "t_relora": statistics.median(times["relora"]),
        "mem_full": mem["full"], "mem_relora": mem["relora"],
        "opt_full": rep["full"]["optimizer_state_bytes"], "opt_relora": rep["relora"]["optimizer_state_bytes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=None, help="default: mini pico-tiny, plus pico-small on CUDA (minutes per step pair on a shared CPU)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout (the paper's 0.1; 0 removes one activation pass per adapted linear)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (fuses the LoRA path's small kernels)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    args.presets = args.presets or ["mini", "pico-tiny"] + (["pico-small"] if device.type == "cuda" else [])
    precision = pick_precision(device, args.precision)
    mem_kind = "peak allocated" if device.type == "cuda" else "params+grads+optimiser state"
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"precision {precision}{', compiled' if args.compile else ''}, batch {args.batch} x seq {args.seq}, {args.steps} timed steps (median); memory = {mem_kind}")
    head = f"{'preset':<11}{'params':>9}{'adapted':>9}{'trainable':>11}{'full ms':>9}{'relora ms':>11}{'time x':>8}{'full MiB':>10}{'relora MiB':>12}{'mem x':>7}{'opt full':>10}{'opt relora':>12}{'opt x':>7}"
    print(head)
    print("-" * len(head))
    MiB = 2**20
    for preset in args.presets:
        r = bench_preset(preset, args, device, precision)
        print(f"{r['preset']:<11}{r['params'] / 1e6:>8.2f}M{r['adapted_share']:>9.0%}{r['trainable_relora'] / 1e6:>10.2f}M"
              f"{r['t_full'] * 1e3:>9.1f}{r['t_relora'] * 1e3:>11.1f}{r['t_relora'] / r['t_full']:>8.2f}"
              f"{r['mem_full'] / MiB:>10.1f}{r['mem_relora'] / MiB:>12.1f}{r['mem_relora'] / r['mem_full']:>7.2f}"
              f"{r['opt_full'] / MiB:>9.1f}M{r['opt_relora'] / MiB:>11.1f}M{r['opt_relora'] / r['opt_full']:>7.2f}", flush=True)
    print("adapted = share of linear-layer FLOPs in the q,k,v,o,w1,w2,w3 matrices (the rest is the LM head);"
          " ReLoRA saves their weight gradients (~1/3 of their FLOPs) and their AdamW moments.")


if __name__ == "__main__":
    main()
