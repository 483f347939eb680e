"""Training throughput of rankscope's Decoder vs the machine's matmul peak and vs Hugging Face Llama.

Run: `.venv/bin/python bench/throughput.py [--rounds 3] [--no-compile] [--no-memory] [--presets micro mini pico-tiny]`

In one run it measures, on this CPU:
  (a) the matmul peak, fp32 and bf16: square n x n matmuls (n in 1024, 2048, 4096), best of 5,
      re-measured between presets and at the end; the best seen in the run is the peak;
  (b) full-rank training tokens/s of `rankscope.model.Decoder` (forward + backward + AdamW step +
      zero_grad, AdamW built exactly as `rankscope.optim.build_adamw` does) in fp32 and bf16
      autocast, and MFU = model FLOPs/s / measured peak of the same precision;
  (c) `transformers.LlamaForCausalLM` (attn_implementation="sdpa") + `torch.optim.AdamW` at the
      same shape, batch and precision, timed the same way and interleaved with ours, round by
      round, so load from other processes hits both alike; reported as the ratio ours / HF;
  (d) peak memory: each (model, precision) is re-run for 3 steps in a fresh subprocess and we
      report VmHWM (peak resident set, /proc/self/status) minus the RSS right after `import
      torch`: weights + grads + AdamW moments + activations + allocator slack. tracemalloc does
      not see torch's allocations, so it cannot be used.
Ours runs with the settings `train.precision: auto` / `train.compile: auto` pick (rankscope.train.autotune's
measurement, run here for each preset, compile trial included), HF at the same precision both eager
and under `torch.compile` of its forward + loss (inductor; compile time excluded by two warm-up
steps): the ratios ours / HF-eager and ours / HF-compiled, side by side in one run.

Model FLOPs per token = 6 * N + 12 * L * d * T (Kaplan et al. 2020 / PaLM appendix B), where N
counts every matmul weight (attention, MLP and the lm_head; norms too, which are negligible) but
not the embedding table (a lookup, no FLOPs), L is layers, d = n_heads * head_dim, T the sequence
length. The attention term counts the full T x T score matrix, as the standard formula does.
Timings are best-of-N over rounds of a few steps, in CPU seconds of this process (time.process_time;
one thread: the time it ran, not the time other processes held the core): the machine is shared, the
best is the least disturbed. A Markdown table is printed at the end for the README.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rankscope.config import PRESETS, ModelConfig, TrainConfig  # noqa: E402
from rankscope.model import Decoder  # noqa: E402
from rankscope.optim import build_adamw, param_groups  # noqa: E402
from rankscope.core.runtime import autocast  # noqa: E402

CPU = torch.device("cpu")


@dataclass
class Shape:
    preset: str
    batch: int
    seq: int
    per_round: int  # steps per timing round


# batch x seq: 4096 tokens per step for the CPU presets; pico-tiny uses seq 256 (not the paper's
# 2048) and 1024 tokens per step to keep the run to a few minutes on 2 cores
SHAPES = [Shape("micro", 32, 128, 3), Shape("mini", 16, 256, 2), Shape("pico-tiny", 4, 256, 1),
          Shape("pico-tiny-body", 16, 128, 1)]  # the study's model at the study's batch (issue 27)


# --------------------------------------------------------------------------- (a) matmul peak
def matmul_peak(dtype: torch.dtype, sizes=(1024, 2048, 4096), repeats: int = 5) -> tuple[float, int]:
    """Best FLOP/s of an n x n @ n x n matmul over sizes and repeats; returns (flops_per_s, n)."""
    best, best_n = 0.0, 0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up: thread pool, packing buffers
        for _ in range(repeats):
            t0 = time.process_time()
            a @ b
            rate = 2 * n**3 / (time.process_time() - t0)
            if rate > best:
                best, best_n = rate, n
    return best, best_n


def update_peak(peak: dict[str, float], verbose: bool = False) -> None:
    """Raise `peak` to the best matmul rate measured now (called at the start, between presets
    and at the end: on a shared machine a single measurement can be far below the true peak)."""
    for prec, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rate, n = matmul_peak(dtype)
        peak[prec] = max(peak[prec], rate)
        if verbose:
            print(f"matmul peak {prec}: {rate / 1e9:,.0f} GFLOP/s now (n={n}); best this run {peak[prec] / 1e9:,.0f} GFLOP/s", flush=True)


# --------------------------------------------------------------------------- models
def model_config(preset: str, seq: int) -> ModelConfig:
    return ModelConfig(**{**PRESETS[preset], "max_seq_len": max(seq, PRESETS[preset]["max_seq_len"])})


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
    with torch.device("meta"):
        n = Decoder(cfg).num_params()
    n_matmul = n - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)  # embedding lookup: no FLOPs
    return 6 * n_matmul + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq


def build_ours(cfg: ModelConfig, compile: bool = False):
    torch.manual_seed(0)
    model = Decoder(cfg)
    tcfg = TrainConfig()
    opt = build_adamw(param_groups(model, tcfg.weight_decay), tcfg, CPU)
    fwd = torch.compile(model) if compile else model

    def loss_fn(x, y):
        return fwd(x, y)

    return model, opt, loss_fn


def auto_settings(cfg: ModelConfig, shape: Shape) -> dict:
    """What `train.precision: auto` + `train.compile: auto` pick for this preset and batch
    (rankscope.train.autotune's own measurement, with the compile trial always run)."""
    import rankscope.train.autotune as autotune
    from rankscope.config import RunConfig

    run = RunConfig()
    run.model, run.train.batch_size, run.train.seq_len = cfg, shape.batch, shape.seq
    model, _, _ = build_ours(cfg)
    old, autotune.COMPILE_MIN_RUN_S = autotune.COMPILE_MIN_RUN_S, 0.0
    try:
        settings, _ = autotune.measure(run, model, CPU, True, True, torch.compile, log=lambda *_: None)
    finally:
        autotune.COMPILE_MIN_RUN_S = old
    return settings


def build_hf(cfg: ModelConfig, compile: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    hcfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                       head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
                       rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(hcfg)
    tcfg = TrainConfig()
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps, weight_decay=tcfg.weight_decay)

    def loss_of(x, y):
        logits = model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))  # the same loss as ours

    # the best a user of the peer would do: compile the model's forward and the loss together
    loss_fn = torch.compile(loss_of) if compile else loss_of
    return model, opt, loss_fn


def make_step(model: nn.Module, opt, loss_fn, precision: str):
    def step(x, y):
        with autocast(CPU, precision):
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    return step


def batch(cfg: ModelConfig, shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, cfg.vocab_size, (shape.batch, shape.seq + 1), generator=g)
    return toks[:, :-1].contiguous(), toks[:, 1:].contiguous()


def time_steps(step, x, y, n: int) -> float:
    t0 = time.process_time()
    for _ in range(n):
        step(x, y)
    return (time.process_time() - t0) / n


def interleaved(steps: dict[str, object], x, y, rounds: int, per_round: int, warmup: int = 1) -> dict[str, float]:
    """Best seconds/step of each entry, measured round-robin so shared-machine load hits all alike."""
    for step in steps.values():
        for _ in range(warmup):
            step(x, y)
    best = {k: float("inf") for k in steps}
    for _ in range(rounds):
        for k, step in steps.items():
            best[k] = min(best[k], time_steps(step, x, y, per_round))
    return best


# --------------------------------------------------------------------------- (d) memory probe
def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def memory_probe(impl: str, preset: str, batch_size: int, seq: int, precision: str) -> None:
    """Child process: peak RSS above the after-import baseline over 2 training steps; prints JSON."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    if impl == "hf":
        import transformers  # noqa: F401  (imported before the baseline, like torch)
    base = rss_bytes("VmRSS")
    cfg = model_config(preset, seq)
    model, opt, loss_fn = build_hf(cfg) if impl == "hf" else build_ours(cfg)
    step = make_step(model, opt, loss_fn, precision)
    x, y = batch(cfg, Shape(preset, batch_size, seq, 1))
    for _ in range(2):  # step 2 holds weights, grads, AdamW moments and activations at once
        step(x, y)
    print(json.dumps({"peak_delta": rss_bytes("VmHWM") - base}))


def peak_memory(impl: str, shape: Shape, precision: str) -> int | None:
    cmd = [sys.executable, __file__, "--memory-probe", impl, shape.preset, str(shape.batch), str(shape.seq), precision]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BENCH_THREADS": str(torch.get_num_threads())})
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_delta"]
    except (IndexError, json.JSONDecodeError, KeyError):
        print(f"  memory probe failed: {out.stderr.strip()[-300:]}", file=sys.stderr)
        return None


# --------------------------------------------------------------------------- main
def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="*", default=[s.preset for s in SHAPES[:3]], help="subset of micro, mini, pico-tiny, pico-tiny-body (default: the first three)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (best is kept)")
    ap.add_argument("--no-compile", action="store_true", help="skip HF compiled (ours still compiles where auto picks it)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--memory-probe", nargs=5, metavar=("IMPL", "PRESET", "BATCH", "SEQ", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        impl, preset, b, s, prec = args.memory_probe
        memory_probe(impl, preset, int(b), int(s), prec)
        return

    import transformers

    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    print(f"# rankscope throughput bench: {cpu_model()}, {threads} threads, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    peak = {"fp32": 0.0, "bf16": 0.0}
    update_peak(peak, verbose=True)

    rows = []
    for shape in [s for s in SHAPES if s.preset in args.presets]:
        cfg = model_config(shape.preset, shape.seq)
        x, y = batch(cfg, shape)
        fpt = flops_per_token(cfg, shape.seq)
        tokens = shape.batch * shape.seq
        auto = auto_settings(cfg, shape)
        prec = auto["precision"]
        ours = build_ours(cfg, compile=auto["compile"])
        hf, hfc = build_hf(cfg), (None if args.no_compile else build_hf(cfg, compile=True))
        steps = {"ours": make_step(*ours, prec), "hf": make_step(*hf, prec)}
        if not args.no_compile:
            steps["hf_compiled"] = make_step(*hfc, prec)
        best = interleaved(steps, x, y, args.rounds, shape.per_round, warmup=2)  # warm-up 2: compile (forward, backward)
        del ours, hf, hfc, steps
        gc.collect()
        mem = {impl: (None if args.no_memory else peak_memory(impl, shape, "fp32")) for impl in ("ours", "hf")}
        row = {"preset": shape.preset, "batch": shape.batch, "seq": shape.seq, "precision": prec, "compile": auto["compile"],
               "auto_timings": auto["timings_s"], "ours_tok_s": tokens / best["ours"], "hf_tok_s": tokens / best["hf"],
               "hfc_tok_s": tokens / best["hf_compiled"] if "hf_compiled" in best else None, "flops_per_token": fpt,
               "ours_mem": mem["ours"], "hf_mem": mem["hf"]}
        row["ratio"] = row["ours_tok_s"] / row["hf_tok_s"]
        row["ratio_c"] = row["ours_tok_s"] / row["hfc_tok_s"] if row["hfc_tok_s"] else None
        rows.append(row)
        print(f"{shape.preset:9s} auto picked {prec}, {'compiled' if auto['compile'] else 'eager'} "
              f"(s per fwd+bwd: {', '.join(f'{k} {v:.3f}' for k, v in auto['timings_s'].items())})\n"
              f"          ours {row['ours_tok_s']:9,.0f} tok/s, HF eager {row['hf_tok_s']:9,.0f}, HF compiled {_tok(row['hfc_tok_s'])}; "
              f"ours/HF-eager {row['ratio']:.2f}x, ours/HF-compiled {_ratio(row['ratio_c'])}; "
              f"peak mem (fp32 eager) ours {_mib(row['ours_mem'])} HF {_mib(row['hf_mem'])}", flush=True)
        update_peak(peak)  # the peak is the best seen all run: load from other processes only lowers it
    compile_line = None

    update_peak(peak, verbose=True)
    for r in rows:
        achieved = r["flops_per_token"] * r["ours_tok_s"]
        r["ours_mfu"], r["hf_mfu"] = achieved / peak[r["precision"]], r["flops_per_token"] * r["hf_tok_s"] / peak[r["precision"]]
        r["ours_of_best_peak"] = achieved / max(peak.values())
    print_table(rows, peak, threads, compile_line)
    print(f"\nload average at end {os.getloadavg()[0]:.1f} (above {threads}: other processes shared the cores; tokens/s are then low and "
          "ratios only indicative, although interleaving spreads the load over both sides)")
    print(f"\n(bench took {time.perf_counter() - t_start:.0f} s)")


def _tok(v: float | None) -> str:
    return "n/a" if v is None else f"{v:9,.0f}"


def _ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f} MiB"


def print_table(rows: list[dict], peak: dict[str, float], threads: int, compile_line: str | None) -> None:
    best_prec = max(peak, key=peak.get)
    print(f"\n### Training throughput ({datetime.date.today().isoformat()}, {cpu_model()}, {threads} threads, torch {torch.__version__})\n")
    print(f"Matmul peak: fp32 {peak['fp32'] / 1e9:,.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:,.0f} GFLOP/s. "
          f"MFU = (6N + 12LdT) x tokens/s / peak of the same precision; 'of best peak' divides by the {best_prec} peak. "
          "Step = forward + backward + AdamW step, best of interleaved rounds. Peak memory = peak RSS above the after-import baseline.\n")
    print("| preset | batch x seq | auto picked | rankscope tok/s | HF eager tok/s | HF compiled tok/s | ours / HF eager | ours / HF compiled "
          "| MFU ours | ours of best peak | peak mem ours | peak mem HF |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['batch']} x {r['seq']} | {r['precision']}, {'compiled' if r['compile'] else 'eager'} | {r['ours_tok_s']:,.0f} "
              f"| {r['hf_tok_s']:,.0f} | {_tok(r['hfc_tok_s']).strip()} | {r['ratio']:.2f}x | {_ratio(r['ratio_c'])} | "
              f"{r['ours_mfu']:.1%} | {r['ours_of_best_peak']:.1%} | {_mib(r['ours_mem'])} | {_mib(r['hf_mem'])} |")
    if compile_line:
        print(f"\n{compile_line}")


if __name__ == "__main__":
    main()
