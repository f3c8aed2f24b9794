"""No import circles in ``flatlora_dist``: the graph of imports between the package's own modules (every
import statement, at module level or inside a function) has no cycle, so every module can be read, and
imported, after the ones it names.  A type that two layers need lives in the lower one or in a neutral
module both import (``kernels/packed.py``, ``perturbation.py``, ``train/data.py``, ``train/plan.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "flatlora_dist"


def module_sources(root: Path = ROOT) -> dict[str, tuple[str, bool]]:
    """``{dotted module name: (source, is a package __init__)}`` for every module of the package."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path.read_text(), is_package)
    return found


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports.  ``from .x import y`` counts as importing ``x.y`` when
    that is a module, else ``x``; a parent package's ``__init__`` run by the import is not counted."""

    def known(name: str) -> str | None:
        while name and name not in sources:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, (text, is_package) in sources.items():
        here = mod if is_package else mod.rpartition(".")[0]
        deps: set[str | None] = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                deps |= {known(a.name) for a in node.names if a.name.split(".")[0] == PACKAGE}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if base.split(".")[0] != PACKAGE:
                    continue
                for a in node.names:
                    deps.add(known(f"{base}.{a.name}") if f"{base}.{a.name}" in sources else known(base))
        graph[mod] = {d for d in deps if d is not None and d != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_in_the_package():
    graph = import_graph(module_sources())
    assert len(graph) > 40 and graph["flatlora_dist.engine"], "the scan found the package's modules and imports"
    found = cycles(graph)
    detail = ["  " + " | ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in found]
    assert not found, "import circles:\n" + "\n".join(detail)


def test_the_circle_detector_finds_each_form():
    """Absolute, relative, parent-relative, lazy (inside a function) and ``from package import module``
    imports all make edges; a circle through any of them is reported, an acyclic chain is not."""
    pkg = {
        "flatlora_dist": ("", True),
        "flatlora_dist.a": ("from .b import thing\n", False),
        "flatlora_dist.b": ("def f():\n    import flatlora_dist.sub.c\n", False),
        "flatlora_dist.sub": ("", True),
        "flatlora_dist.sub.c": ("from .. import a\n", False),
        "flatlora_dist.d": ("from flatlora_dist.sub import e\n", False),
        "flatlora_dist.sub.e": ("from ..a import x\n", False),
    }
    graph = import_graph(pkg)
    assert graph["flatlora_dist.a"] == {"flatlora_dist.b"}
    assert graph["flatlora_dist.b"] == {"flatlora_dist.sub.c"}
    assert graph["flatlora_dist.sub.c"] == {"flatlora_dist.a"}
    assert graph["flatlora_dist.d"] == {"flatlora_dist.sub.e"}
    assert cycles(graph) == [["flatlora_dist.a", "flatlora_dist.b", "flatlora_dist.sub.c"]]
    pkg["flatlora_dist.sub.c"] = ("import torch\n", False)
    assert cycles(import_graph(pkg)) == []


def test_bench_and_studies_import_nothing_from_tests():
    """``bench/`` and ``studies/`` stand on the library and on ``bench/benchlib.py``: no module of ``tests/``
    (or ``tests/dist/``) is imported, and no path into ``tests/`` is put on ``sys.path``."""
    own = {p.stem for d in ("bench", "studies") for p in (ROOT / d).glob("*.py")}
    test_modules = {p.stem for d in ("tests", "tests/dist") for p in (ROOT / d).glob("*.py")} - own
    bad = []
    for path in sorted([*(ROOT / "bench").rglob("*.py"), *(ROOT / "studies").rglob("*.py")]):
        text = path.read_text()
        if '"tests"' in text or "'tests'" in text or "tests/dist" in text.replace("``tests/dist``", ""):
            bad.append(f"{path.relative_to(ROOT)}: names a path into tests/")
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                    if n.split(".")[0] in test_modules | {"tests"}]
    assert not bad, "\n".join(bad)


def test_bench_modules_do_not_shadow_test_helpers():
    """Tests put ``bench/``, ``studies/`` and their own helper folders on ``sys.path`` in one session, so a
    bench module named like a test helper (``common``) would shadow it, whichever comes first."""
    own = {p.stem for d in ("bench", "studies") for p in (ROOT / d).glob("*.py")}
    helpers = {p.stem for p in (ROOT / "tests").rglob("*.py") if not p.stem.startswith("test_")}
    assert not own & helpers, f"bench/studies modules named like test helpers: {sorted(own & helpers)}"
