"""PyTorch FSDP2 (``fully_shard``): base weights as DTensor row shards, 1-D mesh or HSDP on a 2-D mesh.

Geometry (docs/design.md, "FSDP").  A weight of ``rows`` storage rows is a DTensor with placements
``(Shard(0),)`` (or ``(Replicate(), Shard(0))`` under HSDP).  Over the ``ws`` ranks of the shard mesh
dimension it is cut ``torch.chunk``-style: ``c = ceil(rows / ws)``, rank ``q`` owns rows
``[q·c, min((q+1)·c, rows))`` (trailing ranks may own none).  ``to_local()`` is a contiguous view of those
rows inside FSDP's padded shard buffer; the next unshard all-gathers from it, so in-place edits are seen
by the next forward.  Under HSDP every replica holds the same shards: noise keyed by the global index is
identical on all replicas, and row norms are reduced over the *shard* group only.

Sharded storage is the only authoritative copy: before reading or writing it the backend reshards any
``fully_shard`` unit left unsharded (the root after an evaluation forward keeps its unsharded parameters,
which the next forward would otherwise reuse without the noise).  That is local; it needs the call to
come outside forward/backward, which the engine's contract already requires.

Refused at start-up, naming the fix: placements other than ``Shard(0)`` on one mesh dimension
(``shard_placement_fn``, tensor parallel), float8 / quantized shards.  Noise is drawn on the device of
the sharded storage (with CPU offload: the CPU).  FSDP modules are imported only inside functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..targets import LoraTarget
from .base import Region
from .fsdp_common import FSDPBackend, Piece, row_covers, same_group


def dtensor_shard_dim(dt) -> int:
    """Mesh dimension on which ``dt`` is ``Shard(0)``; every other dimension must be ``Replicate``.

    Raises ``NotImplementedError`` for other layouts (tensor parallel, ``Shard(1)``, strided shards).
    """
    from torch.distributed.tensor import Replicate, Shard

    dims = [i for i, p in enumerate(dt.placements) if type(p) is Shard and p.dim == 0]
    others = [p for i, p in enumerate(dt.placements) if i not in dims and not isinstance(p, Replicate)]
    if len(dims) != 1 or others:
        raise NotImplementedError(
            f"Flat-LoRA under FSDP2 needs weights sharded as Shard(0) on one mesh dimension and replicated "
            f"on the others (FSDP / HSDP), got placements {dt.placements}: use fully_shard's default "
            "placement (no shard_placement_fn); tensor-parallel layouts are not supported"
        )
    return dims[0]


@dataclass(frozen=True)
class _Geo:
    """Static geometry of a FSDP2 DTensor: every shard-group rank's flat range, this rank's index, the group."""

    covers: list[tuple[int, int]]
    me: int
    group: Any


def _dtensor_geometry(dt) -> _Geo:
    d = dtensor_shard_dim(dt)
    mesh = dt.device_mesh
    ws = mesh.size(d)
    return _Geo(row_covers(dt.shape, ws), mesh.get_local_rank(d), mesh.get_group(d) if ws > 1 else None)


def _dtensor_piece(dt, geo: _Geo | None = None) -> Piece:
    """The ``Piece`` of a FSDP2 DTensor: ``to_local()`` rows and the ceil row split of the shard dim."""
    geo = geo if geo is not None else _dtensor_geometry(dt)
    local = dt.to_local()
    if local.numel() != geo.covers[geo.me][1] or (local.numel() and not local.is_contiguous()):
        raise RuntimeError(
            f"FSDP2 local shard of shape {tuple(local.shape)} is not rank {geo.me}'s ceil row chunk of "
            f"{tuple(dt.shape)} over {len(geo.covers)} ranks"
        )
    return Piece(local.detach().view(-1), dt.shape, geo.covers, geo.group)


@dataclass
class Entry:
    """An FSDP2-managed parameter: its ``FSDPParam`` and the ``fully_shard`` module owning it."""

    param: Any
    owner: nn.Module
    geo: _Geo | None = None

    @property
    def module(self) -> nn.Module:
        return self.param._module_info.module

    @property
    def attr(self) -> str:
        return self.param._module_info.param_name

    def piece(self) -> Piece:
        """This rank's rows of the sharded parameter (geometry computed once; the local view fresh)."""
        if self.geo is None:
            self.geo = _dtensor_geometry(self.param.sharded_param)
        return _dtensor_piece(self.param.sharded_param, self.geo)


def index(model: nn.Module) -> dict[tuple[int, str], Entry]:
    """``(id(module), attribute name) -> Entry`` for every parameter managed by ``fully_shard`` in ``model``."""
    from torch.distributed.fsdp import FSDPModule

    found: dict[tuple[int, str], Entry] = {}
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        state = m._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch < 2.8 kept one group per module
            groups = [g for g in [getattr(state, "_fsdp_param_group", None)] if g is not None]
        for g in groups:
            for fp in g.fsdp_params:
                info = fp._module_info
                found[(id(info.module), info.param_name)] = Entry(fp, m)
                for sm, sn in zip(getattr(info, "shared_modules", []), getattr(info, "shared_param_names", [])):
                    found[(id(sm), sn)] = Entry(fp, m)
    return found


def settle(entries: list[Entry]) -> None:
    """Reshard every ``fully_shard`` unit among ``entries`` that holds unsharded parameters (local).

    Afterwards each entry's module attribute is its sharded DTensor and its shard is authoritative.
    """
    owners = {id(e.owner): e.owner for e in entries if e.param.sharded_state.name != "SHARDED"}
    for owner in owners.values():
        state = owner._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group]
        busy = [g._training_state.name for g in groups if g._training_state.name != "IDLE"]
        if busy:
            raise RuntimeError(
                f"Flat-LoRA found an FSDP2 unit in state {busy[0]} (inside forward/backward); "
                "call perturb()/restore() outside forward and backward"
            )
        owner.reshard()


class FSDP2Backend(FSDPBackend):
    """Base weights sharded by ``torch.distributed.fsdp.fully_shard`` (FSDP2 / HSDP on a 2-D mesh)."""

    name = "fsdp2"
    _index = staticmethod(index)
    _settle = staticmethod(settle)
    _unmanaged = (
        "is a DTensor that no fully_shard unit of the model manages; pass the fully_shard-wrapped model to "
        "FlatLoRA (tensor parallel DTensors are not supported)"
    )

    def _sharded_piece(self, entry: Entry, tensor: torch.Tensor) -> Piece | None:
        """The entry's row piece while ``tensor`` is the sharded DTensor; ``None`` (whole) otherwise."""
        return entry.piece() if type(tensor).__name__ == "DTensor" else None


    # ------------------------------------------------------------------ start-up
    def check(self, targets: list[LoraTarget]) -> None:
        """Every base weight must be a FSDP2 ``Shard(0)`` row shard, all on one shard group, with plain
        (not quantized / float8) local storage; LoRA factors must be row shards or whole tensors."""
        group = None
        for i, t in enumerate(targets):
            e = self._weight_entry(t)
            dt = e.param.sharded_param
            piece = e.piece()
            local = dt.to_local()
            if type(local) is not torch.Tensor or hasattr(local, "fsdp_pre_all_gather") or not local.is_floating_point():
                raise ValueError(
                    f"FSDP2 shard of {t.name!r} is a {type(local).__name__} of dtype {local.dtype}; Flat-LoRA "
                    "perturbs plain floating-point shards only (no float8 / quantized all-gather extensions)"
                )
            if i and not same_group(group, piece.group):
                raise NotImplementedError("LoRA base weights are sharded over different FSDP2 meshes")
            group = piece.group
        for e in self._factor_entries(targets):
            dtensor_shard_dim(e.param.sharded_param)
        self._group = group

    # ------------------------------------------------------------------ where the weight lives
    def regions(self, target: LoraTarget) -> list[Region]:
        """This rank's rows of the weight (``to_local()``, padding excluded); ``[]`` for an empty shard."""
        e = self._weight_entry(target)
        settle([e])
        piece = e.piece()
        if piece.local.numel() == 0:
            return []
        return [Region(piece.local, piece.covers[e.geo.me][0])]

    def local_storage(self, param: torch.Tensor) -> torch.Tensor:
        """This rank's rows (``to_local()``) of a sharded DTensor parameter; a plain tensor whole."""
        data = param.data
        return (data.to_local() if type(data).__name__ == "DTensor" else data).reshape(-1)

    def dense_weight(self, target: LoraTarget) -> torch.Tensor:
        """The unsharded weight FSDP2 registers on the module during its forward/backward (functional mode)."""
        w = target.weight
        if type(w).__name__ == "DTensor" or w.numel() != target.layout.numel:
            raise NotImplementedError(
                f"functional Flat-LoRA under FSDP2 reads the unsharded weight of {target.name!r}, which exists "
                "only inside the layer's forward/backward; use mode='inplace'"
            )
        return w.detach().view(target.layout.rows, target.layout.cols)
