"""BLiMP throughput on pico-tiny (random init): batched vs one sentence at a time, side by side.

    .venv/bin/python bench/blimp_throughput.py [--subset 200] [--batch-size 64] [--threads 1] [--full]

Both modes run the same scorer (rankscope.evaluate.blimp.sentence_logprobs) on the same pairs;
"one-by-one" is batch size 1 (no padding), "batched" right-pads up to --batch-size sentences.
Prints pairs/s of each, their ratio, the largest score difference between the two, and the
extrapolated time for all 67,000 pairs; --full (or an extrapolation under --full-limit seconds)
then scores all of them once. Tokenizer: OLMo's (ai2-olmo-eval) if installed, else a BPE
trained on the BLiMP sentences themselves.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from rankscope.config import PRESETS, ModelConfig
from rankscope.core.errors import DataError
from rankscope.evaluate.blimp import SHARED_BLIMP, accuracy, load_pairs, sentence_logprobs
from rankscope.model import Decoder


def tokenizer_for(pairs):
    from rankscope.data.tokenizer import TextTokenizer, olmo_tokenizer_path, train_bpe

    try:
        return TextTokenizer.load(olmo_tokenizer_path()), "olmo (ai2-olmo-eval)"
    except DataError:
        return train_bpe([p.good for p in pairs] + [p.bad for p in pairs], 50_000), "bpe trained on BLiMP"


def subset(pairs, n):
    """n pairs spread over every paradigm (the first n/67 of each)."""
    per = max(1, n // len({p.uid for p in pairs}))
    seen: dict[str, int] = {}
    out = []
    for p in pairs:
        if seen.get(p.uid, 0) < per:
            seen[p.uid] = seen.get(p.uid, 0) + 1
            out.append(p)
    return out


def timed(model, tok, pairs, bs, precision="fp32"):
    sents = [p.good for p in pairs] + [p.bad for p in pairs]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    lp = sentence_logprobs(model, tok, sents, batch_size=bs, precision=precision)
    return time.perf_counter() - t0, lp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blimp", default=str(SHARED_BLIMP))
    ap.add_argument("--subset", type=int, default=201, help="pairs in the side-by-side comparison")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="also time bf16 autocast and compare its scores with fp32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU is shared)")
    ap.add_argument("--full", action="store_true", help="score all pairs whatever the extrapolation")
    ap.add_argument("--full-limit", type=float, default=300.0, help="run the full set when extrapolated below this many seconds")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pairs = load_pairs(args.blimp)
    tok, tok_name = tokenizer_for(pairs)
    torch.manual_seed(0)
    model = Decoder(ModelConfig(**PRESETS["pico-tiny"])).eval().to(args.device)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"pico-tiny ({model.num_params():,} params, random init), tokenizer {tok_name}, {where}, "
          f"{len(pairs):,} pairs in {args.blimp}")
    sub = subset(pairs, args.subset)
    timed(model, tok, sub[:5], args.batch_size)  # warm-up
    t1, lp1 = timed(model, tok, sub, 1)
    tb, lpb = timed(model, tok, sub, args.batch_size)
    print(f"subset {len(sub)} pairs: one-by-one {len(sub) / t1:8.1f} pairs/s ({t1:.2f} s) | batched (bs {args.batch_size}) "
          f"{len(sub) / tb:8.1f} pairs/s ({tb:.2f} s) | speed-up {t1 / tb:.1f}x | max |dlogp| {np.abs(lp1 - lpb).max():.2e}")
    if args.bf16:
        t16, lp16 = timed(model, tok, sub, args.batch_size, "bf16")
        agree = np.mean((lp16[: len(sub)] > lp16[len(sub) :]) == (lpb[: len(sub)] > lpb[len(sub) :]))
        print(f"bf16 autocast batched: {len(sub) / t16:8.1f} pairs/s ({tb / t16:.2f}x fp32 batched) | max |dlogp| vs fp32 "
              f"{np.abs(lp16 - lpb).max():.3f} | same verdict on {agree:.1%} of pairs")
    big = subset(pairs, 10 * args.subset)
    tb2, _ = timed(model, tok, big, args.batch_size)
    rate = len(big) / tb2
    est = len(pairs) / rate
    print(f"batched on {len(big)} pairs: {rate:.1f} pairs/s; extrapolated for all {len(pairs):,} pairs: {est:.0f} s ({est / 60:.1f} min)")
    if args.full or est < args.full_limit:
        tf, lp = timed(model, tok, pairs, args.batch_size)
        acc = accuracy(pairs, lp[: len(pairs)], lp[len(pairs) :])
        print(f"full BLiMP: {len(pairs):,} pairs in {tf:.1f} s ({len(pairs) / tf:.1f} pairs/s); accuracy of the random model "
              f"{acc['overall']['accuracy']:.4f} ({acc['overall']['ties']} ties)")
    else:
        print(f"full run skipped (extrapolated {est:.0f} s > --full-limit {args.full_limit:.0f} s; pass --full to force)")


if __name__ == "__main__":
    main()
