"""The fused kernels as ``torch.library`` custom ops (``flatlora::*``), plus thin typed wrappers.

Each op is one dispatched operation (one kernel launch on a GPU) to ``TorchDispatchMode``s, FSDP and
``torch.compile``.  Weights are passed as their integer bit views (``bits``); ``kind`` says which
float format the bits hold.  Importing this module imports Triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
from torch.library import triton_op, wrap_triton

from . import triton_kernels as K

if TYPE_CHECKING:
    from .packed import Packed4bit

_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_KIND_BITS = (torch.int32, torch.int16, torch.int16)  # bit-view dtype by kernel format code
INTERPRETED = K.INTERPRETED


@dataclass(frozen=True)
class Tiles:
    """Work per program: ``block`` elements (a multiple of 4) for the elementwise kernels, ``norm_bm`` rows
    x ``norm_bk`` columns per step for ``row_sumsq``, ``fixup_block`` records for ``apply_fixups``.  Values
    and records do not depend on them."""

    block: int
    norm_bm: int
    norm_bk: int
    fixup_block: int


GPU_TILES = Tiles(2048, 64, 64, 512)
INTERPRETER_TILES = Tiles(1 << 15, 64, 1024, 1 << 15)  # the interpreter's cost is per program
TILES = GPU_TILES if not INTERPRETED or os.environ.get("FLATLORA_TILES") == "gpu" else INTERPRETER_TILES
"""``FLATLORA_TILES=gpu`` makes the interpreter launch exactly the GPU's grids (``bench/kernel_cost.py``)."""
BLOCK = TILES.block
_LAUNCH = {} if INTERPRETED else {"enable_fp_fusion": False}  # w + std*z is two roundings, as documented
MAX_REGION = 2**31 - 2**22
"""Largest ``n + cols`` of a region: offsets inside a region are 32-bit."""
RECORDER: list | None = None
"""When a list, every launch appends ``(kernel, grid, args, constexprs)`` (``bench/kernel_cost.py``)."""


def kind(dtype: torch.dtype) -> int:
    """Kernel format code of a storage dtype; one clear error for the ones the fused scheme lacks."""
    if dtype not in _KIND:
        raise TypeError(
            f"the fused noise kernels handle float32, bfloat16 and float16 weights, not {dtype}; "
            "set FLATLORA_KERNELS=blocks for this model"
        )
    return _KIND[dtype]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The integer view of a float tensor's bit patterns (same storage)."""
    kind(t.dtype)
    return t.view(_BITS[t.dtype])


def programs(n: int) -> int:
    """Programs an elementwise kernel over ``n`` elements from an aligned start takes (one more
    when the start is not a multiple of 4: see ``_grid``)."""
    return triton.cdiv(n, BLOCK)


def _grid(n: int, start: int) -> int:
    """Programs covering global ``[start, start + n)`` in tiles that begin at multiples of 4."""
    return triton.cdiv(n + start % 4, BLOCK)


def _place(start: int, cols: int, n: int) -> tuple[int, int, int, float]:
    """``(row, column)`` of the region's aligned start ``start & ~3``, ``cols`` and ``1 / cols``, after
    checking that the region's offsets fit 32 bits."""
    if n + cols + BLOCK >= MAX_REGION:
        raise NotImplementedError(
            f"a region of {n} elements with rows of {cols} is too large for the fused kernels' 32-bit offsets; "
            "set FLATLORA_KERNELS=blocks"
        )
    a = start - start % 4
    return a // cols, a % cols, cols, 1.0 / cols


def _quad(start: int, cols: int) -> bool:
    """The kernels' fast path: the region starts at a multiple of 4 and rows are multiples of 4 long."""
    return start % 4 == 0 and cols % 4 == 0


def _run(kernel, grid: int, *args, **meta) -> None:
    """Launch ``kernel`` on ``grid`` programs (one dispatched op: callers are ``triton_op``s).

    ``wrap_triton`` makes the launch traceable; torch < 2.13 refuses the interpreter's
    ``InterpretedFunction``, which is then launched directly (still inside the one custom op)."""
    if RECORDER is not None:
        RECORDER.append((kernel, grid, args, meta))
    if grid == 0:
        return
    try:
        launcher = wrap_triton(kernel)
    except RuntimeError:
        if not INTERPRETED:
            raise
        launcher = kernel
    launcher[(grid,)](*args, **meta, **_LAUNCH)


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the fused noise kernels got a CPU tensor (CPU parameter offload?) without TRITON_INTERPRET=1; "
            "set FLATLORA_KERNELS=blocks"
        )


# ---------------------------------------------------------------------------------------- ops
@triton_op("flatlora::noise", mutates_args={"out"})
def _noise_op(out: torch.Tensor, start: int, seed: int) -> None:
    n = out.numel()
    _run(K.noise_kernel, _grid(n, start), out, n, start >> 2, start & 3, seed, QUAD=start % 4 == 0, BLOCK=BLOCK)


@triton_op("flatlora::perturb", mutates_args={"w", "ctr", "done", "idx", "xor", "fidx", "fval"})
def _perturb_op(
    w: torch.Tensor, std: torch.Tensor, go: torch.Tensor, ctr: torch.Tensor, done: torch.Tensor,
    idx: torch.Tensor, xor: torch.Tensor, fidx: torch.Tensor, fval: torch.Tensor,
    start: int, cols: int, seed: int, skip_lo: int, skip_hi: int, redo: bool, out_axis: int, kind_: int,
) -> None:
    n = w.numel()
    row_s, col_s, cols, inv = _place(start, cols, n)
    lo, hi = (min(max(x - start, 0), n) for x in (skip_lo, skip_hi))
    _run(K.write_kernel, _grid(n, start), w, std, go, ctr, done, idx, xor, fidx, fval, n, start, start >> 2, start & 3,
         row_s, col_s, cols,
         inv, seed, lo, max(lo, hi), idx.numel(), fidx.numel(), int(redo), OUT_AXIS=out_axis, KIND=kind_,
         QUAD=_quad(start, cols), BLOCK=BLOCK)


@triton_op("flatlora::restore", mutates_args={"w"})
def _restore_op(w: torch.Tensor, std: torch.Tensor, start: int, cols: int, seed: int, out_axis: int, kind_: int) -> None:
    n = w.numel()
    row_s, col_s, cols, inv = _place(start, cols, n)
    _run(K.restore_kernel, _grid(n, start), w, std, n, start >> 2, start & 3, row_s, col_s, cols, inv, seed,
         OUT_AXIS=out_axis, KIND=kind_, QUAD=_quad(start, cols), BLOCK=BLOCK)


@triton_op("flatlora::apply_fixups", mutates_args={"w"})
def _fixup_op(
    w: torch.Tensor, idx: torch.Tensor, xor: torch.Tensor, fidx: torch.Tensor, fval: torch.Tensor,
    start: int, kind_: int,
) -> None:
    n = max(idx.numel(), fidx.numel())
    _run(K.fixup_kernel, triton.cdiv(n, TILES.fixup_block), w, idx, xor, fidx, fval, idx.numel(), fidx.numel(), start,
         start + w.numel(), KIND=kind_, BLOCK=TILES.fixup_block)


@triton_op("flatlora::noisy", mutates_args={})
def _noisy_op(w: torch.Tensor, std: torch.Tensor, cols: int, seed: int, out_axis: int, kind_: int) -> torch.Tensor:
    out = torch.empty_like(w)
    n = w.numel()
    _, _, cols, inv = _place(0, cols, n)
    _run(K.noisy_kernel, _grid(n, 0), w, out, std, n, cols, inv, seed, OUT_AXIS=out_axis, KIND=kind_,
         QUAD=_quad(0, cols), BLOCK=BLOCK)
    return out


def _log2(x: int, what: str, least: int = 1) -> int:
    if x < least or x & (x - 1):
        raise NotImplementedError(
            f"the fused 4-bit kernel needs a power-of-two {what} of at least {least}, not {x}; set FLATLORA_KERNELS=blocks")
    return x.bit_length() - 1


@triton_op("flatlora::noisy_4bit", mutates_args={})
def _noisy_4bit_op(
    data: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor, code: torch.Tensor, code2: torch.Tensor,
    offset: torch.Tensor, std: torch.Tensor, n: int, cols: int, seed: int, blocksize: int, blocksize2: int,
    nested: bool, qkind: int, kind_: int, noise_: bool,
) -> torch.Tensor:
    out = torch.empty(n, dtype=_KIND_BITS[kind_], device=data.device)
    _, _, cols, inv = _place(0, cols, n)
    _run(K.noisy_4bit_kernel, _grid(n, 0), data, absmax, absmax2, code, code2, offset, std, out, n, cols, inv, seed,
         _log2(blocksize, "blocksize", 4), _log2(blocksize2, "nested blocksize"),
         NESTED=nested, QKIND=qkind, KIND=kind_, NOISE=noise_, QUAD=_quad(0, cols), BLOCK=BLOCK)
    return out


@triton_op("flatlora::row_sumsq", mutates_args={"acc"})
def _row_sumsq_op(
    acc: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float,
    start: int, cols: int, out_axis: int, kind_: int,
) -> None:
    n = w.numel()
    _place(start, cols, n)  # the same 32-bit limit
    lo, hi = start // cols, (start + n - 1) // cols + 1  # storage rows the region touches
    if out_axis == 0:
        o_lo, o_hi, i_lo, i_hi, so, si = lo, hi, 0, cols, cols, 1
    else:
        o_lo, o_hi, i_lo, i_hi, so, si = 0, cols, lo, hi, 1, cols
    r = a.shape[0]
    rp = max(16, triton.next_power_of_2(max(r, 1)))
    off0 = o_lo * so + i_lo * si - start
    _run(K.row_sumsq_kernel, triton.cdiv(o_hi - o_lo, TILES.norm_bm),
         w, a, b, acc, s, n, off0, o_hi, a.shape[1], o_lo, i_lo, i_hi, r, so, si,
         KIND=kind_, HAS_AB=r > 0, RP=rp, BM=TILES.norm_bm, BK=TILES.norm_bk)


# ---------------------------------------------------------------------------------------- wrappers
def noise(seed: int, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Unscaled fused noise ``z_k`` for global ``[start, stop)``, float32."""
    out = torch.empty(stop - start, dtype=torch.float32, device=device)
    _check_device(out)
    if out.numel():
        torch.ops.flatlora.noise(out, start, seed)
    return out


def perturb(w: torch.Tensor, std: torch.Tensor, go: torch.Tensor, ctr: torch.Tensor, done: torch.Tensor,
            records: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], start: int, cols: int,
            seed: int, skip: tuple[int, int], out_axis: int, redo: bool = False) -> None:
    """One-pass perturb of a region: ``w'`` into ``w``, its records appended to ``records`` (index, xor,
    full_index, full_values; capacities = their lengths) through the target's counters ``ctr`` (int64 x 2).

    ``go`` (int64, first element): 0 = write nothing.  ``done``: one int8 per program (``programs_at``),
    zeroed by the caller; programs whose records do not fit write nothing and keep ``done`` 0, for a
    second call with ``redo=True`` into fresh buffers and counters.
    """
    _check_device(w)
    idx, xor, fidx, fval = records
    torch.ops.flatlora.perturb(bits(w), std, go, ctr, done, idx, xor, fidx, bits(fval), start, cols, seed, skip[0],
                               skip[1], redo, out_axis, kind(w.dtype))


def programs_at(n: int, start: int) -> int:
    """Programs (``done`` flags) of the perturb kernel over global ``[start, start + n)``."""
    return _grid(n, start)


def restore(w: torch.Tensor, std: torch.Tensor, start: int, cols: int, seed: int, out_axis: int) -> None:
    """``w = round(w' - e)`` in place (before the fix-ups)."""
    _check_device(w)
    torch.ops.flatlora.restore(bits(w), std, start, cols, seed, out_axis, kind(w.dtype))


def apply_fixups(w: torch.Tensor, start: int, idx: torch.Tensor, xor: torch.Tensor,
                 fidx: torch.Tensor, fval: torch.Tensor) -> None:
    """Patch the records that fall in this region (``w`` holds global ``[start, start + numel)``)."""
    torch.ops.flatlora.apply_fixups(bits(w), idx, xor, fidx, bits(fval.to(w.dtype)), start, kind(w.dtype))


def noisy(w: torch.Tensor, std: torch.Tensor, cols: int, seed: int, out_axis: int) -> torch.Tensor:
    """``round(w + e)`` for a whole contiguous weight (flat index = storage order), same dtype as ``w``."""
    _check_device(w)
    out = torch.ops.flatlora.noisy(bits(w.contiguous()), std, cols, seed, out_axis, kind(w.dtype))
    return out.view(w.dtype).view(w.shape)


def noisy_4bit(p: Packed4bit, std: torch.Tensor | None, cols: int, seed: int) -> torch.Tensor:
    """``round(dequant(W) + e)`` for a whole bitsandbytes 4-bit ``(out, in)`` weight in one kernel, flat, in
    ``p.out_dtype`` (``std``: per output row); ``std=None``: no noise (bitsandbytes' dequantize cast to
    ``p.out_dtype``, bit for bit)."""
    _check_device(p.data)
    nest = p.nested
    unused = p.code  # any tensor: the kernel does not read the pointers its constexpr flags switch off
    absmax2, code2, offset, bs2 = (nest.absmax, nest.code, nest.offset, nest.blocksize) if nest else (
        unused, unused, unused, 1)
    out = torch.ops.flatlora.noisy_4bit(
        p.data, p.absmax, absmax2, p.code, code2, offset, unused if std is None else std, p.numel, cols, seed,
        p.blocksize, bs2, nest is not None, kind(p.quant_dtype), kind(p.out_dtype), std is not None,
    )
    return out.view(p.out_dtype)


def row_sumsq(acc: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float,
              start: int, cols: int, out_axis: int) -> None:
    """``acc[o] += sum of (W + s·B·A)²`` over the elements of ``w`` (global ``[start, start + numel)``).

    ``a`` (r, in) and ``b`` (out, r) float32 contiguous (``r`` may be 0: no adapter term).
    """
    _check_device(w)
    torch.ops.flatlora.row_sumsq(acc, bits(w), a, b, s, start, cols, out_axis, kind(w.dtype))
