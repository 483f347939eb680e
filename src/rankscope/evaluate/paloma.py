"""Paloma perplexity as pico-train computes it (the number Weiss et al. 2025 report).

pico-train (pico-lm/pico-train, src/evaluation/tasks/paloma.py, run_paloma_evaluation) loads
`pico-lm/pretokenized-paloma-tinsy`, split "val", takes its "text" column and calls the Hugging Face
`evaluate` metric "pico-lm/perplexity" (a fork of evaluate's "perplexity" that passes
trust_remote_code) with add_start_token=False, max_length=MAX_SEQ_LEN (2048) and batch_size=16,
and reports its "mean_perplexity". That metric:

  each row is tokenised without special tokens (no BOS is added) and truncated to max_length tokens
  t_0 .. t_{L-1}; padding (right, batched) is masked out
  ppl_row  = exp( mean_{i=1..L-1} -ln p(t_i | t_<i) )      one perplexity per row (sequence)
  mean_perplexity = mean over rows of ppl_row                a per-SEQUENCE average, not per token

So t_0 is never scored, and a row's score depends only on that row. The set itself
(pico-lm/pico-dataset, create_paloma_dataset.ipynb) has columns `input_ids` (2048 OLMo-tokenizer ids:
documents each followed by EOS, concatenated and cut into 2048-token rows, the last partial row
dropped), `text` (those ids decoded) and `source` (the Paloma subset, e.g. c4_en, wikitext_103), with
up to 100 rows per source.

Here the same definition is computed for each source and for all rows together ("overall", pico-train's
single number), with the token-pooled perplexity exp(sum NLL / sum targets) beside it under its own
name. Rows are read from `input_ids` when present (exactly pico's tokens when the run uses
data.tokenizer=olmo; pico re-tokenises the decoded text, which can differ at a few chunk edges) or
tokenised from `text` with the run's tokenizer (any Paloma-style set with a text and a source column).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn as nn

from rankscope.core.errors import DataError
from rankscope.evaluate.perplexity import score_sequences

DEFINITION = ("pico-train Paloma: per row, exp(mean NLL of tokens 1..L-1), no BOS, truncated to max_length; "
              "mean_perplexity = mean over rows")


@dataclass
class PalomaSet:
    sequences: list[np.ndarray]  # token ids, int64
    sources: list[str]
    origin: str
    column: str  # where the ids came from: the ids column, or "text (tokenised with the run's tokenizer)"


def _local_table(spec: str, columns: list[str]):
    import glob

    import pyarrow.dataset as pads

    path = Path(spec)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
    else:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True)) if any(c in spec for c in "*?[") else [path]
    if not files or not all(f.is_file() for f in files):
        raise DataError(f"no parquet file at {spec!r}; give a .parquet file, a folder of them, or a Hugging Face dataset name")
    try:
        ds = pads.dataset([str(f) for f in files], format="parquet")
        have = ds.schema.names
        return ds.to_table(columns=[c for c in columns if c in have]).to_pydict(), have
    except Exception as e:  # pyarrow raises several types for bad files
        raise DataError(f"cannot read the parquet data at {spec!r} ({str(e).splitlines()[0][:160]})") from None


def _hub_table(spec: str, split: str, columns: list[str]):
    try:
        import datasets

        ds = datasets.load_dataset(spec, split=split)
    except Exception as e:  # the hub and builders raise many types; one line is what the user needs
        raise DataError(f"cannot load Paloma set {spec!r} split {split!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "give a local parquet file or folder (no hub is reachable offline)") from None
    have = list(ds.column_names)
    return {c: ds[c] for c in columns if c in have}, have


def load_paloma(spec: str, tokenizer, vocab_size: int, split: str = "val", source_field: str = "source", ids_field: str = "input_ids",
                text_field: str = "text", use_text: bool = False, max_rows: int = 0) -> PalomaSet:
    """Rows of a Paloma-style set: a local parquet file / folder / glob, or a Hugging Face dataset name."""
    local = Path(spec).exists() or spec.endswith(".parquet") or any(c in spec for c in "*?[")
    cols = [source_field, ids_field, text_field]
    table, have = _local_table(spec, cols) if local else _hub_table(spec, split, cols)
    if source_field not in have:
        raise DataError(f"{spec}: no {source_field!r} column (has {', '.join(have)}); set --paloma-source-field")
    from_ids = ids_field in have and not use_text
    if not from_ids and text_field not in have:
        raise DataError(f"{spec}: neither an ids column {ids_field!r} nor a text column {text_field!r} (has {', '.join(have)})")
    sources = [str(s) for s in table[source_field]]
    n = len(sources) if max_rows <= 0 else min(len(sources), max_rows)
    if from_ids:
        seqs = [np.asarray(x, dtype=np.int64) for x in table[ids_field][:n]]
        column = ids_field
    else:
        texts = table[text_field][:n]
        if not all(isinstance(t, str) for t in texts):
            raise DataError(f"{spec}: column {text_field!r} is not text; set --paloma-text-field")
        seqs = [np.asarray(x, dtype=np.int64) for x in tokenizer.encode_batch(list(texts))]
        column = f"{text_field} (tokenised with the run's tokenizer)"
    top = max((int(s.max()) for s in seqs if len(s)), default=0)
    if top >= vocab_size:
        raise DataError(f"{spec}: token id {top} in column {ids_field!r} is >= the model's vocabulary of {vocab_size}: these ids come from "
                        "another tokenizer (pico's pretokenized Paloma needs a run trained with data.tokenizer=olmo); "
                        "or pass --paloma-use-text to tokenise the text column with this run's tokenizer")
    return PalomaSet(seqs, sources[:n], spec, column)


def _summary(ppl: np.ndarray, nll: np.ndarray, ntgt: np.ndarray) -> dict:
    return {"sequences": int(len(ppl)), "tokens": int(ntgt.sum()), "mean_perplexity": float(ppl.mean()),
            "token_perplexity": float(math.exp(min(nll.sum() / ntgt.sum(), 700.0))), "mean_loss": float((nll / ntgt).mean())}


def paloma_perplexity(model: nn.Module, pset: PalomaSet, max_length: int, batch_size: int = 16, precision: str = "fp32") -> dict:
    """{"definition", "max_length", "column", "skipped_short", "sources": {name: {...}}, "overall": {...},
    "macro_mean_perplexity"} under pico-train's definition (module docstring)."""
    keep = [i for i, s in enumerate(pset.sequences) if min(len(s), max_length) >= 2]  # one target at least
    if not keep:
        raise DataError(f"{pset.origin}: no row has 2 or more tokens to score")
    seqs = [pset.sequences[i][:max_length] for i in keep]
    was_training = model.training
    model.eval()
    try:
        nll = score_sequences(model, seqs, batch_size, pad_id=0, precision=precision)  # summed over tokens 1..L-1
    finally:
        model.train(was_training)
    ntgt = np.array([len(s) - 1 for s in seqs], dtype=np.float64)
    ppl = np.exp(np.minimum(nll / ntgt, 700.0))
    names = np.array([pset.sources[i] for i in keep])
    per = {src: _summary(ppl[names == src], nll[names == src], ntgt[names == src]) for src in sorted(set(names))}
    return {"definition": DEFINITION, "origin": pset.origin, "column": pset.column, "max_length": int(max_length),
            "skipped_short": len(pset.sequences) - len(keep), "sources": per, "overall": _summary(ppl, nll, ntgt),
            "macro_mean_perplexity": float(np.mean([r["mean_perplexity"] for r in per.values()]))}


def flat_paloma(result: dict) -> dict[str, float]:
    row = {f"paloma_ppl/{src}": r["mean_perplexity"] for src, r in result["sources"].items()}
    row["paloma_ppl"] = result["overall"]["mean_perplexity"]
    row["paloma_ppl_macro"] = result["macro_mean_perplexity"]
    return row


def format_paloma(result: dict) -> str:
    lines = [f"Paloma ({result['origin']}, ids from {result['column']}, max_length {result['max_length']}): {DEFINITION}",
             f"  {'source':32s} {'rows':>6s} {'tokens':>10s} {'mean ppl':>12s} {'token ppl':>12s}"]
    for src, r in [*result["sources"].items(), ("overall (pico-train's number)", result["overall"])]:
        lines.append(f"  {src[:32]:32s} {r['sequences']:6d} {r['tokens']:10,d} {r['mean_perplexity']:12.3f} {r['token_perplexity']:12.3f}")
    if result["skipped_short"]:
        lines.append(f"  ({result['skipped_short']} rows with fewer than 2 tokens skipped)")
    return "\n".join(lines)
