"""Few-shot data for `rankscope finetune`: the target domain's shot pool, validation and test documents, the
shots a seed draws, and the source documents every method is scored on for forgetting.

Splits of the target (`finetune.target`):
  a training-role domain of the corpus   pool = its train split, val = its val split, test = its test split;
  a held-out domain (data.eval_only_domains), which has no train split: its val documents are divided by a
                                         hash of their tokens into the pool (`finetune.pool_fraction`) and val;
                                         test = its test split, untouched;
  the user's files (`finetune.target=files`) tokenised with the corpus tokenizer and divided by a hash of their
                                         tokens: pool_fraction to the pool, the rest halved into val and test.
A shot is a pool document, or with `finetune.shot_len` > 0 a passage of that many tokens cut from one (held-out
domains hold a few dozen long documents: passages make k in the tens and hundreds possible).

`select_shots(keys, seed, domain, k)` orders the candidates by sha256(seed | domain | key) and takes the first k
(or, with a token budget, as many as fit): a pure function of (seed, domain, k) and the pool, independent of the
method, so paired seeds give every method the same shots, and the shots of a smaller k are a subset of a larger k's.
The source documents are the first `finetune.source_docs` validation documents of each training-role domain, in
corpus order: the same batches for every method and seed (`source_docset`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from dataclasses import dataclass

import numpy as np

from rankscope.core.errors import DataError
from rankscope.data.docset import DocSet, corpus_docset, tokenize_documents

FILES_DOMAIN = "files"


@dataclass
class FewshotData:
    """What a fine-tune trains on and is scored on; each DocSet in the corpus layout (rankscope.evaluate.perplexity)."""

    domain: str
    pool: DocSet  # every candidate shot (one row per document or passage)
    shots: DocSet  # the drawn shots, in draw order
    val: DocSet  # picks the learning rate and the stopping step
    test: DocSet  # scores, never chooses
    source: DocSet  # the source domains' fixed documents (forgetting)

    def describe(self) -> str:
        n = lambda d: f"{len(d.rows)} docs / {int((d.rows[:, 1] - d.rows[:, 0]).sum()):,} tokens"  # noqa: E731
        return (f"target {self.domain}: {len(self.shots.rows)} shots ({n(self.shots)}) from a pool of {n(self.pool)}; "
                f"val {n(self.val)}, test {n(self.test)}; source {n(self.source)} in {len(np.unique(self.source.rows[:, 2]))} domains")


def unit(*parts: object) -> float:
    """A number in [0, 1) from a hash of `parts`: the same on every machine and run."""
    h = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return struct.unpack(">Q", h[:8])[0] / 2**64


def doc_key(tokens: np.ndarray, row: np.ndarray) -> str:
    """A document's identity: a hash of its token ids (stable wherever the corpus and tokenizer are the same)."""
    return hashlib.sha256(np.asarray(tokens[row[0] : row[1]], dtype=np.int64).tobytes()).hexdigest()[:16]


def select_shots(keys: list[str], seed: int, domain: str, k: int = 0, lengths: list[int] | None = None, token_budget: int = 0) -> list[int]:
    """Indices into `keys` of the shots: candidates ordered by sha256(seed | domain | key), then the first `k`, or
    (k = 0) the longest prefix whose `lengths` sum to at most `token_budget` (at least one). Pure: no global RNG."""
    order = sorted(range(len(keys)), key=lambda i: hashlib.sha256(f"{seed}|{domain}|{keys[i]}".encode()).digest())
    if k:
        if k > len(keys):
            raise DataError(f"finetune.shots={k} but the {domain} pool holds {len(keys)} candidates; lower finetune.shots, "
                            "set finetune.shot_len to draw passages, or raise finetune.pool_fraction")
        return order[:k]
    if lengths is None:
        raise ValueError("a token budget needs the candidates' lengths")
    out, total = [], 0
    for i in order:
        if out and total + lengths[i] > token_budget:
            break
        out.append(i)
        total += lengths[i]
    return out


def subset(ds: DocSet, rows: np.ndarray) -> DocSet:
    return DocSet(ds.tokens, rows, ds.domains, ds.roles)


def domain_rows(ds: DocSet, domain: str) -> np.ndarray:
    rows = ds.rows[ds.rows[:, 2] == ds.domains.index(domain)]
    return rows[rows[:, 1] > rows[:, 0]]


def passages(ds: DocSet, rows: np.ndarray, length: int, tokenizer) -> DocSet:
    """Each document cut into passages of `length` tokens (a last, shorter one kept if it has >= length / 4 tokens),
    each a document of its own (EOS before it), with the exact UTF-8 bytes of what its tokens spell."""
    pieces = []
    for start, end, dom, _ in rows:
        for s in range(int(start), int(end), length):
            e = min(s + length, int(end))
            if e - s >= max(1, length // 4):
                ids = np.asarray(ds.tokens[s:e], dtype=np.int64)
                pieces.append((ids, int(dom), len(tokenizer.decode(ids.tolist()).encode("utf-8"))))
    return pack(pieces, ds, eos=tokenizer.eos_id)


def pack(pieces: list[tuple[np.ndarray, int, int]], like: DocSet, eos: int) -> DocSet:
    """(ids, domain index, bytes) pieces as a DocSet: EOS, piece, EOS, piece, ..., EOS."""
    tokens = np.empty(sum(len(p) + 1 for p, _, _ in pieces) + 1, dtype=np.int64)
    rows = np.zeros((len(pieces), 4), dtype=np.int64)
    pos = 0
    for i, (ids, dom, nbytes) in enumerate(pieces):
        tokens[pos] = eos
        tokens[pos + 1 : pos + 1 + len(ids)] = ids
        rows[i] = (pos + 1, pos + 1 + len(ids), dom, nbytes)
        pos += 1 + len(ids)
    tokens[pos] = eos
    return DocSet(tokens, rows, like.domains, like.roles)


def truncate(ds: DocSet, max_tokens: int, tokenizer) -> DocSet:
    """Each document's first `max_tokens` tokens (0: whole), with the exact UTF-8 bytes of what they spell."""
    if max_tokens <= 0:
        return ds
    pieces = []
    for start, end, dom, nbytes in ds.rows:
        e = min(int(end), int(start) + max_tokens)
        ids = np.asarray(ds.tokens[start:e], dtype=np.int64)
        pieces.append((ids, int(dom), nbytes if e == end else len(tokenizer.decode(ids.tolist()).encode("utf-8"))))
    eos = int(ds.tokens[ds.rows[0, 0] - 1]) if len(ds.rows) else tokenizer.eos_id
    return pack(pieces, ds, eos)


def first(ds: DocSet, n: int) -> DocSet:
    return ds if n <= 0 else subset(ds, ds.rows[:n])


def stream_tokens(ds: DocSet) -> np.ndarray:
    """The documents' tokens laid end to end (EOS, doc, EOS, doc, ..., EOS): what a BatchStream draws windows from."""
    return pack([(np.asarray(ds.tokens[s:e], dtype=np.int64), int(d), int(b)) for s, e, d, b in ds.rows], ds,
                int(ds.tokens[ds.rows[0, 0] - 1])).tokens


def target_splits(corpus, fcfg, files_docs=None) -> tuple[str, DocSet, DocSet, DocSet]:
    """(domain, pool, val, test) of the target, whole documents (module docstring)."""
    if fcfg.target == FILES_DOMAIN:
        from rankscope.data.sources import read_files

        docs = list(files_docs if files_docs is not None else read_files(fcfg.files, corpus.manifest["data_config"].get("text_field", "text")))
        ds = tokenize_documents([dataclasses.replace(d, domain=FILES_DOMAIN) for d in docs], corpus.tokenizer)
        rows = domain_rows(ds, FILES_DOMAIN)
        u = np.array([unit("fewshot-files", doc_key(ds.tokens, r)) for r in rows])
        rest = (1 - fcfg.pool_fraction) / 2
        parts = (rows[u < fcfg.pool_fraction], rows[(u >= fcfg.pool_fraction) & (u < fcfg.pool_fraction + rest)],
                 rows[u >= fcfg.pool_fraction + rest])
        for name, part in zip(("pool", "val", "test"), parts):
            if not len(part):
                raise DataError(f"finetune.files gave no {name} document ({len(rows)} documents in all); add files")
        return FILES_DOMAIN, *(subset(ds, p) for p in parts)
    if fcfg.target not in corpus.domains:
        raise DataError(f"finetune.target={fcfg.target!r} is not a domain of the corpus ({', '.join(corpus.domains)}); "
                        "name one, or set finetune.target=files with finetune.files")
    val, test = corpus_docset(corpus, "val"), corpus_docset(corpus, "test")
    if corpus.roles[fcfg.target] == "train":
        train = corpus_docset(corpus, "train")
        pool, val_rows = domain_rows(train, fcfg.target), domain_rows(val, fcfg.target)
        pool_ds, val_ds = subset(train, pool), subset(val, val_rows)
    else:  # held out of pretraining: the pool comes out of its val split, by a hash of each document's tokens
        rows = domain_rows(val, fcfg.target)
        u = np.array([unit("fewshot-pool", fcfg.target, doc_key(val.tokens, r)) for r in rows])
        pool_ds, val_ds = subset(val, rows[u < fcfg.pool_fraction]), subset(val, rows[u >= fcfg.pool_fraction])
    test_ds = subset(test, domain_rows(test, fcfg.target))
    for name, ds in (("pool", pool_ds), ("val", val_ds), ("test", test_ds)):
        if not len(ds.rows):
            raise DataError(f"the target domain {fcfg.target} has no {name} document; raise finetune.pool_fraction "
                            "or data.eval_only_max_bytes, or choose another finetune.target")
    return fcfg.target, pool_ds, val_ds, test_ds


def source_docset(corpus, n: int, exclude: str = "") -> DocSet:
    """The first `n` validation documents of each training-role domain (not the target), in corpus order."""
    val = corpus_docset(corpus, "val")
    keep = []
    for d in corpus.domains:
        if corpus.roles[d] == "train" and d != exclude:
            keep.append(domain_rows(val, d)[: n if n > 0 else None])
    if not keep:
        raise DataError("the corpus has no training-role domain besides the target to score for forgetting")
    return subset(val, np.concatenate(keep))


def build_fewshot(corpus, fcfg, seed: int, files_docs=None) -> FewshotData:
    """The target's pool, the seed's shots, val and test (the first finetune.val_docs / test_docs), the source set;
    every evaluated set cut to its documents' first finetune.eval_tokens tokens."""
    tok = corpus.tokenizer
    domain, pool, val, test = target_splits(corpus, fcfg, files_docs)
    if fcfg.shot_len:
        pool = passages(pool, pool.rows, fcfg.shot_len, tok)
    keys = [doc_key(pool.tokens, r) for r in pool.rows]
    lengths = [int(r[1] - r[0]) for r in pool.rows]
    picked = select_shots(keys, seed, domain, fcfg.shots, lengths, fcfg.shot_tokens)
    shots = subset(pool, pool.rows[picked])
    cut = lambda ds: truncate(ds, fcfg.eval_tokens, tok)  # noqa: E731
    return FewshotData(domain, pool, shots, cut(first(val, fcfg.val_docs)), cut(first(test, fcfg.test_docs)),
                       cut(source_docset(corpus, fcfg.source_docs, exclude=domain)))
