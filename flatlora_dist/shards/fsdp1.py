"""PyTorch FSDP1 (``FullyShardedDataParallel(..., use_orig_params=True)``): base weights inside flat params.

Geometry (docs/design.md, "FSDP").  Each original parameter is a 1-D view of this rank's slice of a
``FlatParameter``; ``flat_param._shard_param_infos[i]`` says which range ``[intra_start, intra_end]``
(inclusive) of parameter ``i``'s flattened storage the slice holds.  Other ranks' ranges come from the
same pure function FSDP uses (``handle._get_shard_metadata``) on their ``[q·S, (q+1)·S)`` shard.
Under HYBRID_SHARD every replica holds the same shards; row norms are reduced over the handle's
intra-node shard group only.

Sharded storage is the only authoritative copy: before reading or writing it the backend reshards any
handle a forward left unsharded (local; outside forward/backward, as the engine's contract requires).

Sharding strategies: FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD and NO_SHARD (whole weights, no reduction).
Refused at start-up, naming the fix: flat parameters without ``use_orig_params``.  FSDP modules are
imported only inside functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..targets import LoraTarget
from .base import Region
from .fsdp_common import FSDPBackend, Piece, same_group

_ORIG_PARAMS_FIX = (
    "wrap the model with FullyShardedDataParallel(..., use_orig_params=True) "
    "(accelerate: fsdp_use_orig_params: true), or use FSDP2 (fully_shard; accelerate: fsdp_version: 2)"
)


@dataclass
class Entry:
    """An original parameter inside an FSDP1 ``FlatParameter``: owning FSDP unit, handle, index."""

    owner: nn.Module
    handle: Any
    index: int

    @property
    def module(self) -> nn.Module:
        return self.flat._param_infos[self.index].module

    @property
    def attr(self) -> str:
        return self.flat._param_infos[self.index].param_name

    @property
    def flat(self):
        return self.handle.flat_param

    @property
    def sharded(self) -> bool:
        return bool(self.handle.uses_sharded_strategy)

    @property
    def group(self):
        """The handle's shard group (intra-node group under HYBRID_SHARD); ``None`` for NO_SHARD."""
        return self.handle.process_group if self.sharded else None

    def covers(self) -> list[tuple[int, int]]:
        """``(intra_start, numel_in_shard)`` of this parameter for every rank of the shard group."""
        return [(s, n) for s, n in rank_ranges(self.handle)[self.index]]

    def local(self) -> torch.Tensor:
        """This rank's slice of the parameter as a 1-D view of the *sharded* flat parameter (settled)."""
        info = self.flat._shard_param_infos[self.index]
        if not info.in_shard:
            return self.flat.data.new_empty(0)
        return self.flat.data.narrow(0, info.offset_in_shard, info.numel_in_shard)

    def piece(self) -> Piece:
        shape = self.flat._shapes[self.index]
        return Piece(self.local(), shape, self.covers() if self.sharded else [(0, shape.numel())], self.group)


_RANGES_ATTR = "_flatlora_rank_ranges"


def rank_ranges(handle) -> list[list[tuple[int, int]]]:
    """Per original parameter, per rank: ``(intra_start, numel_in_shard)``; cached on the handle.

    Uses FSDP's own shard-metadata function on each rank's ``[q·S, (q+1)·S - 1]`` unsharded range
    (``S`` = padded shard size), and checks that this rank's result equals its ``_shard_param_infos``.
    """
    cached = getattr(handle, _RANGES_ATTR, None)
    if cached is not None:
        return cached
    flat = handle.flat_param
    size = flat._sharded_size.numel()
    per_rank = [handle._get_shard_metadata(q * size, (q + 1) * size - 1) for q in range(handle.world_size)]
    if tuple(per_rank[handle.rank]) != tuple(flat._shard_param_infos):
        raise RuntimeError("FSDP1 shard metadata does not match this rank's shard; unknown FlatParameter layout")
    ranges = [
        [(i.intra_param_start_idx, i.numel_in_shard) if i.in_shard else (0, 0) for i in infos]
        for infos in zip(*per_rank)
    ]
    setattr(handle, _RANGES_ATTR, ranges)
    return ranges


def index(model: nn.Module) -> dict[tuple[int, str], Entry]:
    """``(id(module), attribute name) -> Entry`` for every original parameter flattened by FSDP1."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    found: dict[tuple[int, str], Entry] = {}
    for unit in FSDP.fsdp_modules(model):
        handle = getattr(unit, "_handle", None)
        if handle is None:
            continue
        for i, info in enumerate(handle.flat_param._param_infos):
            found[(id(info.module), info.param_name)] = Entry(unit, handle, i)
    return found


def unsharded(handle) -> bool:
    """Whether the handle's unsharded flat parameter is allocated (a forward would reuse it as it is)."""
    try:
        return not handle.needs_unshard()
    except AttributeError:  # FSDP's lazy init has not run (no forward yet): only the shard exists
        return False


def settle(entries: list[Entry]) -> None:
    """Reshard every FSDP1 handle among ``entries`` that is currently unsharded (local, no collective)."""
    from torch.distributed.fsdp._runtime_utils import _reshard

    seen = set()
    for e in entries:
        h = e.handle
        if id(h) in seen or not e.sharded:
            continue
        seen.add(id(h))
        if not unsharded(h):
            continue
        if h._training_state.name != "IDLE":
            raise RuntimeError(
                f"Flat-LoRA found an FSDP1 unit in state {h._training_state.name} (inside forward/backward or "
                "summon_full_params); call perturb()/restore() outside them"
            )
        _reshard(e.owner, h, True)


class FSDP1Backend(FSDPBackend):
    """Base weights inside FSDP1 ``FlatParameter`` shards (``use_orig_params=True``; FULL_SHARD,
    SHARD_GRAD_OP, HYBRID_SHARD, NO_SHARD)."""

    name = "fsdp1"
    _index = staticmethod(index)
    _settle = staticmethod(settle)
    _unmanaged = (
        "looks FSDP1-flattened but no FSDP unit of the model holds it; pass the FSDP-wrapped model (the root "
        "FullyShardedDataParallel) to FlatLoRA"
    )

    # ------------------------------------------------------------------ start-up
    def check(self, targets: list[LoraTarget]) -> None:
        """Require ``use_orig_params=True``, one sharding strategy and one shard group for all targets."""
        group, strategy = None, None
        for i, t in enumerate(targets):
            e = self._weight_entry(t)
            if not e.handle._use_orig_params:
                raise ValueError(
                    f"Flat-LoRA cannot perturb FSDP1 flat parameters without use_orig_params (layer {t.name!r}): "
                    f"{_ORIG_PARAMS_FIX}"
                )
            if not e.flat.is_floating_point():
                raise ValueError(f"FSDP1 flat parameter of {t.name!r} has dtype {e.flat.dtype}; expected float")
            if i and (e.sharded != strategy or not same_group(group, e.group)):
                raise NotImplementedError("LoRA base weights use different FSDP1 sharding strategies or groups")
            group, strategy = e.group, e.sharded
            if e.sharded:
                rank_ranges(e.handle)
        for e in self._factor_entries(targets):
            if not e.handle._use_orig_params:
                raise ValueError(f"FSDP1 unit holding LoRA factors lacks use_orig_params: {_ORIG_PARAMS_FIX}")
        self._group = group

    # ------------------------------------------------------------------ where the weight lives
    def regions(self, target: LoraTarget) -> list[Region]:
        """This rank's slice of the weight inside its sharded flat parameter (padding excluded)."""
        e = self._weight_entry(target)
        settle([e])
        info = e.flat._shard_param_infos[e.index]
        if not info.in_shard or info.numel_in_shard == 0:
            return []
        return [Region(e.local(), int(info.intra_param_start_idx))]

    def dense_weight(self, target: LoraTarget) -> torch.Tensor:
        """The unflattened unsharded weight FSDP1 registers during forward/backward (functional mode)."""
        w = target.weight
        if w.numel() != target.layout.numel or w.dim() != 2:
            raise NotImplementedError(
                f"functional Flat-LoRA under FSDP1 reads the unsharded weight of {target.name!r}, which exists "
                "only inside the layer's forward/backward; use mode='inplace'"
            )
        return w.detach().view(target.layout.rows, target.layout.cols)
