/* out = residual + bias + x @ w.T with bfloat16 weights, for CPUs without bf16
 * arithmetic (AVX2 + FMA, e.g. AMD Zen 3): the weights are widened to float32 in
 * registers and multiplied with FMAs, so the step reads 2 bytes per weight and
 * never writes a float32 copy of the matrix.
 *
 * Weight layout (packed once at load, native.py: pack_bf16_weight): panels of 16
 * output rows; per panel and input column k, 16 bf16 as 8 32-bit lanes, lane i
 * holding row i in its low half and row i + 8 in its high half. One 256-bit load
 * then gives both halves as float32 with one shift (rows 0-7) and one mask (rows
 * 8-15), and each lane is one output row: x is broadcast, no horizontal sums.
 * Rows past n in the last panel are zero.
 *
 * A panel is loaded once for up to MR activation rows (12 accumulators + 2
 * weight vectors + 1 broadcast = 15 of 16 ymm registers); OpenMP shares out the
 * panels (output columns). Paths: AVX2 + FMA (the AVX-512 path takes it too:
 * with AVX-512 BW/VL the plan uses oneDNN's bf16 matmul instead), portable C.
 */
#include <stdlib.h>

#include "simd.h"

#define PANEL 16
#define MR 6

/* The tail of one panel for one activation row: 16 lanes (rows n0..) + bias + residual. */
static inline void finish(const float *acc16, int count, int64_t n0, const float *bias, const void *residual,
                          int64_t row, int64_t res_stride, void *out, int64_t out_stride, int out_bf16) {
    for (int i = 0; i < count; ++i) {
        float v = acc16[i] + (bias ? bias[n0 + i] : 0.f);
        if (residual)
            v += out_bf16 ? bf16_to_f32(((const uint16_t *)residual)[row * res_stride + n0 + i])
                          : ((const float *)residual)[row * res_stride + n0 + i];
        if (out_bf16)
            ((uint16_t *)out)[row * out_stride + n0 + i] = f32_to_bf16(v);
        else
            ((float *)out)[row * out_stride + n0 + i] = v;
    }
}

static void panel_portable(const uint16_t *wp, const float *x, int64_t xs, int64_t rows, int64_t k, int64_t n0,
                           int count, const float *bias, const void *residual, int64_t res_stride, void *out,
                           int64_t out_stride, int out_bf16) {
    for (int64_t r = 0; r < rows; ++r) {
        float acc[PANEL] = {0};
        const float *xr = x + r * xs;
        for (int64_t kk = 0; kk < k; ++kk) {
            const uint16_t *w = wp + kk * PANEL;
            for (int i = 0; i < 8; ++i) {
                acc[i] += bf16_to_f32(w[2 * i]) * xr[kk];
                acc[i + 8] += bf16_to_f32(w[2 * i + 1]) * xr[kk];
            }
        }
        finish(acc, count, n0, bias, residual, r, res_stride, out, out_stride, out_bf16);
    }
}

#if defined(__x86_64__)
ALWAYS_INLINE T256 void tile_avx2(const uint16_t *wp, const float *x, int64_t xs, int64_t k, const int R,
                                   int64_t n0, int count, const float *bias, const void *residual, int64_t res_stride,
                                   void *out, int64_t out_stride, int out_bf16, int64_t row0) {
    __m256 acc[MR][2];
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    for (int64_t kk = 0; kk < k; ++kk) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(wp + kk * PANEL));
        __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), hi = _mm256_castsi256_ps(_mm256_and_si256(w, high));
        for (int i = 0; i < R; ++i) {
            __m256 xb = _mm256_broadcast_ss(x + i * xs + kk);
            acc[i][0] = _mm256_fmadd_ps(lo, xb, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(hi, xb, acc[i][1]);
        }
    }
    for (int i = 0; i < R; ++i) {
        float a[PANEL];
        _mm256_storeu_ps(a, acc[i][0]);
        _mm256_storeu_ps(a + 8, acc[i][1]);
        finish(a, count, n0, bias, residual, row0 + i, res_stride, out, out_stride, out_bf16);
    }
}

static T256 void panel_avx2(const uint16_t *wp, const float *x, int64_t xs, int64_t rows, int64_t k, int64_t n0,
                            int count, const float *bias, const void *residual, int64_t res_stride, void *out,
                            int64_t out_stride, int out_bf16) {
#define TILE(R, AT) \
    tile_avx2(wp, x + (AT) * xs, xs, k, R, n0, count, bias, residual, res_stride, out, out_stride, out_bf16, AT)
    int64_t r = 0;
    for (; r + MR <= rows; r += MR) TILE(MR, r);
    switch (rows - r) {
    case 5: TILE(5, r); break;
    case 4: TILE(4, r); break;
    case 3: TILE(3, r); break;
    case 2: TILE(2, r); break;
    case 1: TILE(1, r); break;
    default: break;
    }
#undef TILE
}

/* 8 k-steps of one panel as 8 x 8 lanes, transposed so that vector i holds rows i and
 * i + 8 (low and high halves) for those k: two stores of 8 floats per row pair. */
static T256 void unpack_panel_avx2(const uint16_t *wp, int64_t k, int count, float *out, int64_t n0) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    int64_t kk = 0;
    for (; kk + 8 <= k; kk += 8) {
        __m256 v[8], t[8], u[8];
        for (int j = 0; j < 8; ++j) v[j] = _mm256_loadu_ps((const float *)(wp + (kk + j) * PANEL));
        for (int j = 0; j < 8; j += 2) {
            t[j] = _mm256_unpacklo_ps(v[j], v[j + 1]);
            t[j + 1] = _mm256_unpackhi_ps(v[j], v[j + 1]);
        }
        for (int j = 0; j < 8; j += 4) {
            u[j] = _mm256_shuffle_ps(t[j], t[j + 2], 0x44);
            u[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], 0xEE);
            u[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0x44);
            u[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
        }
        for (int j = 0; j < 4; ++j) {
            v[j] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20);
            v[j + 4] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
        }
        for (int i = 0; i < 8; ++i) {
            __m256i pair = _mm256_castps_si256(v[i]);
            if (i < count) _mm256_storeu_ps(out + (n0 + i) * k + kk, _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16)));
            if (i + 8 < count)
                _mm256_storeu_ps(out + (n0 + i + 8) * k + kk, _mm256_castsi256_ps(_mm256_and_si256(pair, high)));
        }
    }
    for (; kk < k; ++kk)
        for (int i = 0; i < count; ++i) out[(n0 + i) * k + kk] = bf16_to_f32(wp[kk * PANEL + (i < 8 ? 2 * i : 2 * (i - 8) + 1)]);
}
#endif

int bf16_linear_paths(void) { return cpu_paths(); }

/* x: [rows, k] float32 or bf16 (row stride x_stride); w: n x k packed (above), n
 * rounded up to whole panels; bias: float32 [n] or NULL; residual, out: [rows, n]
 * in out's dtype (residual may be NULL). xf: float32 [rows, k] scratch, used when
 * x is bf16. Returns 0, -1 for a bad argument, -2 for a path this CPU cannot run. */
int bf16_linear(int path, const void *x, int64_t x_stride, int x_bf16, int64_t rows, int64_t k, const uint16_t *w,
                int64_t n, const float *bias, const void *residual, int64_t res_stride, void *out, int64_t out_stride,
                int out_bf16, float *xf) {
    if (path < 0 || path >= NUM_PATHS || rows < 0 || k < 1 || n < 1) return -1;
    if (!(cpu_paths() & (1 << path))) return -2;
    const float *xs = (const float *)x;
    int64_t xstride = x_stride;
    if (x_bf16) {
#pragma omp parallel for schedule(static) if (rows * k >= 65536)
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t kk = 0; kk < k; ++kk) xf[r * k + kk] = bf16_to_f32(((const uint16_t *)x)[r * x_stride + kk]);
        xs = xf;
        xstride = k;
    }
    int64_t panels = (n + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; ++p) {
        const uint16_t *wp = w + p * k * PANEL;
        int count = n - p * PANEL < PANEL ? (int)(n - p * PANEL) : PANEL;
#if defined(__x86_64__)
        if (path != PATH_PORTABLE) {
            panel_avx2(wp, xs, xstride, rows, k, p * PANEL, count, bias, residual, res_stride, out, out_stride,
                       out_bf16);
            continue;
        }
#endif
        panel_portable(wp, xs, xstride, rows, k, p * PANEL, count, bias, residual, res_stride, out, out_stride,
                       out_bf16);
    }
    return 0;
}

/* The packed weight back as float32 [n, k] (for torch's matmul at large batches). */
void bf16_unpack_f32(int path, const uint16_t *w, int64_t n, int64_t k, float *out) {
    int64_t panels = (n + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; ++p) {
        const uint16_t *wp = w + p * k * PANEL;
        int count = n - p * PANEL < PANEL ? (int)(n - p * PANEL) : PANEL;
#if defined(__x86_64__)
        if (path != PATH_PORTABLE && (cpu_paths() & (1 << PATH_AVX2))) {
            unpack_panel_avx2(wp, k, count, out, p * PANEL);
            continue;
        }
#endif
        for (int i = 0; i < PANEL && p * PANEL + i < n; ++i) {
            int lane = i < 8 ? 2 * i : 2 * (i - 8) + 1;
            float *o = out + (p * PANEL + i) * k;
            for (int64_t kk = 0; kk < k; ++kk) o[kk] = bf16_to_f32(wp[kk * PANEL + lane]);
        }
    }
}
