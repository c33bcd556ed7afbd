/* The paged decode attention's interface, and what its files share:
 * paged_attention.c (the portable path, and the entry point that picks one),
 * paged_attention_avx.c (the AVX2 and generic AVX-512 paths),
 * paged_attention_b16.c (the AVX-512 path of its own for a bf16, fp8 e5m2 or
 * int8 pool with block size 16; its per-format block kernels in
 * paged_attention_blocks.h) and kv_int8.c (the int8 KV cache's stores and the
 * other paths' scale pass). See paged_attention.c's top for the pool layout and
 * the paths.
 */
#ifndef SCALELLM_PAGED_ATTENTION_H
#define SCALELLM_PAGED_ATTENTION_H

#include "simd.h"

/* Between the library's own files only: not exported, called without the PLT. */
#define PA_INTERNAL __attribute__((visibility("hidden")))

/* The int8 KV cache's pool format, after simd.h's FMT_*: int8 values, one float32
 * scale per (token, KV head) vector. A pool of it is laid out in chunks of one block
 * of one KV head, (head_dim + 4) * block_size bytes: the block_size x head_dim
 * int8 values as a bf16 pool lays them out (K dim-major [D, block_size], V
 * [block_size, D]), then the block_size tokens' float32 scales (kv_cache.py). */
enum { FMT_I8 = 3 };

/* Bytes of one (block, KV head) chunk of a pool in format kv_fmt. */
static inline int64_t pa_chunk_bytes(int kv_fmt, int64_t head_dim, int64_t block_size) {
    return kv_fmt == FMT_I8 ? (head_dim + 4) * block_size
                            : head_dim * block_size * (kv_fmt == FMT_F32 ? 4 : kv_fmt == FMT_BF16 ? 2 : 1);
}

/* Element i of p, in format fmt (FMT_F32, FMT_BF16, FMT_E5M2 or FMT_I8, unscaled), as float32. */
static inline float ld1(const void *p, int64_t i, int fmt) {
    return fmt == FMT_F32    ? ((const float *)p)[i]
           : fmt == FMT_BF16 ? bf16_to_f32(((const uint16_t *)p)[i])
           : fmt == FMT_E5M2 ? e5m2_to_f32(((const uint8_t *)p)[i])
                             : (float)((const int8_t *)p)[i];
}

/* v into element i of p, in format fmt (FMT_F32 or FMT_BF16: q's and out's). */
static inline void st1(void *p, int64_t i, float v, int fmt) {
    if (fmt == FMT_F32)
        ((float *)p)[i] = v;
    else
        ((uint16_t *)p)[i] = f32_to_bf16(v);
}

/* What paged_attention.c's item() and its vector paths share: limits, the block
 * prefetch, a (block, head) chunk's address, and one (sequence, KV head) item. */
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

#if defined(__x86_64__)
/* paged_attention_avx.c: scores (sc[g * sc_stride + l] = q_g . K_l), softmax in place
 * (returns the sum) and values (acc[g] = sum_l p[g][l] V_l, unnormalised) for the NG
 * query heads of one item; fmt: the pool's format. */
PA_INTERNAL T256 void pa_scores_avx2(const Seq *s, int fmt, int NG, const float *qf, float *sc, int64_t sc_stride);
PA_INTERNAL T256 void pa_values_avx2(const Seq *s, int fmt, int NG, const float *sc, int64_t sc_stride, float *acc);
PA_INTERNAL T256 float pa_softmax_avx2(float *sg, int64_t n);
PA_INTERNAL T512 void pa_scores_avx512(const Seq *s, int fmt, int NG, const float *qf, float *sc, int64_t sc_stride);
PA_INTERNAL T512 void pa_values_avx512(const Seq *s, int fmt, int NG, const float *sc, int64_t sc_stride, float *acc);
PA_INTERNAL T512 float pa_softmax_avx512(float *sg, int64_t n);
#endif

/* paged_attention.c: which paths this CPU runs (bit i: path i), and the entry
 * point (its arguments and return codes are described there). */
int native_paths(void);
int paged_decode_attention(int path, int fmt, int kv_fmt, const void *q, int64_t q_seq_stride, int64_t q_head_stride,
                           const void *k_cache, const void *v_cache, const int64_t *block_tables, int64_t max_blocks,
                           const int64_t *context_lens, void *out, int64_t num_seqs, int64_t num_heads,
                           int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale);

/* kv_int8.c: sc[g * sc_stride + l] *= the scale of token l, for the NG rows of one item
 * (KV head h of a sequence of ctx tokens, block table table) of an int8 pool
 * (cache: one layer's K or V): K's scales turn the scores' sums into q.k, V's are
 * folded into the probabilities before they weigh V's values. */
PA_INTERNAL void pa_i8_scale_rows(const void *cache, const int64_t *table, int64_t kv_heads, int64_t h, int64_t D,
                                  int64_t bs, int64_t ctx, int NG, float *sc, int64_t sc_stride);

/* kv_int8.c: quantize one token's bf16 k and v of one KV head ([D] each) into an
 * int8 pool: k into its K chunk (dim-major, column offset), v into row offset of its
 * V chunk, and each one's scale after the chunk's values (layers.c's KV store). */
PA_INTERNAL void kv_i8_store_bf16(int path, const uint16_t *k, const uint16_t *v, char *k_chunk, char *v_chunk,
                                  int64_t offset, int64_t D, int64_t bs);

#if defined(__x86_64__)
/* paged_attention_b16.c: the calling thread's share of a decode call on the block-16
 * path, inside paged_decode_attention's parallel region (the same arguments; stride:
 * a score row's floats). Returns 0, or 2 when out of memory. */
PA_INTERNAL T512 int pa_b16_share(int fmt, int kv_fmt, const char *q, int64_t q_seq_stride, int64_t q_head_stride,
                                  const void *k_cache, const void *v_cache, const int64_t *block_tables,
                                  int64_t max_blocks, const int64_t *context_lens, char *out, int64_t num_seqs,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale,
                                  int64_t stride);
#endif

#endif
