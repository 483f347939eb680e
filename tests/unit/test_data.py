import json

import numpy as np
import pytest

from rankscope.config import DataConfig
from rankscope.data.corpus import Corpus, assign_splits, prepare, split_of
from rankscope.data.sources import SOURCES, Document, read_files, read_hf_dataset
from rankscope.data.stream import BatchStream
from rankscope.data.tokenizer import TextTokenizer, train_bpe
from rankscope.core.errors import DataError


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


# ------------------------------------------------------------------ English prose sources and held-out domains
from pathlib import Path  # noqa: E402

from rankscope.data import prose  # noqa: E402
from rankscope.data.rest import rst_to_prose  # noqa: E402


def _source_or_skip(name: str, max_bytes: int = 300_000) -> list[Document]:
    from rankscope.data.sources import SourceUnavailable

    try:
        return list(SOURCES[name].read(max_bytes))
    except SourceUnavailable as e:
        pytest.skip(f"source {name!r} not installed here ({e}); scripts/setup.sh installs it as root")


def test_osis_markup_is_stripped_without_gluing_words():
    # Genesis 1:1 as engWEB2015eb stores it: the footnote sits between two words with no space
    verse = ('<w lemma="strong:H0430">In</w> <w>the</w> <w>beginning</w>, <w>God</w><note placement="foot">'
             '<reference type="annotateRef">1:1 </reference>The Hebrew word rendered “God” is “אֱלֹהִ֑ים” (Elohim).</note>'
             '<w>created</w> <w>the</w> <w>heavens</w>.<l eID="x"/><l sID="y"/>And <w>so</w><note>n</note>, “<q>it</q>”')
    assert prose.osis_to_text(verse) == "In the beginning, God created the heavens. And so, “it”"


def test_world_english_bible_reads_clean_verses():
    docs = _source_or_skip("web")
    assert docs[0].doc_id == "Gen/1" and docs[0].text.startswith("In the beginning, God created the heavens and the earth. The earth was")
    text = " ".join(d.text for d in docs)
    assert "<" not in text and ">" not in text and "Godcreated" not in text
    assert not __import__("re").search(r"[a-z][A-Z]|[a-z][.,;:!?][A-Za-z]", text)  # no glued words at a stripped tag
    assert SOURCES["web"].licence.startswith("Public domain")


def test_rst_prose_keeps_text_and_drops_code_and_markup():
    rst = """.. _tut-if:

:keyword:`!if` Statements
=========================

Perhaps the most well-known statement is :keyword:`if`.  See :ref:`the tutorial <tut-x>`,
:func:`~os.path.join` and ``len(x)`` in `Python <https://python.org>`_ with **bold** text. For example::

   >>> x = 1
   >>> if x: print(x)

.. note::

   A note body is prose
   on two lines.

.. code-block:: python

   never_seen = 1

* an item
* another item

>>> doctest_line()
output
"""
    paras = rst_to_prose(rst).split("\n\n")
    assert paras == ["if Statements",
                     "Perhaps the most well-known statement is if. See the tutorial, join and len(x) in Python with bold text. "
                     "For example:",
                     "A note body is prose on two lines.", "an item", "another item"]


def test_python_docs_and_austen_read_as_prose():
    docs = _source_or_skip("pydocs")
    assert docs[0].doc_id.startswith("tutorial/") and all(":func:`" not in d.text and "::\n" not in d.text for d in docs)
    assert SOURCES["pydocs"].licence.startswith("PSF-2.0")
    docs = _source_or_skip("austen")
    novels = {"emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"}
    assert {d.doc_id.split("/")[0] for d in docs} <= novels
    assert "\n" not in docs[0].text.split("\n\n")[1]  # hard-wrapped lines joined into paragraphs
    assert "Public domain" in SOURCES["austen"].licence


def test_eval_only_domains_are_absent_from_training_and_present_in_eval(tmp_path):
    from rankscope.data.corpus import fingerprint
    from rankscope.evaluate.perplexity import corpus_docset

    for name in ("code", "dict"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name} entry {i} " * 30}) + "\n" for i in range(40)))
    files = [f"code={tmp_path}/code.jsonl", f"dict={tmp_path}/dict.jsonl"]
    cfg = small_data_cfg(tmp_path, files=files, eval_only_domains=["code", "dict"], eval_only_max_bytes=50_000)
    corpus = prepare(cfg, log=lambda *_: None)
    m, dom = corpus.manifest, corpus.domains
    assert m["eval_only_domains"] == ["code", "dict"] and corpus.roles == {"code": "eval_only", "dict": "eval_only", "shakespeare": "train"}
    train_rows = corpus.docs("train")
    assert {dom[i] for i in train_rows[:, 2]} == {"shakespeare"}  # nothing held out reached the training shard
    held = {s: {dom[i] for i in corpus.docs(s)[:, 2]} for s in ("val", "test")}
    assert held["val"] == held["test"] == {"code", "dict", "shakespeare"}
    assert sum(m["splits"][s]["domains"]["code"]["documents"] for s in ("val", "test")) == 40  # every held-out document is evaluated
    for split in ("val", "test"):  # training-role documents are a prefix: what the validation stream draws from
        rows, stream = corpus.docs(split), corpus.stream_tokens(split)
        train_role = np.array([dom[i] == "shakespeare" for i in rows[:, 2]])
        assert rows[train_role, 1].max() < len(stream) <= rows[~train_role, 0].min()
    summary = m["domain_summary"]
    assert summary["code"]["role"] == "eval_only" and summary["code"]["train_tokens"] == 0 and summary["shakespeare"]["mb"] > 0.1
    r = corpus_docset(corpus, "val")
    assert r.roles["dict"] == "eval_only"
    # a config without eval-only domains keeps its fingerprint (its prepared corpus stays valid)
    plain = small_data_cfg(tmp_path)
    assert fingerprint(plain) == fingerprint(DataConfig(**{**plain.__dict__, "eval_only_max_bytes": 1}))


def test_eval_only_domains_validation(tmp_path):
    from rankscope.methods import load_config
    from rankscope.core.errors import ConfigError

    with pytest.raises(ConfigError, match="holds every source"):
        load_config(None, ["data.sources=[shakespeare]", "data.eval_only_domains=[shakespeare]"])
    with pytest.raises(ConfigError, match="distinct"):
        load_config(None, ["data.eval_only_domains=[python, python]"])
    with pytest.raises(DataError, match="nothing is left to train on"):
        prepare(small_data_cfg(tmp_path, sources=[], files=[f"only={Path(__file__)}"], eval_only_domains=["only"]), log=lambda *_: None)


def test_english_preset_trains_on_prose_and_holds_out_code():
    from rankscope.methods import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "english-cpu.yaml"), [])
    train_domains = set(cfg.data.sources) - set(cfg.data.eval_only_domains)
    assert {"web", "austen"} <= train_domains and {"python", "gcide", "jargon"} == set(cfg.data.eval_only_domains)
    assert all(name in SOURCES for name in cfg.data.sources)


def test_the_sources_table_refuses_a_second_source_of_a_name():
    from rankscope.data.sources import Source, sources_table

    def read(max_bytes):
        return iter(())

    assert list(sources_table([Source("a", "none", "here", read), Source("b", "none", "here", read)])) == ["a", "b"]
    with pytest.raises(ValueError, match="two data sources are named 'a'"):
        sources_table([Source("a", "none", "here", read), Source("a", "other", "there", read)])
    assert {"shakespeare", "python", "web", "pydocs", "austen"} <= set(SOURCES)
