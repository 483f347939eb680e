"""Short runs of the paper configs (configs/paper/*.yaml) on this machine's device: tokens/s,
MFU (GPU, against the datasheet peak in rankscope.core.runtime.GPU_PEAKS), peak memory, optimiser
state, full-rank vs ReLoRA side by side in one run.

    python bench/paper_steps.py --steps 30 --batch 16 --accum 2 [--sources python] [--tokenizer PATH] [--compile]

The paper's batch is 1024 x 2048 (grad_accum 64 of 16); a few steps at a smaller accumulation
measure the same per-token speed. Runs go to a temporary folder and are deleted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rankscope.methods import load_config
from rankscope.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["full-pico-tiny", "relora-pico-tiny", "full-pico-small", "relora-pico-small"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--sources", default="python", help="embedded corpus sources, comma-separated")
    ap.add_argument("--tokenizer", default="olmo", help="olmo or a tokenizer.json path")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            over = [f"train.max_steps={args.steps}", f"train.batch_size={args.batch}", f"train.grad_accum={args.accum}",
                    f"train.seq_len={args.seq}", f"train.warmup_steps={max(1, args.steps // 10)}", "train.eval_every=0",
                    "train.eval_batches=1", "train.progress=false", "train.log_every=5", f"train.compile={str(args.compile).lower()}",
                    f"data.sources=[{args.sources}]", f"data.tokenizer={args.tokenizer}", f"data.cache_dir={tmp}/data",
                    "checkpoint.every=0", "eval.per_domain=false", "method.save_cycle_updates=false", *args.extra]
            cfg = load_config(ROOT / "configs" / "paper" / f"{name}.yaml", over)
            s = train(cfg, Path(tmp) / name, log=lambda *_: None)
            rows.append({"config": name, **{k: s.get(k) for k in ("tokens_per_s", "mfu", "peak_memory_bytes", "optimizer_state_bytes", "trainable_params", "final_train_loss", "precision")}})
    print(f"\n| config | precision | tokens/s | MFU | peak memory | optimiser state | trainable params | loss after {args.steps} steps |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
        print(f"| {r['config']} | {r['precision']} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_memory_bytes'] / 2**30:.2f} GiB | "
              f"{r['optimizer_state_bytes'] / 2**20:.1f} MiB | {r['trainable_params']:,} | {r['final_train_loss']:.3f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
