"""Geometry of a stored weight: which output feature ("filter") each flat element belongs to.

A LoRA-wrapped linear stores its weight as ``(rows, cols)``.  For ``nn.Linear`` the output features
are the rows (``out_axis=0``); for ``fan_in_fan_out`` layers (GPT-2 ``Conv1D``) they are the columns
(``out_axis=1``).  Every helper takes a 1-D slice of the flattened storage plus its global start, so it
works on any shard without materialising anything of the weight's size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLayout:
    """Storage shape ``(rows, cols)`` and which axis indexes output features (0 or 1)."""

    rows: int
    cols: int
    out_axis: int = 0

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def out_features(self) -> int:
        return self.rows if self.out_axis == 0 else self.cols

    @property
    def in_features(self) -> int:
        return self.cols if self.out_axis == 0 else self.rows

    def segments(self, start: int, length: int) -> Iterator[tuple[int, int, int, int, int]]:
        """Split flat ``[start, start+length)`` into row-aligned pieces.

        Yields ``(offset, row, col, nrows, ncols)``: the piece begins at ``offset`` in the slice and
        covers either part of one storage row (``nrows == 1``, columns ``col..col+ncols``) or
        ``nrows`` whole rows (``col == 0``, ``ncols == cols``).
        """
        pos, stop, c = start, start + length, self.cols
        while pos < stop:
            row, col = divmod(pos, c)
            if col or stop - pos < c:
                n = min(stop, (row + 1) * c) - pos
                yield pos - start, row, col, 1, n
                pos += n
            else:
                nrows = (stop - pos) // c
                yield pos - start, row, 0, nrows, c
                pos += nrows * c

    def scale_(self, values: torch.Tensor, start: int, per_out: torch.Tensor) -> torch.Tensor:
        """In place: ``values[k] *= per_out[out(start + k)]``; ``values`` is 1-D, ``per_out`` (out_features,)."""
        for off, row, col, nrows, ncols in self.segments(start, values.numel()):
            piece = values[off : off + nrows * ncols]
            if self.out_axis == 0:
                piece.view(nrows, ncols).mul_(per_out[row : row + nrows, None])
            else:
                piece.view(nrows, ncols).mul_(per_out[None, col : col + ncols])
        return values

    def add_sumsq_(self, acc: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        """In place: ``acc[i] += sum of values[k]**2 over k with out(start + k) == i``."""
        for off, row, col, nrows, ncols in self.segments(start, values.numel()):
            sq = values[off : off + nrows * ncols].view(nrows, ncols).float().square()
            if self.out_axis == 0:
                acc[row : row + nrows] += sq.sum(dim=1)
            else:
                acc[col : col + ncols] += sq.sum(dim=0)
        return acc

    def delta_slice(self, factors: list[tuple[torch.Tensor, torch.Tensor, float]], start: int, stop: int) -> torch.Tensor:
        """``s·(B·A)`` in storage layout for flat ``[start, stop)``, float32, summed over adapters.

        ``factors`` holds full ``(A (r, in), B (out, r), s)`` per active adapter.  Only the storage rows
        the range touches are formed (at most ``stop-start + 2·cols`` elements).
        """
        r0, r1 = start // self.cols, (stop - 1) // self.cols + 1
        out = None
        for a, b, s in factors:
            a32, b32 = a.float(), b.float()
            if self.out_axis == 0:
                d = b32[r0:r1] @ a32
            else:
                d = (b32 @ a32[:, r0:r1]).t()
            d = d * s
            out = d if out is None else out.add_(d)
        if out is None:
            raise ValueError("delta_slice needs at least one (A, B, scaling) factor")
        base = r0 * self.cols
        return out.reshape(-1)[start - base : stop - base]
