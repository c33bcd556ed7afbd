/* Paged decode attention on AVX-512 for a bf16, fp8 e5m2 or int8 pool with block size
 * 16 and head_dim % 32 == 0 (paged_attention.c: the pool layout, the other paths, and
 * the entry point, paged_decode_attention, which sends these calls here). This file
 * walks the pool; the block kernels of each format are in paged_attention_blocks.h.
 *
 * The default engine's case (and its 8-bit KV caches), where the pool's reads bound
 * the step. One work item is a sequence, or a few of its KV heads when there are
 * too few sequences to share out among the threads; it walks its blocks in the
 * outer loop and its KV heads inside. A block's K (and V) of all KV heads lie side
 * by side in the pool (kv_heads * 2 KB for 64 dims in bf16), and a prompt's blocks
 * are usually adjacent too, so the pool is read in runs of several KB (or one run
 * for a whole prompt) rather than a 2 KB block of one head at a time, which this
 * VM reads ~25% slower.
 *
 * Widening without the two-uops-per-16-values loads of the generic AVX-512 path
 * (paged_attention.c). bf16: one 64-byte load holds 32 values and two uops widen
 * them: x << 16 gives the even elements as float32, x & 0xFFFF0000 the odd ones.
 * e5m2: it is the top byte of a float16, so unpacking a zero byte below each byte
 * (vpunpck[lh]bw, within 128-bit lanes) makes float16s and vcvtph2ps widens 16 of
 * them; 64 bytes take two unpacks, two extracts and four converts. Both leave the
 * values in a lane order of their own (int8's: paged_attention_blocks.h):
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
 * The blocks come as one stream per thread, listed once per call (runs[]): each of
 * its items' K runs, then V runs. While a head of a run is read, the same bytes of
 * the run STREAM_AHEAD places on are prefetched into L2 and those of the next run
 * into L1, a line or two among each step's loads. Prefetching a whole run at once
 * fills the core's line fill buffers and stalls it until the lines land; spread
 * out and two-level, the reads overlap the arithmetic better (batch 64, context
 * 300, contiguous blocks: 16.3-17.8 instead of 14.1-14.8 GB/s on 2 threads).
 * The stream is read ahead only while prefetches are issued, so the softmax
 * between an item's K and V issues PUMP runs' worth too (Pump), and the list
 * lets the distance cross several short items (the earlier item + next pair left
 * runs unprefetched when an item had under STREAM_AHEAD blocks).
 * Batch 64, context 192, 30 layers (bench/decode_attention.py, Intel Xeon SPR,
 * 2 threads): with the row-interleaved softmax and vector q / output, 13.4-13.7
 * -> 12.2-12.6 ms a step contiguous, 15.2-15.8 -> 14.2-14.7 scattered; the same
 * outputs bit for bit. */
#include <float.h>
#include <omp.h>
#include <stdlib.h>

#include "paged_attention_blocks.h"

#if defined(__x86_64__)
#ifndef STREAM_AHEAD
#define STREAM_AHEAD 16
#endif
#ifndef PUMP /* runs of the stream prefetched during an item's softmax (2 measured no better) */
#define PUMP 1
#endif
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

/* Prefetches into L2 spread over a phase that reads no KV (the softmax), so the
 * pool's stream does not pause: line next of the lines [next, end) starting at
 * runs[0] (each run_bytes long). */
typedef struct {
    const char *const *runs;
    int64_t run_bytes, next, end;
} Pump;

ALWAYS_INLINE void pump_one(Pump *pm) {
    if (pm->next < pm->end) {
        int64_t off = pm->next++ * 64;
        __builtin_prefetch(pm->runs[off / pm->run_bytes] + off % pm->run_bytes, 0, 1);
    }
}

/* pa_softmax_avx512 on NR rows of sg (stride apart) at once: the same float
 * operations per row, in the same order, but NR independent chains for the core
 * to overlap (one row alone waits on its max and sum chains). sums[r]: row r's sum. */
ALWAYS_INLINE T512 void softmax_rows(const int NR, float *sg, int64_t stride, int64_t n, float *sums, Pump *pm) {
    __m512 mv[4], sv[4];
    int64_t l = 0;
    for (int r = 0; r < NR; ++r) mv[r] = _mm512_set1_ps(-FLT_MAX), sv[r] = _mm512_setzero_ps();
    for (; l + 16 <= n; l += 16) {
        pump_one(pm);
        for (int r = 0; r < NR; ++r) mv[r] = _mm512_max_ps(mv[r], _mm512_loadu_ps(sg + r * stride + l));
    }
    __mmask16 tail = (__mmask16)((1u << (n - l)) - 1u);
    for (int r = 0; r < NR; ++r) {
        mv[r] = _mm512_mask_max_ps(mv[r], tail, mv[r], _mm512_maskz_loadu_ps(tail, sg + r * stride + l));
        mv[r] = _mm512_set1_ps(_mm512_reduce_max_ps(mv[r]));
    }
    for (l = 0; l + 16 <= n; l += 16) {
        pump_one(pm);
        for (int r = 0; r < NR; ++r) {
            __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sg + r * stride + l), mv[r]));
            _mm512_storeu_ps(sg + r * stride + l, e);
            sv[r] = _mm512_add_ps(sv[r], e);
        }
    }
    for (int r = 0; r < NR; ++r) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sg + r * stride + l), mv[r]));
        _mm512_mask_storeu_ps(sg + r * stride + l, tail, e);
        sv[r] = _mm512_mask_add_ps(sv[r], tail, sv[r], e);
        sums[r] = _mm512_reduce_add_ps(sv[r]);
    }
}

/* The scores, then the values, of all the item's KV heads, up to 4 query heads a
 * time (a switch per block and head: cheap beside the 16 tokens' work). sums[r]:
 * row r's softmax denominator. runs: the item's K runs, its V runs, then the rest of
 * the thread's stream (past its end: the last run, already there: cheap). */
ALWAYS_INLINE T512 void item_pass(const int fmt, const Pool *pl, const Item *it, const char *const *runs,
                                   int64_t group, const __m512 *qv, float *sc, int64_t sc_stride, float *sums,
                                   float *acc, int first) {
    int64_t nb = (it->ctx + 15) / 16, D = pl->D, hb = pl->head_bytes;
    if (first) /* the thread's first runs: nothing read before prefetched them */
        for (int64_t i = 0; i < STREAM_AHEAD; ++i)
            for (int64_t off = 0; off < it->nh * hb; off += 64) __builtin_prefetch(runs[i] + off, 0, 1);
    for (int64_t b = 0; b < nb; ++b) {
        const char *run = runs[b], *ahead = runs[b + STREAM_AHEAD], *near = runs[b + 1];
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
    Pump pm = {runs + nb + STREAM_AHEAD, it->nh * hb, 0, PUMP * it->nh * hb / 64};
    for (int64_t r = 0; r < it->nh * group;) {
        float *sr = sc + r * sc_stride;
        int64_t left = it->nh * group - r; /* 4 rows a time, or 3 when that leaves none alone (9: 3 + 3 + 3) */
        int64_t nr = left <= 4 ? left : left % 4 == 0 ? 4 : left % 3 == 0 ? 3 : 4;
        switch (nr) {
        case 1: softmax_rows(1, sr, sc_stride, it->ctx, sums + r, &pm); break;
        case 2: softmax_rows(2, sr, sc_stride, it->ctx, sums + r, &pm); break;
        case 3: softmax_rows(3, sr, sc_stride, it->ctx, sums + r, &pm); break;
        default: softmax_rows(4, sr, sc_stride, it->ctx, sums + r, &pm); break;
        }
        r += nr;
    }
    while (pm.next < pm.end) pump_one(&pm);
    memset(acc, 0, sizeof(float) * it->nh * group * D);
    for (int64_t b = 0; b < nb; ++b) {
        const char *run = runs[nb + b], *ahead = runs[nb + b + STREAM_AHEAD], *near = runs[nb + b + 1];
        int64_t n = it->ctx - b * 16 < 16 ? it->ctx - b * 16 : 16;
        for (int64_t h = 0; h < it->nh; ++h)
            for (int64_t g = 0; g < group; g += 4) {
                const char *vb = run + h * hb, *pf = g == 0 ? ahead + h * hb : NULL, *pn = near + h * hb;
                float *pg = sc + (h * group + g) * sc_stride + b * 16;
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

/* One item; the caller checked bs == 16, D % 32 == 0 and a bf16, e5m2 or int8 pool (kv_fmt).
 * runs: as item_pass's. Scratch for nh * group
 * query heads: qv [rows * D/2] vectors, sc rows of sc_stride, sums [rows], acc [rows * D]. */
static T512 void item_fast(int fmt, int kv_fmt, const char *q, int64_t q_head_stride, const Pool *pl, const Item *it,
                           const char *const *runs, char *out, int64_t group, float scale, __m512 *qv, float *sc,
                           int64_t sc_stride, float *sums, float *acc, int first) {
    int64_t D = pl->D, rows = it->nh * group;
    for (int64_t r = 0; r < rows; ++r) {
        const char *qh = q + (it->h0 * group + r) * q_head_stride * (fmt == FMT_F32 ? 4 : 2);
        for (int64_t d = 0; d < D; d += 16) { /* 16 dims: 8 vectors of [q_2p x8, q_2p+1 x8] */
            __m512 x = fmt == FMT_F32 ? _mm512_loadu_ps((const float *)qh + d) : ld16_bf16((const uint16_t *)qh + d);
            x = _mm512_mul_ps(x, _mm512_set1_ps(scale));
            if (kv_fmt == FMT_I8) { /* D plain floats (scores_i8) */
                _mm512_storeu_ps((float *)(qv + r * (D / 2)) + d, x);
                continue;
            }
            for (int p = 0; p < 8; ++p) {
                __m512i sel = _mm512_mask_blend_epi32((__mmask16)0xFF00, _mm512_set1_epi32(2 * p),
                                                      _mm512_set1_epi32(2 * p + 1));
                qv[r * (D / 2) + d / 2 + p] = _mm512_permutexvar_ps(sel, x);
            }
        }
    }
    if (kv_fmt == FMT_BF16)
        item_pass(FMT_BF16, pl, it, runs, group, qv, sc, sc_stride, sums, acc, first);
    else if (kv_fmt == FMT_E5M2)
        item_pass(FMT_E5M2, pl, it, runs, group, qv, sc, sc_stride, sums, acc, first);
    else
        item_pass(FMT_I8, pl, it, runs, group, qv, sc, sc_stride, sums, acc, first);
    for (int64_t r = 0; r < rows; ++r) {
        float *row = acc + r * D, inv = 1.f / sums[r];
        int64_t o = (it->h0 * group + r) * D;
        unpermute_row(kv_fmt, row, D);
        for (int64_t d = 0; d < D; d += 16) {
            __m512 y = _mm512_mul_ps(_mm512_loadu_ps(row + d), _mm512_set1_ps(inv));
            if (fmt == FMT_F32)
                _mm512_storeu_ps((float *)out + o + d, y);
            else
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + o + d), cvt16_bf16(y));
        }
    }
}

static inline Item item_of(int64_t i, int64_t per_seq, int64_t hc, int64_t kv_heads, const int64_t *block_tables,
                           int64_t max_blocks, const int64_t *context_lens) {
    int64_t b = i / per_seq, h0 = i % per_seq * hc;
    Item it = {block_tables + b * max_blocks, context_lens[b], h0, kv_heads - h0 < hc ? kv_heads - h0 : hc};
    return it;
}

/* This thread's share of the items: a run of consecutive ones (their blocks often
 * lie side by side in the pool) holding its share of the tokens, so uneven contexts
 * split evenly; their runs are listed first, so the prefetches run ahead across items.
 * Returns 0, or 2 when out of memory. */
PA_INTERNAL T512 int pa_b16_share(int fmt, int kv_fmt, const char *q, int64_t q_seq_stride, int64_t q_head_stride,
                                  const void *k_cache, const void *v_cache, const int64_t *block_tables,
                                  int64_t max_blocks, const int64_t *context_lens, char *out, int64_t num_seqs,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale,
                                  int64_t stride) {
    if (num_seqs == 0) return 0;
    Pool pool = {k_cache, v_cache, num_kv_heads, head_dim, pa_chunk_bytes(kv_fmt, head_dim, 16)}, *pl = &pool;
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
    int64_t rows = hc * group, nruns = 0;
    for (int64_t i = lo; i < hi; ++i)
        nruns += 2 * ((item_of(i, per_seq, hc, kv_heads, block_tables, max_blocks, context_lens).ctx + 15) / 16);
    size_t qv_bytes = sizeof(__m512) * rows * (D / 2), fl = sizeof(float) * rows * (stride + 1 + D);
    size_t rb = sizeof(char *) * (nruns + STREAM_AHEAD + PUMP + 2);
    char *mem = aligned_alloc(64, (qv_bytes + fl + rb + 63) / 64 * 64);
    if (!mem) return 2;
    __m512 *qv = (__m512 *)mem;
    float *sc = (float *)(mem + qv_bytes), *sums = sc + rows * stride, *acc = sums + rows;
    const char **runs = (const char **)(mem + qv_bytes + fl);
    int64_t n = 0;
    for (int64_t i = lo; i < hi; ++i) {
        Item it = item_of(i, per_seq, hc, kv_heads, block_tables, max_blocks, context_lens);
        int64_t nb = (it.ctx + 15) / 16;
        for (int64_t b = 0; b < nb; ++b) runs[n++] = run_at(pl, pl->k_cache, &it, b);
        for (int64_t b = 0; b < nb; ++b) runs[n++] = run_at(pl, pl->v_cache, &it, b);
    }
    for (int64_t e = 0; e < STREAM_AHEAD + PUMP + 2; ++e) /* past the end: the last run, already read */
        runs[n + e] = n ? runs[n - 1] : pl->k_cache;
    n = 0;
    for (int64_t i = lo; i < hi; ++i) {
        Item it = item_of(i, per_seq, hc, kv_heads, block_tables, max_blocks, context_lens);
        int64_t b = i / per_seq;
        item_fast(fmt, kv_fmt, q + b * q_seq_stride * esize, q_head_stride, pl, &it, runs + n,
                  out + b * num_heads * D * esize, group, scale, qv, sc, stride, sums, acc, i == lo);
        n += 2 * ((it.ctx + 15) / 16);
    }
    free(mem);
    return 0;
}
#endif /* __x86_64__ */
