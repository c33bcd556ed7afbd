/* Shared by the qlinear*.c files (one library, built by quant_kernels.py): the
 * block formats, the float16/bf16 helpers, a row's epilogue, the instruction-set
 * target attributes and the cross-file kernels' prototypes (hidden: only the
 * entry points of qlinear.c are the library's interface). */
#ifndef QLINEAR_H
#define QLINEAR_H

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
#define SCALELLM_SIMD_EXP_ONLY
#include "simd.h" /* exp8, exp16: the SwiGLU epilogue's silu, as layers.c's */

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

#define QL_INTERNAL __attribute__((visibility("hidden")))

/* 4 activation bytes as one broadcastable int32 (the VNNI paths). */
static inline int32_t load4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
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

/* ---- SwiGLU epilogue (qlinear_swiglu): out[t, c] = silu(gate[t, c]) * up[t, c] ----------
 * gate_up's rows are gate (n / 2 of them) then up; with n a multiple of 32, gate panel j pairs
 * with up panel j + n / 32 (both whole), and one thread computes both, so the product needs no
 * second pass over a [rows, n] buffer. With bf16 out, gate and up are first rounded to bf16 as
 * gate_up's store rounds them, and silu is computed as layers.c's silu_mul computes it on the
 * path's instruction set (portable: expf and a division; AVX2: exp8, rcp + one Newton step;
 * AVX-512: exp16, rcp14 + one Newton step), so the output has the bits of gate_up's output
 * followed by silu_mul on that path (layers.c is built with -ffast-math and this library
 * without: tests/unit/test_fused_swiglu.py holds them to it). Float32 out: nothing rounded. */

/* A gate or up sum as the plain store leaves it (finish_row): + bias, rounded to bf16 for bf16 out. */
static inline float swiglu_operand(float acc, const float *bias, int64_t col, int out_bf16) {
    float v = acc + (bias ? bias[col] : 0.f);
    return out_bf16 ? bf16_to_f32(f32_to_bf16(v)) : v;
}

/* count outputs of row `row` from prepared gate g[] and up u[] (swiglu_operand). */
static inline void swiglu_finish_row(const float *g, const float *u, int count, int64_t col, int64_t row, void *out,
                                     int64_t out_stride, int out_bf16) {
    for (int i = 0; i < count; ++i) {
        /* layers.c's silu_row_portable: -x clamped, so expf never overflows to inf */
        float v = g[i] / (1.f + expf(fminf(-g[i], 88.f))) * u[i];
        if (out_bf16)
            ((uint16_t *)out)[row * out_stride + col + i] = f32_to_bf16(v);
        else
            ((float *)out)[row * out_stride + col + i] = v;
    }
}

/* portable C (qlinear_portable.c) */
QL_INTERNAL void quantize_rows(const void *x, int64_t x_stride, int x_bf16, int64_t rows, int64_t cols, int8_t *q,
                               float *s);
QL_INTERNAL void gemm_portable(const uint8_t *w, int kind, int64_t n, int64_t k, const int8_t *xq, const float *xs,
                               int64_t rows, const float *bias, const void *residual, int64_t res_stride, void *out,
                               int64_t out_stride, int out_bf16, int64_t pairs);
QL_INTERNAL void widen_bf16(const uint16_t *x, int64_t x_stride, int64_t rows, int64_t k, float *xf);
QL_INTERNAL void fgemm_portable(const uint8_t *w, int kind, int64_t n, int64_t k, const float *xf, int64_t x_stride,
                                int64_t rows, const float *bias, const void *residual, int64_t res_stride, void *out,
                                int64_t out_stride, int out_bf16, int64_t pairs);

#if defined(__x86_64__)

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))
#define TAMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c,amx-tile,amx-int8")))
#define TAMXBF __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma,f16c,amx-tile,amx-bf16")))
#define T256 __attribute__((target("avx2,fma,f16c")))
#define T256V __attribute__((target("avx2,fma,f16c,avxvnni")))

/* One output row's 16 lanes (count of them live) + bias + residual into out: the
 * AVX-512 VNNI, AMX int8 and AMX bf16 kernels' store. */
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

/* 16 lanes + bias as store512 leaves them: rounded to bf16 (and back) for bf16 out. A SwiGLU operand. */
static inline T512 __m512 swiglu_operand512(__m512 v, const float *bias, int64_t col, int out_bf16) {
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + col));
    if (!out_bf16) return v;
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd);
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* silu(g) * u of 16 whole lanes into out row `row`, column col, as layers.c's silu_row_avx512
 * computes it (exp16, rcp14 and one Newton step, then the bf16 store rounding to nearest even).
 * In the order its -ffast-math build runs it: g / (1 + e) * u as (g * u) * (1 / (1 + e)), with
 * 1 + e one FMA of exp16's last product (its disassembly; this build contracts that FMA too).
 * g * inv * u instead differed in 1 of ~10^4 outputs by one bf16 unit (a float32 ulp at a tie). */
static inline T512 void swiglu_store512(__m512 g, __m512 u, int64_t col, int64_t row, void *out, int64_t out_stride,
                                        int out_bf16) {
    __m512 den = _mm512_add_ps(exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)), _mm512_set1_ps(1.f));
    __m512 inv = _mm512_rcp14_ps(den);
    inv = _mm512_fmadd_ps(inv, _mm512_fnmadd_ps(den, inv, _mm512_set1_ps(1.f)), inv);
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(g, u), inv);
    if (!out_bf16) {
        _mm512_storeu_ps((float *)out + row * out_stride + col, v);
        return;
    }
    __m512i b = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    _mm256_storeu_si256((__m256i *)((uint16_t *)out + row * out_stride + col), _mm512_cvtepi32_epi16(b));
}

#define AMX_ROWS 16

/* AMX tile configuration (palette 1), as _tile_loadconfig reads it. */
typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) tile_config;

/* The kernels of one kind each, called through the dispatch tables of qlinear.c. pairs: 0 for
 * the plain product, or n / 32 for the SwiGLU epilogue (gate panel j with up panel j + pairs,
 * out [rows, n / 2], no residual). */
#define QL_GEMM_ARGS                                                                                   \
    const uint8_t *w, int64_t n, int64_t k, const int8_t *xq, const float *xs, int64_t rows, const float *bias, \
        const void *residual, int64_t res_stride, void *out, int64_t out_stride, int out_bf16, int64_t pairs
#define QL_FGEMM_ARGS                                                                                  \
    const uint8_t *w, int64_t n, int64_t k, const float *xf, int64_t x_stride, int64_t rows, const float *bias, \
        const void *residual, int64_t res_stride, void *out, int64_t out_stride, int out_bf16, int64_t pairs
#define QL_FGEMM_BF_ARGS                                                                               \
    const uint8_t *w, int64_t n, int64_t k, const uint16_t *x, int64_t x_stride, int64_t rows, const float *bias, \
        const void *residual, int64_t res_stride, void *out, int64_t out_stride, int out_bf16, int64_t pairs

/* AVX2 and AVX2 + AVX-VNNI (qlinear_avx2.c) */
QL_INTERNAL T256 void gemm256_KIND_Q4_0(QL_GEMM_ARGS);
QL_INTERNAL T256 void gemm256_KIND_Q4_1(QL_GEMM_ARGS);
QL_INTERNAL T256 void gemm256_KIND_Q8_0(QL_GEMM_ARGS);
QL_INTERNAL T256V void gemm256v_KIND_Q4_0(QL_GEMM_ARGS);
QL_INTERNAL T256V void gemm256v_KIND_Q4_1(QL_GEMM_ARGS);
QL_INTERNAL T256V void gemm256v_KIND_Q8_0(QL_GEMM_ARGS);
/* AVX-512 VNNI, int8 and float activations (qlinear_avx512.c) */
QL_INTERNAL T512 void quantize_rows512(const void *x, int64_t x_stride, int x_bf16, int64_t rows, int64_t cols,
                                       int8_t *q, float *s);
QL_INTERNAL T512 void gemm512_KIND_Q4_0(QL_GEMM_ARGS);
QL_INTERNAL T512 void gemm512_KIND_Q4_1(QL_GEMM_ARGS);
QL_INTERNAL T512 void gemm512_KIND_Q8_0(QL_GEMM_ARGS);
QL_INTERNAL T512 void fgemm512_KIND_Q4_0(QL_FGEMM_ARGS);
QL_INTERNAL T512 void fgemm512_KIND_Q4_1(QL_FGEMM_ARGS);
QL_INTERNAL T512 void fgemm512_KIND_Q8_0(QL_FGEMM_ARGS);
/* AMX int8 (qlinear_amx.c) */
/* The AMX kernels allocate scratch: 0, or -3 when an allocation failed (the output is then incomplete). */
QL_INTERNAL TAMX int gemm_amx_q4_0(QL_GEMM_ARGS);
QL_INTERNAL TAMX int gemm_amx_q4_1(QL_GEMM_ARGS);
QL_INTERNAL TAMX int gemm_amx_q8_0(QL_GEMM_ARGS);
/* AMX bf16, float activations (qlinear_amxbf.c) */
QL_INTERNAL TAMXBF int fgemm_amxbf_q4_0(QL_FGEMM_BF_ARGS);
QL_INTERNAL TAMXBF int fgemm_amxbf_q4_1(QL_FGEMM_BF_ARGS);
QL_INTERNAL TAMXBF int fgemm_amxbf_q8_0(QL_FGEMM_BF_ARGS);

#endif /* __x86_64__ */

#endif /* QLINEAR_H */
