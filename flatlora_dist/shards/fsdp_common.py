"""What FSDP1 and FSDP2 share: a tensor's shard as a ``Piece``, gathering pieces, and the backend
skeleton that finds the FSDP entry of a module's parameter.

A ``Piece`` is the geometry every FSDP layout reduces to: this rank's 1-D elements of a tensor and the
global flat range each rank of the shard group holds.  ``gather_full`` turns pieces into complete
tensors with one ``all_gather`` per (group, dtype).  Each family module (``fsdp1``, ``fsdp2``) says only
how its storage maps to pieces (its ``Entry.piece``), how to find entries (``index``) and how to reshard
units a forward left unsharded (``settle``); ``FSDPBackend`` does the rest, once for both.

Collectives: ``gather_full`` (so ``lora_factors`` and ``full_copies``); everything else is local.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from ..targets import LoraTarget
from .base import Factors, ShardBackend


# ====================================================================================== geometry
@dataclass
class Piece:
    """One tensor sharded over ``group``: this rank's elements and every group rank's global range.

    ``local`` is 1-D (this rank's elements, possibly empty); ``covers[q] = (start, length)`` is the
    global flat range group rank ``q`` holds (lengths sum to ``shape.numel()``, ranges disjoint).
    ``group is None`` means the tensor is whole on every rank (``covers == [(0, numel)]``).
    """

    local: torch.Tensor
    shape: torch.Size
    covers: list[tuple[int, int]]
    group: Any = None

    @classmethod
    def whole(cls, tensor: torch.Tensor) -> Piece:
        """A tensor every rank holds whole."""
        return cls(tensor.detach().reshape(-1), tensor.shape, [(0, tensor.numel())], None)


def row_covers(shape: torch.Size, ws: int) -> list[tuple[int, int]]:
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


def gather_full(pieces: list[Piece]) -> list[torch.Tensor]:
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


def _gather_bucket(pieces: list[Piece], group, dtype: torch.dtype, out: list, idx: list[int]) -> None:
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


def same_group(a, b) -> bool:
    """Whether two process groups span the same ranks (FSDP units may hold distinct equal groups)."""
    if a is b:
        return True
    if a is None or b is None:
        return False
    return dist.get_process_group_ranks(a) == dist.get_process_group_ranks(b)


# ====================================================================================== the backend skeleton
class Entry(Protocol):
    """One FSDP-managed parameter: where it is registered and this rank's piece of it."""

    module: nn.Module
    attr: str

    def piece(self) -> Piece: ...


class FSDPBackend(ShardBackend):
    """What FSDP1 and FSDP2 backends share: entries found by ``(module, attribute)``, LoRA factors and
    complete copies gathered from pieces.  Subclasses set ``_unmanaged`` (the error text) and implement
    ``_index`` (every managed parameter of ``model``), ``_settle`` (reshard entries' units) and
    ``_sharded_piece`` (the piece of a parameter as it is registered now, or ``None`` if whole)."""

    _unmanaged = "is managed by no FSDP unit of the model"
    """Why a base weight has no entry, and the fix (completes "base weight of 'name' ...")."""

    def __init__(self, model=None) -> None:
        super().__init__(model)
        self._entries: dict[tuple[int, str], Entry] | None = None
        self._group = None

    # ------------------------------------------------------------------ family hooks
    @staticmethod
    def _index(model: nn.Module) -> dict[tuple[int, str], Entry]:
        raise NotImplementedError

    @staticmethod
    def _settle(entries: list[Entry]) -> None:
        raise NotImplementedError

    def _sharded_piece(self, entry: Entry, tensor: torch.Tensor) -> Piece | None:
        return entry.piece()

    # ------------------------------------------------------------------ lookup
    def _entry(self, module: nn.Module, name: str) -> Entry | None:
        """The entry of ``module.<name>``, or ``None`` when no FSDP unit of the model manages it."""
        # a module that is its own FSDP1 unit (the HF Trainer's PEFT auto-wrap policy wraps every LoRA Linear)
        # sits behind its FullyShardedDataParallel wrapper in the parent's ModuleDict
        module = getattr(module, "_fsdp_wrapped_module", module)
        return self._lookup().get((id(module), name))

    def _lookup(self) -> dict[tuple[int, str], Entry]:
        if self._entries is None:
            self._entries = self._index(self.model)
        return self._entries

    def _all_entries(self) -> list[Entry]:
        return list(self._lookup().values())

    def _weight_entry(self, target: LoraTarget) -> Entry:
        e = self._entry(target.base, "weight")
        if e is None:
            raise ValueError(f"base weight of {target.name!r} {self._unmanaged}")
        return e

    def _factor_entries(self, targets: list[LoraTarget]) -> list[Entry]:
        """The entries of every active adapter's ``lora_A`` / ``lora_B`` weight (whole ones have none)."""
        out = []
        for t in targets:
            for a in t.adapters():
                for mod in (t.module.lora_A[a], t.module.lora_B[a]):
                    e = self._entry(mod, "weight")
                    if e is not None:
                        out.append(e)
        return out

    def _piece(self, entry: Entry | None, tensor: torch.Tensor) -> Piece:
        """``tensor``'s piece: sharded through its entry, else whole."""
        piece = self._sharded_piece(entry, tensor) if entry is not None else None
        return piece if piece is not None else Piece.whole(tensor)

    def _piece_of(self, module: nn.Module, tensor: torch.Tensor) -> Piece:
        return self._piece(self._entry(module, "weight"), tensor)

    def reduce_group(self):
        """The process group of the weights' shard dimension (never an HSDP replicate dimension);
        ``None`` when weights are whole on every rank."""
        return self._group

    @contextmanager
    def lora_factors(self, targets: list[LoraTarget]) -> Iterator[dict[int, Factors]]:
        """Full ``(A, B, s)`` for every target from the local pieces: one ``all_gather`` per dtype over
        the shard group (no base weight is gathered).  Collective; yields fresh copies (safe to keep)."""
        self._settle(self._factor_entries(targets))
        yield factors_from(targets, self._piece_of)

    # ------------------------------------------------------------------ any parameter
    def settle(self) -> None:
        """Reshard every unit of ``self.model`` that a forward left unsharded (local)."""
        self._settle(self._all_entries())

    def full_copies(self, params: list[torch.Tensor], *, keep: bool = True) -> list[torch.Tensor] | None:
        """Complete CPU copies from the pieces: one ``all_gather`` per (shard group, dtype); no other
        parameter moves.  Collective over the shard group (under HSDP every replica gathers its own)."""
        owner = {id(getattr(e.module, e.attr)): e for e in self._all_entries()}
        full = gather_full([self._piece(owner.get(id(p)), p) for p in params])
        return [f.detach().to("cpu", copy=True) for f in full] if keep else None


def factors_from(targets: list[LoraTarget], piece_of) -> dict[int, Factors]:
    """Gather every target's ``(A, B)`` pieces in one ``gather_full`` call and regroup per target."""
    pieces, spans = [], []
    for t in targets:
        m = t.module
        for a in t.adapters():
            pieces.append(piece_of(m.lora_A[a], m.lora_A[a].weight))
            pieces.append(piece_of(m.lora_B[a], m.lora_B[a].weight))
            spans.append((id(t), float(m.scaling[a])))
    full = gather_full(pieces)
    out: dict[int, Factors] = {id(t): [] for t in targets}
    for k, (tid, s) in enumerate(spans):
        out[tid].append((full[2 * k], full[2 * k + 1], s))
    return out
