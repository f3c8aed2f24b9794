"""Sharding backends, one per file; picked per LoRA target by how its base weight is stored.

Backends for DeepSpeed, FSDP and bitsandbytes are imported lazily, so the core never imports those
libraries unless the model actually uses them.
"""

from __future__ import annotations

import importlib

from ..targets import LoraTarget
from .base import NORM_CHUNK, Factors, Phase, Region, ShardBackend

_BACKENDS = {
    "plain": ("flatlora_dist.shards.plain", "PlainBackend"),
    "deepspeed": ("flatlora_dist.shards.deepspeed", "ZeRO3Backend"),
    "fsdp2": ("flatlora_dist.shards.fsdp", "FSDP2Backend"),
    "fsdp1": ("flatlora_dist.shards.fsdp", "FSDP1Backend"),
    "bnb": ("flatlora_dist.shards.bnb", "BnbBackend"),
}


def _sharding(target: LoraTarget) -> str:
    w = target.weight
    if hasattr(w, "ds_id"):
        return "deepspeed"
    if type(w).__name__ == "DTensor" or type(getattr(w, "data", None)).__name__ == "DTensor":
        return "fsdp2"
    if getattr(w, "_fsdp_flattened", False) or getattr(target.base, "_fsdp_flat_param", None) is not None:
        return "fsdp1"
    if getattr(getattr(w, "_base", None), "_fsdp_flattened", False):  # FSDP1 use_orig_params=False: a view
        return "fsdp1"  # of a FlatParameter; FSDP1Backend.check refuses it with the fix
    return "plain"


def backend_kind(target: LoraTarget) -> str:
    """Which backend owns this target's base weight, from the parameter alone."""
    kind = _sharding(target)
    if target.quantized:
        if kind != "plain":
            raise ValueError(
                f"layer {target.name!r}: Flat-LoRA on a 4-bit/8-bit base sharded by {kind} is not supported "
                "(the packed bytes cannot take noise in place); run QLoRA in a single process or under DDP, "
                "or shard a bf16 base with ZeRO-3/FSDP instead"
            )
        return "bnb"
    return kind


def make_backend(kind: str, model) -> ShardBackend:
    """Instantiate the backend ``kind`` for ``model`` (the object the user passed to FlatLoRA)."""
    mod_name, cls_name = _BACKENDS[kind]
    cls = getattr(importlib.import_module(mod_name), cls_name)
    return cls(model)


__all__ = ["NORM_CHUNK", "Factors", "LoraTarget", "Phase", "Region", "ShardBackend", "backend_kind", "make_backend"]
