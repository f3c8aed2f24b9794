"""In-place perturbation with the fused kernels: cost proportional to bytes, one host sync per step.

Same contract as ``inplace.py`` (``w' = round(w + e)``, bit-exact restore through ``Fixups`` keyed by
global index), different mechanics (noise: ``kernels/triton_kernels.py``, fused scheme v2):

1. One ``perturb`` kernel per region, one pass: it draws each value once, writes ``w'`` and appends
   its narrow/wide records to the target's pre-sized buffers through two device counters (a program
   whose records do not fit writes nothing: see 3).  Capacities come from the previous step's totals
   (``hints``: x1.25 plus a margin) or, the first time, from the size (1/16 of the elements).  The
   caller's header gates the kernels on the device: when its first value is 0 (a non-finite norm)
   nothing is written.
2. **One host read** of the header (the engine's non-finite flag and row-std statistics) and of every
   target's two counters: the only sync of a step (``perturb_all``).
3. Fallback, only for a target whose counters exceed its capacity: bigger buffers (the written records
   copied in, unused slots index -1), and a second ``perturb`` launch per region for just the programs
   that wrote nothing (their ``done`` flag); no further sync, since the counters already give the totals.
4. Restore: a ``restore`` kernel per region (the second draw of each value), then one ``apply_fixups``
   kernel when it has records.

Records are in no particular order (reservation order).  Overlapping regions (a ZeRO-3 partition and its
persistent gathered copy) get the same noise; each element is recorded by the first region holding it
only (later regions skip the range the earlier ones cover), so a target's records are unique per global
index and ``Fixups.merge`` is not needed.  Fix-up memory is ``inplace``'s per record (int32 index +
int16 xor for weights under 2^31 elements, index + whole value per wide one), times the capacity
margin: the buffers are the capacity, the ``Fixups`` are views of their used part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import load_ops
from .perturbation import Fixups, NoiseKey
from .shards import Region

MARGIN = 1.25
"""Capacity over the previous step's record count (the noise std only ramps slowly between steps)."""
SLACK = (256, 64)
"""Records added to every (narrow, wide) capacity."""
UNSET = 2**62
"""``write_kernel``'s ``UNSET``: its second counter is ``UNSET - first failing reservation`` (0: none)."""


@dataclass
class _RegionPlan:
    region: Region
    skip: tuple[int, int]
    rows: tuple[int, int]  # its ``done`` flags, [lo, hi)


@dataclass
class TargetPlan:
    """One target's regions, its record buffers and what the host read says about them."""

    key: NoiseKey
    regions: list[_RegionPlan]
    capacity: tuple[int, int] = (0, 0)
    records: tuple[torch.Tensor, ...] | None = None  # index, xor, full_index, full_values
    used: tuple[int, int] = (0, 0)  # (narrow, wide) slots of ``records`` in use (holes included)
    totals: tuple[int, int] = (0, 0)  # exact (narrow, wide) record counts of the step
    launched: int = 0  # regions whose kernel was launched (all of them unless a launch failed)


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


def capacity(numel: int, dtype: torch.dtype, hint: tuple[int, int] | None) -> tuple[int, int]:
    """(narrow, wide) record capacity of a target: the previous totals x ``MARGIN`` + ``SLACK``, or a guess
    from the size: 1/16 of the elements narrow (records are 3-8 % of the elements at sigma 0.05 and full
    ramp, fewer early in the ramp; more fall back once), wide ones only in float32, 1/64 reserved."""
    if hint is not None:
        return tuple(int(h * MARGIN) + s for h, s in zip(hint, SLACK))
    return numel // 16 + SLACK[0], (numel // 64 if dtype == torch.float32 else 0) + SLACK[1]


def plan(items: list[tuple[NoiseKey, list[Region]]], hints: dict[str, tuple[int, int]] | None = None
         ) -> tuple[list[TargetPlan], int]:
    """Plan every non-empty region (``done`` rows, skips) and every target's capacity; returns the plans
    and the number of ``done`` flags."""
    ops = load_ops()
    plans, row = [], 0
    for key, regions in items:
        regions = [r for r in regions if r.tensor.numel()]
        rps = []
        for r, skip in zip(regions, _skips(regions)):
            n = ops.programs_at(r.tensor.numel(), r.start)
            rps.append(_RegionPlan(r, skip, (row, row + n)))
            row += n
        dtype = regions[0].tensor.dtype if regions else torch.float32
        covered = max((r.stop for r in regions), default=0) - min((r.start for r in regions), default=0)
        plans.append(TargetPlan(key, rps, capacity(covered, dtype, (hints or {}).get(key.name))))
    return plans, row


def _std(key: NoiseKey, device: torch.device) -> torch.Tensor:
    return key.std.to(device)


def perturb_all(items: list[tuple[NoiseKey, list[Region]]], header: torch.Tensor | None, device: torch.device,
                hints: dict[str, tuple[int, int]] | None = None) -> tuple[list[list[int]], list[TargetPlan]]:
    """Perturb every region in one pass, then read back once; nothing is written when the header's first
    value is 0.

    ``header``: int64 ``(h, 2)`` device values the caller needs on the host (the engine packs its
    non-finite flag and the row-std statistics), read in the same transfer as the record counters;
    ``None`` = write.  ``device``: where the counters live when no region exists (else the regions').
    ``hints``: each target's ``totals`` of the previous step, by name (capacities).  Returns ``(header
    values, plans)``; ``fixups(plan)`` gives each target's records.
    """
    plans, rows = plan(items, hints)
    device = next((rp.region.tensor.device for p in plans for rp in p.regions), device)  # the weights' device
    head = torch.ones(1, 2, dtype=torch.int64, device=device) if header is None else header.to(device)
    counters = torch.zeros(max(len(plans), 1), 2, dtype=torch.int64, device=device)
    done = torch.zeros(max(rows, 1), dtype=torch.int8, device=device)
    try:
        for p, ctr in zip(plans, counters):
            p.records = _alloc(p, p.capacity)
            for rp in p.regions:
                _launch(p, rp, head, ctr, done, p.records, redo=False)
                p.launched += 1
    except BaseException:
        _undo(plans, host_read(torch.cat([head, counters])), head, done)
        raise
    host = host_read(torch.cat([head, counters]))
    head_values, totals = host[: head.shape[0]], host[head.shape[0] :]
    if head_values[0][0]:
        for p, t in zip(plans, totals):
            _settle(p, t, head, done)
    return head_values, plans


def _launch(p: TargetPlan, rp: _RegionPlan, go: torch.Tensor, ctr: torch.Tensor, done: torch.Tensor,
            records: tuple[torch.Tensor, ...], redo: bool) -> None:
    r, k = rp.region, p.key
    load_ops().perturb(r.tensor, _std(k, r.tensor.device), go, ctr, done[rp.rows[0] : rp.rows[1]], records, r.start,
                       k.layout.cols, k.seed64, rp.skip, k.layout.out_axis, redo)


def _unpack(v: int) -> tuple[int, int]:
    """A packed counter value: (narrow, wide) = (low 32 bits, high 32 bits)."""
    return v & 0xFFFFFFFF, v >> 32


def _settle(p: TargetPlan, counters: list[int], go: torch.Tensor, done: torch.Tensor) -> None:
    """Read the target's counters (``write_kernel``: packed totals, first failure); when a program did not
    fit, run the fallback: buffers of ``valid + totals`` slots (the valid prefix copied, the rest index -1)
    and a ``redo`` pass of the programs that wrote nothing, into the tail, with fresh counters (it fits:
    those programs' records are part of ``totals``)."""
    p.totals = _unpack(counters[0])
    if not counters[1]:
        p.used = p.totals
        return
    kept = _unpack(UNSET - counters[1])
    old = p.records
    size = tuple(k + t for k, t in zip(kept, p.totals))
    new = _alloc(p, size, fill=True)
    at = (kept[0], kept[0], kept[1], kept[1])
    for o, n, k in zip(old, new, at):
        n[:k].copy_(o[:k])
    tail = tuple(n[k:] for n, k in zip(new, at))
    ctr = torch.zeros(2, dtype=torch.int64, device=go.device)
    for rp in p.regions[: p.launched]:
        _launch(p, rp, go, ctr, done, tail, redo=True)
    p.records, p.capacity, p.used = new, size, size


def _undo(plans: list[TargetPlan], host: list, go: torch.Tensor, done: torch.Tensor) -> None:
    """After a failed launch (``host``: the header's first row, then the counters): complete the regions
    already launched (fallback included), then restore them; nothing was written when the header said 0."""
    if not host[0][0]:
        return
    for p, t in zip(plans, host[go.shape[0] :]):
        if p.launched:
            _settle(p, t, go, done)
            fix = fixups(p)
            for rp in p.regions[: p.launched]:
                restore_region(rp.region, p.key, fix)


def host_read(t: torch.Tensor) -> list:
    """The one device-to-host read of a step (an explicit copy to the CPU, then Python numbers)."""
    return t.to("cpu", copy=True).tolist()


def _alloc(p: TargetPlan, size: tuple[int, int], fill: bool = False) -> tuple[torch.Tensor, ...]:
    """Record buffers (index, xor, full_index, full_values) of ``size`` (narrow, wide) slots; ``fill``: the
    indices start at -1 (unused slots patch nothing)."""
    nar, wid = size
    dev = p.regions[0].region.tensor.device if p.regions else p.key.std.device
    dtype = p.regions[0].region.tensor.dtype if p.regions else torch.float32
    it = torch.int32 if p.key.layout.numel < 2**31 else torch.int64
    make = (lambda n: torch.full((n,), -1, dtype=it, device=dev)) if fill else (
        lambda n: torch.empty(n, dtype=it, device=dev))
    return (make(nar), torch.empty(nar, dtype=torch.int16, device=dev),
            make(wid), torch.empty(wid, dtype=dtype, device=dev))


def fixups(p: TargetPlan) -> Fixups | None:
    """The target's records (views of the used part of its buffers), or ``None`` when there are none."""
    if not p.regions or p.records is None:
        return None
    nar, wid = p.used
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
