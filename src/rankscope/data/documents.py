"""What every text source yields and shares: `Document(domain, doc_id, text)`, an embedded source's
`Source` record (name, licence, origin, reader), and the byte cap and paragraph packing the readers use.
The sources themselves are in rankscope.data.sources (the SOURCES table) and rankscope.data.prose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator


@dataclass(frozen=True)
class Document:
    domain: str
    doc_id: str
    text: str
    ids: tuple[int, ...] | None = None  # pretokenized documents carry their token ids


class SourceUnavailable(Exception):
    """An embedded source is not installed here; the message says how to get it."""


@dataclass(frozen=True)
class Source:
    name: str
    licence: str
    origin: str
    read: Callable[[int], Iterator[Document]]  # max_bytes -> documents


def capped(docs: Iterator[Document], max_bytes: int) -> Iterator[Document]:
    """The non-blank documents of `docs` until about `max_bytes` of UTF-8 text have been read."""
    used = 0
    for doc in docs:
        if not doc.text.strip():
            continue
        used += len(doc.text.encode("utf-8"))
        yield doc
        if used >= max_bytes:
            return


def chunks(text: str, target: int = 6000, sep: str = "\n\n") -> list[str]:
    """Greedy paragraph packing into pieces of about `target` characters."""
    out, cur = [], ""
    for para in text.split(sep):
        if cur and len(cur) + len(para) > target:
            out.append(cur)
            cur = ""
        cur = f"{cur}{sep}{para}" if cur else para
    if cur.strip():
        out.append(cur)
    return out
