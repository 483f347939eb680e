"""The fused LM head + loss (rankscope.losses) vs the unfused head, pico-tiny training steps.

Run: `.venv/bin/python bench/fused_head.py [--batch 4] [--seq 256] [--steps 6] [--threads 1]`

Each variant trains in a fresh subprocess (forward + backward + AdamW step, fp32): peak memory
is VmHWM (peak resident set, /proc/self/status) minus the RSS right after `import torch`, as in
bench/throughput.py (tracemalloc cannot see torch's allocator). Step time is the median of the steps after the first.
The unfused variant is `F.cross_entropy(lm_head(h).float(), targets)`, the head before the fusion.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def child(variant: str, batch: int, seq: int, steps: int, threads: int) -> None:
    import torch

    base = rss_kib("VmRSS")
    torch.set_num_threads(threads)
    sys.path.insert(0, SRC)
    import torch.nn.functional as F

    from rankscope.config import PRESETS, ModelConfig, TrainConfig
    from rankscope.model import Decoder
    from rankscope.optim import build_adamw, param_groups

    torch.manual_seed(0)
    model = Decoder(ModelConfig(**PRESETS["pico-tiny"]))
    opt = build_adamw(param_groups(model, 0.1), TrainConfig(), torch.device("cpu"))
    x = torch.randint(0, model.cfg.vocab_size, (batch, seq))
    y = torch.randint(0, model.cfg.vocab_size, (batch, seq))

    def loss_fn():
        if variant == "fused":
            return model(x, y)
        logits = model(x)  # (B, T, V)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))

    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    print(json.dumps({"variant": variant, "peak_above_import_mib": (rss_kib("VmHWM") - base) / 1024, "step_s": statistics.median(times[1:]),
                      "losses": losses}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.batch, a.seq, a.steps, a.threads)
    out = {}
    for variant in ("unfused", "fused"):
        cmd = [sys.executable, __file__, "--child", variant, "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps),
               "--threads", str(a.threads)]
        out[variant] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    u, f = out["unfused"], out["fused"]
    print(f"pico-tiny {a.batch} x {a.seq}, fp32, {a.threads} thread(s)")
    for r in (u, f):
        print(f"  {r['variant']:8s} peak RSS above import {r['peak_above_import_mib']:7.1f} MiB   step {r['step_s'] * 1e3:7.1f} ms   "
              f"tokens/s {a.batch * a.seq / r['step_s']:8.0f}")
    mem = f["peak_above_import_mib"] / u["peak_above_import_mib"]
    print(f"  fused / unfused: peak memory {mem:.2f}x, tokens/s {u['step_s'] / f['step_s']:.2f}x; "
          f"max |loss difference| {max(abs(p - q) for p, q in zip(u['losses'], f['losses'])):.2e}")


if __name__ == "__main__":
    main()
