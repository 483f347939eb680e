"""Open a trained model from a run directory or a checkpoint folder, for evaluation and export.

Writes stay where the user asked: a corpus that must be prepared again goes to the `cache_dir`
the caller names (the CLI's --cache-dir, default `data`), never to a folder named in the
checkpoint's metadata."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from rankscope.store.checkpoint import Checkpoint, open_checkpoint
from rankscope.config import DataConfig, RunConfig
from rankscope.methods import config_from_dict
from rankscope.data.corpus import Corpus, prepare
from rankscope.core.errors import CheckpointError
from rankscope.methods import build_method
from rankscope.model import Decoder
from rankscope.core.paths import check_output_dir


@dataclass
class Loaded:
    model: nn.Module
    cfg: RunConfig
    checkpoint: Checkpoint
    corpus: Corpus

    @property
    def step(self) -> int:
        return self.checkpoint.step


def load_trained(path: str | Path, device: str = "cpu", cache_dir: str | None = None) -> Loaded:
    ck = open_checkpoint(path)
    try:
        cfg = config_from_dict(ck.meta["config"], schedule=False)  # a trained run: read, not trained again
    except KeyError:
        raise CheckpointError(f"checkpoint {ck.path} has no config in meta.json; it was not written by rankscope train") from None
    model = Decoder(cfg.model)
    method = build_method(cfg)
    method.load_state_dict(ck.meta.get("method", {}))  # e.g. a warm start already switched to adapters
    method.prepare_model(model)
    try:
        model.load_state_dict(ck.load("model"))
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ck.path} does not fit its own config ({str(e).splitlines()[0][:160]})") from None
    model.to(device).eval()
    return Loaded(model, cfg, ck, open_corpus(cfg, ck, cache_dir))


def open_corpus(cfg: RunConfig, ck: Checkpoint, cache_dir: str | None = None) -> Corpus:
    """The run's corpus where it was prepared (read only), else prepared again (deterministic) in
    `cache_dir` (default: DataConfig's default), tokenizer checked."""
    root = Path(ck.meta.get("corpus", ""))
    if (root / "manifest.json").is_file():
        corpus = Corpus.open(root)
    else:
        cache = cache_dir or DataConfig().cache_dir
        check_output_dir(cache, "--cache-dir")  # named as the CLI option: the user gave it there, not in a config
        corpus = prepare(dataclasses.replace(cfg.data, cache_dir=cache))
    if corpus.manifest["tokenizer"]["hash"] != ck.meta.get("tokenizer_hash"):
        raise CheckpointError(f"the corpus at {corpus.root} has another tokenizer than checkpoint {ck.path}; prepare it with the run's own config")
    return corpus
