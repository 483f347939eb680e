"""summary.json: the final facts of a run, built from metrics.jsonl and the trained model (rank 0).

Losses are the last logged ones; tokens/s is the steady-state median over logging windows (the first
window, with warm-up and compilation, left out); MFU is rankscope.core.runtime.mfu where the device's peak is known.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rankscope.parallel import sharding
from rankscope.core.errors import TrainingError
from rankscope.core.jsonfiles import read_json_object, read_jsonl_objects
from rankscope.core.runtime import flops_per_token, mfu, peak_flops

# measured figures a re-run of a finished run (which trains nothing) keeps from the stored summary.json
MEASURED = ("tokens_per_s", "peak_memory_bytes")


def peak_memory(device: torch.device) -> int:
    """Peak memory in bytes: CUDA's peak allocation, or on a CPU the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
    except ImportError:
        return 0


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows; a torn last line of a killed run (or any line that is not an object) is skipped."""
    return read_jsonl_objects(run_dir / "metrics.jsonl")


def steady_tokens_per_s(train_rows: list[dict[str, Any]]) -> float | None:
    """The median tokens/s over logging windows, the first (warm-up, compilation) left out when there are others."""
    if not train_rows:
        return None
    return float(np.median([r["tokens_per_s"] for r in train_rows[1:]] or [r["tokens_per_s"] for r in train_rows]))


def build_summary(run_dir: Path, cfg, step: int, tokens: int, model, method, optimizer, device: torch.device, precision: str,
                  world_size: int, sharded: bool) -> dict[str, Any]:
    """The summary of the run in `run_dir` after `step` steps (`tokens` tokens over all ranks), with
    the method's report (rankscope.methods.base.Method.report)."""
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "train_loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    summary: dict[str, Any] = {
        "run_dir": str(run_dir), "steps": step, "tokens": tokens,
        "final_train_loss": train_rows[-1]["train_loss"] if train_rows else None,
        "final_val_loss": val_rows[-1]["val_loss"] if val_rows else None,
        "tokens_per_s": steady_tokens_per_s(train_rows),
        "peak_memory_bytes": peak_memory(device),
        "precision": precision, "parameters": model.num_params(), "world_size": world_size,
        **method.report(model, optimizer),
    }  # fmt: skip
    if sharded:  # the method's report counts whole tensors; what rank 0 itself holds under FSDP:
        summary["optimizer_state_bytes_per_rank"] = sum(
            sharding.local(t).numel() * t.element_size() for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t)
        )
    peak = peak_flops(device, precision)
    if peak and summary["tokens_per_s"]:
        m = cfg.model
        per_token = flops_per_token(model.num_params(), m.vocab_size, m.d_model, m.n_layers, cfg.train.seq_len)
        summary["mfu"] = mfu(summary["tokens_per_s"], per_token, peak, world_size)
    return summary


def write_summary(run_dir: Path, summary: dict[str, Any], trained: bool) -> dict[str, Any]:
    """Write summary.json. A run that trained nothing now (`trained` False: it was already finished)
    keeps the stored summary's measured figures and updates the rest. Returns what was written."""
    path = run_dir / "summary.json"
    if not trained and path.exists():
        try:
            stored = read_json_object(path, "it is rewritten", TrainingError)
        except TrainingError:  # unreadable: derived data, rewritten from metrics.jsonl (peak memory is lost)
            stored = {"tokens_per_s": summary.get("tokens_per_s"), "peak_memory_bytes": None}
        summary = {**stored, **{k: v for k, v in summary.items() if v is not None and k not in MEASURED}}
    path.write_text(json.dumps(summary, indent=2))
    return summary
