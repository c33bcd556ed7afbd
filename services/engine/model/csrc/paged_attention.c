/* Paged attention for decode steps (one query token per sequence), on the CPU.
 *
 * Reads each sequence's K/V straight out of the block pool, so the pool is
 * read once per step instead of being gathered into a padded copy first.
 * Work items are (sequence, KV head) pairs, shared out by OpenMP; within one,
 * up to four query heads of that KV head's group are handled together so each
 * K/V vector loaded is used for all of them.
 *
 * Pool layout per layer (see kv_cache.py):
 *   K: [num_blocks, num_kv_heads, head_dim, block_size]  (dim-major in a block)
 *   V: [num_blocks, num_kv_heads, block_size, head_dim]  (token-major)
 * Dim-major K lets q.K be computed for 16 tokens at once with plain vertical
 * FMAs (no horizontal sums); token-major V does the same for p.V.
 *
 * Built by services/engine/model/native.py; plain C so that it compiles in a
 * second without torch headers, and is called through ctypes. The AVX-512 path
 * needs head_dim % 16 == 0; anything else takes the portable scalar path.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define HAVE_AVX512 1
#endif

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256

static inline float bf16_load(uint16_t x) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)x << 16;
    return v.f;
}

static inline uint16_t bf16_store(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16); /* round to nearest even */
}

static inline float f32_load(float x) { return x; }
static inline float f32_store(float f) { return f; }

/* Blocks sit at random places in the pool and are only a few KB each, too short
 * for the hardware prefetcher to learn; fetch the block PREFETCH_AHEAD ahead. */
#define PREFETCH_AHEAD 2
static inline void prefetch_block(const void *p, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch((const char *)p + off, 0, 3);
}

#ifdef HAVE_AVX512
static inline __m512 vld_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 vldm_f32(__mmask16 m, const float *p) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 vld_bf16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline __m512 vldm_bf16(__mmask16 m, const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* scores[g][start + j] = q_g . K_j for NG query heads, 16 tokens per vector. */
#define DEFINE_SCORES(NG, T, SUFFIX)                                                              \
    static void scores_##NG##_##SUFFIX(const float *qf, const T *k_cache, const int64_t *table,  \
                                       int64_t ctx, int64_t kv_heads, int64_t h, int64_t D,       \
                                       int64_t bs, float *sc, int64_t sc_stride) {                \
        int64_t nblocks = (ctx + bs - 1) / bs, block_elems = D * bs;                              \
        for (int64_t i = 0; i < PREFETCH_AHEAD && i < nblocks; ++i)                               \
            prefetch_block(k_cache + (table[i] * kv_heads + h) * block_elems, block_elems * sizeof(T)); \
        for (int64_t start = 0; start < ctx; start += bs) {                                       \
            int64_t ahead = start / bs + PREFETCH_AHEAD;                                          \
            if (ahead < nblocks)                                                                  \
                prefetch_block(k_cache + (table[ahead] * kv_heads + h) * block_elems,             \
                               block_elems * sizeof(T));                                          \
            const T *kt = k_cache + ((table[start / bs] * kv_heads + h) * D) * bs;                \
            for (int64_t j0 = 0; j0 < bs && start + j0 < ctx; j0 += 16) {                         \
                int64_t lanes = bs - j0 < 16 ? bs - j0 : 16;                                      \
                __mmask16 m = (__mmask16)((1u << lanes) - 1u);                                    \
                __m512 acc[NG];                                                                   \
                for (int g = 0; g < NG; ++g) acc[g] = _mm512_setzero_ps();                        \
                if (lanes == 16) {                                                                \
                    for (int64_t d = 0; d < D; ++d) {                                             \
                        __m512 k = vld_##SUFFIX(kt + d * bs + j0);                                \
                        for (int g = 0; g < NG; ++g)                                              \
                            acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(qf[g * D + d]), k, acc[g]);   \
                    }                                                                             \
                } else {                                                                          \
                    for (int64_t d = 0; d < D; ++d) {                                             \
                        __m512 k = vldm_##SUFFIX(m, kt + d * bs + j0);                            \
                        for (int g = 0; g < NG; ++g)                                              \
                            acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(qf[g * D + d]), k, acc[g]);   \
                    }                                                                             \
                }                                                                                 \
                for (int g = 0; g < NG; ++g)                                                      \
                    _mm512_mask_storeu_ps(sc + g * sc_stride + start + j0, m, acc[g]);            \
            }                                                                                     \
        }                                                                                         \
    }

/* acc[g] = sum_j p[g][j] V_j for NG query heads, written unnormalised. Up to 64
 * dims (4 vectors) per pass, so each V row is read front to back in one go. */
#define DEFINE_VALUES(NG, T, SUFFIX)                                                              \
    static void values_##NG##_##SUFFIX(const float *sc, int64_t sc_stride, const T *v_cache,     \
                                       const int64_t *table, int64_t ctx, int64_t kv_heads,       \
                                       int64_t h, int64_t D, int64_t bs, float *acc_out) {        \
        for (int64_t d0 = 0; d0 < D; d0 += 64) {                                                  \
            int nv = D - d0 >= 64 ? 4 : (int)((D - d0) / 16);                                     \
            __m512 acc[NG][4];                                                                    \
            for (int g = 0; g < NG; ++g)                                                          \
                for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();                      \
            int64_t nblocks = (ctx + bs - 1) / bs, block_elems = D * bs;                          \
            for (int64_t i = 0; i < PREFETCH_AHEAD && i < nblocks; ++i)                           \
                prefetch_block(v_cache + (table[i] * kv_heads + h) * block_elems,                 \
                               block_elems * sizeof(T));                                          \
            for (int64_t start = 0; start < ctx; start += bs) {                                   \
                int64_t ahead = start / bs + PREFETCH_AHEAD;                                      \
                if (ahead < nblocks)                                                              \
                    prefetch_block(v_cache + (table[ahead] * kv_heads + h) * block_elems,         \
                                   block_elems * sizeof(T));                                      \
                const T *vb = v_cache + ((table[start / bs] * kv_heads + h) * bs) * D + d0;       \
                int64_t n = ctx - start < bs ? ctx - start : bs;                                  \
                if (nv == 4) {                                                                    \
                    for (int64_t j = 0; j < n; ++j) {                                             \
                        const T *row = vb + j * D;                                                \
                        __m512 v0 = vld_##SUFFIX(row), v1 = vld_##SUFFIX(row + 16);               \
                        __m512 v2 = vld_##SUFFIX(row + 32), v3 = vld_##SUFFIX(row + 48);          \
                        for (int g = 0; g < NG; ++g) {                                            \
                            __m512 p = _mm512_set1_ps(sc[g * sc_stride + start + j]);             \
                            acc[g][0] = _mm512_fmadd_ps(p, v0, acc[g][0]);                        \
                            acc[g][1] = _mm512_fmadd_ps(p, v1, acc[g][1]);                        \
                            acc[g][2] = _mm512_fmadd_ps(p, v2, acc[g][2]);                        \
                            acc[g][3] = _mm512_fmadd_ps(p, v3, acc[g][3]);                        \
                        }                                                                         \
                    }                                                                             \
                } else {                                                                          \
                    for (int64_t j = 0; j < n; ++j) {                                             \
                        for (int c = 0; c < nv; ++c) {                                            \
                            __m512 v = vld_##SUFFIX(vb + j * D + 16 * c);                         \
                            for (int g = 0; g < NG; ++g)                                          \
                                acc[g][c] = _mm512_fmadd_ps(                                      \
                                    _mm512_set1_ps(sc[g * sc_stride + start + j]), v, acc[g][c]); \
                        }                                                                         \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
            for (int g = 0; g < NG; ++g)                                                          \
                for (int c = 0; c < nv; ++c) _mm512_storeu_ps(acc_out + g * D + d0 + 16 * c, acc[g][c]); \
        }                                                                                         \
    }

#define DEFINE_GROUP_FNS(T, SUFFIX)                                                               \
    DEFINE_SCORES(1, T, SUFFIX)                                                                   \
    DEFINE_SCORES(2, T, SUFFIX)                                                                   \
    DEFINE_SCORES(3, T, SUFFIX)                                                                   \
    DEFINE_SCORES(4, T, SUFFIX)                                                                   \
    DEFINE_VALUES(1, T, SUFFIX)                                                                   \
    DEFINE_VALUES(2, T, SUFFIX)                                                                   \
    DEFINE_VALUES(3, T, SUFFIX)                                                                   \
    DEFINE_VALUES(4, T, SUFFIX)

DEFINE_GROUP_FNS(float, f32)
DEFINE_GROUP_FNS(uint16_t, bf16)
#endif /* HAVE_AVX512 */

/* Portable fallback with the same layouts (any head_dim, no SIMD assumptions). */
#define DEFINE_SCALAR(T, LOAD, SUFFIX)                                                            \
    static void scalar_scores_##SUFFIX(const float *qf, int NG, const T *k_cache,                \
                                       const int64_t *table, int64_t ctx, int64_t kv_heads,       \
                                       int64_t h, int64_t D, int64_t bs, float *sc,               \
                                       int64_t sc_stride) {                                       \
        for (int64_t l = 0; l < ctx; ++l) {                                                       \
            const T *kt = k_cache + ((table[l / bs] * kv_heads + h) * D) * bs + l % bs;           \
            for (int g = 0; g < NG; ++g) {                                                        \
                float s = 0.f;                                                                    \
                for (int64_t d = 0; d < D; ++d) s += qf[g * D + d] * LOAD(kt[d * bs]);            \
                sc[g * sc_stride + l] = s;                                                        \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    static void scalar_values_##SUFFIX(const float *sc, int64_t sc_stride, int NG,               \
                                       const T *v_cache, const int64_t *table, int64_t ctx,       \
                                       int64_t kv_heads, int64_t h, int64_t D, int64_t bs,        \
                                       float *acc) {                                              \
        memset(acc, 0, sizeof(float) * NG * D);                                                   \
        for (int64_t l = 0; l < ctx; ++l) {                                                       \
            const T *v = v_cache + ((table[l / bs] * kv_heads + h) * bs + l % bs) * D;            \
            for (int g = 0; g < NG; ++g) {                                                        \
                float p = sc[g * sc_stride + l];                                                  \
                for (int64_t d = 0; d < D; ++d) acc[g * D + d] += p * LOAD(v[d]);                 \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_SCALAR(float, f32_load, f32)
DEFINE_SCALAR(uint16_t, bf16_load, bf16)

#ifdef HAVE_AVX512
#define VECTOR_OK(D) ((D) % 16 == 0)
#define DISPATCH_SCORES(NG, SUFFIX, ...)                                                          \
    switch (NG) {                                                                                 \
    case 1: scores_1_##SUFFIX(__VA_ARGS__); break;                                                \
    case 2: scores_2_##SUFFIX(__VA_ARGS__); break;                                                \
    case 3: scores_3_##SUFFIX(__VA_ARGS__); break;                                                \
    default: scores_4_##SUFFIX(__VA_ARGS__); break;                                               \
    }
#define DISPATCH_VALUES(NG, SUFFIX, ...)                                                          \
    switch (NG) {                                                                                 \
    case 1: values_1_##SUFFIX(__VA_ARGS__); break;                                                \
    case 2: values_2_##SUFFIX(__VA_ARGS__); break;                                                \
    case 3: values_3_##SUFFIX(__VA_ARGS__); break;                                                \
    default: values_4_##SUFFIX(__VA_ARGS__); break;                                               \
    }
#else
#define VECTOR_OK(D) 0
#define DISPATCH_SCORES(NG, SUFFIX, ...)
#define DISPATCH_VALUES(NG, SUFFIX, ...)
#endif

/* One (sequence, KV head) item: query heads in chunks of up to 4. */
#define DEFINE_ITEM(T, LOAD, STORE, SUFFIX)                                                       \
    static void item_##SUFFIX(const T *q, int64_t q_head_stride, const T *k_cache,               \
                              const T *v_cache, const int64_t *table, int64_t ctx, T *out,        \
                              int64_t group, int64_t h, int64_t kv_heads, int64_t D, int64_t bs,  \
                              float scale, float *sc, int64_t sc_stride) {                        \
        float qf[4 * MAX_HEAD_DIM];                                                               \
        float acc[4 * MAX_HEAD_DIM];                                                              \
        for (int64_t g0 = 0; g0 < group; g0 += 4) {                                               \
            int NG = group - g0 < 4 ? (int)(group - g0) : 4;                                      \
            for (int g = 0; g < NG; ++g) {                                                        \
                const T *qr = q + (h * group + g0 + g) * q_head_stride;                           \
                for (int64_t d = 0; d < D; ++d) qf[g * D + d] = LOAD(qr[d]) * scale;              \
            }                                                                                     \
            if (VECTOR_OK(D)) {                                                                   \
                DISPATCH_SCORES(NG, SUFFIX, qf, k_cache, table, ctx, kv_heads, h, D, bs, sc,      \
                                sc_stride)                                                        \
            } else {                                                                              \
                scalar_scores_##SUFFIX(qf, NG, k_cache, table, ctx, kv_heads, h, D, bs, sc,       \
                                       sc_stride);                                                \
            }                                                                                     \
            float inv[4];                                                                         \
            for (int g = 0; g < NG; ++g) {                                                        \
                float *sg = sc + g * sc_stride;                                                   \
                float m = -FLT_MAX, sum = 0.f;                                                    \
                for (int64_t l = 0; l < ctx; ++l) m = sg[l] > m ? sg[l] : m;                      \
                for (int64_t l = 0; l < ctx; ++l) {                                               \
                    float e = expf(sg[l] - m);                                                    \
                    sg[l] = e;                                                                    \
                    sum += e;                                                                     \
                }                                                                                 \
                inv[g] = 1.f / sum;                                                               \
            }                                                                                     \
            if (VECTOR_OK(D)) {                                                                   \
                DISPATCH_VALUES(NG, SUFFIX, sc, sc_stride, v_cache, table, ctx, kv_heads, h, D,   \
                                bs, acc)                                                          \
            } else {                                                                              \
                scalar_values_##SUFFIX(sc, sc_stride, NG, v_cache, table, ctx, kv_heads, h, D,    \
                                       bs, acc);                                                  \
            }                                                                                     \
            for (int g = 0; g < NG; ++g) {                                                        \
                T *o = out + (h * group + g0 + g) * D;                                            \
                for (int64_t d = 0; d < D; ++d) o[d] = STORE(acc[g * D + d] * inv[g]);            \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_ITEM(float, f32_load, f32_store, f32)
DEFINE_ITEM(uint16_t, bf16_load, bf16_store, bf16)

/* q: [B, H, D] with strides (q_seq_stride, q_head_stride, 1); out: [B, H, D] contiguous;
 * block_tables: [B, max_blocks]; context_lens: [B]. Returns 0, or non-zero on bad sizes
 * or allocation failure. */
#define DEFINE_KERNEL(NAME, T, SUFFIX)                                                            \
    int NAME(const T *q, int64_t q_seq_stride, int64_t q_head_stride, const T *k_cache,          \
             const T *v_cache, const int64_t *block_tables, int64_t max_blocks,                   \
             const int64_t *context_lens, T *out, int64_t num_seqs, int64_t num_heads,            \
             int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale) {           \
        int64_t group = num_heads / num_kv_heads;                                                 \
        if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM || group * num_kv_heads != num_heads)    \
            return 1;                                                                             \
        /* padded to whole 16-lane chunks: the vector path stores whole chunks */                 \
        int64_t stride = (max_blocks * block_size + 15) / 16 * 16;                                \
        int failed = 0;                                                                           \
        _Pragma("omp parallel")                                                                   \
        {                                                                                         \
            float *sc = malloc(sizeof(float) * 4 * stride);                                       \
            if (!sc) {                                                                            \
                _Pragma("omp atomic write") failed = 1;                                           \
            }                                                                                     \
            _Pragma("omp for schedule(static)")                                                   \
            for (int64_t item = 0; item < num_seqs * num_kv_heads; ++item) {                      \
                if (!sc) continue;                                                                \
                int64_t b = item / num_kv_heads, h = item % num_kv_heads;                         \
                item_##SUFFIX(q + b * q_seq_stride, q_head_stride, k_cache, v_cache,              \
                              block_tables + b * max_blocks, context_lens[b],                     \
                              out + b * num_heads * head_dim, group, h, num_kv_heads, head_dim,   \
                              block_size, scale, sc, stride);                                     \
            }                                                                                     \
            free(sc);                                                                             \
        }                                                                                         \
        return failed ? 2 : 0;                                                                    \
    }

DEFINE_KERNEL(paged_decode_attention_f32, float, f32)
DEFINE_KERNEL(paged_decode_attention_bf16, uint16_t, bf16)
