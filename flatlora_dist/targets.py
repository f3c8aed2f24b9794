"""Finding the LoRA-wrapped linears Flat-LoRA perturbs, and naming them stably.

A target's name must be the same whatever wraps the model (PEFT, DDP, a DeepSpeed engine, FSDP,
activation checkpointing, torch.compile): it keys the noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layout import RowLayout

WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
"""Module-name components that wrappers insert anywhere in a path (FSDP1 units, activation checkpointing,
torch.compile).  Outer wrappers (DDP, a DeepSpeed engine, Lightning) add a leading ``module`` /
``_forward_module`` instead."""
_OUTER_WRAPPERS = frozenset({"module", "_forward_module"})
_QUANTIZED_PARAMS = {"Params4bit", "Int8Params"}
_QUANTIZED_LAYERS = {"Linear4bit", "Linear8bitLt"}


def canonical_name(name: str) -> str:
    """Drop wrapper components (``module.``, ``_fsdp_wrapped_module.``, ...) and PEFT's ``base_model.model.``."""
    parts = [p for p in name.split(".") if p not in WRAPPER_PARTS | _OUTER_WRAPPERS]
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    return ".".join(parts)


@dataclass(eq=False)
class LoraTarget:
    """One PEFT LoRA linear: ``module`` is the ``LoraLayer``, ``base`` its frozen ``base_layer``.

    ``layout`` describes the *global* (unsharded) storage of ``base.weight``; ``offset`` is the
    target's first output feature in the engine's flat norm buffer.
    """

    name: str
    module: nn.Module
    base: nn.Module
    layout: RowLayout
    offset: int = 0

    @property
    def weight(self) -> nn.Parameter:
        return self.base.weight

    @property
    def quantized(self) -> bool:
        """A bitsandbytes base, recognised by its layer class too (FSDP/DTensor wrapping hides the param type)."""
        return type(self.weight).__name__ in _QUANTIZED_PARAMS or type(self.base).__name__ in _QUANTIZED_LAYERS

    def adapters(self) -> list[str]:
        """Active adapter names that have LoRA factors in this layer."""
        active = self.module.active_adapters
        names = [active] if isinstance(active, str) else list(active)
        return [a for a in names if a in self.module.lora_A and not self.module.disable_adapters]

    def local_factors(self) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
        """``(A.weight, B.weight, scaling)`` per active adapter, as stored locally (may be shards)."""
        m = self.module
        return [(m.lora_A[a].weight, m.lora_B[a].weight, float(m.scaling[a])) for a in self.adapters()]


def find_targets(model: nn.Module) -> list[LoraTarget]:
    """All PEFT LoRA linears in ``model`` in module order (identical on every rank).

    Raises ``ValueError`` for a model with none, and for LoRA variants whose effective weight is not
    ``W + s·B·A`` (DoRA) or that are not linears (LoRA on embeddings / convolutions are skipped).
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as e:  # pragma: no cover - peft is a hard dependency
        raise ImportError("flatlora_dist needs peft: pip install peft") from e

    targets: list[LoraTarget] = []
    offset = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer) or not hasattr(mod, "base_layer"):
            continue
        base = mod.get_base_layer()
        if not hasattr(base, "weight") or not hasattr(mod, "in_features"):
            continue
        if isinstance(base, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        if any(getattr(mod, "use_dora", {}).get(a, False) for a in mod.lora_A):
            raise ValueError(
                f"layer {canonical_name(name)!r} uses DoRA, whose effective weight is not W + s*B*A; "
                "Flat-LoRA supports plain LoRA adapters (set use_dora=False)"
            )
        fan_in_fan_out = bool(getattr(mod, "fan_in_fan_out", False))
        m, n = int(mod.out_features), int(mod.in_features)
        layout = RowLayout(n, m, out_axis=1) if fan_in_fan_out else RowLayout(m, n, out_axis=0)
        targets.append(LoraTarget(canonical_name(name), mod, base, layout, offset))
        offset += m
    if not targets:
        raise ValueError(
            "the model has no PEFT LoRA linear layers: wrap it with peft.get_peft_model(model, LoraConfig(...)) "
            "before creating FlatLoRA"
        )
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError("two LoRA layers map to the same canonical name; noise keys would collide")
    for t in targets:
        if t.weight.requires_grad:
            raise ValueError(
                f"base weight of {t.name!r} is trainable; Flat-LoRA perturbs frozen bases only "
                "(PEFT freezes them: do not set requires_grad on base weights)"
            )
    return targets


def weight_dtype(target: LoraTarget) -> torch.dtype:
    """Storage dtype of the target's base weight (ZeRO-3 params report theirs through ``ds_tensor``)."""
    w = target.weight
    ds = getattr(w, "ds_tensor", None)
    return ds.dtype if ds is not None else w.dtype
