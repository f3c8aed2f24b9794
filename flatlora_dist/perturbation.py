"""What one perturbation is made of, whichever mode (in-place, functional) and noise scheme (blocks,
fused) applies it: :class:`NoiseKey` (everything that determines a target's noise at a step) and
:class:`Fixups` (the records that make the restore bit-exact), and the arithmetic precision of ``w ± e``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import load_ops
from .layout import RowLayout
from .noise import key_seed, noise_chunks


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic precision for ``w ± e``: float64 for float64 storage, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class NoiseKey:
    """Everything that determines one target's noise at one step (``std``: per output feature;
    ``fused``: drawn by the fused scheme's kernels instead of ``noise_chunks``' blocks)."""

    seed: int
    step: int
    name: str
    layout: RowLayout
    std: torch.Tensor
    fused: bool = False

    @property
    def seed64(self) -> int:
        """The fused scheme's Philox key for this weight and step."""
        return key_seed(self.seed, self.step, self.name)

    def chunks(self, start: int, stop: int, device: torch.device):
        """Scaled noise ``std[out(k)]·z_k`` for global ``[start, stop)``, chunk by chunk (float32), in the
        key's scheme (the values the kernels add; for references and tests under the fused scheme)."""
        std = self.std.to(device)
        if self.fused:  # one piece: the fused scheme has no blocks
            yield start, self.layout.scale_(load_ops().noise(self.seed64, start, stop, device), start, std)
            return
        for lo, z in noise_chunks(self.seed, self.step, self.name, self.layout.numel, start, stop, device):
            yield lo, self.layout.scale_(z, lo, std)


@dataclass
class Fixups:
    """Patches for the elements whose round trip is not exact, by *global* flat index.

    Keyed globally so that any region holding an element (a partition, a gathered copy) gets patched.
    Most records are ``(index, xor)``: the low 16 bits of ``bits(w) ^ bits(back)``, where ``back`` is
    the restore's ``round(w' - e)`` (recomputed bit for bit), so the patch is ``bits ^= xor``: 6 bytes
    per element for float32 instead of 8.  Elements whose difference reaches higher bits (the noise is
    more than ~2^15 times the weight, or ``back`` crossed a binade) keep their original value in
    ``full_index``/``full_values``.  Indices are int32 for weights under 2^31 elements, else int64.
    """

    index: torch.Tensor
    xor: torch.Tensor
    full_index: torch.Tensor
    full_values: torch.Tensor

    @property
    def count(self) -> int:
        return self.index.numel() + self.full_index.numel()

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.index, self.xor, self.full_index, self.full_values)
        )

    @staticmethod
    def merge(parts: list[Fixups]) -> Fixups | None:
        """One record per global index (regions that overlap report the same elements)."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        dev = parts[0].index.device
        idx, xor = _unique_records([p.index for p in parts], [p.xor for p in parts])
        fidx, fval = _unique_records([p.full_index for p in parts], [p.full_values for p in parts])
        return Fixups(idx.to(dev), xor.to(dev), fidx.to(dev), fval.to(dev))


def _unique_records(
    indices: list[torch.Tensor], values: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``(index, value)`` records (on CPU), keeping the first record of each index."""
    idx = torch.cat([i.cpu() for i in indices])
    val = torch.cat([v.cpu() for v in values])
    uniq, inverse = torch.unique(idx.long(), return_inverse=True)
    pos = torch.arange(idx.numel())
    first = torch.full((uniq.numel(),), idx.numel(), dtype=torch.long).scatter_reduce_(
        0, inverse, pos, "amin"
    )
    return uniq.to(idx.dtype), val[first]
