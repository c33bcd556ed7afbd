/* Linear layers on GGUF Q4_0 / Q4_1 / Q8_0 weights, without dequantizing them.
 *
 * out[t, n] = residual[t, n] + bias[n] + sum_k w[n, k] x[t, k], with w in the
 * 16-row panels of services/engine/model/quantized.py (see its docstring): per
 * panel and block of 32 columns, d[16] f16, m[16] f16 (Q4_1), then the quants,
 * 4 bytes of each of the 16 rows per 64-byte chunk. As llama.cpp does, x is
 * quantized to int8 per block of 32 (scale dx) and the dot products are integer:
 *
 *     block sum = d * dx * sum(u * qx) + m * dx * sum(qx)
 *
 * u unsigned (a nibble, or Q8_0's int8 flipped to u8 with m = -128 d; Q4_0's m is
 * -8 d). One 32-bit lane of a vector is one output row, so a VNNI dot product
 * (vpdpbusd: 4 u8 x s8 products summed into each lane) takes 4 columns of 16
 * rows against 4 activations broadcast, and one block costs 8 of them per
 * activation row, then one convert and two FMAs. Weights of a panel are loaded
 * once for up to MR activation rows.
 *
 * Paths, chosen at run time by the caller from the CPU's flags (function
 * target attributes: one library holds them all, whatever -march it is built
 * for): AVX-512 VNNI, AVX2 with AVX-VNNI, AVX2 (maddubs), portable C.
 * Built by services/engine/model/quant_kernels.py; no -ffast-math, so the
 * activation quantization matches the torch reference bit for bit.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { KIND_Q4_0 = 0, KIND_Q4_1 = 1, KIND_Q8_0 = 2 };
enum { PATH_PORTABLE = 0, PATH_AVX2 = 1, PATH_AVX2_VNNI = 2, PATH_AVX512_VNNI = 3 };
#define PANEL 16
#define QB 32

static inline int64_t block_bytes(int kind) { return kind == KIND_Q4_0 ? 288 : kind == KIND_Q4_1 ? 320 : 544; }
static inline int64_t quant_offset(int kind) { return kind == KIND_Q4_1 ? 64 : 32; }

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400)) {
            man <<= 1;
            --exp;
        }
        bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* q[t, k] = round(x[t, k] / dx), dx = max|x| / 127 per block; s[t, b] = {dx, dx * sum(q)}. */
static void quantize_rows(const void *x, int64_t x_stride, int x_bf16, int64_t rows, int64_t cols, int8_t *q,
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

/* The tail of one output row: acc (count lanes, columns col..) + bias + residual -> out. */
static inline void finish_row(const float *acc, int count, int64_t col, const float *bias, const void *residual,
                              int64_t row, int64_t res_stride, void *out, int64_t out_stride, int out_bf16) {
    for (int i = 0; i < count; ++i) {
        float v = acc[i] + (bias ? bias[col + i] : 0.f);
        if (residual)
            v += out_bf16 ? bf16_to_f32(((const uint16_t *)residual)[row * res_stride + col + i])
                          : ((const float *)residual)[row * res_stride + col + i];
        if (out_bf16)
            ((uint16_t *)out)[row * out_stride + col + i] = f32_to_bf16(v);
        else
            ((float *)out)[row * out_stride + col + i] = v;
    }
}

/* ---- portable C ---------------------------------------------------------- */

static void gemm_portable(const uint8_t *w, int kind, int64_t n, int64_t k, const int8_t *xq, const float *xs,
                          int64_t rows, const float *bias, const void *residual, int64_t res_stride, void *out,
                          int64_t out_stride, int out_bf16) {
    int64_t nb = k / QB, bstride = block_bytes(kind), qoff = quant_offset(kind), panels = (n + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; ++p) {
        const uint8_t *wp = w + p * nb * bstride;
        int count = n - p * PANEL < PANEL ? (int)(n - p * PANEL) : PANEL;
        for (int64_t t = 0; t < rows; ++t) {
            float acc[PANEL] = {0};
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
            finish_row(acc, count, p * PANEL, bias, residual, t, res_stride, out, out_stride, out_bf16);
        }
    }
}

#if defined(__x86_64__)

/* ---- AVX-512 VNNI ---------------------------------------------------------- */

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))
#define MR512 8

static inline int32_t load4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

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

static inline T512 void store512(__m512 v, int count, int64_t col, const float *bias, const void *residual,
                                 int64_t row, int64_t res_stride, void *out, int64_t out_stride, int out_bf16) {
    __mmask16 mask = count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + col));
    if (out_bf16) {
        if (residual) {
            __m256i r = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)residual + row * res_stride + col);
            v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(r), 16)));
        }
        __m512i u = _mm512_castps_si512(v); /* round to nearest even, as f32_to_bf16 */
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
        _mm256_mask_storeu_epi16((uint16_t *)out + row * out_stride + col, mask, _mm512_cvtepi32_epi16(u));
    } else {
        if (residual)
            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, (const float *)residual + row * res_stride + col));
        _mm512_mask_storeu_ps((float *)out + row * out_stride + col, mask, v);
    }
}

#define TILE512_CASE(KIND_, MR_)                                                                    \
    case MR_: {                                                                                    \
        __m512 acc[MR_];                                                                           \
        tile512(wp, KIND_, MR_, nb, k, xq + t * k, xs + t * nb * 2, acc);                          \
        for (int i = 0; i < MR_; ++i)                                                              \
            store512(acc[i], count, p * PANEL, bias, residual, t + i, res_stride, out, out_stride, out_bf16); \
        break;                                                                                     \
    }

#define GEMM512(KIND_)                                                                               \
    static T512 void gemm512_##KIND_(const uint8_t *w, int64_t n, int64_t k, const int8_t *xq, const float *xs, \
                                     int64_t rows, const float *bias, const void *residual, int64_t res_stride, \
                                     void *out, int64_t out_stride, int out_bf16) {                 \
        int64_t nb = k / QB, bstride = block_bytes(KIND_), panels = (n + PANEL - 1) / PANEL;         \
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

/* ---- AVX2 (+ AVX-VNNI) ------------------------------------------------------
 * A panel as two halves of 8 rows (lanes): bytes 32h.. of each 64-byte chunk,
 * scales 8h... Without VNNI, Q4 products (u4 x s8, pairs at most 2 * 15 * 127)
 * add up in 16 bits over a whole block (8 x 3810 < 32767) before one widening;
 * Q8_0 uses |w| x sign(x, w) (pairs at most 2 * 128 * 127) widened each time. */

#define T256 __attribute__((target("avx2,fma,f16c")))
#define T256V __attribute__((target("avx2,fma,f16c,avxvnni")))
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

#define TILE256_CASE(TILE, STORE, KIND_, MR_)                                                      \
    case MR_: {                                                                                    \
        __m256 acc[MR_];                                                                           \
        TILE(wp, KIND_, MR_, h, nb, k, xq + t * k, xs + t * nb * 2, acc);                          \
        for (int i = 0; i < MR_; ++i)                                                              \
            STORE(acc[i], half, p * PANEL + 8 * h, bias, residual, t + i, res_stride, out, out_stride, out_bf16); \
        break;                                                                                     \
    }

#define GEMM256(NAME, TGT, TILE, STORE, KIND_)                                                       \
    static TGT void NAME##_##KIND_(const uint8_t *w, int64_t n, int64_t k, const int8_t *xq, const float *xs, \
                                   int64_t rows, const float *bias, const void *residual, int64_t res_stride, \
                                   void *out, int64_t out_stride, int out_bf16) {                   \
        int64_t nb = k / QB, bstride = block_bytes(KIND_), panels = (n + PANEL - 1) / PANEL;         \
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

typedef void (*gemm_fn)(const uint8_t *, int64_t, int64_t, const int8_t *, const float *, int64_t, const float *,
                        const void *, int64_t, void *, int64_t, int);

/* Which paths this CPU runs (bit i: path i), from cpuid as the compiler's runtime reports it. */
int qlinear_paths(void) {
    static int known = -1; /* cpuid does not change: asked once (a benign race: every writer writes the same) */
    if (known >= 0) return known;
    int paths = 1 << PATH_PORTABLE;
#if defined(__x86_64__)
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2) paths |= 1 << PATH_AVX2;
    if (avx2 && __builtin_cpu_supports("avxvnni")) paths |= 1 << PATH_AVX2_VNNI;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        paths |= 1 << PATH_AVX512_VNNI;
#endif
    known = paths;
    return paths;
}

/* out = residual + bias + x @ w.T. x: [rows, k] float32 or bf16 (row stride x_stride);
 * w: n x k in panels of kind; bias: float32 [n] or NULL; residual, out: [rows, n]
 * in out's dtype (residual may be NULL or equal out). xq: int8 [rows, k] and
 * xs: float32 [rows, k / 32, 2] scratch. Returns 0, or -1 for a bad argument,
 * -2 for a path this CPU cannot run. */
int qlinear(int path, const void *x, int64_t x_stride, int x_bf16, int64_t rows, int64_t k, const uint8_t *w,
            int64_t n, int kind, const float *bias, const void *residual, int64_t res_stride, void *out,
            int64_t out_stride, int out_bf16, int8_t *xq, float *xs) {
    if (k % QB || kind < 0 || kind > 2 || path < 0 || path > 3 || rows < 0) return -1;
    if (!(qlinear_paths() & (1 << path))) return -2;
    quantize_rows(x, x_stride, x_bf16, rows, k, xq, xs);
    gemm_fn fn = 0;
#if defined(__x86_64__)
    static const gemm_fn avx512[3] = {gemm512_KIND_Q4_0, gemm512_KIND_Q4_1, gemm512_KIND_Q8_0};
    static const gemm_fn avx2[3] = {gemm256_KIND_Q4_0, gemm256_KIND_Q4_1, gemm256_KIND_Q8_0};
    static const gemm_fn avx2v[3] = {gemm256v_KIND_Q4_0, gemm256v_KIND_Q4_1, gemm256v_KIND_Q8_0};
    if (path == PATH_AVX512_VNNI) fn = avx512[kind];
    if (path == PATH_AVX2) fn = avx2[kind];
    if (path == PATH_AVX2_VNNI) fn = avx2v[kind];
#endif
    if (fn)
        fn(w, n, k, xq, xs, rows, bias, residual, res_stride, out, out_stride, out_bf16);
    else
        gemm_portable(w, kind, n, k, xq, xs, rows, bias, residual, res_stride, out, out_stride, out_bf16);
    return 0;
}
