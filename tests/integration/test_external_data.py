"""Training on data from outside the embedded corpus: a locally made Hugging Face dataset and
Pico's pretokenized format (a parquet column of token ids), both made here since no hub is reachable."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import tiny_config

from rankscope.data.corpus import prepare
from rankscope.data.tokenizer import train_bpe
from rankscope.core.errors import ConfigError, DataError
from rankscope.train.loop import train

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def test_a_local_hugging_face_dataset_trains(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"text": f"{TEXT} story {i}", "source": ["web", "books"][i % 2]} for i in range(60)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tmp_path / "data", "data.sources=[]", f"data.hf_dataset={folder}", "data.val_fraction=0.2", "train.max_steps=12", "train.tensorboard=false")
    summary = train(cfg, tmp_path / "run", log=lambda *_: None)
    assert summary["final_train_loss"] < 6.0
    assert set(prepare(cfg.data, log=lambda *_: None).domains) == {"web", "books"}


def test_pico_pretokenized_parquet_trains_without_retokenising(tmp_path):
    tok = train_bpe([TEXT, "other words entirely, numbers 12345"] * 10, vocab_size=300)
    tok.save(tmp_path / "tokenizer.json")
    ids = [tok.encode(f"{TEXT} {i}") for i in range(40)]
    pq.write_table(pa.table({"input_ids": ids}), tmp_path / "pretok.parquet")
    cfg = tiny_config(tmp_path / "data", "data.sources=[]", f"data.pretokenized={tmp_path}/pretok.parquet",
                      f"data.tokenizer={tmp_path}/tokenizer.json", "data.val_fraction=0.2", "train.max_steps=12", "train.tensorboard=false")
    corpus = prepare(cfg.data, log=lambda *_: None)
    docs, tokens = corpus.docs("train"), corpus.tokens("train")
    start, end, _, n_bytes = docs[0]
    assert list(tokens[start:end]) in ids  # the ids are stored exactly as given
    assert n_bytes == len(tok.decode(list(tokens[start:end])).encode())
    summary = train(cfg, tmp_path / "run", log=lambda *_: None)
    assert summary["steps"] == 12


def test_pretokenized_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs the tokenizer its ids come from"):
        tiny_config(tmp_path, "data.pretokenized=x.parquet", "data.tokenizer=bpe")
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "wrong.parquet")
    tok = train_bpe([TEXT], vocab_size=280)
    tok.save(tmp_path / "t.json")
    cfg = tiny_config(tmp_path / "data", "data.sources=[]", f"data.pretokenized={tmp_path}/wrong.parquet", f"data.tokenizer={tmp_path}/t.json")
    with pytest.raises(DataError, match="cannot read column 'input_ids'"):
        prepare(cfg.data, log=lambda *_: None)
