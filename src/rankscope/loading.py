"""Open a trained model from a run directory or a checkpoint folder, for evaluation and export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from rankscope.checkpoint import Checkpoint, open_checkpoint
from rankscope.config import RunConfig, config_from_dict
from rankscope.data.corpus import Corpus, prepare
from rankscope.errors import CheckpointError
from rankscope.methods import build_method
from rankscope.model import Decoder


@dataclass
class Loaded:
    model: nn.Module
    cfg: RunConfig
    checkpoint: Checkpoint
    corpus: Corpus

    @property
    def step(self) -> int:
        return self.checkpoint.step


def load_trained(path: str | Path, device: str = "cpu") -> Loaded:
    ck = open_checkpoint(path)
    try:
        cfg = config_from_dict(ck.meta["config"])
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
    return Loaded(model, cfg, ck, open_corpus(cfg, ck))


def open_corpus(cfg: RunConfig, ck: Checkpoint) -> Corpus:
    """The run's corpus where it was prepared, else prepared again (deterministic), tokenizer checked."""
    root = Path(ck.meta.get("corpus", ""))
    corpus = Corpus.open(root) if (root / "manifest.json").is_file() else prepare(cfg.data)
    if corpus.manifest["tokenizer"]["hash"] != ck.meta.get("tokenizer_hash"):
        raise CheckpointError(f"the corpus at {corpus.root} has another tokenizer than checkpoint {ck.path}; prepare it with the run's own config")
    return corpus
