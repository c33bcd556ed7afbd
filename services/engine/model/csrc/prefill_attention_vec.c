/* Prefill attention (prefill_attention.c) in float32 vectors: the AVX-512, AVX2 + FMA and
 * portable paths, one always-inlined body each compiled for its instruction set by the target
 * attribute of its wrapper. bf16 is widened by shifts, so no path needs bf16 instructions.
 *
 * Scratch (shared): per KV head, K transposed, [dim][keys] float, so that 16 consecutive keys'
 * scores are one vector FMA per dim against a broadcast q element; then V, [keys][dim] float.
 * Per thread: the item's q rows widened and times the scale ([32][dim]), then the scores of
 * ROWS rows ([ROWS][keys]), overwritten by their exp. */
#include "prefill_attention.h"

static inline __attribute__((always_inline)) float *kt_of(const pa_args *a, int g) {
    return (float *)a->shared + (int64_t)g * pa_round(a->tokens, 32) * a->dim;
}

static inline __attribute__((always_inline)) float *v_of(const pa_args *a, int g) {
    return kt_of(a, a->kv_heads) + (int64_t)g * pa_round(a->tokens, 32) * a->dim;
}

static inline __attribute__((always_inline)) void pack_body(const pa_args *a, int g, int64_t k0, int64_t k1) {
    const int dim = a->dim;
    const int64_t keys = pa_round(a->tokens, 32);
    float *kt = kt_of(a, g), *v = v_of(a, g);
    for (int64_t k = k0; k < k1; ++k) {
        if (k >= a->tokens) {
            for (int d = 0; d < dim; ++d) kt[d * keys + k] = 0.f;
            memset(v + k * dim, 0, sizeof(float) * (size_t)dim);
            continue;
        }
        const uint16_t *row = a->qkv + k * a->stride + (int64_t)(a->heads + g) * dim;
        for (int d = 0; d < dim; d += 16) {
            pa_vf x = pa_widen(row + d);
            for (int i = 0; i < 16; ++i) kt[(d + i) * keys + k] = x[i];
            pa_store(v + k * dim + d, pa_widen(row + (int64_t)a->kv_heads * dim + d));
        }
    }
}

/* Scores of rows r0.. (ROWS of them, of the item's scaled q) against keys [0, nk), nk % 16 == 0. */
static inline __attribute__((always_inline)) void scores(const pa_args *a, const float *q, const float *kt,
                                                         float *s, int64_t nk, const int ROWS) {
    const int dim = a->dim;
    const int64_t keys = pa_round(a->tokens, 32);
    for (int64_t kc = 0; kc < nk; kc += 16) {
        pa_vf acc[8];
        for (int i = 0; i < ROWS; ++i) acc[i] = pa_splat(0.f);
        for (int d = 0; d < dim; ++d) {
            const pa_vf k = pa_load(kt + d * keys + kc);
            for (int i = 0; i < ROWS; ++i) acc[i] += q[i * dim + d] * k;
        }
        for (int i = 0; i < ROWS; ++i) pa_store(s + i * keys + kc, acc[i]);
    }
}

/* out rows of PROWS consecutive query rows: sum_k p[i][k] v[k] / sums[i] over keys [0, nk),
 * 32 dims at a time (PROWS x 2 vectors of accumulators). */
static inline __attribute__((always_inline)) void weigh(const pa_args *a, const float *p, const float *v,
                                                        const float *inv, int64_t nk, int64_t t, int live,
                                                        uint16_t *out, const int PROWS) {
    const int dim = a->dim;
    const int64_t keys = pa_round(a->tokens, 32);
    for (int d = 0; d < dim; d += 32) {
        pa_vf acc[4][2];
        for (int i = 0; i < PROWS; ++i) acc[i][0] = acc[i][1] = pa_splat(0.f);
        for (int64_t k = 0; k < nk; ++k) {
            const pa_vf v0 = pa_load(v + k * dim + d), v1 = pa_load(v + k * dim + d + 16);
            for (int i = 0; i < PROWS; ++i) {
                const float w = p[i * keys + k];
                acc[i][0] += w * v0;
                acc[i][1] += w * v1;
            }
        }
        for (int i = 0; i < PROWS && i < live; ++i) {
            uint16_t *o = out + (t + i) * a->out_stride + d;
            pa_store_bf16(o, acc[i][0] * inv[i], 16);
            pa_store_bf16(o + 16, acc[i][1] * inv[i], 16);
        }
    }
}

/* ROWS: query rows whose scores are computed together; PROWS: rows weighed together (ROWS % PROWS
 * == 0). Both sized to the path's registers (AVX2: 16 ymm; a float vector here is two of them). */
static inline __attribute__((always_inline)) void item_body(const pa_args *a, uint8_t *priv, int head, int64_t q0,
                                                            const int ROWS, const int PROWS) {
    const int dim = a->dim, g = head / (a->heads / a->kv_heads);
    const int64_t keys = pa_round(a->tokens, 32);
    const int64_t rows = a->tokens - q0 < PA_QBLOCK ? a->tokens - q0 : PA_QBLOCK;
    float *q = (float *)priv, *s = q + PA_QBLOCK * dim;
    const float *kt = kt_of(a, g), *v = v_of(a, g);
    for (int64_t r = 0; r < pa_round(rows, ROWS); ++r) {
        if (r >= rows) {
            memset(q + r * dim, 0, sizeof(float) * (size_t)dim);
            continue;
        }
        const uint16_t *row = a->qkv + (q0 + r) * a->stride + (int64_t)head * dim;
        for (int d = 0; d < dim; d += 16) pa_store(q + r * dim + d, pa_widen(row + d) * a->scale);
    }
    for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
        /* Keys the group's last query row sees, in whole vectors (zero K past the tokens). */
        const int64_t t0 = q0 + r0, seen = t0 + ROWS < a->tokens ? t0 + ROWS : a->tokens;
        const int64_t nk = pa_round(seen, 16);
        scores(a, q + r0 * dim, kt, s, nk, ROWS);
        float inv[8];
        for (int i = 0; i < ROWS; ++i) {
            float *row = s + i * keys;
            const int64_t valid = t0 + i + 1 < seen ? t0 + i + 1 : seen; /* past the tokens: a dummy */
            const float m = pa_softmax_max(row, valid);
            pa_vf sum = pa_splat(0.f);
            for (int64_t k = 0; k < nk; k += 16) {
                pa_vf e = pa_exp(pa_load(row + k) - m);
                if (k + 16 > valid) e = pa_select(pa_live((int)(valid > k ? valid - k : 0)), e, pa_splat(0.f));
                sum += e;
                pa_store(row + k, e);
            }
            inv[i] = 1.f / pa_hsum(sum);
        }
        for (int i = 0; i < ROWS && r0 + i < rows; i += PROWS) {
            const int64_t last = t0 + i + PROWS < seen ? t0 + i + PROWS : seen;
            weigh(a, s + i * keys, v, inv + i, last, t0 + i, (int)(rows - r0 - i), a->out + (int64_t)head * dim,
                  PROWS);
        }
    }
}

void pa_pack_portable(const pa_args *a, int g, int64_t k0, int64_t k1) { pack_body(a, g, k0, k1); }
void pa_item_portable(const pa_args *a, uint8_t *priv, int head, int64_t q0) { item_body(a, priv, head, q0, 4, 2); }

#if defined(__x86_64__)
#define T256 __attribute__((target("avx2,fma")))
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
T256 void pa_pack_avx2(const pa_args *a, int g, int64_t k0, int64_t k1) { pack_body(a, g, k0, k1); }
T256 void pa_item_avx2(const pa_args *a, uint8_t *priv, int head, int64_t q0) { item_body(a, priv, head, q0, 4, 2); }
T512 void pa_pack_avx512(const pa_args *a, int g, int64_t k0, int64_t k1) { pack_body(a, g, k0, k1); }
T512 void pa_item_avx512(const pa_args *a, uint8_t *priv, int head, int64_t q0) {
    item_body(a, priv, head, q0, 8, 4);
}
#else
/* Only the portable path runs off x86 (prefill_attention_paths); the table still names these. */
void pa_pack_avx2(const pa_args *a, int g, int64_t k0, int64_t k1) { pack_body(a, g, k0, k1); }
void pa_item_avx2(const pa_args *a, uint8_t *priv, int head, int64_t q0) { item_body(a, priv, head, q0, 4, 2); }
void pa_pack_avx512(const pa_args *a, int g, int64_t k0, int64_t k1) { pack_body(a, g, k0, k1); }
void pa_item_avx512(const pa_args *a, uint8_t *priv, int head, int64_t q0) { item_body(a, priv, head, q0, 4, 2); }
void pa_pack_amx(const pa_args *a, int g, int64_t k0, int64_t k1) { pack_body(a, g, k0, k1); }
void pa_item_amx(const pa_args *a, uint8_t *priv, int head, int64_t q0) { item_body(a, priv, head, q0, 4, 2); }
#endif
