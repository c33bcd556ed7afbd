/* Shared by the prefill_attention*.c files (one library, built by prefill_attention.py):
 * the paths, the argument block every kernel takes, the scratch layout, and the float
 * vector helpers (GCC vector extensions) the softmax of every path is written in.
 *
 * The helpers carry no target attribute: inlined into a kernel compiled for AVX-512
 * (or AMX, or AVX2) they become that instruction set's code, and in the portable
 * kernel whatever the build's -march allows. No -ffast-math in this library: vexp's
 * rounding by a magic constant must not be reassociated away. */
#ifndef PREFILL_ATTENTION_H
#define PREFILL_ATTENTION_H

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { PA_PORTABLE = 0, PA_AVX2 = 1, PA_AVX512 = 2, PA_AMX = 3, PA_NPATHS = 4 };

#define PA_INTERNAL __attribute__((visibility("hidden")))
#define PA_ALIGN 64
/* Query rows per work item: two 16-row AMX tiles (the float paths use the same items). */
#define PA_QBLOCK 32

/* One call's arguments, as the kernels read them. q of token t, head h: qkv + t * stride + h * dim;
 * k of KV head g: + (heads + g) * dim; v: + (heads + kv_heads + g) * dim. */
typedef struct {
    const uint16_t *qkv;
    int64_t stride; /* elements between two tokens' rows */
    int64_t tokens;
    int heads, kv_heads, dim;
    float scale;
    uint16_t *out;
    int64_t out_stride;
    uint8_t *shared;  /* packed K and V of every KV head */
    uint8_t *private; /* per thread: private_bytes each */
    int64_t private_bytes;
} pa_args;

static inline int64_t pa_round(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

/* Bytes of the scratch shared by a call's threads and of each thread's own part. */
PA_INTERNAL void pa_scratch_sizes(int path, int64_t tokens, int kv_heads, int dim, int64_t *shared, int64_t *each);

/* Pack KV head g's keys [k0, k1) (k0, k1 multiples of 32; rows past tokens zero); run work item
 * (head, q block). The float paths share one body (prefill_attention_vec.c), one copy per target. */
#define PA_KERNELS(SUFFIX)                                                                        \
    PA_INTERNAL void pa_pack_##SUFFIX(const pa_args *a, int g, int64_t k0, int64_t k1);            \
    PA_INTERNAL void pa_item_##SUFFIX(const pa_args *a, uint8_t *priv, int head, int64_t q0);
PA_KERNELS(portable)
PA_KERNELS(avx2)
PA_KERNELS(avx512)
PA_KERNELS(amx)

/* ---- 16-lane float vectors --------------------------------------------------------------- */
typedef float pa_vf __attribute__((vector_size(64)));
typedef int32_t pa_vi __attribute__((vector_size(64)));
typedef uint32_t pa_vu __attribute__((vector_size(64)));
typedef uint16_t pa_vh __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) pa_vf pa_splat(float x) { return (pa_vf){0} + x; }

static inline __attribute__((always_inline)) pa_vf pa_load(const float *p) {
    pa_vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) void pa_store(float *p, pa_vf v) { memcpy(p, &v, sizeof v); }

static inline __attribute__((always_inline)) pa_vf pa_select(pa_vi mask, pa_vf a, pa_vf b) {
    return (pa_vf)(((pa_vi)a & mask) | ((pa_vi)b & ~mask));
}

static inline __attribute__((always_inline)) pa_vf pa_max(pa_vf a, pa_vf b) { return pa_select(a > b, a, b); }

/* Lanes below n (0..16) live: the mask of a row's last partial vector. */
static inline __attribute__((always_inline)) pa_vi pa_live(int n) {
    const pa_vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    return lane < n;
}

/* Horizontal max and sum by halving: 4 dependent steps instead of 15 (per score row, so it counts). */
static inline __attribute__((always_inline)) pa_vf pa_fold(pa_vf v, int op_max) {
#if defined(__GNUC__) && !defined(__clang__)
    const pa_vi s8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
    const pa_vi s4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
    const pa_vi s2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
    const pa_vi s1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
    v = op_max ? pa_max(v, __builtin_shuffle(v, s8)) : v + __builtin_shuffle(v, s8);
    v = op_max ? pa_max(v, __builtin_shuffle(v, s4)) : v + __builtin_shuffle(v, s4);
    v = op_max ? pa_max(v, __builtin_shuffle(v, s2)) : v + __builtin_shuffle(v, s2);
    v = op_max ? pa_max(v, __builtin_shuffle(v, s1)) : v + __builtin_shuffle(v, s1);
#else
    float r = v[0];
    for (int i = 1; i < 16; ++i) r = op_max ? (v[i] > r ? v[i] : r) : r + v[i];
    v[0] = r;
#endif
    return v;
}

static inline __attribute__((always_inline)) float pa_hmax(pa_vf v) { return pa_fold(v, 1)[0]; }

static inline __attribute__((always_inline)) float pa_hsum(pa_vf v) { return pa_fold(v, 0)[0]; }

/* exp(x) for x <= 0 (a score minus its row's max, times the scale), relative error ~2e-7:
 * 2^n by the exponent bits, exp of the remainder |r| <= ln2 / 2 by a degree-6 polynomial.
 * Below -80 it gives exp(-80) ~ 1.8e-35 (2^n stays a normal float), which no sum notices. */
static inline __attribute__((always_inline)) pa_vf pa_exp(pa_vf x) {
    x = pa_max(x, pa_splat(-80.f));
    const pa_vf magic = pa_splat(12582912.f); /* 1.5 * 2^23: adding it rounds to an integer */
    pa_vf n = (x * 1.44269504088896341f + magic) - magic;
    pa_vf r = x - n * 0.693359375f; /* ln 2 in two parts: the first exact in float */
    r = r - n * -2.12194440e-4f;
    pa_vf p = pa_splat(1.f / 720) * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    pa_vi bits = (pa_vi)p + (__builtin_convertvector(n, pa_vi) << 23);
    return (pa_vf)bits;
}

/* 16 bf16 (one 32-byte load) widened by a shift: bf16 is a float32's upper half. */
static inline __attribute__((always_inline)) pa_vf pa_widen(const uint16_t *p) {
    pa_vh h;
    memcpy(&h, p, sizeof h);
    return (pa_vf)(__builtin_convertvector(h, pa_vu) << 16);
}

/* Round to bf16, to nearest even (as torch), of the lanes in v. */
static inline __attribute__((always_inline)) pa_vh pa_narrow(pa_vf v) {
    pa_vu u = (pa_vu)v;
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return __builtin_convertvector(u, pa_vh);
}

static inline __attribute__((always_inline)) void pa_store_bf16(uint16_t *p, pa_vf v, int n) {
    pa_vh h = pa_narrow(v);
    if (n >= 16)
        memcpy(p, &h, sizeof h);
    else
        memcpy(p, &h, (size_t)n * 2);
}

/* The max of a score row's live part s[0..valid) (valid >= 1; s readable up to a multiple of 16). */
static inline __attribute__((always_inline)) float pa_softmax_max(const float *s, int64_t valid) {
    pa_vf m = pa_splat(-__builtin_inff());
    int64_t k = 0;
    for (; k + 16 <= valid; k += 16) m = pa_max(m, pa_load(s + k));
    if (k < valid) m = pa_max(m, pa_select(pa_live((int)(valid - k)), pa_load(s + k), m));
    return pa_hmax(m);
}

#endif
