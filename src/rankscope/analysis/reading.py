"""Reading a run's stored checkpoints for analysis: meta.json through the checkpoint schema, the effective
weights (adapters merged through the stored format, rankscope.adapters.stored), LoRA factors and gradients
of one checkpoint, read lazily and ahead on threads; and the ReLoRA cycle-update files."""

from __future__ import annotations

import json
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from rankscope.adapters.stored import stored_adapters
from rankscope.analysis import components as C
from rankscope.spectral import AnalysisError
from rankscope.core.errors import CheckpointError
from rankscope.store.checkpoint import check_meta

_CYCLE = re.compile(r"^cycle_(\d+)_step_(\d+)\.safetensors$")


@dataclass
class CheckpointState:
    step: int
    weights: dict[str, torch.Tensor]
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    grads: dict[str, torch.Tensor]
    merges: int = 0  # ReLoRA merges done by this step (meta.json method.merges)
    tokens_per_step: int | None = None  # tokens of one optimiser step (bounds the rank of a gradient)
    is_init: bool = False  # the re-created initialisation (step 0), not a checkpoint


def read_meta(path: Path) -> dict[str, Any] | None:
    """A checkpoint's meta.json if it passes the checkpoint schema (rankscope.store.checkpoint.check_meta)
    and its files exist; None (skipped) otherwise. The tensors' hashes are not re-read here."""
    try:
        meta = check_meta(json.loads((path / "meta.json").read_text()), path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError, CheckpointError):
        return None
    return meta if all((path / f).is_file() for f in meta["files"]) else None


def load_state(path: Path, meta: dict[str, Any], include_embeddings: bool = False, with_grads: bool = True) -> CheckpointState:
    """Effective weights, LoRA factors and gradients of one checkpoint folder (lazy reads)."""
    aliases = meta.get("aliases", {})
    model = _read(path, "model.safetensors", include_embeddings, aliases.get("model"))
    try:
        adapters = stored_adapters(meta, model)
    except CheckpointError as e:
        raise AnalysisError(f"checkpoint {path}: {e}") from None
    weights, lora = C.effective_weights(model, adapters)
    grads = {}
    if with_grads and (path / "grads.safetensors").is_file():
        grads = _read(path, "grads.safetensors", include_embeddings, aliases.get("grads"))
    train = (meta.get("config") or {}).get("train") or {}
    tokens = None
    if {"batch_size", "grad_accum", "seq_len"} <= train.keys():
        tokens = int(train["batch_size"]) * int(train["grad_accum"]) * int(train["seq_len"]) * int(meta.get("world_size", 1))
    return CheckpointState(int(meta["step"]), weights, lora, grads, int((meta.get("method") or {}).get("merges", 0)), tokens)


def _read(path: Path, name: str, include_embeddings: bool, aliases: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """One safetensors file of a checkpoint; a truncated or foreign one is an AnalysisError naming it (read_meta
    does not re-hash the tensors, so this is where a corrupt file shows)."""
    try:
        return C.read_tensors(path / name, include_embeddings, aliases)
    except (OSError, SafetensorError) as e:  # SafetensorError (not an OSError): a truncated or foreign header
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        raise AnalysisError(f"checkpoint {path}: {name} is unreadable ({why}); restore it from a copy, "
                            f"or leave step {path.name.removeprefix('step_').lstrip('0') or 0} out with --steps") from None


def prefetch(fn: Callable[[Any], Any], args: Iterable[Any], ahead: int) -> Iterator[Any]:
    """fn(a) for each a, in order, with up to `ahead` calls running in threads ahead of the consumer."""
    ahead = max(1, ahead)
    with ThreadPoolExecutor(ahead) as pool:
        it = iter(args)
        pending = deque(pool.submit(fn, a) for a in islice(it, ahead))
        while pending:
            fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield fut.result()


def cycle_files(run_dir: Path) -> list[tuple[int, int, Path]]:
    folder = run_dir / "relora_updates"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), int(m.group(2)), p) for p in folder.iterdir() if (m := _CYCLE.match(p.name))]
    return sorted(found)


def previous_cycle(cycles: list[tuple[int, int, Path]], cycle: int) -> dict[str, torch.Tensor] | None:
    earlier = [p for c, _, p in cycles if c < cycle]
    return load_file(str(earlier[-1])) if earlier else None


def cycle_rank(path: Path) -> int | None:
    """The adapter rank a cycle-update file records in its safetensors metadata, if any."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        rank = (fh.metadata() or {}).get("rank")
    return int(rank) if rank and rank.isdigit() else None
