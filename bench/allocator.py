"""glibc malloc as it comes against glibc kept from returning freed memory (`keep_freed_memory`), side by side.

A training step frees and re-allocates the same activation-sized buffers every time. glibc by default returns
freed memory at the top of its heap to the kernel (and serves large blocks by a fresh mmap), so the next step
touches new pages and takes a page fault on each 4 KiB of them. `keep_freed_memory` below keeps them (tried
in issue 27's ninth round and not adopted: the step times moved both ways, bench/README.md). Each (preset, method, precision, allocator) runs in its own process, one thread,
the two allocators alternating round by round; a round reports the process's median CPU seconds per step
(forward + backward + AdamW, bench/relora_vs_full.py's build, ReLoRA at rank 16 with dropout `--dropout`),
its page faults per step and its peak RSS.

    python bench/allocator.py [--presets pico-tiny-body] [--rounds 3] [--steps 8]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

SIDES = ("default", "keep")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """glibc's malloc set so that blocks up to 32 MiB (its largest mmap threshold on 64 bits) come from the heap, not
    a fresh mmap each, and freed memory up to 1 GiB stays in the heap (as MALLOC_MMAP_THRESHOLD_=33554432 and
    MALLOC_TRIM_THRESHOLD_=1073741824 set before start). RANKSCOPE_MALLOC=default leaves glibc as it comes; a
    no-op where malloc is not glibc's. True if applied."""
    if os.environ.get("RANKSCOPE_MALLOC", "keep") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: leave their allocator alone
            return False
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    applied = keep_freed_memory()  # RANKSCOPE_MALLOC=default (the parent sets it) leaves glibc as it comes
    import relora_vs_full as rv
    from rankscope.config import PRESETS

    device = torch.device("cpu")
    _, model, _, opt = rv.build(args.preset, args.method, SimpleNamespace(seq=args.seq, dropout=args.dropout, compile=False), device)
    tok = torch.randint(0, PRESETS[args.preset]["vocab_size"], (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = tok[:, :-1], tok[:, 1:]
    for _ in range(2):
        rv.step(model, opt, x, y, device, args.precision)
    times, faults = [], []
    for _ in range(args.steps):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
        rv.step(model, opt, x, y, device, args.precision)
        times.append(time.process_time() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(json.dumps({"applied": applied, "ms": statistics.median(times) * 1e3, "faults": statistics.median(faults),
                      "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["pico-tiny-body"])
    ap.add_argument("--methods", nargs="+", default=["full", "relora"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--worker", nargs=3, metavar=("PRESET", "METHOD", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.preset, args.method, args.precision = args.worker
        return worker(args)
    here = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(here.parent / "src"), str(here)])}
    print(f"1 thread per process, batch {args.batch} x {args.seq}, ReLoRA r 16 dropout {args.dropout}; {args.rounds} rounds, "
          f"{args.steps} steps each (median CPU ms/step, median page faults/step, peak RSS)")
    print(f"{'preset':<15}{'method':<8}{'prec':<6}{'default ms':>11}{'keep ms':>9}{'keep/default':>13}"
          f"{'faults default':>16}{'keep':>7}{'RSS default MiB':>17}{'keep':>7}")
    best: dict[tuple[str, str, str, str], float] = {}
    for preset in args.presets:
        for method in args.methods:
            for precision in args.precisions:
                runs: dict[str, list[dict]] = {s: [] for s in SIDES}
                for r in range(args.rounds):
                    for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                        cmd = [sys.executable, __file__, "--worker", preset, method, precision, "--batch", str(args.batch),
                               "--seq", str(args.seq), "--dropout", str(args.dropout), "--steps", str(args.steps)]
                        out = subprocess.run(cmd, env={**env, "RANKSCOPE_MALLOC": side}, capture_output=True, text=True, check=True)
                        runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
                assert all(r["applied"] for r in runs["keep"]) and not any(r["applied"] for r in runs["default"])
                ms = {s: min(r["ms"] for r in runs[s]) for s in SIDES}
                best.update({(preset, method, precision, s): ms[s] for s in SIDES})
                faults = {s: statistics.median(r["faults"] for r in runs[s]) for s in SIDES}
                rss = {s: max(r["rss_mib"] for r in runs[s]) for s in SIDES}
                print(f"{preset:<15}{method:<8}{precision:<6}{ms['default']:>11.1f}{ms['keep']:>9.1f}{ms['keep'] / ms['default']:>13.2f}"
                      f"{faults['default']:>16.0f}{faults['keep']:>7.0f}{rss['default']:>17.0f}{rss['keep']:>7.0f}", flush=True)
    print("ms: the best round's median; faults: minor page faults per step; RSS: the process's peak (ru_maxrss)")
    for preset in args.presets:
        for precision in args.precisions:
            if {"full", "relora"} <= set(args.methods):
                ratio = {s: best[preset, "relora", precision, s] / best[preset, "full", precision, s] for s in SIDES}
                print(f"{preset} {precision}: ReLoRA / full-rank step {ratio['default']:.2f} with glibc's default, {ratio['keep']:.2f} keeping freed memory")


if __name__ == "__main__":
    main()
