/* Paged attention for decode steps (one query token per sequence), on the CPU.
 *
 * Reads each sequence's K/V straight out of the block pool, so the pool is
 * read once per step instead of being gathered into a padded copy first.
 * Work items are (sequence, KV head) pairs, shared out by OpenMP (the block-16
 * path, paged_attention_b16.c, takes whole sequences); within one, up to four
 * query heads of a KV head's group are handled together so each K/V vector
 * loaded is used for all of them.
 *
 * Pool layout per layer (see kv_cache.py):
 *   K: [num_blocks, num_kv_heads, head_dim, block_size]  (dim-major in a block)
 *   V: [num_blocks, num_kv_heads, block_size, head_dim]  (token-major)
 * Dim-major K lets q.K be computed for 8 or 16 tokens at once with plain
 * vertical FMAs (no horizontal sums); token-major V does the same for p.V.
 *
 * An int8 pool (the int8 KV cache) holds the same values as int8 in chunks of one
 * (block, KV head), each followed by its tokens' float32 scales (paged_attention.h).
 *
 * Paths (simd.h), chosen by the caller: AVX-512 (16 tokens per vector, needs
 * head_dim % 16 == 0; a bf16, fp8 e5m2 or int8 pool with block size 16 and
 * head_dim % 32 == 0, the default engine's, has code of its own in
 * paged_attention_b16.c, which reads a block's K and V of all KV heads as one run
 * and splits items by tokens rather than by count), AVX2 + FMA (two 8-lane vectors
 * per 16 tokens, needs head_dim % 16 == 0 and block_size % 8 == 0), portable C for
 * anything else. bf16, fp8 e5m2 and int8 K/V (the pool's format, kv_fmt, may differ
 * from q's) are widened to float32 in registers; scores, softmax and the
 * accumulation are float32. On these paths int8's scales are applied by a pass
 * over the score rows (kv_int8.c): K's after the scores, V's after the softmax.
 *
 * This file: the portable, AVX2 and generic AVX-512 paths, and the entry point
 * (paged_decode_attention), which picks the path. paged_attention.h: what the
 * files share.
 *
 * Built by services/engine/model/native.py; plain C so that it compiles in a
 * second without torch headers, and is called through ctypes.
 */
#include <float.h>
#include <omp.h>
#include <stdlib.h>

#include "paged_attention.h"

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256

/* Blocks sit at random places in the pool and are only a few KB each, too short
 * for the hardware prefetcher to learn; fetch the block PREFETCH_AHEAD ahead. */
#define PREFETCH_AHEAD 2
static inline void prefetch_block(const char *p, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

/* Where one (block, head) of a layer's K or V starts, in bytes. */
static inline const char *block_at(const void *cache, int64_t block, int64_t kv_heads, int64_t h, int64_t block_bytes) {
    return (const char *)cache + (block * kv_heads + h) * block_bytes;
}

typedef struct {
    const void *k_cache, *v_cache;
    const int64_t *table;
    int64_t ctx, kv_heads, h, D, bs, chunk; /* chunk: one (block, KV head)'s bytes, pa_chunk_bytes */
} Seq;

/* ---- portable ------------------------------------------------------------- */

static void scores_portable(const Seq *s, int fmt, int NG, const float *qf, float *sc, int64_t sc_stride) {
    int64_t block_bytes = s->chunk;
    for (int64_t l = 0; l < s->ctx; ++l) {
        const char *kt = block_at(s->k_cache, s->table[l / s->bs], s->kv_heads, s->h, block_bytes);
        for (int g = 0; g < NG; ++g) {
            float acc = 0.f;
            for (int64_t d = 0; d < s->D; ++d) acc += qf[g * s->D + d] * ld1(kt, d * s->bs + l % s->bs, fmt);
            sc[g * sc_stride + l] = acc;
        }
    }
}

static void values_portable(const Seq *s, int fmt, int NG, const float *sc, int64_t sc_stride, float *acc) {
    int64_t block_bytes = s->chunk;
    memset(acc, 0, sizeof(float) * NG * s->D);
    for (int64_t l = 0; l < s->ctx; ++l) {
        const char *v = block_at(s->v_cache, s->table[l / s->bs], s->kv_heads, s->h, block_bytes);
        for (int g = 0; g < NG; ++g) {
            float p = sc[g * sc_stride + l];
            for (int64_t d = 0; d < s->D; ++d) acc[g * s->D + d] += p * ld1(v, (l % s->bs) * s->D + d, fmt);
        }
    }
}

/* Exponentiates sg[0, n) against its maximum in place; returns the sum. */
static float softmax_portable(float *sg, int64_t n) {
    float m = -FLT_MAX, sum = 0.f;
    for (int64_t l = 0; l < n; ++l) m = sg[l] > m ? sg[l] : m;
    for (int64_t l = 0; l < n; ++l) {
        sg[l] = expf(sg[l] - m);
        sum += sg[l];
    }
    return sum;
}

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

static T256 float softmax_avx2(float *sg, int64_t n) {
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

#define CASES(CALL)                                                                                                  \
    switch (fmt * 4 + NG - 1) {                                                                                      \
    case 0: CALL(FMT_F32, 1); break;                                                                                 \
    case 1: CALL(FMT_F32, 2); break;                                                                                 \
    case 2: CALL(FMT_F32, 3); break;                                                                                 \
    case 3: CALL(FMT_F32, 4); break;                                                                                 \
    case 4: CALL(FMT_BF16, 1); break;                                                                                \
    case 5: CALL(FMT_BF16, 2); break;                                                                                \
    case 6: CALL(FMT_BF16, 3); break;                                                                                \
    case 7: CALL(FMT_BF16, 4); break;                                                                                \
    case 8: CALL(FMT_E5M2, 1); break;                                                                                \
    case 9: CALL(FMT_E5M2, 2); break;                                                                                \
    case 10: CALL(FMT_E5M2, 3); break;                                                                               \
    case 11: CALL(FMT_E5M2, 4); break;                                                                               \
    case 12: CALL(FMT_I8, 1); break;                                                                                 \
    case 13: CALL(FMT_I8, 2); break;                                                                                 \
    case 14: CALL(FMT_I8, 3); break;                                                                                 \
    default: CALL(FMT_I8, 4); break;                                                                                 \
    }

static T256 void scores_avx2(const Seq *s, int fmt, int NG, const float *qf, float *sc, int64_t sc_stride) {
#define CALL(F, G) scores_avx2_impl(s, F, G, qf, sc, sc_stride)
    CASES(CALL)
#undef CALL
}

static T256 void values_avx2(const Seq *s, int fmt, int NG, const float *sc, int64_t sc_stride, float *acc) {
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
static T512 float pa_softmax_avx512(float *sg, int64_t n) {
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

static T512 void scores_avx512(const Seq *s, int fmt, int NG, const float *qf, float *sc, int64_t sc_stride) {
#define CALL(F, G) scores_avx512_impl(s, F, G, qf, sc, sc_stride)
    CASES(CALL)
#undef CALL
}

static T512 void values_avx512(const Seq *s, int fmt, int NG, const float *sc, int64_t sc_stride, float *acc) {
#define CALL(F, G) values_avx512_impl(s, F, G, sc, sc_stride, acc)
    CASES(CALL)
#undef CALL
}
#endif /* __x86_64__ */

/* One (sequence, KV head) item: query heads in chunks of up to 4. fmt: q's and out's
 * format; kv_fmt: the pool's. */
static void item(int path, int fmt, int kv_fmt, const char *q, int64_t q_head_stride, const Seq *s, char *out, int64_t group,
                 float scale, float *sc, int64_t sc_stride) {
    float qf[4 * MAX_HEAD_DIM];
    float acc[4 * MAX_HEAD_DIM];
    int64_t D = s->D, h = s->h;
    for (int64_t g0 = 0; g0 < group; g0 += 4) {
        int NG = group - g0 < 4 ? (int)(group - g0) : 4;
        for (int g = 0; g < NG; ++g)
            for (int64_t d = 0; d < D; ++d) qf[g * D + d] = ld1(q, (h * group + g0 + g) * q_head_stride + d, fmt) * scale;
        float sums[4];
        /* int8: the scores are sums over the unscaled values, times K's scales before the
         * softmax; V's scales are folded into the probabilities after their sum is taken. */
        int i8 = kv_fmt == FMT_I8;
#define SCALE(cache) pa_i8_scale_rows(cache, s->table, s->kv_heads, h, D, s->bs, s->ctx, NG, sc, sc_stride)
#if defined(__x86_64__)
        if (path == PATH_AVX512) {
            scores_avx512(s, kv_fmt, NG, qf, sc, sc_stride);
            if (i8) SCALE(s->k_cache);
            for (int g = 0; g < NG; ++g) sums[g] = pa_softmax_avx512(sc + g * sc_stride, s->ctx);
            if (i8) SCALE(s->v_cache);
            values_avx512(s, kv_fmt, NG, sc, sc_stride, acc);
        } else if (path == PATH_AVX2) {
            scores_avx2(s, kv_fmt, NG, qf, sc, sc_stride);
            if (i8) SCALE(s->k_cache);
            for (int g = 0; g < NG; ++g) sums[g] = softmax_avx2(sc + g * sc_stride, s->ctx);
            if (i8) SCALE(s->v_cache);
            values_avx2(s, kv_fmt, NG, sc, sc_stride, acc);
        } else
#endif
        {
            scores_portable(s, kv_fmt, NG, qf, sc, sc_stride);
            if (i8) SCALE(s->k_cache);
            for (int g = 0; g < NG; ++g) sums[g] = softmax_portable(sc + g * sc_stride, s->ctx);
            if (i8) SCALE(s->v_cache);
            values_portable(s, kv_fmt, NG, sc, sc_stride, acc);
        }
#undef SCALE
        for (int g = 0; g < NG; ++g) {
            float inv = 1.f / sums[g];
            for (int64_t d = 0; d < D; ++d) st1(out, (h * group + g0 + g) * D + d, acc[g * D + d] * inv, fmt);
        }
    }
}

int native_paths(void) {
    static int known = -1; /* cpuid does not change: asked once (a benign race: every writer writes the same) */
    if (known < 0) known = cpu_paths();
    return known;
}

/* fmt: FMT_F32 or FMT_BF16, for q and out; kv_fmt: the pool's, FMT_F32, FMT_BF16,
 * FMT_E5M2 or FMT_I8 (the 8-bit KV caches; int8 needs head_dim % 4 == 0). q: [B, H, D] with strides
 * (q_seq_stride, q_head_stride, 1); out: [B, H, D] contiguous; block_tables:
 * [B, max_blocks]; context_lens: [B]. The vector paths fall back to portable
 * for shapes they do not take (see the top). Returns 0; 1 for bad sizes, 2 when
 * out of memory, 3 for a path this CPU cannot run. */
int paged_decode_attention(int path, int fmt, int kv_fmt, const void *q, int64_t q_seq_stride, int64_t q_head_stride,
                           const void *k_cache, const void *v_cache, const int64_t *block_tables, int64_t max_blocks,
                           const int64_t *context_lens, void *out, int64_t num_seqs, int64_t num_heads,
                           int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale) {
    int64_t group = num_heads / num_kv_heads;
    if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM || group * num_kv_heads != num_heads || fmt < 0 || fmt > 1 ||
        kv_fmt < 0 || kv_fmt > FMT_I8 || (kv_fmt == FMT_I8 && head_dim % 4) ||
        path < 0 || path >= NUM_PATHS)
        return 1;
    if (!(native_paths() & (1 << path))) return 3;
    if (path == PATH_AVX512 && head_dim % 16) path = PATH_PORTABLE;
    if (path == PATH_AVX2 && (head_dim % 16 || block_size % 8)) path = PATH_PORTABLE;
    int64_t esize = fmt == FMT_F32 ? 4 : 2, chunk = pa_chunk_bytes(kv_fmt, head_dim, block_size);
    /* padded to whole 16-lane chunks: the vector paths store whole chunks */
    int64_t stride = (max_blocks * block_size + 15) / 16 * 16;
    int failed = 0;
#if defined(__x86_64__)
    int fast = path == PATH_AVX512 && kv_fmt != FMT_F32 && block_size == 16 &&
               head_dim % 32 == 0;
#else
    int fast = 0;
#endif
    int64_t items = num_seqs * num_kv_heads;
#pragma omp parallel
    {
        if (fast) {
#if defined(__x86_64__)
            if (pa_b16_share(fmt, kv_fmt, q, q_seq_stride, q_head_stride, k_cache, v_cache, block_tables, max_blocks,
                             context_lens, out, num_seqs, num_heads, num_kv_heads, head_dim, scale, stride)) {
#pragma omp atomic write
                failed = 1;
            }
#endif
        } else {
            float *sc = malloc(sizeof(float) * 4 * stride);
            if (!sc) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(static)
            for (int64_t it = 0; it < items; ++it) {
                if (!sc) continue;
                int64_t b = it / num_kv_heads;
                Seq s = {k_cache, v_cache, block_tables + b * max_blocks, context_lens[b], num_kv_heads,
                         it % num_kv_heads, head_dim, block_size, chunk};
                item(path, fmt, kv_fmt, (const char *)q + b * q_seq_stride * esize, q_head_stride, &s,
                     (char *)out + b * num_heads * head_dim * esize, group, scale, sc, stride);
            }
            free(sc);
        }
    }
    return failed ? 2 : 0;
}
