"""The README's code is what users copy: run it as written, and keep its settings table in step with the
application's help."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from conftest import fingerprint, tiny_llama

from flatlora_dist.train.config import config_table

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str, language: str = "python") -> str:
    """The first fenced ``language`` block after the ``## heading`` line of README.md, verbatim."""
    text = README.read_text()
    section = text[text.index(f"\n## {heading}\n") :]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match, f"no {language} block under '{heading}'"
    return match.group(1)


def test_own_loop_example_runs_as_written():
    """The "Use it in your own loop" block, exec'd with a tiny PEFT Llama, AdamW on the LoRA factors,
    3 windows of 2 micro-batches: losses finite, LoRA factors trained, the base bitwise as loaded, and
    gradients zeroed after every step (the next window does not accumulate onto the previous one)."""
    model = tiny_llama()
    base = fingerprint(model)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    windows = [[{"input_ids": (ids := torch.randint(0, 128, (2, 16), generator=g)), "labels": ids}
                for _ in range(2)] for _ in range(3)]  # fmt: skip
    logged: list[dict] = []
    grads_at_log: list[float] = []

    def log(stats: dict) -> None:
        logged.append(stats)
        grads_at_log.append(sum(float(p.grad.abs().sum()) for p in optimizer.param_groups[0]["params"]
                                if p.grad is not None))  # fmt: skip

    losses: list[float] = []
    model.register_forward_hook(lambda m, i, out: losses.append(float(out.loss.detach())))
    exec(readme_block("Use it in your own loop"), {"model": model, "optimizer": optimizer, "windows": windows,
                                                   "log": log})  # fmt: skip
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert len(logged) == 3 and logged[-1]["factor"] > 0
    assert grads_at_log == [0.0, 0.0, 0.0], "optimizer.zero_grad() must follow every optimizer.step()"
    assert fingerprint(model) == base, "base weights must be bitwise the loaded ones"
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(trained[n], lora_before[n]) for n in trained)


def test_settings_table_is_the_help():
    """README's "Every setting" table is ``config_table()``: what ``--help`` says, word for word."""
    assert config_table() in README.read_text()


def test_module_table_lists_every_module():
    """README's module table (under "How it works") names every module of ``flatlora_dist``: a file as its
    path relative to the package (``shards/fsdp1.py``), a package's ``__init__.py`` as its folder
    (``shards/``; the top-level one as ``__init__.py``).  A new module fails here until it is described."""
    text = README.read_text()
    section = text[text.index("\n## How it works\n") :]
    section = section[: section.index("\n\n**")]  # the table ends where the prose starts
    named = set(re.findall(r"^\| `([^`]+)` \|", section, re.M))
    package = README.parent / "flatlora_dist"
    missing = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        name = rel[: -len("__init__.py")] if rel.endswith("/__init__.py") else rel
        if name not in named:
            missing.append(name)
    assert len(named) > 40 and not missing, f"modules missing from README's module table: {missing}"
