/* Fused bfloat16 element-wise steps of a decoder layer, on the CPU.
 *
 * In torch each of these is 3-12 small ops, and at the model sizes this
 * engine runs on the CPU their dispatch cost is a visible share of a decode
 * step. Rounding follows transformers where it rounds (after the normalisation,
 * before the weight); elsewhere values stay in float32 until stored.
 * Built together with paged_attention.c by services/engine/model/native.py.
 */
#include <math.h>
#include <stdint.h>

static inline float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)x << 16;
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* out[r] = weight * bf16(x[r] / rms(x[r])); x rows may be strided. */
void rms_norm_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *weight, uint16_t *out,
                   int64_t rows, int64_t dim, float eps) {
#pragma omp parallel for schedule(static) if (rows * dim >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t *xr = x + r * x_stride;
        uint16_t *o = out + r * dim;
        float sum = 0.f;
        for (int64_t d = 0; d < dim; ++d) {
            float v = bf16_to_f32(xr[d]);
            sum += v * v;
        }
        float inv = 1.f / sqrtf(sum / (float)dim + eps);
        for (int64_t d = 0; d < dim; ++d)
            o[d] = f32_to_bf16(bf16_to_f32(weight[d]) * round_bf16(bf16_to_f32(xr[d]) * inv));
    }
}

/* Rotate q and k in place inside the fused qkv rows ([T, (H + 2 KV) * D], half-split
 * rotation as in transformers' rotate_half), then store k and v at their slots in the
 * pool: K [num_blocks, KV, D, block_size], V [num_blocks, KV, block_size, D] (see
 * paged_attention.c). cos/sin: [max_positions, D / 2] float32. */
void rope_store_bf16(uint16_t *qkv, int64_t qkv_stride, const int64_t *positions, const float *cos_table,
                     const float *sin_table, const int64_t *slots, uint16_t *k_cache, uint16_t *v_cache,
                     int64_t tokens, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size) {
    int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (tokens >= 16)
    for (int64_t t = 0; t < tokens; ++t) {
        uint16_t *row = qkv + t * qkv_stride;
        const float *c = cos_table + positions[t] * half;
        const float *s = sin_table + positions[t] * half;
        for (int64_t h = 0; h < heads + kv_heads; ++h) {
            uint16_t *x = row + h * head_dim;
            for (int64_t d = 0; d < half; ++d) {
                float x1 = bf16_to_f32(x[d]), x2 = bf16_to_f32(x[d + half]);
                x[d] = f32_to_bf16(x1 * c[d] - x2 * s[d]);
                x[d + half] = f32_to_bf16(x2 * c[d] + x1 * s[d]);
            }
        }
        int64_t slot = slots[t];
        int64_t block = slot / block_size, offset = slot % block_size;
        for (int64_t h = 0; h < kv_heads; ++h) {
            const uint16_t *k = row + (heads + h) * head_dim;
            const uint16_t *v = row + (heads + kv_heads + h) * head_dim;
            uint16_t *kd = k_cache + (block * kv_heads + h) * head_dim * block_size + offset;
            uint16_t *vd = v_cache + ((block * kv_heads + h) * block_size + offset) * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) {
                kd[d * block_size] = k[d];
                vd[d] = v[d];
            }
        }
    }
}

/* out[r] = silu(gate) * up for rows [gate | up] of width 2 * inter. */
void silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t inter) {
#pragma omp parallel for schedule(static) if (rows * inter >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t *g = gate_up + r * 2 * inter;
        const uint16_t *u = g + inter;
        uint16_t *o = out + r * inter;
        for (int64_t d = 0; d < inter; ++d) {
            float x = bf16_to_f32(g[d]);
            o[d] = f32_to_bf16(x / (1.f + expf(-x)) * bf16_to_f32(u[d]));
        }
    }
}
