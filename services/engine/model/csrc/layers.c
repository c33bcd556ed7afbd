/* Fused bfloat16 element-wise steps of a decoder layer, on the CPU.
 *
 * In torch each of these is 3-12 small ops, and at the model sizes this
 * engine runs on the CPU their dispatch cost is a visible share of a decode
 * step. Rounding follows transformers where it rounds (after the normalisation,
 * before the weight); elsewhere values stay in float32 until stored.
 * Each has an AVX-512, an AVX2 + FMA and a portable path (simd.h). The vector
 * paths round to bf16 where the portable one does, but sum in another order
 * (RMSNorm) and take SiLU's exponential from a polynomial (~2e-7 relative) and
 * its reciprocal from rcp + a Newton step, so a value may differ in its last bf16
 * bit. The AVX-512 code reads 32 bf16 at a time as the even and odd halves of 16
 * 32-bit lanes (no shuffles) and writes them back the same way; at prefill sizes
 * these kernels are bound by instruction count, not memory (the rows are in L2).
 * Built with paged_attention.c by native.py.
 */
#include "paged_attention.h" /* rope_store_decode_bf16 calls its decode attention */
#include "simd.h"

#include <omp.h>

/* ---- RMSNorm: out[r] = weight * bf16(x[r] / rms(x[r])); x rows may be strided ---- */

static void rms_row_portable(const uint16_t *xr, const uint16_t *weight, uint16_t *o, int64_t dim, float eps) {
    float sum = 0.f;
    for (int64_t d = 0; d < dim; ++d) {
        float v = bf16_to_f32(xr[d]);
        sum += v * v;
    }
    float inv = 1.f / sqrtf(sum / (float)dim + eps);
    for (int64_t d = 0; d < dim; ++d) o[d] = f32_to_bf16(bf16_to_f32(weight[d]) * round_bf16(bf16_to_f32(xr[d]) * inv));
}

#if defined(__x86_64__)
static T256 void rms_row_avx2(const uint16_t *xr, const uint16_t *weight, uint16_t *o, int64_t dim, float eps) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 32 <= dim; d += 32) {
        __m256 a = ld8_bf16(xr + d), b = ld8_bf16(xr + d + 8), c = ld8_bf16(xr + d + 16), e = ld8_bf16(xr + d + 24);
        s0 = _mm256_fmadd_ps(a, a, s0);
        s1 = _mm256_fmadd_ps(b, b, s1);
        s2 = _mm256_fmadd_ps(c, c, s2);
        s3 = _mm256_fmadd_ps(e, e, s3);
    }
    for (; d + 8 <= dim; d += 8) {
        __m256 v = ld8_bf16(xr + d);
        s0 = _mm256_fmadd_ps(v, v, s0);
    }
    float sum = hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (int64_t t = d; t < dim; ++t) sum += bf16_to_f32(xr[t]) * bf16_to_f32(xr[t]);
    float inv = 1.f / sqrtf(sum / (float)dim + eps);
    __m256 iv = _mm256_set1_ps(inv);
    for (d = 0; d + 8 <= dim; d += 8) {
        __m128i normed = cvt8_bf16(_mm256_mul_ps(ld8_bf16(xr + d), iv));
        __m256 n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(normed), 16));
        st8_bf16(o + d, _mm256_mul_ps(ld8_bf16(weight + d), n));
    }
    for (; d < dim; ++d) o[d] = f32_to_bf16(bf16_to_f32(weight[d]) * round_bf16(bf16_to_f32(xr[d]) * inv));
}

/* 32 bf16 as two float32 vectors without shuffles: the even elements (the low halves
 * of the 32-bit lanes, shifted up) and the odd ones (the high halves, masked). */
#define BF16_EVEN(v) _mm512_castsi512_ps(_mm512_slli_epi32(v, 16))
#define BF16_ODD(v) _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)))

/* f32_to_bf16's rounding, left in the high half of each lane (the low half is garbage). */
ALWAYS_INLINE T512 __m512i round_hi_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
}

/* round_bf16 on 16 lanes: the value rounded to bf16, as a float32. */
ALWAYS_INLINE T512 __m512 round16_bf16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_and_si512(round_hi_bf16(v), _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* 32 bf16 from the even and odd float32 lanes of BF16_EVEN / BF16_ODD, rounded, back in order. */
ALWAYS_INLINE T512 void st32_bf16(uint16_t *p, __m512 even, __m512 odd) {
    __m512i lo = _mm512_srli_epi32(round_hi_bf16(even), 16);
    /* (odd & 0xFFFF0000) | lo */
    __m512i v = _mm512_ternarylogic_epi32(round_hi_bf16(odd), _mm512_set1_epi32((int)0xFFFF0000u), lo, 0xEA);
    _mm512_storeu_si512(p, v);
}

static T512 void rms_row_avx512(const uint16_t *xr, const uint16_t *weight, uint16_t *o, int64_t dim, float eps) {
    /* Four sums: one would wait on the FMA latency at every step. */
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 64 <= dim; d += 64) {
        __m512i a = _mm512_loadu_si512(xr + d), b = _mm512_loadu_si512(xr + d + 32);
        __m512 a0 = BF16_EVEN(a), a1 = BF16_ODD(a), b0 = BF16_EVEN(b), b1 = BF16_ODD(b);
        s0 = _mm512_fmadd_ps(a0, a0, s0);
        s1 = _mm512_fmadd_ps(a1, a1, s1);
        s2 = _mm512_fmadd_ps(b0, b0, s2);
        s3 = _mm512_fmadd_ps(b1, b1, s3);
    }
    for (; d + 16 <= dim; d += 16) {
        __m512 v = ld16_bf16(xr + d);
        s0 = _mm512_fmadd_ps(v, v, s0);
    }
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    for (int64_t t = d; t < dim; ++t) sum += bf16_to_f32(xr[t]) * bf16_to_f32(xr[t]);
    float inv = 1.f / sqrtf(sum / (float)dim + eps);
    __m512 iv = _mm512_set1_ps(inv);
    for (d = 0; d + 32 <= dim; d += 32) {
        __m512i x = _mm512_loadu_si512(xr + d), w = _mm512_loadu_si512(weight + d);
        __m512 even = _mm512_mul_ps(BF16_EVEN(w), round16_bf16(_mm512_mul_ps(BF16_EVEN(x), iv)));
        __m512 odd = _mm512_mul_ps(BF16_ODD(w), round16_bf16(_mm512_mul_ps(BF16_ODD(x), iv)));
        st32_bf16(o + d, even, odd);
    }
    for (; d + 16 <= dim; d += 16) {
        __m512 n = round16_bf16(_mm512_mul_ps(ld16_bf16(xr + d), iv));
        _mm256_storeu_si256((__m256i *)(o + d), cvt16_bf16(_mm512_mul_ps(ld16_bf16(weight + d), n)));
    }
    for (; d < dim; ++d) o[d] = f32_to_bf16(bf16_to_f32(weight[d]) * round_bf16(bf16_to_f32(xr[d]) * inv));
}
#endif

void rms_norm_bf16(int path, const uint16_t *x, int64_t x_stride, const uint16_t *weight, uint16_t *out,
                   int64_t rows, int64_t dim, float eps) {
#pragma omp parallel for schedule(static) if (rows * dim >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
#if defined(__x86_64__)
        if (path == PATH_AVX512)
            rms_row_avx512(x + r * x_stride, weight, out + r * dim, dim, eps);
        else if (path == PATH_AVX2)
            rms_row_avx2(x + r * x_stride, weight, out + r * dim, dim, eps);
        else
#endif
            rms_row_portable(x + r * x_stride, weight, out + r * dim, dim, eps);
    }
}

/* ---- RoPE + KV store ----
 * Rotate q and k in place inside the fused qkv rows ([T, (H + 2 KV) * D], half-split
 * rotation as in transformers' rotate_half), then store k and v at their slots in the
 * pool: K [num_blocks, KV, D, block_size], V [num_blocks, KV, block_size, D] (see
 * paged_attention.c), in bf16 or fp8 e5m2 (kv_fmt: FMT_BF16 or FMT_E5M2, simd.h), or
 * int8 with a scale per token and KV head (FMT_I8, paged_attention.h; kv_int8.c
 * quantizes); 8-bit formats are rounded from the bf16 k/v left in qkv, as the torch
 * path's k.to(float8_e5m2) (kv_cache.quantize_int8 for int8).
 * cos/sin: [max_positions, D / 2] float32. */

/* dst[0, n) = e5m2(src[0, n)). */
static void e5m2_row_portable(const uint16_t *src, uint8_t *dst, int64_t n) {
    for (int64_t d = 0; d < n; ++d) dst[d] = f32_to_e5m2(bf16_to_f32(src[d]));
}

#if defined(__x86_64__)
static T256 void e5m2_row_avx2(const uint16_t *src, uint8_t *dst, int64_t n) {
    int64_t d = 0;
    for (; d + 8 <= n; d += 8) st8_e5m2(dst + d, ld8_bf16(src + d));
    e5m2_row_portable(src + d, dst + d, n - d);
}

static T512 void e5m2_row_avx512(const uint16_t *src, uint8_t *dst, int64_t n) {
    int64_t d = 0;
    for (; d + 16 <= n; d += 16) _mm_storeu_si128((__m128i *)(dst + d), cvt16_e5m2(ld16_bf16(src + d)));
    e5m2_row_portable(src + d, dst + d, n - d);
}
#endif

static void e5m2_row(int path, const uint16_t *src, uint8_t *dst, int64_t n) {
#if defined(__x86_64__)
    if (path == PATH_AVX512) {
        e5m2_row_avx512(src, dst, n);
        return;
    }
    if (path == PATH_AVX2) {
        e5m2_row_avx2(src, dst, n);
        return;
    }
#endif
    e5m2_row_portable(src, dst, n);
}

static void rotate_portable(uint16_t *x, const float *c, const float *s, int64_t half) {
    for (int64_t d = 0; d < half; ++d) {
        float x1 = bf16_to_f32(x[d]), x2 = bf16_to_f32(x[d + half]);
        x[d] = f32_to_bf16(x1 * c[d] - x2 * s[d]);
        x[d + half] = f32_to_bf16(x2 * c[d] + x1 * s[d]);
    }
}

#if defined(__x86_64__)
static T256 void rotate_avx2(uint16_t *x, const float *c, const float *s, int64_t half) {
    int64_t d = 0;
    for (; d + 8 <= half; d += 8) {
        __m256 x1 = ld8_bf16(x + d), x2 = ld8_bf16(x + d + half);
        __m256 cv = _mm256_loadu_ps(c + d), sv = _mm256_loadu_ps(s + d);
        st8_bf16(x + d, _mm256_sub_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x2, sv)));
        st8_bf16(x + d + half, _mm256_add_ps(_mm256_mul_ps(x2, cv), _mm256_mul_ps(x1, sv)));
    }
    for (; d < half; ++d) {
        float x1 = bf16_to_f32(x[d]), x2 = bf16_to_f32(x[d + half]);
        x[d] = f32_to_bf16(x1 * c[d] - x2 * s[d]);
        x[d + half] = f32_to_bf16(x2 * c[d] + x1 * s[d]);
    }
}

/* Every head of one token's row (q and k heads, adjacent), halves a multiple of 32 and at most
 * 256: 32 pairs per step, in the even / odd lanes of BF16_EVEN / BF16_ODD, so cos and sin
 * are split the same way, once per token. */
static T512 void rotate_row_avx512(uint16_t *row, int64_t num_heads, int64_t head_dim, const float *c, const float *s) {
    int64_t half = head_dim / 2, chunks = half / 32;
    __m512 ce[8], co[8], se[8], so[8];
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int64_t k = 0; k < chunks; ++k) {
        __m512 c0 = _mm512_loadu_ps(c + 32 * k), c1 = _mm512_loadu_ps(c + 32 * k + 16);
        __m512 s0 = _mm512_loadu_ps(s + 32 * k), s1 = _mm512_loadu_ps(s + 32 * k + 16);
        ce[k] = _mm512_permutex2var_ps(c0, even, c1);
        co[k] = _mm512_permutex2var_ps(c0, odd, c1);
        se[k] = _mm512_permutex2var_ps(s0, even, s1);
        so[k] = _mm512_permutex2var_ps(s0, odd, s1);
    }
    for (int64_t h = 0; h < num_heads; ++h) {
        for (int64_t k = 0; k < chunks; ++k) {
            uint16_t *x = row + h * head_dim + 32 * k;
            __m512i a = _mm512_loadu_si512(x), b = _mm512_loadu_si512(x + half);
            __m512 ae = BF16_EVEN(a), ao = BF16_ODD(a), be = BF16_EVEN(b), bo = BF16_ODD(b);
            st32_bf16(x, _mm512_fmsub_ps(ae, ce[k], _mm512_mul_ps(be, se[k])),
                      _mm512_fmsub_ps(ao, co[k], _mm512_mul_ps(bo, so[k])));
            st32_bf16(x + half, _mm512_fmadd_ps(be, ce[k], _mm512_mul_ps(ae, se[k])),
                      _mm512_fmadd_ps(bo, co[k], _mm512_mul_ps(ao, so[k])));
        }
    }
}
#endif

void rope_store_bf16(int path, uint16_t *qkv, int64_t qkv_stride, const int64_t *positions, const float *cos_table,
                     const float *sin_table, const int64_t *slots, int kv_fmt, void *k_cache, void *v_cache,
                     int64_t tokens, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size) {
    int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (tokens >= 16)
    for (int64_t t = 0; t < tokens; ++t) {
        uint16_t *row = qkv + t * qkv_stride;
        const float *c = cos_table + positions[t] * half;
        const float *s = sin_table + positions[t] * half;
#if defined(__x86_64__)
        if (path == PATH_AVX512 && half % 32 == 0 && half <= 256) {
            rotate_row_avx512(row, heads + kv_heads, head_dim, c, s);
        } else
#endif
        for (int64_t h = 0; h < heads + kv_heads; ++h) {
#if defined(__x86_64__)
            /* other head sizes: the AVX2 code */
            if (path != PATH_PORTABLE) {
                rotate_avx2(row + h * head_dim, c, s, half);
                continue;
            }
#endif
            rotate_portable(row + h * head_dim, c, s, half);
        }
        int64_t slot = slots[t];
        int64_t block = slot / block_size, offset = slot % block_size;
        for (int64_t h = 0; h < kv_heads; ++h) {
            const uint16_t *k = row + (heads + h) * head_dim;
            const uint16_t *v = row + (heads + kv_heads + h) * head_dim;
            int64_t k_at = (block * kv_heads + h) * head_dim * block_size + offset;
            int64_t v_at = ((block * kv_heads + h) * block_size + offset) * head_dim;
            if (kv_fmt == FMT_I8) {
                int64_t chunk = (block * kv_heads + h) * (head_dim + 4) * block_size;
                kv_i8_store_bf16(path, k, v, (char *)k_cache + chunk, (char *)v_cache + chunk, offset, head_dim,
                                 block_size);
            } else if (kv_fmt == FMT_E5M2) {
                uint8_t *kd = (uint8_t *)k_cache + k_at, kb[64];
                /* K is strided in the pool: converted 64 dims at a time, then scattered */
                for (int64_t d0 = 0; d0 < head_dim; d0 += 64) {
                    int64_t n = head_dim - d0 < 64 ? head_dim - d0 : 64;
                    e5m2_row(path, k + d0, kb, n);
                    for (int64_t d = 0; d < n; ++d) kd[(d0 + d) * block_size] = kb[d];
                }
                e5m2_row(path, v, (uint8_t *)v_cache + v_at, head_dim);
            } else {
                uint16_t *kd = (uint16_t *)k_cache + k_at;
                for (int64_t d = 0; d < head_dim; ++d) kd[d * block_size] = k[d];
                memcpy((uint16_t *)v_cache + v_at, v, sizeof(uint16_t) * head_dim);
            }
        }
    }
}

/* A step of decodes only (token t is sequence t's one new token): rope_store_bf16, then the
 * decode attention of the rotated q rows over the pool, into out [tokens, heads * head_dim]:
 * one call per layer instead of two. block_tables [tokens, max_blocks], context_lens [tokens]
 * as paged_decode_attention takes them; returns its status (0: done). */
int rope_store_decode_bf16(int path, uint16_t *qkv, int64_t qkv_stride, const int64_t *positions,
                           const float *cos_table, const float *sin_table, const int64_t *slots, int kv_fmt,
                           void *k_cache, void *v_cache, int64_t tokens, int64_t heads, int64_t kv_heads,
                           int64_t head_dim, int64_t block_size, const int64_t *block_tables, int64_t max_blocks,
                           const int64_t *context_lens, uint16_t *out, float scale) {
    rope_store_bf16(path, qkv, qkv_stride, positions, cos_table, sin_table, slots, kv_fmt, k_cache, v_cache, tokens,
                    heads, kv_heads, head_dim, block_size);
    return paged_decode_attention(path, FMT_BF16, kv_fmt, qkv, qkv_stride, head_dim, k_cache, v_cache, block_tables,
                                  max_blocks, context_lens, out, tokens, heads, kv_heads, head_dim, block_size, scale);
}

/* ---- out[r] = silu(gate) * up for rows [gate | up] of width 2 * inter ---- */

static void silu_row_portable(const uint16_t *g, const uint16_t *u, uint16_t *o, int64_t n) {
    for (int64_t d = 0; d < n; ++d) {
        float x = bf16_to_f32(g[d]);
        /* -x clamped: expf's infinity would give NaN under -ffast-math (x / inf is not kept as 0) */
        o[d] = f32_to_bf16(x / (1.f + expf(fminf(-x, 88.f))) * bf16_to_f32(u[d]));
    }
}

#if defined(__x86_64__)
static T256 void silu_row_avx2(const uint16_t *g, const uint16_t *u, uint16_t *o, int64_t n) {
    int64_t d = 0;
    const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
    for (; d + 8 <= n; d += 8) {
        __m256 x = ld8_bf16(g + d);
        __m256 den = _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, x)));
        /* rcp (12 bits) and one Newton step (~2^-23) instead of a division */
        __m256 inv = _mm256_rcp_ps(den);
        inv = _mm256_fmadd_ps(inv, _mm256_fnmadd_ps(den, inv, one), inv);
        st8_bf16(o + d, _mm256_mul_ps(_mm256_mul_ps(x, inv), ld8_bf16(u + d)));
    }
    silu_row_portable(g + d, u + d, o + d, n - d);
}

/* silu(x) = x / (1 + exp(-x)): simd.h's exp16, and the reciprocal from rcp14 and one
 * Newton step (~2^-28 relative) instead of a division, whose throughput (one per ~16
 * cycles) bounded this kernel. */
ALWAYS_INLINE T512 __m512 silu16(__m512 x) {
    __m512 den = _mm512_add_ps(exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)), _mm512_set1_ps(1.f));
    __m512 inv = _mm512_rcp14_ps(den);
    inv = _mm512_fmadd_ps(inv, _mm512_fnmadd_ps(den, inv, _mm512_set1_ps(1.f)), inv);
    return _mm512_mul_ps(x, inv);
}

static T512 void silu_row_avx512(const uint16_t *g, const uint16_t *u, uint16_t *o, int64_t n) {
    int64_t d = 0;
    for (; d + 32 <= n; d += 32) {
        __m512i gv = _mm512_loadu_si512(g + d), uv = _mm512_loadu_si512(u + d);
        st32_bf16(o + d, _mm512_mul_ps(silu16(BF16_EVEN(gv)), BF16_EVEN(uv)),
                  _mm512_mul_ps(silu16(BF16_ODD(gv)), BF16_ODD(uv)));
    }
    for (; d + 16 <= n; d += 16)
        _mm256_storeu_si256((__m256i *)(o + d), cvt16_bf16(_mm512_mul_ps(silu16(ld16_bf16(g + d)), ld16_bf16(u + d))));
    silu_row_portable(g + d, u + d, o + d, n - d);
}
#endif

void silu_mul_bf16(int path, const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t inter) {
#pragma omp parallel for schedule(static) if (rows * inter >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t *g = gate_up + r * 2 * inter;
#if defined(__x86_64__)
        if (path == PATH_AVX512)
            silu_row_avx512(g, g + inter, out + r * inter, inter);
        else if (path == PATH_AVX2)
            silu_row_avx2(g, g + inter, out + r * inter, inter);
        else
#endif
            silu_row_portable(g, g + inter, out + r * inter, inter);
    }
}
