import json

import numpy as np
import pytest

from rankscope.config import DataConfig
from rankscope.data.corpus import Corpus, assign_splits, prepare, split_of
from rankscope.data.sources import SOURCES, Document, read_files, read_hf_dataset
from rankscope.data.stream import BatchStream
from rankscope.data.tokenizer import TextTokenizer, train_bpe
from rankscope.errors import DataError


def small_data_cfg(tmp_path, **kw) -> DataConfig:
    base = dict(sources=["shakespeare"], max_bytes_per_source=200_000, tokenizer_vocab_size=400, cache_dir=str(tmp_path / "data"))
    return DataConfig(**{**base, **kw})


def test_tokenizer_round_trips_any_text(tmp_path):
    tok = train_bpe(["hello world, the quick brown fox"] * 20, vocab_size=300)
    for text in ["hello world", "ünïcödé ✓ and emoji 🎉", "def f(x):\n\treturn x  # tabs", ""]:
        assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "t.json")
    again = TextTokenizer.load(tmp_path / "t.json")
    assert again.hash == tok.hash and again.encode("hello") == tok.encode("hello")


def test_bad_tokenizer_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read tokenizer"):
        TextTokenizer.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match="not found"):
        TextTokenizer.load(tmp_path / "missing.json")


def test_split_is_deterministic_and_order_independent(tmp_path):
    cfg = small_data_cfg(tmp_path)
    docs = [Document("d", f"doc{i}", "x" * 10) for i in range(500)]
    a = assign_splits(docs, cfg)
    b = assign_splits(list(reversed(docs)), cfg)
    assert {d.doc_id for d in a["val"]} == {d.doc_id for d in b["val"]}
    assert 10 < len(a["val"]) < 45  # ~5%
    assert split_of(docs[0], cfg) == split_of(Document("d", "doc0", "other text"), cfg)  # by id, not content


def test_prepared_corpus_keeps_domains_and_counts(tmp_path):
    (tmp_path / "notes.txt").write_text("some local notes about nothing in particular. " * 200)
    cfg = small_data_cfg(tmp_path, files=[f"mine={tmp_path}/*.txt"], val_fraction=0.3)
    corpus = prepare(cfg, log=lambda *_: None)
    m = corpus.manifest
    assert set(m["domains"]) == {"mine", "shakespeare"}
    assert m["sources"]["shakespeare"]["licence"].startswith("MIT")
    tokens, docs = corpus.tokens("train"), corpus.docs("train")
    assert tokens[0] == m["tokenizer"]["eos_id"]
    assert all(tokens[s - 1] == m["tokenizer"]["eos_id"] for s in docs[:20, 0])  # EOS precedes every document
    assert int((docs[:, 1] - docs[:, 0]).sum()) == sum(v["tokens"] for v in m["splits"]["train"]["domains"].values())
    assert prepare(cfg, log=lambda *_: None).root == corpus.root  # prepared once, reused
    assert Corpus.open(corpus.root).manifest == m


def test_batches_are_a_pure_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    s1, s2 = BatchStream(tokens, 16, 4, seed=3), BatchStream(tokens, 16, 4, seed=3)
    x1, y1 = s1.get(7)
    s2.get(0), s2.get(99)
    x2, y2 = s2.get(7)
    assert (x1 == x2).all() and (y1 == y2).all()
    assert (y1[:, :-1] == x1[:, 1:]).all()  # targets are inputs shifted by one
    assert not (BatchStream(tokens, 16, 4, seed=4).get(7)[0] == x1).all()


def test_ranks_and_micro_batches_partition_the_global_batch():
    tokens = np.arange(10_000, dtype=np.uint16)
    single = BatchStream(tokens, 8, 8, grad_accum=1, seed=1).get(5)[0]
    parts = [BatchStream(tokens, 8, 2, grad_accum=2, seed=1, rank=r, world_size=2).get(5, m)[0] for m in range(2) for r in range(2)]
    assert (np.concatenate([p.numpy() for p in parts]) == single.numpy()).all()


def test_too_short_split_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than train.seq_len"):
        BatchStream(np.arange(10, dtype=np.uint16), 32, 2)


def test_local_files_jsonl_parquet_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    pq.write_table(pa.table({"text": ["three", "four"]}), tmp_path / "b.parquet")
    docs = list(read_files([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")]))
    assert [d.text for d in docs] == ["one", "two", "three", "four"]
    assert {d.domain for d in docs} == {"a", "b"}

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not valid JSON"):
        list(read_files([str(tmp_path / "bad.jsonl")]))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="is empty"):
        list(read_files([str(tmp_path / "empty.txt")]))
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(DataError, match="looks binary"):
        list(read_files([str(tmp_path / "bin.txt")]))
    with pytest.raises(DataError, match="no files match"):
        list(read_files([str(tmp_path / "*.nothing")]))
    with pytest.raises(DataError, match="no 'body' field"):
        list(read_files([str(tmp_path / "a.jsonl")], text_field="body"))


def test_hugging_face_dataset_by_local_path_streams(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [{"text": f"document number {i}", "source": "web" if i % 2 else "books"} for i in range(30)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = list(read_hf_dataset(str(folder), None, "train", "text", max_docs=25))
    assert len(docs) == 25 and docs[3].text == "document number 3"
    assert {d.domain for d in docs} == {"web", "books"}
    with pytest.raises(DataError, match="cannot load Hugging Face dataset"):
        list(read_hf_dataset(str(tmp_path / "nope"), None, "train", "text", 5))


def test_unavailable_source_is_skipped_with_a_message(tmp_path, monkeypatch):
    from rankscope.data import sources

    def missing(max_bytes):
        raise sources.SourceUnavailable("Debian package 'x' is not installed")

    monkeypatch.setitem(SOURCES, "ghost", sources.Source("ghost", "none", "nowhere", missing))
    messages = []
    corpus = prepare(small_data_cfg(tmp_path, sources=["shakespeare", "ghost"]), log=messages.append)
    assert any("skipping source 'ghost'" in m for m in messages)
    assert corpus.domains == ["shakespeare"]
    with pytest.raises(DataError, match="corpus is empty"):
        prepare(small_data_cfg(tmp_path, sources=["ghost"]), log=lambda *_: None)
    with pytest.raises(DataError, match="unknown data source"):
        prepare(small_data_cfg(tmp_path, sources=["nonsense"]), log=lambda *_: None)
