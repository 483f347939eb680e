"""BLiMP minimal pairs (Warstadt et al., TACL 2020): load, score, aggregate.

A pair is right when the model gives the acceptable sentence a higher total log-probability than
the unacceptable one: the paper's "simple LM method". Each sentence is prefixed with the
EOS/document-start token, so its first word is scored too. A tie (equal log-probs; e.g. the 7
upstream pairs whose two sentences are identical) counts as WRONG: the model did not prefer the
good sentence. Accuracy is reported per paradigm (UID), per phenomenon (mean over its UIDs, the
paper's 12 phenomena; rows tagged `s-selection` belong to argument_structure) and overall (mean
over UIDs, as Weiss et al. 2025 report it), with pair counts.

`load_pairs("builtin")` gives the generated substitute pairs of rankscope.evaluate.pairs instead.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn as nn

from rankscope.core.errors import DataError
from rankscope.evaluate.perplexity import score_sequences

PHENOMENA = ("anaphor_agreement", "argument_structure", "binding", "control_raising", "determiner_noun_agreement", "ellipsis",
             "filler_gap_dependency", "irregular_forms", "island_effects", "npi_licensing", "quantifiers", "subject_verb_agreement")
# the paper's grouping: the two animate_subject_* paradigms are tagged s-selection in the rows
TERM_TO_PHENOMENON = {"s-selection": "argument_structure"}
REPO = Path(__file__).resolve().parents[3]
SHARED_BLIMP = REPO.parent / "shared" / "data" / "blimp"  # ../shared/data/blimp beside the repo


class BlimpFormatError(DataError):
    """A BLiMP jsonl row is malformed (the message names file and line)."""


@dataclass(frozen=True)
class Pair:
    uid: str
    phenomenon: str
    pair_id: str
    good: str
    bad: str


def phenomenon_of(term: str) -> str:
    return TERM_TO_PHENOMENON.get(term, term)


def parse_row(line: str, where: str, default_uid: str) -> Pair:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BlimpFormatError(f"{where}: not valid JSON ({e.msg}); fix or remove that line") from None
    if not isinstance(row, dict):
        raise BlimpFormatError(f"{where}: a row must be a JSON object with sentence_good and sentence_bad")
    for key in ("sentence_good", "sentence_bad"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise BlimpFormatError(f"{where}: field {key!r} is missing or not a non-empty string")
    for key in ("UID", "linguistics_term"):
        if key in row and not isinstance(row[key], str):
            raise BlimpFormatError(f"{where}: field {key!r} must be a string")
    uid = row.get("UID", default_uid)
    return Pair(uid, phenomenon_of(row.get("linguistics_term", uid)), str(row.get("pairID", "")), row["sentence_good"], row["sentence_bad"])


def load_pairs(folder: str | Path, max_pairs: int = 0, skip_bad: bool = False, log=print) -> list[Pair]:
    """Every `*.jsonl` in `folder` (sorted by name); `max_pairs` > 0 keeps the first pairs of each file.
    A malformed row raises BlimpFormatError, unless `skip_bad`: then it is skipped and counted."""
    if str(folder) == "builtin":
        from rankscope.evaluate.pairs import generate_pairs

        # generation is sequential per paradigm, so n pairs are the first n of any larger draw
        rows = [r for rs in generate_pairs(max_pairs or 200).values() for r in rs]
        return [parse_row(json.dumps(r), "builtin", r["UID"]) for r in rows]
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"BLiMP folder {folder} not found; pass a folder of BLiMP jsonl files (e.g. ../shared/data/blimp) or 'builtin'")
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise DataError(f"no .jsonl files in {folder}; a BLiMP folder holds one <UID>.jsonl per paradigm")
    pairs: list[Pair] = []
    skipped = 0
    for path in files:
        n_file = 0
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if max_pairs and n_file >= max_pairs:
                    break
                if not line.strip():
                    continue
                try:
                    pairs.append(parse_row(line, f"{path}:{n}", path.stem))
                    n_file += 1
                except BlimpFormatError as e:
                    if not skip_bad:
                        raise
                    skipped += 1
                    log(f"[blimp] skipping {e}")
    if skipped:
        log(f"[blimp] skipped {skipped} malformed rows")
    if not pairs:
        raise DataError(f"the BLiMP files in {folder} hold no pairs")
    return pairs


def sentence_logprobs(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 32, precision: str = "fp32",
                      progress: str | None = None) -> np.ndarray:
    """log P(sentence) in nats: EOS + tokens, summed next-token log-probs, batched with right padding.
    Each distinct sentence is scored once."""
    unique = sorted(set(sentences))
    ids = tokenizer.encode_batch(unique)
    max_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    seqs = []
    for s, x in zip(unique, ids):
        if max_len is not None and len(x) > max_len:
            raise DataError(f"sentence {s[:60]!r} has {len(x)} tokens, more than model.max_seq_len={max_len}")
        seqs.append(np.array([tokenizer.eos_id, *x], dtype=np.int64))
    was_training = model.training
    model.eval()
    try:
        nll = score_sequences(model, seqs, batch_size, tokenizer.eos_id, precision, progress)
    finally:
        model.train(was_training)
    lookup = dict(zip(unique, -nll))
    return np.array([lookup[s] for s in sentences], dtype=np.float64)


def accuracy(pairs: list[Pair], logp_good: np.ndarray, logp_bad: np.ndarray) -> dict:
    """Per-UID, per-phenomenon and overall accuracy; a tie counts as wrong (module docstring)."""
    if not pairs:
        raise DataError("no BLiMP pairs to score")
    correct = np.asarray(logp_good) > np.asarray(logp_bad)
    ties = np.asarray(logp_good) == np.asarray(logp_bad)
    by_uid: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        by_uid[p.uid].append(i)
    uids = {}
    for uid, idx in sorted(by_uid.items()):
        uids[uid] = {"phenomenon": pairs[idx[0]].phenomenon, "pairs": len(idx), "correct": int(correct[idx].sum()),
                     "ties": int(ties[idx].sum()), "accuracy": float(correct[idx].mean())}
    by_ph: dict[str, list[str]] = defaultdict(list)
    for uid, u in uids.items():
        by_ph[u["phenomenon"]].append(uid)
    phenomena = {ph: {"uids": len(us), "pairs": sum(uids[u]["pairs"] for u in us), "accuracy": float(np.mean([uids[u]["accuracy"] for u in us]))}
                 for ph, us in sorted(by_ph.items())}
    overall = {"accuracy": float(np.mean([u["accuracy"] for u in uids.values()])), "uids": len(uids), "pairs": len(pairs),
               "correct": int(correct.sum()), "ties": int(ties.sum()), "pair_accuracy": float(correct.mean())}
    return {"overall": overall, "phenomena": phenomena, "uids": uids}


def evaluate_blimp(model: nn.Module, tokenizer, pairs: list[Pair], batch_size: int = 32, precision: str = "fp32",
                   progress: str | None = None) -> dict:
    lp = sentence_logprobs(model, tokenizer, [p.good for p in pairs] + [p.bad for p in pairs], batch_size, precision, progress)
    return accuracy(pairs, lp[: len(pairs)], lp[len(pairs) :])
