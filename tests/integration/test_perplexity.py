"""Per-domain loss / perplexity / bits-per-byte: batching and padding never change a score, the
numbers match hand computations, and the in-training callback and `rankscope eval` report them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import tiny_config

from rankscope.store.checkpoint import write_meta
from rankscope.config import ModelConfig
from rankscope.data.sources import Document
from rankscope.data.tokenizer import train_bpe
from rankscope.core.errors import DataError
from rankscope.evaluate.perplexity import cap_docs, domain_perplexity, score_documents, tokenize_documents
from rankscope.model import Decoder

TEXTS = [
    ("english", "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."),
    ("english", "The slings and arrows of outrageous fortune."),
    ("english", "Or to take arms against a sea of troubles, and by opposing end them. To die, to sleep, no more; " * 3),
    ("accents", "Café déjà vu — naïve façade, smörgåsbord. 日本語のテキスト 🙂"),
    ("accents", "Ærøskøbing, Zürich, São Paulo."),
    ("code", "def f(x):\n    return x * 2  # double\n"),
]


class Uniform(nn.Module):
    """Equal logits over V tokens: every token costs log V nats."""

    def __init__(self, vocab: int):
        super().__init__()
        self.lm_head = nn.Linear(1, vocab, bias=False)

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.lm_head.out_features) + 0.0 * self.lm_head.weight.sum()


@pytest.fixture(scope="module")
def tok():
    return train_bpe([t for _, t in TEXTS] * 4, 300)


@pytest.fixture(scope="module")
def docset(tok):
    return tokenize_documents([Document(d, str(i), t) for i, (d, t) in enumerate(TEXTS)], tok)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Decoder(ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=320, max_seq_len=64)).eval()


def reference_nll(model, docset, seq_len):
    """One document and one window at a time, no padding, through the model's own loss."""
    out = []
    for start, end, _, _ in docset.rows:
        seq = torch.as_tensor(np.asarray(docset.tokens[start - 1 : end], dtype=np.int64))
        total = 0.0
        for k in range(0, len(seq) - 1, seq_len):
            w = seq[k : k + seq_len + 1]
            with torch.no_grad():
                total += model(w[None, :-1], w[None, 1:]).item() * (len(w) - 1)
        out.append(total)
    return np.array(out)


def test_uniform_model_bits_per_byte_matches_hand_computation(tok, docset):
    V = 320
    r = domain_perplexity(Uniform(V), docset, seq_len=16, batch_size=3)
    for dom in ("english", "accents", "code"):
        texts = [t for d, t in TEXTS if d == dom]
        n_tok = sum(len(tok.encode(t)) for t in texts)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        got = r["domains"][dom]
        assert got["tokens"] == n_tok and got["bytes"] == n_bytes and got["docs"] == len(texts)
        assert got["bpb"] == pytest.approx(n_tok * math.log2(V) / n_bytes, rel=1e-6)
        assert got["loss"] == pytest.approx(math.log(V), rel=1e-6)
        assert got["ppl"] == pytest.approx(V, rel=1e-5)
    # macro = equal-weight mean over domains; "all" pools every token and byte
    assert r["macro"]["bpb"] == pytest.approx(np.mean([r["domains"][d]["bpb"] for d in r["domains"]]))
    assert r["all"]["bytes"] == sum(len(t.encode("utf-8")) for _, t in TEXTS)


def test_batched_scores_equal_one_by_one_for_any_batch_size(model, docset):
    ref = reference_nll(model, docset, seq_len=16)
    for bs in (1, 2, 5, 64):
        got = score_documents(model, docset, docset.rows, seq_len=16, batch_size=bs)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_window_covers_every_token_once_and_long_window_is_full_context(model, docset):
    long_doc = docset.rows[2:3]
    n = int(long_doc[0, 1] - long_doc[0, 0])
    assert n > 40  # spans several 16-token windows
    short = score_documents(model, docset, long_doc, seq_len=16, batch_size=4)
    full = score_documents(model, docset, long_doc, seq_len=64, batch_size=4)
    assert short[0] != pytest.approx(full[0])  # context resets at window borders ...
    np.testing.assert_allclose(full, reference_nll(model, type(docset)(docset.tokens, long_doc, docset.domains), 64), rtol=1e-5)


def test_document_score_independent_of_its_neighbours(model, tok, docset):
    alone = tokenize_documents([Document("code", "x", TEXTS[5][1])], tok)
    a = score_documents(model, alone, alone.rows, 16, 4)
    b = score_documents(model, docset, docset.rows, 16, 4)
    assert a[0] == pytest.approx(b[5], rel=1e-5)


def test_cap_docs_and_empty_sets(docset, tok):
    capped = cap_docs(docset.rows, 1)
    assert sorted(capped[:, 2].tolist()) == [0, 1, 2]
    assert capped[0, 0] == docset.rows[docset.rows[:, 2] == capped[0, 2]][0, 0]
    with pytest.raises(DataError, match="empty"):
        tokenize_documents([Document("x", "1", "   ")], tok)


# ------------------------------------------------------------------ integration: callback and CLI
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    from rankscope.train.loop import train

    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(data_dir, "train.max_steps=6", "checkpoint.every=0", "eval.every=3", "eval.max_docs=3",
                      "eval.blimp_dir=builtin", "eval.blimp_max_pairs=4", "eval.batch_size=8")
    train(cfg, out, log=lambda s: None)
    return out


def test_callback_writes_metrics_and_summary(run_dir):
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if "val_bpb_macro" in r]
    assert [r["step"] for r in ev] == [3, 6]
    last = ev[-1]
    assert last["val_bpb/shakespeare"] > 0 and last["val_ppl/shakespeare"] == pytest.approx(math.exp(last["val_loss/shakespeare"]))
    assert 0 <= last["blimp_overall"] <= 1 and "blimp/subject_verb_agreement" in last
    assert [r["step"] for r in rows if "blimp_overall" in r] == [6]  # blimp_every=0: only at the end
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_bpb_macro"] == last["val_bpb_macro"] and summary["blimp_overall"] == last["blimp_overall"]


def test_eval_cli_prints_table_writes_json_and_matches_callback(run_dir, tmp_path, capsys):
    from rankscope.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", str(run_dir), "--max-docs", "3", "--blimp", "builtin", "--blimp-max-pairs", "4", "--batch-size", "5", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "macro average" in text and "BLiMP" in text and "shakespeare" in text
    res = json.loads(out.read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    # same checkpoint, same docs, another batch size: same numbers as the in-training evaluation
    assert res["metrics"]["val_bpb_macro"] == pytest.approx(summary["val_bpb_macro"], rel=1e-5)
    assert res["metrics"]["blimp_overall"] == pytest.approx(summary["blimp_overall"])


def test_eval_extra_files_and_clear_errors(run_dir, tmp_path, capsys):
    from rankscope.cli import main
    from rankscope.evaluate import run_eval

    f = tmp_path / "mine.txt"
    f.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate.")
    res = run_eval(run_dir, max_docs=1, files=[str(f)], log=lambda s: None)
    assert res["perplexity"]["files"]["domains"]["mine"]["bytes"] == len(f.read_bytes())
    empty = tmp_path / "blank.jsonl"
    empty.write_text(json.dumps({"text": "  "}) + "\n")
    assert main(["eval", str(run_dir), "--max-docs", "1", "--files", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--max-docs", "1", "--blimp", str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err


def test_eval_refuses_checkpoint_with_other_tokenizer(run_dir, tmp_path, capsys):
    import shutil

    from rankscope.cli import main

    ck = sorted((run_dir / "checkpoints").iterdir())[-1]
    copy = tmp_path / ck.name
    shutil.copytree(ck, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["tokenizer_hash"] = "0" * 16
    write_meta(copy, meta)  # re-sealed: meta.json carries its own hash
    assert main(["eval", str(copy), "--max-docs", "1"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer" in err and err.count("\n") == 1
