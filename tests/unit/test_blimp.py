"""BLiMP: the real files load; malformed rows fail with file and line; scoring is batch-invariant
and matches a direct computation; accuracy aggregates per UID, phenomenon and overall."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import BLIMP_DIR

from rankscope.config import ModelConfig
from rankscope.data.tokenizer import train_bpe
from rankscope.core.errors import DataError, RankscopeError
from rankscope.evaluate.blimp import PHENOMENA, BlimpFormatError, Pair, accuracy, evaluate_blimp, load_pairs, sentence_logprobs
from rankscope.model import Decoder

SENTENCES = ["The cat sleeps.", "The cats sleep.", "The cat sleep.", "A dog barks at the moon tonight.", "Dogs bark.",
             "Who did you see?", "She hurt herself.", "She hurt himself."]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(SENTENCES * 3, 280)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return Decoder(ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=300, max_seq_len=32)).eval()


class Unigram(nn.Module):
    """The same logits u at every position: log P(sentence) = sum of log_softmax(u)[token]."""

    def __init__(self, u: torch.Tensor):
        super().__init__()
        self.u = nn.Parameter(u)
        self.lm_head = nn.Linear(1, len(u), bias=False)

    def forward(self, idx):
        return self.u.expand(*idx.shape, -1)


# ------------------------------------------------------------------ the real files
needs_blimp = pytest.mark.skipif(not BLIMP_DIR.is_dir(), reason=f"BLiMP data not found at {BLIMP_DIR} (../shared/data/blimp beside the repo)")


@needs_blimp
def test_real_blimp_files_load():
    pairs = load_pairs(BLIMP_DIR)
    assert len(list(BLIMP_DIR.glob("*.jsonl"))) == 67 and len(pairs) == 67_000
    uids = {p.uid for p in pairs}
    assert len(uids) == 67
    assert {p.phenomenon for p in pairs} == set(PHENOMENA)
    by_ph = {ph: len({p.uid for p in pairs if p.phenomenon == ph}) for ph in PHENOMENA}
    assert by_ph["argument_structure"] == 9 and by_ph["island_effects"] == 8 and by_ph["subject_verb_agreement"] == 6
    animate = {p.phenomenon for p in pairs if p.uid.startswith("animate_subject")}
    assert animate == {"argument_structure"}  # tagged s-selection in the rows
    assert sum(p.good == p.bad for p in pairs) == 7  # the upstream identical pairs (README)
    capped = load_pairs(BLIMP_DIR, max_pairs=3)
    assert len(capped) == 201 and [p.pair_id for p in capped[:3]] == ["0", "1", "2"]


# ------------------------------------------------------------------ malformed input
def _row(good="The cat sleeps.", bad="The cat sleep.", **kw):
    return json.dumps({"sentence_good": good, "sentence_bad": bad, "UID": "toy", "linguistics_term": "subject_verb_agreement", "pairID": "0", **kw})


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"sentence_good": "A b."}), "sentence_bad"),
    (_row(good=""), "sentence_good"),
    (_row(UID=3), "UID"),
])
def test_malformed_row_names_file_and_line(tmp_path, line, message):
    f = tmp_path / "toy.jsonl"
    f.write_text(_row() + "\n" + line + "\n" + _row() + "\n")
    with pytest.raises(BlimpFormatError, match=message) as e:
        load_pairs(tmp_path)
    assert f"{f}:2" in str(e.value) and isinstance(e.value, RankscopeError)
    logged = []
    pairs = load_pairs(tmp_path, skip_bad=True, log=logged.append)  # only when asked: skip and go on
    assert len(pairs) == 2 and any("skipped 1" in m for m in logged)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_pairs(tmp_path / "nope")
    with pytest.raises(DataError, match="no .jsonl"):
        load_pairs(tmp_path)
    (tmp_path / "x.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no pairs"):
        load_pairs(tmp_path)


def test_rows_without_uid_use_the_file_name(tmp_path):
    (tmp_path / "mine.jsonl").write_text(json.dumps({"sentence_good": "A b.", "sentence_bad": "B a.", "linguistics_term": "s-selection"}) + "\n")
    (p,) = load_pairs(tmp_path)
    assert p.uid == "mine" and p.phenomenon == "argument_structure"


# ------------------------------------------------------------------ scoring
def test_logprobs_match_direct_computation_and_ignore_batching(tok, model):
    ref = []
    for s in SENTENCES:  # one sentence at a time, no padding: EOS + tokens through the model's own loss
        ids = torch.tensor([[tok.eos_id, *tok.encode(s)]])
        with torch.no_grad():
            ref.append(-model(ids[:, :-1], ids[:, 1:]).item() * (ids.shape[1] - 1))
    for bs in (1, 3, 64):
        np.testing.assert_allclose(sentence_logprobs(model, tok, SENTENCES, batch_size=bs), ref, rtol=1e-5, atol=1e-4)


def test_unigram_model_gives_hand_computed_logprobs(tok):
    torch.manual_seed(0)
    u = torch.randn(300)
    logp = torch.log_softmax(u, -1).numpy().astype(np.float64)
    want = [logp[tok.encode(s)].sum() for s in SENTENCES]  # the EOS prefix is context, not scored
    np.testing.assert_allclose(sentence_logprobs(Unigram(u), tok, SENTENCES, batch_size=4), want, rtol=1e-5)


def test_accuracy_on_model_with_known_preferences(tok):
    # uniform logits: log P = -n_tokens * log V, so the model prefers the sentence with fewer tokens
    pairs = [Pair("short_wins", "x", "0", "Dogs bark.", "A dog barks at the moon tonight."),
             Pair("short_wins", "x", "1", "The cat sleeps.", "A dog barks at the moon tonight."),
             Pair("long_loses", "y", "0", "A dog barks at the moon tonight.", "Dogs bark."),
             Pair("tie", "s-selection", "0", "She hurt herself.", "She hurt herself.")]
    r = evaluate_blimp(Unigram(torch.zeros(300)), tok, pairs, batch_size=3)
    assert r["uids"]["short_wins"]["accuracy"] == 1.0 and r["uids"]["long_loses"]["accuracy"] == 0.0
    assert r["uids"]["tie"] == {"phenomenon": "s-selection", "pairs": 1, "correct": 0, "ties": 1, "accuracy": 0.0}  # ties count wrong
    assert r["overall"]["accuracy"] == pytest.approx(1 / 3) and r["overall"]["pair_accuracy"] == 0.5 and r["overall"]["ties"] == 1


def test_accuracy_aggregates_mean_over_uids():
    pairs = ([Pair("a", "p1", str(i), "g", "b") for i in range(4)] + [Pair("b", "p1", str(i), "g", "b") for i in range(2)]
             + [Pair("c", "p2", "0", "g", "b")])
    good = np.array([1, 1, 1, 0, 1, 0, 0], dtype=float)
    bad = np.array([0, 0, 0, 1, 0, 0, 1], dtype=float)  # uid a 3/4, uid b 1/2 (one tie), uid c 0/1
    r = accuracy(pairs, good, bad)
    assert r["uids"]["a"]["accuracy"] == 0.75 and r["uids"]["b"]["accuracy"] == 0.5 and r["uids"]["b"]["ties"] == 1
    assert r["phenomena"]["p1"] == {"uids": 2, "pairs": 6, "accuracy": 0.625}  # mean over its UIDs, not pairs
    assert r["overall"]["accuracy"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert r["overall"]["correct"] == 4 and r["overall"]["pairs"] == 7


def test_overlong_sentence_is_a_clear_error(tok, model):
    with pytest.raises(DataError, match="max_seq_len"):
        sentence_logprobs(model, tok, ["word " * 200])
