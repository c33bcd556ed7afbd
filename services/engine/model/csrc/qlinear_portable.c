/* GGUF linears (qlinear.h): the portable C kernels and the activation
 * quantization every path below AVX-512 uses, then the AVX2 (+ AVX-VNNI) kernels. */
#include "qlinear.h"

/* q[t, k] = round(x[t, k] / dx), dx = max|x| / 127 per block; s[t, b] = {dx, dx * sum(q)}. */
QL_INTERNAL void quantize_rows(const void *x, int64_t x_stride, int x_bf16, int64_t rows, int64_t cols, int8_t *q,
                          float *s) {
    int64_t nb = cols / QB;
#pragma omp parallel for schedule(static) if (rows * cols >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t b = 0; b < nb; ++b) {
            float v[QB], amax = 0.f;
            for (int k = 0; k < QB; ++k) {
                int64_t at = r * x_stride + b * QB + k;
                v[k] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[at]) : ((const float *)x)[at];
                float a = fabsf(v[k]);
                amax = a > amax ? a : amax;
            }
            float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
            int sum = 0;
            for (int k = 0; k < QB; ++k) {
                float scaled = v[k] * id;
                int qi = (int)nearbyintf(scaled);
                qi = qi > 127 ? 127 : qi < -127 ? -127 : qi;
                q[r * cols + b * QB + k] = (int8_t)qi;
                sum += qi;
            }
            s[(r * nb + b) * 2] = d;
            s[(r * nb + b) * 2 + 1] = d * (float)sum;
        }
    }
}

/* ---- portable C ---------------------------------------------------------- */

/* Row t's sums over the panel at wp (count rows live): int8 activations. Not inlined: one body
 * for the plain and the SwiGLU loops, so that both sum with the same FMA contractions (inlined
 * twice, they were vectorized differently and differed where the sums cancel). */
static __attribute__((noinline)) void panel_row_portable(const uint8_t *wp, int kind, int count, int64_t nb, int64_t k, const int8_t *xq,
                                      const float *xs, int64_t t, float *acc) {
    int64_t bstride = block_bytes(kind), qoff = quant_offset(kind);
    for (int r = 0; r < PANEL; ++r) acc[r] = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = wp + b * bstride, *qs = blk + qoff;
        const int8_t *xb = xq + t * k + b * QB;
        float dx = xs[(t * nb + b) * 2], sx = xs[(t * nb + b) * 2 + 1];
        for (int r = 0; r < count; ++r) {
            uint16_t dh, mh = 0;
            memcpy(&dh, blk + 2 * r, 2);
            float d = f16_to_f32(dh), m;
            int32_t isum = 0;
            if (kind == KIND_Q8_0) {
                m = 0.f; /* signed weights: no offset */
                for (int c = 0; c < QB; ++c) isum += (int8_t)qs[64 * (c / 4) + 4 * r + c % 4] * xb[c];
            } else {
                if (kind == KIND_Q4_1) memcpy(&mh, blk + 32 + 2 * r, 2);
                m = kind == KIND_Q4_1 ? f16_to_f32(mh) : -8.f * d;
                for (int c = 0; c < 16; ++c) {
                    uint8_t byte = qs[64 * (c / 4) + 4 * r + c % 4];
                    isum += (byte & 0x0F) * xb[c] + (byte >> 4) * xb[c + 16];
                }
            }
            acc[r] += (float)isum * (d * dx) + m * sx;
        }
    }
}

/* Row t's sums over the panel at wp (count rows live): float activations (row stride x_stride);
 * not inlined, as panel_row_portable. */
static __attribute__((noinline)) void fpanel_row_portable(const uint8_t *wp, int kind, int count, int64_t nb, const float *xf,
                                       int64_t x_stride, int64_t t, float *acc) {
    int64_t bstride = block_bytes(kind), qoff = quant_offset(kind);
    for (int r = 0; r < PANEL; ++r) acc[r] = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = wp + b * bstride, *qs = blk + qoff;
        const float *xb = xf + t * x_stride + b * QB;
        for (int r = 0; r < count; ++r) {
            uint16_t dh, mh = 0;
            memcpy(&dh, blk + 2 * r, 2);
            float d = f16_to_f32(dh);
            if (kind == KIND_Q8_0) {
                for (int c = 0; c < QB; ++c) acc[r] += d * (float)(int8_t)qs[64 * (c / 4) + 4 * r + c % 4] * xb[c];
            } else {
                if (kind == KIND_Q4_1) memcpy(&mh, blk + 32 + 2 * r, 2);
                float m = kind == KIND_Q4_1 ? f16_to_f32(mh) : -8.f * d;
                for (int c = 0; c < 16; ++c) {
                    uint8_t byte = qs[64 * (c / 4) + 4 * r + c % 4];
                    acc[r] += (d * (float)(byte & 0x0F) + m) * xb[c];
                    acc[r] += (d * (float)(byte >> 4) + m) * xb[c + 16];
                }
            }
        }
    }
}

/* Gate panel p's and up panel p + pairs's sums of row t (whole panels) as SwiGLU column block p. */
static inline void swiglu_row_portable(const float *gate_acc, const float *up_acc, int64_t p, int64_t pairs,
                                       const float *bias, int64_t t, void *out, int64_t out_stride, int out_bf16) {
    float g[PANEL], u[PANEL];
    for (int r = 0; r < PANEL; ++r) {
        g[r] = swiglu_operand(gate_acc[r], bias, p * PANEL + r, out_bf16);
        u[r] = swiglu_operand(up_acc[r], bias, (p + pairs) * PANEL + r, out_bf16);
    }
    swiglu_finish_row(g, u, PANEL, p * PANEL, t, out, out_stride, out_bf16);
}

QL_INTERNAL void gemm_portable(const uint8_t *w, int kind, int64_t n, int64_t k, const int8_t *xq, const float *xs,
                               int64_t rows, const float *bias, const void *residual, int64_t res_stride, void *out,
                               int64_t out_stride, int out_bf16, int64_t pairs) {
    int64_t nb = k / QB, bstride = block_bytes(kind), panels = pairs ? pairs : (n + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; ++p) {
        const uint8_t *wp = w + p * nb * bstride;
        int count = n - p * PANEL < PANEL ? (int)(n - p * PANEL) : PANEL;
        for (int64_t t = 0; t < rows; ++t) {
            float acc[PANEL], up[PANEL];
            panel_row_portable(wp, kind, count, nb, k, xq, xs, t, acc);
            if (!pairs) {
                finish_row(acc, count, p * PANEL, bias, residual, t, res_stride, out, out_stride, out_bf16);
                continue;
            }
            panel_row_portable(wp + pairs * nb * bstride, kind, PANEL, nb, k, xq, xs, t, up);
            swiglu_row_portable(acc, up, p, pairs, bias, t, out, out_stride, out_bf16);
        }
    }
}

/* bf16 x widened to float32 [rows, k] (exactly) for the float-activation kernels. */
QL_INTERNAL void widen_bf16(const uint16_t *x, int64_t x_stride, int64_t rows, int64_t k, float *xf) {
#pragma omp parallel for schedule(static) if (rows * k >= 65536)
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < k; ++c) xf[r * k + c] = bf16_to_f32(x[r * x_stride + c]);
}

QL_INTERNAL void fgemm_portable(const uint8_t *w, int kind, int64_t n, int64_t k, const float *xf, int64_t x_stride,
                                int64_t rows, const float *bias, const void *residual, int64_t res_stride, void *out,
                                int64_t out_stride, int out_bf16, int64_t pairs) {
    int64_t nb = k / QB, bstride = block_bytes(kind), panels = pairs ? pairs : (n + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; ++p) {
        const uint8_t *wp = w + p * nb * bstride;
        int count = n - p * PANEL < PANEL ? (int)(n - p * PANEL) : PANEL;
        for (int64_t t = 0; t < rows; ++t) {
            float acc[PANEL], up[PANEL];
            fpanel_row_portable(wp, kind, count, nb, xf, x_stride, t, acc);
            if (!pairs) {
                finish_row(acc, count, p * PANEL, bias, residual, t, res_stride, out, out_stride, out_bf16);
                continue;
            }
            fpanel_row_portable(wp + pairs * nb * bstride, kind, PANEL, nb, xf, x_stride, t, up);
            swiglu_row_portable(acc, up, p, pairs, bias, t, out, out_stride, out_bf16);
        }
    }
}

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
        __m256i s[MR];                                                                             \
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

#define GEMM256(NAME, TGT, TILE, STORE, KIND_)                                                       \
    QL_INTERNAL TGT void NAME##_##KIND_(const uint8_t *w, int64_t n, int64_t k, const int8_t *xq, const float *xs, \
                                   int64_t rows, const float *bias, const void *residual, int64_t res_stride, \
                                   void *out, int64_t out_stride, int out_bf16, int64_t pairs) {    \
        int64_t nb = k / QB, bstride = block_bytes(KIND_), panels = pairs ? pairs : (n + PANEL - 1) / PANEL; \
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

GEMM256(gemm256, T256, tile256, store256_T256_, KIND_Q4_0)
GEMM256(gemm256, T256, tile256, store256_T256_, KIND_Q4_1)
GEMM256(gemm256, T256, tile256, store256_T256_, KIND_Q8_0)
GEMM256(gemm256v, T256V, tile256v, store256_T256V_, KIND_Q4_0)
GEMM256(gemm256v, T256V, tile256v, store256_T256V_, KIND_Q4_1)
GEMM256(gemm256v, T256V, tile256v, store256_T256V_, KIND_Q8_0)

#endif /* __x86_64__ */
