/* The paged decode attention's interface, and what its files share:
 * paged_attention.c (the portable, AVX2 and AVX-512 paths, and the entry point
 * that picks one), paged_attention_b16.c (the AVX-512 path of its own for a
 * bf16, fp8 e5m2 or int8 pool with block size 16; its per-format block kernels
 * in paged_attention_blocks.h) and kv_int8.c (the int8 KV cache's stores and the
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
