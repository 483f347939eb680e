"""Paloma perplexity under pico-train's definition (rankscope.evaluate.paloma): per row exp(mean NLL of
tokens 1..L-1), no BOS, truncation to max_length, mean over rows; on a local parquet in the layout of
pico-lm/pretokenized-paloma-tinsy (input_ids, text, source), checked against a direct computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from rankscope.config import ModelConfig
from rankscope.data.tokenizer import train_bpe
from rankscope.core.errors import DataError
from rankscope.evaluate.paloma import load_paloma, paloma_perplexity
from rankscope.model import Decoder

VOCAB = 320


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Decoder(ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=VOCAB, max_seq_len=64)).eval()


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["the cat sat on the mat. def f(x): return x", "a dog, a log; the end."] * 20, 300)


def write_set(path, rows):
    """rows: (source, ids, text), pico's column names."""
    pq.write_table(pa.table({"input_ids": [list(map(int, r[1])) for r in rows], "text": [r[2] for r in rows],
                             "source": [r[0] for r in rows]}), path)
    return path


def direct(model, ids, max_length):
    """pico-train's metric for one row, one row at a time, no padding."""
    ids = torch.as_tensor(ids[:max_length], dtype=torch.long)[None]
    with torch.no_grad():
        logp = F.log_softmax(model(ids[:, :-1]).double(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # targets t_1..t_{L-1}
    return math.exp(nll.mean().item()), nll.sum().item(), ids.shape[1] - 1


def test_pretokenized_parquet_matches_direct_computation(model, tmp_path):
    rng = np.random.default_rng(0)
    lens = {"c4_en": [40, 64, 64], "wikitext_103": [64, 17], "ptb": [90]}  # 90 > max_length: truncated like HF's metric
    rows = [(src, rng.integers(0, VOCAB, n), "unused") for src, ns in lens.items() for n in ns]
    path = write_set(tmp_path / "paloma.parquet", rows)
    pset = load_paloma(str(path), None, VOCAB)
    assert pset.column == "input_ids" and len(pset.sequences) == 6
    res = paloma_perplexity(model, pset, max_length=64, batch_size=4)
    want = {src: [direct(model, ids, 64) for s, ids, _ in rows if s == src] for src in lens}
    for src, vals in want.items():
        got = res["sources"][src]
        assert got["mean_perplexity"] == pytest.approx(np.mean([v[0] for v in vals]), rel=1e-5)  # per-sequence average
        assert got["token_perplexity"] == pytest.approx(math.exp(sum(v[1] for v in vals) / sum(v[2] for v in vals)), rel=1e-5)
        assert got["tokens"] == sum(v[2] for v in vals)
    every = [v[0] for vals in want.values() for v in vals]
    assert res["overall"]["mean_perplexity"] == pytest.approx(np.mean(every), rel=1e-5)  # pico-train's single number
    assert res["overall"]["mean_perplexity"] != pytest.approx(res["overall"]["token_perplexity"], rel=1e-4)  # two definitions
    assert res["sources"]["ptb"]["tokens"] == 63
    # batch size and folder input change nothing
    again = paloma_perplexity(model, load_paloma(str(tmp_path), None, VOCAB), max_length=64, batch_size=1)
    assert again["overall"]["mean_perplexity"] == pytest.approx(res["overall"]["mean_perplexity"], rel=1e-6)


def test_text_set_is_tokenised_with_the_run_tokenizer(model, tok, tmp_path):
    texts = [("news", "the cat sat on the mat."), ("news", "a dog, a log; the end."), ("code", "def f(x): return x")]
    pq.write_table(pa.table({"text": [t for _, t in texts], "subdomain": [s for s, _ in texts]}), tmp_path / "t.parquet")
    pset = load_paloma(str(tmp_path / "t.parquet"), tok, VOCAB, source_field="subdomain")
    assert pset.column.startswith("text") and [list(s) for s in pset.sequences] == [tok.encode(t) for _, t in texts]
    res = paloma_perplexity(model, pset, max_length=64)
    assert res["sources"]["code"]["mean_perplexity"] == pytest.approx(direct(model, tok.encode(texts[2][1]), 64)[0], rel=1e-5)


def test_clear_errors(model, tmp_path, monkeypatch):
    path = write_set(tmp_path / "big.parquet", [("c4_en", [5, 50279, 7], "x")])
    with pytest.raises(DataError, match="50279.*>= the model's vocabulary of 320.*data.tokenizer=olmo"):
        load_paloma(str(path), None, VOCAB)
    with pytest.raises(DataError, match="no 'domain' column"):
        load_paloma(str(path), None, VOCAB, source_field="domain")
    with pytest.raises(DataError, match="no parquet file"):
        load_paloma(str(tmp_path / "nothing.parquet"), None, VOCAB)
    import datasets

    calls = []

    def offline(name, split=None, **kw):  # what the hub gives without a network, without waiting for its retries
        calls.append((name, split))
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot load Paloma set 'pico-lm/pretokenized-paloma-tinsy' split 'val'.*ConnectionError"):
        load_paloma("pico-lm/pretokenized-paloma-tinsy", None, VOCAB)
    assert calls == [("pico-lm/pretokenized-paloma-tinsy", "val")]  # pico-train's split
    short = write_set(tmp_path / "short.parquet", [("a", [3], "x")])
    with pytest.raises(DataError, match="no row has 2 or more tokens"):
        paloma_perplexity(model, load_paloma(str(short), None, VOCAB), max_length=64)


def test_eval_cli_reports_paloma_per_source(tmp_path, data_dir, capsys):
    from rankscope.cli import main
    from rankscope.train.loop import train

    run = tmp_path / "run"
    cfg = tiny_config(data_dir, "train.max_steps=3", "checkpoint.every=0", "eval.per_domain=false")
    train(cfg, run, log=lambda s: None)
    rng = np.random.default_rng(1)
    write_set(tmp_path / "p.parquet", [(s, rng.integers(0, 512, 40), "x") for s in ("c4_en", "c4_en", "ptb")])
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--max-docs", "1", "--paloma", str(tmp_path / "p.parquet"), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "overall (pico-train's number)" in text and "ptb" in text
    res = json.loads(out.read_text())
    assert set(res["paloma"]["sources"]) == {"c4_en", "ptb"} and res["paloma"]["max_length"] == cfg.model.max_seq_len
    assert res["metrics"]["paloma_ppl"] == res["paloma"]["overall"]["mean_perplexity"]
    write_set(tmp_path / "olmo.parquet", [("c4_en", [1, 50000, 2], "x")])
    assert main(["eval", str(run), "--max-docs", "1", "--paloma", str(tmp_path / "olmo.parquet")]) == 2
    assert "data.tokenizer=olmo" in capsys.readouterr().err
