/* GGUF linears (qlinear.h): the portable C kernels and the activation
 * quantization every path below AVX-512 uses (the AVX2 kernels: qlinear_avx2.c). */
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
