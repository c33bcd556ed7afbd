/* GGUF linears (qlinear.h): the AVX2 (+ AVX-VNNI) kernels, int8 activations. */
#include "qlinear.h"

#if defined(__x86_64__)

/* ---- AVX2 (+ AVX-VNNI) ------------------------------------------------------
 * A panel as two halves of 8 rows (lanes): bytes 32h.. of each 64-byte chunk,
 * scales 8h... Without VNNI, Q4 products (u4 x s8, pairs at most 2 * 15 * 127)
 * add up in 16 bits over a whole block (8 x 3810 < 32767) before one widening;
 * Q8_0 uses |w| x sign(x, w) (pairs at most 2 * 128 * 127) widened each time. */

#define MR256 4

#define TILE256_BODY(DOT_Q4, DOT_Q8)                                                               \
    const int64_t bstride = block_bytes(KIND), qoff = quant_offset(KIND);                           \
    const __m256i low4 = _mm256_set1_epi8(0x0F);                                                   \
    for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();                                     \
    for (int64_t b = 0; b < nb; ++b) {                                                             \
        const uint8_t *blk = wp + b * bstride, *qs = blk + qoff + 32 * h;                          \
        __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16 * h)));              \
        __m256 m = KIND == KIND_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 32 + 16 * h))) \
                                     : _mm256_mul_ps(d, _mm256_set1_ps(KIND == KIND_Q4_0 ? -8.f : 0.f)); \
        __m256i s[MR256]; /* not [MR]: a VLA kept the sums on the stack */                         \
        for (int i = 0; i < MR; ++i) s[i] = _mm256_setzero_si256();                                \
        const int8_t *xb = xq + b * QB;                                                            \
        if (KIND == KIND_Q8_0) {                                                                   \
            for (int g = 0; g < 8; ++g) {                                                          \
                __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 64 * g));                    \
                __m256i av = _mm256_abs_epi8(v);                                                   \
                for (int i = 0; i < MR; ++i) {                                                     \
                    __m256i xv = _mm256_sign_epi8(_mm256_set1_epi32(load4(xb + i * k + 4 * g)), v); \
                    DOT_Q8(s[i], av, xv);                                                          \
                }                                                                                  \
            }                                                                                      \
        } else {                                                                                   \
            for (int c = 0; c < 4; ++c) {                                                          \
                __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 64 * c));                    \
                __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4); \
                for (int i = 0; i < MR; ++i) {                                                     \
                    DOT_Q4(s[i], lo, _mm256_set1_epi32(load4(xb + i * k + 4 * c)));                \
                    DOT_Q4(s[i], hi, _mm256_set1_epi32(load4(xb + i * k + 16 + 4 * c)));           \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int i = 0; i < MR; ++i) {                                                             \
            const float *sc = xs + (i * nb + b) * 2;                                               \
            __m256i wide = KIND == KIND_Q8_0 ? s[i] : WIDEN_Q4(s[i]);                              \
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide), _mm256_mul_ps(d, _mm256_set1_ps(sc[0])), acc[i]); \
            acc[i] = _mm256_fmadd_ps(m, _mm256_set1_ps(sc[1]), acc[i]);                            \
        }                                                                                          \
    }

/* AVX2: Q4 sums stay in 16 bits for the block; Q8 widens per product pair. */
#define DOT_Q4_MADDUBS(s, u, x) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(u, x))
#define DOT_Q8_MADDUBS(s, u, x) s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)))
#define DOT_VNNI(s, u, x) s = _mm256_dpbusd_avx_epi32(s, u, x)

static inline __attribute__((always_inline)) T256 void tile256(const uint8_t *wp, const int KIND, const int MR, int h,
                                                               int64_t nb, int64_t k, const int8_t *xq,
                                                               const float *xs, __m256 *acc) {
#define WIDEN_Q4(s) _mm256_madd_epi16(s, _mm256_set1_epi16(1))
    TILE256_BODY(DOT_Q4_MADDUBS, DOT_Q8_MADDUBS)
#undef WIDEN_Q4
}

static inline __attribute__((always_inline)) T256V void tile256v(const uint8_t *wp, const int KIND, const int MR,
                                                                 int h, int64_t nb, int64_t k, const int8_t *xq,
                                                                 const float *xs, __m256 *acc) {
#define WIDEN_Q4(s) (s)
    TILE256_BODY(DOT_VNNI, DOT_VNNI)
#undef WIDEN_Q4
}

/* One activation row x one whole panel (the decode step at batch 1): both halves in one pass over
 * each block, so every weight line is read once, and the lines GEMV_PREFETCH bytes ahead are
 * prefetched. From DRAM the two-pass tile above reads a panel's lines in its first pass and
 * computes the second from L1, so the memory and the arithmetic take turns instead of
 * overlapping: 1.3-1.5x slower at one row (bench/qlinear_calls.py). The sums are the tile's,
 * in its order: the same bits. */
#ifndef GEMV_PREFETCH
#define GEMV_PREFETCH 4096
#endif
/* 0: one row runs on the tiles too (A/B builds: bench/qlinear_calls.py --cflags=-DQLINEAR_ROW_KERNEL=0). */
#ifndef QLINEAR_ROW_KERNEL
#define QLINEAR_ROW_KERNEL 1
#endif

#define GEMV256_BODY(DOT_Q4, DOT_Q8, WIDEN)                                                                \
    const int64_t bstride = block_bytes(KIND), qoff = quant_offset(KIND);                                  \
    const __m256i low4 = _mm256_set1_epi8(0x0F);                                                          \
    const __m256 m_per_d = _mm256_set1_ps(KIND == KIND_Q4_0 ? -8.f : 0.f);                                \
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                                            \
    for (int64_t b = 0; b < nb; ++b) {                                                                    \
        const uint8_t *blk = wp + b * bstride, *qs = blk + qoff;                                          \
        for (int64_t line = 0; line < bstride; line += 64)                                                \
            _mm_prefetch((const char *)blk + GEMV_PREFETCH + line, _MM_HINT_T0);                          \
        __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));                               \
        __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16)));                        \
        __m256 m0 = _mm256_mul_ps(d0, m_per_d), m1 = _mm256_mul_ps(d1, m_per_d);                          \
        if (KIND == KIND_Q4_1) {                                                                          \
            m0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 32)));                           \
            m1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 48)));                           \
        }                                                                                                 \
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();                                 \
        const int8_t *xb = xq + b * QB;                                                                   \
        if (KIND == KIND_Q8_0) {                                                                          \
            for (int g = 0; g < 8; ++g) {                                                                 \
                __m256i v0 = _mm256_loadu_si256((const __m256i *)(qs + 64 * g));                          \
                __m256i v1 = _mm256_loadu_si256((const __m256i *)(qs + 64 * g + 32));                     \
                __m256i xv = _mm256_set1_epi32(load4(xb + 4 * g));                                        \
                DOT_Q8(s0, _mm256_abs_epi8(v0), _mm256_sign_epi8(xv, v0));                                \
                DOT_Q8(s1, _mm256_abs_epi8(v1), _mm256_sign_epi8(xv, v1));                                \
            }                                                                                             \
        } else {                                                                                          \
            for (int c = 0; c < 4; ++c) {                                                                 \
                __m256i v0 = _mm256_loadu_si256((const __m256i *)(qs + 64 * c));                          \
                __m256i v1 = _mm256_loadu_si256((const __m256i *)(qs + 64 * c + 32));                     \
                __m256i lo = _mm256_set1_epi32(load4(xb + 4 * c)), hi = _mm256_set1_epi32(load4(xb + 16 + 4 * c)); \
                DOT_Q4(s0, _mm256_and_si256(v0, low4), lo);                                               \
                DOT_Q4(s0, _mm256_and_si256(_mm256_srli_epi16(v0, 4), low4), hi);                         \
                DOT_Q4(s1, _mm256_and_si256(v1, low4), lo);                                               \
                DOT_Q4(s1, _mm256_and_si256(_mm256_srli_epi16(v1, 4), low4), hi);                         \
            }                                                                                             \
        }                                                                                                 \
        const __m256 sc0 = _mm256_set1_ps(xs[2 * b]), sc1 = _mm256_set1_ps(xs[2 * b + 1]);                \
        __m256i w0 = KIND == KIND_Q8_0 ? s0 : WIDEN(s0), w1 = KIND == KIND_Q8_0 ? s1 : WIDEN(s1);          \
        a0 = _mm256_fmadd_ps(m0, sc1, _mm256_fmadd_ps(_mm256_cvtepi32_ps(w0), _mm256_mul_ps(d0, sc0), a0)); \
        a1 = _mm256_fmadd_ps(m1, sc1, _mm256_fmadd_ps(_mm256_cvtepi32_ps(w1), _mm256_mul_ps(d1, sc0), a1)); \
    }                                                                                                     \
    acc[0] = a0;                                                                                          \
    acc[1] = a1;

/* acc[h]: half h of the panel's sums for the row (xq, xs: its int8 values and block scales). */
static inline __attribute__((always_inline)) T256 void gemv256(const uint8_t *wp, const int KIND, int64_t nb,
                                                               const int8_t *xq, const float *xs, __m256 *acc) {
#define WIDEN_Q4(s) _mm256_madd_epi16(s, _mm256_set1_epi16(1))
    GEMV256_BODY(DOT_Q4_MADDUBS, DOT_Q8_MADDUBS, WIDEN_Q4)
#undef WIDEN_Q4
}

static inline __attribute__((always_inline)) T256V void gemv256v(const uint8_t *wp, const int KIND, int64_t nb,
                                                                 const int8_t *xq, const float *xs, __m256 *acc) {
#define WIDEN_Q4(s) (s)
    GEMV256_BODY(DOT_VNNI, DOT_VNNI, WIDEN_Q4)
#undef WIDEN_Q4
}

#define STORE256(TGT)                                                                                 \
    static inline TGT void store256_##TGT##_(__m256 v, int count, int64_t col, const float *bias,     \
                                              const void *residual, int64_t row, int64_t res_stride,   \
                                              void *out, int64_t out_stride, int out_bf16) {           \
        float tmp[8];                                                                                 \
        if (count >= 8 && !out_bf16 && !bias) {                                                       \
            float *o = (float *)out + row * out_stride + col;                                         \
            if (residual) v = _mm256_add_ps(v, _mm256_loadu_ps((const float *)residual + row * res_stride + col)); \
            _mm256_storeu_ps(o, v);                                                                   \
            return;                                                                                   \
        }                                                                                             \
        _mm256_storeu_ps(tmp, v);                                                                     \
        finish_row(tmp, count, col, bias, residual, row, res_stride, out, out_stride, out_bf16);      \
    }
STORE256(T256)
STORE256(T256V)

/* SwiGLU operands and store (qlinear.h), 8 lanes: store256's rounding (finish_row's + 0.f
 * included: it turns -0 into +0), and layers.c's silu_row_avx2 (exp8, rcp and one Newton step),
 * in its -ffast-math build's order, as swiglu_store512: (g * u) * inv. */
static inline __attribute__((always_inline)) T256 __m256 swiglu_operand256(__m256 v, const float *bias, int64_t col,
                                                                            int out_bf16) {
    v = _mm256_add_ps(v, bias ? _mm256_loadu_ps(bias + col) : _mm256_setzero_ps());
    if (!out_bf16) return v;
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd);
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xFFFF0000u)));
}

static inline __attribute__((always_inline)) T256 void swiglu_store256(__m256 g, __m256 u, int64_t col, int64_t row,
                                                                        void *out, int64_t out_stride, int out_bf16) {
    const __m256 one = _mm256_set1_ps(1.f);
    __m256 den = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)));
    __m256 inv = _mm256_rcp_ps(den);
    inv = _mm256_fmadd_ps(inv, _mm256_fnmadd_ps(den, inv, one), inv);
    __m256 v = _mm256_mul_ps(_mm256_mul_ps(g, u), inv);
    if (!out_bf16) {
        _mm256_storeu_ps((float *)out + row * out_stride + col, v);
        return;
    }
    __m256i b = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    _mm_storeu_si128((__m128i *)((uint16_t *)out + row * out_stride + col),
                     _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

/* MR rows of half h of panel p: the plain store, or (pairs) gate panel p's half with up panel
 * p + pairs's into SwiGLU columns 16 p + 8 h.. (qlinear.h). */
#define TILE256_CASE(TILE, STORE, KIND_, MR_)                                                      \
    case MR_: {                                                                                    \
        __m256 acc[MR_], gate[MR_];                                                                \
        TILE(wp, KIND_, MR_, h, nb, k, xq + t * k, xs + t * nb * 2, acc);                          \
        if (!pairs) {                                                                              \
            for (int i = 0; i < MR_; ++i)                                                          \
                STORE(acc[i], half, p * PANEL + 8 * h, bias, residual, t + i, res_stride, out, out_stride, out_bf16); \
            break;                                                                                 \
        }                                                                                          \
        for (int i = 0; i < MR_; ++i) gate[i] = swiglu_operand256(acc[i], bias, p * PANEL + 8 * h, out_bf16); \
        TILE(wp + pairs * nb * bstride, KIND_, MR_, h, nb, k, xq + t * k, xs + t * nb * 2, acc);   \
        for (int i = 0; i < MR_; ++i)                                                              \
            swiglu_store256(gate[i], swiglu_operand256(acc[i], bias, (p + pairs) * PANEL + 8 * h, out_bf16), \
                            p * PANEL + 8 * h, t + i, out, out_stride, out_bf16);                  \
        break;                                                                                     \
    }

/* rows == 1: each panel (and its up panel, pairs) by the one-pass kernel, then the tile's stores. */
#define GEMV256_ROW(NAME, TGT, GEMV, STORE, KIND_)                                                     \
    static TGT void NAME##_row_##KIND_(const uint8_t *w, int64_t n, int64_t nb, int64_t bstride, int64_t panels, \
                                       const int8_t *xq, const float *xs, const float *bias, const void *residual, \
                                       void *out, int out_bf16, int64_t pairs) {                         \
        _Pragma("omp parallel for schedule(static)") for (int64_t p = 0; p < panels; ++p) {              \
            const uint8_t *wp = w + p * nb * bstride;                                                    \
            __m256 acc[2], up[2];                                                                        \
            GEMV(wp, KIND_, nb, xq, xs, acc);                                                            \
            if (pairs) GEMV(wp + pairs * nb * bstride, KIND_, nb, xq, xs, up);                           \
            for (int h = 0; h < 2; ++h) {                                                                \
                int64_t left = n - p * PANEL - 8 * h, col = p * PANEL + 8 * h;                           \
                if (left <= 0) break;                                                                    \
                if (!pairs) {                                                                            \
                    STORE(acc[h], left < 8 ? (int)left : 8, col, bias, residual, 0, 0, out, 0, out_bf16); \
                    continue;                                                                            \
                }                                                                                        \
                swiglu_store256(swiglu_operand256(acc[h], bias, col, out_bf16),                          \
                                swiglu_operand256(up[h], bias, (p + pairs) * PANEL + 8 * h, out_bf16), col, 0, \
                                out, 0, out_bf16);                                                       \
            }                                                                                            \
        }                                                                                                \
    }

#define GEMM256(NAME, TGT, TILE, STORE, KIND_)                                                       \
    QL_INTERNAL TGT void NAME##_##KIND_(const uint8_t *w, int64_t n, int64_t k, const int8_t *xq, const float *xs, \
                                   int64_t rows, const float *bias, const void *residual, int64_t res_stride, \
                                   void *out, int64_t out_stride, int out_bf16, int64_t pairs) {    \
        int64_t nb = k / QB, bstride = block_bytes(KIND_), panels = pairs ? pairs : (n + PANEL - 1) / PANEL; \
        if (rows == 1 && QLINEAR_ROW_KERNEL) {                                                        \
            NAME##_row_##KIND_(w, n, nb, bstride, panels, xq, xs, bias, residual, out, out_bf16, pairs); \
            return;                                                                                  \
        }                                                                                            \
        _Pragma("omp parallel for schedule(static)") for (int64_t p = 0; p < panels; ++p) {          \
            const uint8_t *wp = w + p * nb * bstride;                                                \
            for (int h = 0; h < 2; ++h) {                                                            \
                int64_t left = n - p * PANEL - 8 * h;                                                \
                if (left <= 0) break;                                                                \
                int half = left < 8 ? (int)left : 8;                                                 \
                for (int64_t t = 0; t < rows; t += MR256) {                                          \
                    switch (rows - t < MR256 ? (int)(rows - t) : MR256) {                            \
                        TILE256_CASE(TILE, STORE, KIND_, 1)                                          \
                        TILE256_CASE(TILE, STORE, KIND_, 2)                                          \
                        TILE256_CASE(TILE, STORE, KIND_, 3)                                          \
                        TILE256_CASE(TILE, STORE, KIND_, 4)                                          \
                    }                                                                                \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }

GEMV256_ROW(gemm256, T256, gemv256, store256_T256_, KIND_Q4_0)
GEMV256_ROW(gemm256, T256, gemv256, store256_T256_, KIND_Q4_1)
GEMV256_ROW(gemm256, T256, gemv256, store256_T256_, KIND_Q8_0)
GEMV256_ROW(gemm256v, T256V, gemv256v, store256_T256V_, KIND_Q4_0)
GEMV256_ROW(gemm256v, T256V, gemv256v, store256_T256V_, KIND_Q4_1)
GEMV256_ROW(gemm256v, T256V, gemv256v, store256_T256V_, KIND_Q8_0)
GEMM256(gemm256, T256, tile256, store256_T256_, KIND_Q4_0)
GEMM256(gemm256, T256, tile256, store256_T256_, KIND_Q4_1)
GEMM256(gemm256, T256, tile256, store256_T256_, KIND_Q8_0)
GEMM256(gemm256v, T256V, tile256v, store256_T256V_, KIND_Q4_0)
GEMM256(gemm256v, T256V, tile256v, store256_T256V_, KIND_Q4_1)
GEMM256(gemm256v, T256V, tile256v, store256_T256V_, KIND_Q8_0)

#endif /* __x86_64__ */
