"""Today's code against another checkout of rankscope, side by side: training tokens/s at one preset.

    .venv/bin/python bench/speedup.py --old-src /tmp/rankscope-ff51925/src [--preset pico-tiny-body] [--batch 16] [--seq 128]
                                      [--rounds 4] [--steps 3] [--methods full relora] [--dropout 0.1] [--parallel]

Each (source, precision, method) runs in its own subprocess with that checkout first on sys.path, one
thread, eager or `--compile`d (forward + fused head/loss + backward + fused AdamW step + zero_grad, as bench/throughput.py);
the subprocesses alternate round by round, so load from other processes hits old and new alike. A
round reports the median CPU seconds per step of the process (time.process_time: on a shared machine
the time the process ran, not the time it waited). ReLoRA: every linear adapted at rank 16, alpha 32,
adapter dropout `--dropout` (the factored path; peft's one mask per adapted linear).

Make the old checkout with e.g. `mkdir /tmp/rankscope-ff51925 && git archive ff51925 src | tar -x -C /tmp/rankscope-ff51925`.

`--parallel` also measures threads per run against runs per core for the new code: one run with 2
threads against 2 runs of 1 thread at once (total tokens/s of the machine, wall time), the numbers a
study's `parallel` setting should follow.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

NEW_SRC = str(Path(__file__).resolve().parents[1] / "src")


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import rankscope.model
    from rankscope.config import PRESETS, ModelConfig, TrainConfig
    from rankscope.model import Decoder
    from rankscope.optim import build_adamw, param_groups

    if args.paths != "default":  # plain: both off; fused: both on (rankscope.model.FUSED_LINEARS, GROUPED_ADAPTERS)
        rankscope.model.FUSED_LINEARS = rankscope.model.GROUPED_ADAPTERS = args.paths == "fused"
    torch.manual_seed(0)
    cfg = ModelConfig(**PRESETS[args.preset])
    model = Decoder(cfg)
    tcfg = TrainConfig()
    if args.method == "relora":
        try:
            from rankscope.adapters.lora import lora_parameters, wrap_linears
        except ModuleNotFoundError:  # a checkout from before the package moved (e.g. ff51925)
            from rankscope.methods.lora import lora_parameters, wrap_linears

        wrap_linears(model, ["wq", "wk", "wv", "wo", "w1", "w2", "w3"], 16, 32.0, args.dropout, 0)
        lora = lora_parameters(model)
        groups = param_groups(model, tcfg.weight_decay, exclude={id(p) for p in lora}) + [{"params": lora, "weight_decay": tcfg.weight_decay}]
    else:
        groups = param_groups(model, tcfg.weight_decay)
    opt = build_adamw(groups, tcfg, torch.device("cpu"))
    fwd = torch.compile(model) if args.compile else model  # warm-up steps below compile it (excluded)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    cpu, wall = [], []
    for i in range(args.steps + 2):
        t0, w0 = time.process_time(), time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:  # two warm-up steps
            cpu.append(time.process_time() - t0)
            wall.append(time.perf_counter() - w0)
    print(json.dumps({"cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall), "src": __import__("rankscope").__file__}))


def run(src: str, method: str, args, threads: int = 1, precision: str = "fp32", paths: str = "default") -> dict:
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--precision", precision, "--preset", args.preset, "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--dropout", str(args.dropout), "--threads", str(threads)] + \
        (["--compile"] if args.compile else []) + ["--paths", paths]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert res["src"].startswith(src), f"{res['src']} is not under {src}"
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-src", help="the other checkout's src folder (today's code: ff51925)")
    ap.add_argument("--preset", default="pico-tiny-body")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["full", "relora"])
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--sides", nargs="+", default=["old:fp32", "new:fp32", "new:bf16"],
                    help="CHECKOUT:PRECISION pairs timed side by side (bf16: autocast, fp32 master weights); "
                         "CHECKOUT old, new (its defaults), plain or fused (new with rankscope.model.FUSED_LINEARS and "
                         "GROUPED_ADAPTERS both off / both on)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model in every worker (compile time excluded)")
    ap.add_argument("--parallel", action="store_true", help="also: 1 run x 2 threads against 2 runs x 1 thread (new code)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="full", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--paths", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    tokens = args.batch * args.seq
    print(f"# {args.preset}, {args.batch} x {args.seq}, {'compiled' if args.compile else 'eager'}, 1 thread, ReLoRA r 16 dropout {args.dropout}; "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    srcs = {"new": NEW_SRC, "plain": NEW_SRC, "fused": NEW_SRC, "old": args.old_src}
    sides = [s for s in args.sides if srcs[s.split(":")[0]]]
    cpu = {(s, m): [] for s in sides for m in args.methods}
    for r in range(args.rounds):
        for m in args.methods:
            for s in sides:
                side, prec = s.split(":")
                res = run(srcs[side], m, args, precision=prec, paths=side if side in ("plain", "fused") else "default")
                cpu[s, m].append(res["cpu_s"])
                print(f"round {r} {m:6s} {s}: {res['cpu_s'] * 1e3:7.1f} ms CPU/step ({res['wall_s'] * 1e3:7.1f} ms wall), "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
    best = {k: min(v) for k, v in cpu.items()}
    ref = sides[0]
    print(f"\n| method | {' | '.join(f'{s} tokens/s' for s in sides)} | {' | '.join(f'{s} / {ref}' for s in sides[1:])} |")
    print("|---|" + "---:|" * (2 * len(sides) - 1))
    for m in args.methods:
        print(f"| {m} | {' | '.join(f'{tokens / best[s, m]:,.0f}' for s in sides)} | "
              f"{' | '.join(f'{best[ref, m] / best[s, m]:.2f}x' for s in sides[1:])} |")
    if "relora" in args.methods and "full" in args.methods:
        for s in sides:
            print(f"{s}: ReLoRA (dropout {args.dropout}) step / full-rank step = {best[s, 'relora'] / best[s, 'full']:.2f}x")
    if args.parallel:
        parallel(args)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


def parallel(args) -> None:
    """Machine tokens/s: one run with 2 threads vs two 1-thread runs at once (wall time, new code)."""
    rates = {"1 run x 2 threads": [], "2 runs x 1 thread": []}
    for _ in range(args.rounds):
        rates["1 run x 2 threads"].append(args.batch * args.seq / run(NEW_SRC, "full", args, threads=2)["wall_s"])
        env = {**os.environ, "PYTHONPATH": NEW_SRC, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--worker", "--method", "full", "--preset", args.preset, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--threads", "1"]
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
        walls = [json.loads(p.communicate()[0].strip().splitlines()[-1])["wall_s"] for p in procs]
        rates["2 runs x 1 thread"].append(sum(args.batch * args.seq / w for w in walls))
    for k, v in rates.items():
        print(f"{k}: {max(v):,.0f} tokens/s of the machine (best of {len(v)}; all {', '.join(f'{x:,.0f}' for x in v)})")


if __name__ == "__main__":
    main()
