"""Shared test helpers: tiny configs on a small slice of the embedded corpus."""

from __future__ import annotations

from pathlib import Path

from rankscope.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
BLIMP_DIR = REPO.parent / "shared" / "data" / "blimp"

TINY = [
    "model.preset=micro",
    "model.vocab_size=512",
    "data.sources=[shakespeare]",
    "data.max_bytes_per_source=300000",
    "data.tokenizer_vocab_size=512",
    "train.max_steps=20",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.warmup_steps=2",
    "train.lr=3e-3",
    "train.progress=false",
    "train.precision=fp32",
    "train.eval_batches=2",
    "train.eval_every=0",
    "train.log_every=1",
    "checkpoint.every=10",
]


def tiny_config(data_dir: str | Path, *overrides: str) -> RunConfig:
    """A ~0.1M-parameter run on 300 kB of Shakespeare; `data_dir` caches the prepared corpus."""
    return load_config(None, [*TINY, f"data.cache_dir={data_dir}", *overrides])


def tiny_overrides(data_dir: str | Path, *overrides: str) -> list[str]:
    return [*TINY, f"data.cache_dir={data_dir}", *overrides]
