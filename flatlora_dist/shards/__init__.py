"""Sharding backends, one per file; picked per LoRA target by how its base weight is stored.

Backends for DeepSpeed, FSDP and bitsandbytes are imported lazily, so the core never imports those
libraries unless the model actually uses them.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..targets import LoraTarget
from .base import NORM_CHUNK, Factors, Phase, Region, ShardBackend

_BACKENDS = {
    "plain": ("flatlora_dist.shards.plain", "PlainBackend"),
    "deepspeed": ("flatlora_dist.shards.deepspeed", "ZeRO3Backend"),
    "fsdp2": ("flatlora_dist.shards.fsdp2", "FSDP2Backend"),
    "fsdp1": ("flatlora_dist.shards.fsdp1", "FSDP1Backend"),
    "bnb": ("flatlora_dist.shards.bnb", "BnbBackend"),
}


def param_kind(param: torch.Tensor) -> str:
    """Which backend stores ``param``, from the parameter alone: ``deepspeed`` (a ZeRO-3 ``ds_id``),
    ``fsdp2`` (a DTensor), ``fsdp1`` (flattened into a ``FlatParameter``) or ``plain``."""
    if hasattr(param, "ds_id"):
        return "deepspeed"
    if type(param).__name__ == "DTensor" or type(getattr(param, "data", None)).__name__ == "DTensor":
        return "fsdp2"
    if getattr(param, "_fsdp_flattened", False):
        return "fsdp1"
    return "plain"


def _sharding(target: LoraTarget) -> str:
    kind = param_kind(target.weight)
    if kind != "plain":
        return kind
    if getattr(target.base, "_fsdp_flat_param", None) is not None:
        return "fsdp1"
    if getattr(getattr(target.weight, "_base", None), "_fsdp_flattened", False):  # FSDP1 use_orig_params=False:
        return "fsdp1"  # a view of a FlatParameter; FSDP1Backend.check refuses it with the fix
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


def model_kinds(model: nn.Module) -> list[str]:
    """Every backend kind that stores some parameter of ``model`` (``plain`` always), in a fixed order.

    FSDP is recognised by its modules, not its parameters: a unit a forward left unsharded registers
    plain tensors until it is resharded (``ShardBackend.settle``)."""
    params = list(model.parameters())
    kinds = ["plain"] + (["deepspeed"] if any(hasattr(p, "ds_id") for p in params) else [])
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        modules = list(model.modules())
        kinds += ["fsdp2"] if any(isinstance(m, FSDPModule) for m in modules) else []
        kinds += ["fsdp1"] if any(isinstance(m, FullyShardedDataParallel) for m in modules) else []
    return kinds


def make_backend(kind: str, model) -> ShardBackend:
    """Instantiate the backend ``kind`` for ``model`` (the object the user passed to FlatLoRA)."""
    mod_name, cls_name = _BACKENDS[kind]
    cls = getattr(importlib.import_module(mod_name), cls_name)
    return cls(model)


__all__ = ["NORM_CHUNK", "Factors", "LoraTarget", "Phase", "Region", "ShardBackend", "backend_kind", "make_backend",
           "model_kinds", "param_kind"]
