/* GGUF linears (qlinear.h): AVX-512 VNNI, int8 activations and float ones. */
#include "qlinear.h"

#if defined(__x86_64__)

/* ---- AVX-512 VNNI ---------------------------------------------------------- */

#define MR512 8

/* MR activation rows x one 16-row panel; KIND and MR are constants after inlining. */
static inline __attribute__((always_inline)) T512 void tile512(const uint8_t *wp, const int KIND, const int MR,
                                                               int64_t nb, int64_t k, const int8_t *xq,
                                                               const float *xs, __m512 *acc) {
    const int64_t bstride = block_bytes(KIND), qoff = quant_offset(KIND);
    const __m512i low4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80);
    for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = wp + b * bstride, *qs = blk + qoff;
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        __m512 m = KIND == KIND_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)))
                                     : _mm512_mul_ps(d, _mm512_set1_ps(KIND == KIND_Q4_0 ? -8.f : -128.f));
        __m512i s0[MR], s1[MR]; /* two chains per row: vpdpbusd's latency */
        for (int i = 0; i < MR; ++i) s0[i] = s1[i] = _mm512_setzero_si512();
        const int8_t *xb = xq + b * QB;
        if (KIND == KIND_Q8_0) {
            for (int g = 0; g < 8; g += 2) {
                __m512i v0 = _mm512_xor_si512(_mm512_loadu_si512(qs + 64 * g), flip);
                __m512i v1 = _mm512_xor_si512(_mm512_loadu_si512(qs + 64 * (g + 1)), flip);
                for (int i = 0; i < MR; ++i) {
                    s0[i] = _mm512_dpbusd_epi32(s0[i], v0, _mm512_set1_epi32(load4(xb + i * k + 4 * g)));
                    s1[i] = _mm512_dpbusd_epi32(s1[i], v1, _mm512_set1_epi32(load4(xb + i * k + 4 * g + 4)));
                }
            }
        } else {
            for (int c = 0; c < 4; ++c) {
                __m512i v = _mm512_loadu_si512(qs + 64 * c);
                __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                for (int i = 0; i < MR; ++i) {
                    s0[i] = _mm512_dpbusd_epi32(s0[i], lo, _mm512_set1_epi32(load4(xb + i * k + 4 * c)));
                    s1[i] = _mm512_dpbusd_epi32(s1[i], hi, _mm512_set1_epi32(load4(xb + i * k + 16 + 4 * c)));
                }
            }
        }
        for (int i = 0; i < MR; ++i) {
            const float *sc = xs + (i * nb + b) * 2;
            __m512 isum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0[i], s1[i]));
            acc[i] = _mm512_fmadd_ps(isum, _mm512_mul_ps(d, _mm512_set1_ps(sc[0])), acc[i]);
            acc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(sc[1]), acc[i]);
        }
    }
}

/* quantize_rows, 16 lanes at a time: the same float operations per element, so the same int8. */
QL_INTERNAL T512 void quantize_rows512(const void *x, int64_t x_stride, int x_bf16, int64_t rows, int64_t cols, int8_t *q,
                                  float *s) {
    int64_t nb = cols / QB;
#pragma omp parallel for schedule(static) if (rows * cols >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t b = 0; b < nb; ++b) {
            __m512 v[2];
            for (int h = 0; h < 2; ++h) {
                int64_t at = r * x_stride + b * QB + 16 * h;
                v[h] = x_bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + at))), 16))
                              : _mm512_loadu_ps((const float *)x + at);
            }
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
            float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
            __m512i sum = _mm512_setzero_si512();
            for (int h = 0; h < 2; ++h) {
                __m512i qi = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v[h], _mm512_set1_ps(id)),
                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                qi = _mm512_max_epi32(_mm512_min_epi32(qi, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
                _mm_storeu_si128((__m128i *)(q + r * cols + b * QB + 16 * h), _mm512_cvtepi32_epi8(qi));
                sum = _mm512_add_epi32(sum, qi);
            }
            s[(r * nb + b) * 2] = d;
            s[(r * nb + b) * 2 + 1] = d * (float)_mm512_reduce_add_epi32(sum);
        }
    }
}

/* ---- float activations: weights dequantized in registers -------------------
 * No activation quantization: each column's 16 weights (one byte of every lane
 * of a chunk) are widened to float and dequantized (d * u + m, exact in float32)
 * once, then FMAed with the column's activation for MR rows. x arrives as float32
 * (bf16 widened by widen_bf16, exactly). */

#define FMR512 8

static inline __attribute__((always_inline)) T512 void ftile512(const uint8_t *wp, const int KIND, const int MR,
                                                                int64_t nb, int64_t x_stride, const float *xf,
                                                                __m512 *acc) {
    const int64_t bstride = block_bytes(KIND), qoff = quant_offset(KIND);
    const __m512i low4 = _mm512_set1_epi32(0x0F);
    __m512 s0[MR], s1[MR]; /* two chains per row: FMA latency */
    for (int i = 0; i < MR; ++i) s0[i] = s1[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = wp + b * bstride, *qs = blk + qoff;
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        __m512 m = KIND == KIND_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)))
                                     : _mm512_mul_ps(d, _mm512_set1_ps(-8.f));
        const float *xb = xf + b * QB;
        if (KIND == KIND_Q8_0) {
            for (int g = 0; g < 8; ++g) {
                __m512i v = _mm512_loadu_si512(qs + 64 * g);
                for (int j = 0; j < 4; j += 2) {
                    __m512 w0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * j), 24)));
                    __m512 w1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16 - 8 * j), 24)));
                    for (int i = 0; i < MR; ++i) {
                        s0[i] = _mm512_fmadd_ps(w0, _mm512_set1_ps(xb[i * x_stride + 4 * g + j]), s0[i]);
                        s1[i] = _mm512_fmadd_ps(w1, _mm512_set1_ps(xb[i * x_stride + 4 * g + j + 1]), s1[i]);
                    }
                }
            }
        } else {
            for (int c = 0; c < 4; ++c) {
                __m512i v = _mm512_loadu_si512(qs + 64 * c);
                for (int j = 0; j < 4; ++j) {
                    __m512 lo = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * j), low4)), m);
                    __m512 hi = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * j + 4), low4)), m);
                    for (int i = 0; i < MR; ++i) {
                        s0[i] = _mm512_fmadd_ps(lo, _mm512_set1_ps(xb[i * x_stride + 4 * c + j]), s0[i]);
                        s1[i] = _mm512_fmadd_ps(hi, _mm512_set1_ps(xb[i * x_stride + 16 + 4 * c + j]), s1[i]);
                    }
                }
            }
        }
    }
    for (int i = 0; i < MR; ++i) acc[i] = _mm512_add_ps(s0[i], s1[i]);
}

/* MR rows of panel p: the plain store, or (pairs) gate panel p with up panel p + pairs into
 * SwiGLU column block p, the gate's sums held while the up panel's are computed. */
#define SWIGLU512_CASE(TILE_CALL, KIND_, MR_)                                                            \
    case MR_: {                                                                                    \
        __m512 acc[MR_], gate[MR_];                                                                \
        TILE_CALL(wp, KIND_, MR_, acc);                                                             \
        if (!pairs) {                                                                              \
            for (int i = 0; i < MR_; ++i)                                                          \
                store512(acc[i], count, p * PANEL, bias, residual, t + i, res_stride, out, out_stride, out_bf16); \
            break;                                                                                 \
        }                                                                                          \
        for (int i = 0; i < MR_; ++i) gate[i] = swiglu_operand512(acc[i], bias, p * PANEL, out_bf16); \
        TILE_CALL(wp + pairs * nb * bstride, KIND_, MR_, acc);                                     \
        for (int i = 0; i < MR_; ++i)                                                              \
            swiglu_store512(gate[i], swiglu_operand512(acc[i], bias, (p + pairs) * PANEL, out_bf16), p * PANEL, \
                            t + i, out, out_stride, out_bf16);                                     \
        break;                                                                                     \
    }

#define FTILE512_CALL(WP, KIND_, MR_, ACC) ftile512(WP, KIND_, MR_, nb, x_stride, xf + t * x_stride, ACC)
#define FTILE512_CASE(KIND_, MR_) SWIGLU512_CASE(FTILE512_CALL, KIND_, MR_)

#define FGEMM512(KIND_)                                                                              \
    QL_INTERNAL T512 void fgemm512_##KIND_(const uint8_t *w, int64_t n, int64_t k, const float *xf, int64_t x_stride, \
                                      int64_t rows, const float *bias, const void *residual, int64_t res_stride, \
                                      void *out, int64_t out_stride, int out_bf16, int64_t pairs) { \
        int64_t nb = k / QB, bstride = block_bytes(KIND_), panels = pairs ? pairs : (n + PANEL - 1) / PANEL; \
        _Pragma("omp parallel for schedule(static)") for (int64_t p = 0; p < panels; ++p) {          \
            const uint8_t *wp = w + p * nb * bstride;                                                \
            int count = n - p * PANEL < PANEL ? (int)(n - p * PANEL) : PANEL;                        \
            for (int64_t t = 0; t < rows; t += FMR512) {                                             \
                switch (rows - t < FMR512 ? (int)(rows - t) : FMR512) {                              \
                    FTILE512_CASE(KIND_, 1)                                                          \
                    FTILE512_CASE(KIND_, 2)                                                          \
                    FTILE512_CASE(KIND_, 3)                                                          \
                    FTILE512_CASE(KIND_, 4)                                                          \
                    FTILE512_CASE(KIND_, 5)                                                          \
                    FTILE512_CASE(KIND_, 6)                                                          \
                    FTILE512_CASE(KIND_, 7)                                                          \
                    FTILE512_CASE(KIND_, 8)                                                          \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }

FGEMM512(KIND_Q4_0)
FGEMM512(KIND_Q4_1)
FGEMM512(KIND_Q8_0)

#define TILE512_CALL(WP, KIND_, MR_, ACC) tile512(WP, KIND_, MR_, nb, k, xq + t * k, xs + t * nb * 2, ACC)
#define TILE512_CASE(KIND_, MR_) SWIGLU512_CASE(TILE512_CALL, KIND_, MR_)

#define GEMM512(KIND_)                                                                               \
    QL_INTERNAL T512 void gemm512_##KIND_(const uint8_t *w, int64_t n, int64_t k, const int8_t *xq, const float *xs, \
                                     int64_t rows, const float *bias, const void *residual, int64_t res_stride, \
                                     void *out, int64_t out_stride, int out_bf16, int64_t pairs) {  \
        int64_t nb = k / QB, bstride = block_bytes(KIND_), panels = pairs ? pairs : (n + PANEL - 1) / PANEL; \
        _Pragma("omp parallel for schedule(static)") for (int64_t p = 0; p < panels; ++p) {          \
            const uint8_t *wp = w + p * nb * bstride;                                                \
            int count = n - p * PANEL < PANEL ? (int)(n - p * PANEL) : PANEL;                        \
            for (int64_t t = 0; t < rows; t += MR512) {                                              \
                switch (rows - t < MR512 ? (int)(rows - t) : MR512) {                                \
                    TILE512_CASE(KIND_, 1)                                                           \
                    TILE512_CASE(KIND_, 2)                                                           \
                    TILE512_CASE(KIND_, 3)                                                           \
                    TILE512_CASE(KIND_, 4)                                                           \
                    TILE512_CASE(KIND_, 5)                                                           \
                    TILE512_CASE(KIND_, 6)                                                           \
                    TILE512_CASE(KIND_, 7)                                                           \
                    TILE512_CASE(KIND_, 8)                                                           \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }

GEMM512(KIND_Q4_0)
GEMM512(KIND_Q4_1)
GEMM512(KIND_Q8_0)

#endif /* __x86_64__ */
