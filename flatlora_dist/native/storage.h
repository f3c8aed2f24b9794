/* Storage types of the native kernels: 0 = float32, 1 = bfloat16, 2 = float16, loaded to float32 and
 * rounded back exactly as c10 does (bfloat16: round to nearest even by bit operations; float16: the
 * compiler's _Float16 conversions, IEEE round to nearest even). */
#ifndef FLATLORA_STORAGE_H
#define FLATLORA_STORAGE_H
#include <stdint.h>
#include <string.h>

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float bf16_load(uint16_t h) { return bits_f32((uint32_t)h << 16); }
static inline uint16_t bf16_round(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN, as c10::BFloat16 */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline float f16_load(uint16_t h) { _Float16 x; memcpy(&x, &h, 2); return (float)x; }
static inline uint16_t f16_round(float f) { _Float16 x = (_Float16)f; uint16_t h; memcpy(&h, &x, 2); return h; }

/* Elements [0, n) of storage of type `dtype` as float32 into out[0, n). */
static inline void load_f32(int dtype, const void *w, int64_t n, float *out) {
    if (dtype == 0) {
        memcpy(out, w, (size_t)n * 4);
    } else if (dtype == 1) {
        const uint16_t *h = (const uint16_t *)w;
        for (int64_t j = 0; j < n; j++) out[j] = bf16_load(h[j]);
    } else {
        const uint16_t *h = (const uint16_t *)w;
        for (int64_t j = 0; j < n; j++) out[j] = f16_load(h[j]);
    }
}

#endif
