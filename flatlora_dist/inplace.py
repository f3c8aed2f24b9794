"""In-place perturbation of dense base weights, with bit-exact restore.

``w' = round(w + e)`` is written into the weight's storage; ``round(w' - e)`` equals ``w`` except for
rare elements whose rounding crossed a binade.  Those are found at perturb time (the round trip is
computed then) and their original values kept as ``(index, value)`` fix-ups, patched on restore.  The
noise ``e`` is regenerated for the restore from the same key and the same per-row std, so nothing of
the weight's size is kept between the two halves.  Transient memory: a few tensors of one noise chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import RowLayout
from .noise import noise_chunks
from .shards import Region

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic precision for ``w ± e``: float64 for float64 storage, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class NoiseKey:
    """Everything that determines one target's noise at one step (``std``: per output feature)."""

    seed: int
    step: int
    name: str
    layout: RowLayout
    std: torch.Tensor

    def chunks(self, start: int, stop: int, device: torch.device):
        """Scaled noise ``std[out(k)]·z_k`` for global ``[start, stop)``, chunk by chunk (float32)."""
        std = self.std.to(device)
        for lo, z in noise_chunks(self.seed, self.step, self.name, self.layout.numel, start, stop, device):
            yield lo, self.layout.scale_(z, lo, std)


@dataclass
class Fixups:
    """Original values of the elements whose round trip is not exact, by *global* flat index.

    Keyed globally so that any region holding an element (a partition, a gathered copy) gets patched.
    """

    index: torch.Tensor
    values: torch.Tensor

    @property
    def count(self) -> int:
        return self.index.numel()

    @property
    def nbytes(self) -> int:
        return self.index.numel() * self.index.element_size() + self.values.numel() * self.values.element_size()

    @staticmethod
    def merge(parts: list[Fixups]) -> Fixups | None:
        """One record per global index (regions that overlap report the same elements)."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        idx = torch.cat([p.index.cpu().long() for p in parts])
        val = torch.cat([p.values.cpu() for p in parts])
        uniq, first = _first_occurrence(idx)
        dev = parts[0].index.device
        return Fixups(uniq.to(dev), val[first].to(dev))


def _first_occurrence(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    uniq, inverse = torch.unique(idx, return_inverse=True)
    pos = torch.arange(idx.numel())
    first = torch.full((uniq.numel(),), idx.numel(), dtype=torch.long).scatter_reduce_(0, inverse, pos, "amin")
    return uniq, first


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.element_size()])


def perturb_region(region: Region, key: NoiseKey) -> Fixups | None:
    """Add the key's noise to ``region`` in place; return the fix-ups (global indices) its restore needs."""
    t = region.tensor
    if t.numel() == 0:
        return None
    cd = compute_dtype(t.dtype)
    bad_idx, bad_val = [], []
    for lo, e in key.chunks(region.start, region.stop, t.device):
        off = lo - region.start
        w = t[off : off + e.numel()]
        e = e.to(cd)
        new = (w.to(cd) + e).to(t.dtype)
        back = (new.to(cd) - e).to(t.dtype)
        bad = (_bits(back) != _bits(w)).nonzero().view(-1)
        if bad.numel():
            bad_idx.append(bad + lo)
            bad_val.append(w[bad].clone())
        w.copy_(new)
    if not bad_idx:
        return None
    index = torch.cat(bad_idx)
    if key.layout.numel < 2**31:  # halves the fix-up index memory for every realistic layer
        index = index.to(torch.int32)
    return Fixups(index, torch.cat(bad_val))


def restore_region(region: Region, key: NoiseKey, fixups: Fixups | None) -> None:
    """Undo ``perturb_region`` bit-exactly: subtract the regenerated noise, then patch the fix-ups."""
    t = region.tensor
    if t.numel() == 0:
        return
    cd = compute_dtype(t.dtype)
    for lo, e in key.chunks(region.start, region.stop, t.device):
        off = lo - region.start
        w = t[off : off + e.numel()]
        w.copy_((w.to(cd) - e.to(cd)).to(t.dtype))
    if fixups is not None:
        inside = (fixups.index >= region.start) & (fixups.index < region.stop)
        t[fixups.index[inside].long() - region.start] = fixups.values[inside].to(t.device)
