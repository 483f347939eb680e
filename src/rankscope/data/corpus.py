"""Prepare a corpus: gather documents, split them deterministically, tokenise into memmap shards.

A prepared corpus is a folder `<cache_dir>/<fingerprint>/` holding
  tokenizer.json
  {train,val,test}.npy       uint16/uint32 tokens (memory-mapped): EOS, doc, EOS, doc, ..., EOS
  {train,val,test}.docs.npy  int64 rows (start, end, domain index, utf-8 bytes) per document
  manifest.json              sources and licences, tokenizer hash, counts per split and domain
written last, so a folder with a manifest is complete. The fingerprint hashes every data field,
so a changed config never reads a stale corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rankscope.config import DataConfig
from rankscope.data.sources import SOURCES, Document, SourceUnavailable, read_files, read_hf_dataset, read_pretokenized
from rankscope.data.tokenizer import TextTokenizer, olmo_tokenizer_path, train_bpe
from rankscope.errors import DataError

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


def fingerprint(cfg: DataConfig) -> str:
    keys = asdict(cfg)
    keys.pop("cache_dir")
    for i, f in enumerate([*cfg.files, *([cfg.pretokenized] if cfg.pretokenized else [])]):  # local files: content changes must change the corpus
        keys[f"files_mtime_{i}"] = [(p, os.path.getmtime(p)) for p in sorted(_glob(f))]
    keys["format"] = FORMAT_VERSION
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _glob(spec: str) -> list[str]:
    import glob

    pattern = spec.split("=", 1)[1] if "=" in spec and not Path(spec).exists() else spec
    return glob.glob(pattern, recursive=True)


def split_of(doc: Document, cfg: DataConfig) -> str:
    """Deterministic split from a hash of (seed, domain, doc id): independent of order and of other documents."""
    h = hashlib.sha256(f"{cfg.split_seed}|{doc.domain}|{doc.doc_id}".encode()).digest()
    u = struct.unpack(">Q", h[:8])[0] / 2**64
    if u < cfg.val_fraction:
        return "val"
    if u < cfg.val_fraction + cfg.test_fraction:
        return "test"
    return "train"


def gather_documents(cfg: DataConfig, log=print) -> tuple[list[Document], dict[str, dict]]:
    docs: list[Document] = []
    used: dict[str, dict] = {}
    for name in cfg.sources:
        if name not in SOURCES:
            raise DataError(f"unknown data source {name!r}; valid sources: {', '.join(SOURCES)}")
        src = SOURCES[name]
        try:
            got = list(src.read(cfg.max_bytes_per_source))
        except SourceUnavailable as e:
            log(f"[data] skipping source {name!r}: {e}")
            continue
        if got:
            docs += got
            used[name] = {"licence": src.licence, "origin": src.origin, "documents": len(got)}
    if cfg.files:
        got = list(read_files(cfg.files, cfg.text_field))
        docs += got
        used["files"] = {"licence": "user-supplied", "origin": ", ".join(cfg.files), "documents": len(got)}
    if cfg.hf_dataset:
        got = list(read_hf_dataset(cfg.hf_dataset, cfg.hf_config, cfg.hf_split, cfg.text_field, cfg.hf_max_docs))
        docs += got
        used["hf"] = {"licence": "see the dataset card", "origin": cfg.hf_dataset, "documents": len(got)}
    if cfg.pretokenized:
        got = list(read_pretokenized(cfg.pretokenized, cfg.pretokenized_column, cfg.hf_max_docs))
        docs += got
        used["pretokenized"] = {"licence": "see the dataset card", "origin": cfg.pretokenized, "documents": len(got)}
    docs = [d for d in docs if d.text.strip() or d.ids]
    if not docs:
        raise DataError("the corpus is empty: no source gave any text; check data.sources / data.files (run `make setup` for the embedded sources)")
    return docs, used


def assign_splits(docs: list[Document], cfg: DataConfig) -> dict[str, list[Document]]:
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        out[split_of(d, cfg)].append(d)
    # every domain with >= 3 documents gets at least one validation document (so it can be reported)
    for domain in sorted({d.domain for d in docs}):
        if not any(d.domain == domain for d in out["val"]):
            train = [d for d in out["train"] if d.domain == domain]
            if len(train) >= 3:
                pick = min(train, key=lambda d: hashlib.sha256(f"{cfg.split_seed}|{d.doc_id}".encode()).digest())
                out["train"].remove(pick)
                out["val"].append(pick)
    if not out["train"] or not out["val"]:
        raise DataError("too few documents to split into train and validation; add data or raise data.val_fraction")
    return out


def build_tokenizer(cfg: DataConfig, train_docs: list[Document]) -> TextTokenizer:
    if cfg.tokenizer == "bpe":
        return train_bpe((d.text for d in train_docs), cfg.tokenizer_vocab_size)
    path = olmo_tokenizer_path() if cfg.tokenizer == "olmo" else Path(cfg.tokenizer)
    return TextTokenizer.load(path)


@dataclass
class Corpus:
    """A prepared corpus on disk; token arrays are memory-mapped on first use."""

    root: Path
    manifest: dict

    @property
    def tokenizer(self) -> TextTokenizer:
        return TextTokenizer.load(self.root / "tokenizer.json")

    def tokens(self, split: str) -> np.ndarray:
        return np.load(self.root / f"{split}.npy", mmap_mode="r")

    def docs(self, split: str) -> np.ndarray:
        return np.load(self.root / f"{split}.docs.npy")

    @property
    def domains(self) -> list[str]:
        return self.manifest["domains"]

    @classmethod
    def open(cls, root: str | Path) -> "Corpus":
        root = Path(root)
        mf = root / "manifest.json"
        if not mf.is_file():
            raise DataError(f"no prepared corpus at {root}; run `rankscope prepare CONFIG` first")
        return cls(root, json.loads(mf.read_text()))


def prepare(cfg: DataConfig, force: bool = False, log=print) -> Corpus:
    """Gather, split, tokenise and write a corpus; reuse it when already prepared."""
    root = Path(cfg.cache_dir) / fingerprint(cfg)
    if (root / "manifest.json").is_file() and not force:
        return Corpus.open(root)
    docs, used = gather_documents(cfg, log)
    splits = assign_splits(docs, cfg)
    log(f"[data] {len(docs)} documents from {', '.join(used)}; training tokenizer ({cfg.tokenizer})")
    tok = build_tokenizer(cfg, splits["train"])
    domains = sorted({d.domain for d in docs})
    dom_idx = {d: i for i, d in enumerate(domains)}
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save(tmp / "tokenizer.json")
    counts: dict[str, dict] = {}
    for split in SPLITS:
        sdocs = sorted(splits[split], key=lambda d: (d.domain, d.doc_id))
        encoded = iter(tok.encode_batch([d.text for d in sdocs if d.ids is None]))
        ids = [list(d.ids) if d.ids is not None else next(encoded) for d in sdocs]
        if any(max(x, default=0) >= tok.vocab_size for x in ids):
            raise DataError(f"pretokenized ids exceed the tokenizer's {tok.vocab_size} tokens; set data.tokenizer to the tokenizer the data was made with")
        total = sum(len(x) + 1 for x in ids) + 1
        arr = np.empty(total, dtype=dtype)
        rows = np.zeros((len(sdocs), 4), dtype=np.int64)
        pos = 0
        for i, (d, x) in enumerate(zip(sdocs, ids)):
            arr[pos] = tok.eos_id  # document start (and end of the previous one)
            arr[pos + 1 : pos + 1 + len(x)] = x
            text = d.text if d.ids is None else tok.decode(list(d.ids))  # bytes of what the ids spell
            rows[i] = (pos + 1, pos + 1 + len(x), dom_idx[d.domain], len(text.encode("utf-8")))
            pos += 1 + len(x)
        arr[pos] = tok.eos_id
        np.save(tmp / f"{split}.npy", arr)
        np.save(tmp / f"{split}.docs.npy", rows)
        per_domain = {}
        for dom in domains:
            sel = rows[rows[:, 2] == dom_idx[dom]]
            if len(sel):
                per_domain[dom] = {"documents": int(len(sel)), "tokens": int((sel[:, 1] - sel[:, 0]).sum()), "bytes": int(sel[:, 3].sum())}
        counts[split] = {"documents": len(sdocs), "tokens": int(total), "bytes": int(rows[:, 3].sum()), "domains": per_domain}
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": root.name,
        "data_config": asdict(cfg),
        "sources": used,
        "domains": domains,
        "tokenizer": {"spec": cfg.tokenizer, "hash": tok.hash, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
        "dtype": np.dtype(dtype).name,
        "splits": counts,
        "python": sys.version.split()[0],
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    log(f"[data] prepared {root}: " + ", ".join(f"{s} {counts[s]['tokens']:,} tokens" for s in SPLITS))
    return Corpus(root, manifest)
