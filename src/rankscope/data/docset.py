"""Documents in the corpus layout, ready to score: the shape every evaluation (per-domain loss, Paloma, few-shot
test sets) reads. `corpus_docset` takes a split of a prepared corpus; `tokenize_documents` lays out user-named
documents the same way with the run's tokenizer. Scoring them is rankscope.evaluate.perplexity's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from rankscope.core.errors import DataError
from rankscope.data.documents import Document


@dataclass
class DocSet:
    """Documents in the corpus layout: `tokens` is EOS, doc, EOS, doc, ...; each row of `rows` is
    (start, end, domain index, utf-8 bytes) with tokens[start - 1] the EOS before the document."""

    tokens: np.ndarray
    rows: np.ndarray
    domains: list[str]
    roles: dict[str, str] | None = None  # domain -> "train" / "eval_only" (a corpus's data.eval_only_domains)


def corpus_docset(corpus, split: str = "val") -> DocSet:
    if split not in ("train", "val", "test"):
        raise DataError(f"unknown split {split!r}; use val or test")
    roles = corpus.roles
    return DocSet(corpus.tokens(split), corpus.docs(split), list(corpus.domains), roles if "eval_only" in roles.values() else None)


def tokenize_documents(docs: Iterable[Document], tokenizer, prefix: str = "") -> DocSet:
    """User-named eval sets (rankscope.data.sources.read_files / read_hf_dataset) in the same layout,
    tokenised with the run's tokenizer; domains are `prefix + document domain`."""
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError("the eval set is empty: it holds no non-blank document")
    domains = sorted({prefix + d.domain for d in docs})
    index = {d: i for i, d in enumerate(domains)}
    ids = tokenizer.encode_batch([d.text for d in docs])
    tokens = np.empty(sum(len(x) + 1 for x in ids) + 1, dtype=np.int64)
    rows = np.zeros((len(docs), 4), dtype=np.int64)
    pos = 0
    for i, (d, x) in enumerate(zip(docs, ids)):
        tokens[pos] = tokenizer.eos_id
        tokens[pos + 1 : pos + 1 + len(x)] = x
        rows[i] = (pos + 1, pos + 1 + len(x), index[prefix + d.domain], len(d.text.encode("utf-8")))
        pos += 1 + len(x)
    tokens[pos] = tokenizer.eos_id
    return DocSet(tokens, rows, domains)
