"""`train.precision: auto` and `train.compile: auto`, chosen by timing the run's own model.

For a run long enough to repay it (train.max_steps >= train.autotune_min_steps), a few forward +
backward passes of the run's model at its batch shape are timed in each candidate: fp32 and bf16
autocast eager (bf16 only where the device has native bf16), then torch.compile at the faster of
the two when the run is long enough to repay a compile (estimated run time >= COMPILE_MIN_RUN_S).
The fastest wins. The optimiser step is left out: it is the same in every candidate (fp32 master
weights). Shorter runs, and runs under torchrun, take the static choice (runtime.pick_precision,
no compile).

What the timing does to the run: nothing. It runs on the run's model in train mode with random
token ids from its own generator, inside `torch.random.fork_rng` (the run's RNG stream, hence its
dropout masks and batches, is untouched), and drops the gradients afterwards; the weights are not
stepped. A compiled winner keeps its compiled module, so the run does not compile twice.

Results are cached as JSON per (device model, threads, torch version, model shape, batch shape,
method) at train.autotune_cache (default: $XDG_CACHE_HOME/rankscope/autotune.json, else
~/.cache/rankscope/autotune.json), so later runs start at once. A resumed run reuses the choice in
its own env.json, so a run never changes precision halfway.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from rankscope.core.runtime import autocast, cpu_has_fast_bf16, pick_precision

COMPILE_MIN_RUN_S = 300.0  # a CPU inductor compile of these models takes tens of seconds
TIMED_STEPS = 3


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rankscope" / "autotune.json"


@functools.cache
def device_model(device_type: str, index: int | None = None) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name(index)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cache_key(cfg, device: torch.device) -> str:
    m, t = cfg.method, cfg.train
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "preset"}
    key = {"device": device_model(device.type, device.index), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "model": model,
           "batch": [t.batch_size, t.seq_len], "method": [m.name, _options(m)]}
    return json.dumps(key, sort_keys=True)


def _options(m) -> Any:
    """The method's own options (any of them can change the step time: rank, density, projection gap ...)."""
    opts = getattr(m, "options", None)
    return json.loads(json.dumps(dataclasses.asdict(opts), default=str)) if dataclasses.is_dataclass(opts) else str(opts)


def read_cache(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Merge one entry into the cache; atomic (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = read_cache(path)
    data[key] = entry
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def time_steps(module: nn.Module, params: list[nn.Parameter], device: torch.device, precision: str, batch: tuple[int, int, int],
               steps: int = TIMED_STEPS) -> float:
    """Median seconds of a forward + backward pass, after one untimed warm-up (or compile) pass. On a
    CPU with one thread, CPU seconds of this process (time.process_time): on a shared machine the wall
    clock also counts the time other processes held the core, several times the CPU time under load
    (bench/README.md, "Measurements behind the code"), which would make the choice a draw of the load."""
    b, t, vocab = batch
    clock = time.process_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    g = torch.Generator(device="cpu").manual_seed(1234)
    x, y = torch.randint(0, vocab, (b, t), generator=g).to(device), torch.randint(0, vocab, (b, t), generator=g).to(device)
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = clock()
        with autocast(device, precision):
            module(x, y).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(clock() - t0)
        for p in params:
            p.grad = None
    return statistics.median(times)


def choose(cfg, model: nn.Module, device: torch.device, distributed: bool, previous: dict[str, Any] | None = None,
           compile_fn: Callable[[nn.Module], nn.Module] = torch.compile,
           log: Callable[[str], None] = print) -> tuple[dict[str, Any], nn.Module | None]:
    """(settings, compiled module or None). settings: precision, compile, chosen_by and, where
    measured, timings_s (seconds per forward + backward per candidate) and the cache path."""
    t = cfg.train
    auto_p, auto_c = t.precision == "auto", t.compile == "auto"
    if not (auto_p or auto_c):
        return {"precision": t.precision, "compile": bool(t.compile), "chosen_by": "config"}, None
    if previous and "precision" in previous and "compile" in previous:
        keep = {"precision": previous["precision"] if auto_p else t.precision,
                "compile": previous["compile"] if auto_c else bool(t.compile)}
        return {**previous, **keep, "chosen_by": "resumed run (its env.json)"}, None
    static = {"precision": pick_precision(device, t.precision), "compile": bool(t.compile) if not auto_c else False}
    if distributed or t.max_steps < t.autotune_min_steps:
        why = "distributed run" if distributed else f"short run (train.max_steps < train.autotune_min_steps={t.autotune_min_steps})"
        return {**static, "chosen_by": f"static: {why}"}, None
    path = Path(t.autotune_cache) if t.autotune_cache else default_cache_path()
    key = cache_key(cfg, device)
    hit = read_cache(path).get(key)
    if hit:
        settings = {"precision": hit["precision"] if auto_p else t.precision, "compile": hit["compile"] if auto_c else bool(t.compile)}
        return {**settings, "chosen_by": "cache", "cache": str(path), "timings_s": hit.get("timings_s", {})}, None
    settings, compiled = measure(cfg, model, device, auto_p, auto_c, compile_fn, log)
    if auto_p and auto_c:  # a cache entry answers both questions only when both were open
        write_cache(path, key, {"precision": settings["precision"], "compile": settings["compile"], "timings_s": settings["timings_s"],
                                "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return {**settings, "chosen_by": "measured", "cache": str(path)}, compiled


def measure(cfg, model: nn.Module, device: torch.device, auto_p: bool, auto_c: bool, compile_fn,
            log) -> tuple[dict[str, Any], nn.Module | None]:
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    batch = (t.batch_size, t.seq_len, cfg.model.vocab_size)
    fast_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
    precisions = (["fp32", "bf16"] if fast_bf16 else ["fp32"]) if auto_p else [t.precision]
    timings: dict[str, float] = {}
    was_training = model.training
    model.train()
    compiled = None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for p in precisions:
            timings[f"{p}_eager"] = time_steps(model, params, device, p, batch)
        best_p = min(precisions, key=lambda p: timings[f"{p}_eager"])
        want_compile = auto_c or bool(t.compile)
        run_s = t.max_steps * t.grad_accum * timings[f"{best_p}_eager"]  # a step is grad_accum timed micro-batches
        if auto_c and run_s < COMPILE_MIN_RUN_S:
            want_compile = False
            timings["compile_skipped_run_s"] = run_s
        elif want_compile:
            compiled = compile_fn(model)
            timings[f"{best_p}_compiled"] = time_steps(compiled, params, device, best_p, batch)
    model.train(was_training)
    for p in params:
        p.grad = None
    use_compile = want_compile and (not auto_c or timings[f"{best_p}_compiled"] < timings[f"{best_p}_eager"])
    log(f"[autotune] seconds per forward+backward: {', '.join(f'{k} {v:.4f}' for k, v in timings.items())} -> {best_p}, "
        f"{'compiled' if use_compile else 'eager'}")
    return {"precision": best_p, "compile": use_compile, "timings_s": timings}, compiled if use_compile else None
