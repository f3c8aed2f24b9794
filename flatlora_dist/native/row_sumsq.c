/* Partial squared row norms of W + s·(B·A) over one chunk of a weight's flat storage (norms.py, CPU).
 *
 * The storage is (rows, cols).  out_axis 0 (nn.Linear): output feature = storage row, input = column;
 * out_axis 1 (fan_in_fan_out): output feature = storage column, input = row.  Per element
 *   d = sum_k b[o][k]·a[k][i]   (k ascending, float32; multi-adapter sums come stacked along k)
 *   x = f32(w) + s·d            (float32, one rounding per operation: no -ffast-math, no contraction)
 * and x² is summed per output feature.  out_axis 0: out[row - first_row] = the sum over the chunk's
 * part of that row, in 16 lanes indexed from the part's first element, the lanes then added in a fixed
 * tree, so a whole row's sum depends only on the row, never on where the chunk boundaries fall.
 * out_axis 1: out[col] += x² row by row (out has `cols` entries, zeroed by the caller).
 * a: (R, in) row-major.  bo: B as (out, R) for out_axis 0, as (R, out) (B transposed) for out_axis 1, so
 * the inner loops run along contiguous memory.
 */
#include "storage.h"

#define TILE 1024
#define LANES 16

/* GCC/Clang vector extension: LANES floats, lowered to whatever vector width the CPU has. */
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
static inline vec vload(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }

static float lanes_total(const float *l) {
    float t[LANES / 2];
    for (int i = 0; i < LANES / 2; i++) t[i] = l[i] + l[i + LANES / 2];
    for (int h = LANES / 4; h >= 1; h /= 2)
        for (int i = 0; i < h; i++) t[i] = t[i] + t[i + h];
    return t[0];
}

/* One part of storage row `row`: columns [col, col + len). */
static float part_axis0(int dtype, const void *w, int64_t len, int64_t row, int64_t col, const float *a,
                        const float *bo, int64_t rank, int64_t in, float s) {
    vec acc = {0};
    float x[TILE];
    const float *brow = bo + row * rank;
    for (int64_t t0 = 0; t0 < len; t0 += TILE) {
        int64_t m = len - t0 < TILE ? len - t0 : TILE, j = 0;
        const float *a0 = a + col + t0;
        load_f32(dtype, (const char *)w + t0 * (dtype == 0 ? 4 : 2), m, x);
        for (; j + LANES <= m; j += LANES) { /* d stays in one vector register across k */
            vec d = brow[0] * vload(a0 + j);
            for (int64_t k = 1; k < rank; k++) d = d + brow[k] * vload(a0 + k * in + j);
            vec v = vload(x + j) + s * d;
            acc = acc + v * v;
        }
        for (int l = 0; j < m; j++, l++) {
            float d = brow[0] * a0[j];
            for (int64_t k = 1; k < rank; k++) d = d + brow[k] * a0[k * in + j];
            float v = x[j] + s * d;
            acc[l] = acc[l] + v * v;
        }
    }
    float lanes[LANES];
    memcpy(lanes, &acc, sizeof lanes);
    return lanes_total(lanes);
}

/* One part of storage row `row` (an input feature): columns (output features) [col, col + len). */
static void part_axis1(int dtype, const void *w, int64_t len, int64_t row, int64_t col, const float *a,
                       const float *bo, int64_t rank, int64_t in, int64_t out_f, float s, float *out) {
    float x[TILE], d[TILE];
    for (int64_t t0 = 0; t0 < len; t0 += TILE) {
        int64_t m = len - t0 < TILE ? len - t0 : TILE, c = col + t0;
        const float a0 = a[row];
        for (int64_t j = 0; j < m; j++) d[j] = bo[c + j] * a0;
        for (int64_t k = 1; k < rank; k++) {
            const float ak = a[k * in + row], *bk = bo + k * out_f + c;
            for (int64_t j = 0; j < m; j++) d[j] = d[j] + bk[j] * ak;
        }
        load_f32(dtype, (const char *)w + t0 * (dtype == 0 ? 4 : 2), m, x);
        for (int64_t j = 0; j < m; j++) {
            float v = x[j] + s * d[j];
            out[c + j] = out[c + j] + v * v;
        }
    }
}

/* Elements [start, start + n) of the flat storage, w pointing at element `start`.  Returns 0, or -1 for
 * an unknown dtype or out_axis. */
int flatlora_row_sumsq(int dtype, const void *w, int64_t n, int64_t start, int64_t rows, int64_t cols,
                       int out_axis, const float *a, const float *bo, int64_t rank, float s, float *out) {
    if (dtype < 0 || dtype > 2 || out_axis < 0 || out_axis > 1) return -1;
    const int64_t esize = dtype == 0 ? 4 : 2, in = out_axis == 0 ? cols : rows;
    int64_t done = 0, row = start / cols, col = start % cols, first = row;
    while (done < n) {
        int64_t len = cols - col < n - done ? cols - col : n - done;
        const void *p = (const char *)w + done * esize;
        if (out_axis == 0) out[row - first] = part_axis0(dtype, p, len, row, col, a, bo, rank, in, s);
        else part_axis1(dtype, p, len, row, col, a, bo, rank, in, cols, s, out);
        done += len;
        row += 1;
        col = 0;
    }
    return 0;
}
