/* The block-16 path's block kernels (paged_attention_b16.c), one set per pool format:
 * the scores of one block of one KV head (scores_block) and the probability-weighted
 * sum of its values (values_block), for up to 4 query heads, with the prefetches of
 * the pool's stream (PREFETCH2: pf, the same bytes STREAM_AHEAD runs on, into L2; pn,
 * the next run's, into L1). Included by paged_attention_b16.c only; its top describes
 * the bf16 and e5m2 lane orders.
 *
 * int8 (the int8 KV cache): a chunk is 16 tokens' int8 values, then their 16 float32
 * scales (paged_attention.h). A 16-byte row of K holds one dim of the 16 tokens,
 * sign-extended and converted (vpmovsxbd, vcvtdq2ps) and multiplied by that dim of q
 * broadcast, so the scores come out in token order and q needs no pairing (item_fast
 * lays it out as D plain floats a head); the 16 sums are multiplied by the 16 K
 * scales, one vector. V's rows come out in dim order; the block's 16 probabilities of
 * each query head are multiplied by V's 16 scales once, before they weigh the values
 * (their softmax sum is taken already). Half the bytes of bf16 for twice the widening
 * uops per value.
 */
#ifndef SCALELLM_PAGED_ATTENTION_BLOCKS_H
#define SCALELLM_PAGED_ATTENTION_BLOCKS_H

#include "paged_attention.h"

#if defined(__x86_64__)
/* The bytes at off in the run STREAM_AHEAD places on into L2 (prefetcht2), and in
 * the next run into L1 (prefetcht0). */
#define PREFETCH2(pf, pn, off) (__builtin_prefetch((pf) + (off), 0, 1), __builtin_prefetch((pn) + (off), 0, 3))

/* ---- int8 ---- */

/* 16 int8 at p, as float32 (unscaled). */
ALWAYS_INLINE T512 __m512 i8x16(const char *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* scores_block on an int8 K chunk (kt); head g's q: D floats at (const float *)(qv + g * D/2).
 * Four dims (a 64-byte line) a step, into four accumulators per head. */
ALWAYS_INLINE T512 void scores_i8(const int NG, const char *kt, const char *pf, const char *pn, int64_t D,
                                   const __m512 *qv, float *sc, int64_t sc_stride) {
    __m512 a[4][4];
    for (int g = 0; g < NG; ++g)
        for (int c = 0; c < 4; ++c) a[g][c] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 4) {
        if (pf) PREFETCH2(pf, pn, d * 16);
        for (int c = 0; c < 4; ++c) {
            __m512 k = i8x16(kt + (d + c) * 16);
            for (int g = 0; g < NG; ++g) {
                __m512 q = _mm512_set1_ps(((const float *)(qv + g * (D / 2)))[d + c]);
                a[g][c] = _mm512_fmadd_ps(q, k, a[g][c]);
            }
        }
    }
    if (pf) PREFETCH2(pf, pn, D * 16); /* the scales' line */
    __m512 scale = _mm512_loadu_ps((const float *)(kt + D * 16));
    for (int g = 0; g < NG; ++g) {
        __m512 sum = _mm512_add_ps(_mm512_add_ps(a[g][0], a[g][1]), _mm512_add_ps(a[g][2], a[g][3]));
        _mm512_storeu_ps(sc + g * sc_stride, _mm512_mul_ps(sum, scale));
    }
}

/* values_chunk on an int8 V chunk: NV * 16 dims of each of the n token rows, in dim order. */
ALWAYS_INLINE T512 void values_chunk_i8(const int NG, const int NV, const char *vb, const char *pf, const char *pn,
                                         int64_t D, int64_t n, const float *p, int64_t sc_stride, float *acc) {
    __m512 a[4][4];
    for (int g = 0; g < NG; ++g)
        for (int c = 0; c < NV; ++c) a[g][c] = _mm512_loadu_ps(acc + g * D + 16 * c);
    for (int64_t j = 0; j < n; ++j) {
        if (pf) PREFETCH2(pf, pn, j * D);
        __m512 v[4];
        for (int c = 0; c < NV; ++c) v[c] = i8x16(vb + j * D + 16 * c);
        for (int g = 0; g < NG; ++g) {
            __m512 pj = _mm512_set1_ps(p[g * sc_stride + j]);
            for (int c = 0; c < NV; ++c) a[g][c] = _mm512_fmadd_ps(pj, v[c], a[g][c]);
        }
    }
    for (int g = 0; g < NG; ++g)
        for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc + g * D + 16 * c, a[g][c]);
}

/* values_block on an int8 V chunk: the NG probability rows' 16 entries of this block
 * (within their padded rows) times V's scales, in place, then 64 dims a pass. */
ALWAYS_INLINE T512 void values_block_i8(const int NG, const char *vb, const char *pf, const char *pn, int64_t D,
                                         int64_t n, float *p, int64_t sc_stride, float *acc) {
    if (pf) PREFETCH2(pf, pn, D * 16); /* the scales' line */
    __m512 scale = _mm512_loadu_ps((const float *)(vb + D * 16));
    for (int g = 0; g < NG; ++g) _mm512_storeu_ps(p + g * sc_stride, _mm512_mul_ps(_mm512_loadu_ps(p + g * sc_stride), scale));
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64)
        values_chunk_i8(NG, 4, vb + d0, pf ? pf + d0 : NULL, pn + d0, D, n, p, sc_stride, acc + d0);
    if (d0 < D) values_chunk_i8(NG, 2, vb + d0, pf ? pf + d0 : NULL, pn + d0, D, n, p, sc_stride, acc + d0);
}

/* ---- bf16 and e5m2, and the per-format entry points ---- */

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
 * for NG query heads; qv[g * D/2 + p] = [q_{2p} x8, q_{2p+1} x8] of head g (bf16, e5m2;
 * int8: scores_i8). */
ALWAYS_INLINE T512 void scores_block(const int fmt, const int NG, const char *kt, const char *pf, const char *pn,
                                      int64_t D, const __m512 *qv, float *sc, int64_t sc_stride) {
    if (fmt == FMT_I8) {
        scores_i8(NG, kt, pf, pn, D, qv, sc, sc_stride);
        return;
    }
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
                                      int64_t D, int64_t n, float *p, int64_t sc_stride, float *acc) {
    if (fmt == FMT_I8) {
        values_block_i8(NG, vb, pf, pn, D, n, p, sc_stride, acc);
        return;
    }
    int64_t d0 = 0, es = fmt == FMT_BF16 ? 2 : 1;
    for (; d0 + 64 <= D; d0 += 64)
        values_chunk(fmt, NG, 4, vb + d0 * es, pf ? pf + d0 * es : NULL, pn + d0 * es, D, n, p, sc_stride, acc + d0);
    if (d0 < D)
        values_chunk(fmt, NG, 2, vb + d0 * es, pf ? pf + d0 * es : NULL, pn + d0 * es, D, n, p, sc_stride, acc + d0);
}

/* One accumulator row (D floats) from values_block's lane order back to dim order
 * (int8's is in order already). */
static T512 void unpermute_row(int fmt, float *row, int64_t D) {
    if (fmt == FMT_I8) return;
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

#endif /* __x86_64__ */
#endif
