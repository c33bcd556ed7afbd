/* Paged attention for decode steps (one query token per sequence), on the CPU.
 *
 * Reads each sequence's K/V straight out of the block pool, so the pool is
 * read once per step instead of being gathered into a padded copy first.
 * Work items are (sequence, KV head) pairs, shared out by OpenMP; within one,
 * the query heads of that KV head (the GQA group) are handled together so
 * every K/V row is loaded once for all of them.
 *
 * Pool layout per layer: [num_blocks, num_kv_heads, block_size, head_dim].
 * Built by services/engine/model/native.py; plain C so that it compiles in a
 * second without torch headers, and is called through ctypes.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256

static inline float bf16_load(uint16_t x) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)x << 16;
    return v.f;
}

static inline uint16_t bf16_store(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    /* round to nearest even */
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

static inline float f32_load(float x) { return x; }
static inline float f32_store(float f) { return f; }

/* One (sequence, KV head) item; D is a compile-time constant in the common
 * cases so the row loops unroll into a few vector instructions. */
#define DEFINE_ITEM(NAME, T, LOAD, STORE)                                                        \
    static inline __attribute__((always_inline)) void NAME(                                     \
        const T *q, int64_t q_head_stride, const T *k_cache, const T *v_cache,                  \
        const int64_t *table, int64_t ctx, T *out, int64_t group, int64_t kv_head,              \
        int64_t num_kv_heads, int64_t block_size, const int64_t D, float scale, float *scores,  \
        int64_t scores_stride) {                                                                 \
        float qf[MAX_GROUP][MAX_HEAD_DIM];                                                        \
        float row[MAX_HEAD_DIM];                                                                  \
        float acc[MAX_GROUP][MAX_HEAD_DIM];                                                       \
        float mx[MAX_GROUP], inv[MAX_GROUP];                                                      \
        for (int64_t g = 0; g < group; ++g) {                                                     \
            const T *qr = q + (kv_head * group + g) * q_head_stride;                              \
            for (int64_t d = 0; d < D; ++d) qf[g][d] = LOAD(qr[d]) * scale;                       \
            mx[g] = -FLT_MAX;                                                                     \
        }                                                                                         \
        for (int64_t start = 0; start < ctx; start += block_size) {                               \
            int64_t n = ctx - start < block_size ? ctx - start : block_size;                      \
            const T *kb = k_cache + ((table[start / block_size] * num_kv_heads + kv_head) * block_size) * D; \
            for (int64_t j = 0; j < n; ++j) {                                                     \
                for (int64_t d = 0; d < D; ++d) row[d] = LOAD(kb[j * D + d]);                     \
                for (int64_t g = 0; g < group; ++g) {                                             \
                    float s = 0.f;                                                                \
                    for (int64_t d = 0; d < D; ++d) s += qf[g][d] * row[d];                       \
                    scores[g * scores_stride + start + j] = s;                                    \
                    mx[g] = s > mx[g] ? s : mx[g];                                                \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        for (int64_t g = 0; g < group; ++g) {                                                     \
            float *sg = scores + g * scores_stride;                                               \
            float m = mx[g], sum = 0.f;                                                           \
            for (int64_t l = 0; l < ctx; ++l) {                                                   \
                float e = expf(sg[l] - m);                                                        \
                sg[l] = e;                                                                        \
                sum += e;                                                                         \
            }                                                                                     \
            inv[g] = 1.f / sum;                                                                   \
            for (int64_t d = 0; d < D; ++d) acc[g][d] = 0.f;                                      \
        }                                                                                         \
        for (int64_t start = 0; start < ctx; start += block_size) {                               \
            int64_t n = ctx - start < block_size ? ctx - start : block_size;                      \
            const T *vb = v_cache + ((table[start / block_size] * num_kv_heads + kv_head) * block_size) * D; \
            for (int64_t j = 0; j < n; ++j) {                                                     \
                for (int64_t d = 0; d < D; ++d) row[d] = LOAD(vb[j * D + d]);                     \
                for (int64_t g = 0; g < group; ++g) {                                             \
                    float p = scores[g * scores_stride + start + j];                              \
                    for (int64_t d = 0; d < D; ++d) acc[g][d] += p * row[d];                      \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        for (int64_t g = 0; g < group; ++g) {                                                     \
            T *o = out + (kv_head * group + g) * D;                                               \
            for (int64_t d = 0; d < D; ++d) o[d] = STORE(acc[g][d] * inv[g]);                     \
        }                                                                                         \
    }

#define DEFINE_KERNEL(NAME, ITEM, T)                                                             \
    int NAME(const T *q, int64_t q_seq_stride, int64_t q_head_stride, const T *k_cache,         \
             const T *v_cache, const int64_t *block_tables, int64_t max_blocks,                  \
             const int64_t *context_lens, T *out, int64_t num_seqs, int64_t num_heads,           \
             int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale) {          \
        int64_t group = num_heads / num_kv_heads;                                                \
        if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM) return 1;                               \
        int64_t stride = max_blocks * block_size;                                                \
        int failed = 0;                                                                          \
        _Pragma("omp parallel")                                                                  \
        {                                                                                        \
            float *scores = malloc(sizeof(float) * group * stride);                              \
            if (!scores) {                                                                       \
                _Pragma("omp atomic write") failed = 1;                                          \
            }                                                                                    \
            _Pragma("omp for schedule(static)")                                                  \
            for (int64_t item = 0; item < num_seqs * num_kv_heads; ++item) {                     \
                if (!scores) continue;                                                           \
                int64_t b = item / num_kv_heads, h = item % num_kv_heads;                        \
                const T *qb = q + b * q_seq_stride;                                              \
                const int64_t *table = block_tables + b * max_blocks;                            \
                T *ob = out + b * num_heads * head_dim;                                          \
                if (head_dim == 64)                                                              \
                    ITEM(qb, q_head_stride, k_cache, v_cache, table, context_lens[b], ob, group, h, \
                         num_kv_heads, block_size, 64, scale, scores, stride);                   \
                else if (head_dim == 128)                                                        \
                    ITEM(qb, q_head_stride, k_cache, v_cache, table, context_lens[b], ob, group, h, \
                         num_kv_heads, block_size, 128, scale, scores, stride);                  \
                else                                                                             \
                    ITEM(qb, q_head_stride, k_cache, v_cache, table, context_lens[b], ob, group, h, \
                         num_kv_heads, block_size, head_dim, scale, scores, stride);             \
            }                                                                                    \
            free(scores);                                                                        \
        }                                                                                        \
        return failed ? 2 : 0;                                                                   \
    }

DEFINE_ITEM(item_f32, float, f32_load, f32_store)
DEFINE_ITEM(item_bf16, uint16_t, bf16_load, bf16_store)
DEFINE_KERNEL(paged_decode_attention_f32, item_f32, float)
DEFINE_KERNEL(paged_decode_attention_bf16, item_bf16, uint16_t)
