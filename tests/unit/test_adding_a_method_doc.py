"""docs/adding-a-method.md cannot drift from the code it walks: its python blocks are excerpts of the tests that
train them (tests/integration/test_components.py, test_adding_a_method.py), their imports run, and every
`rankscope.<...>` name it spells resolves."""

from __future__ import annotations

import importlib
import re
import textwrap

from helpers import REPO

DOC = REPO / "docs" / "adding-a-method.md"
SOURCES = [REPO / "tests" / "integration" / "test_components.py", REPO / "tests" / "integration" / "test_adding_a_method.py"]


def code_lines(text: str) -> list[str]:
    """Lines without comments (whole-line or trailing `  # ...`) and trailing blanks."""
    out = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        out.append(re.sub(r"\s+# .*$", "", line).rstrip())
    return out


def occurs(chunk: list[str], lines: list[str]) -> bool:
    """`chunk` (dedented) appears in `lines` as consecutive lines, all shifted by one indent."""
    first = chunk[0]
    for i, line in enumerate(lines):
        if not line.endswith(first) or line[: len(line) - len(first)].strip():
            continue
        pad = line[: len(line) - len(first)]
        if lines[i:i + len(chunk)] == [pad + c if c else "" for c in chunk]:
            return True
    return False


def test_the_docs_python_blocks_are_excerpts_of_the_tests():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 6
    sources = [code_lines(p.read_text()) for p in SOURCES]
    for block in blocks:
        lines = code_lines(block)
        imports = [ln for ln in lines if ln.startswith(("from ", "import "))]
        exec("\n".join(imports), {})  # every import of the doc names something that exists
        body = "\n".join(ln for ln in lines if ln not in imports)
        for chunk in re.split(r"\n\s*\n", body.strip("\n")):
            if chunk.strip():
                chunk_lines = textwrap.dedent(chunk).splitlines()
                assert any(occurs(chunk_lines, src) for src in sources), f"docs/adding-a-method.md shows code no test runs:\n{chunk}"


def resolves(dotted: str) -> bool:
    """`dotted` names a module, or something its module defines or lists in `__all__` (not a name it merely
    imports: `rankscope.methods.lora.wrap_linears` lives in rankscope.adapters.lora)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            module = obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                owner, obj = obj, getattr(obj, attr)
        except AttributeError:
            return False
        if cut < len(parts) and owner is module and getattr(obj, "__module__", module.__name__) != module.__name__:
            return parts[-1] in getattr(module, "__all__", ())
        return True
    return False


def test_every_rankscope_name_the_doc_spells_resolves():
    names = set(re.findall(r"(?<![\w/.])rankscope(?:\.\w+)+", DOC.read_text()))
    assert "rankscope.adapters.stored.merged_state_dict" in names
    assert not [n for n in sorted(names) if not resolves(n)]
