"""reStructuredText source (Sphinx `_sources/*.rst.txt`) to plain English prose.

Kept: paragraphs, list items, the bodies of admonitions (note, warning, seealso, ...) and of API
descriptions (function, class, ...), with inline markup reduced to its text
(:func:`~os.path.join` -> join, ``len(x)`` -> len(x), `Python <https://...>`_ -> Python, **x** -> x).
Dropped: code (literal blocks after `::`, doctest blocks, code-block / productionlist / ... bodies),
comments, link targets, substitution definitions, directive argument and option lines, section
adornments, tables, and toctree / index entries. Each paragraph becomes one line, so words are never
glued where a line break was.
"""

from __future__ import annotations

import re

# directives whose indented body is code, data or navigation rather than prose
_DROP_BODY = {"code-block", "sourcecode", "code", "doctest", "testcode", "testsetup", "testcleanup", "testoutput",
              "literalinclude", "productionlist", "toctree", "index", "image", "figure", "raw", "include", "csv-table",
              "list-table", "table", "highlight", "math", "graphviz", "opcode", "audit-event-table", "availability"}
_ADORNMENT = re.compile(r"^\s*([=\-~^\"'`#*+<>:._])\1{2,}\s*$")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::(.*)$")
_EXPLICIT = re.compile(r"^(\s*)\.\.(\s|$)")
_BULLET = re.compile(r"^(\s*)([*+\-•]|#\.|\d+\.|\(\d+\))\s+")

_ROLE_TARGET = re.compile(r":[\w:+-]+:`([^`<]*?)\s*<[^`>]*>`")  # :ref:`text <target>` -> text
_ROLE = re.compile(r":[\w:+-]+:`!?~?([^`]*)`")  # :func:`~a.b.c` -> c (below), :keyword:`!if` -> if
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`__?")  # `text <url>`_
_REF = re.compile(r"`([^`]+)`__?")  # `text`_
_LITERAL = re.compile(r"``(.+?)``")
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPH = re.compile(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
_INTERP = re.compile(r"`([^`]+)`")
_TABLE = re.compile(r"^\s*=+( +=+)+\s*$")
_OPTION = re.compile(r"^:[\w -]+:( |$)")


def _role_text(m: re.Match) -> str:
    text = m.group(1)
    whole = m.group(0)
    if "`~" in whole:  # ~ shows only the last dotted component
        text = text.rsplit(".", 1)[-1]
    return text


def inline(text: str) -> str:
    """Inline markup to its visible text."""
    text = _ROLE_TARGET.sub(r"\1", text)
    text = _ROLE.sub(_role_text, text)
    text = _LITERAL.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _REF.sub(r"\1", text)
    text = _STRONG.sub(r"\1", text)
    text = _EMPH.sub(r"\1", text)
    text = _INTERP.sub(r"\1", text)
    text = text.replace("\\ ", "").replace("\\", "")
    return re.sub(r"\s+", " ", text).strip()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _unliteral(text: str) -> str:
    """'word::' -> 'word:', 'text ::' and '::' -> 'text' / '' (reST's literal-block marker)."""
    if text.endswith(" ::") or text == "::":
        return text[:-2].rstrip()
    return text[:-1] if text.endswith("::") else text


def rst_to_prose(source: str) -> str:
    """Paragraphs of prose, one per line, separated by blank lines (module docstring)."""
    paras: list[str] = []
    cur: list[str] = []
    cur_indent = 0
    skip: int | None = None  # drop lines indented deeper than this: the body of a dropped block
    until_blank = False  # drop lines up to the next blank one: a doctest block or a table
    literal: int | None = None  # the last paragraph (at this indent) ended with '::': code follows
    options = False  # just after a directive: its `:option: value` lines

    def flush() -> None:
        nonlocal literal
        if cur:
            text = " ".join(cur)
            literal = cur_indent if text.endswith("::") else None
            text = inline(_unliteral(text))
            if text:
                paras.append(text)
            cur.clear()

    for line in source.expandtabs(8).splitlines():
        stripped, ind = line.strip(), _indent(line)
        if until_blank:
            until_blank = bool(stripped)
            continue
        if skip is not None:
            if not stripped or ind > skip:
                continue
            skip = None
        if not stripped:
            flush()
            continue
        if literal is not None and not cur:
            if ind > literal:
                skip = literal
                continue
            literal = None
        if _ADORNMENT.match(line):  # a title's underline (the title stays, as its own paragraph) or overline
            flush()
            continue
        if _TABLE.match(line) or stripped.startswith(("+-", "+=", "|")) or stripped.startswith(">>>"):
            flush()
            until_blank = True
            continue
        m = _DIRECTIVE.match(line)
        if m:
            flush()
            skip = ind if m.group(2).split(":")[-1] in _DROP_BODY else None
            options = True
            continue
        if _EXPLICIT.match(line):  # comment, link target, substitution definition, footnote
            flush()
            skip = ind
            continue
        if options and not cur and _OPTION.match(stripped):
            continue
        options = False
        bullet = _BULLET.match(line)
        if bullet:
            flush()
            line = line[bullet.end():]
        if not cur:
            cur_indent = ind
        cur.append(line.strip())
    flush()
    return "\n\n".join(paras)
