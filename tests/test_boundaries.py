"""The library's boundaries: what the core imports, and the dependency versions it promises."""

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


def test_pyproject_lower_bounds_are_the_tested_versions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    floors = {}
    for req in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", req.replace(" ", ""))
        if m:
            floors[m.group(1).lower()] = m.group(2)
    for name, version in TESTED.items():
        assert floors.get(name) == version, f"pyproject's floor for {name} is {floors.get(name)}, tested {version}"


def test_this_environment_runs_the_tested_series():
    """CI's install is what 'tested' means: a newer series here must be tested, then TESTED updated."""
    assert untested(installed_versions()) == {}


def test_untested_major_version_warns_once_naming_it():
    with pytest.warns(UserWarning) as record:
        names = warn_untested({"transformers": "6.0.1", "peft": "0.22.0", "torch": "2.99.0"})
    assert names == ["peft", "transformers"]
    assert len(record) == 1
    assert "transformers 6.0.1 (tested: 5.24.0)" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_untested(dict(TESTED)) == []


def test_breaking_series():
    assert breaking_series("2.13.0+cpu") == (2,)
    assert breaking_series("5.0.0rc1") == (5,)
    assert breaking_series("0.21.2") == (0, 21)
    assert breaking_series("1") == (1,)
