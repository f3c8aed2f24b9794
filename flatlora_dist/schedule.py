"""The noise-strength ramp ``factor(t)``, with ``t`` counting optimizer steps (not micro-steps)."""

from __future__ import annotations

import math


def noise_factor(step: int, total_steps: int, schedule: str = "cosine") -> float:
    """Return factor(step) in [0, 1].

    cosine: ``0.5·(1 - cos(pi·t/T))``, so factor(0) = 0 and factor(T) = 1; steps past T stay at 1.
    constant: 1 at every step.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        t = min(step, total_steps) / total_steps
        return 0.5 * (1.0 - math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {schedule!r}; use 'cosine' or 'constant'")
