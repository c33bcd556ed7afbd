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
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

enum { KIND_Q4_0 = 0, KIND_Q4_1 = 1, KIND_Q8_0 = 2 };
enum { PATH_PORTABLE = 0, PATH_AVX2 = 1, PATH_AVX2_VNNI = 2, PATH_AVX512_VNNI = 3, PATH_AMX_INT8 = 4 };
#define NPATHS 5
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

/* bf16 x widened to float32 [rows, k] (exactly) for the float-activation kernels. */
static void widen_bf16(const uint16_t *x, int64_t x_stride, int64_t rows, int64_t k, float *xf) {
#pragma omp parallel for schedule(static) if (rows * k >= 65536)
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < k; ++c) xf[r * k + c] = bf16_to_f32(x[r * x_stride + c]);
}

static void fgemm_portable(const uint8_t *w, int kind, int64_t n, int64_t k, const float *xf, int64_t x_stride,
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
                const float *xb = xf + t * x_stride + b * QB;
                for (int r = 0; r < count; ++r) {
                    uint16_t dh, mh = 0;
                    memcpy(&dh, blk + 2 * r, 2);
                    float d = f16_to_f32(dh);
                    if (kind == KIND_Q8_0) {
                        for (int c = 0; c < QB; ++c)
                            acc[r] += d * (float)(int8_t)qs[64 * (c / 4) + 4 * r + c % 4] * xb[c];
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

/* quantize_rows, 16 lanes at a time: the same float operations per element, so the same int8. */
static T512 void quantize_rows512(const void *x, int64_t x_stride, int x_bf16, int64_t rows, int64_t cols, int8_t *q,
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

#define FTILE512_CASE(KIND_, MR_)                                                                   \
    case MR_: {                                                                                    \
        __m512 acc[MR_];                                                                           \
        ftile512(wp, KIND_, MR_, nb, x_stride, xf + t * x_stride, acc);                           \
        for (int i = 0; i < MR_; ++i)                                                              \
            store512(acc[i], count, p * PANEL, bias, residual, t + i, res_stride, out, out_stride, out_bf16); \
        break;                                                                                     \
    }

#define FGEMM512(KIND_)                                                                              \
    static T512 void fgemm512_##KIND_(const uint8_t *w, int64_t n, int64_t k, const float *xf, int64_t x_stride, \
                                      int64_t rows, const float *bias, const void *residual, int64_t res_stride, \
                                      void *out, int64_t out_stride, int out_bf16) {                \
        int64_t nb = k / QB, bstride = block_bytes(KIND_), panels = (n + PANEL - 1) / PANEL;         \
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

/* ---- AMX int8 ----------------------------------------------------------------
 * One TDPBxxD per 16 activation rows, panel and block: A = the 16 rows' 32 int8
 * activations of the block (row stride k), B = the panel's block as 8 rows of 64
 * bytes, row j holding 4 bytes of each of the 16 weight rows (columns 4j..4j+3).
 * That is the panel layout itself for Q8_0's chunks; Q4 nibbles are unpacked
 * once per panel (low nibbles of chunks 0-3, then the high ones: columns 0-15,
 * 16-31). C[t][n] is then token t's integer block sum for output row n, one zmm
 * per token with the lanes of the VNNI path, so the per-block epilogue is the
 * same. A block's scales differ per row and token, so sums cannot run on in the
 * tile across blocks: each block's C is stored and scaled into float sums.
 * That epilogue is the cost, so the tiles must never wait for it nor it for them:
 * up to 4 C tiles (64 activation rows) per block, stored to one of two buffers
 * while the previous block's are scaled (float sums in memory, 64 x 16).
 * Activations are signed: TDPBSUD (s8 x u8) for Q4_1, TDPBSSD for Q8_0 as
 * stored and for Q4_0 unpacked to u - 8, which leaves those two no minimum term.
 * Rows are padded to 16 by the caller (zero activations, zero scales). */

#define TAMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c,amx-tile,amx-int8")))
#define AMX_ROWS 16
#define AMX_TILES 4

typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) tile_config;

/* tmm0-3: C (16 x 16 int32), tmm4-5: A (16 rows x 32 bytes), tmm6-7: B (8 rows x 64 bytes). */
static inline TAMX void amx_configure(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; ++i) {
        cfg.rows[i] = i >= 6 ? 8 : 16;
        cfg.colsb[i] = i == 4 || i == 5 ? 32 : 64;
    }
    _tile_loadconfig(&cfg);
}

/* A panel's Q4 nibbles as TDP B operands: per block 8 rows of 64 bytes (see above). */
static inline TAMX void amx_unpack_q4(const uint8_t *wp, int kind, int64_t nb, uint8_t *buf) {
    const int64_t bstride = block_bytes(kind), qoff = quant_offset(kind);
    const __m512i low4 = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(kind == KIND_Q4_0 ? 8 : 0);
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *qs = wp + b * bstride + qoff;
        for (int c = 0; c < 4; ++c) {
            __m512i v = _mm512_loadu_si512(qs + 64 * c);
            __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            _mm512_store_si512(buf + b * 512 + 64 * c, _mm512_sub_epi8(lo, eight));
            _mm512_store_si512(buf + b * 512 + 256 + 64 * c, _mm512_sub_epi8(hi, eight));
        }
    }
}

/* C tile CT of block b for activation rows xt + 16 g (A tile AT, B tile BT): zeroed and multiplied. */
#define AMX_DP(CT, AT, BT, g)                                                                       \
    do {                                                                                           \
        _tile_zero(CT);                                                                            \
        _tile_loadd(AT, xt + (g) * AMX_ROWS * k + b * QB, k);                                      \
        if (KIND == KIND_Q4_1)                                                                     \
            _tile_dpbsud(CT, AT, BT);                                                              \
        else                                                                                       \
            _tile_dpbssd(CT, AT, BT);                                                              \
    } while (0)

/* Block b's products for `tiles` groups of 16 rows into cb[0..tiles) (B tile BT). */
#define AMX_ISSUE(BT)                                                                               \
    do {                                                                                           \
        _tile_loadd(BT, KIND == KIND_Q8_0 ? wp + b * bstride + qoff : buf + b * 512, 64);          \
        AMX_DP(0, 4, BT, 0);                                                                       \
        if (tiles > 1) AMX_DP(1, 5, BT, 1);                                                        \
        if (tiles > 2) AMX_DP(2, 4, BT, 2);                                                        \
        if (tiles > 3) AMX_DP(3, 5, BT, 3);                                                        \
        _tile_stored(0, cb[0], 64);                                                                \
        if (tiles > 1) _tile_stored(1, cb[1], 64);                                                 \
        if (tiles > 2) _tile_stored(2, cb[2], 64);                                                 \
        if (tiles > 3) _tile_stored(3, cb[3], 64);                                                 \
    } while (0)

static inline __attribute__((always_inline)) TAMX void amx_issue(const int KIND, const int8_t *xt, int64_t k,
                                                                 const uint8_t *wp, const uint8_t *buf, int64_t b,
                                                                 int tiles, int32_t (*cb)[256]) {
    const int64_t bstride = block_bytes(KIND), qoff = quant_offset(KIND);
    if (b & 1)
        AMX_ISSUE(7);
    else
        AMX_ISSUE(6);
}

/* sums[r] += C[r] * d * dx[r] (+ m * dx[r] * sum(qx[r]) for Q4_1) over the 16 rows of tile g. */
static inline __attribute__((always_inline)) TAMX void amx_epilogue(const int KIND, const int32_t *c, __m512 d,
                                                                    __m512 m, const float *xs, int64_t b, int64_t nb,
                                                                    int g, float *sums) {
    for (int i = 0; i < AMX_ROWS; ++i) {
        int r = g * AMX_ROWS + i;
        const float *sc = xs + (r * nb + b) * 2;
        __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(c + 16 * i));
        __m512 acc = _mm512_fmadd_ps(v, _mm512_mul_ps(d, _mm512_set1_ps(sc[0])), _mm512_load_ps(sums + 16 * r));
        if (KIND == KIND_Q4_1) acc = _mm512_fmadd_ps(m, _mm512_set1_ps(sc[1]), acc);
        _mm512_store_ps(sums + 16 * r, acc);
    }
}

/* Block b's epilogue interleaved with block b + 1's tiles (B tile BT): each tile's
 * store is issued one 16-row epilogue later than its product, so that neither the
 * tile unit nor the vector units wait on the other (a store right after its
 * TDP, or a whole block's epilogue between them, stalls the core). */
#define AMX_STEP(BT)                                                                                \
    do {                                                                                           \
        _tile_loadd(BT, KIND == KIND_Q8_0 ? wp + b * bstride + qoff : buf + b * 512, 64);          \
        AMX_DP(0, 4, BT, 0);                                                                       \
        if (tiles > 1) AMX_DP(1, 5, BT, 1);                                                        \
        amx_epilogue(KIND, prev[0], d, m, xs, b - 1, nb, 0, sums);                                 \
        _tile_stored(0, cb[0], 64);                                                                \
        if (tiles > 2) AMX_DP(2, 4, BT, 2);                                                        \
        if (tiles > 1) amx_epilogue(KIND, prev[1], d, m, xs, b - 1, nb, 1, sums);                  \
        if (tiles > 1) _tile_stored(1, cb[1], 64);                                                 \
        if (tiles > 3) AMX_DP(3, 5, BT, 3);                                                        \
        if (tiles > 2) amx_epilogue(KIND, prev[2], d, m, xs, b - 1, nb, 2, sums);                  \
        if (tiles > 2) _tile_stored(2, cb[2], 64);                                                 \
        if (tiles > 3) amx_epilogue(KIND, prev[3], d, m, xs, b - 1, nb, 3, sums);                  \
        if (tiles > 3) _tile_stored(3, cb[3], 64);                                                 \
    } while (0)

/* Block b's tiles into cb, and block b - 1's epilogue from prev (scales at blk_prev). */
static inline __attribute__((always_inline)) TAMX void amx_step(const int KIND, const int8_t *xt, int64_t k,
                                                                const uint8_t *wp, const uint8_t *buf, int64_t b,
                                                                int64_t nb, int tiles, int32_t (*cb)[256],
                                                                int32_t (*prev)[256], const float *xs,
                                                                float *sums) {
    const int64_t bstride = block_bytes(KIND), qoff = quant_offset(KIND);
    const uint8_t *blk = wp + (b - 1) * bstride;
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
    __m512 m = KIND == KIND_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)))
                                 : _mm512_setzero_ps();
    if (b & 1)
        AMX_STEP(7);
    else
        AMX_STEP(6);
}

/* The last block's epilogue, with no tiles to overlap. */
static inline __attribute__((always_inline)) TAMX void amx_last(const int KIND, const uint8_t *blk,
                                                                int32_t (*prev)[256], const float *xs, int64_t b,
                                                                int64_t nb, int tiles, float *sums) {
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
    __m512 m = KIND == KIND_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)))
                                 : _mm512_setzero_ps();
    for (int g = 0; g < tiles; ++g) amx_epilogue(KIND, prev[g], d, m, xs, b, nb, g, sums);
}

/* One thread's share of the panels, inside the caller's parallel region; inlined
 * there so that KIND is a constant in the outlined region (one per kind). */
static inline __attribute__((always_inline)) TAMX void amx_worker(const uint8_t *w, const int KIND, int64_t n,
                                                                  int64_t k, const int8_t *xq, const float *xs,
                                                                  int64_t rows, const float *bias,
                                                                  const void *residual, int64_t res_stride,
                                                                  void *out, int64_t out_stride, int out_bf16) {
    const int64_t nb = k / QB, bstride = block_bytes(KIND), panels = (n + PANEL - 1) / PANEL;
    const int64_t padded = (rows + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS;
    {
        amx_configure();
        uint8_t *buf = KIND == KIND_Q8_0 ? NULL : (uint8_t *)aligned_alloc(64, (size_t)nb * 512);
        int32_t cbuf[2][AMX_TILES][256] __attribute__((aligned(64)));
        float sums[AMX_TILES * AMX_ROWS * 16] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; ++p) {
            const uint8_t *wp = w + p * nb * bstride;
            int count = n - p * PANEL < PANEL ? (int)(n - p * PANEL) : PANEL;
            if (KIND != KIND_Q8_0) amx_unpack_q4(wp, KIND, nb, buf);
            __asm__ volatile("" ::: "memory"); /* tileloadd's asm names no memory operand */
            for (int64_t t = 0; t < padded; t += AMX_TILES * AMX_ROWS) {
                int tiles = (int)((padded - t) / AMX_ROWS < AMX_TILES ? (padded - t) / AMX_ROWS : AMX_TILES);
                const int8_t *xt = xq + t * k;
                const float *st = xs + t * nb * 2;
                memset(sums, 0, sizeof(float) * 16 * AMX_ROWS * (size_t)tiles);
                amx_issue(KIND, xt, k, wp, buf, 0, tiles, cbuf[0]);
                for (int64_t b = 1; b < nb; ++b)
                    amx_step(KIND, xt, k, wp, buf, b, nb, tiles, cbuf[b & 1], cbuf[(b - 1) & 1], st, sums);
                amx_last(KIND, wp + (nb - 1) * bstride, cbuf[(nb - 1) & 1], st, nb - 1, nb, tiles, sums);
                int live = rows - t < tiles * AMX_ROWS ? (int)(rows - t) : tiles * AMX_ROWS;
                for (int r = 0; r < live; ++r)
                    store512(_mm512_load_ps(sums + 16 * r), count, p * PANEL, bias, residual, t + r, res_stride,
                             out, out_stride, out_bf16);
            }
        }
        free(buf);
        _tile_release();
    }
}

static TAMX void gemm_amx_q4_0(const uint8_t *w, int64_t n, int64_t k, const int8_t *xq, const float *xs,
                               int64_t rows, const float *bias, const void *residual, int64_t res_stride, void *out,
                               int64_t out_stride, int out_bf16) {
#pragma omp parallel
    amx_worker(w, KIND_Q4_0, n, k, xq, xs, rows, bias, residual, res_stride, out, out_stride, out_bf16);
}
static TAMX void gemm_amx_q4_1(const uint8_t *w, int64_t n, int64_t k, const int8_t *xq, const float *xs,
                               int64_t rows, const float *bias, const void *residual, int64_t res_stride, void *out,
                               int64_t out_stride, int out_bf16) {
#pragma omp parallel
    amx_worker(w, KIND_Q4_1, n, k, xq, xs, rows, bias, residual, res_stride, out, out_stride, out_bf16);
}
static TAMX void gemm_amx_q8_0(const uint8_t *w, int64_t n, int64_t k, const int8_t *xq, const float *xs,
                               int64_t rows, const float *bias, const void *residual, int64_t res_stride, void *out,
                               int64_t out_stride, int out_bf16) {
#pragma omp parallel
    amx_worker(w, KIND_Q8_0, n, k, xq, xs, rows, bias, residual, res_stride, out, out_stride, out_bf16);
}

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

/* ---- AMX bf16: float activations, weights dequantized to bf16 --------------
 * The float variant for bf16 activations from AMX_MIN_ROWS rows on: each panel
 * is dequantized once per call (d * u + m, rounded to bf16 as a bf16 copy of the
 * float weights would be) into TDPBF16PS B operands, 16 rows of 64 bytes per
 * block, row j holding the pair of columns (2j, 2j + 1) of each of the 16 weight
 * rows. A: the activations packed by each thread into whole tiles, per 16-row
 * group and block 16 rows of 32 bf16 (1 KB, contiguous, the last group zero
 * padded): a tile load of x in place (16 rows 2k bytes apart) was the kernel's
 * bottleneck once the rest overlapped (Sapphire Rapids: 1.6x slower loads at
 * 128 rows). The weights carry their scales, so the C tiles (4: two 16-row
 * groups by two panels) accumulate over the whole row with no per-block
 * epilogue, as a bf16 matmul does. */

#define TAMXBF __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma,f16c,amx-tile,amx-bf16")))

/* tmm0-3: C (16 x 16 float), tmm4-5: A (16 rows x 32 bf16), tmm6-7: B (16 rows x 16 bf16 pairs). */
static inline TAMXBF void amxbf_configure(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; ++i) {
        cfg.rows[i] = 16;
        cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* Lane r of the result: (bf16(a[r]), bf16(b[r])) as one 32-bit pair. */
static inline TAMXBF __m512i amxbf_pair(__m512 a, __m512 b) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(b, a));
}

/* Block b of the panel at wp as 16 B-operand rows at buf + 1024 b. A nibble becomes
 * a float by vpermps from the table 0..15, which reads only an index's low 4 bits:
 * one instruction for the mask and the conversion. */
static inline __attribute__((always_inline)) TAMXBF void amxbf_dequantize(const uint8_t *wp, const int KIND,
                                                                          int64_t b, uint8_t *buf) {
    const int64_t bstride = block_bytes(KIND), qoff = quant_offset(KIND);
    const uint8_t *blk = wp + b * bstride, *qs = blk + qoff;
    __m512i *rows = (__m512i *)(buf + b * 1024);
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
    if (KIND == KIND_Q8_0) {
        for (int g = 0; g < 8; ++g) {
            __m512i v = _mm512_loadu_si512(qs + 64 * g);
            for (int j = 0; j < 4; j += 2) {
                __m512 a = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * j), 24));
                __m512 c = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16 - 8 * j), 24));
                _mm512_store_si512(rows + 2 * g + j / 2, amxbf_pair(_mm512_mul_ps(a, d), _mm512_mul_ps(c, d)));
            }
        }
    } else {
        const __m512 table = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        __m512 m = KIND == KIND_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)))
                                     : _mm512_mul_ps(d, _mm512_set1_ps(-8.f));
        for (int c = 0; c < 4; ++c) {
            __m512i v = _mm512_loadu_si512(qs + 64 * c);
            for (int h = 0; h < 2; ++h) /* low nibbles: columns 4c + j; high: 16 + 4c + j */
                for (int j = 0; j < 4; j += 2) {
                    const int s = 8 * j + 4 * h;
                    __m512 a = _mm512_permutexvar_ps(s ? _mm512_srli_epi32(v, s) : v, table);
                    __m512 e = _mm512_permutexvar_ps(_mm512_srli_epi32(v, s + 8), table);
                    _mm512_store_si512(rows + 8 * h + 2 * c + j / 2,
                                       amxbf_pair(_mm512_fmadd_ps(a, d, m), _mm512_fmadd_ps(e, d, m)));
                }
        }
    }
}

/* One 16-column row of a C tile (float) + bias + residual into out. bf16 out is
 * rounded by vcvtneps2bf16 (to nearest even, as f32_to_bf16; it flushes float32
 * denormals, below 1.2e-38, to zero). */
static inline TAMXBF void amxbf_store_row(const float *c, int count, int64_t col, const float *bias,
                                          const void *residual, int64_t row, int64_t res_stride, void *out,
                                          int64_t out_stride, int out_bf16) {
    if (!out_bf16) {
        store512(_mm512_load_ps(c), count, col, bias, residual, row, res_stride, out, out_stride, 0);
        return;
    }
    __mmask16 mask = count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1);
    __m512 v = _mm512_load_ps(c);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + col));
    if (residual) {
        __m256i r = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)residual + row * res_stride + col);
        v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(r), 16)));
    }
    _mm256_mask_storeu_epi16((uint16_t *)out + row * out_stride + col, mask, (__m256i)_mm512_cvtneps_pbh(v));
}

/* A step's C tiles in memory, waiting for their epilogue: tile 2 g + q holds row group g
 * (rows t + 16 g.., live[g] of them) by panel q (columns col + 16 q.., count[q] of them). */
typedef struct {
    const float *c;
    int64_t t, col;
    int live[2], count[2];
} amxbf_pending;

/* Epilogue rows [from, to) of the 64 a step has (tile u / 16, row u % 16). */
static inline __attribute__((always_inline)) TAMXBF void amxbf_epilogue(const amxbf_pending *pd, int from, int to,
                                                                        const float *bias, const void *residual,
                                                                        int64_t res_stride, void *out,
                                                                        int64_t out_stride, int out_bf16) {
    for (int u = from; u < to; ++u) {
        const int tile = u >> 4, r = u & 15, g = tile >> 1, q = tile & 1;
        if (r < pd->live[g] && pd->count[q] > 0)
            amxbf_store_row(pd->c + 256 * tile + 16 * r, pd->count[q], pd->col + 16 * q, bias, residual,
                            pd->t + 16 * g + r, res_stride, out, out_stride, out_bf16);
    }
}

/* One block of a step: C tiles 0-3 = (row group g, panel q) at 2 g + q, for two
 * 16-row groups by two panels; A tiles 4-5: the groups' rows; B tiles 6-7: the
 * panels' block. 2 A and 2 B loads feed 4 TDPBF16PS: each A tile serves two
 * panels, each B tile two row groups. The 1 x 4 blocking before (one B and four
 * A tiles per block: a tile load per dp, every A tile loaded once per panel) was
 * 1.2-1.45x slower from 128 rows on, on Sapphire Rapids. A missing second group
 * or panel drops its tiles. */
#define AMXBF_PAIR(TWO_ROWS, TWO_PANELS) \
    do { \
        _tile_loadd(4, a0 + b * 512, 64); \
        _tile_loadd(6, b0 + b * 1024, 64); \
        _tile_dpbf16ps(0, 4, 6); \
        if (TWO_PANELS) { \
            _tile_loadd(7, b1 + b * 1024, 64); \
            _tile_dpbf16ps(1, 4, 7); \
        } \
        if (TWO_ROWS) { \
            _tile_loadd(5, a1 + b * 512, 64); \
            _tile_dpbf16ps(2, 5, 6); \
            if (TWO_PANELS) _tile_dpbf16ps(3, 5, 7); \
        } \
    } while (0)

/* This thread's growable scratch (dequantized panels, packed A), kept across calls: no allocation per call. */
static __thread uint8_t *amxbf_scratch;
static __thread size_t amxbf_scratch_bytes;

static uint8_t *amxbf_buffers(size_t bytes) {
    if (bytes > amxbf_scratch_bytes) {
        free(amxbf_scratch);
        amxbf_scratch = (uint8_t *)aligned_alloc(64, bytes);
        amxbf_scratch_bytes = amxbf_scratch ? bytes : 0;
    }
    return amxbf_scratch;
}

/* Pull the panel's block b into L2 ahead of its dequantization: the weights of a
 * layer are cold (a step reads ~84 MB), and the dequantization's loads otherwise
 * stall the core that also issues the tiles. */
static inline __attribute__((always_inline)) TAMXBF void amxbf_prefetch(const uint8_t *wp, const int KIND,
                                                                        int64_t b) {
    const int64_t bstride = block_bytes(KIND);
    const uint8_t *blk = wp + b * bstride;
    for (int64_t off = 0; off < bstride; off += 64) _mm_prefetch((const char *)blk + off, _MM_HINT_T1);
}

/* x: bf16 rows (stride x_stride). Called by every thread of a parallel region. */
static inline __attribute__((always_inline)) TAMXBF void amxbf_worker(const uint8_t *w, const int KIND, int64_t n,
                                                                      int64_t k, const uint16_t *x, int64_t x_stride,
                                                                      int64_t rows, const float *bias,
                                                                      const void *residual,
                                                                      int64_t res_stride, void *out,
                                                                      int64_t out_stride, int out_bf16) {
    const int64_t nb = k / QB, bstride = block_bytes(KIND), panels = (n + PANEL - 1) / PANEL;
    const int64_t groups = (rows + AMX_ROWS - 1) / AMX_ROWS, steps = (groups + 1) / 2;
    const size_t panel_bytes = (size_t)nb * 1024;
    /* Two pairs of dequantized panels (the current pair's tiles run while the next pair is
     * dequantized), then A packed: tile (g, b) at packed + 512 (g nb + b), rows past the end
     * zero. Each thread packs all of A for itself: a shared copy needs a barrier, which costs
     * a scheduler slice whenever another process holds one of the cores (the pipeline's). */
    uint8_t *bufs = amxbf_buffers(4 * panel_bytes + (size_t)groups * nb * 1024);
    uint16_t *packed = (uint16_t *)(bufs + 4 * panel_bytes);
    for (int64_t g = 0; g < groups; ++g)
        for (int r = 0; r < AMX_ROWS; ++r) {
            const int64_t row = g * AMX_ROWS + r;
            uint16_t *dst = packed + g * nb * 512 + 32 * r;
            if (row < rows)
                for (int64_t b = 0; b < nb; ++b)
                    _mm512_storeu_si512(dst + b * 512, _mm512_loadu_si512(x + row * x_stride + b * QB));
            else
                for (int64_t b = 0; b < nb; ++b) _mm512_storeu_si512(dst + b * 512, _mm512_setzero_si512());
        }
    amxbf_configure();
    /* This thread's panels, whole pairs of them (only the last panel can be alone). */
    const int64_t threads = omp_get_num_threads(), per = ((panels + 1) / 2 + threads - 1) / threads * 2;
    const int64_t first = omp_get_thread_num() * per, last = first + per < panels ? first + per : panels;
    float cbuf[2][4][256] __attribute__((aligned(64)));
    amxbf_pending pending = {0};
    const int chunk = nb > 0 ? (int)((64 + nb - 1) / nb) : 64; /* epilogue rows per block: 64 within a step */
    for (int64_t p = first + 2; p < last && p < first + 4; ++p)
        for (int64_t b = 0; b < nb; ++b) amxbf_prefetch(w + p * nb * bstride, KIND, b);
    for (int64_t p = first; p < last && p < first + 2; ++p)
        for (int64_t b = 0; b < nb; ++b)
            amxbf_dequantize(w + p * nb * bstride, KIND, b, bufs + (p - first) * panel_bytes);
    int64_t done = 0; /* steps finished: cbuf[done % 2] is the one being filled */
    for (int64_t p = first; p < last; p += 2) {
        const int two_panels = p + 1 < last;
        const uint8_t *b0 = bufs + (p - first) / 2 % 2 * 2 * panel_bytes, *b1 = b0 + panel_bytes;
        uint8_t *next = bufs + ((p - first) / 2 + 1) % 2 * 2 * panel_bytes;
        const int64_t upcoming = last - (p + 2) < 2 ? last - (p + 2) : 2; /* panels of the next pair, <= 0: none */
        const int64_t later = last - (p + 4) < 2 ? last - (p + 4) : 2;    /* and of the pair after it */
        __asm__ volatile("" ::: "memory"); /* tileloadd's asm names no memory operand */
        for (int64_t s = 0; s < steps; ++s, ++done) { /* a step: row groups 2 s and 2 s + 1 by the pair */
            const int64_t g0 = 2 * s, g1 = 2 * s + 1;
            const int two_rows = g1 < groups;
            const uint16_t *a0 = packed + g0 * nb * 512, *a1 = packed + g1 * nb * 512;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t b = 0; b < nb; ++b) {
                if (two_rows && two_panels)
                    AMXBF_PAIR(1, 1);
                else
                    AMXBF_PAIR(two_rows, two_panels);
                /* Beside the dps, on the vector units: the previous step's epilogue, a share per
                 * block (after the step instead: 1.2-1.4x slower at 512 rows with a residual,
                 * Sapphire Rapids); the next pair's block b and a prefetch of the pair after,
                 * in one step of the pair's each (the first pair of a thread is dequantized
                 * before; dequantizing block by block just before its tiles measured slower). */
                if (pending.c) {
                    const int from = (int)b * chunk, to = from + chunk < 64 ? from + chunk : 64;
                    amxbf_epilogue(&pending, from, to, bias, residual, res_stride, out, out_stride, out_bf16);
                }
                if (b % steps == s) {
                    for (int64_t q = 0; q < upcoming; ++q)
                        amxbf_dequantize(w + (p + 2 + q) * nb * bstride, KIND, b, next + q * panel_bytes);
                    for (int64_t q = 0; q < later; ++q) amxbf_prefetch(w + (p + 4 + q) * nb * bstride, KIND, b);
                }
            }
            float(*c)[256] = cbuf[done % 2];
            _tile_stored(0, c[0], 64);
            _tile_stored(1, c[1], 64);
            _tile_stored(2, c[2], 64);
            _tile_stored(3, c[3], 64);
            __asm__ volatile("" ::: "memory"); /* tilestored's neither: the epilogue reads c */
            const int64_t t = g0 * AMX_ROWS;
            pending.c = c[0];
            pending.t = t;
            pending.col = p * PANEL;
            pending.live[0] = rows - t < AMX_ROWS ? (int)(rows - t) : AMX_ROWS;
            pending.live[1] = !two_rows ? 0 : rows - t - AMX_ROWS < AMX_ROWS ? (int)(rows - t - AMX_ROWS) : AMX_ROWS;
            pending.count[0] = n - p * PANEL < PANEL ? (int)(n - p * PANEL) : PANEL;
            pending.count[1] = !two_panels ? 0 : n - (p + 1) * PANEL < PANEL ? (int)(n - (p + 1) * PANEL) : PANEL;
        }
    }
    if (pending.c) amxbf_epilogue(&pending, 0, 64, bias, residual, res_stride, out, out_stride, out_bf16);
    _tile_release();
}

#define FGEMM_AMXBF(NAME, KIND_) \
    static TAMXBF void NAME(const uint8_t *w, int64_t n, int64_t k, const uint16_t *x, int64_t x_stride, \
                            int64_t rows, const float *bias, const void *residual, int64_t res_stride, void *out, \
                            int64_t out_stride, int out_bf16) { \
        _Pragma("omp parallel") amxbf_worker(w, KIND_, n, k, x, x_stride, rows, bias, residual, res_stride, out, \
                                             out_stride, out_bf16); \
    }
FGEMM_AMXBF(fgemm_amxbf_q4_0, KIND_Q4_0)
FGEMM_AMXBF(fgemm_amxbf_q4_1, KIND_Q4_1)
FGEMM_AMXBF(fgemm_amxbf_q8_0, KIND_Q8_0)

#endif /* __x86_64__ */

typedef void (*gemm_fn)(const uint8_t *, int64_t, int64_t, const int8_t *, const float *, int64_t, const float *,
                        const void *, int64_t, void *, int64_t, int);
typedef void (*fgemm_fn_bf)(const uint8_t *, int64_t, int64_t, const uint16_t *, int64_t, int64_t, const float *,
                            const void *, int64_t, void *, int64_t, int);
typedef void (*fgemm_fn)(const uint8_t *, int64_t, int64_t, const float *, int64_t, int64_t, const float *,
                         const void *, int64_t, void *, int64_t, int);

#if defined(__x86_64__) && defined(__linux__)
/* AMX needs cpuid's AMX-TILE and AMX-INT8, and the kernel's leave to use the tile
 * state, asked once per process (it then holds for every thread). */
static int amx_usable(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 24 & 1) || !(d >> 25 & 1)) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}
#endif

int qlinear_paths(void);

/* Whether the float variant may use AMX-BF16 tiles (the amx_int8 path runs, and cpuid has AMX-BF16 and AVX512-BF16).
 * Asked once, as qlinear_paths: cpuid traps to the hypervisor in a VM (about 15 us each on
 * the Sapphire Rapids VM we measure on), and this is asked on every call. */
static int amx_bf16_usable(void) {
    static int known = -1; /* a benign race, as in qlinear_paths */
    if (known >= 0) return known;
    int usable = 0;
#if defined(__x86_64__) && defined(__linux__)
    unsigned a, b, c, d;
    if ((qlinear_paths() & (1 << PATH_AMX_INT8)) && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1))
        usable = __builtin_cpu_supports("avx512bf16");
#endif
    known = usable;
    return usable;
}

/* 1 when the float variant on the amx_int8 path runs bf16 activations on AMX-BF16 tiles
 * (weights rounded to bf16), 0 when it dequantizes to float32 there too. */
int qlinear_float_tiles(void) { return amx_bf16_usable(); }

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
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")) {
        paths |= 1 << PATH_AVX512_VNNI;
#if defined(__linux__)
        if (amx_usable()) paths |= 1 << PATH_AMX_INT8;
#endif
    }
#endif
    known = paths;
    return paths;
}

/* Rows the AMX path computes: whole tiles of 16; the scratch must hold that many. */
int64_t qlinear_padded_rows(int64_t rows) { return (rows + 15) / 16 * 16; }

/* out = residual + bias + x @ w.T. x: [rows, k] float32 or bf16 (row stride x_stride);
 * w: n x k in panels of kind; bias: float32 [n] or NULL; residual, out: [rows, n]
 * in out's dtype (residual may be NULL or equal out). xq: int8 [padded rows, k] and
 * xs: float32 [padded rows, k / 32, 2] scratch (qlinear_padded_rows). Returns 0, or
 * -1 for a bad argument, -2 for a path this CPU cannot run. */
int qlinear(int path, const void *x, int64_t x_stride, int x_bf16, int64_t rows, int64_t k, const uint8_t *w,
            int64_t n, int kind, const float *bias, const void *residual, int64_t res_stride, void *out,
            int64_t out_stride, int out_bf16, int8_t *xq, float *xs) {
    if (k % QB || kind < 0 || kind > 2 || path < 0 || path >= NPATHS || rows < 0) return -1;
    if (!(qlinear_paths() & (1 << path))) return -2;
    gemm_fn fn = 0;
#if defined(__x86_64__)
    if (path >= PATH_AVX512_VNNI)
        quantize_rows512(x, x_stride, x_bf16, rows, k, xq, xs);
    else
        quantize_rows(x, x_stride, x_bf16, rows, k, xq, xs);
    static const gemm_fn avx512[3] = {gemm512_KIND_Q4_0, gemm512_KIND_Q4_1, gemm512_KIND_Q8_0};
    static const gemm_fn avx2[3] = {gemm256_KIND_Q4_0, gemm256_KIND_Q4_1, gemm256_KIND_Q8_0};
    static const gemm_fn avx2v[3] = {gemm256v_KIND_Q4_0, gemm256v_KIND_Q4_1, gemm256v_KIND_Q8_0};
    static const gemm_fn amx[3] = {gemm_amx_q4_0, gemm_amx_q4_1, gemm_amx_q8_0};
    if (path == PATH_AMX_INT8) {
        int64_t padded = qlinear_padded_rows(rows), nb = k / QB;
        memset(xq + rows * k, 0, (size_t)((padded - rows) * k));
        memset(xs + rows * nb * 2, 0, sizeof(float) * (size_t)((padded - rows) * nb * 2));
        fn = amx[kind];
    }
    if (path == PATH_AVX512_VNNI) fn = avx512[kind];
    if (path == PATH_AVX2) fn = avx2[kind];
    if (path == PATH_AVX2_VNNI) fn = avx2v[kind];
#else
    quantize_rows(x, x_stride, x_bf16, rows, k, xq, xs);
#endif
    if (fn)
        fn(w, n, k, xq, xs, rows, bias, residual, res_stride, out, out_stride, out_bf16);
    else
        gemm_portable(w, kind, n, k, xq, xs, rows, bias, residual, res_stride, out, out_stride, out_bf16);
    return 0;
}

/* The same product with float activations (no int8 quantization): the weights
 * are dequantized in registers. AVX-512 on the avx512_vnni and amx_int8 paths,
 * portable C on the others; amx_int8 with bf16 x runs AMX-BF16 tiles where the
 * CPU has them (the caller picks avx512_vnni for few rows). xf: float32
 * [rows, k] scratch, used for bf16 x off the tiles only.
 * Returns as qlinear. */
int qlinear_float(int path, const void *x, int64_t x_stride, int x_bf16, int64_t rows, int64_t k, const uint8_t *w,
                  int64_t n, int kind, const float *bias, const void *residual, int64_t res_stride, void *out,
                  int64_t out_stride, int out_bf16, float *xf) {
    if (k % QB || kind < 0 || kind > 2 || path < 0 || path >= NPATHS || rows < 0) return -1;
    if (!(qlinear_paths() & (1 << path))) return -2;
#if defined(__x86_64__)
    static const fgemm_fn_bf amxbf[3] = {fgemm_amxbf_q4_0, fgemm_amxbf_q4_1, fgemm_amxbf_q8_0};
    if (path == PATH_AMX_INT8 && x_bf16 && amx_bf16_usable()) {
        amxbf[kind](w, n, k, (const uint16_t *)x, x_stride, rows, bias, residual, res_stride, out, out_stride,
                    out_bf16);
        return 0;
    }
#endif
    const float *xs = (const float *)x;
    if (x_bf16) {
        widen_bf16((const uint16_t *)x, x_stride, rows, k, xf);
        xs = xf;
        x_stride = k;
    }
    fgemm_fn fn = 0;
#if defined(__x86_64__)
    static const fgemm_fn avx512[3] = {fgemm512_KIND_Q4_0, fgemm512_KIND_Q4_1, fgemm512_KIND_Q8_0};
    if (path >= PATH_AVX512_VNNI) fn = avx512[kind];
#endif
    if (fn)
        fn(w, n, k, xs, x_stride, rows, bias, residual, res_stride, out, out_stride, out_bf16);
    else
        fgemm_portable(w, kind, n, k, xs, x_stride, rows, bias, residual, res_stride, out, out_stride, out_bf16);
    return 0;
}
