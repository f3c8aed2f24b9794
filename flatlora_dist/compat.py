"""Named shims for API differences across the tested range (``flatlora_dist.versions.TESTED``).

Each shim asks the installed library what it offers (a field, a method, a keyword) instead of
comparing version numbers, and is tested on both ends of the range (``make test`` and
``make test-floor``).  transformers and peft are imported inside the functions: the core imports
this module without either loaded.
"""

from __future__ import annotations

import inspect
from typing import Any

NON_REENTRANT = {"use_reentrant": False}


def checkpointing_arguments(enabled: bool, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """``TrainingArguments`` (and ``SFTConfig``) keywords that switch activation checkpointing.

    transformers 5.25 renamed ``gradient_checkpointing(_kwargs)`` to ``activation_checkpointing(_kwargs)``
    and deprecated the old names; 5.17 and older know only the old ones.  With ``enabled``, the
    keywords default to non-reentrant checkpointing (what every backend here supports)."""
    from transformers import TrainingArguments

    prefix = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    args: dict[str, Any] = {f"{prefix}_checkpointing": enabled}
    if enabled:
        args[f"{prefix}_checkpointing_kwargs"] = dict(kwargs or NON_REENTRANT)
    return args


def enable_checkpointing(model: Any, kwargs: dict[str, Any] | None = None) -> None:
    """Turn on activation checkpointing of a transformers model: ``activation_checkpointing_enable``
    where the model has it (transformers 5.25), else ``gradient_checkpointing_enable``."""
    kwargs = dict(kwargs or NON_REENTRANT)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_checkpointing(model: Any) -> bool:
    """Whether activation checkpointing is on: ``is_activation_checkpointing`` (transformers 5.25) or
    ``is_gradient_checkpointing`` (older), whichever the model's class defines."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr) or attr in vars(model):
            return bool(getattr(model, attr))
    return False


def kbit_training_kwargs(checkpointing: bool, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keywords for peft's ``prepare_model_for_kbit_training``: peft 0.22 takes
    ``activation_checkpointing_kwargs`` (``gradient_checkpointing_kwargs`` deprecated), 0.18 only the old."""
    from peft import prepare_model_for_kbit_training

    params = inspect.signature(prepare_model_for_kbit_training).parameters
    name = "activation_checkpointing_kwargs" if "activation_checkpointing_kwargs" in params else "gradient_checkpointing_kwargs"
    return {"use_gradient_checkpointing": checkpointing, name: dict(kwargs or NON_REENTRANT)}
