"""PyTorch FSDP: FSDP2 (``fully_shard``, DTensor row shards) and FSDP1 (``use_orig_params=True`` flat params).

Geometry (DESIGN 3.5).

- **FSDP2**: a weight of ``rows`` storage rows is a DTensor with placements ``(Shard(0),)`` (or
  ``(Replicate(), Shard(0))`` under HSDP).  Over the ``ws`` ranks of the shard mesh dimension it is
  cut ``torch.chunk``-style: ``c = ceil(rows / ws)``, rank ``q`` owns rows ``[q·c, min((q+1)·c, rows))``
  (trailing ranks may own none).  ``to_local()`` is a contiguous view of those rows inside FSDP's padded
  shard buffer; the next unshard all-gathers from it, so in-place edits are seen by the next forward.
- **FSDP1** (``use_orig_params=True``): each original parameter is a 1-D view of this rank's slice of a
  ``FlatParameter``; ``flat_param._shard_param_infos[i]`` says which range ``[intra_start, intra_end]``
  (inclusive) of parameter ``i``'s flattened storage the slice holds.  Other ranks' ranges come from the
  same pure function FSDP uses (``handle._get_shard_metadata``) on their ``[q·S, (q+1)·S)`` shard.
- **HSDP** (FSDP2 on a 2-D mesh, FSDP1 ``HYBRID_SHARD``): every replica holds the same shards.  Noise
  keyed by the global index is therefore identical on all replicas, and the row norms are reduced over
  the *shard* group only (reducing over the world would count every element once per replica).

Sharded storage is the only authoritative copy: before reading or writing it the backend reshards any
FSDP unit left unsharded (the root after an evaluation forward keeps its unsharded parameters, which
the next forward would otherwise reuse without the noise).  That is local; it needs the call to come
outside forward/backward, which the engine's contract already requires.

Sharding strategies: FSDP1 FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD (reduce over the handle's intra-node
group) and NO_SHARD (whole weights, no reduction); FSDP2 with default placements, 1-D or 2-D (HSDP) mesh.
Refused at start-up, naming the fix: FSDP1 without ``use_orig_params``, FSDP2 placements other than
``Shard(0)`` on one mesh dimension (``shard_placement_fn``, tensor parallel), float8 / quantized shards.

Collectives: ``lora_factors`` and ``gathered_lora_state_dict`` gather LoRA factors with one
``all_gather`` per (shard group, dtype); everything else is local.  The norm all-reduce is the engine's.
``save_adapter`` writes a loadable PEFT adapter from the gathered tensors (PEFT 0.21's own
``save_pretrained`` writes an empty one under nested FSDP1 units).

Noise is drawn on the device of the sharded storage: with CPU offload that is the CPU (identical on all
ranks, but a different stream of values than CUDA draws would give).  FSDP modules are imported only
inside this module's functions.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..targets import LoraTarget
from .base import Factors, Region, ShardBackend

_WRAPPER_PARTS = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}
_ORIG_PARAMS_FIX = (
    "wrap the model with FullyShardedDataParallel(..., use_orig_params=True) "
    "(accelerate: fsdp_use_orig_params: true), or use FSDP2 (fully_shard; accelerate: fsdp_version: 2)"
)


# ====================================================================================== geometry
@dataclass
class _Piece:
    """One tensor sharded over ``group``: this rank's elements and every group rank's global range.

    ``local`` is 1-D (this rank's elements, possibly empty); ``covers[q] = (start, length)`` is the
    global flat range group rank ``q`` holds (lengths sum to ``shape.numel()``, ranges disjoint).
    ``group is None`` means the tensor is whole on every rank (``covers == [(0, numel)]``).
    """

    local: torch.Tensor
    shape: torch.Size
    covers: list[tuple[int, int]]
    group: Any = None


def _row_covers(shape: torch.Size, ws: int) -> list[tuple[int, int]]:
    """``torch.chunk``-style row split of a tensor of ``shape`` over ``ws`` ranks, as flat ranges."""
    rows = shape[0] if len(shape) else 1
    numel = shape.numel()
    cols = numel // rows if rows else 0
    c = -(-rows // ws)
    out = []
    for q in range(ws):
        r0 = min(q * c, rows)
        r1 = min(r0 + c, rows)
        out.append((r0 * cols, (r1 - r0) * cols))
    return out


def _comm_device(group, local: torch.Tensor) -> torch.device:
    """Where gather buffers live: CUDA for a pure NCCL group, else the local tensor's device."""
    backend = str(dist.get_backend(group))
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return local.device


def _gather_full(pieces: list[_Piece]) -> list[torch.Tensor]:
    """Complete tensors (``piece.shape``, ``piece.local.dtype``) for ``pieces``, in order.

    Collective: one ``all_gather`` per distinct (group, dtype), in first-appearance order, so every
    rank of each group must pass the same pieces in the same order.  Whole pieces are copied locally.
    """
    out: list[torch.Tensor | None] = [None] * len(pieces)
    buckets: dict[tuple[int, torch.dtype], list[int]] = {}
    groups: dict[int, Any] = {}
    for i, p in enumerate(pieces):
        if p.group is None:
            out[i] = p.local.detach().reshape(p.shape).clone()
            continue
        buckets.setdefault((id(p.group), p.local.dtype), []).append(i)
        groups[id(p.group)] = p.group
    for (gid, dtype), idx in buckets.items():
        _gather_bucket([pieces[i] for i in idx], groups[gid], dtype, out, idx)
    return out  # type: ignore[return-value]


def _gather_bucket(pieces: list[_Piece], group, dtype: torch.dtype, out: list, idx: list[int]) -> None:
    """Pack this rank's pieces, all-gather equal-size buffers over ``group``, unpack every rank's ranges."""
    ws, me = dist.get_world_size(group), dist.get_rank(group)
    for p in pieces:
        if len(p.covers) != ws or sum(n for _, n in p.covers) != p.shape.numel():
            raise RuntimeError(f"shard ranges {p.covers} do not tile a tensor of shape {tuple(p.shape)} over {ws} ranks")
        if p.local.numel() != p.covers[me][1]:
            raise RuntimeError(f"local shard has {p.local.numel()} elements, geometry says {p.covers[me][1]}")
    per_rank = [sum(p.covers[q][1] for p in pieces) for q in range(ws)]
    width = max(per_rank)
    device = _comm_device(group, pieces[0].local)
    send = torch.zeros(width, dtype=dtype, device=device)
    pos = 0
    for p in pieces:
        n = p.local.numel()
        send[pos : pos + n] = p.local.detach().reshape(-1)
        pos += n
    recv = [torch.empty(width, dtype=dtype, device=device) for _ in range(ws)]
    dist.all_gather(recv, send, group=group)
    full = [torch.empty(p.shape.numel(), dtype=dtype, device=device) for p in pieces]
    for q in range(ws):
        pos = 0
        for p, f in zip(pieces, full):
            start, n = p.covers[q]
            f[start : start + n] = recv[q][pos : pos + n]
            pos += n
    for i, p, f in zip(idx, pieces, full):
        out[i] = f.view(p.shape)


def _same_group(a, b) -> bool:
    """Whether two process groups span the same ranks (FSDP units may hold distinct equal groups)."""
    if a is b:
        return True
    if a is None or b is None:
        return False
    return dist.get_process_group_ranks(a) == dist.get_process_group_ranks(b)


# ====================================================================================== FSDP2
def _dtensor_shard_dim(dt) -> int:
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
    d = _dtensor_shard_dim(dt)
    mesh = dt.device_mesh
    ws = mesh.size(d)
    return _Geo(_row_covers(dt.shape, ws), mesh.get_local_rank(d), mesh.get_group(d) if ws > 1 else None)


def _dtensor_piece(dt, geo: _Geo | None = None) -> _Piece:
    """The ``_Piece`` of a FSDP2 DTensor: ``to_local()`` rows and the ceil row split of the shard dim."""
    geo = geo if geo is not None else _dtensor_geometry(dt)
    local = dt.to_local()
    if local.numel() != geo.covers[geo.me][1] or (local.numel() and not local.is_contiguous()):
        raise RuntimeError(
            f"FSDP2 local shard of shape {tuple(local.shape)} is not rank {geo.me}'s ceil row chunk of "
            f"{tuple(dt.shape)} over {len(geo.covers)} ranks"
        )
    return _Piece(local.detach().view(-1), dt.shape, geo.covers, geo.group)


@dataclass
class _F2:
    """An FSDP2-managed parameter: its ``FSDPParam`` and the ``fully_shard`` module owning it."""

    param: Any
    owner: nn.Module
    geo: _Geo | None = None

    def piece(self) -> _Piece:
        """This rank's rows of the sharded parameter (geometry computed once; the local view fresh)."""
        if self.geo is None:
            self.geo = _dtensor_geometry(self.param.sharded_param)
        return _dtensor_piece(self.param.sharded_param, self.geo)


def _fsdp2_index(model: nn.Module) -> dict[tuple[int, str], _F2]:
    """``(id(module), attribute name) -> _F2`` for every parameter managed by ``fully_shard`` in ``model``."""
    from torch.distributed.fsdp import FSDPModule

    index: dict[tuple[int, str], _F2] = {}
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
                index[(id(info.module), info.param_name)] = _F2(fp, m)
                for sm, sn in zip(getattr(info, "shared_modules", []), getattr(info, "shared_param_names", [])):
                    index[(id(sm), sn)] = _F2(fp, m)
    return index


def _fsdp2_settle(entries: list[_F2]) -> None:
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


class FSDP2Backend(ShardBackend):
    """Base weights sharded by ``torch.distributed.fsdp.fully_shard`` (FSDP2 / HSDP on a 2-D mesh)."""

    name = "fsdp2"

    def __init__(self, model=None) -> None:
        super().__init__(model)
        self._index: dict[tuple[int, str], _F2] | None = None
        self._group = None

    def _entry(self, module: nn.Module, name: str) -> _F2 | None:
        if self._index is None:
            self._index = _fsdp2_index(self.model)
        return self._index.get((id(module), name))

    def _weight_entry(self, target: LoraTarget) -> _F2:
        e = self._entry(target.base, "weight")
        if e is None:
            raise ValueError(
                f"base weight of {target.name!r} is a DTensor that no fully_shard unit of the model manages; "
                "pass the fully_shard-wrapped model to FlatLoRA (tensor parallel DTensors are not supported)"
            )
        return e

    def _factor_entries(self, targets: list[LoraTarget]) -> list[_F2]:
        out = []
        for t in targets:
            m = t.module
            for a in t.adapters():
                for mod in (m.lora_A[a], m.lora_B[a]):
                    e = self._entry(mod, "weight")
                    if e is not None:
                        out.append(e)
        return out

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
            if i and not _same_group(group, piece.group):
                raise NotImplementedError("LoRA base weights are sharded over different FSDP2 meshes")
            group = piece.group
        for e in self._factor_entries(targets):
            _dtensor_shard_dim(e.param.sharded_param)
        self._group = group

    def reduce_group(self):
        """The process group of the weights' shard mesh dimension (never the HSDP replicate dimension);
        ``None`` when the shard dimension has one rank (whole weights)."""
        return self._group

    # ------------------------------------------------------------------ where the weight lives
    def regions(self, target: LoraTarget) -> list[Region]:
        """This rank's rows of the weight (``to_local()``, padding excluded); ``[]`` for an empty shard."""
        e = self._weight_entry(target)
        _fsdp2_settle([e])
        piece = e.piece()
        if piece.local.numel() == 0:
            return []
        return [Region(piece.local, piece.covers[e.geo.me][0])]

    @contextmanager
    def lora_factors(self, targets: list[LoraTarget]) -> Iterator[dict[int, Factors]]:
        """Full ``(A, B, s)`` for every target: one ``all_gather`` per dtype over the shard group.

        Collective over the shard group; the yielded tensors are fresh copies (safe to keep).
        """
        entries = self._factor_entries(targets)
        _fsdp2_settle(entries)
        yield _factors_from(targets, self._piece_of)

    def _piece_of(self, module: nn.Module, tensor: torch.Tensor) -> _Piece:
        e = self._entry(module, "weight")
        if e is None or type(tensor).__name__ != "DTensor":
            return _Piece(tensor.detach().reshape(-1), tensor.shape, [(0, tensor.numel())], None)
        return e.piece()

    def dense_weight(self, target: LoraTarget) -> torch.Tensor:
        """The unsharded weight FSDP2 registers on the module during its forward/backward (functional mode)."""
        w = target.weight
        if type(w).__name__ == "DTensor" or w.numel() != target.layout.numel:
            raise NotImplementedError(
                f"functional Flat-LoRA under FSDP2 reads the unsharded weight of {target.name!r}, which exists "
                "only inside the layer's forward/backward; use mode='inplace'"
            )
        return w.detach().view(target.layout.rows, target.layout.cols)


# ====================================================================================== FSDP1
@dataclass
class _F1:
    """An original parameter inside an FSDP1 ``FlatParameter``: owning FSDP unit, handle, index."""

    owner: nn.Module
    handle: Any
    index: int

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
        return [(s, n) for s, n in _fsdp1_rank_ranges(self.handle)[self.index]]

    def local(self) -> torch.Tensor:
        """This rank's slice of the parameter as a 1-D view of the *sharded* flat parameter (settled)."""
        info = self.flat._shard_param_infos[self.index]
        if not info.in_shard:
            return self.flat.data.new_empty(0)
        return self.flat.data.narrow(0, info.offset_in_shard, info.numel_in_shard)

    def piece(self) -> _Piece:
        shape = self.flat._shapes[self.index]
        if not self.sharded:
            return _Piece(self.local(), shape, [(0, shape.numel())], None)
        return _Piece(self.local(), shape, self.covers(), self.group)


_RANGES_ATTR = "_flatlora_rank_ranges"


def _fsdp1_rank_ranges(handle) -> list[list[tuple[int, int]]]:
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


def _fsdp1_index(model: nn.Module) -> dict[tuple[int, str], _F1]:
    """``(id(module), attribute name) -> _F1`` for every original parameter flattened by FSDP1."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    index: dict[tuple[int, str], _F1] = {}
    for unit in FSDP.fsdp_modules(model):
        handle = getattr(unit, "_handle", None)
        if handle is None:
            continue
        for i, info in enumerate(handle.flat_param._param_infos):
            index[(id(info.module), info.param_name)] = _F1(unit, handle, i)
    return index


def _fsdp1_unsharded(handle) -> bool:
    """Whether the handle's unsharded flat parameter is allocated (a forward would reuse it as it is)."""
    try:
        return not handle.needs_unshard()
    except AttributeError:  # FSDP's lazy init has not run (no forward yet): only the shard exists
        return False


def _fsdp1_settle(entries: list[_F1]) -> None:
    """Reshard every FSDP1 handle among ``entries`` that is currently unsharded (local, no collective)."""
    from torch.distributed.fsdp._runtime_utils import _reshard

    seen = set()
    for e in entries:
        h = e.handle
        if id(h) in seen or not e.sharded:
            continue
        seen.add(id(h))
        if not _fsdp1_unsharded(h):
            continue
        if h._training_state.name != "IDLE":
            raise RuntimeError(
                f"Flat-LoRA found an FSDP1 unit in state {h._training_state.name} (inside forward/backward or "
                "summon_full_params); call perturb()/restore() outside them"
            )
        _reshard(e.owner, h, True)


class FSDP1Backend(ShardBackend):
    """Base weights inside FSDP1 ``FlatParameter`` shards (``use_orig_params=True``; FULL_SHARD,
    SHARD_GRAD_OP, HYBRID_SHARD, NO_SHARD)."""

    name = "fsdp1"

    def __init__(self, model=None) -> None:
        super().__init__(model)
        self._index: dict[tuple[int, str], _F1] | None = None
        self._group = None

    def _entry(self, module: nn.Module, name: str) -> _F1 | None:
        if self._index is None:
            self._index = _fsdp1_index(self.model)
        # a module that is its own FSDP unit (the HF Trainer's PEFT auto-wrap policy wraps every LoRA Linear)
        # sits behind its FullyShardedDataParallel wrapper in the parent's ModuleDict
        module = getattr(module, "_fsdp_wrapped_module", module)
        return self._index.get((id(module), name))

    def _weight_entry(self, target: LoraTarget) -> _F1:
        e = self._entry(target.base, "weight")
        if e is None:
            raise ValueError(
                f"base weight of {target.name!r} looks FSDP1-flattened but no FSDP unit of the model holds it; "
                "pass the FSDP-wrapped model (the root FullyShardedDataParallel) to FlatLoRA"
            )
        return e

    def _factor_entries(self, targets: list[LoraTarget]) -> list[_F1]:
        out = []
        for t in targets:
            for a in t.adapters():
                for mod in (t.module.lora_A[a], t.module.lora_B[a]):
                    e = self._entry(mod, "weight")
                    if e is not None:
                        out.append(e)
        return out

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
            if i and (e.sharded != strategy or not _same_group(group, e.group)):
                raise NotImplementedError("LoRA base weights use different FSDP1 sharding strategies or groups")
            group, strategy = e.group, e.sharded
            if e.sharded:
                _fsdp1_rank_ranges(e.handle)
        for e in self._factor_entries(targets):
            if not e.handle._use_orig_params:
                raise ValueError(f"FSDP1 unit holding LoRA factors lacks use_orig_params: {_ORIG_PARAMS_FIX}")
        self._group = group

    def reduce_group(self):
        """The FSDP1 shard group (intra-node group under HYBRID_SHARD); ``None`` under NO_SHARD."""
        return self._group

    # ------------------------------------------------------------------ where the weight lives
    def regions(self, target: LoraTarget) -> list[Region]:
        """This rank's slice of the weight inside its sharded flat parameter (padding excluded)."""
        e = self._weight_entry(target)
        _fsdp1_settle([e])
        info = e.flat._shard_param_infos[e.index]
        if not info.in_shard or info.numel_in_shard == 0:
            return []
        return [Region(e.local(), int(info.intra_param_start_idx))]

    @contextmanager
    def lora_factors(self, targets: list[LoraTarget]) -> Iterator[dict[int, Factors]]:
        """Full ``(A, B, s)`` for every target from the local slices: one ``all_gather`` per dtype over
        the shard group (no base weight is gathered).  Collective; yields fresh copies."""
        _fsdp1_settle(self._factor_entries(targets))
        yield _factors_from(targets, self._piece_of)

    def _piece_of(self, module: nn.Module, tensor: torch.Tensor) -> _Piece:
        e = self._entry(module, "weight")
        if e is None:
            return _Piece(tensor.detach().reshape(-1), tensor.shape, [(0, tensor.numel())], None)
        return e.piece()

    def dense_weight(self, target: LoraTarget) -> torch.Tensor:
        """The unflattened unsharded weight FSDP1 registers during forward/backward (functional mode)."""
        w = target.weight
        if w.numel() != target.layout.numel or w.dim() != 2:
            raise NotImplementedError(
                f"functional Flat-LoRA under FSDP1 reads the unsharded weight of {target.name!r}, which exists "
                "only inside the layer's forward/backward; use mode='inplace'"
            )
        return w.detach().view(target.layout.rows, target.layout.cols)


# ====================================================================================== shared
def _factors_from(targets: list[LoraTarget], piece_of) -> dict[int, Factors]:
    """Gather every target's ``(A, B)`` pieces in one ``_gather_full`` call and regroup per target."""
    pieces, spans = [], []
    for t in targets:
        m = t.module
        for a in t.adapters():
            pieces.append(piece_of(m.lora_A[a], m.lora_A[a].weight))
            pieces.append(piece_of(m.lora_B[a], m.lora_B[a].weight))
            spans.append((id(t), float(m.scaling[a])))
    full = _gather_full(pieces)
    out: dict[int, Factors] = {id(t): [] for t in targets}
    for k, (tid, s) in enumerate(spans):
        out[tid].append((full[2 * k], full[2 * k + 1], s))
    return out


def state_dict_key(name: str) -> str:
    """A parameter name of the wrapped model as the PEFT model names it: FSDP / checkpoint wrapper parts
    (``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``, ``_orig_mod``) and a leading DDP-style
    ``module.`` are dropped; ``base_model.model.`` is kept (``PeftModel.save_pretrained`` expects it)."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def gathered_lora_state_dict(model: nn.Module, *, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Every trainable parameter (LoRA A/B, ``modules_to_save``) complete, as CPU copies.

    ``model``: the FSDP2 ``fully_shard``-ed PEFT model, or the root ``FullyShardedDataParallel`` around it
    (FSDP1, ``use_orig_params=True``); plain parameters are copied as they are.  Keys are the PEFT
    model's ``named_parameters()`` names (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.
    default.weight``), the form ``PeftModel.save_pretrained(dir, state_dict=...)`` expects; values have
    the parameters' full shapes and storage dtype.

    Collective: **every rank must call it**, at the same point, outside forward/backward.  It all-gathers
    the trainable parameters only (one ``all_gather`` per shard group and dtype; no base weight moves),
    over the shard group, so under HSDP every replica gathers its own copy.  The result is identical on
    every rank; with ``rank0_only=True`` ranks other than global rank 0 get ``{}`` (they still take part).

    Saving a complete adapter from the application::

        sd = gathered_lora_state_dict(model)                       # on every rank
        if torch.distributed.get_rank() == 0:
            peft_model.save_pretrained(out_dir, state_dict=sd)     # peft_model: the PeftModel inside
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    idx2 = _fsdp2_index(model)
    idx1 = _fsdp1_index(model)
    owners = []
    for n, _ in named:
        mod_name, _, attr = n.rpartition(".")
        owners.append((model.get_submodule(mod_name) if mod_name else model, attr))
    _fsdp2_settle([idx2[(id(m), a)] for m, a in owners if (id(m), a) in idx2])
    _fsdp1_settle([idx1[(id(m), a)] for m, a in owners if (id(m), a) in idx1])
    pieces = []
    for m, a in owners:
        key = (id(m), a)
        p = getattr(m, a)
        if key in idx1:
            pieces.append(idx1[key].piece())
        elif key in idx2 and type(p).__name__ == "DTensor":
            pieces.append(idx2[key].piece())
        else:
            pieces.append(_Piece(p.detach().reshape(-1), p.shape, [(0, p.numel())], None))
    full = _gather_full(pieces)
    if rank0_only and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return {state_dict_key(n): f.detach().to("cpu", copy=True) for (n, _), f in zip(named, full)}


def _peft_model(model: nn.Module) -> nn.Module:
    """The ``PeftModel`` inside ``model`` (itself under FSDP2; ``.module`` of an FSDP1 / DDP wrapper)."""
    from peft import PeftModel

    m = model
    while not isinstance(m, PeftModel):
        inner = getattr(m, "module", None)
        if not isinstance(inner, nn.Module) or inner is m:
            raise TypeError(f"no PeftModel inside {type(model).__name__}; save_adapter needs a PEFT model")
        m = inner
    return m


def _adapter_key(peft_model: nn.Module, key: str, adapter_name: str) -> str:
    """PEFT's checkpoint key for a model key (adapter name removed), through PEFT's own tuner mapping."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    tuner = PEFT_TYPE_TO_TUNER_MAPPING[peft_model.peft_config[adapter_name].peft_type]
    strip = getattr(tuner, "_remove_adapter_name_from_key", None)
    return strip(key, adapter_name) if strip is not None else key.replace(f".{adapter_name}.", ".")


def _write_adapter(peft_model: nn.Module, sd: dict[str, torch.Tensor], out_dir: Path, adapter_name: str) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` the way ``PeftModel.save_pretrained`` does,
    for LoRA keys only (``modules_to_save`` need PEFT's own module walk: refused)."""
    from safetensors.torch import save_file

    other = sorted(k for k in sd if ".lora_" not in k or f".{adapter_name}." not in k)
    if other:
        raise NotImplementedError(
            f"save_adapter under nested FSDP1 units writes LoRA factors only; trainable params {other[:3]} "
            "(modules_to_save?) would need PEFT's save_pretrained, which finds no adapter keys there"
        )
    weights = {_adapter_key(peft_model, k, adapter_name): v.contiguous() for k, v in sd.items()}
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    config.inference_mode = True
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(weights, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})


def save_adapter(
    model: nn.Module, out_dir: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
) -> bool:
    """Save a complete PEFT adapter that ``PeftModel.from_pretrained`` loads; returns whether this rank wrote.

    Collective unless ``state_dict`` (from ``gathered_lora_state_dict``) is given: every rank must call it.
    Global rank 0 writes (``PeftModel.save_pretrained(out_dir, state_dict=...)``).  Under FSDP1 with nested
    units (transformer auto-wrap) PEFT 0.21 finds no adapter keys — its module names carry
    ``_fsdp_wrapped_module`` in the middle — and would write an *empty* adapter (also through the HF
    Trainer's FULL_STATE_DICT path); there the same two files are written directly, with PEFT's key
    mapping, and the result is checked to hold every LoRA tensor.
    """
    sd = state_dict if state_dict is not None else gathered_lora_state_dict(model)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return False
    peft_model = _peft_model(model)
    out = Path(out_dir)
    nested = any(p in _WRAPPER_PARTS for n, _ in peft_model.named_modules() for p in n.split("."))
    if nested:  # PEFT's layout: non-default adapters go to a sub-folder named after them
        _write_adapter(peft_model, sd, out if adapter_name == "default" else out / adapter_name, adapter_name)
    else:
        peft_model.save_pretrained(str(out), state_dict=sd, selected_adapters=[adapter_name])
    _check_written(out, sd, adapter_name)
    return True


def _check_written(out: Path, sd: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Refuse an adapter file that lacks LoRA tensors of ``sd`` (PEFT silently writes empty ones)."""
    from safetensors import safe_open

    want = sum(1 for k in sd if ".lora_" in k and f".{adapter_name}." in k)
    sub = out / adapter_name if adapter_name != "default" else out
    with safe_open(str(sub / "adapter_model.safetensors"), framework="pt") as f:
        got = sum(1 for k in f.keys() if ".lora_" in k)
    if got < want:
        raise RuntimeError(f"PEFT wrote {got} of {want} LoRA tensors to {sub}; the adapter would be incomplete")
