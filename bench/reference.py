"""The reference (paper's) Flat-LoRA perturbation, re-implemented in plain PyTorch.

Shared by ``bench/overhead.py`` (timing) and ``studies/generalization.py`` (the equivalence study).

Per micro-batch (the official code hooks HF ``training_step``): for every LoRA layer form the merged
weight ``W + s·B·A``, its row norms, a full-size std tensor ``norm.repeat(1, n)`` and a full-size
``torch.normal(0, std)``, added in place before the forward; after the backward the same noise is
regenerated from the stored norms (same seed) and subtracted (``w + e - e``: not an exact identity
in floating point, so the weights drift by round-off, as in the original).

Two things are configurable so that the generalization bench can pair it with this library:

* ``rng``: ``"wallclock"`` (the original: the *global* RNG is reseeded from the clock before every
  draw, so dropout masks depend on time) or an integer run seed: the noise then comes from a private
  ``torch.Generator`` seeded from ``(seed, micro-step)``, and the global RNG (dropout) is untouched.
* the ramp: ``perturb()`` uses the reference's own micro-step counter; ``perturb(step)`` uses the
  caller's optimizer step instead (the ramp of this library), isolating the noise implementation.
"""

from __future__ import annotations

import math
import time

import torch

from flatlora_dist.targets import find_targets


class ReferenceFlatLoRA:
    """The reference implementation's perturbation (see the module docstring).

    What it keeps between the two halves is what the paper describes: the seed and one norm vector
    per layer.  What it does is what makes it costly: dense full-size temporaries per layer (the
    merged weight, the repeated std tensor, the noise), the noise drawn twice (once to add, once to
    subtract), and all of it once per micro-batch.
    """

    def __init__(self, model: torch.nn.Module, rho: float, total_steps: int, schedule: str = "cosine",
                 rng: str | int = "wallclock") -> None:  # fmt: skip
        if rng != "wallclock" and (isinstance(rng, bool) or not isinstance(rng, int) or rng < 0):
            raise ValueError(f"ReferenceFlatLoRA: rng must be 'wallclock' or a seed >= 0, got {rng!r}")
        self.layers = [t.module for t in find_targets(model)]
        self.rho = rho
        self.total_steps = total_steps
        self.schedule = schedule
        self.rng = rng
        self.micro_step = 0  # the reference counts training_step calls (micro-batches)
        self.seed = 0
        self.scales: list[torch.Tensor] = []
        self.draws = 0

    def factor(self, step: int | None = None) -> float:
        """Cosine ramp ``0.5·(1-cos(pi·t/T))`` over ``t`` = ``step`` if given, else the micro-step."""
        if self.schedule == "constant":
            return 1.0
        t = self.micro_step if step is None else step
        return 0.5 * (1 - math.cos(math.pi * min(t, self.total_steps) / self.total_steps))

    def _generator(self) -> torch.Generator | None:
        """Reseed the noise source: the global RNG from the clock, or a private generator."""
        if self.rng == "wallclock":
            torch.manual_seed(self.seed)
            return None
        gen = torch.Generator()
        gen.manual_seed(self.seed)
        return gen

    @torch.no_grad()
    def perturb(self, step: int | None = None) -> None:
        """Add dense noise to every LoRA layer's base weight (factor from ``step`` or the micro-step)."""
        if self.rng == "wallclock":
            self.seed = int(time.time() * 1000) % (2**31)
        else:
            self.seed = (self.rng * 1_000_003 + self.micro_step) % (2**63)
        gen = self._generator()
        factor = self.factor(step)
        self.scales = []
        for mod in self.layers:
            w = mod.base_layer.weight
            data = w.data.clone()
            for name in mod.active_adapters:
                if name in mod.lora_A:
                    data += (mod.lora_B[name].weight @ mod.lora_A[name].weight) * mod.scaling[name]
            filter_norm = data.norm(dim=1, keepdim=True)  # (m, 1)
            scale = factor * self.rho * filter_norm / math.sqrt(data.shape[1])
            self.scales.append(scale)
            std = scale.repeat(1, data.shape[1])  # full-size std tensor
            w.data.add_(torch.normal(0, std, generator=gen))
        self.draws += 1

    @torch.no_grad()
    def restore(self) -> None:
        """Regenerate the same noise from the stored seed and norms and subtract it."""
        gen = self._generator()
        for mod, scale in zip(self.layers, self.scales):
            w = mod.base_layer.weight
            std = scale.repeat(1, w.shape[1])
            w.data.sub_(torch.normal(0, std, generator=gen))
        self.micro_step += 1
