"""In-place perturbation of dense base weights, with bit-exact restore.

``w' = round(w + e)`` is written into the weight's storage; restore computes ``back = round(w' - e)``,
which equals ``w`` except where the noise is larger than the weight (the rounding at the noise's scale
drops ``w``'s low bits: 3-7% of elements at sigma 0.05).  Perturb computes the same round trip, so it
knows those elements in advance and keeps a fix-up for each (``Fixups``).  The noise ``e`` is
regenerated for the restore from the same key and the same per-row std, so nothing of the weight's size
is kept between the two halves.  Transient memory: a few tensors of one noise chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from . import native as _native
from . import roundtrip
from .noise import Scratch, run_ordered, threads_pay
from .perturbation import Fixups, NoiseKey, compute_dtype
from .shards import Region

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.element_size()])


def _low16(x: torch.Tensor) -> torch.Tensor:
    """The low 16 bits of each integer of ``x``, as the int16 with that bit pattern."""
    if x.element_size() == 2:
        return x
    low = x & 0xFFFF
    return (low - (low >> 15) * 0x10000).to(torch.int16)  # in int16 range: the cast is exact


def _widen16(x16: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``_low16``: int16 bit patterns as ``dtype`` integers with the high bits zero."""
    if dtype == torch.int16:
        return x16
    return x16.to(dtype) & 0xFFFF


def _kernels(region: Region, key: NoiseKey, use: bool | None):
    """The native round-trip library for this region, or ``None`` for the torch path.

    ``use``: ``None`` = when available (``FLATLORA_NATIVE``) and the region qualifies (CPU, contiguous
    float32/bfloat16/float16, blocks scheme); ``True`` = required (one clear error if impossible);
    ``False`` = the torch path.  Both paths give bit-identical weights and records.
    """
    if use is False or key.fused:
        if use and key.fused:
            raise ValueError("native round-trip kernels implement the blocks scheme, not the fused one")
        return None
    ok = roundtrip.supports(region.tensor, key.std)
    if use and not ok:
        t = region.tensor
        raise ValueError(f"native round-trip kernels need a contiguous CPU float32/bfloat16/float16 region "
                         f"and a float32 std, got {t.dtype} on {t.device} (contiguous={t.is_contiguous()}) "
                         f"and std {key.std.dtype}; pass native=None to fall back")  # fmt: skip
    lib = _native.load() if ok else None
    if use and lib is None:
        raise RuntimeError(f"native round-trip kernels requested but {_native.ENV}=off")
    return lib


def perturb_region(region: Region, key: NoiseKey, native: bool | None = None) -> Fixups | None:
    """Add the key's noise to ``region`` in place; return the fix-ups (global indices) its restore needs.

    ``native``: use the fused C pass (``roundtrip.py``); ``None`` = when available (see ``_kernels``).
    """
    return perturb_regions([(region, key)], native)[0]


def perturb_regions(jobs: list[tuple[Region, NoiseKey]], native: bool | None = None) -> list[Fixups | None]:
    """``perturb_region`` for every ``(region, key)``, returning their fix-ups in order.

    The native jobs' chunks run as one stream on the draw threads (no draining between regions: a step
    has hundreds of weights of a few blocks each).  All or nothing: when anything fails, every chunk
    already written is restored before the exception propagates, so the regions hold the clean weight.
    """
    out: list[Fixups | None] = [None] * len(jobs)
    written: list[tuple[Region, NoiseKey, Fixups | None]] = []  # what to undo on failure
    stream: list[tuple[int, Callable]] = []
    done: list = []  # per stream task: filled by the task itself, so an undo sees every write
    scratch, numel = Scratch(), 0
    try:
        for i, (region, key) in enumerate(jobs):
            if region.tensor.numel() == 0:
                continue
            lib = _kernels(region, key, native)
            if lib is None:
                out[i] = _perturb_torch(region, key)
                written.append((region, key, out[i]))
            else:
                stream += [(i, task) for task in roundtrip.perturb_tasks(lib, region, key, scratch)]
                numel += region.tensor.numel()
        done += [None] * len(stream)

        def run(j: int, task: Callable):
            done[j] = task()

        for _ in run_ordered([partial(run, j, task) for j, (_, task) in enumerate(stream)], threads_pay(numel)):
            pass
    except BaseException:
        for j, res in enumerate(done):
            if res is not None:
                lo, n, rec = res
                region, key = jobs[stream[j][0]]
                written.append((_sub(region, lo, n), key, None if rec is None else Fixups(*rec)))
        restore_regions(written, native)
        raise
    chunks: dict[int, list] = {}
    for (i, _), (_, _, rec) in zip(stream, done):
        chunks.setdefault(i, []).append(rec)
    for i, recs in chunks.items():
        records = roundtrip.concat(recs)
        out[i] = None if records is None else Fixups(*records)
    return out


def _sub(region: Region, lo: int, n: int) -> Region:
    """Global elements ``[lo, lo + n)`` of ``region`` as a region of their own."""
    off = lo - region.start
    return Region(region.tensor[off : off + n], lo)


def _perturb_torch(region: Region, key: NoiseKey) -> Fixups | None:
    """The torch path of ``perturb_region`` (several passes per chunk; any device and dtype)."""
    t = region.tensor
    cd = compute_dtype(t.dtype)
    records: list[tuple[torch.Tensor, ...]] = []
    for lo, e in key.chunks(region.start, region.stop, t.device):
        off = lo - region.start
        w = t[off : off + e.numel()]
        e = e.to(cd)
        new = (w.to(cd) + e).to(t.dtype)
        back = torch.sub(new, e, out=e) if cd == t.dtype else (new.to(cd) - e).to(t.dtype)
        bw, bb = _bits(w), _bits(back)
        bad = torch.ne(bb, bw).nonzero().view(-1)
        if bad.numel():
            records.append(_records(bad, bw, bb, w, lo))
        w.copy_(new)
    if not records:
        return None
    index, xor, full_index, full_values = (torch.cat(parts) for parts in zip(*records))
    if key.layout.numel < 2**31:  # halves the fix-up index memory for every realistic layer
        index, full_index = index.to(torch.int32), full_index.to(torch.int32)
    return Fixups(index, xor, full_index, full_values)


def _records(bad: torch.Tensor, bw: torch.Tensor, bb: torch.Tensor, w: torch.Tensor, lo: int):
    """Fix-up records for chunk-local indices ``bad`` (``bw``/``bb``: bits of ``w`` and of ``back``)."""
    x = bw.index_select(0, bad) ^ bb.index_select(0, bad)
    wide = (x >> 16) != 0 if x.element_size() > 2 else None
    if wide is not None and bool(wide.any()):
        full = bad[wide]
        keep = ~wide
        return bad[keep] + lo, _low16(x[keep]), full + lo, w.index_select(0, full)
    return bad + lo, _low16(x), bad[:0] + lo, w[:0].clone()


def restore_region(region: Region, key: NoiseKey, fixups: Fixups | None, native: bool | None = None) -> None:
    """Undo ``perturb_region`` bit-exactly: subtract the regenerated noise, then patch the fix-ups
    (``native`` as in ``perturb_region``; either path restores what either path perturbed)."""
    restore_regions([(region, key, fixups)], native)


def restore_regions(jobs: list[tuple[Region, NoiseKey, Fixups | None]], native: bool | None = None) -> None:
    """``restore_region`` for every ``(region, key, fixups)``; the native jobs' chunks as one stream."""
    stream, scratch, numel = [], Scratch(), 0
    for region, key, _ in jobs:
        if region.tensor.numel() == 0:
            continue
        lib = _kernels(region, key, native)
        if lib is None:
            _restore_noise(region, key)
        else:
            stream += roundtrip.restore_tasks(lib, region, key, scratch)
            numel += region.tensor.numel()
    for _ in run_ordered(stream, threads_pay(numel)):
        pass
    for region, key, fixups in jobs:
        if fixups is not None and region.tensor.numel():
            _patch(region, key, fixups)


def _patch(region: Region, key: NoiseKey, fixups: Fixups) -> None:
    """Apply the fix-ups that fall in ``region`` (after the noise was subtracted)."""
    t = region.tensor
    bits = _bits(t)
    li, xor = _inside(region, key, fixups.index, fixups.xor)
    if li.numel():
        bits[li] = bits[li] ^ _widen16(xor.to(t.device), bits.dtype)
    li, values = _inside(region, key, fixups.full_index, fixups.full_values)
    if li.numel():
        t[li] = values.to(t.device)


def _restore_noise(region: Region, key: NoiseKey) -> None:
    """The torch path's ``w = round(w - e)``, chunk by chunk."""
    t = region.tensor
    cd = compute_dtype(t.dtype)
    for lo, e in key.chunks(region.start, region.stop, t.device):
        off = lo - region.start
        w = t[off : off + e.numel()]
        if cd == t.dtype:
            w.sub_(e)
        else:
            w.copy_((w.to(cd) - e).to(t.dtype))


def _inside(region: Region, key: NoiseKey, index: torch.Tensor, values: torch.Tensor):
    """The records of ``(index, values)`` that fall in ``region``, with region-local int64 indices."""
    if region.start == 0 and region.stop == key.layout.numel:  # the whole weight: every record
        return index.long(), values
    inside = (index >= region.start) & (index < region.stop)
    return index[inside].long() - region.start, values[inside]
