/* The paged decode attention's interface, and what its two files share:
 * paged_attention.c (the portable, AVX2 and AVX-512 paths, and the entry point
 * that picks one) and paged_attention_b16.c (the AVX-512 path of its own for a
 * bf16 or fp8 e5m2 pool with block size 16). See paged_attention.c's top for
 * the pool layout and the paths.
 */
#ifndef SCALELLM_PAGED_ATTENTION_H
#define SCALELLM_PAGED_ATTENTION_H

#include "simd.h"

/* Between the library's own files only: not exported, called without the PLT. */
#define PA_INTERNAL __attribute__((visibility("hidden")))

/* Element i of p, in format fmt (FMT_F32, FMT_BF16 or FMT_E5M2), as float32. */
static inline float ld1(const void *p, int64_t i, int fmt) {
    return fmt == FMT_F32    ? ((const float *)p)[i]
           : fmt == FMT_BF16 ? bf16_to_f32(((const uint16_t *)p)[i])
                             : e5m2_to_f32(((const uint8_t *)p)[i]);
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
