"""Flat-LoRA as an axolotl plugin (axolotl 0.21): ``plugins: [flatlora_dist.integrations.axolotl.FlatLoRAPlugin]``.

Imported only by axolotl (the core package never imports this module).  What it guarantees:

* The ``flatlora_*`` YAML keys (:class:`FlatLoRAArgs`) are merged into axolotl's config and checked
  with :meth:`FlatLoRAConfig.validate` at config time; a bad value is one error naming the key.
* Flat-LoRA runs only on a PEFT LoRA/QLoRA adapter (``adapter: lora`` or ``qlora``, no DoRA); anything
  else is refused before the model loads.
* axolotl's fused LoRA kernels (``lora_mlp_kernel``, ``lora_qkv_kernel``, ``lora_o_kernel``) read the base
  weights outside the layer's forward, so the noise would never be seen: set true they are refused; left
  unset (axolotl would switch them on) they are switched off here, with a log line.
* After axolotl builds its Trainer, :class:`~flatlora_dist.hf.FlatLoRACallback` is attached (ahead of the
  reporting callbacks, so ``flatlora/*`` reaches TensorBoard/W&B); it draws the noise once per optimizer
  step and takes it out before every update, evaluation and save.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from ..config import MODES, SCHEDULES, FlatLoRAConfig

LOG = logging.getLogger("axolotl.integrations.flatlora_dist")
"""Under ``axolotl.``: axolotl's logging config shows INFO on the console only for its own loggers."""

PLUGIN = "flatlora_dist.integrations.axolotl.FlatLoRAPlugin"
ADAPTERS = ("lora", "qlora")
FUSED_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")
"""axolotl's fused LoRA kernels that bypass the base layer's forward (the embedding one does not touch a
Flat-LoRA target: targets are linears)."""
CONFIG_KEYS = {f"flatlora_{name}": name for name in ("sigma", "total_steps", "schedule", "seed", "mode",
                                                   "skip_nonfinite")}  # fmt: skip
"""YAML key -> :class:`FlatLoRAConfig` field (every field).  ``flatlora_skip_nonfinite_steps`` goes to the
callback instead."""

_DEFAULTS = FlatLoRAConfig()


class FlatLoRAArgs(BaseModel):
    """The ``flatlora_*`` keys of an axolotl YAML (merged into axolotl's config model).

    Invariant: a config that validates builds a valid :class:`FlatLoRAConfig` (:func:`flat_config`).
    """

    flatlora_sigma: float = Field(
        default=_DEFAULTS.sigma, description="noise strength (the paper's rho); 0 = plain LoRA"
    )
    flatlora_schedule: str = Field(default=_DEFAULTS.schedule, description=f"one of {SCHEDULES}")
    flatlora_total_steps: int | None = Field(
        default=_DEFAULTS.total_steps, description="steps of the cosine ramp; unset = the Trainer's max_steps"
    )
    flatlora_seed: int = Field(
        default=_DEFAULTS.seed, description="noise seed (noise = f(seed, step, layer))"
    )
    flatlora_mode: str = Field(default=_DEFAULTS.mode, description=f"one of {MODES}")
    flatlora_skip_nonfinite: bool = Field(
        default=_DEFAULTS.skip_nonfinite, description="skip a step's perturbation when a row norm is NaN/inf"
    )
    flatlora_skip_nonfinite_steps: bool = Field(
        default=True, description="skip the optimizer/LR-scheduler update of a step with NaN/inf gradients"
    )

    @field_validator("flatlora_sigma", "flatlora_total_steps", "flatlora_seed", mode="before")
    @classmethod
    def _no_bool(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML ``true`` is not a number (pydantic would read it as 1)."""
        if isinstance(value, bool):
            raise ValueError(f"{info.field_name} must be a number, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> FlatLoRAArgs:
        flat_config({key: getattr(self, key) for key in CONFIG_KEYS})
        return self


def flat_config(cfg: Mapping[str, Any]) -> FlatLoRAConfig:
    """The :class:`FlatLoRAConfig` of an axolotl config (keys absent or ``None`` take its defaults).

    Each key is validated on its own first, so an error names the YAML key and its value."""
    values = {field: cfg[key] for key, field in CONFIG_KEYS.items() if cfg.get(key) is not None}
    for field, value in values.items():
        try:
            FlatLoRAConfig(**{field: value})
        except ValueError as e:
            key, message = f"flatlora_{field}", str(e)
            named = message.replace(f"FlatLoRAConfig.{field}", key)
            raise ValueError(named if key in named else f"{key}: {message}") from None
    return FlatLoRAConfig(**values)


def refusal(get: Callable[[str], Any]) -> str | None:
    """Why Flat-LoRA cannot run with this axolotl config (``get`` reads a key), or ``None``."""
    adapter = get("adapter")
    if adapter not in ADAPTERS:
        return (f"{PLUGIN} needs a LoRA adapter, got adapter: {adapter!r}; set `adapter: lora` (or `qlora`) "
                f"or remove the plugin from `plugins`")  # fmt: skip
    if get("peft_use_dora"):
        return f"{PLUGIN}: DoRA's weight is not W + s*B*A (Flat-LoRA needs plain LoRA); set `peft_use_dora: false`"
    on = [k for k in FUSED_KERNELS if get(k)]
    if on:
        return (
            f"{PLUGIN}: axolotl's fused LoRA kernels read the base weights outside the layer's forward, "
            f"so the Flat-LoRA noise would never be seen; set {', '.join(f'`{k}: false`' for k in on)}"
        )
    return None


class FlatLoRAPlugin(BasePlugin):
    """Attaches :class:`~flatlora_dist.hf.FlatLoRACallback` to axolotl's Trainer (see the module docstring)."""

    def get_input_args(self) -> str:
        return f"{__name__}.FlatLoRAArgs"

    def register(self, cfg: dict) -> None:
        """On the raw YAML (before axolotl validates it): refuse what cannot work, switch unset fused kernels off.

        Runs before axolotl's ``check_auto_enable_lora_kernels``, which only turns on kernels left unset."""
        reason = refusal(cfg.get)
        if reason:
            raise ValueError(reason)
        unset = [k for k in FUSED_KERNELS if cfg.get(k) is None]
        if unset:
            LOG.warning("Flat-LoRA: setting %s to false (axolotl's fused LoRA kernels bypass the layer's "
                        "forward, where the noise is seen)", ", ".join(unset))  # fmt: skip
            for k in unset:
                cfg[k] = False

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        """Attach the callback first in the Trainer's callback list (the validated config is re-checked)."""
        from ..hf import FlatLoRACallback

        reason = refusal(cfg.get)
        if reason:
            raise ValueError(reason)
        config = flat_config(cfg)
        FlatLoRACallback.attach(
            trainer, config, skip_nonfinite_steps=cfg.get("flatlora_skip_nonfinite_steps") is not False
        )
        LOG.info("Flat-LoRA attached: %s", config.to_dict())
