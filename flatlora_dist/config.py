"""`FlatLoRAConfig`: the knobs of Flat-LoRA, validated when built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

SCHEDULES = ("cosine", "constant")
MODES = ("auto", "inplace", "functional")


@dataclass
class FlatLoRAConfig:
    """Flat-LoRA hyper-parameters.

    sigma: noise strength (the paper's rho); 0 trains plain LoRA.
    total_steps: optimizer steps over which the cosine ramp goes from 0 to 1; ``None`` lets the
        integration fill it in (the HF callback uses the Trainer's ``max_steps``).
    schedule: ``cosine`` (``0.5·(1-cos(pi·t/T))``) or ``constant`` (factor 1 from step 0).
    seed: the run seed; the noise is a pure function of (seed, step, layer name, element index).
    mode: ``inplace`` perturbs dense base weights in storage, ``functional`` perturbs inside the
        layer's forward, ``auto`` picks inplace for dense bases and functional for quantized ones.
    skip_nonfinite: when a row norm is NaN/inf, skip that step's perturbation (restore, warn)
        instead of raising.
    """

    sigma: float = 0.05
    total_steps: int | None = None
    schedule: str = "cosine"
    seed: int = 0
    mode: str = "auto"
    skip_nonfinite: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)):
            raise ValueError(f"FlatLoRAConfig.sigma must be a number, got {self.sigma!r}")
        if not self.sigma >= 0 or self.sigma == float("inf"):
            raise ValueError(f"FlatLoRAConfig.sigma must be a finite number >= 0 (0 = plain LoRA), got {self.sigma}")
        if self.total_steps is not None and (
            isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps <= 0
        ):
            raise ValueError(f"FlatLoRAConfig.total_steps must be a positive integer, got {self.total_steps!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"FlatLoRAConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.mode not in MODES:
            raise ValueError(f"FlatLoRAConfig.mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"FlatLoRAConfig.seed must be an integer >= 0, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlatLoRAConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown FlatLoRAConfig field(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)
