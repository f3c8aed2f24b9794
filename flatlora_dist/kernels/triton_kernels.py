"""Triton kernels of the fused noise scheme (imported only when that scheme is selected).

Every kernel works on the *bit patterns* of a weight (fp32 as int32, bf16/fp16 as int16) and does
its own conversions, so rounding is the same on a GPU and in the Triton interpreter (whose built-in
fp32->bf16 cast does not round to nearest even):

* ``KIND`` 0 = float32, 1 = bfloat16, 2 = float16.
* ``e_k = std[out(k)] * randn(key, k)`` in float32 (``out(k) = k // cols`` or ``k % cols``).
* ``w' = round(w + e)``; the restore computes ``back = round(w' - e)`` — one helper (``_round_trip``)
  used by perturb, restore and the functional path, so the round-trip check predicts exactly what the
  restore will produce.
* A record is needed where ``bits(back) != bits(w)``: *narrow* when ``bits(w) ^ bits(back)`` fits in
  16 bits (stored as (index, low 16 bits of the xor)), else *wide* (index, original bits).
* bitsandbytes 4-bit (``noisy_4bit_kernel``): element ``k`` is nibble ``k % 2`` (high first) of byte
  ``k // 2``; its value is ``round_q(code[q] · absmax[k // blocksize])`` in float32 then rounded to
  the quant dtype, exactly as bitsandbytes' dequantize (CPU and CUDA kernels alike), with the
  double-quantized scale ``absmax = code2[qabsmax[b]] · absmax2[b // blocksize2] + offset`` (a
  product, then a separate add: no FMA, as bitsandbytes' two ops).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _to_f32(bits, KIND: tl.constexpr):
    """Storage bits -> float32 (exact)."""
    if KIND == 0:
        x = bits.to(tl.float32, bitcast=True)
    elif KIND == 1:
        x = (bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = bits.to(tl.float16, bitcast=True).to(tl.float32)
    return x


@triton.jit
def _round_bits(x, KIND: tl.constexpr):
    """float32 -> storage bits, round to nearest even (bf16 as torch/c10 does it, NaN -> 0x7FC0)."""
    if KIND == 0:
        b = x.to(tl.int32, bitcast=True)
    elif KIND == 1:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        b = r.to(tl.uint16).to(tl.int16, bitcast=True)
    else:
        b = x.to(tl.float16).to(tl.int16, bitcast=True)
    return b


@triton.jit
def _noise(k, seed, std_ptr, cols, mask, OUT_AXIS: tl.constexpr):
    """``std[out(k)] * z_k`` (float32); ``k`` int64 global flat indices."""
    if OUT_AXIS == 0:
        o = k // cols
    else:
        o = k % cols
    s = tl.load(std_ptr + o, mask=mask, other=0.0)
    return tl.randn(seed, k) * s


@triton.jit
def _round_trip(bits, e, KIND: tl.constexpr):
    """``(bits(w'), bits(back))`` with ``w' = round(w + e)``, ``back = round(w' - e)``."""
    new = _round_bits(_to_f32(bits, KIND) + e, KIND)
    back = _round_bits(_to_f32(new, KIND) - e, KIND)
    return new, back


@triton.jit
def _mismatches(bits, back, k, m, skip_lo, skip_hi, KIND: tl.constexpr):
    """``(narrow, wide)`` masks of the elements needing a record (none inside ``[skip_lo, skip_hi)``)."""
    bad = m & (back != bits) & ((k < skip_lo) | (k >= skip_hi))
    if KIND == 0:
        wide = bad & (((bits ^ back) >> 16) != 0)
    else:
        wide = bad & (bits != bits)
    return bad & (wide == 0), wide


@triton.jit
def _perturb_block(w_ptr, std_ptr, pid, n, start, cols, seed, skip_lo, skip_hi,
                   OUT_AXIS: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """One program's elements of a perturb pass: ``(loc, mask, k, bits, bits(w'), bits(back), narrow, wide)``
    (the count and the write pass compute exactly the same values)."""
    loc = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = loc < n
    k = loc + start
    bits = tl.load(w_ptr + loc, mask=m, other=0)
    e = _noise(k, seed, std_ptr, cols, m, OUT_AXIS)
    new, back = _round_trip(bits, e, KIND)
    narrow, wide = _mismatches(bits, back, k, m, skip_lo, skip_hi, KIND)
    return loc, m, k, bits, new, back, narrow, wide


@triton.jit
def noise_kernel(out_ptr, n, start, seed, BLOCK: tl.constexpr):
    """``out[i] = randn(seed, start + i)`` for ``i < n`` (the unscaled fused noise)."""
    loc = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = loc < n
    tl.store(out_ptr + loc, tl.randn(seed, loc + start), mask=m)


@triton.jit
def count_kernel(
    w_ptr, std_ptr, cnt_ptr, n, start, cols, seed, skip_lo, skip_hi,
    OUT_AXIS: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass 1 of perturb: ``cnt[pid] = (narrow, wide)`` record counts of this program's elements.

    Writes nothing else: the weight is untouched until the counts have been read (one host sync
    for the whole model) and exact-size record buffers exist.
    """
    pid = tl.program_id(0)
    loc, m, k, bits, new, back, narrow, wide = _perturb_block(
        w_ptr, std_ptr, pid, n, start, cols, seed, skip_lo, skip_hi, OUT_AXIS, KIND, BLOCK
    )
    tl.store(cnt_ptr + 2 * pid, tl.sum(narrow.to(tl.int64), axis=0))
    tl.store(cnt_ptr + 2 * pid + 1, tl.sum(wide.to(tl.int64), axis=0))


@triton.jit
def write_kernel(
    w_ptr, std_ptr, cnt_ptr, incl_ptr, base_ptr, idx_ptr, xor_ptr, fidx_ptr, fval_ptr,
    n, start, cols, seed, skip_lo, skip_hi,
    OUT_AXIS: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass 2 of perturb: write ``w'`` and this program's records at offsets from the prefix sum.

    ``cnt``/``incl``: this region's rows of the counts and of their inclusive prefix sum (int64 pairs);
    ``base``: the prefix-sum row just before the target's first program.  Records come out sorted by
    global index (program order, then element order), the same for any ``BLOCK``.
    """
    pid = tl.program_id(0)
    loc, m, k, bits, new, back, narrow, wide = _perturb_block(
        w_ptr, std_ptr, pid, n, start, cols, seed, skip_lo, skip_hi, OUT_AXIS, KIND, BLOCK
    )
    nar_i = narrow.to(tl.int64)
    wid_i = wide.to(tl.int64)
    pos_n = tl.load(incl_ptr + 2 * pid) - tl.load(cnt_ptr + 2 * pid) - tl.load(base_ptr)
    pos_w = tl.load(incl_ptr + 2 * pid + 1) - tl.load(cnt_ptr + 2 * pid + 1) - tl.load(base_ptr + 1)
    pos_n = pos_n + tl.cumsum(nar_i, axis=0) - nar_i
    pos_w = pos_w + tl.cumsum(wid_i, axis=0) - wid_i
    tl.store(idx_ptr + pos_n, k.to(idx_ptr.dtype.element_ty), mask=narrow)
    tl.store(xor_ptr + pos_n, (bits ^ back).to(tl.int16), mask=narrow)
    tl.store(fidx_ptr + pos_w, k.to(fidx_ptr.dtype.element_ty), mask=wide)
    tl.store(fval_ptr + pos_w, bits, mask=wide)
    tl.store(w_ptr + loc, new, mask=m)


@triton.jit
def restore_kernel(
    w_ptr, std_ptr, n, start, cols, seed, OUT_AXIS: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr
):
    """``w = round(w' - e)`` (the ``back`` of ``_round_trip``), regenerating ``e``."""
    loc = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = loc < n
    k = loc + start
    new = tl.load(w_ptr + loc, mask=m, other=0)
    e = _noise(k, seed, std_ptr, cols, m, OUT_AXIS)
    tl.store(w_ptr + loc, _round_bits(_to_f32(new, KIND) - e, KIND), mask=m)


@triton.jit
def fixup_kernel(
    w_ptr, idx_ptr, xor_ptr, fidx_ptr, fval_ptr, n_narrow, n_wide, start, stop, KIND: tl.constexpr, BLOCK: tl.constexpr
):
    """Patch the records whose global index lies in ``[start, stop)``: ``bits ^= xor`` / ``bits = value``.

    Global indices are unique per target (overlapping regions record disjoint ranges), so no two
    programs touch one element.
    """
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mn = r < n_narrow
    k = tl.load(idx_ptr + r, mask=mn, other=-1).to(tl.int64)
    mn = mn & (k >= start) & (k < stop)
    x = tl.load(xor_ptr + r, mask=mn, other=0)
    if KIND == 0:
        x = x.to(tl.int32) & 0xFFFF
    old = tl.load(w_ptr + (k - start), mask=mn, other=0)
    tl.store(w_ptr + (k - start), old ^ x, mask=mn)
    mw = r < n_wide
    kw = tl.load(fidx_ptr + r, mask=mw, other=-1).to(tl.int64)
    mw = mw & (kw >= start) & (kw < stop)
    v = tl.load(fval_ptr + r, mask=mw, other=0)
    tl.store(w_ptr + (kw - start), v, mask=mw)


@triton.jit
def noisy_kernel(
    w_ptr, out_ptr, std_ptr, n, cols, seed, OUT_AXIS: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr
):
    """Functional mode: ``out = round(w + e)`` over a whole dense weight (no write to ``w``)."""
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = k < n
    bits = tl.load(w_ptr + k, mask=m, other=0)
    e = _noise(k, seed, std_ptr, cols, m, OUT_AXIS)
    tl.store(out_ptr + k, _round_bits(_to_f32(bits, KIND) + e, KIND), mask=m)


@triton.jit
def row_sumsq_kernel(
    w_ptr, a_ptr, b_ptr, acc_ptr, s, start, stop, n_out, n_in, o_lo, i_lo, i_hi, r, so, si,
    KIND: tl.constexpr, HAS_AB: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    """``acc[o] += sum_i (W[o, i] + s·(B·A)[o, i])²`` over the elements of flat ``[start, stop)``.

    ``w``: the region (element ``j`` = flat ``start + j``); flat index of ``(o, i)`` = ``o·so + i·si``
    (``(cols, 1)`` for ``out_axis`` 0, ``(1, cols)`` for 1).  Each program owns ``BM`` output features
    and loops over in-features ``[i_lo, i_hi)``, so every ``acc`` entry is written by one program
    (deterministic).  ``A`` (r, in) and ``B`` (out, r) are contiguous float32; ``r`` is padded to ``RP``.
    """
    o = o_lo + tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    om = o < n_out
    rr = tl.arange(0, RP)
    if HAS_AB:
        b = tl.load(b_ptr + o[:, None] * r + rr[None, :], mask=om[:, None] & (rr[None, :] < r), other=0.0)
    total = tl.zeros((BM,), dtype=tl.float32)
    for i0 in range(i_lo, i_hi, BK):
        i = i0 + tl.arange(0, BK).to(tl.int64)
        flat = o[:, None] * so + i[None, :] * si
        m = om[:, None] & (i[None, :] < i_hi) & (flat >= start) & (flat < stop)
        x = _to_f32(tl.load(w_ptr + (flat - start), mask=m, other=0), KIND)
        if HAS_AB:
            am = (rr[:, None] < r) & (i[None, :] < i_hi)
            a = tl.load(a_ptr + rr[:, None] * n_in + i[None, :], mask=am, other=0.0)
            x += s * tl.dot(b, a, input_precision="ieee")
        x = tl.where(m, x, 0.0)
        total += tl.sum(x * x, axis=1)
    old = tl.load(acc_ptr + o, mask=om, other=0.0)
    tl.store(acc_ptr + o, old + total, mask=om)


@triton.jit
def _dequant_4bit(k, m, data_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, blocksize,
                  blocksize2, NESTED: tl.constexpr, QKIND: tl.constexpr):
    """bitsandbytes' 4-bit value of flat elements ``k`` (float32 holding a ``QKIND`` value)."""
    byte = tl.load(data_ptr + k // 2, mask=m, other=0).to(tl.int32)
    q = tl.where(k % 2 == 0, byte >> 4, byte & 0xF)
    b = k // blocksize
    if NESTED:
        qa = tl.load(absmax_ptr + b, mask=m, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + qa, mask=m, other=0.0) * tl.load(absmax2_ptr + b // blocksize2, mask=m, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + b, mask=m, other=0.0).to(tl.float32)
    v = tl.load(code_ptr + q, mask=m, other=0.0) * scale
    return _to_f32(_round_bits(v, QKIND), QKIND)


@triton.jit
def noisy_4bit_kernel(
    data_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, std_ptr, out_ptr, n, cols, seed,
    blocksize, blocksize2, NESTED: tl.constexpr, QKIND: tl.constexpr, KIND: tl.constexpr,
    NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Functional QLoRA: ``out = round(w + e)`` with ``w`` = the 4-bit weight dequantized to ``QKIND``
    and cast to ``KIND`` (the layer's compute dtype), in one pass over the packed bytes; without
    ``NOISE``, ``out = w`` (bitsandbytes' dequantize followed by ``.to(compute dtype)``).  The weight is
    ``(out, in)`` row-major, so the row of ``k`` is ``k // cols``."""
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = k < n
    w = _dequant_4bit(k, m, data_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, blocksize,
                      blocksize2, NESTED, QKIND)
    w = _to_f32(_round_bits(w, KIND), KIND)
    if NOISE:
        w = w + _noise(k, seed, std_ptr, cols, m, 0)
    tl.store(out_ptr + k, _round_bits(w, KIND), mask=m)
