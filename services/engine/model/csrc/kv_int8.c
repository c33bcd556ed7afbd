/* The int8 KV cache (SCALELLM_KV_CACHE_DTYPE=int8): its quantizing store, and the scale
 * pass of the decode attention's generic paths (paged_attention.c; the AVX-512 block-16
 * path applies the scales in its own loops, paged_attention_blocks.h).
 *
 * Each K and V vector of one token and one KV head (head_dim values) is stored as
 * int8 with one float32 scale, symmetric, as llama.cpp's q8_0 but one scale per head
 * vector: scale = absmax * (1/127), q = round_half_even(x * (1/scale)), so that
 * x ~ q * scale and |q| <= 127. A vector whose absmax is below 2^-64 (in practice only
 * all-zero ones) stores zeros with scale 0: no 1/0, and no subnormal in the arithmetic.
 * The scale and its reciprocal are each one float32 operation, the same on every path
 * and in kv_cache.quantize_int8 (torch), so the stores match torch bit for bit.
 *
 * Pool layout (paged_attention.h, kv_cache.py): chunks of one block of one KV head,
 * (D + 4) * block_size bytes: the int8 values as a bf16 pool lays them out (K
 * dim-major [D, block_size], V [block_size, D]), then block_size float32 scales.
 */
#include "paged_attention.h"

#define I8_MIN_AMAX 0x1p-64f

static inline float i8_scale(float amax) { return amax >= I8_MIN_AMAX ? amax * (1.f / 127.f) : 0.f; }
/* 1 / scale, from the stored scale: volatile keeps -ffast-math from rewriting 1 / (amax / 127)
 * into 127 / amax, which may differ from torch's in the last bit. */
static inline float i8_inverse(float scale) {
    volatile float stored = scale;
    return scale > 0.f ? 1.f / stored : 0.f;
}

static inline int8_t i8_round(float x) {
    float r = rintf(x); /* to nearest even, as torch.round */
    return (int8_t)(r > 127.f ? 127.f : r < -127.f ? -127.f : r);
}

/* dst[d * stride] = quantized src[d] for d < n (bf16 src); returns the scale. */
static float quantize_portable(const uint16_t *src, int8_t *dst, int64_t stride, int64_t n) {
    float amax = 0.f;
    for (int64_t d = 0; d < n; ++d) amax = fmaxf(amax, fabsf(bf16_to_f32(src[d])));
    float scale = i8_scale(amax), inv = i8_inverse(scale);
    for (int64_t d = 0; d < n; ++d) dst[d * stride] = i8_round(bf16_to_f32(src[d]) * inv);
    return scale;
}

#if defined(__x86_64__)
static T256 float quantize_avx2(const uint16_t *src, int8_t *dst, int64_t stride, int64_t n) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 m = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= n; d += 8) m = _mm256_max_ps(m, _mm256_and_ps(ld8_bf16(src + d), abs_mask));
    float amax = hmax8(m);
    for (int64_t t = d; t < n; ++t) amax = fmaxf(amax, fabsf(bf16_to_f32(src[t])));
    float scale = i8_scale(amax), inv = i8_inverse(scale);
    __m256 iv = _mm256_set1_ps(inv);
    for (d = 0; d + 8 <= n; d += 8) {
        __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(ld8_bf16(src + d), iv)); /* MXCSR: to nearest even */
        __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        int8_t bytes[16];
        _mm_storeu_si128((__m128i *)bytes, _mm_packs_epi16(w, w)); /* |r| <= 127: no saturation */
        for (int i = 0; i < 8; ++i) dst[(d + i) * stride] = bytes[i];
    }
    for (; d < n; ++d) dst[d * stride] = i8_round(bf16_to_f32(src[d]) * inv);
    return scale;
}

static T512 float quantize_avx512(const uint16_t *src, int8_t *dst, int64_t stride, int64_t n) {
    __m512 m = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= n; d += 16) m = _mm512_max_ps(m, _mm512_abs_ps(ld16_bf16(src + d)));
    float amax = _mm512_reduce_max_ps(m);
    for (int64_t t = d; t < n; ++t) amax = fmaxf(amax, fabsf(bf16_to_f32(src[t])));
    float scale = i8_scale(amax), inv = i8_inverse(scale);
    __m512 iv = _mm512_set1_ps(inv);
    for (d = 0; d + 16 <= n; d += 16) {
        __m128i q = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(ld16_bf16(src + d), iv)));
        if (stride == 1) {
            _mm_storeu_si128((__m128i *)(dst + d), q);
        } else {
            int8_t bytes[16];
            _mm_storeu_si128((__m128i *)bytes, q);
            for (int i = 0; i < 16; ++i) dst[(d + i) * stride] = bytes[i];
        }
    }
    for (; d < n; ++d) dst[d * stride] = i8_round(bf16_to_f32(src[d]) * inv);
    return scale;
}
#endif

static float quantize(int path, const uint16_t *src, int8_t *dst, int64_t stride, int64_t n) {
#if defined(__x86_64__)
    if (path == PATH_AVX512) return quantize_avx512(src, dst, stride, n);
    if (path == PATH_AVX2) return quantize_avx2(src, dst, stride, n);
#endif
    return quantize_portable(src, dst, stride, n);
}

PA_INTERNAL void kv_i8_store_bf16(int path, const uint16_t *k, const uint16_t *v, char *k_chunk, char *v_chunk,
                                  int64_t offset, int64_t D, int64_t bs) {
    ((float *)(k_chunk + D * bs))[offset] = quantize(path, k, (int8_t *)k_chunk + offset, bs, D);
    ((float *)(v_chunk + D * bs))[offset] = quantize(path, v, (int8_t *)v_chunk + offset * D, 1, D);
}

PA_INTERNAL void pa_i8_scale_rows(const void *cache, const int64_t *table, int64_t kv_heads, int64_t h, int64_t D,
                                  int64_t bs, int64_t ctx, int NG, float *sc, int64_t sc_stride) {
    int64_t chunk = (D + 4) * bs;
    for (int64_t start = 0, b = 0; start < ctx; start += bs, ++b) {
        const float *scales = (const float *)((const char *)cache + (table[b] * kv_heads + h) * chunk + D * bs);
        int64_t n = ctx - start < bs ? ctx - start : bs;
        for (int g = 0; g < NG; ++g) {
            float *row = sc + g * sc_stride + start;
            for (int64_t j = 0; j < n; ++j) row[j] *= scales[j];
        }
    }
}
