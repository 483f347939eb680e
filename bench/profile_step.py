"""Where a training step goes: torch.profiler over a few full-rank (or ReLoRA) steps of a preset.

    .venv/bin/python bench/profile_step.py [--preset pico-tiny-body] [--batch 16] [--seq 128] [--steps 5] [--threads 1]
                                          [--method full|relora] [--dropout 0.1] [--precision fp32|bf16] [--fused]

Prints wall time per phase (forward incl. the fused head + loss, backward, AdamW step) and the
self CPU time per op kind (matmul, attention, elementwise, reductions, copies/views, RNG, optimiser,
autograd bookkeeping), then the top ops. Phase times are CPU seconds of the process (time.process_time,
best of `--steps` unprofiled steps): on a shared machine the time it ran, not the time it waited.
`--fused` turns on the fused plain projections (rankscope.model.FUSED_LINEARS; LoRA adapters are
grouped as rankscope.model.GROUPED_ADAPTERS says).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rankscope import model as model_mod# noqa: E402
from rankscope.config import PRESETS, ModelConfig, TrainConfig  # noqa: E402
from rankscope.model import Decoder  # noqa: E402
from rankscope.optim import build_adamw, param_groups  # noqa: E402

KINDS = [  # (kind, substrings of the op name), first match wins
    ("optimizer (fused AdamW)", ("adam",)),
    ("matmul", ("mm", "matmul", "linear", "addmm", "bmm", "baddbmm")),
    ("attention (sdpa)", ("attention", "flash", "sdpa")),
    ("RNG (dropout masks)", ("rand", "uniform", "bernoulli", "dropout")),
    ("reductions / norms", ("sum", "mean", "rsqrt", "pow", "norm", "logsumexp", "max", "nll", "cross_entropy", "log_softmax", "softmax")),
    ("elementwise", ("mul", "add", "sub", "div", "silu", "neg", "sigmoid", "exp", "where", "ge", "lt", "threshold", "fill", "zero", "clamp")),
    ("copies / layout", ("copy", "cat", "clone", "contiguous", "to", "index", "embedding", "stack", "split", "chunk", "narrow", "empty",
                         "view", "reshape", "transpose", "permute", "expand", "slice", "select", "t", "unsqueeze", "squeeze",
                         "as_strided", "unbind", "detach", "alias", "_unsafe_view", "resize", "new_")),
]


def kind_of(name: str) -> str:
    n = name.lower().replace("aten::", "")
    for kind, keys in KINDS:
        if any(k == n or k in n for k in keys if len(k) > 2) or n in keys:
            return kind
    if "backward" in n or "autograd" in n or "accumulate" in n:
        return "autograd bookkeeping"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pico-tiny-body")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--method", choices=["full", "relora"], default="full")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--fused", action="store_true", help="fused projections on (rankscope.model.FUSED_LINEARS)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 master weights")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_mod.FUSED_LINEARS = args.fused
    torch.manual_seed(0)
    cfg = ModelConfig(**PRESETS[args.preset])
    model = Decoder(cfg)
    groups = param_groups(model, TrainConfig().weight_decay)
    if args.method == "relora":
        from rankscope.adapters.lora import lora_parameters, wrap_linears

        wrap_linears(model, ["wq", "wk", "wv", "wo", "w1", "w2", "w3"], args.rank, 2.0 * args.rank, args.dropout, 0)
        lora = lora_parameters(model)
        groups = param_groups(model, 0.0, exclude={id(p) for p in lora}) + [{"params": lora, "weight_decay": 0.0}]
    opt = build_adamw(groups, TrainConfig(), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)

    def step(prof: bool = False):
        t = [time.process_time()]
        with record_function("forward"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(x, y)
        t.append(time.process_time())
        with record_function("backward"):
            loss.backward()
        t.append(time.process_time())
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        t.append(time.process_time())
        return [b - a for a, b in zip(t, t[1:])]

    for _ in range(3):
        step()
    plain = [step() for _ in range(args.steps)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    phases = [min(s[i] for s in plain) for i in range(3)]
    total = sum(phases)
    tokens = args.batch * args.seq
    print(f"{args.preset} {args.method} (dropout {args.dropout if args.method == 'relora' else '-'}), {args.batch} x {args.seq}, "
          f"{args.threads} thread(s), {args.precision}, fused projections {'on' if args.fused else 'off'}: best step {total * 1e3:.1f} ms, {tokens / total:,.0f} tokens/s")
    for name, s in zip(("forward (+ head/loss)", "backward", "optimizer"), phases):
        print(f"  {name:24s} {s * 1e3:8.1f} ms  {s / total:6.1%}")
    by_kind: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    events = [e for e in prof.key_averages() if e.key not in ("forward", "backward", "optimizer")]
    self_total = sum(e.self_cpu_time_total for e in events)
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total
        counts[kind_of(e.key)] += e.count
    print("self time by op kind (profiler clock: wall, so the shares, not the ms, are what load leaves intact):")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:28s} {us / args.steps / 1e3:8.2f} ms  {us / self_total:6.1%}  {counts[kind] // args.steps:5d} calls")
    print(f"top {args.top} ops by self CPU time (per step):")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"  {e.key:48s} {e.self_cpu_time_total / args.steps / 1e3:8.2f} ms  {e.count // args.steps:5d} calls  [{kind_of(e.key)}]")


if __name__ == "__main__":
    main()
