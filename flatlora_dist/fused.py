"""In-place perturbation with the fused kernels: cost proportional to bytes, one host sync per step.

Same contract as ``inplace.py`` (``w' = round(w + e)``, bit-exact restore through ``Fixups`` keyed by
global index), different mechanics:

1. ``count`` kernel per region: per-program numbers of narrow/wide records, written to rows of one
   int64 buffer for the whole model (row 0 stays zero).  The weights are not touched.
2. One inclusive prefix sum over the buffer and **one host read** of the region totals, together with
   the caller's header (the engine's non-finite-norm flag and row-std statistics): the only sync of a
   step (``perturb_all``).
3. Exact-size record buffers per target, then a ``write`` kernel per region writes ``w'`` and its
   records at offsets from the prefix sum (sorted by global index, deterministic).
4. Restore: a ``restore`` kernel per region, then one ``apply_fixups`` kernel when it has records.

Overlapping regions (a ZeRO-3 partition and its persistent gathered copy) get the same noise; each
element is recorded by the first region holding it only (later regions skip the range the earlier
ones cover), so a target's records are unique per global index and ``Fixups.merge`` is not needed.
Fix-up memory is ``inplace``'s: int32 index + int16 xor (6 bytes) per narrow record for weights under
2^31 elements, index + whole value per wide one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import load_ops
from .perturbation import Fixups, NoiseKey
from .shards import Region


@dataclass
class _RegionPlan:
    region: Region
    skip: tuple[int, int]
    rows: tuple[int, int]  # its rows of the counts buffer, [lo, hi)


@dataclass
class TargetPlan:
    """One target's regions and where their counts live; ``records`` is filled after the host read."""

    key: NoiseKey
    regions: list[_RegionPlan]
    totals: list[tuple[int, int]] | None = None  # (narrow, wide) records per region
    records: tuple[torch.Tensor, ...] | None = None  # index, xor, full_index, full_values


def _skips(regions: list[Region]) -> list[tuple[int, int]]:
    """Per region, the global range earlier regions already cover (recorded there, skipped here)."""
    out, lo, hi = [], 0, 0
    for r in regions:
        if hi > lo and (r.start > hi or r.stop < lo):
            raise NotImplementedError(
                "fused perturbation needs the regions of one weight to cover a contiguous range; "
                "set FLATLORA_KERNELS=blocks"
            )
        out.append((lo, hi))
        lo, hi = (r.start, r.stop) if hi == lo else (min(lo, r.start), max(hi, r.stop))
    return out


def plan(items: list[tuple[NoiseKey, list[Region]]]) -> tuple[list[TargetPlan], int]:
    """Assign counts-buffer rows (from 1) to every non-empty region; returns the plans and the row count."""
    ops = load_ops()
    plans, row = [], 1
    for key, regions in items:
        regions = [r for r in regions if r.tensor.numel()]
        rps = []
        for r, skip in zip(regions, _skips(regions)):
            n = ops.programs(r.tensor.numel())
            rps.append(_RegionPlan(r, skip, (row, row + n)))
            row += n
        plans.append(TargetPlan(key, rps))
    return plans, row


def _std(key: NoiseKey, device: torch.device) -> torch.Tensor:
    return key.std.to(device)


def perturb_all(items: list[tuple[NoiseKey, list[Region]]], header: torch.Tensor | None,
                device: torch.device) -> tuple[list[list[int]], list[TargetPlan]]:
    """Count, read back once, and — when the header's first value is non-zero — write every region.

    ``header``: int64 ``(h, 2)`` device values the caller needs on the host (the engine packs its
    non-finite flag and the row-std statistics), read in the same transfer as the record totals;
    ``None`` = write.  ``device``: where the counts live when no region exists (else the regions').
    Returns ``(header values, plans)``; nothing is written when ``header[0][0] == 0``.  ``fixups(plan)``
    gives each target's records.
    """
    ops = load_ops()
    plans, rows = plan(items)
    device = next((rp.region.tensor.device for p in plans for rp in p.regions), device)  # the weights' device
    counts = torch.zeros(rows, 2, dtype=torch.int64, device=device)
    for p in plans:
        for rp in p.regions:
            r, k = rp.region, p.key
            ops.count(r.tensor, _std(k, r.tensor.device), counts[rp.rows[0] : rp.rows[1]], r.start,
                      k.layout.cols, k.seed64, rp.skip, k.layout.out_axis)
    incl = counts.cumsum(0)
    ends = [rp.rows[1] - 1 for p in plans for rp in p.regions]
    head = torch.ones(1, 2, dtype=torch.int64, device=device) if header is None else header.to(device)
    host = host_read(torch.cat([head, torch.stack([incl[e] for e in ends])]) if ends else head)
    head_values, totals = host[: head.shape[0]], host[head.shape[0] :]
    if not head_values[0][0]:
        return head_values, plans
    prev, at = [0, 0], 0
    for p in plans:
        p.totals = []
        for _ in p.regions:
            cur = totals[at]
            p.totals.append((cur[0] - prev[0], cur[1] - prev[1]))
            prev, at = cur, at + 1
    _write_all(plans, counts, incl)
    return head_values, plans


def host_read(t: torch.Tensor) -> list:
    """The one device-to-host read of a step (an explicit copy to the CPU, then Python numbers)."""
    return t.to("cpu", copy=True).tolist()


def _write_all(plans: list[TargetPlan], counts: torch.Tensor, incl: torch.Tensor) -> None:
    """Pass 2 for every region; on failure, undo the regions written so far and re-raise."""
    ops = load_ops()
    done: list[tuple[TargetPlan, int]] = []
    try:
        for p in plans:
            p.records = _alloc(p)
            for i, rp in enumerate(p.regions):
                r, k = rp.region, p.key
                lo, hi = rp.rows
                ops.write(r.tensor, _std(k, r.tensor.device), counts[lo:hi], incl[lo:hi],
                          incl[p.regions[0].rows[0] - 1], p.records, r.start, k.layout.cols, k.seed64,
                          rp.skip, k.layout.out_axis)
                done.append((p, i))
    except BaseException:
        for p, i in reversed(done):
            restore_region(p.regions[i].region, p.key, fixups(p, upto=i + 1))
        raise


def _alloc(p: TargetPlan) -> tuple[torch.Tensor, ...]:
    """Exact-size record buffers (index, xor, full_index, full_values) for a target (no kernel launch)."""
    nar = sum(t[0] for t in p.totals)
    wid = sum(t[1] for t in p.totals)
    dev = p.regions[0].region.tensor.device if p.regions else p.key.std.device
    dtype = p.regions[0].region.tensor.dtype if p.regions else torch.float32
    it = torch.int32 if p.key.layout.numel < 2**31 else torch.int64
    return (torch.empty(nar, dtype=it, device=dev), torch.empty(nar, dtype=torch.int16, device=dev),
            torch.empty(wid, dtype=it, device=dev), torch.empty(wid, dtype=dtype, device=dev))


def fixups(p: TargetPlan, upto: int | None = None) -> Fixups | None:
    """The target's records (of its first ``upto`` regions), or ``None`` when there are none."""
    if not p.regions:
        return None
    totals = p.totals[: len(p.regions) if upto is None else upto]
    nar, wid = sum(t[0] for t in totals), sum(t[1] for t in totals)
    if nar + wid == 0:
        return None
    idx, xor, fidx, fval = p.records
    return Fixups(idx[:nar], xor[:nar], fidx[:wid], fval[:wid])


def restore_region(region: Region, key: NoiseKey, fix: Fixups | None) -> None:
    """Undo the fused perturbation of ``region`` bit-exactly (subtract, then patch its records)."""
    t = region.tensor
    if t.numel() == 0:
        return
    ops = load_ops()
    ops.restore(t, _std(key, t.device), region.start, key.layout.cols, key.seed64, key.layout.out_axis)
    if fix is not None and fix.count:
        ops.apply_fixups(t, region.start, fix.index, fix.xor, fix.full_index, fix.full_values)
