"""Evaluation of a trained run or checkpoint: per-domain loss / perplexity / bits-per-byte on the
held-out split and on user-named eval sets (rankscope.evaluate.perplexity), and BLiMP minimal
pairs (rankscope.evaluate.blimp; generated substitutes in rankscope.evaluate.pairs), and Paloma
perplexity as pico-train defines it (rankscope.evaluate.paloma).
In-training evaluation is rankscope.evaluate.callback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rankscope.core.errors import CheckpointError, DataError
from rankscope.evaluate.blimp import evaluate_blimp, load_pairs
from rankscope.evaluate.perplexity import DocSet, corpus_docset, domain_perplexity, tokenize_documents

SCORING = "each document alone, EOS-prefixed, in non-overlapping windows of train.seq_len tokens"


def check_tokenizer(loaded) -> Any:
    """The run's tokenizer, checked against the checkpoint and the model."""
    tok = loaded.corpus.tokenizer
    want = loaded.checkpoint.meta.get("tokenizer_hash")
    if want is not None and tok.hash != want:
        raise CheckpointError(f"tokenizer {loaded.corpus.root}/tokenizer.json (hash {tok.hash}) is not the one checkpoint {loaded.checkpoint.path} was trained with ({want})")
    if tok.vocab_size > loaded.cfg.model.vocab_size:
        raise CheckpointError(f"the tokenizer has {tok.vocab_size} tokens but the checkpoint's model only {loaded.cfg.model.vocab_size}; it was trained with another tokenizer")
    return tok


def eval_sets(tok, files: list[str] | None, hf_dataset: str | None, hf_config: str | None, hf_split: str, text_field: str, hf_max_docs: int) -> dict[str, DocSet]:
    from rankscope.data.sources import read_files, read_hf_dataset

    out = {}
    if files:
        docs = list(read_files(files, text_field, option="--files"))
        if not docs:
            raise DataError(f"the eval files {', '.join(files)} hold no documents")
        out["files"] = tokenize_documents(docs, tok)
    if hf_dataset:
        out[f"hf:{hf_dataset}"] = tokenize_documents(read_hf_dataset(hf_dataset, hf_config, hf_split, text_field, hf_max_docs), tok)
    return out


@torch.no_grad()
def run_eval(path: str | Path, blimp_dir: str | None = None, batch_size: int = 16, max_docs: int = 0, blimp_max_pairs: int = 0,
             split: str = "val", files: list[str] | None = None, hf_dataset: str | None = None, hf_config: str | None = None,
             hf_split: str = "train", text_field: str = "text", hf_max_docs: int = 1000, skip_bad_rows: bool = False,
             device: str = "cpu", paloma: str | None = None, paloma_opts: dict | None = None, cache_dir: str | None = None,
             log=print, progress: bool = False) -> dict:
    """Evaluate a run directory (its newest checkpoint) or a checkpoint folder; prints a table and
    returns {"checkpoint", "step", "perplexity": {set: {domains, macro, all}}, "blimp"?, "paloma"?, "metrics"}.
    `val_loss` (and metrics `val_loss_all`) pools every scored token; `val_loss_macro` averages the
    domains with equal weight (Paloma's macro average): two different numbers, both labelled.
    `paloma` is a Paloma-style set (rankscope.evaluate.paloma.load_paloma); `paloma_opts` holds
    load_paloma's keyword arguments and "max_length" (default: the model's max_seq_len, as pico-train).
    `progress`: show progress (a bar on a terminal, plain lines otherwise)."""
    from rankscope.evaluate.callback import flat_blimp, flat_perplexity
    from rankscope.evaluate.loading import load_trained
    from rankscope.core.runtime import pick_device

    if batch_size < 1:
        raise DataError(f"the evaluation batch size must be >= 1, got {batch_size}")
    # inputs first: a wrong --blimp folder fails before the (minutes-long) perplexity pass, not after
    pairs = load_pairs(blimp_dir, blimp_max_pairs, skip_bad_rows, log=log) if blimp_dir else None
    loaded = load_trained(path, str(pick_device(device, what="--device")), cache_dir)
    tok = check_tokenizer(loaded)
    seq_len = loaded.cfg.train.seq_len
    sets = {split: corpus_docset(loaded.corpus, split)}
    if len(sets[split].rows) == 0:
        raise DataError(f"the corpus has no {split!r} documents (data.{split}_fraction is 0?); use --split val")
    sets.update(eval_sets(tok, files, hf_dataset, hf_config, hf_split, text_field, hf_max_docs))
    result: dict[str, Any] = {"checkpoint": str(loaded.checkpoint.path), "step": loaded.step, "tokens": loaded.checkpoint.meta.get("tokens"),
                              "scoring": SCORING, "seq_len": seq_len, "perplexity": {}, "metrics": {}}
    for name, docset in sets.items():
        r = domain_perplexity(loaded.model, docset, seq_len, batch_size, max_docs, progress=f"eval {name}" if progress else None)
        result["perplexity"][name] = r
        result["metrics"].update(flat_perplexity(r, name))
    result["val_loss"] = result["perplexity"][split]["all"]["loss"]  # pooled over every held-out token
    if pairs is not None:
        result["blimp"] = {"source": str(blimp_dir), **evaluate_blimp(loaded.model, tok, pairs, batch_size, progress="eval BLiMP" if progress else None)}
        result["metrics"].update(flat_blimp(result["blimp"]))
    if paloma:
        from rankscope.evaluate.paloma import flat_paloma, format_paloma, load_paloma, paloma_perplexity

        opts = dict(paloma_opts or {})
        max_length = int(opts.pop("max_length", 0) or loaded.cfg.model.max_seq_len)
        if not 2 <= max_length <= loaded.cfg.model.max_seq_len:
            raise DataError(f"--paloma-max-length must be in [2, {loaded.cfg.model.max_seq_len}] (the model's max_seq_len)")
        pset = load_paloma(paloma, tok, loaded.cfg.model.vocab_size, **opts)
        result["paloma"] = paloma_perplexity(loaded.model, pset, max_length, batch_size)
        result["metrics"].update(flat_paloma(result["paloma"]))
    log(format_table(result))
    if paloma:
        log(format_paloma(result["paloma"]))
    return result


def format_table(result: dict) -> str:
    """A plain-text table: one line per domain per eval set, then BLiMP phenomena."""
    lines = [f"{result['checkpoint']}  step {result['step']}  ({result['scoring']})",
             f"{'set':10s} {'domain':24s} {'docs':>6s} {'tokens':>10s} {'bytes':>11s} {'loss':>8s} {'ppl':>10s} {'bpb':>7s}"]
    for name, r in result["perplexity"].items():
        for dom, d in r["domains"].items():
            lines.append(f"{name[:10]:10s} {dom[:24]:24s} {d['docs']:6d} {d['tokens']:10,d} {d['bytes']:11,d} {d['loss']:8.4f} {d['ppl']:10.2f} {d['bpb']:7.4f}")
        m = r["macro"]
        a = r["all"]
        lines.append(f"{name[:10]:10s} {'macro average':24s} {'':6s} {'':10s} {'':11s} {m['loss']:8.4f} {m['ppl']:10.2f} {m['bpb']:7.4f}")
        lines.append(f"{name[:10]:10s} {'all (tokens pooled)':24s} {'':6s} {a['tokens']:10,d} {a['bytes']:11,d} {a['loss']:8.4f} {a['ppl']:10.2f} {a['bpb']:7.4f}")
    if "blimp" in result:
        b = result["blimp"]
        o = b["overall"]
        lines.append(f"BLiMP ({b['source']}): {o['accuracy']:.4f} mean over {o['uids']} paradigms, {o['pairs']:,} pairs "
                     f"({o['ties']} ties, counted wrong); chance is 0.5 (one of two sentences), {o['accuracy'] - 0.5:+.4f} from it")
        for ph, r in b["phenomena"].items():
            lines.append(f"  {ph:28s} {r['accuracy']:.4f}  ({r['uids']} paradigms, {r['pairs']:,} pairs)")
    return "\n".join(lines)
