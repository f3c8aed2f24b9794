"""The run's facts, settled once by the preflight (:func:`.preflight.preflight`) and read by every later
step instead of re-deriving them or changing the config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunPlan:
    """What the settings and the launcher's environment mean for this run.

    ``resume_from``: the complete checkpoint to continue from (``None``: start fresh); ``ds``: the
    DeepSpeed config as read from ``--ds_config`` (``None``: no DeepSpeed); ``fsdp``: the FSDP kind,
    from ``--fsdp`` or an ``accelerate launch`` config (``None``: no FSDP); ``zero_stage``: the ZeRO stage
    (0 without DeepSpeed); ``noise_scheme``: the scheme the Flat-LoRA engine will pick (``blocks`` or
    ``fused``, from where the base weights are stored)."""

    resume_from: Path | None
    ds: dict[str, Any] | None
    fsdp: str | None
    zero_stage: int
    noise_scheme: str

    @property
    def sharded(self) -> bool:
        """Whether parameters are partitioned across ranks (ZeRO-3 or FSDP)."""
        return bool(self.fsdp) or self.zero_stage == 3

    @property
    def backend(self) -> str:
        """``deepspeed``, the FSDP kind, or ``single`` (one process or DDP), as ``summary.json`` names it."""
        return "deepspeed" if self.ds else (self.fsdp or "single")
