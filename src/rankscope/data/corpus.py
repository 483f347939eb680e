"""Prepare a corpus: gather documents, split them deterministically, tokenise into memmap shards.

A prepared corpus is a folder `<cache_dir>/<fingerprint>/` holding
  tokenizer.json
  {train,val,test}.npy       uint16/uint32 tokens (memory-mapped): EOS, doc, EOS, doc, ..., EOS
  {train,val,test}.docs.npy  int64 rows (start, end, domain index, utf-8 bytes) per document
  manifest.json              sources and licences, tokenizer hash, counts per split and domain,
                             and each domain's role ("train", or "eval_only" for data.eval_only_domains)
Within val and test, training-role documents come first; `Corpus.stream_tokens` is that prefix, so the
validation loss drawn in random windows during training stays in-distribution, while per-domain
evaluation (rankscope.evaluate.perplexity) scores every domain, held-out ones included.
The manifest is written last, so a folder with a manifest is complete. The fingerprint hashes every data field,
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
from rankscope.core.errors import DataError
from rankscope.core.paths import check_output_dir

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


def fingerprint(cfg: DataConfig) -> str:
    keys = asdict(cfg)
    keys.pop("cache_dir")
    if not cfg.eval_only_domains:  # corpora prepared before these fields existed keep their fingerprint
        keys.pop("eval_only_domains")
        keys.pop("eval_only_max_bytes")
    for i, f in enumerate([*cfg.files, *([cfg.pretokenized] if cfg.pretokenized else [])]):  # local files: content changes must change the corpus
        keys[f"files_mtime_{i}"] = [(p, os.path.getmtime(p)) for p in sorted(_glob(f))]
    keys["format"] = FORMAT_VERSION
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _glob(spec: str) -> list[str]:
    import glob

    pattern = spec.split("=", 1)[1] if "=" in spec and not Path(spec).exists() else spec
    return glob.glob(pattern, recursive=True)


def split_of(doc: Document, cfg: DataConfig) -> str:
    """Deterministic split from a hash of (seed, domain, doc id): independent of order and of other documents.
    An eval-only domain's documents all go to val and test, in the ratio val_fraction : test_fraction."""
    h = hashlib.sha256(f"{cfg.split_seed}|{doc.domain}|{doc.doc_id}".encode()).digest()
    u = struct.unpack(">Q", h[:8])[0] / 2**64
    if doc.domain in cfg.eval_only_domains:
        return "val" if u < cfg.val_fraction / (cfg.val_fraction + cfg.test_fraction) else "test"
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
        cap = cfg.eval_only_max_bytes if name in cfg.eval_only_domains else cfg.max_bytes_per_source
        try:
            got = list(src.read(cap))
        except SourceUnavailable as e:
            log(f"[data] skipping source {name!r}: {e}")
            continue
        if got:
            docs += got
            used[name] = {"licence": src.licence, "origin": src.origin, "documents": len(got), "role": role_of(name, cfg)}
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
    domains = {d.domain for d in docs}
    if not domains - set(cfg.eval_only_domains):
        raise DataError(f"every domain ({', '.join(sorted(domains))}) is in data.eval_only_domains: nothing is left to train on")
    unknown = sorted(set(cfg.eval_only_domains) - domains)
    if unknown:
        log(f"[data] data.eval_only_domains names {', '.join(unknown)}, which no source gave (domains: {', '.join(sorted(domains))})")
    return docs, used


def role_of(domain: str, cfg: DataConfig) -> str:
    return "eval_only" if domain in cfg.eval_only_domains else "train"


def assign_splits(docs: list[Document], cfg: DataConfig) -> dict[str, list[Document]]:
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        out[split_of(d, cfg)].append(d)
    # every domain with >= 3 documents gets at least one validation document (so it can be reported)
    for domain in sorted({d.domain for d in docs} - set(cfg.eval_only_domains)):
        if not any(d.domain == domain for d in out["val"]):
            train = [d for d in out["train"] if d.domain == domain]
            if len(train) >= 3:
                pick = min(train, key=lambda d: hashlib.sha256(f"{cfg.split_seed}|{d.doc_id}".encode()).digest())
                out["train"].remove(pick)
                out["val"].append(pick)
    if not any(d.domain not in cfg.eval_only_domains for d in out["val"]) and out["train"]:
        raise DataError("no training-domain document fell into validation; add data or raise data.val_fraction")
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
        """Every token of the split, eval-only domains included (they sit after the training ones)."""
        arr = self._load(f"{split}.npy", mmap_mode="r")
        expected = self.manifest["splits"][split].get("tokens")
        if expected is not None and len(arr) != expected:
            raise self._corrupt(f"{split}.npy", f"{len(arr):,} tokens where manifest.json says {expected:,}")
        return arr

    def stream_tokens(self, split: str) -> np.ndarray:
        """The split's tokens of training-role domains only (a prefix of `tokens`): what batches and the
        in-training validation loss draw from. The whole array for corpora without eval-only domains."""
        end = self.manifest["splits"][split].get("stream_end")
        arr = self.tokens(split)
        return arr if end is None else arr[:end]

    @property
    def roles(self) -> dict[str, str]:
        """domain -> "train" or "eval_only"."""
        held = set(self.manifest.get("eval_only_domains", []))
        return {d: ("eval_only" if d in held else "train") for d in self.domains}

    def docs(self, split: str) -> np.ndarray:
        rows = self._load(f"{split}.docs.npy")
        if rows.ndim != 2 or rows.shape[1] != 4:
            raise self._corrupt(f"{split}.docs.npy", f"shape {rows.shape}, not (documents, 4)")
        return rows

    def _load(self, name: str, mmap_mode: str | None = None) -> np.ndarray:
        try:
            return np.load(self.root / name, mmap_mode=mmap_mode)
        except FileNotFoundError:
            raise self._corrupt(name, "no such file") from None
        except (OSError, ValueError, EOFError) as e:  # truncated header or body, not an .npy file
            why = "not an .npy array" if "pickle" in str(e) else (str(e).splitlines() or [type(e).__name__])[0][:100]
            raise self._corrupt(name, why) from None

    def _corrupt(self, name: str, why: str) -> DataError:
        return DataError(f"corpus file {self.root / name} is missing or corrupt ({why}); rebuild it with "
                         f"`rankscope prepare CONFIG --force` or delete {self.root}")

    @property
    def domains(self) -> list[str]:
        return self.manifest["domains"]

    @classmethod
    def open(cls, root: str | Path) -> "Corpus":
        root = Path(root)
        mf = root / "manifest.json"
        if not mf.is_file():
            raise DataError(f"no prepared corpus at {root}; run `rankscope prepare CONFIG` first")
        return cls(root, read_manifest(mf))


def read_manifest(mf: Path) -> dict:
    """A prepared corpus's manifest.json, checked for the keys readers use; a corrupt one is one DataError
    naming the folder and the fix (the corpus is a deterministic cache: rebuilding it loses nothing)."""
    def bad(why: str) -> DataError:
        return DataError(f"corpus manifest {mf} is corrupt ({why}); rebuild it with `rankscope prepare CONFIG --force` "
                         f"or delete {mf.parent}")

    try:
        m = json.loads(mf.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise bad(f"not readable JSON: {str(e).splitlines()[0][:80]}") from None
    if not isinstance(m, dict):
        raise bad(f"a JSON {type(m).__name__}, not an object")
    tok = m.get("tokenizer")
    if not isinstance(tok, dict) or not all(k in tok for k in ("hash", "vocab_size", "eos_id")):
        raise bad("no tokenizer hash, vocab_size and eos_id")
    if not isinstance(tok["vocab_size"], int) or isinstance(tok["vocab_size"], bool) or tok["vocab_size"] < 1:
        raise bad(f"tokenizer vocab_size {tok['vocab_size']!r} is not a positive integer")
    if not isinstance(m.get("domains"), list) or not all(isinstance(d, str) for d in m["domains"]):
        raise bad("no list of domains")
    splits = m.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(splits.get(s), dict) for s in SPLITS):
        raise bad(f"no counts for every split ({', '.join(SPLITS)})")
    return m


def prepare(cfg: DataConfig, force: bool = False, log=print) -> Corpus:
    """Gather, split, tokenise and write a corpus; reuse it when already prepared."""
    root = Path(cfg.cache_dir) / fingerprint(cfg)
    if (root / "manifest.json").is_file() and not force:
        return Corpus.open(root)
    check_output_dir(cfg.cache_dir, "data.cache_dir")  # before gathering: a folder that cannot be written fails at once
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
        # training-role domains first, so that they form a prefix (stream_tokens)
        sdocs = sorted(splits[split], key=lambda d: (d.domain in cfg.eval_only_domains, d.domain, d.doc_id))
        encoded = iter(tok.encode_batch([d.text for d in sdocs if d.ids is None]))
        ids = [list(d.ids) if d.ids is not None else next(encoded) for d in sdocs]
        if any(max(x, default=0) >= tok.vocab_size for x in ids):
            raise DataError(f"pretokenized ids exceed the tokenizer's {tok.vocab_size} tokens; set data.tokenizer to the tokenizer the data was made with")
        total = sum(len(x) + 1 for x in ids) + 1
        arr = np.empty(total, dtype=dtype)
        rows = np.zeros((len(sdocs), 4), dtype=np.int64)
        pos, stream_end = 0, None
        for i, (d, x) in enumerate(zip(sdocs, ids)):
            if stream_end is None and d.domain in cfg.eval_only_domains:
                stream_end = pos + 1  # up to and including the EOS that closes the last training document
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
        if cfg.eval_only_domains:
            counts[split]["stream_end"] = int(stream_end if stream_end is not None else total)
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": root.name,
        "data_config": asdict(cfg),
        "sources": used,
        "domains": domains,
        "eval_only_domains": sorted(set(cfg.eval_only_domains) & set(domains)),
        "domain_summary": domain_summary(counts, domains, cfg),
        "tokenizer": {"spec": cfg.tokenizer, "hash": tok.hash, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
        "dtype": np.dtype(dtype).name,
        "splits": counts,
        "python": sys.version.split()[0],
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    log(f"[data] prepared {root}: " + ", ".join(f"{s} {counts[s]['tokens']:,} tokens" for s in SPLITS))
    log(format_domains(manifest["domain_summary"]))
    return Corpus(root, manifest)


def domain_summary(counts: dict, domains: list[str], cfg: DataConfig) -> dict[str, dict]:
    """Per domain: its role, MB (10^6 UTF-8 bytes) and tokens in total and per split."""
    out = {}
    for dom in domains:
        per = {s: counts[s]["domains"].get(dom, {"documents": 0, "tokens": 0, "bytes": 0}) for s in SPLITS}
        nbytes = sum(p["bytes"] for p in per.values())
        out[dom] = {"role": role_of(dom, cfg), "documents": sum(p["documents"] for p in per.values()), "mb": round(nbytes / 1e6, 3),
                    "tokens": sum(p["tokens"] for p in per.values()), **{f"{s}_tokens": per[s]["tokens"] for s in SPLITS}}
    return out


def format_domains(summary: dict[str, dict]) -> str:
    lines = [f"[data] {'domain':14s} {'role':9s} {'docs':>6s} {'MB':>7s} {'tokens':>11s} {'train':>11s} {'val':>9s} {'test':>9s}"]
    for dom, r in sorted(summary.items(), key=lambda kv: (kv[1]["role"] != "train", kv[0])):
        lines.append(f"[data] {dom[:14]:14s} {r['role']:9s} {r['documents']:6d} {r['mb']:7.2f} {r['tokens']:11,d} "
                     f"{r['train_tokens']:11,d} {r['val_tokens']:9,d} {r['test_tokens']:9,d}")
    return "\n".join(lines)
