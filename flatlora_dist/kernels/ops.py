"""The fused kernels as ``torch.library`` custom ops (``flatlora::*``), plus thin typed wrappers.

Each op is one dispatched operation (one kernel launch on a GPU) to ``TorchDispatchMode``s, FSDP and
``torch.compile``.  Weights are passed as their integer bit views (``bits``); ``kind`` says which
float format the bits hold.  Importing this module imports Triton.
"""

from __future__ import annotations

import os
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
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 1 << 15 if INTERPRETED else 1024
"""Elements per program.  Values and record order do not depend on it (noise is keyed by index)."""
NORM_BM, NORM_BK = (64, 1024) if INTERPRETED else (32, 128)
_LAUNCH = {} if INTERPRETED else {"enable_fp_fusion": False}  # w + std*z is two roundings, as documented


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
    """Programs (rows of the counts buffer) a region of ``n`` elements takes."""
    return triton.cdiv(n, BLOCK)


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
    wrap_triton(K.noise_kernel)[(programs(n),)](out, n, start, seed, BLOCK=BLOCK, **_LAUNCH)


@triton_op("flatlora::perturb_count", mutates_args={"cnt"})
def _count_op(
    w: torch.Tensor, std: torch.Tensor, cnt: torch.Tensor, start: int, cols: int, seed: int,
    skip_lo: int, skip_hi: int, out_axis: int, kind_: int,
) -> None:
    n = w.numel()
    wrap_triton(K.count_kernel)[(programs(n),)](
        w, std, cnt, n, start, cols, seed, skip_lo, skip_hi, OUT_AXIS=out_axis, KIND=kind_, BLOCK=BLOCK, **_LAUNCH
    )


@triton_op("flatlora::perturb_write", mutates_args={"w", "idx", "xor", "fidx", "fval"})
def _write_op(
    w: torch.Tensor, std: torch.Tensor, cnt: torch.Tensor, incl: torch.Tensor, base: torch.Tensor,
    idx: torch.Tensor, xor: torch.Tensor, fidx: torch.Tensor, fval: torch.Tensor,
    start: int, cols: int, seed: int, skip_lo: int, skip_hi: int, out_axis: int, kind_: int,
) -> None:
    n = w.numel()
    wrap_triton(K.write_kernel)[(programs(n),)](
        w, std, cnt, incl, base, idx, xor, fidx, fval, n, start, cols, seed, skip_lo, skip_hi,
        OUT_AXIS=out_axis, KIND=kind_, BLOCK=BLOCK, **_LAUNCH,
    )


@triton_op("flatlora::restore", mutates_args={"w"})
def _restore_op(w: torch.Tensor, std: torch.Tensor, start: int, cols: int, seed: int, out_axis: int, kind_: int) -> None:
    n = w.numel()
    wrap_triton(K.restore_kernel)[(programs(n),)](
        w, std, n, start, cols, seed, OUT_AXIS=out_axis, KIND=kind_, BLOCK=BLOCK, **_LAUNCH
    )


@triton_op("flatlora::apply_fixups", mutates_args={"w"})
def _fixup_op(
    w: torch.Tensor, idx: torch.Tensor, xor: torch.Tensor, fidx: torch.Tensor, fval: torch.Tensor,
    start: int, kind_: int,
) -> None:
    n = max(idx.numel(), fidx.numel())
    wrap_triton(K.fixup_kernel)[(programs(n),)](
        w, idx, xor, fidx, fval, idx.numel(), fidx.numel(), start, start + w.numel(), KIND=kind_, BLOCK=BLOCK,
        **_LAUNCH,
    )


@triton_op("flatlora::noisy", mutates_args={})
def _noisy_op(w: torch.Tensor, std: torch.Tensor, cols: int, seed: int, out_axis: int, kind_: int) -> torch.Tensor:
    out = torch.empty_like(w)
    n = w.numel()
    wrap_triton(K.noisy_kernel)[(programs(n),)](
        w, out, std, n, cols, seed, OUT_AXIS=out_axis, KIND=kind_, BLOCK=BLOCK, **_LAUNCH
    )
    return out


@triton_op("flatlora::noisy_4bit", mutates_args={})
def _noisy_4bit_op(
    data: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor, code: torch.Tensor, code2: torch.Tensor,
    offset: torch.Tensor, std: torch.Tensor, n: int, cols: int, seed: int, blocksize: int, blocksize2: int,
    nested: bool, qkind: int, kind_: int, noise_: bool,
) -> torch.Tensor:
    out = torch.empty(n, dtype=_KIND_BITS[kind_], device=data.device)
    wrap_triton(K.noisy_4bit_kernel)[(programs(n),)](
        data, absmax, absmax2, code, code2, offset, std, out, n, cols, seed, blocksize, blocksize2,
        NESTED=nested, QKIND=qkind, KIND=kind_, NOISE=noise_, BLOCK=BLOCK, **_LAUNCH,
    )
    return out


@triton_op("flatlora::row_sumsq", mutates_args={"acc"})
def _row_sumsq_op(
    acc: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float,
    start: int, cols: int, out_axis: int, kind_: int,
) -> None:
    stop = start + w.numel()
    lo, hi = start // cols, (stop - 1) // cols + 1  # storage rows the region touches
    if out_axis == 0:
        o_lo, o_hi, i_lo, i_hi, so, si = lo, hi, 0, cols, cols, 1
    else:
        o_lo, o_hi, i_lo, i_hi, so, si = 0, cols, lo, hi, 1, cols
    r = a.shape[0]
    rp = max(16, triton.next_power_of_2(max(r, 1)))
    wrap_triton(K.row_sumsq_kernel)[(triton.cdiv(o_hi - o_lo, NORM_BM),)](
        w, a, b, acc, s, start, stop, o_hi, a.shape[1], o_lo, i_lo, i_hi, r, so, si,
        KIND=kind_, HAS_AB=r > 0, RP=rp, BM=NORM_BM, BK=NORM_BK, **_LAUNCH,
    )


# ---------------------------------------------------------------------------------------- wrappers
def noise(seed: int, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Unscaled fused noise ``z_k`` for global ``[start, stop)``, float32."""
    out = torch.empty(stop - start, dtype=torch.float32, device=device)
    _check_device(out)
    if out.numel():
        torch.ops.flatlora.noise(out, start, seed)
    return out


def count(w: torch.Tensor, std: torch.Tensor, cnt: torch.Tensor, start: int, cols: int, seed: int,
          skip: tuple[int, int], out_axis: int) -> None:
    """Pass 1: fill ``cnt`` (``programs(w.numel())`` x 2 int64) with per-program record counts."""
    _check_device(w)
    torch.ops.flatlora.perturb_count(bits(w), std, cnt, start, cols, seed, skip[0], skip[1], out_axis, kind(w.dtype))


def write(w: torch.Tensor, std: torch.Tensor, cnt: torch.Tensor, incl: torch.Tensor, base: torch.Tensor,
          records: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], start: int, cols: int,
          seed: int, skip: tuple[int, int], out_axis: int) -> None:
    """Pass 2: write ``w'`` into ``w`` and the records (index, xor, full_index, full_values) in place."""
    idx, xor, fidx, fval = records
    torch.ops.flatlora.perturb_write(
        bits(w), std, cnt, incl, base, idx, xor, fidx, bits(fval), start, cols, seed, skip[0], skip[1],
        out_axis, kind(w.dtype),
    )


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
