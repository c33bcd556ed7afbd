/* The sampler's greedy pick on the CPU: each row's highest float32 logit. torch's
 * max(dim=-1) reads a c64 step's logits (64 x 49152, just written by the LM head, out of
 * cache by then) at about a third of memory speed: 1.9-2.0 ms against 0.6 ms here
 * (Intel Xeon SPR, 2 threads). AVX-512, AVX2 + FMA and portable paths (simd.h).
 * Built with the other kernels by native_build.py. */
#include "simd.h"

#include <omp.h>
#include <string.h>

/* ---- out[r] = the index of row r's highest float32 value: the sampler's greedy pick ----
 *
 * As torch.max(dim=-1).indices and argmax: the first of equal highest values, and a NaN
 * counts as the highest (the first NaN wins). NaN is told by its bits: -ffast-math lets
 * the compiler assume that x != x never holds. The vector paths keep, per lane, the
 * highest value and where it was first seen (strictly greater replaces), so the row's
 * answer is the lowest index among the lanes that hold its highest value. */

typedef struct {
    float value;
    int64_t index; /* of the first highest value, from the span's start */
    int64_t nan;   /* of the first NaN, or -1 */
} span_best;

static inline int is_nan_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x7FFFFFFFu) > 0x7F800000u;
}

/* The best of x[from, n), starting from b (whose index is below from). */
static span_best best_tail(const float *x, int64_t from, int64_t n, span_best b) {
    for (int64_t i = from; i < n; ++i) {
        if (is_nan_f32(x[i])) {
            b.nan = i;
            return b;
        }
        if (x[i] > b.value) {
            b.value = x[i];
            b.index = i;
        }
    }
    return b;
}

static span_best best_scalar(const float *x, int64_t n) {
    span_best b = {x[0], 0, -1};
    if (is_nan_f32(x[0])) {
        b.nan = 0;
        return b;
    }
    return best_tail(x, 1, n, b);
}

/* The lane holding the highest value, the lowest index among equals; idx: each lane's index. */
static span_best best_of_lanes(const float *value, const int32_t *idx, int lanes) {
    span_best b = {value[0], idx[0], -1};
    for (int l = 1; l < lanes; ++l)
        if (value[l] > b.value || (value[l] == b.value && idx[l] < b.index)) {
            b.value = value[l];
            b.index = idx[l];
        }
    return b;
}

static span_best first_nan(const float *x, int64_t n, span_best b) {
    for (int64_t i = 0; i < n; ++i)
        if (is_nan_f32(x[i])) {
            b.nan = i;
            break;
        }
    return b;
}

#if defined(__x86_64__)
/* All ones in the lanes that hold a NaN (exponent all ones, mantissa not 0). */
ALWAYS_INLINE T256 __m256i nan8(__m256 v) {
    __m256i magnitude = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7FFFFFFF));
    return _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7F800000));
}

/* Four accumulators of 8 lanes; a lane's index is kept as the start of its 32-wide block. */
static T256 span_best best_avx2(const float *x, int64_t n) {
    if (n < 32) return best_scalar(x, n);
    __m256 m[4];
    __m256i at[4], nan = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
        m[j] = _mm256_loadu_ps(x + 8 * j);
        at[j] = _mm256_setzero_si256();
        nan = _mm256_or_si256(nan, nan8(m[j]));
    }
    int64_t d = 32;
    for (; d + 32 <= n; d += 32) {
        const __m256i base = _mm256_set1_epi32((int)d);
        for (int j = 0; j < 4; ++j) {
            __m256 v = _mm256_loadu_ps(x + d + 8 * j);
            __m256i gt = _mm256_castps_si256(_mm256_cmp_ps(v, m[j], _CMP_GT_OQ));
            m[j] = _mm256_max_ps(m[j], v);
            at[j] = _mm256_blendv_epi8(at[j], base, gt);
            nan = _mm256_or_si256(nan, nan8(v));
        }
    }
    float value[32];
    int32_t idx[32];
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int j = 0; j < 4; ++j) {
        _mm256_storeu_ps(value + 8 * j, m[j]);
        __m256i index = _mm256_add_epi32(at[j], _mm256_add_epi32(lane, _mm256_set1_epi32(8 * j)));
        _mm256_storeu_si256((__m256i *)(idx + 8 * j), index);
    }
    span_best b = best_tail(x, d, n, best_of_lanes(value, idx, 32));
    return _mm256_testz_si256(nan, nan) ? b : first_nan(x, n, b);
}

/* As best_avx2, with four accumulators of 16 lanes; fpclass 0x81: quiet or signalling NaN. */
static T512 span_best best_avx512(const float *x, int64_t n) {
    if (n < 64) return best_scalar(x, n);
    __m512 m[4];
    __m512i at[4];
    __mmask16 nan = 0;
    for (int j = 0; j < 4; ++j) {
        m[j] = _mm512_loadu_ps(x + 16 * j);
        at[j] = _mm512_setzero_si512();
        nan |= _mm512_fpclass_ps_mask(m[j], 0x81);
    }
    int64_t d = 64;
    for (; d + 64 <= n; d += 64) {
        const __m512i base = _mm512_set1_epi32((int)d);
        for (int j = 0; j < 4; ++j) {
            __m512 v = _mm512_loadu_ps(x + d + 16 * j);
            __mmask16 gt = _mm512_cmp_ps_mask(v, m[j], _CMP_GT_OQ);
            m[j] = _mm512_max_ps(m[j], v);
            at[j] = _mm512_mask_mov_epi32(at[j], gt, base);
            nan |= _mm512_fpclass_ps_mask(v, 0x81);
        }
    }
    float value[64];
    int32_t idx[64];
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int j = 0; j < 4; ++j) {
        _mm512_storeu_ps(value + 16 * j, m[j]);
        __m512i index = _mm512_add_epi32(at[j], _mm512_add_epi32(lane, _mm512_set1_epi32(16 * j)));
        _mm512_storeu_si512(idx + 16 * j, index);
    }
    span_best b = best_tail(x, d, n, best_of_lanes(value, idx, 64));
    return nan ? first_nan(x, n, b) : b;
}
#endif

static span_best span_best_of(int path, const float *x, int64_t n) {
#if defined(__x86_64__)
    if (path == PATH_AVX512) return best_avx512(x, n);
    if (path == PATH_AVX2) return best_avx2(x, n);
#endif
    (void)path;
    return best_scalar(x, n);
}

/* Below this many values a row is not split between threads (a fork costs a few us). */
#ifndef ARGMAX_MIN_SPAN
#define ARGMAX_MIN_SPAN 16384
#endif
#define ARGMAX_MAX_PARTS 256

/* x: rows of cols float32, row r at x + r * stride; out: int64 [rows]. Fewer rows than
 * threads: each row is split into spans, one per thread, whose bests are joined in order.
 * Returns 0, or -1 for a shape it does not take (cols outside [1, 2^31)). */
int argmax_f32(int path, const float *x, int64_t stride, int64_t rows, int64_t cols, int64_t *out) {
    if (cols < 1 || cols > INT32_MAX || rows < 0) return -1;
    int64_t threads = omp_get_max_threads(), spans = 1;
    if (rows > 0 && rows < threads) spans = (threads + rows - 1) / rows;
    if (spans > cols / ARGMAX_MIN_SPAN) spans = cols / ARGMAX_MIN_SPAN > 0 ? cols / ARGMAX_MIN_SPAN : 1;
    if (rows * spans > ARGMAX_MAX_PARTS) spans = 1;
    span_best part[ARGMAX_MAX_PARTS];
#pragma omp parallel for schedule(static) if (spans > 1 || rows * cols >= 65536)
    for (int64_t t = 0; t < rows * spans; ++t) {
        const int64_t r = t / spans, s = t % spans, from = s * cols / spans, to = (s + 1) * cols / spans;
        span_best b = span_best_of(path, x + r * stride + from, to - from);
        b.index += from;
        b.nan = b.nan < 0 ? -1 : b.nan + from;
        if (spans == 1)
            out[r] = b.nan < 0 ? b.index : b.nan;
        else
            part[t] = b;
    }
    if (spans > 1)
        for (int64_t r = 0; r < rows; ++r) {
            span_best b = part[r * spans];
            for (int64_t s = 1; s < spans && b.nan < 0; ++s) {
                const span_best p = part[r * spans + s];
                if (p.nan >= 0)
                    b.nan = p.nan;
                else if (p.value > b.value)
                    b = p;
            }
            out[r] = b.nan < 0 ? b.index : b.nan;
        }
    return 0;
}
