"""Tokenizers: train a byte-level BPE with HF `tokenizers`, or load any tokenizer.json.

The end-of-text token separates documents and doubles as the document-start (BOS) token.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rankscope.core.errors import DataError

EOS = "<|endoftext|>"
PAD = "<|padding|>"


class TextTokenizer:
    """A thin wrapper: encode/decode, the EOS id, the vocabulary size and a content hash."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        eos = tok.token_to_id(EOS)
        if eos is None:
            raise DataError(f"tokenizer has no {EOS!r} token; rankscope needs it to separate documents")
        self.eos_id = eos
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.hash = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file {path} not found; run `rankscope prepare` or set data.tokenizer")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a plain Exception for malformed json
            raise DataError(f"cannot read tokenizer {path} ({str(e).splitlines()[0][:120]}); give a Hugging Face tokenizer.json") from None


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Byte-level BPE (GPT-2 style): every byte is in the alphabet, so any text round-trips."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok)


def olmo_tokenizer_path() -> Path:
    """The OLMo tokenizer json Pico uses, shipped by the PyPI package ai2-olmo-eval."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.tokenizer=olmo needs the package ai2-olmo-eval (pip install --no-deps ai2-olmo-eval==0.9.0)")
    path = Path(next(iter(spec.submodule_search_locations)), "tokenizers", "allenai_gpt-neox-olmo-dolma-v1_5.json")
    if not path.is_file():
        raise DataError(f"{path} is missing from ai2-olmo-eval; reinstall it")
    return path
