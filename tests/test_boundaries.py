"""The library's boundaries: what the core imports, what the app may use of it, and the dependency
versions it promises."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tomllib

from flatlora_dist.versions import TESTED, breaking_series, installed_versions, untested, warn_untested

ROOT = Path(__file__).resolve().parents[1]
CORE = [p for p in (ROOT / "flatlora_dist").rglob("*.py") if "train" not in p.relative_to(ROOT).parts]
APP = sorted(
    [*(ROOT / "flatlora_dist" / "train").rglob("*.py"), *(ROOT / "launch").rglob("*.py"), *(ROOT / "bench").rglob("*.py"),
     *(ROOT / "studies").rglob("*.py")]
)
HEAVY = ("deepspeed", "bitsandbytes", "triton", "yaml", "matplotlib", "tensorboard")
LAZY = {"kernels/ops.py": "triton", "kernels/triton_kernels.py": "triton"}
"""Modules that import a backend at module level because they are only ever imported lazily (by
``kernels.load_ops`` once the fused scheme is selected); the subprocess test below checks that."""


def _imports(tree: ast.AST, top_level_only: bool) -> list[tuple[int, str]]:
    """(line, module) of every import in ``tree`` (only module-level statements if ``top_level_only``)."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found += [(node.lineno, base)]
    return found


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_never_imports_the_app_or_backends_at_import_time(path):
    tree = ast.parse(path.read_text())
    for line, mod in _imports(tree, top_level_only=False):
        name = mod.lstrip(".")
        app = name == "train" or name.startswith(("train.", "flatlora_dist.train"))
        assert not app, f"{path.name}:{line} imports the app ({mod})"
        assert not mod.startswith("launch"), f"{path.name}:{line} imports launch/ ({mod})"
    allowed = LAZY.get(path.relative_to(ROOT / "flatlora_dist").as_posix())
    for line, mod in _imports(tree, top_level_only=True):
        top = mod.split(".")[0]
        assert top not in HEAVY or top == allowed, f"{path.name}:{line} imports {mod} at module level"


def test_import_flatlora_dist_loads_no_backend_or_app_package():
    code = (
        "import sys, flatlora_dist\n"
        f"heavy = {HEAVY!r}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith('flatlora_dist.train'))\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def _pins(lock: str) -> dict[str, str]:
    """``name==version`` lines of a requirements lock, local version labels dropped."""
    lines = (ROOT / "requirements" / lock).read_text().splitlines()
    found = (re.fullmatch(r"([A-Za-z0-9_.-]+)==([^+;\s]+)(\+\S+)?", line.strip()) for line in lines)
    return {m.group(1).lower().replace("_", "-"): m.group(2) for m in found if m}


def test_pyproject_lower_bounds_are_the_tested_floors():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    floors = {}
    for req in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", req.replace(" ", ""))
        if m:
            floors[m.group(1).lower()] = m.group(2)
    for name, (floor, _) in TESTED.items():
        assert floors.get(name) == floor, f"pyproject's floor for {name} is {floors.get(name)}, tested {floor}"


@pytest.mark.parametrize("lock,end", [("floor.txt", 0), ("newest.txt", 1)])
def test_the_locks_ci_installs_are_the_tested_ends_of_the_range(lock, end):
    pins = _pins(lock)
    for name, versions in TESTED.items():
        assert pins.get(name) == versions[end], f"requirements/{lock} pins {name} {pins.get(name)}, TESTED {versions}"


def test_this_environment_runs_the_tested_range():
    """CI's installs are what 'tested' means: a version outside the range here must be tested, then
    TESTED and the locks updated."""
    assert untested(installed_versions()) == {}


def test_only_versions_outside_the_tested_range_warn():
    with pytest.warns(UserWarning) as record:
        names = warn_untested({"transformers": "6.0.1", "peft": "0.23.0", "torch": "2.99.0", "trl": "0.23.1"})
    assert names == ["peft", "transformers", "trl"]
    assert len(record) == 1
    assert "transformers 6.0.1 (tested: 5.6.0 to 5.25.0)" in str(record[0].message)
    inside = {"transformers": "5.20.1", "peft": "0.21.2", "trl": "1.14.1", "datasets": "5.0.1", "torch": "2.12.1"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for end in (0, 1):
            assert warn_untested({n: v[end] for n, v in TESTED.items()}) == []
        assert warn_untested(inside) == []  # axolotl 0.21.0's pins: inside the range
        assert warn_untested({"transformers": "5.99.0"}) == []  # a newer release of the newest series


def test_breaking_series():
    assert breaking_series("2.13.0+cpu") == (2,)
    assert breaking_series("5.0.0rc1") == (5,)
    assert breaking_series("0.21.2") == (0, 21)
    assert breaking_series("1") == (1,)


# ------------------------------------------------------------------ the app is a recipe on public calls
def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _core_private_names() -> set[str]:
    """Private names the core defines: module-level and class-level functions, classes and variables, and
    ``self._x`` attributes.  Reading one of these off any object in the app reaches into library state."""
    names: set[str] = set()
    for path in CORE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return {n for n in names if _private(n)}


def _ours(module: str | None, level: int, path: Path) -> bool:
    """Whether an import names a module of this library (a relative import inside ``flatlora_dist/``)."""
    inside = path.is_relative_to(ROOT / "flatlora_dist")
    return (level > 0 and inside) or (module or "").split(".")[0] == "flatlora_dist"


def _private_uses(path: Path, core_private: set[str], text: str | None = None) -> list[str]:
    """``file:line what`` for every private name of the library that ``path`` (or ``text`` as if it were
    that file) imports or reads."""
    tree = ast.parse(path.read_text() if text is None else text)
    found, bound = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _ours(node.module, node.level, path):
            parts = (node.module or "").split(".")
            where = "." * node.level + (node.module or "")
            found += [f"{node.lineno} from {where} import {a.name}" for a in node.names if _private(a.name)]
            found += [f"{node.lineno} module {where}" for p in parts if _private(p)][:1]
            bound |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            for a in node.names:
                if _ours(a.name, 0, path):
                    found += [f"{node.lineno} import {a.name}" for p in a.name.split(".") if _private(p)][:1]
                    bound.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _private(node.attr):
            continue
        root = node.value
        while isinstance(root, ast.Attribute):
            root = root.value
        owner = root.id if isinstance(root, ast.Name) else None
        if owner in bound:  # module._x, Class._x on something imported from the library
            found.append(f"{node.lineno} {owner}...{node.attr}")
        elif node.attr in core_private and owner not in ("self", "cls"):  # engine._state of a library object
            found.append(f"{node.lineno} .{node.attr} (private state of a library object)")
    return [f"{path.relative_to(ROOT)}:{f}" for f in found]


def test_app_uses_only_public_names_of_the_library():
    """Nothing under ``flatlora_dist/train``, ``launch/`` or ``bench/`` imports a private name of the
    library (``from flatlora_dist.x import _y``, ``from ..x import _y``, a private module), reads one off an
    imported module or class (``module._y``), or reads private state the core defines off a library object
    (``flat._backend_of``).  The app's own private helpers, used inside the file that defines them, are
    fine; a helper another app module needs is public.  ``tests/`` is exempt: tests may poke internals.
    """
    core_private = _core_private_names()
    bad = [use for path in APP for use in _private_uses(path, core_private)]
    assert APP and not bad, "private library names used by the app:\n" + "\n".join(bad)


def test_private_use_detector_catches_each_form():
    """The scan above is only as good as its detector: each forbidden form is found, public ones are not."""
    app = ROOT / "flatlora_dist" / "train" / "_probe_for_test.py"
    code = (
        "from flatlora_dist.shards.fsdp1 import settle, _ORIG_PARAMS_FIX\n"
        "from ..shards import deepspeed as ds\n"
        "from .data import _hidden\n"
        "import flatlora_dist.checkpoint as ck\n"
        "ds._release(None, 'x')\n"
        "ck._backends(None)\n"
        "flat._backend_of[0]\n"
        "self._state = 1\n"
        "torch._foreach_norm([])\n"
        "ds.partition_region(None)\n"
    )
    found = [u.split(":", 1)[1] for u in _private_uses(app, _core_private_names(), code)]
    assert found == [
        "1 from flatlora_dist.shards.fsdp1 import _ORIG_PARAMS_FIX",
        "3 from .data import _hidden",
        "5 ds..._release",
        "6 ck..._backends",
        "7 ._backend_of (private state of a library object)",
    ], found

