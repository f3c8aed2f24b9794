"""Built-in task ``math``: grade-school math from reasoning-gym's ``gsm_symbolic`` templates.

``reasoning-gym==0.1.25`` is installed with ``--no-deps``; importing ``reasoning_gym`` fails (its
package ``__init__`` imports every task family, e.g. ``cellpylib``), so the two generator files and the
stdlib-only ``utils.py`` they need are loaded straight from the package folder, under private module
names.  The list of usable templates (``tasks_ok``: 85 of the 100; the other 15 are marked
``tasks_need_fix`` upstream) is read from ``gsm_symbolic.py`` with ``ast``, without executing it.

Splits are by template: a fixed seeded 80/20 split of the template ids, independent of the run seed,
so no template is ever in both ``train``/``validation`` and ``test``.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Any

from ..data import DataError, Example, default_style, prompt_response_example

TEMPLATE_SPLIT_SEED = 20250101
TEST_FRACTION = 0.2
EVAL_SEED = 1234
DEFAULT_SIZES = {"train": 1000, "validation": 100, "test": 100}
SPLITS = tuple(DEFAULT_SIZES)
MAX_TRIES = 20
_FINAL = re.compile(r"####\s*(\S.*?)\s*$", re.S)

Generator = Callable[[Random, float], dict[str, Any]]


@dataclass(frozen=True)
class MathProblem:
    """One generated problem: question, worked solution ending ``#### answer``, integer answer."""

    template: int
    question: str
    solution: str
    answer: str


def gsm_dir() -> Path:
    """The ``reasoning_gym/arithmetic/gsm_symbolic`` folder, found without importing reasoning_gym."""
    spec = importlib.util.find_spec("reasoning_gym")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("task 'math' needs reasoning-gym: pip install --no-deps reasoning-gym==0.1.25")
    folder = Path(next(iter(spec.submodule_search_locations))) / "arithmetic" / "gsm_symbolic"
    if not (folder / "generators_00_49.py").is_file():
        raise DataError(f"task 'math': gsm_symbolic generators not found in {folder}")
    return folder


def _exec_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1)
def load_generators() -> dict[int, Generator]:
    """Template id -> generator function, for all 100 templates."""
    folder = gsm_dir()
    utils = _exec_file("_flatlora_rg_utils", folder.parents[1] / "utils.py")
    shim = {"reasoning_gym": types.ModuleType("reasoning_gym"), "reasoning_gym.utils": utils}
    shim["reasoning_gym"].__path__ = []
    shim["reasoning_gym"].utils = utils
    saved = {name: sys.modules.get(name) for name in shim}
    real = saved["reasoning_gym"] is not None and saved["reasoning_gym.utils"] is not None
    if not real:  # the generators' `from reasoning_gym.utils import ...` resolves to the shim
        sys.modules.update(shim)
    try:
        modules = [_exec_file(f"_flatlora_rg_gsm_{part}", folder / f"generators_{part}.py")
                   for part in ("00_49", "50_99")]  # fmt: skip
    finally:
        if not real:
            for name, mod in saved.items():
                if mod is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = mod
    gens = {}
    for module in modules:
        for attr in dir(module):
            if attr.startswith("generate_") and attr[len("generate_") :].isdigit():
                gens[int(attr[len("generate_") :])] = getattr(module, attr)
    return gens


@functools.lru_cache(maxsize=1)
def usable_templates() -> tuple[int, ...]:
    """Template ids reasoning-gym itself uses (``tasks_ok`` in ``gsm_symbolic.py``), read with ast."""
    tree = ast.parse((gsm_dir() / "gsm_symbolic.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "tasks_ok" for t in node.targets):
            ids = tuple(sorted(ast.literal_eval(node.value)))
            return tuple(i for i in ids if i in load_generators())
    return tuple(sorted(load_generators()))


def template_split(test_fraction: float = TEST_FRACTION, split_seed: int = TEMPLATE_SPLIT_SEED) -> dict[str, tuple[int, ...]]:
    """``{"train": ids, "test": ids}``: a fixed seeded split of the usable template ids."""
    ids = list(usable_templates())
    Random(split_seed).shuffle(ids)
    n_test = max(1, round(len(ids) * test_fraction))
    return {"train": tuple(sorted(ids[n_test:])), "test": tuple(sorted(ids[:n_test]))}


def generate_problem(template: int, rng: Random) -> MathProblem:
    """One problem from ``template``; the solution's final line is rewritten to ``#### <answer>``."""
    raw = load_generators()[template](rng, 1.0)
    answer = str(raw["answer"]).strip()
    cot = raw["metadata"]["answer_cot"].rstrip()
    solution = _FINAL.sub(f"#### {answer}", cot) if _FINAL.search(cot) else f"{cot}\n#### {answer}"
    return MathProblem(template=template, question=raw["question"].strip(), solution=solution, answer=answer)


def _one(templates: tuple[int, ...], key: str) -> MathProblem:
    rng = Random(key)
    for _ in range(MAX_TRIES):
        template = rng.choice(templates)
        try:
            return generate_problem(template, rng)
        except (ValueError, ZeroDivisionError):  # a few templates occasionally find no valid numbers
            continue
    raise DataError(f"task 'math': could not generate a problem for key {key!r}")


def math_problems(split: str = "train", n: int | None = None, seed: int = 0) -> list[MathProblem]:
    """``n`` problems of ``split``; problem ``i`` does not depend on ``n``.

    ``train`` and ``validation`` use the train templates (different instances), ``test`` the held-out
    templates.  Only ``train`` depends on ``seed``.
    """
    if split not in SPLITS:
        raise DataError(f"task 'math': unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    n = DEFAULT_SIZES[split] if n is None else n
    if n < 1:
        raise DataError(f"task 'math': empty dataset (limit={n})")
    templates = template_split()["test" if split == "test" else "train"]
    stream = seed if split == "train" else EVAL_SEED
    return [_one(templates, f"gsm/{split}/{stream}/{i}") for i in range(n)]


def math_examples(tokenizer, split: str = "train", n: int | None = None, seed: int = 0, style: str | None = None) -> list[Example]:
    """Problems as examples: ``plain`` = ``Question: ...\\nAnswer:`` -> `` <solution>``; ``chat`` = one turn."""
    style = style or default_style(tokenizer)
    examples = []
    for prob in math_problems(split, n, seed):
        if style == "plain":
            prompt, response = f"Question: {prob.question}\nAnswer:", f" {prob.solution}"
        else:
            prompt, response = prob.question, prob.solution
        meta = {"template": prob.template, "task": "math"}
        examples.append(prompt_response_example(tokenizer, prompt, response, style=style, answer=prob.answer, meta=meta))
    return examples
