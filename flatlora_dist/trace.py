"""An opt-in record of what every LoRA target's base layer sees, and its verdict: is Flat-LoRA really on?

A tool that drives the Trainer its own way (axolotl, LLaMA-Factory, a fused LoRA kernel that reads the
base weight outside the layer's forward) can leave the callback attached yet the noise unseen.  With
``FLATLORA_TRACE=/path/trace.jsonl`` set, :class:`~flatlora_dist.hf.FlatLoRACallback` writes one JSON line

* ``{"event": "begin", "step": s, "modules": {name: digest}}`` at train begin (the clean base),
* ``{"event": "step", "step": s, "sigma": σ, "factor": f}`` after each step's perturbation (``f`` is the
  schedule's factor: a cosine ramp's step 0 has ``f == 0`` and rightly sees the clean weight),
* ``{"event": "forward", "step": s, "module": name, "digest": d}`` from a forward pre-hook on every
  target's base layer, for every forward it runs (activation recomputation included),
* ``{"event": "end", "step": s, "modules": {name: digest}}`` at train end,

where a digest is a BLAKE2b hash of the weight's raw bytes as the layer holds it at that moment (under
ZeRO-3 the hook runs after DeepSpeed's gather, under FSDP2 on the unsharded weight).  A 4-bit base takes
its noise inside the forward (functional mode), so its storage never changes: trace dense bases.

``python -m flatlora_dist.trace trace.jsonl`` prints :func:`verify`'s verdict.  Hashing every weight at
every forward costs a full read of the model per micro-batch: this is a diagnostic, not for long runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .targets import LoraTarget

ENV = "FLATLORA_TRACE"


def digest(weight: torch.Tensor) -> str:
    """BLAKE2b of a tensor's raw bytes (the full tensor of a DTensor), independent of its device.

    Hashes a copy: ``numpy()`` on the weight itself would pin FSDP2's unsharded storage, which must stay
    resizable for the reshard after forward."""
    t = weight.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    raw = t.clone().contiguous().reshape(-1).cpu().view(torch.uint8)
    return hashlib.blake2b(raw.numpy().tobytes(), digest_size=16).hexdigest()


def trace_path() -> Path | None:
    """The file ``FLATLORA_TRACE`` names (``.rank<r>`` appended on multi-rank runs), or ``None``."""
    value = os.environ.get(ENV)
    if not value:
        return None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = f"{value}.rank{dist.get_rank()}"
    return Path(value)


class NoiseTrace:
    """Writes the trace of ``targets`` to ``path`` (appending: a resumed run continues the same file).

    The owner calls :meth:`begin` once, :meth:`start_step` after every step's perturbation and
    :meth:`end` once; forwards in between are recorded under the last step started.
    """

    def __init__(self, path: Path, targets: list[LoraTarget]) -> None:
        self.path = path
        self.targets = targets
        self.step = 0
        self._hooks: list[Any] = []
        path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _snapshot(self, event: str) -> None:
        self._write({"event": event, "step": self.step,
                     "modules": {t.name: digest(t.weight) for t in self.targets}})  # fmt: skip

    def begin(self, step: int) -> None:
        """Record the clean base and start tracing forwards (idempotent)."""
        self.step = step
        if self._hooks:
            return
        self._snapshot("begin")
        for t in self.targets:
            self._hooks.append(t.base.register_forward_pre_hook(self._forward_hook(t.name)))

    def start_step(self, step: int, sigma: float, factor: float) -> None:
        """The forwards that follow belong to optimizer step ``step``, perturbed at ``sigma · factor``."""
        self.step = step
        self._write({"event": "step", "step": step, "sigma": sigma, "factor": factor})

    def _forward_hook(self, name: str):
        def hook(module: torch.nn.Module, args: Any) -> None:
            self._write({"event": "forward", "step": self.step, "module": name, "digest": digest(module.weight)})

        return hook

    def end(self) -> None:
        """Record the base as training leaves it and stop tracing (idempotent)."""
        if not self._hooks:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._snapshot("end")


def read(path: str | Path) -> list[dict[str, Any]]:
    """The trace's records, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def verify(records: list[dict[str, Any]], forwards_per_step: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """Check a trace: ``(summary, problems)``; no problems means, for every traced run (begin..end),

    every step has forwards of every module; none of them saw the clean weight (but those of a step
    whose sigma · factor is 0, which all must; and at least one step is meant to be noisy); all forwards of a module
    within a step saw the same weight (one draw per optimizer step); every step saw a different draw;
    the base at the end is bitwise the base at the begin; and, if ``forwards_per_step`` is given, each
    module ran exactly that many forwards per step.
    """
    problems: list[str] = []
    runs = 0
    steps_seen: set[int] = set()
    clean: dict[str, str] | None = None
    seen: dict[tuple[str, int], list[str]] = defaultdict(list)
    unperturbed: set[int] = set()  # steps whose schedule factor was 0: clean weights are right there
    for rec in records:
        if rec["event"] == "begin":
            clean, runs = rec["modules"], runs + 1
        elif rec["event"] == "step":
            (unperturbed.add if rec["sigma"] * rec["factor"] == 0 else unperturbed.discard)(rec["step"])
        elif rec["event"] == "forward":
            if clean is None:
                problems.append(f"step {rec['step']}: a forward outside a traced run")
                continue
            seen[(rec["module"], rec["step"])].append(rec["digest"])
            steps_seen.add(rec["step"])
        elif rec["event"] == "end":
            if clean is not None and rec["modules"] != clean:
                changed = sorted(k for k in clean if rec["modules"].get(k) != clean[k])
                problems.append(f"base weights changed by training: {changed}")
            problems += _check_forwards(clean or {}, seen, unperturbed, forwards_per_step)
            clean, seen = None, defaultdict(list)
    if clean is not None:
        problems.append("the trace has no 'end' record (training did not finish)")
        problems += _check_forwards(clean, seen, unperturbed, forwards_per_step)
    if runs == 0:
        problems.append("the trace has no 'begin' record (was FlatLoRACallback attached?)")
    elif steps_seen and steps_seen <= unperturbed:
        problems.append("no step was meant to carry noise (sigma 0, or only steps whose schedule factor is 0)")
    summary = {"runs": runs, "steps": len(steps_seen), "forwards": sum(1 for r in records if r["event"] == "forward")}
    return summary, problems


def _check_forwards(clean: dict[str, str], seen: dict[tuple[str, int], list[str]], unperturbed: set[int],
                    per_step: int | None) -> list[str]:  # fmt: skip
    problems = []
    steps = sorted({s for _, s in seen})
    if not steps:
        return ["no forward of a traced layer ran"]
    for name, clean_digest in clean.items():
        draws = []
        for s in steps:
            got = seen.get((name, s), [])
            if not got:
                problems.append(f"{name}, step {s}: no forward")
                continue
            if per_step is not None and len(got) != per_step:
                problems.append(f"{name}, step {s}: {len(got)} forwards, expected {per_step}")
            if len(set(got)) != 1:
                problems.append(f"{name}, step {s}: forwards saw {len(set(got))} different weights")
            if s in unperturbed:
                if set(got) != {clean_digest}:
                    problems.append(f"{name}, step {s}: noise at a step whose schedule factor is 0")
                continue
            if clean_digest in got:
                problems.append(f"{name}, step {s}: a forward saw the clean weight (no noise)")
            draws.append(got[0])
        if len(set(draws)) != len(draws):
            problems.append(f"{name}: the same noise in two steps (not redrawn)")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flatlora_dist.trace", description=verify.__doc__)
    p.add_argument("trace", help=f"a file written with {ENV}=FILE")
    p.add_argument("--forwards_per_step", type=int, default=None)
    args = p.parse_args(argv)
    summary, problems = verify(read(args.trace), args.forwards_per_step)
    print(json.dumps(summary))
    for line in problems:
        print(f"problem: {line}")
    print("Flat-LoRA noise: " + ("in every forward of every step, base unchanged" if not problems else "NOT as expected"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
