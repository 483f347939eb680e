"""The import graph of src/rankscope follows the plan that docs/architecture.md draws: no import cycle among the
package's modules, and no import from a lower layer to a higher one. The layer table is read from
docs/architecture.md (the one place it is written), so the doc and this test cannot disagree.

The graph is built with `ast`, without importing anything: every `import` and `from ... import` statement, at module
level, inside functions and under `if TYPE_CHECKING:` (a type-only import is still an arrow of the design), plus the
string targets of `importlib.import_module("rankscope.x")` and the CLI's `Lazy("rankscope.x", ...)`.
`from rankscope.x import y` is an arrow to the module `rankscope.x.y` where that is a module, else to `rankscope.x`."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
DOC = REPO / "docs" / "architecture.md"
DYNAMIC_IMPORTERS = {"import_module", "Lazy"}  # calls whose first argument names a module to import


@dataclass(frozen=True)
class Arrow:
    """`source` imports `target` at `where` (a path relative to the repository, and the line)."""

    source: str
    target: str
    where: str


def modules_of(src: Path, package: str) -> dict[str, Path]:
    """Every module of `package` under `src`, by dotted name (a package is its `__init__.py`)."""
    found = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module that importing `name` loads: `name` itself, or its longest prefix that is a module."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def base_of(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute name a `from X import ...` reads from, relative imports included."""
    if not node.level:
        return node.module or ""
    here = module.split(".") if is_package else module.split(".")[:-1]
    here = here[: len(here) - node.level + 1]
    return ".".join([*here, node.module] if node.module else here)


def targets(node: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The modules of the package that one AST node imports (empty for any other node)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = base_of(node, module, is_package)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if func in DYNAMIC_IMPORTERS and isinstance(node.args[0].value, str):
            names = [node.args[0].value]
    return [t for t in (resolve(n, modules) for n in names) if t is not None and t != module]


def import_graph(src: Path = SRC, package: str = "rankscope") -> tuple[dict[str, Path], list[Arrow]]:
    """The package's modules and every import arrow between them."""
    modules = modules_of(src, package)
    arrows = set()
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            for target in targets(node, module, path.name == "__init__.py", modules):
                where = f"{path.relative_to(src.parent)}:{node.lineno}"
                arrows.add(Arrow(module, target, where))
    return modules, sorted(arrows, key=lambda a: (a.source, a.target, a.where))


def cycles(modules: dict[str, Path], arrows: list[Arrow]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds at least one cycle."""
    succ: dict[str, set[str]] = {m: set() for m in modules}
    for a in arrows:
        succ[a.source].add(a.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    return sorted(found)


def layer_table(doc: Path = DOC) -> dict[str, int]:
    """Layer number (1 = top) of each package or top-level module, from the `| layer | modules |` table of the doc."""
    layers: dict[str, int] = {}
    in_table = False
    for line in doc.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[:2] == ["layer", "modules"]:
            in_table = True
        elif in_table and line.startswith("|") and cells[0].isdigit():
            for name in re.findall(r"`([\w.]+)`", cells[1]):
                layers[name] = int(cells[0])
        elif in_table and not line.startswith("|"):
            break
    return layers


def unit_of(module: str, layers: dict[str, int], package: str = "rankscope") -> str | None:
    """The table entry a module falls under: its longest dotted prefix below `package` that the table names."""
    if module == package:
        return package if package in layers else None
    parts = module.split(".")[1:]
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in layers:
            return ".".join(parts[:end])
    return None


def upward(arrows: list[Arrow], layers: dict[str, int]) -> list[str]:
    """One line per arrow from a lower layer to a higher one."""
    lines = []
    for a in arrows:
        src_unit, dst_unit = unit_of(a.source, layers), unit_of(a.target, layers)
        if src_unit and dst_unit and layers[dst_unit] < layers[src_unit]:
            lines.append(f"{a.where}: {a.source} (layer {layers[src_unit]}, {src_unit}) imports {a.target} "
                         f"(layer {layers[dst_unit]}, {dst_unit})")
    return lines


def describe(component: list[str], arrows: list[Arrow]) -> str:
    """A cycle for the failure message: its modules and every import between them, with file and line."""
    inside = [a for a in arrows if a.source in component and a.target in component]
    return "cycle among " + ", ".join(component) + ":\n" + "\n".join(
        f"    {a.where}: {a.source} -> {a.target}" for a in inside)


# ------------------------------------------------------------------------------------------- the package itself


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Arrow]]:
    return import_graph()


def test_the_layer_table_is_in_the_doc():
    layers = layer_table()
    assert {"cli", "core", "train", "methods", "studies", "reports"} <= set(layers), (
        f"docs/architecture.md has no complete `| layer | modules |` table; read: {layers}")


def test_every_module_has_a_layer(graph):
    modules, _ = graph
    layers = layer_table()
    missing = sorted(m for m in modules if unit_of(m, layers) is None)
    assert not missing, "modules with no layer in docs/architecture.md (add their package to its table): " + ", ".join(
        missing)


def test_no_import_cycles(graph):
    modules, arrows = graph
    found = cycles(modules, arrows)
    assert not found, f"{len(found)} import cycle(s):\n" + "\n".join(describe(c, arrows) for c in found)


def test_no_import_runs_up_the_layers(graph):
    _, arrows = graph
    lines = upward(arrows, layer_table())
    assert not lines, (f"{len(lines)} import(s) from a lower layer to a higher one (docs/architecture.md):\n  "
                       + "\n  ".join(lines))


# ------------------------------------------------------------------- the checker, on a package whose answer is known


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_finds_function_level_relative_submodule_and_type_only_imports(tmp_path):
    src = write_package(tmp_path, {
        "__init__.py": "",
        "low/__init__.py": "VALUE = 1\n",
        "low/leaf.py": "def f():\n    from pkg.top import run\n    return run\n",
        "top.py": "from pkg.low import leaf\nfrom pkg.low import VALUE\nfrom typing import TYPE_CHECKING\n"
                  "if TYPE_CHECKING:\n    from . import mid\n",
        "mid.py": "import importlib\nimportlib.import_module('pkg.low.leaf')\n",
    })
    modules, arrows = import_graph(src, "pkg")
    pairs = {(a.source, a.target) for a in arrows}
    assert pairs == {("pkg.low.leaf", "pkg.top"), ("pkg.top", "pkg.low.leaf"), ("pkg.top", "pkg.low"),
                     ("pkg.top", "pkg.mid"), ("pkg.mid", "pkg.low.leaf")}
    assert cycles(modules, arrows) == [["pkg.low.leaf", "pkg.mid", "pkg.top"]]
    layers = {"top": 1, "mid": 1, "low": 2, "pkg": 3}
    assert [line.split(": ", 1)[1] for line in upward(arrows, layers)] == [
        "pkg.low.leaf (layer 2, low) imports pkg.top (layer 1, top)"]
    assert "pkg/low/leaf.py:2: pkg.low.leaf -> pkg.top" in describe(cycles(modules, arrows)[0], arrows)


def test_the_layer_table_is_read_from_markdown(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("text\n\n| layer | modules | holds |\n|---|---|---|\n| 1 | `cli`, `startup` | verbs |\n"
                   "| 2 | `core` | leaves |\n\nafter: | 3 | `x` |\n")
    assert layer_table(doc) == {"cli": 1, "startup": 1, "core": 2}
