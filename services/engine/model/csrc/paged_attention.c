/* Paged attention for decode steps (one query token per sequence), on the CPU.
 *
 * Reads each sequence's K/V straight out of the block pool, so the pool is
 * read once per step instead of being gathered into a padded copy first.
 * Work items are (sequence, KV head) pairs, shared out by OpenMP (the block-16
 * code below takes whole sequences); within one, up to four query heads of a
 * KV head's group are handled together so each K/V vector loaded is used for
 * all of them.
 *
 * Pool layout per layer (see kv_cache.py):
 *   K: [num_blocks, num_kv_heads, head_dim, block_size]  (dim-major in a block)
 *   V: [num_blocks, num_kv_heads, block_size, head_dim]  (token-major)
 * Dim-major K lets q.K be computed for 8 or 16 tokens at once with plain
 * vertical FMAs (no horizontal sums); token-major V does the same for p.V.
 *
 * Paths (simd.h), chosen by the caller: AVX-512 (16 tokens per vector, needs
 * head_dim % 16 == 0; a bf16 or fp8 e5m2 pool with block size 16 and head_dim %
 * 32 == 0, the default engine's, has code of its own below, which reads a block's
 * K and V of all KV heads as one run and splits items by tokens rather than by
 * count), AVX2 + FMA (two 8-lane vectors per 16 tokens, needs
 * head_dim % 16 == 0 and block_size % 8 == 0), portable C for anything else.
 * bf16 and fp8 e5m2 K/V (the pool's format, kv_fmt, may differ from q's) are
 * widened to float32 in registers; scores, softmax and the accumulation are float32.
 *
 * Built by services/engine/model/native.py; plain C so that it compiles in a
 * second without torch headers, and is called through ctypes.
 */
#include <float.h>
#include <omp.h>
#include <stdlib.h>

#include "simd.h"

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256

static inline float ld1(const void *p, int64_t i, int fmt) {
    return fmt == FMT_F32    ? ((const float *)p)[i]
           : fmt == FMT_BF16 ? bf16_to_f32(((const uint16_t *)p)[i])
                             : e5m2_to_f32(((const uint8_t *)p)[i]);
}

static inline void st1(void *p, int64_t i, float v, int fmt) {
    if (fmt == FMT_F32)
        ((float *)p)[i] = v;
    else
        ((uint16_t *)p)[i] = f32_to_bf16(v);
}

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
    int64_t ctx, kv_heads, h, D, bs, esize;
} Seq;

/* ---- portable ------------------------------------------------------------- */

static void scores_portable(const Seq *s, int fmt, int NG, const float *qf, float *sc, int64_t sc_stride) {
    int64_t block_bytes = s->D * s->bs * s->esize;
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
    int64_t block_bytes = s->D * s->bs * s->esize;
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

ALWAYS_INLINE T256 __m256 ld8(const void *p, int64_t i, const int fmt) {
    return fmt == FMT_F32    ? _mm256_loadu_ps((const float *)p + i)
           : fmt == FMT_BF16 ? ld8_bf16((const uint16_t *)p + i)
                             : ld8_e5m2((const uint8_t *)p + i);
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
    int64_t nblocks = (s->ctx + s->bs - 1) / s->bs, block_bytes = s->D * s->bs * s->esize;
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
    int64_t nblocks = (s->ctx + s->bs - 1) / s->bs, D = s->D, block_bytes = D * s->bs * s->esize;
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
    default: CALL(FMT_E5M2, 4); break;                                                                               \
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

ALWAYS_INLINE T512 __m512 ld16(const void *p, int64_t i, const int fmt) {
    return fmt == FMT_F32    ? _mm512_loadu_ps((const float *)p + i)
           : fmt == FMT_BF16 ? ld16_bf16((const uint16_t *)p + i)
                             : ld16_e5m2((const uint8_t *)p + i);
}

ALWAYS_INLINE T512 __m512 ld16m(__mmask16 m, const void *p, int64_t i, const int fmt) {
    return fmt == FMT_F32    ? _mm512_maskz_loadu_ps(m, (const float *)p + i)
           : fmt == FMT_BF16 ? ld16m_bf16(m, (const uint16_t *)p + i)
                             : ld16m_e5m2(m, (const uint8_t *)p + i);
}

/* scores[g][start + j] = q_g . K_j for NG query heads, 16 tokens per vector. */
ALWAYS_INLINE T512 void scores_avx512_impl(const Seq *s, const int fmt, const int NG, const float *qf, float *sc,
                                            int64_t sc_stride) {
    int64_t nblocks = (s->ctx + s->bs - 1) / s->bs, D = s->D, bs = s->bs, block_bytes = D * bs * s->esize;
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
    int64_t nblocks = (s->ctx + s->bs - 1) / s->bs, D = s->D, bs = s->bs, block_bytes = D * bs * s->esize;
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

static T512 float softmax_avx512(float *sg, int64_t n) {
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

/* ---- AVX-512, bf16 or fp8 e5m2 pool with block size 16 -------------------------
 *
 * The default engine's case (and its 8-bit KV cache), where the pool's reads bound
 * the step. One work item is a sequence, or a few of its KV heads when there are
 * too few sequences to share out among the threads; it walks its blocks in the
 * outer loop and its KV heads inside. A block's K (and V) of all KV heads lie side
 * by side in the pool (kv_heads * 2 KB for 64 dims in bf16), and a prompt's blocks
 * are usually adjacent too, so the pool is read in runs of several KB (or one run
 * for a whole prompt) rather than a 2 KB block of one head at a time, which this
 * VM reads ~25% slower.
 *
 * Widening without the two-uops-per-16-values loads above. bf16: one 64-byte load
 * holds 32 values and two uops widen them: x << 16 gives the even elements as
 * float32, x & 0xFFFF0000 the odd ones. e5m2: it is the top byte of a float16, so
 * unpacking a zero byte below each byte (vpunpck[lh]bw, within 128-bit lanes) makes
 * float16s and vcvtph2ps widens 16 of them; 64 bytes take two unpacks, two extracts
 * and four converts. Both leave the values in a lane order of their own:
 * - K (dim-major, 16 tokens a row): one vector holds 8 (e5m2) or 8 even / 8 odd
 *   (bf16) tokens of two adjacent dims, multiplied by [q_d x8, q_{d+1} x8]; the
 *   halves are added at the end. Four accumulator sets per head keep enough FMAs
 *   in flight (latency 4 cycles, 2 issue a cycle).
 * - V (token-major): a vector holds even / odd dims (bf16) or dims [0-7, 16-23],
 *   [8-15, 24-31], ... (e5m2) of a token; the accumulators are kept in that order
 *   and put back in order once at the end.
 * Values: NG heads x 64 dims stay in registers over one block's tokens and are
 * added into a float accumulator in L1 per block, which does the same float
 * operations in the same order as registers held across all blocks would.
 *
 * The blocks come as one stream per thread: an item's K runs, its V runs, then the
 * next item's K runs. While a head of a run is read, the same bytes of the run
 * STREAM_AHEAD places on are prefetched into L2 and those of the next run into
 * L1, a line or two among each step's loads. Prefetching a whole run at once
 * fills the core's line fill buffers and stalls it until the lines land; spread
 * out and two-level, the reads overlap the arithmetic better (batch 64, context
 * 300, contiguous blocks: 16.3-17.8 instead of 14.1-14.8 GB/s on 2 threads). */
#ifndef STREAM_AHEAD
#define STREAM_AHEAD 16
#endif
/* The bytes at off in the run STREAM_AHEAD places on into L2 (prefetcht2), and in
 * the next run into L1 (prefetcht0). */
#define PREFETCH2(pf, pn, off) (__builtin_prefetch((pf) + (off), 0, 1), __builtin_prefetch((pn) + (off), 0, 3))

/* KV heads [h0, h0 + nh) of one sequence. */
typedef struct {
    const int64_t *table;
    int64_t ctx, h0, nh;
} Item;

typedef struct {
    const char *k_cache, *v_cache;
    int64_t kv_heads, D, head_bytes; /* head_bytes: one KV head's 16 tokens of K (or V) */
} Pool;

static inline const char *run_at(const Pool *pl, const char *cache, const Item *it, int64_t b) {
    return cache + (it->table[b] * pl->kv_heads + it->h0) * pl->head_bytes;
}

/* The run at pos in the thread's stream: 0 .. nb-1 the item's K runs, nb .. 2nb-1
 * its V runs, then next's K runs; NULL past them. */
static inline const char *stream_at(const Pool *pl, const Item *it, const Item *next, int64_t pos) {
    int64_t nb = (it->ctx + 15) / 16;
    if (pos < nb) return run_at(pl, pl->k_cache, it, pos);
    if (pos < 2 * nb) return run_at(pl, pl->v_cache, it, pos - nb);
    if (next && pos - 2 * nb < (next->ctx + 15) / 16) return run_at(pl, pl->k_cache, next, pos - 2 * nb);
    return NULL;
}

ALWAYS_INLINE T512 __m512 bf16_even(__m512i x) { return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)); }
ALWAYS_INLINE T512 __m512 bf16_odd(__m512i x) {
    return _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xFFFF0000u)));
}
/* 16 e5m2 bytes, as float16 in a 256-bit half of an unpacked vector, to float32 */
ALWAYS_INLINE T512 __m512 e5m2_lo(__m512i h) { return _mm512_cvtph_ps(_mm512_castsi512_si256(h)); }
ALWAYS_INLINE T512 __m512 e5m2_hi(__m512i h) { return _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)); }

/* Lanes 0..7 of a and b, interleaved (a0 b0 a1 b1 ..), plus the same of lanes 8..15. */
ALWAYS_INLINE T512 __m512 interleave_add(__m512 a, __m512 b) {
    const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    return _mm512_add_ps(_mm512_permutex2var_ps(a, lo, b), _mm512_permutex2var_ps(a, hi, b));
}

/* sc[g * sc_stride + j] = q_g . K_j, the 16 tokens of one block of one KV head (kt),
 * for NG query heads; qv[g * D/2 + p] = [q_{2p} x8, q_{2p+1} x8] of head g. */
ALWAYS_INLINE T512 void scores_block(const int fmt, const int NG, const char *kt, const char *pf, const char *pn,
                                      int64_t D, const __m512 *qv, float *sc, int64_t sc_stride) {
    __m512 a0[4], a1[4], a2[4], a3[4];
    for (int g = 0; g < NG; ++g) a0[g] = a1[g] = a2[g] = a3[g] = _mm512_setzero_ps();
    for (int64_t p = 0; p < D / 2; p += 2) {
        __m512 k0, k1, k2, k3; /* k0, k2 go with dims 2p, 2p + 1; k1, k3 with 2p + 2, 2p + 3 */
        if (fmt == FMT_BF16) {
            if (pf) PREFETCH2(pf, pn, p * 64), PREFETCH2(pf, pn, p * 64 + 64);
            __m512i x0 = _mm512_loadu_si512(kt + p * 64), x1 = _mm512_loadu_si512(kt + p * 64 + 64);
            k0 = bf16_even(x0), k2 = bf16_odd(x0), k1 = bf16_even(x1), k3 = bf16_odd(x1);
        } else {
            if (pf) PREFETCH2(pf, pn, p * 32);
            __m512i x = _mm512_loadu_si512(kt + p * 32), z = _mm512_setzero_si512();
            __m512i lo = _mm512_unpacklo_epi8(z, x), hi = _mm512_unpackhi_epi8(z, x); /* tokens 0-7, 8-15 */
            k0 = e5m2_lo(lo), k1 = e5m2_hi(lo), k2 = e5m2_lo(hi), k3 = e5m2_hi(hi);
        }
        for (int g = 0; g < NG; ++g) {
            __m512 q0 = qv[g * (D / 2) + p], q1 = qv[g * (D / 2) + p + 1];
            a0[g] = _mm512_fmadd_ps(k0, q0, a0[g]);
            a2[g] = _mm512_fmadd_ps(k2, q0, a2[g]);
            a1[g] = _mm512_fmadd_ps(k1, q1, a1[g]);
            a3[g] = _mm512_fmadd_ps(k3, q1, a3[g]);
        }
    }
    for (int g = 0; g < NG; ++g) {
        __m512 r;
        if (fmt == FMT_BF16) {
            r = interleave_add(_mm512_add_ps(a0[g], a1[g]), _mm512_add_ps(a2[g], a3[g]));
        } else {
            __m512 lo = _mm512_add_ps(a0[g], a1[g]), hi = _mm512_add_ps(a2[g], a3[g]);
            r = _mm512_add_ps(_mm512_shuffle_f32x4(lo, hi, 0x44), _mm512_shuffle_f32x4(lo, hi, 0xEE));
        }
        _mm512_storeu_ps(sc + g * sc_stride, r);
    }
}

/* acc[g] += sum_j p[g][j] V_j over the n tokens of one block of one KV head (vb),
 * NV * 16 dims of them (64, or the last 32), for NG query heads; acc rows (D floats)
 * in the lane order described above. NV and NG are constants: the accumulators
 * stay in registers. */
ALWAYS_INLINE T512 void values_chunk(const int fmt, const int NG, const int NV, const char *vb, const char *pf,
                                      const char *pn, int64_t D, int64_t n, const float *p, int64_t sc_stride,
                                      float *acc) {
    __m512 a[4][4];
    for (int g = 0; g < NG; ++g)
        for (int c = 0; c < NV; ++c) a[g][c] = _mm512_loadu_ps(acc + g * D + 16 * c);
    for (int64_t j = 0; j < n; ++j) {
        __m512 v[4];
        if (pf) {
            PREFETCH2(pf, pn, j * D * (fmt == FMT_BF16 ? 2 : 1));
            if (fmt == FMT_BF16 && NV == 4) PREFETCH2(pf, pn, j * D * 2 + 64);
        }
        if (fmt == FMT_BF16) {
            const char *row = vb + j * D * 2;
            __m512i x0 = _mm512_loadu_si512(row);
            v[0] = bf16_even(x0), v[1] = bf16_odd(x0);
            if (NV == 4) {
                __m512i x1 = _mm512_loadu_si512(row + 64);
                v[2] = bf16_even(x1), v[3] = bf16_odd(x1);
            }
        } else {
            const char *row = vb + j * D;
            __m512i z = _mm512_setzero_si512();
            __m512i x = NV == 4 ? _mm512_loadu_si512(row)
                                : _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)row));
            __m512i lo = _mm512_unpacklo_epi8(z, x), hi = _mm512_unpackhi_epi8(z, x);
            v[0] = e5m2_lo(lo), v[1] = e5m2_lo(hi); /* dims [0-7, 16-23], [8-15, 24-31] */
            if (NV == 4) v[2] = e5m2_hi(lo), v[3] = e5m2_hi(hi); /* [32-39, 48-55], [40-47, 56-63] */
        }
        for (int g = 0; g < NG; ++g) {
            __m512 pj = _mm512_set1_ps(p[g * sc_stride + j]);
            for (int c = 0; c < NV; ++c) a[g][c] = _mm512_fmadd_ps(pj, v[c], a[g][c]);
        }
    }
    for (int g = 0; g < NG; ++g)
        for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc + g * D + 16 * c, a[g][c]);
}

ALWAYS_INLINE T512 void values_block(const int fmt, const int NG, const char *vb, const char *pf, const char *pn,
                                      int64_t D, int64_t n, const float *p, int64_t sc_stride, float *acc) {
    int64_t d0 = 0, es = fmt == FMT_BF16 ? 2 : 1;
    for (; d0 + 64 <= D; d0 += 64)
        values_chunk(fmt, NG, 4, vb + d0 * es, pf ? pf + d0 * es : NULL, pn + d0 * es, D, n, p, sc_stride, acc + d0);
    if (d0 < D)
        values_chunk(fmt, NG, 2, vb + d0 * es, pf ? pf + d0 * es : NULL, pn + d0 * es, D, n, p, sc_stride, acc + d0);
}

/* One accumulator row (D floats) from values_block's lane order back to dim order. */
static T512 void unpermute_row(int fmt, float *row, int64_t D) {
    const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int64_t d = 0; d < D; d += 32) {
        __m512 a = _mm512_loadu_ps(row + d), b = _mm512_loadu_ps(row + d + 16);
        if (fmt == FMT_BF16) { /* a: even dims, b: odd */
            _mm512_storeu_ps(row + d, _mm512_permutex2var_ps(a, lo, b));
            _mm512_storeu_ps(row + d + 16, _mm512_permutex2var_ps(a, hi, b));
        } else { /* a: [0-7, 16-23], b: [8-15, 24-31] */
            _mm512_storeu_ps(row + d, _mm512_shuffle_f32x4(a, b, 0x44));
            _mm512_storeu_ps(row + d + 16, _mm512_shuffle_f32x4(a, b, 0xEE));
        }
    }
}

/* The scores, then the values, of all the item's KV heads, up to 4 query heads a
 * time (a switch per block and head: cheap beside the 16 tokens' work). sums[r]:
 * row r's softmax denominator. Past the stream's end the prefetches go to the run
 * being read (already there: cheap). */
ALWAYS_INLINE T512 void item_pass(const int fmt, const Pool *pl, const Item *it, const Item *next, int64_t group,
                                   const __m512 *qv, float *sc, int64_t sc_stride, float *sums, float *acc, int first) {
    int64_t nb = (it->ctx + 15) / 16, D = pl->D, hb = pl->head_bytes;
    if (first) /* the thread's first runs: nothing read before prefetched them */
        for (int64_t i = 0; i < STREAM_AHEAD; ++i) {
            const char *p = stream_at(pl, it, next, i);
            for (int64_t off = 0; p && off < it->nh * hb; off += 64) __builtin_prefetch(p + off, 0, 1);
        }
    for (int64_t b = 0; b < nb; ++b) {
        const char *run = run_at(pl, pl->k_cache, it, b), *ahead = stream_at(pl, it, next, b + STREAM_AHEAD),
                   *near = stream_at(pl, it, next, b + 1);
        ahead = ahead ? ahead : run, near = near ? near : run;
        for (int64_t h = 0; h < it->nh; ++h)
            for (int64_t g = 0; g < group; g += 4) {
                const char *kt = run + h * hb, *pf = g == 0 ? ahead + h * hb : NULL, *pn = near + h * hb;
                const __m512 *qg = qv + (h * group + g) * (D / 2);
                float *sg = sc + (h * group + g) * sc_stride + b * 16;
                switch (group - g < 4 ? group - g : 4) {
                case 1: scores_block(fmt, 1, kt, pf, pn, D, qg, sg, sc_stride); break;
                case 2: scores_block(fmt, 2, kt, pf, pn, D, qg, sg, sc_stride); break;
                case 3: scores_block(fmt, 3, kt, pf, pn, D, qg, sg, sc_stride); break;
                default: scores_block(fmt, 4, kt, pf, pn, D, qg, sg, sc_stride); break;
                }
            }
    }
    for (int64_t r = 0; r < it->nh * group; ++r) sums[r] = softmax_avx512(sc + r * sc_stride, it->ctx);
    memset(acc, 0, sizeof(float) * it->nh * group * D);
    for (int64_t b = 0; b < nb; ++b) {
        const char *run = run_at(pl, pl->v_cache, it, b), *ahead = stream_at(pl, it, next, nb + b + STREAM_AHEAD),
                   *near = stream_at(pl, it, next, nb + b + 1);
        ahead = ahead ? ahead : run, near = near ? near : run;
        int64_t n = it->ctx - b * 16 < 16 ? it->ctx - b * 16 : 16;
        for (int64_t h = 0; h < it->nh; ++h)
            for (int64_t g = 0; g < group; g += 4) {
                const char *vb = run + h * hb, *pf = g == 0 ? ahead + h * hb : NULL, *pn = near + h * hb;
                const float *pg = sc + (h * group + g) * sc_stride + b * 16;
                float *ag = acc + (h * group + g) * D;
                switch (group - g < 4 ? group - g : 4) {
                case 1: values_block(fmt, 1, vb, pf, pn, D, n, pg, sc_stride, ag); break;
                case 2: values_block(fmt, 2, vb, pf, pn, D, n, pg, sc_stride, ag); break;
                case 3: values_block(fmt, 3, vb, pf, pn, D, n, pg, sc_stride, ag); break;
                default: values_block(fmt, 4, vb, pf, pn, D, n, pg, sc_stride, ag); break;
                }
            }
    }
}

/* One item; the caller checked bs == 16, D % 32 == 0 and a bf16 or e5m2 pool (kv_fmt).
 * next: the item this thread takes after this one, or NULL. Scratch for nh * group
 * query heads: qv [rows * D/2] vectors, sc rows of sc_stride, sums [rows], acc [rows * D]. */
static T512 void item_fast(int fmt, int kv_fmt, const char *q, int64_t q_head_stride, const Pool *pl, const Item *it,
                           const Item *next, char *out, int64_t group, float scale, __m512 *qv, float *sc,
                           int64_t sc_stride, float *sums, float *acc, int first) {
    int64_t D = pl->D, rows = it->nh * group;
    for (int64_t r = 0; r < rows; ++r) {
        const char *qh = q + (it->h0 * group + r) * q_head_stride * (fmt == FMT_F32 ? 4 : 2);
        for (int64_t p = 0; p < D / 2; ++p) {
            __m256 a = _mm256_set1_ps(ld1(qh, 2 * p, fmt) * scale), c = _mm256_set1_ps(ld1(qh, 2 * p + 1, fmt) * scale);
            qv[r * (D / 2) + p] = _mm512_insertf32x8(_mm512_castps256_ps512(a), c, 1);
        }
    }
    if (kv_fmt == FMT_BF16)
        item_pass(FMT_BF16, pl, it, next, group, qv, sc, sc_stride, sums, acc, first);
    else
        item_pass(FMT_E5M2, pl, it, next, group, qv, sc, sc_stride, sums, acc, first);
    for (int64_t r = 0; r < rows; ++r) {
        float *row = acc + r * D, inv = 1.f / sums[r];
        unpermute_row(kv_fmt, row, D);
        for (int64_t d = 0; d < D; ++d) st1(out, (it->h0 * group + r) * D + d, row[d] * inv, fmt);
    }
}


static inline Item item_of(int64_t i, int64_t per_seq, int64_t hc, int64_t kv_heads, const int64_t *block_tables,
                           int64_t max_blocks, const int64_t *context_lens) {
    int64_t b = i / per_seq, h0 = i % per_seq * hc;
    Item it = {block_tables + b * max_blocks, context_lens[b], h0, kv_heads - h0 < hc ? kv_heads - h0 : hc};
    return it;
}

/* This thread's share of the fast path's items: a run of consecutive ones (their
 * blocks often lie side by side in the pool) holding its share of the tokens, so
 * uneven contexts split evenly; the next item is known, and its first runs are
 * prefetched while this one ends. Returns 0, or 2 when out of memory. */
static T512 int fast_share(int fmt, int kv_fmt, const char *q, int64_t q_seq_stride, int64_t q_head_stride,
                           const Pool *pl, const int64_t *block_tables, int64_t max_blocks,
                           const int64_t *context_lens, char *out, int64_t num_seqs, int64_t num_heads, float scale,
                           int64_t stride) {
    if (num_seqs == 0) return 0;
    int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    int64_t kv_heads = pl->kv_heads, group = num_heads / kv_heads, D = pl->D;
    int64_t esize = fmt == FMT_F32 ? 4 : 2;
    /* A whole sequence an item, unless that leaves under ~4 items a thread to balance
     * (small batches): then a sequence's KV heads are split over a few items. */
    int64_t split = (4 * nt + num_seqs - 1) / num_seqs;
    split = split < 1 ? 1 : split > kv_heads ? kv_heads : split;
    int64_t hc = (kv_heads + split - 1) / split, per_seq = (kv_heads + hc - 1) / hc, items = num_seqs * per_seq;
    int64_t total = 0, lo = 0, hi = 0, seen = 0;
    for (int64_t i = 0; i < items; ++i) {
        Item it = item_of(i, per_seq, hc, kv_heads, block_tables, max_blocks, context_lens);
        total += (it.ctx + 15) * it.nh;
    }
    for (int64_t i = 0; i < items; ++i) {
        Item it = item_of(i, per_seq, hc, kv_heads, block_tables, max_blocks, context_lens);
        int64_t w = (it.ctx + 15) * it.nh, mid = seen + w / 2; /* an item goes where its middle is */
        if (mid * nt < total * tid) lo = i + 1;
        if (mid * nt < total * (tid + 1)) hi = i + 1;
        seen += w;
    }
    if (lo >= hi) return 0;
    int64_t rows = hc * group;
    size_t qv_bytes = sizeof(__m512) * rows * (D / 2), fl = sizeof(float) * rows * (stride + 1 + D);
    char *mem = aligned_alloc(64, (qv_bytes + fl + 63) / 64 * 64);
    if (!mem) return 2;
    __m512 *qv = (__m512 *)mem;
    float *sc = (float *)(mem + qv_bytes), *sums = sc + rows * stride, *acc = sums + rows;
    for (int64_t i = lo; i < hi; ++i) {
        Item it = item_of(i, per_seq, hc, kv_heads, block_tables, max_blocks, context_lens);
        Item next = item_of(i + 1 < hi ? i + 1 : i, per_seq, hc, kv_heads, block_tables, max_blocks, context_lens);
        int64_t b = i / per_seq;
        item_fast(fmt, kv_fmt, q + b * q_seq_stride * esize, q_head_stride, pl, &it, i + 1 < hi ? &next : NULL,
                  out + b * num_heads * D * esize, group, scale, qv, sc, stride, sums, acc, i == lo);
    }
    free(mem);
    return 0;
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
#if defined(__x86_64__)
        if (path == PATH_AVX512) {
            scores_avx512(s, kv_fmt, NG, qf, sc, sc_stride);
            for (int g = 0; g < NG; ++g) sums[g] = softmax_avx512(sc + g * sc_stride, s->ctx);
            values_avx512(s, kv_fmt, NG, sc, sc_stride, acc);
        } else if (path == PATH_AVX2) {
            scores_avx2(s, kv_fmt, NG, qf, sc, sc_stride);
            for (int g = 0; g < NG; ++g) sums[g] = softmax_avx2(sc + g * sc_stride, s->ctx);
            values_avx2(s, kv_fmt, NG, sc, sc_stride, acc);
        } else
#endif
        {
            scores_portable(s, kv_fmt, NG, qf, sc, sc_stride);
            for (int g = 0; g < NG; ++g) sums[g] = softmax_portable(sc + g * sc_stride, s->ctx);
            values_portable(s, kv_fmt, NG, sc, sc_stride, acc);
        }
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

/* fmt: FMT_F32 or FMT_BF16, for q and out; kv_fmt: the pool's, FMT_F32, FMT_BF16 or
 * FMT_E5M2 (the 8-bit KV cache). q: [B, H, D] with strides
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
        kv_fmt < 0 || kv_fmt > 2 ||
        path < 0 || path >= NUM_PATHS)
        return 1;
    if (!(native_paths() & (1 << path))) return 3;
    if (path == PATH_AVX512 && head_dim % 16) path = PATH_PORTABLE;
    if (path == PATH_AVX2 && (head_dim % 16 || block_size % 8)) path = PATH_PORTABLE;
    int64_t esize = fmt == FMT_F32 ? 4 : 2, kv_esize = kv_fmt == FMT_F32 ? 4 : kv_fmt == FMT_BF16 ? 2 : 1;
    /* padded to whole 16-lane chunks: the vector paths store whole chunks */
    int64_t stride = (max_blocks * block_size + 15) / 16 * 16;
    int failed = 0;
#if defined(__x86_64__)
    int fast = path == PATH_AVX512 && (kv_fmt == FMT_BF16 || kv_fmt == FMT_E5M2) && block_size == 16 &&
               head_dim % 32 == 0;
#else
    int fast = 0;
#endif
    int64_t items = num_seqs * num_kv_heads;
#pragma omp parallel
    {
        if (fast) {
#if defined(__x86_64__)
            Pool pl = {k_cache, v_cache, num_kv_heads, head_dim, head_dim * 16 * kv_esize};
            if (fast_share(fmt, kv_fmt, q, q_seq_stride, q_head_stride, &pl, block_tables, max_blocks, context_lens,
                           out, num_seqs, num_heads, scale, stride)) {
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
                         it % num_kv_heads, head_dim, block_size, kv_esize};
                item(path, fmt, kv_fmt, (const char *)q + b * q_seq_stride * esize, q_head_stride, &s,
                     (char *)out + b * num_heads * head_dim * esize, group, scale, sc, stride);
            }
            free(sc);
        }
    }
    return failed ? 2 : 0;
}
