"""The Philox dropout-mask kernel against another checkout's, side by side: microseconds per mask.

Both sources are built (rankscope.kernels.build, named per source, so they do not rebuild each other) and
called in one process, rounds interleaved, best of the rounds, at the adapted inputs' sizes of pico-tiny-body
(N = 2048 tokens x 96 and x 384), p = 0.1, fp32, one thread.

    python bench/dropout_mask.py --old-src /tmp/rankscope-OLD/src
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rankscope.adapters.paths import _threshold
from rankscope.kernels import build, dropout_mask


def per_call_us(ext, n: int, reps: int) -> float:
    ext.mask(n, 12345, _threshold(0.1), 1 / 0.9, torch.float32)
    t0 = time.perf_counter()
    for i in range(reps):
        ext.mask(n, 12345 + i, _threshold(0.1), 1 / 0.9, torch.float32)
    return (time.perf_counter() - t0) / reps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-src", required=True, help="the other checkout's src folder")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    old_cpp = Path(args.old_src) / "rankscope" / "kernels" / "dropout_mask.cpp"
    exts = {"old": build.extension(old_cpp, "the other checkout's dropout-mask kernel", "nothing"),
            "new": dropout_mask.extension()}
    if None in exts.values():
        raise SystemExit("a kernel could not be built: see the warning above")
    print(f"1 thread, fp32, p 0.1; best of {args.rounds} interleaved rounds of {args.reps} masks; old = {old_cpp}")
    for n in (2048 * 96, 2048 * 384):
        best = {k: float("inf") for k in exts}
        for r in range(args.rounds):
            for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
                best[k] = min(best[k], per_call_us(exts[k], n, args.reps))
        print(f"{n:>8} elements: old {best['old']:7.1f} us, new {best['new']:7.1f} us, new / old {best['new'] / best['old']:.2f}"
              f" ({best['new'] * 1e3 / n:.2f} ns per element)")


if __name__ == "__main__":
    main()
