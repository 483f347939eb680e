"""FSDP2 vs DDP: training state held per rank, peak memory and step time, side by side.

For each method (full, relora) and layout (ddp, fsdp) the same model is trained for a few steps by
N processes (gloo on CPU, NCCL on GPUs) with rankscope's own pieces (Decoder, the method's
optimiser, `sharding.shard_model` or DistributedDataParallel). Per rank it reports:
  state    bytes of this rank's parameters + gradients + optimiser moments after a step (what FSDP
           divides by N; exact, from the tensors' local shards)
  peak     CUDA max_memory_allocated, or on CPU the process's peak RSS (VmHWM) above its RSS after
           `import torch` (includes the full model each rank builds before sharding)
  step     median seconds per optimiser step (forward + backward + AdamW)
and the fsdp / ddp ratios.

    python bench/fsdp_memory.py                                  # pico-small, 2 CPU ranks (~2 min)
    python bench/fsdp_memory.py --nproc 4 --preset pico-tiny
    torchrun is not needed: the script spawns its own processes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def local_bytes(t: torch.Tensor | None) -> int:
    from rankscope.parallel.sharding import local

    return 0 if t is None else local(t).numel() * local(t).element_size()


def worker(rank: int, world: int, port: int, args, layout: str, method: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    from rankscope.parallel import distributed, sharding
    from rankscope.methods import load_config
    from rankscope.methods import build_method
    from rankscope.model import Decoder
    from rankscope.core.runtime import autocast, pick_device, pick_precision

    base_rss = rss_kib("VmRSS")
    info = distributed.from_env()
    device = pick_device(args.device, info.local_rank)
    distributed.init(info, device)
    cfg = load_config(None, [f"model.preset={args.preset}", f"method.name={method}", f"train.seq_len={args.seq}", "train.warmup_steps=0",
                             *(f"method.{m}.dropout=0" for m in ("lora", "relora", "adaptive", "hybrid")),
                             "train.max_steps=400", *(f"method.{m}.{k}" for m in ("relora", "adaptive", "hybrid") for k in ("reset_every=40", "restart_warmup_steps=2"))])
    precision = pick_precision(device, args.precision)
    torch.manual_seed(0)
    model = Decoder(cfg.model)
    m = build_method(cfg)
    m.prepare_model(model)
    if layout == "fsdp":
        sharding.shard_model(model, precision, device)
        forward = model
    else:
        from torch.nn.parallel import DistributedDataParallel

        model.to(device)
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = m.build_optimizer(model, device)
    g = torch.Generator().manual_seed(rank)
    times, state = [], 0
    for i in range(args.steps):
        x = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with autocast(device, precision):
            loss = forward(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if i == args.steps - 1:  # gradients still held: the full training state of this rank
            state = sum(local_bytes(p) + local_bytes(p.grad) for p in model.parameters())
            state += sum(local_bytes(t) for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else (rss_kib("VmHWM") - base_rss) * 1024
    row = {"rank": rank, "state": state, "peak": peak, "step": statistics.median(times[1:] or times)}
    Path(out, f"{layout}-{method}-{rank}.json").write_text(json.dumps(row))
    model = forward = opt = None
    distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pico-small")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["full", "relora"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="fsdp_bench_")
    for method in args.methods:
        for layout in ("ddp", "fsdp"):  # one after the other: each layout has the machine to itself
            mp.spawn(worker, args=(args.nproc, free_port(), args, layout, method, out), nprocs=args.nproc, join=True)
    mib = 1 / 2**20
    print(f"\n{args.preset}, {args.nproc} ranks on {args.device}, batch {args.batch} x seq {args.seq} per rank, {args.precision}, {time.strftime('%Y-%m-%d')}")
    print("| method | layout | state / rank (MiB) | peak / rank (MiB) | step (s) |")
    print("|---|---|---|---|---|")
    summary = {}
    for method in args.methods:
        for layout in ("ddp", "fsdp"):
            rows = [json.loads(Path(out, f"{layout}-{method}-{r}.json").read_text()) for r in range(args.nproc)]
            s = {k: max(r[k] for r in rows) for k in ("state", "peak", "step")}  # the worst rank
            summary[(method, layout)] = s
            print(f"| {method} | {layout} | {s['state'] * mib:,.1f} | {s['peak'] * mib:,.1f} | {s['step']:.3f} |")
    print()
    for method in args.methods:
        d, f = summary[(method, "ddp")], summary[(method, "fsdp")]
        print(f"{method}: fsdp / ddp  state {f['state'] / d['state']:.2f}x  peak {f['peak'] / d['peak']:.2f}x  step time {f['step'] / d['step']:.2f}x")


if __name__ == "__main__":
    main()
