/* Shared by the native kernels (paged_attention.c, layers.c, bf16_linear.c, argmax.c).
 *
 * Every kernel holds one code path per instruction set, each compiled for it by
 * function target attributes, so which one runs is a run-time argument chosen
 * from the CPU's flags (native.py: path_for), not the -march of the build:
 * one library serves an AVX-512 machine and an AVX2-only one (AMD Zen 3), and
 * an AVX-512 machine can run (and test) the AVX2 code. The portable path is
 * plain C that the compiler vectorizes for whatever -march the build targets.
 *
 * bf16 <-> float32 by shifts (bf16 is the upper half of a float32), so no path
 * needs bf16 instructions; rounding to bf16 is to nearest even, as torch does.
 *
 * fp8 e5m2 (the 8-bit KV cache, SCALELLM_KV_CACHE_DTYPE=fp8_e5m2) is the upper byte
 * of an IEEE float16, so a load is a byte shifted into a float16 and converted
 * (F16C / AVX-512 vcvtph2ps). A store rounds float32 straight to e5m2, to nearest
 * even as torch.float8_e5m2 does (overflow to inf, not saturated): going through
 * float16 first would round twice and could differ from torch on ties.
 */
/* exp8 / exp16 alone, for csrc/qlinear.h (whose other names clash with the rest of this file:
 * it defines SCALELLM_SIMD_EXP_ONLY before including it), so that the quantized linear's SwiGLU
 * epilogue computes layers.c's silu_mul arithmetic from the same polynomial. Their targets are
 * the least they need, so they inline into either file's T256 / T512 functions. */
#ifndef SCALELLM_SIMD_EXP
#define SCALELLM_SIMD_EXP
#if defined(__x86_64__)
#include <immintrin.h>

/* exp(x), Cephes' expf polynomial (relative error ~2e-7); x below -87 gives ~0. */
static inline __attribute__((always_inline, target("avx2,fma"))) __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* exp(x) on 16 lanes, the same polynomial. */
static inline __attribute__((always_inline, target("avx512f"))) __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif /* __x86_64__ */
#endif /* SCALELLM_SIMD_EXP */

#ifndef SCALELLM_SIMD_EXP_ONLY
#ifndef SCALELLM_SIMD_H
#define SCALELLM_SIMD_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

enum { PATH_PORTABLE = 0, PATH_AVX2 = 1, PATH_AVX512 = 2, NUM_PATHS = 3 };

/* Element formats of activations and the KV pool (native.py: _FORMATS). */
enum { FMT_F32 = 0, FMT_BF16 = 1, FMT_E5M2 = 2 };

/* f16c: the e5m2 loads; every AVX2 CPU made has it (Haswell, Zen). */
#define T256 __attribute__((target("avx2,fma,f16c")))
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Which paths this CPU runs (bit i: path i), from cpuid. */
static inline int cpu_paths(void) {
    int paths = 1 << PATH_PORTABLE;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        paths |= 1 << PATH_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        paths |= 1 << PATH_AVX512;
#endif
    return paths;
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
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16); /* round to nearest even */
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

static inline float e5m2_to_f32(uint8_t b) {
    uint32_t sign = (uint32_t)(b & 0x80u) << 24, e = (b >> 2) & 0x1Fu, m = b & 3u, u;
    float f;
    if (e == 0) { /* subnormal: m * 2^-16 */
        f = (float)m * 0x1p-16f;
        return sign ? -f : f;
    }
    u = sign | (e == 31 ? 0x7F800000u : (e + 112u) << 23) | m << 21;
    memcpy(&f, &u, 4);
    return f;
}

/* As c10's fp8e5m2_from_fp32_value: RNE on the float32 bits; below e5m2's normal
 * range the FPU does the rounding by an add of 128 (whose ulp is e5m2's 2^-16). */
static inline uint8_t f32_to_e5m2(float f) {
    uint32_t u, r;
    memcpy(&u, &f, 4);
    uint32_t sign = u & 0x80000000u, a = u ^ sign;
    if (a >= 143u << 23) {
        r = a > 0x7F800000u ? 0x7Fu : 0x7Cu;
    } else if (a < 113u << 23) {
        float t;
        memcpy(&t, &a, 4);
        t += 128.f;
        memcpy(&r, &t, 4);
        r -= 134u << 23;
    } else {
        r = (a + 0xC8000000u + 0xFFFFFu + ((a >> 21) & 1u)) >> 21; /* 0xC8000000: (15 - 127) << 23 */
    }
    return (uint8_t)(r | sign >> 24);
}

#if defined(__x86_64__)
/* ---- AVX2 ---- */
ALWAYS_INLINE T256 __m256 ld8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

ALWAYS_INLINE T256 __m128i cvt8_bf16(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    /* every lane is <= 0xFFFF now, so the unsigned saturating pack is exact */
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

ALWAYS_INLINE T256 void st8_bf16(uint16_t *p, __m256 v) { _mm_storeu_si128((__m128i *)p, cvt8_bf16(v)); }

ALWAYS_INLINE T256 __m256 ld8_e5m2(const uint8_t *p) {
    return _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p)), 8));
}

/* f32_to_e5m2 on 8 lanes (a < 2^31 after the sign is cleared, so signed compares do). */
ALWAYS_INLINE T256 void st8_e5m2(uint8_t *p, __m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i sign = _mm256_and_si256(u, _mm256_set1_epi32((int)0x80000000u));
    __m256i a = _mm256_xor_si256(u, sign);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(a, 21), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(a, _mm256_set1_epi32((int)0xC80FFFFFu)), odd), 21);
    __m256 t = _mm256_add_ps(_mm256_castsi256_ps(a), _mm256_set1_ps(128.f));
    __m256i sub = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(134 << 23));
    r = _mm256_blendv_epi8(r, sub, _mm256_cmpgt_epi32(_mm256_set1_epi32(113 << 23), a));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7C), _mm256_cmpgt_epi32(a, _mm256_set1_epi32((143 << 23) - 1)));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7F), _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7F800000)));
    r = _mm256_or_si256(r, _mm256_srli_epi32(sign, 24));
    __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storel_epi64((__m128i *)p, _mm_packus_epi16(w, w));
}

ALWAYS_INLINE T256 float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

ALWAYS_INLINE T256 float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- AVX-512 ---- */
ALWAYS_INLINE T512 __m512 ld16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

ALWAYS_INLINE T512 __m512 ld16m_bf16(__mmask16 m, const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

ALWAYS_INLINE T512 __m512 ld16_e5m2(const uint8_t *p) {
    return _mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p)), 8));
}

ALWAYS_INLINE T512 __m512 ld16m_e5m2(__mmask16 m, const uint8_t *p) {
    return _mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(m, p)), 8));
}

/* f32_to_e5m2 on 16 lanes. */
ALWAYS_INLINE T512 __m128i cvt16_e5m2(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i sign = _mm512_and_si512(u, _mm512_set1_epi32((int)0x80000000u));
    __m512i a = _mm512_xor_si512(u, sign);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(a, 21), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(a, _mm512_set1_epi32((int)0xC80FFFFFu)), odd), 21);
    __m512 t = _mm512_add_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(128.f));
    __m512i sub = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(134 << 23));
    r = _mm512_mask_blend_epi32(_mm512_cmplt_epi32_mask(a, _mm512_set1_epi32(113 << 23)), r, sub);
    r = _mm512_mask_blend_epi32(_mm512_cmpge_epi32_mask(a, _mm512_set1_epi32(143 << 23)), r, _mm512_set1_epi32(0x7C));
    r = _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(a, _mm512_set1_epi32(0x7F800000)), r, _mm512_set1_epi32(0x7F));
    return _mm512_cvtepi32_epi8(_mm512_or_si512(r, _mm512_srli_epi32(sign, 24)));
}

ALWAYS_INLINE T512 __m256i cvt16_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    return _mm512_cvtepi32_epi16(r);
}

#endif /* __x86_64__ */

#endif
#endif /* SCALELLM_SIMD_EXP_ONLY */
