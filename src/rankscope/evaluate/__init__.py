"""Evaluation of a trained run or checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rankscope.data.stream import BatchStream
from rankscope.loading import load_trained


@torch.no_grad()
def run_eval(path: str | Path, blimp_dir: str | None = None, batch_size: int = 16, max_docs: int = 0, blimp_max_pairs: int = 0) -> dict:
    """Validation loss on the run's fixed validation batches."""
    loaded = load_trained(path)
    t = loaded.cfg.train
    stream = BatchStream(loaded.corpus.tokens("val"), t.seq_len, t.batch_size, 1, t.seed + 10_007)
    losses = [loaded.model(*stream.get(i)).item() for i in range(t.eval_batches)]
    result = {"checkpoint": str(loaded.checkpoint.path), "step": loaded.step, "val_loss": float(np.mean(losses))}
    print(f"{loaded.checkpoint.path}: step {loaded.step}, val loss {result['val_loss']:.4f}, perplexity {np.exp(result['val_loss']):.2f}")
    return result
