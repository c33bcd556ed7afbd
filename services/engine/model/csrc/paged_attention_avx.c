/* The paged decode attention's AVX2 + FMA path and its generic AVX-512 path: the
 * per-item q.K scores, softmax and p.V of paged_attention.c's item(), which picks
 * among them and the portable code (the layout and paths: paged_attention.c's top;
 * the block-16 AVX-512 path has a file of its own, paged_attention_b16.c).
 */
#include <float.h>
#include <string.h>

#include "paged_attention.h"

#if defined(__x86_64__)
/* ---- AVX2 ------------------------------------------------------------------ */

/* int8 (unscaled): sign-extended to 32 bits and converted */
ALWAYS_INLINE T256 __m256 ld8_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

ALWAYS_INLINE T256 __m256 ld8(const void *p, int64_t i, const int fmt) {
    return fmt == FMT_F32    ? _mm256_loadu_ps((const float *)p + i)
           : fmt == FMT_BF16 ? ld8_bf16((const uint16_t *)p + i)
           : fmt == FMT_E5M2 ? ld8_e5m2((const uint8_t *)p + i)
                             : ld8_i8((const int8_t *)p + i);
}

/* NG heads x NV vectors of 8 tokens, at token j0 of one block (K dim-major). */
ALWAYS_INLINE T256 void scores_tile_avx2(const char *kt, const int fmt, const int NG, const int NV, int64_t j0,
                                          int64_t D, int64_t bs, const float *qf, float *out, int64_t sc_stride) {
    __m256 acc[4][2];
    for (int g = 0; g < NG; ++g)
        for (int c = 0; c < NV; ++c) acc[g][c] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
        __m256 k[2];
        for (int c = 0; c < NV; ++c) k[c] = ld8(kt, d * bs + j0 + 8 * c, fmt);
        for (int g = 0; g < NG; ++g) {
            __m256 q = _mm256_broadcast_ss(qf + g * D + d);
            for (int c = 0; c < NV; ++c) acc[g][c] = _mm256_fmadd_ps(q, k[c], acc[g][c]);
        }
    }
    for (int g = 0; g < NG; ++g)
        for (int c = 0; c < NV; ++c) _mm256_storeu_ps(out + g * sc_stride + 8 * c, acc[g][c]);
}

ALWAYS_INLINE T256 void scores_avx2_impl(const Seq *s, const int fmt, const int NG, const float *qf, float *sc,
                                          int64_t sc_stride) {
    int64_t nblocks = (s->ctx + s->bs - 1) / s->bs, block_bytes = s->chunk;
    for (int64_t i = 0; i < PREFETCH_AHEAD && i < nblocks; ++i)
        prefetch_block(block_at(s->k_cache, s->table[i], s->kv_heads, s->h, block_bytes), block_bytes);
    for (int64_t b = 0; b < nblocks; ++b) {
        if (b + PREFETCH_AHEAD < nblocks)
            prefetch_block(block_at(s->k_cache, s->table[b + PREFETCH_AHEAD], s->kv_heads, s->h, block_bytes),
                           block_bytes);
        const char *kt = block_at(s->k_cache, s->table[b], s->kv_heads, s->h, block_bytes);
        int64_t start = b * s->bs;
        /* whole vectors even past ctx: they stay inside the block, and the stores
         * inside the padded score row; softmax reads only [0, ctx) */
        for (int64_t j0 = 0; j0 < s->bs && start + j0 < s->ctx; j0 += 16) {
            if (s->bs - j0 >= 16)
                scores_tile_avx2(kt, fmt, NG, 2, j0, s->D, s->bs, qf, sc + start + j0, sc_stride);
            else
                scores_tile_avx2(kt, fmt, NG, 1, j0, s->D, s->bs, qf, sc + start + j0, sc_stride);
        }
    }
}

/* acc[g] = sum_j p[g][j] V_j, 16 dims (two vectors) per pass over a block while
 * it is in L1: NG heads x 2 vectors stay in registers with room for V. */
ALWAYS_INLINE T256 void values_avx2_impl(const Seq *s, const int fmt, const int NG, const float *sc, int64_t sc_stride,
                                          float *acc_out) {
    int64_t nblocks = (s->ctx + s->bs - 1) / s->bs, D = s->D, block_bytes = s->chunk;
    memset(acc_out, 0, sizeof(float) * NG * D);
    for (int64_t i = 0; i < PREFETCH_AHEAD && i < nblocks; ++i)
        prefetch_block(block_at(s->v_cache, s->table[i], s->kv_heads, s->h, block_bytes), block_bytes);
    for (int64_t b = 0; b < nblocks; ++b) {
        if (b + PREFETCH_AHEAD < nblocks)
            prefetch_block(block_at(s->v_cache, s->table[b + PREFETCH_AHEAD], s->kv_heads, s->h, block_bytes),
                           block_bytes);
        const char *vb = block_at(s->v_cache, s->table[b], s->kv_heads, s->h, block_bytes);
        int64_t start = b * s->bs, n = s->ctx - start < s->bs ? s->ctx - start : s->bs;
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
            __m256 acc[4][2];
            for (int g = 0; g < NG; ++g) {
                acc[g][0] = _mm256_loadu_ps(acc_out + g * D + d0);
                acc[g][1] = _mm256_loadu_ps(acc_out + g * D + d0 + 8);
            }
            for (int64_t j = 0; j < n; ++j) {
                __m256 v0 = ld8(vb, j * D + d0, fmt), v1 = ld8(vb, j * D + d0 + 8, fmt);
                for (int g = 0; g < NG; ++g) {
                    __m256 p = _mm256_broadcast_ss(sc + g * sc_stride + start + j);
                    acc[g][0] = _mm256_fmadd_ps(p, v0, acc[g][0]);
                    acc[g][1] = _mm256_fmadd_ps(p, v1, acc[g][1]);
                }
            }
            for (int g = 0; g < NG; ++g) {
                _mm256_storeu_ps(acc_out + g * D + d0, acc[g][0]);
                _mm256_storeu_ps(acc_out + g * D + d0 + 8, acc[g][1]);
            }
        }
    }
}

PA_INTERNAL T256 float pa_softmax_avx2(float *sg, int64_t n) {
    __m256 mv = _mm256_set1_ps(-FLT_MAX);
    int64_t l = 0;
    for (; l + 8 <= n; l += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(sg + l));
    float m = hmax8(mv);
    for (int64_t t = l; t < n; ++t) m = sg[t] > m ? sg[t] : m;
    __m256 sum = _mm256_setzero_ps();
    mv = _mm256_set1_ps(m);
    for (l = 0; l + 8 <= n; l += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + l), mv));
        _mm256_storeu_ps(sg + l, e);
        sum = _mm256_add_ps(sum, e);
    }
    float total = hsum8(sum);
    for (; l < n; ++l) {
        sg[l] = expf(sg[l] - m);
        total += sg[l];
    }
    return total;
}

PA_INTERNAL T256 void pa_scores_avx2(const Seq *s, int fmt, int NG, const float *qf, float *sc, int64_t sc_stride) {
#define CALL(F, G) scores_avx2_impl(s, F, G, qf, sc, sc_stride)
    CASES(CALL)
#undef CALL
}

PA_INTERNAL T256 void pa_values_avx2(const Seq *s, int fmt, int NG, const float *sc, int64_t sc_stride, float *acc) {
#define CALL(F, G) values_avx2_impl(s, F, G, sc, sc_stride, acc)
    CASES(CALL)
#undef CALL
}

/* ---- AVX-512 --------------------------------------------------------------- */

/* int8 (unscaled): sign-extended to 32 bits and converted */
ALWAYS_INLINE T512 __m512 ld16_i8(__m128i x) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(x)); }

ALWAYS_INLINE T512 __m512 ld16(const void *p, int64_t i, const int fmt) {
    return fmt == FMT_F32    ? _mm512_loadu_ps((const float *)p + i)
           : fmt == FMT_BF16 ? ld16_bf16((const uint16_t *)p + i)
           : fmt == FMT_E5M2 ? ld16_e5m2((const uint8_t *)p + i)
                             : ld16_i8(_mm_loadu_si128((const __m128i *)((const int8_t *)p + i)));
}

ALWAYS_INLINE T512 __m512 ld16m(__mmask16 m, const void *p, int64_t i, const int fmt) {
    return fmt == FMT_F32    ? _mm512_maskz_loadu_ps(m, (const float *)p + i)
           : fmt == FMT_BF16 ? ld16m_bf16(m, (const uint16_t *)p + i)
           : fmt == FMT_E5M2 ? ld16m_e5m2(m, (const uint8_t *)p + i)
                             : ld16_i8(_mm_maskz_loadu_epi8(m, (const int8_t *)p + i));
}

/* scores[g][start + j] = q_g . K_j for NG query heads, 16 tokens per vector. */
ALWAYS_INLINE T512 void scores_avx512_impl(const Seq *s, const int fmt, const int NG, const float *qf, float *sc,
                                            int64_t sc_stride) {
    int64_t nblocks = (s->ctx + s->bs - 1) / s->bs, D = s->D, bs = s->bs, block_bytes = s->chunk;
    for (int64_t i = 0; i < PREFETCH_AHEAD && i < nblocks; ++i)
        prefetch_block(block_at(s->k_cache, s->table[i], s->kv_heads, s->h, block_bytes), block_bytes);
    for (int64_t b = 0; b < nblocks; ++b) {
        if (b + PREFETCH_AHEAD < nblocks)
            prefetch_block(block_at(s->k_cache, s->table[b + PREFETCH_AHEAD], s->kv_heads, s->h, block_bytes),
                           block_bytes);
        const char *kt = block_at(s->k_cache, s->table[b], s->kv_heads, s->h, block_bytes);
        int64_t start = b * bs;
        for (int64_t j0 = 0; j0 < bs && start + j0 < s->ctx; j0 += 16) {
            int64_t lanes = bs - j0 < 16 ? bs - j0 : 16;
            __mmask16 m = (__mmask16)((1u << lanes) - 1u);
            __m512 acc[4];
            for (int g = 0; g < NG; ++g) acc[g] = _mm512_setzero_ps();
            if (lanes == 16) {
                for (int64_t d = 0; d < D; ++d) {
                    __m512 k = ld16(kt, d * bs + j0, fmt);
                    for (int g = 0; g < NG; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(qf[g * D + d]), k, acc[g]);
                }
            } else {
                for (int64_t d = 0; d < D; ++d) {
                    __m512 k = ld16m(m, kt, d * bs + j0, fmt);
                    for (int g = 0; g < NG; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(qf[g * D + d]), k, acc[g]);
                }
            }
            for (int g = 0; g < NG; ++g) _mm512_mask_storeu_ps(sc + g * sc_stride + start + j0, m, acc[g]);
        }
    }
}

/* acc[g] = sum_j p[g][j] V_j for NG query heads, written unnormalised. Up to 64
 * dims (4 vectors) per pass, so each V row is read front to back in one go. */
ALWAYS_INLINE T512 void values_avx512_impl(const Seq *s, const int fmt, const int NG, const float *sc,
                                            int64_t sc_stride, float *acc_out) {
    int64_t nblocks = (s->ctx + s->bs - 1) / s->bs, D = s->D, bs = s->bs, block_bytes = s->chunk;
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
        int nv = D - d0 >= 64 ? 4 : (int)((D - d0) / 16);
        __m512 acc[4][4];
        for (int g = 0; g < NG; ++g)
            for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();
        for (int64_t i = 0; i < PREFETCH_AHEAD && i < nblocks; ++i)
            prefetch_block(block_at(s->v_cache, s->table[i], s->kv_heads, s->h, block_bytes), block_bytes);
        for (int64_t b = 0; b < nblocks; ++b) {
            if (b + PREFETCH_AHEAD < nblocks)
                prefetch_block(block_at(s->v_cache, s->table[b + PREFETCH_AHEAD], s->kv_heads, s->h, block_bytes),
                               block_bytes);
            const char *vb = block_at(s->v_cache, s->table[b], s->kv_heads, s->h, block_bytes);
            int64_t start = b * bs, n = s->ctx - start < bs ? s->ctx - start : bs;
            if (nv == 4) {
                for (int64_t j = 0; j < n; ++j) {
                    __m512 v0 = ld16(vb, j * D + d0, fmt), v1 = ld16(vb, j * D + d0 + 16, fmt);
                    __m512 v2 = ld16(vb, j * D + d0 + 32, fmt), v3 = ld16(vb, j * D + d0 + 48, fmt);
                    for (int g = 0; g < NG; ++g) {
                        __m512 p = _mm512_set1_ps(sc[g * sc_stride + start + j]);
                        acc[g][0] = _mm512_fmadd_ps(p, v0, acc[g][0]);
                        acc[g][1] = _mm512_fmadd_ps(p, v1, acc[g][1]);
                        acc[g][2] = _mm512_fmadd_ps(p, v2, acc[g][2]);
                        acc[g][3] = _mm512_fmadd_ps(p, v3, acc[g][3]);
                    }
                }
            } else {
                for (int64_t j = 0; j < n; ++j) {
                    for (int c = 0; c < nv; ++c) {
                        __m512 v = ld16(vb, j * D + d0 + 16 * c, fmt);
                        for (int g = 0; g < NG; ++g)
                            acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(sc[g * sc_stride + start + j]), v, acc[g][c]);
                    }
                }
            }
        }
        for (int g = 0; g < NG; ++g)
            for (int c = 0; c < nv; ++c) _mm512_storeu_ps(acc_out + g * D + d0 + 16 * c, acc[g][c]);
    }
}

/* Exponentiates sg[0, n) against its maximum in place; returns the sum (the block-16
 * path, paged_attention_b16.c, has a several-row copy of it: softmax_rows). */
PA_INTERNAL T512 float pa_softmax_avx512(float *sg, int64_t n) {
    __m512 mv = _mm512_set1_ps(-FLT_MAX);
    int64_t l = 0;
    for (; l + 16 <= n; l += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(sg + l));
    __mmask16 tail = (__mmask16)((1u << (n - l)) - 1u);
    mv = _mm512_mask_max_ps(mv, tail, mv, _mm512_maskz_loadu_ps(tail, sg + l));
    __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv)), sum = _mm512_setzero_ps();
    for (l = 0; l + 16 <= n; l += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sg + l), m));
        _mm512_storeu_ps(sg + l, e);
        sum = _mm512_add_ps(sum, e);
    }
    __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sg + l), m));
    _mm512_mask_storeu_ps(sg + l, tail, e);
    sum = _mm512_mask_add_ps(sum, tail, sum, e);
    return _mm512_reduce_add_ps(sum);
}

PA_INTERNAL T512 void pa_scores_avx512(const Seq *s, int fmt, int NG, const float *qf, float *sc, int64_t sc_stride) {
#define CALL(F, G) scores_avx512_impl(s, F, G, qf, sc, sc_stride)
    CASES(CALL)
#undef CALL
}

PA_INTERNAL T512 void pa_values_avx512(const Seq *s, int fmt, int NG, const float *sc, int64_t sc_stride, float *acc) {
#define CALL(F, G) values_avx512_impl(s, F, G, sc, sc_stride, acc)
    CASES(CALL)
#undef CALL
}
#endif /* __x86_64__ */
