"""Deterministic batches: a batch is a pure function of (seed, step, micro-batch, rank).

Every optimiser step draws `batch_size * grad_accum * world_size` random windows from the
token array with a generator seeded by (seed, step); rank r's micro-batch m takes rows
[(m * world + r) * B, ... + B). A resumed run therefore sees exactly the batches it would
have seen, and N processes together see the same rows as one process with N times the batch.
"""

from __future__ import annotations

import numpy as np
import torch

from rankscope.core.errors import DataError


class BatchStream:
    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, grad_accum: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1):
        if len(tokens) < seq_len + 2:
            raise DataError(f"the split has {len(tokens)} tokens, fewer than train.seq_len + 1 = {seq_len + 1}; lower train.seq_len or add data")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.grad_accum, self.seed, self.rank, self.world_size = grad_accum, seed, rank, world_size

    def offsets(self, step: int) -> np.ndarray:
        """All window starts of this optimiser step, for every rank and micro-batch."""
        rng = np.random.default_rng([self.seed, step])
        n = self.batch_size * self.grad_accum * self.world_size
        return rng.integers(0, len(self.tokens) - self.seq_len - 1, size=n)

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64."""
        row0 = (micro * self.world_size + self.rank) * self.batch_size
        starts = self.offsets(step)[row0 : row0 + self.batch_size]
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]  # (B, T+1)
        window = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return window[:, :-1], window[:, 1:]


def run_streams(corpus, train_cfg, rank: int = 0, world_size: int = 1) -> tuple[BatchStream, BatchStream]:
    """A run's two streams: training batches from the train split (this rank's rows), and the fixed
    validation batches of the loop's `val_loss` (the val split, seed + 10_007, the same on every rank)."""
    t = train_cfg
    train = BatchStream(corpus.tokens("train"), t.seq_len, t.batch_size, t.grad_accum, t.seed, rank, world_size)
    val = BatchStream(corpus.stream_tokens("val"), t.seq_len, t.batch_size, 1, t.seed + 10_007)
    return train, val
