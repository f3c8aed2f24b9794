/* Fused CPU perturb/restore of one noise chunk (the "blocks" scheme's per-block pass).
 *
 * Bit-for-bit the arithmetic of flatlora_dist/inplace.py's torch path:
 *   e    = f32(z[k] * std[out(k)])                        (float32 multiply)
 *   new  = round_storage(f32(w) + e)                       (float32 add, then round to the storage type)
 *   back = round_storage(f32(new) - e)                     (what restore will compute)
 * Perturb writes new and records every element with bits(back) != bits(w): (global index, low 16 bits
 * of the xor) when the xor fits in 16 bits (always for 2-byte types), else (global index, old value).
 * Restore writes round_storage(f32(w) - e).
 * Build without -ffast-math and with -ffp-contract=off: every operation is one IEEE rounding, as in torch.
 * Storage types: 0 = float32, 1 = bfloat16 (round to nearest even by bit operations, as c10 does),
 * 2 = float16 (_Float16 conversions: IEEE round to nearest even).
 */
#include "storage.h"

typedef struct {
    void *idx;       /* narrow records: index (int32 or int64) */
    int16_t *xr;     /* narrow records: low 16 bits of bits(w) ^ bits(back) */
    void *fidx;      /* wide records: index */
    void *fval;      /* wide records: the old value (storage type) */
    int64_t n_narrow, n_wide;
    int idx64;
} records;

static inline void put_index(void *base, int64_t i, int64_t v, int idx64) {
    if (idx64) ((int64_t *)base)[i] = v; else ((int32_t *)base)[i] = (int32_t)v;
}

/* Records of one tile: x[j] = bits(w) ^ bits(back) (zero-extended), old[j] = bits(w) before the write.
 * Mismatches are 3-15% of elements and unpredictable, so the tile is scanned 16 elements at a time
 * through a bit mask (vectorisable) and only the set bits are visited. */
static inline void tile_records(const uint32_t *x, const uint32_t *old, int64_t n, int64_t g, int wide_ok,
                                int esize, records *r) {
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        int64_t m16 = n - j0 < 16 ? n - j0 : 16;
        uint32_t mask = 0;
        for (int64_t k = 0; k < m16; k++) mask |= (uint32_t)(x[j0 + k] != 0) << k;
        while (mask) {
            int k = __builtin_ctz(mask);
            mask &= mask - 1;
            int64_t j = j0 + k;
            if (wide_ok && (x[j] >> 16)) {
                put_index(r->fidx, r->n_wide, g + j, r->idx64);
                if (esize == 4) ((uint32_t *)r->fval)[r->n_wide] = old[j];
                else ((uint16_t *)r->fval)[r->n_wide] = (uint16_t)old[j];
                r->n_wide++;
            } else {
                put_index(r->idx, r->n_narrow, g + j, r->idx64);
                r->xr[r->n_narrow++] = (int16_t)(uint16_t)x[j];
            }
        }
    }
}

#define TILE 1024

/* One run of elements sharing a row of storage (s[j * sstride] is element j's std), tile by tile: a
 * straight-line (vectorisable) loop computes new, back and the xor, then tile_records collects. */
static inline void perturb_run_f32(float *w, const float *z, const float *s, int64_t sstride, int64_t n,
                                   int64_t g, records *r) {
    uint32_t x[TILE], old[TILE];
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
        int64_t m = n - t0 < TILE ? n - t0 : TILE;
        for (int64_t j = 0; j < m; j++) {
            float e = z[t0 + j] * s[(t0 + j) * sstride];
            float wv = w[t0 + j];
            float nv = wv + e;
            float bv = nv - e;
            old[j] = f32_bits(wv);
            x[j] = f32_bits(wv) ^ f32_bits(bv);
            w[t0 + j] = nv;
        }
        tile_records(x, old, m, g + t0, 1, 4, r);
    }
}

#define PERTURB_RUN_16(NAME, LOAD, ROUND)                                                              \
    static inline void NAME(uint16_t *w, const float *z, const float *s, int64_t sstride, int64_t n,    \
                            int64_t g, records *r) {                                                   \
        uint32_t x[TILE];                                                                              \
        for (int64_t t0 = 0; t0 < n; t0 += TILE) {                                                     \
            int64_t m = n - t0 < TILE ? n - t0 : TILE;                                                 \
            for (int64_t j = 0; j < m; j++) {                                                          \
                float e = z[t0 + j] * s[(t0 + j) * sstride];                                           \
                uint16_t wb = w[t0 + j];                                                               \
                uint16_t nb = ROUND(LOAD(wb) + e);                                                     \
                uint16_t bb = ROUND(LOAD(nb) - e);                                                     \
                x[j] = (uint32_t)(uint16_t)(wb ^ bb);                                                  \
                w[t0 + j] = nb;                                                                        \
            }                                                                                          \
            tile_records(x, x, m, g + t0, 0, 2, r);                                                    \
        }                                                                                              \
    }
PERTURB_RUN_16(perturb_run_bf16, bf16_load, bf16_round)
PERTURB_RUN_16(perturb_run_f16, f16_load, f16_round)

static inline void restore_run_f32(float *w, const float *z, const float *s, int64_t sstride, int64_t n) {
    for (int64_t j = 0; j < n; j++) w[j] = w[j] - z[j] * s[j * sstride];
}
#define RESTORE_RUN_16(NAME, LOAD, ROUND)                                                              \
    static inline void NAME(uint16_t *w, const float *z, const float *s, int64_t sstride, int64_t n) {  \
        for (int64_t j = 0; j < n; j++) w[j] = ROUND(LOAD(w[j]) - z[j] * s[j * sstride]);              \
    }
RESTORE_RUN_16(restore_run_bf16, bf16_load, bf16_round)
RESTORE_RUN_16(restore_run_f16, f16_load, f16_round)

/* Walk [start, start+n) of a (rows, cols) weight row by row; out_axis 0: one std per storage row,
 * out_axis 1 (fan_in_fan_out): std indexed by column.  A constant stride lets each run specialise. */
#define WALK(CALL)                                                                                     \
    int64_t done = 0, row = start / cols, col = start % cols;                                          \
    while (done < n) {                                                                                 \
        int64_t len = cols - col < n - done ? cols - col : n - done;                                   \
        if (out_axis == 0) { const float *s = std + row; CALL(0); }                                    \
        else { const float *s = std + col; CALL(1); }                                                  \
        done += len; row += 1; col = 0;                                                                \
    }

/* Returns 0, or -1 for an unknown dtype.  counts[0] = narrow records, counts[1] = wide records. */
int flatlora_perturb(int dtype, void *w, const float *z, const float *std, int64_t n, int64_t start,
                     int64_t cols, int out_axis, int idx64, void *idx, int16_t *xr, void *fidx, void *fval,
                     int64_t *counts) {
    records r = {idx, xr, fidx, fval, 0, 0, idx64};
    if (dtype == 0) {
#define C0(ST) perturb_run_f32((float *)w + done, z + done, s, ST, len, start + done, &r)
        WALK(C0)
    } else if (dtype == 1) {
#define C1(ST) perturb_run_bf16((uint16_t *)w + done, z + done, s, ST, len, start + done, &r)
        WALK(C1)
    } else if (dtype == 2) {
#define C2(ST) perturb_run_f16((uint16_t *)w + done, z + done, s, ST, len, start + done, &r)
        WALK(C2)
    } else {
        return -1;
    }
    counts[0] = r.n_narrow;
    counts[1] = r.n_wide;
    return 0;
}

int flatlora_restore(int dtype, void *w, const float *z, const float *std, int64_t n, int64_t start,
                     int64_t cols, int out_axis) {
    if (dtype == 0) {
#define R0(ST) restore_run_f32((float *)w + done, z + done, s, ST, len)
        WALK(R0)
    } else if (dtype == 1) {
#define R1(ST) restore_run_bf16((uint16_t *)w + done, z + done, s, ST, len)
        WALK(R1)
    } else if (dtype == 2) {
#define R2(ST) restore_run_f16((uint16_t *)w + done, z + done, s, ST, len)
        WALK(R2)
    } else {
        return -1;
    }
    return 0;
}
