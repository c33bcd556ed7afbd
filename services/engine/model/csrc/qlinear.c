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
 * Built by services/engine/model/quant_kernels.py from this file (dispatch and entry
 * points) and qlinear_portable.c, qlinear_avx2.c, qlinear_avx512.c, qlinear_amx.c, qlinear_amxbf.c
 * (the kernels, by instruction set; qlinear.h: what they share); no -ffast-math, so the
 * activation quantization matches the torch reference bit for bit.
 */
#include "qlinear.h"

typedef void (*gemm_fn)(const uint8_t *, int64_t, int64_t, const int8_t *, const float *, int64_t, const float *,
                        const void *, int64_t, void *, int64_t, int, int64_t);
typedef int (*gemm_status_fn)(const uint8_t *, int64_t, int64_t, const int8_t *, const float *, int64_t,
                              const float *, const void *, int64_t, void *, int64_t, int, int64_t);
typedef int (*fgemm_fn_bf)(const uint8_t *, int64_t, int64_t, const uint16_t *, int64_t, int64_t, const float *,
                            const void *, int64_t, void *, int64_t, int, int64_t);
typedef void (*fgemm_fn)(const uint8_t *, int64_t, int64_t, const float *, int64_t, int64_t, const float *,
                         const void *, int64_t, void *, int64_t, int, int64_t);

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

/* qlinear (pairs 0) and qlinear_swiglu (pairs n / 32). */
static int qlinear_run(int path, const void *x, int64_t x_stride, int x_bf16, int64_t rows, int64_t k,
                       const uint8_t *w, int64_t n, int kind, const float *bias, const void *residual,
                       int64_t res_stride, void *out, int64_t out_stride, int out_bf16, int8_t *xq, float *xs,
                       int64_t pairs) {
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
    static const gemm_status_fn amx[3] = {gemm_amx_q4_0, gemm_amx_q4_1, gemm_amx_q8_0};
    if (path == PATH_AMX_INT8) {
        int64_t padded = qlinear_padded_rows(rows), nb = k / QB;
        memset(xq + rows * k, 0, (size_t)((padded - rows) * k));
        memset(xs + rows * nb * 2, 0, sizeof(float) * (size_t)((padded - rows) * nb * 2));
        return amx[kind](w, n, k, xq, xs, rows, bias, residual, res_stride, out, out_stride, out_bf16, pairs);
    }
    if (path == PATH_AVX512_VNNI) fn = avx512[kind];
    if (path == PATH_AVX2) fn = avx2[kind];
    if (path == PATH_AVX2_VNNI) fn = avx2v[kind];
#else
    quantize_rows(x, x_stride, x_bf16, rows, k, xq, xs);
#endif
    if (fn)
        fn(w, n, k, xq, xs, rows, bias, residual, res_stride, out, out_stride, out_bf16, pairs);
    else
        gemm_portable(w, kind, n, k, xq, xs, rows, bias, residual, res_stride, out, out_stride, out_bf16, pairs);
    return 0;
}

/* out = residual + bias + x @ w.T. x: [rows, k] float32 or bf16 (row stride x_stride);
 * w: n x k in panels of kind; bias: float32 [n] or NULL; residual, out: [rows, n]
 * in out's dtype (residual may be NULL or equal out). xq: int8 [padded rows, k] and
 * xs: float32 [padded rows, k / 32, 2] scratch (qlinear_padded_rows). Returns 0, or
 * -1 for a bad argument, -2 for a path this CPU cannot run, -3 when the AMX kernels
 * could not allocate their scratch (out is then incomplete). */
int qlinear(int path, const void *x, int64_t x_stride, int x_bf16, int64_t rows, int64_t k, const uint8_t *w,
            int64_t n, int kind, const float *bias, const void *residual, int64_t res_stride, void *out,
            int64_t out_stride, int out_bf16, int8_t *xq, float *xs) {
    return qlinear_run(path, x, x_stride, x_bf16, rows, k, w, n, kind, bias, residual, res_stride, out, out_stride,
                       out_bf16, xq, xs, 0);
}

/* SwiGLU in the epilogue: out [rows, n / 2] = silu(gate) * up, where gate and up are the first and
 * the second half of qlinear's output (w: gate_up, [gate; up] stacked, n rows; bias as qlinear's,
 * [n]). n must be a multiple of 32 (whole panels on both sides: qlinear.h) and residual NULL,
 * else -1 (the caller then runs qlinear and a separate silu_mul). Arguments and status otherwise
 * as qlinear; res_stride is ignored. */
int qlinear_swiglu(int path, const void *x, int64_t x_stride, int x_bf16, int64_t rows, int64_t k, const uint8_t *w,
                   int64_t n, int kind, const float *bias, const void *residual, int64_t res_stride, void *out,
                   int64_t out_stride, int out_bf16, int8_t *xq, float *xs) {
    if (n <= 0 || n % (2 * PANEL) || residual) return -1;
    return qlinear_run(path, x, x_stride, x_bf16, rows, k, w, n, kind, bias, NULL, res_stride, out, out_stride,
                       out_bf16, xq, xs, n / (2 * PANEL));
}

/* The same product with float activations (no int8 quantization): the weights
 * are dequantized in registers. AVX-512 on the avx512_vnni and amx_int8 paths,
 * portable C on the others; amx_int8 with bf16 x runs AMX-BF16 tiles where the
 * CPU has them (the caller picks avx512_vnni for few rows). xf: float32
 * [rows, k] scratch, used for bf16 x off the tiles only.
 * Returns as qlinear. */
static int qlinear_float_run(int path, const void *x, int64_t x_stride, int x_bf16, int64_t rows, int64_t k,
                             const uint8_t *w, int64_t n, int kind, const float *bias, const void *residual,
                             int64_t res_stride, void *out, int64_t out_stride, int out_bf16, float *xf,
                             int64_t pairs) {
    if (k % QB || kind < 0 || kind > 2 || path < 0 || path >= NPATHS || rows < 0) return -1;
    if (!(qlinear_paths() & (1 << path))) return -2;
#if defined(__x86_64__)
    static const fgemm_fn_bf amxbf[3] = {fgemm_amxbf_q4_0, fgemm_amxbf_q4_1, fgemm_amxbf_q8_0};
    if (path == PATH_AMX_INT8 && x_bf16 && amx_bf16_usable()) {
        return amxbf[kind](w, n, k, (const uint16_t *)x, x_stride, rows, bias, residual, res_stride, out,
                           out_stride, out_bf16, pairs);
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
        fn(w, n, k, xs, x_stride, rows, bias, residual, res_stride, out, out_stride, out_bf16, pairs);
    else
        fgemm_portable(w, kind, n, k, xs, x_stride, rows, bias, residual, res_stride, out, out_stride, out_bf16,
                       pairs);
    return 0;
}

int qlinear_float(int path, const void *x, int64_t x_stride, int x_bf16, int64_t rows, int64_t k, const uint8_t *w,
                  int64_t n, int kind, const float *bias, const void *residual, int64_t res_stride, void *out,
                  int64_t out_stride, int out_bf16, float *xf) {
    return qlinear_float_run(path, x, x_stride, x_bf16, rows, k, w, n, kind, bias, residual, res_stride, out,
                             out_stride, out_bf16, xf, 0);
}

/* qlinear_swiglu with float activations: as qlinear_float, with qlinear_swiglu's epilogue and rules. */
int qlinear_float_swiglu(int path, const void *x, int64_t x_stride, int x_bf16, int64_t rows, int64_t k,
                         const uint8_t *w, int64_t n, int kind, const float *bias, const void *residual,
                         int64_t res_stride, void *out, int64_t out_stride, int out_bf16, float *xf) {
    if (n <= 0 || n % (2 * PANEL) || residual) return -1;
    return qlinear_float_run(path, x, x_stride, x_bf16, rows, k, w, n, kind, bias, NULL, res_stride, out, out_stride,
                             out_bf16, xf, n / (2 * PANEL));
}
