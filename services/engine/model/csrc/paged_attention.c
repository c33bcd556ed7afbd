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
 * This file: the portable path and the entry point (paged_decode_attention),
 * which picks the path; paged_attention_avx.c: the AVX2 and generic AVX-512
 * paths; paged_attention.h: what the files share.
 *
 * Built by services/engine/model/native.py; plain C so that it compiles in a
 * second without torch headers, and is called through ctypes.
 */
#include <float.h>
#include <omp.h>
#include <stdlib.h>

#include "paged_attention.h"


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
            pa_scores_avx512(s, kv_fmt, NG, qf, sc, sc_stride);
            if (i8) SCALE(s->k_cache);
            for (int g = 0; g < NG; ++g) sums[g] = pa_softmax_avx512(sc + g * sc_stride, s->ctx);
            if (i8) SCALE(s->v_cache);
            pa_values_avx512(s, kv_fmt, NG, sc, sc_stride, acc);
        } else if (path == PATH_AVX2) {
            pa_scores_avx2(s, kv_fmt, NG, qf, sc, sc_stride);
            if (i8) SCALE(s->k_cache);
            for (int g = 0; g < NG; ++g) sums[g] = pa_softmax_avx2(sc + g * sc_stride, s->ctx);
            if (i8) SCALE(s->v_cache);
            pa_values_avx2(s, kv_fmt, NG, sc, sc_stride, acc);
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
