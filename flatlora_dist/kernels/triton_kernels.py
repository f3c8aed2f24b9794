"""Triton kernels of the fused noise scheme, version 2 (imported only when that scheme is selected).

The noise (``fused`` scheme v2): element ``k`` of a weight at one step is
``z_k = normal4(key, k >> 2)[k & 3]``, where ``key = noise.key_seed(seed, step, name)`` and ``normal4``
runs one Philox4x32-10 on counter ``k >> 2`` (64-bit: low and high word) and turns its four 32-bit
outputs ``(a, b, c, d)`` into four normals by Box-Muller, both outputs of each pair used:
``(r·cos t, r·sin t)`` with ``r = sqrt(-2·ln u)`` from ``a`` (resp. ``c``) and ``t`` from ``b`` (resp. ``d``):

* ``u = (2·(a >> 9) + 1) / 2^24`` in ``(0, 1)`` (24-bit odd numerators: exact in float32), so
  ``|z| <= sqrt(2·24·ln 2) = 5.77``; ``t = int32(b) · pi / 2^31`` in ``[-pi, pi)``.
* On a GPU the transcendentals are the MUFU approximations (``libdevice.fast_log2f``/``fast_sinf``/
  ``fast_cosf``: absolute error about 2^-21 on these ranges, so ``z`` is off by at most ~1e-6 · |z| plus,
  for ``|z| < 1e-3`` only, up to ~1e-3 absolute; ``r`` is clamped at 0 so it is never NaN).  In the
  Triton interpreter (``TRITON_INTERPRET=1``) they are numpy's float32 ``log2``/``sin``/``cos``: CPU and
  CUDA values differ in the last bits, as they did before; within one device type every value is a
  pure function of ``(key, k)``, so any slice of any shard equals the whole, whatever the region's
  start modulo 4.

Kernels work on *bit patterns* of a weight (fp32 as int32, bf16/fp16 as int16) and do their own
conversions, so rounding is the same on a GPU and in the interpreter (whose built-in fp32->bf16 cast
does not round to nearest even):

* ``KIND`` 0 = float32, 1 = bfloat16, 2 = float16.
* ``e_k = std[out(k)] · z_k`` in float32 (``out(k)`` = the row ``k // cols`` for ``OUT_AXIS`` 0, the
  column ``k % cols`` for 1).  No per-element 64-bit division: a program's tile is 4·R consecutive
  elements starting at a multiple of 4; the host passes the row and column of the region's aligned
  start, each program divides its own first offset once (32-bit), and each element's row comes from a
  float32 reciprocal corrected by one step (exact: the quotient is at most ``BLOCK / cols + 1``).
* ``w' = round(w + e)``; the restore computes ``back = round(w' - e)`` — one helper (``_round_trip``)
  used by perturb, restore and the functional path, so the round-trip check predicts exactly what the
  restore will produce.
* A record is needed where ``bits(back) != bits(w)``: *narrow* when ``bits(w) ^ bits(back)`` fits in
  16 bits (stored as (index, low 16 bits of the xor)), else *wide* (index, original bits).
* Perturb is one pass (``write_kernel``): each program reserves its records' slots with one atomic add
  per record stream and writes ``w'`` only when all of its records fit the pre-sized buffers (else it
  writes nothing, marks its in-capacity slots with index -1 and leaves its ``done`` flag 0 for the
  host's fallback).  Record order is the order of the reservations: not defined, not needed.
* bitsandbytes 4-bit (``noisy_4bit_kernel``): element ``k`` is nibble ``k % 2`` (high first) of byte
  ``k // 2``; its value is ``round_q(code[q] · absmax[k >> log2(blocksize)])`` in float32 then rounded
  to the quant dtype, exactly as bitsandbytes' dequantize (CPU and CUDA kernels alike), with the
  double-quantized scale ``absmax = code2[qabsmax[b]] · absmax2[b >> log2(blocksize2)] + offset`` (a
  product, then a separate add: no FMA, as bitsandbytes' two ops).  Block sizes are powers of two.

Indices inside a region are 32-bit (the host refuses regions with ``n + cols + BLOCK >= 2^31``); only
the Philox counter and stored record indices are 64-bit.  Scalar arguments are converted with
``tl.cast``, never ``.to``: a launch specializes an integer argument equal to 1 into a constant.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""The interpreter has no ``libdevice`` calls: it gets numpy's float32 math instead of MUFU's."""

if INTERPRETED:

    @triton.jit
    def _log2(x):
        return tl.log2(x)

    @triton.jit
    def _sin(x):
        return tl.sin(x)

    @triton.jit
    def _cos(x):
        return tl.cos(x)

else:
    from triton.language.extra.cuda import libdevice

    @triton.jit
    def _log2(x):
        return libdevice.fast_log2f(x)

    @triton.jit
    def _sin(x):
        return libdevice.fast_sinf(x)

    @triton.jit
    def _cos(x):
        return libdevice.fast_cosf(x)


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


# ------------------------------------------------------------------------------------ the noise
@triton.jit
def _box_muller(a, b):
    """Two standard normals from two uint32 draws (both outputs of the transform are used)."""
    u = ((a >> 9) * 2 + 1).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08  # (odd < 2^24) / 2^24
    t = b.to(tl.int32, bitcast=True).to(tl.float32) * 1.4629180792671596e-09  # pi / 2^31: [-pi, pi)
    r = tl.sqrt(tl.maximum(_log2(u) * -1.3862943611198906, 0.0))  # -2·ln(2)·log2(u) = -2·ln(u)
    return r * _cos(t), r * _sin(t)


@triton.jit
def _normal4(seed, c):
    """The four normals of Philox counters ``c`` (int64, one per row of a tile): four (R,) tensors."""
    a, b, c2, d = tl.randint4x(seed, c)
    z0, z1 = _box_muller(a.to(tl.uint32, bitcast=True), b)
    z2, z3 = _box_muller(c2.to(tl.uint32, bitcast=True), d)
    return z0, z1, z2, z3


@triton.jit
def _tile(pid, n, c0, s3, R: tl.constexpr, QUAD: tl.constexpr):
    """Program ``pid``'s tile of a region holding global ``[start, start + n)``: ``(loc, m, j4, c)``;
    ``c0 = start >> 2`` and ``s3 = start & 3`` come from the host (the interpreter shifts a start in
    ``[2^31, 2^32)``, which arrives as uint32, wrongly).

    The tile is ``R`` rows of 4 elements; row ``i`` holds global ``4·c[i] + (0..3)`` with
    ``c = c0 + pid·R + i``.  ``loc`` (int32, (R, 4)) = the element's offset in the region,
    ``m`` = it is in the region, ``j4`` = ``4·i + j`` (the element's place in the tile).  ``QUAD``: the
    caller guarantees ``start % 4 == 0`` (rows of the tile are aligned quads of the region's memory:
    one thread owns a row, its four normals need no shuffling)."""
    i = tl.arange(0, R)
    j4 = 4 * i[:, None] + tl.arange(0, 4)[None, :]
    if QUAD:
        loc = pid * (4 * R) + j4
        m = loc < n
    else:
        loc = pid * (4 * R) + j4 - s3
        m = (loc >= 0) & (loc < n)
    c = c0 + pid.to(tl.int64) * R + i
    return loc, m, j4, c


@triton.jit
def _pick(j4, z0, z1, z2, z3):
    """Element ``4·i + j`` of a tile takes ``z_j[i]``."""
    j = j4 & 3
    return tl.where(j == 0, z0[:, None], tl.where(j == 1, z1[:, None], tl.where(j == 2, z2[:, None], z3[:, None])))


@triton.jit
def _divmod(t, cols, inv_cols):
    """``(t // cols, t % cols)`` for int32 ``0 <= t`` with a quotient below 2^20: a float32 reciprocal
    estimate is off by at most one, and one step corrects it."""
    q = (t.to(tl.float32) * inv_cols).to(tl.int32)
    r = t - q * cols
    q = tl.where(r < 0, q - 1, tl.where(r >= cols, q + 1, q))
    return q, t - q * cols


@triton.jit
def _std(std_ptr, pid, j4, m, n, row_s, col_s, cols, inv_cols, OUT_AXIS: tl.constexpr, R: tl.constexpr,
         QUAD: tl.constexpr):
    """``std[out(k)]`` for a tile; ``(row_s, col_s)`` = row and column of the region's aligned start
    (``start & ~3``), ``inv_cols`` = ``1 / cols`` in float32.  32-bit arithmetic only.  ``QUAD``: also
    ``cols % 4 == 0``, so the four elements of a tile row share their row (one division per four)."""
    p0 = col_s + pid * (4 * R)  # the tile's first element, as a column offset from row ``row_s``
    rp = p0 // cols
    if QUAD:
        t = (p0 - rp * cols) + 4 * tl.arange(0, R)  # < cols + 4·R: quotient at most 4·R / cols + 1
        q, col = _divmod(t, cols, inv_cols)
        if OUT_AXIS == 0:
            s = tl.load(std_ptr + ((row_s + rp) + q), mask=pid * (4 * R) + 4 * tl.arange(0, R) < n, other=0.0)[:, None]
        else:
            s = tl.load(std_ptr + (col[:, None] + (j4 & 3)), mask=m, other=0.0)
    else:
        t = (p0 - rp * cols) + j4
        q, col = _divmod(t, cols, inv_cols)
        if OUT_AXIS == 0:
            s = tl.load(std_ptr + ((row_s + rp) + q), mask=m, other=0.0)
        else:
            s = tl.load(std_ptr + col, mask=m, other=0.0)
    return s


@triton.jit
def _noise(seed, std_ptr, pid, j4, m, n, c, row_s, col_s, cols, inv_cols, OUT_AXIS: tl.constexpr, R: tl.constexpr,
           QUAD: tl.constexpr):
    """``e = std[out(k)] · z_k`` (float32) over a tile."""
    z0, z1, z2, z3 = _normal4(seed, c)
    s = _std(std_ptr, pid, j4, m, n, row_s, col_s, cols, inv_cols, OUT_AXIS, R, QUAD)
    return _pick(j4, z0, z1, z2, z3) * s


@triton.jit
def _round_trip(bits, e, KIND: tl.constexpr):
    """``(bits(w'), bits(back))`` with ``w' = round(w + e)``, ``back = round(w' - e)``."""
    new = _round_bits(_to_f32(bits, KIND) + e, KIND)
    back = _round_bits(_to_f32(new, KIND) - e, KIND)
    return new, back


# ------------------------------------------------------------------------------------ kernels
@triton.jit
def noise_kernel(out_ptr, n, c0, s3, seed, QUAD: tl.constexpr, BLOCK: tl.constexpr):
    """``out[i] = z_{start + i}`` for ``i < n`` (the unscaled fused noise; ``start = 4·c0 + s3``)."""
    pid = tl.program_id(0)
    loc, m, j4, c = _tile(pid, n, c0, s3, BLOCK // 4, QUAD)
    z0, z1, z2, z3 = _normal4(seed, c)
    tl.store(out_ptr + loc, _pick(j4, z0, z1, z2, z3), mask=m)


@triton.jit
def _positions(narrow, wide):
    """Exclusive prefix counts of the two record masks over a tile in element order, and their totals
    (one scan for both: narrow counts in the low 16 bits, wide in the high ones; a tile is < 2^16)."""
    both = narrow.to(tl.int32) + (wide.to(tl.int32) << 16)
    per_row = tl.sum(both, axis=1)
    pos = (tl.cumsum(per_row, axis=0) - per_row)[:, None] + tl.cumsum(both, axis=1) - both
    tot = tl.sum(per_row, axis=0)
    return pos & 0xFFFF, pos >> 16, tot & 0xFFFF, tot >> 16


UNSET: tl.constexpr = tl.constexpr(2**62)
"""``ctr[1] = UNSET - (packed base of the first program that did not fit)``, or 0 when all fit."""


@triton.jit
def _columns(x):
    """The four columns of an (R, 4) tile as (R,) tensors (in-thread: a tile row belongs to one thread)."""
    a, b = tl.split(tl.reshape(x, (x.shape[0], 2, 2)))
    x0, x2 = tl.split(a)
    x1, x3 = tl.split(b)
    return x0, x1, x2, x3


@triton.jit
def _scatter(idx_ptr, val_ptr, at, keep, k, v):
    """``idx[at] = k``, ``val[at] = v`` where ``keep``, column by column (a scattered store of the (R, 4)
    tile itself would first move every address through shared memory to another layout)."""
    at0, at1, at2, at3 = _columns(at)
    m0, m1, m2, m3 = _columns(keep)
    k0, k1, k2, k3 = _columns(k)
    v0, v1, v2, v3 = _columns(v)
    tl.store(idx_ptr + at0, k0, mask=m0)
    tl.store(idx_ptr + at1, k1, mask=m1)
    tl.store(idx_ptr + at2, k2, mask=m2)
    tl.store(idx_ptr + at3, k3, mask=m3)
    tl.store(val_ptr + at0, v0, mask=m0)
    tl.store(val_ptr + at1, v1, mask=m1)
    tl.store(val_ptr + at2, v2, mask=m2)
    tl.store(val_ptr + at3, v3, mask=m3)


@triton.jit
def write_kernel(
    w_ptr, std_ptr, go_ptr, ctr_ptr, done_ptr, idx_ptr, xor_ptr, fidx_ptr, fval_ptr,
    n, start, c0, s3, row_s, col_s, cols, inv_cols, seed, skip_lo, skip_hi, cap_n, cap_w, redo,
    OUT_AXIS: tl.constexpr, KIND: tl.constexpr, QUAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Perturb, one pass: write ``w'`` and this program's records, or nothing when they do not fit.

    ``go``: the caller's flag (int64; 0 = write nothing, e.g. a non-finite norm).  ``ctr``: the target's
    counters (int64 x 2).  ``ctr[0]`` packs the narrow (low 32 bits) and wide (high 32 bits) record counts:
    every program adds its counts with one atomic, fitting or not, so after the kernel it holds the exact
    totals, and reservations of both streams follow one order.  A program fits when both of its
    reservations end within the capacities; once one does not, no later one does, so the slots in use
    are a prefix of each buffer, ending at the first failing program's reservation (``ctr[1]``, see
    ``UNSET``).  Records of region-local ``[skip_lo, skip_hi)`` (recorded by an earlier, overlapping
    region) are not made.  ``done[pid]`` = 1 when the program wrote (or had nothing to do); with
    ``redo`` != 0 programs already ``done`` are skipped (the host's fallback pass).
    """
    pid = tl.program_id(0)
    act = tl.load(go_ptr) != 0
    if redo != 0:
        act = act & (tl.load(done_ptr + pid) == 0)
    nv = tl.where(act, n, 0)  # (not ``m & act``: the interpreter turns a block & scalar mask into int32)
    loc, m, j4, c = _tile(pid, nv, c0, s3, BLOCK // 4, QUAD)
    bits = tl.load(w_ptr + loc, mask=m, other=0)
    e = _noise(seed, std_ptr, pid, j4, m, nv, c, row_s, col_s, cols, inv_cols, OUT_AXIS, BLOCK // 4, QUAD)
    new, back = _round_trip(bits, e, KIND)
    bad = m & (back != bits) & (tl.cast(loc - skip_lo, tl.uint32) >= tl.cast(skip_hi - skip_lo, tl.uint32))  # not skipped
    if KIND == 0:
        wide = bad & (((bits ^ back) >> 16) != 0)
    else:
        wide = bad & (bits != bits)
    narrow = bad & (wide == 0)
    pn, pw, nn, nw = _positions(narrow, wide)
    base = tl.atomic_add(ctr_ptr, nn.to(tl.int64) + (nw.to(tl.int64) << 32))  # both streams, one order
    base_n = (base & 0xFFFFFFFF).to(tl.int32)
    base_w = (base >> 32).to(tl.int32)
    fits = (base_n + nn <= cap_n) & (base_w + nw <= cap_w)  # once one program fails, all later ones do
    tl.atomic_max(ctr_ptr + 1, tl.where(fits, 0, UNSET - base))  # the first failure: where valid slots end
    if idx_ptr.dtype.element_ty == tl.int32:
        k = tl.cast(start, tl.int32) + loc  # the weight has < 2^31 elements
    else:
        k = tl.cast(start, tl.int64) + loc.to(tl.int64)
    _scatter(idx_ptr, xor_ptr, base_n + pn, narrow & (pn < tl.where(fits, nn, 0)), k, (bits ^ back).to(tl.int16))
    if KIND == 0:
        _scatter(fidx_ptr, fval_ptr, base_w + pw, wide & (pw < tl.where(fits, nw, 0)), k, bits)
    tl.store(w_ptr + loc, new, mask=m & (loc < tl.where(fits, n, 0)))
    tl.store(done_ptr + pid, (fits | (act == 0)).to(tl.int8))


@triton.jit
def restore_kernel(
    w_ptr, std_ptr, n, c0, s3, row_s, col_s, cols, inv_cols, seed,
    OUT_AXIS: tl.constexpr, KIND: tl.constexpr, QUAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """``w = round(w' - e)`` (the ``back`` of ``_round_trip``), regenerating ``e``."""
    pid = tl.program_id(0)
    loc, m, j4, c = _tile(pid, n, c0, s3, BLOCK // 4, QUAD)
    new = tl.load(w_ptr + loc, mask=m, other=0)
    e = _noise(seed, std_ptr, pid, j4, m, n, c, row_s, col_s, cols, inv_cols, OUT_AXIS, BLOCK // 4, QUAD)
    tl.store(w_ptr + loc, _round_bits(_to_f32(new, KIND) - e, KIND), mask=m)


@triton.jit
def fixup_kernel(
    w_ptr, idx_ptr, xor_ptr, fidx_ptr, fval_ptr, n_narrow, n_wide, start, stop, KIND: tl.constexpr, BLOCK: tl.constexpr
):
    """Patch the records whose global index lies in ``[start, stop)``: ``bits ^= xor`` / ``bits = value``.

    Global indices are unique per target (overlapping regions record disjoint ranges), so no two
    programs touch one element; unused slots hold index -1 and patch nothing.
    """
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
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
    w_ptr, out_ptr, std_ptr, n, cols, inv_cols, seed, OUT_AXIS: tl.constexpr, KIND: tl.constexpr, QUAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Functional mode: ``out = round(w + e)`` over a whole dense weight (no write to ``w``)."""
    pid = tl.program_id(0)
    loc, m, j4, c = _tile(pid, n, 0, 0, BLOCK // 4, True)
    bits = tl.load(w_ptr + loc, mask=m, other=0)
    e = _noise(seed, std_ptr, pid, j4, m, n, c, 0, 0, cols, inv_cols, OUT_AXIS, BLOCK // 4, QUAD)
    tl.store(out_ptr + loc, _round_bits(_to_f32(bits, KIND) + e, KIND), mask=m)


DOT: tl.constexpr = tl.constexpr("tf32x3")
"""``row_sumsq``'s ``B·A`` precision: three TF32 tensor-core products (split operands), float32-level
accuracy at about 2/3 of the instructions of float32 FMAs (the interpreter computes it in float32)."""


@triton.jit
def row_sumsq_kernel(
    w_ptr, a_ptr, b_ptr, acc_ptr, s, n, off0, n_out, n_in, o_lo, i_lo, i_hi, r, so, si,
    KIND: tl.constexpr, HAS_AB: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    """``acc[o] += sum_i (W[o, i] + s·(B·A)[o, i])²`` over the ``n`` elements of a region.

    Element ``(o, i)`` of the weight sits at region offset ``(o - o_lo)·so + (i - i_lo)·si + off0`` (``(so,
    si)`` = ``(cols, 1)`` for ``out_axis`` 0, ``(1, cols)`` for 1; ``off0`` = the offset of ``(o_lo, i_lo)``,
    negative when the region starts inside a row): 32-bit arithmetic.  Each program owns ``BM`` output
    features and loops over in-features ``[i_lo, i_hi)``, so every ``acc`` entry is written by one
    program (deterministic).  ``A`` (r, in) and ``B`` (out, r) are contiguous float32; ``r`` is padded to
    ``RP``.  The loop is a ``while`` on scalars (not ``range`` over runtime bounds: Triton 3.6's
    interpreter cannot take those with numpy >= 2.4).
    """
    do = tl.program_id(0) * BM + tl.arange(0, BM)  # o - o_lo
    om = do < n_out - o_lo
    rr = tl.arange(0, RP)
    if HAS_AB:
        b = tl.load(b_ptr + (o_lo + do)[:, None] * r + rr[None, :], mask=om[:, None] & (rr[None, :] < r), other=0.0)
    row = do * so + off0
    total = tl.zeros((BM,), dtype=tl.float32)
    i0 = i_lo
    while i0 < i_hi:
        i = i0 + tl.arange(0, BK)
        loc = row[:, None] + ((i - i_lo) * si)[None, :]
        m = (om[:, None] & (i < i_hi)[None, :]) & (loc.to(tl.uint32) < tl.cast(n, tl.uint32))  # 0 <= loc < n
        x = _to_f32(tl.load(w_ptr + loc, mask=m, other=0), KIND)
        if HAS_AB:
            a = tl.load(a_ptr + rr[:, None] * n_in + i[None, :], mask=(rr[:, None] < r) & (i < i_hi)[None, :],
                        other=0.0)
            x += s * tl.dot(b, a, input_precision=DOT)
        x = tl.where(m, x, 0.0)
        total += tl.sum(x * x, axis=1)
        i0 += BK
    old = tl.load(acc_ptr + o_lo + do, mask=om, other=0.0)
    tl.store(acc_ptr + o_lo + do, old + total, mask=om)


@triton.jit
def _dequant_4bit(loc, m, first, n, data_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, bs_shift,
                  bs2_shift, NESTED: tl.constexpr, QKIND: tl.constexpr):
    """bitsandbytes' 4-bit value of a tile's elements ``loc`` (int32, rows of 4 starting at multiples of 4;
    float32 holding a ``QKIND`` value).  A block (a power of two >= 4 elements) never splits a tile row,
    so its scale is loaded once per row."""
    byte = tl.load(data_ptr + (loc >> 1), mask=m, other=0).to(tl.int32)
    q = tl.where((loc & 1) == 0, byte >> 4, byte & 0xF)
    rm = first < n  # ``first``: each row's first element
    b = first >> bs_shift
    if NESTED:
        qa = tl.load(absmax_ptr + b, mask=rm, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + qa, mask=rm, other=0.0) * tl.load(absmax2_ptr + (b >> bs2_shift), mask=rm, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + b, mask=rm, other=0.0).to(tl.float32)
    v = tl.load(code_ptr + q, mask=m, other=0.0) * scale[:, None]
    return _to_f32(_round_bits(v, QKIND), QKIND)


@triton.jit
def noisy_4bit_kernel(
    data_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, std_ptr, out_ptr, n, cols, inv_cols, seed,
    bs_shift, bs2_shift, NESTED: tl.constexpr, QKIND: tl.constexpr, KIND: tl.constexpr,
    NOISE: tl.constexpr, QUAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Functional QLoRA: ``out = round(w + e)`` with ``w`` = the 4-bit weight dequantized to ``QKIND``
    and cast to ``KIND`` (the layer's compute dtype), in one pass over the packed bytes; without
    ``NOISE``, ``out = w`` (bitsandbytes' dequantize followed by ``.to(compute dtype)``).  The weight is
    ``(out, in)`` row-major (``OUT_AXIS`` 0), whole (global index = ``loc``)."""
    pid = tl.program_id(0)
    loc, m, j4, c = _tile(pid, n, 0, 0, BLOCK // 4, True)
    w = _dequant_4bit(loc, m, pid * BLOCK + 4 * tl.arange(0, BLOCK // 4), n, data_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, bs_shift,
                      bs2_shift, NESTED, QKIND)
    w = _to_f32(_round_bits(w, KIND), KIND)
    if NOISE:
        w = w + _noise(seed, std_ptr, pid, j4, m, n, c, 0, 0, cols, inv_cols, 0, BLOCK // 4, QUAD)
    tl.store(out_ptr + loc, _round_bits(w, KIND), mask=m)
