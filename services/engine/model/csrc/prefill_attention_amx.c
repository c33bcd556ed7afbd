/* Prefill attention (prefill_attention.c) on AMX-BF16 tiles (TDPBF16PS): the scores and the
 * weighted sum of V are tile products in float32, the softmax between them AVX-512 in float32.
 *
 * An item is 32 query rows (two 16-row A tiles, read in place from qkv: a tile load takes any
 * row stride) of one head. Its scores S = q K^T, 32 keys at a time: C tiles 0-3 = (row group,
 * 16 keys), each A tile used for two key groups and each K tile for two row groups, as
 * qlinear_amxbf.c's 2 x 2 blocking. Then P = exp(scale (S - row max)) rounded to bf16, which is
 * the A operand of O = P V, 32 dims at a time (C tiles: row group x 16 dims), over the keys.
 *
 * Packed per KV head into the scratch, once per call (1 KB tiles: 16 rows of 64 bytes):
 * K as B tiles of S, block (16 keys, 32 dims): row j holds dims (2j, 2j + 1) of each of the 16
 * keys; V as B tiles of O, block (32 keys, 16 dims): row j holds keys (2j, 2j + 1) of each dim.
 * Keys past the tokens are zero; the causal mask hides them, as it hides every key after a row's
 * own position. Per thread: S [32][keys] float, P [32][keys] bf16, q rows zero padded where the
 * chunk ends inside a tile ([32][dim] bf16), O [32][dim] float, 1 / row sums [32]. */
#include "prefill_attention.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define TAMXBF __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")))

typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) pa_tile_config;

static inline uint16_t *k_tiles(const pa_args *a, int g) {
    return (uint16_t *)a->shared + (int64_t)g * pa_round(a->tokens, 32) * a->dim;
}

static inline uint16_t *v_tiles(const pa_args *a, int g) {
    return k_tiles(a, a->kv_heads) + (int64_t)g * pa_round(a->tokens, 32) * a->dim;
}

/* Lanes below n live (n clamped to 0..16). */
static inline __attribute__((always_inline)) TAMXBF __mmask16 live16(int64_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : n > 0 ? (__mmask16)((1u << n) - 1) : 0;
}

TAMXBF void pa_pack_amx(const pa_args *a, int g, int64_t k0, int64_t k1) {
    const int dim = a->dim, chunks = dim / 32;
    const int64_t tokens = a->tokens;
    const uint16_t *k_rows = a->qkv + (int64_t)(a->heads + g) * dim, *v_rows = k_rows + (int64_t)a->kv_heads * dim;
    uint16_t *kp = k_tiles(a, g), *vp = v_tiles(a, g);
    /* K: block (key group b, dim chunk c) at (b * chunks + c) KB; row j, column n = key n's dim pair j:
     * one gather of 16 keys' pair j per row (masked past the tokens). */
    const __m512i offsets = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32((int)(a->stride * 2)));
    for (int64_t b = k0 / 16; b < k1 / 16; ++b) {
        const __mmask16 live = live16(tokens - b * 16);
        const uint16_t *base = k_rows + b * 16 * a->stride;
        for (int c = 0; c < chunks; ++c) {
            __m512i *dst = (__m512i *)(kp + (b * chunks + c) * 512);
            for (int j = 0; j < 16; ++j)
                _mm512_store_si512(dst + j, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offsets,
                                                                        base + c * 32 + 2 * j, 1));
        }
    }
    /* V: block (key group b of 32, dim group e of 16) at (b * dim / 16 + e) KB; row j interleaves
     * keys 2j and 2j + 1 element by element. */
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t b = k0 / 32; b < k1 / 32; ++b)
        for (int e = 0; e < dim / 16; ++e) {
            __m512i *dst = (__m512i *)(vp + (b * (dim / 16) + e) * 512);
            for (int j = 0; j < 16; ++j) {
                const int64_t key = b * 32 + 2 * j;
                __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
                if (key < tokens) lo = _mm256_loadu_si256((const __m256i *)(v_rows + key * a->stride + e * 16));
                if (key + 1 < tokens) hi = _mm256_loadu_si256((const __m256i *)(v_rows + (key + 1) * a->stride + e * 16));
                __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                _mm512_store_si512(dst + j, _mm512_permutexvar_epi16(interleave, both));
            }
        }
}

static inline TAMXBF void configure(void) {
    pa_tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; ++i) {
        cfg.rows[i] = 16;
        cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* exp(x) for finite x <= 0: 2^n by vscalefps (which underflows to 0 itself), exp of the remainder
 * |r| <= ln2 / 2 by a degree-5 polynomial (relative error ~2e-6, far below P's bf16 rounding).
 * 10 vector uops, against 15 for the integer-exponent pa_exp of the float paths. */
static inline __attribute__((always_inline)) TAMXBF __m512 exp512(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.f / 120), r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* Reductions of 16 vectors at once into one (lane r: the max or sum of v[r]): four levels of halving,
 * each combining pairs of vectors by two permutes and one op, 15 combines for 16 rows where a
 * reduction per row is 4 dependent shuffle + op steps each, then a scalar broadcast. In level L
 * each vector holds 2^(L-1) rows' partial sums, each in 16 >> (L-1) consecutive lanes. */
static inline __attribute__((always_inline)) TAMXBF __m512 reduce16(__m512 *v, int op_max) {
    for (int len = 16, count = 16; len > 1; len /= 2, count /= 2) {
        int lo[16], hi[16];
        const int half = len / 2, segments = 16 / len;
        for (int p = 0; p < 16; ++p) {
            const int seg = p / half, within = p % half;
            const int src = seg < segments ? seg * len + within : (seg - segments) * len + within + 16;
            lo[p] = src;
            hi[p] = src + half;
        }
        const __m512i ilo = _mm512_loadu_si512(lo), ihi = _mm512_loadu_si512(hi);
        for (int i = 0; i < count / 2; ++i) {
            __m512 a = _mm512_permutex2var_ps(v[2 * i], ilo, v[2 * i + 1]);
            __m512 b = _mm512_permutex2var_ps(v[2 * i], ihi, v[2 * i + 1]);
            v[i] = op_max ? _mm512_max_ps(a, b) : _mm512_add_ps(a, b);
        }
    }
    return v[0];
}

/* The softmax of 16 score rows (row r: s + r * ld, the first valid[r] keys live, valid[r] >= 1; rows
 * at or past live: padding) over keys [0, nk): P = exp(scale (s - row max)) rounded to bf16 over the
 * live keys, zero after (whole vectors past them stored as zeros, not computed); inv[r] = 1 / the sum
 * of row r's unrounded exps. */
static inline __attribute__((always_inline)) TAMXBF void softmax16(const float *s, uint16_t *p, int64_t ld,
                                                                   int64_t first, int live, int64_t nk, float scale,
                                                                   float *inv) {
    __m512 acc[16];
    float maxima[16];
    for (int r = 0; r < 16; ++r) {
        const float *row = s + r * ld;
        const int64_t valid = r < live ? first + r + 1 : 0;
        __m512 m = _mm512_set1_ps(-__builtin_inff());
        int64_t k = 0;
        for (; k + 16 <= valid; k += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(row + k));
        if (k < valid) m = _mm512_mask_max_ps(m, live16(valid - k), m, _mm512_loadu_ps(row + k));
        acc[r] = r < live ? m : _mm512_setzero_ps();
    }
    _mm512_storeu_ps(maxima, _mm512_mul_ps(reduce16(acc, 1), _mm512_set1_ps(scale)));
    const __m512 vs = _mm512_set1_ps(scale);
    for (int r = 0; r < 16; ++r) {
        const float *row = s + r * ld;
        uint16_t *prow = p + r * ld;
        const int64_t valid = r < live ? first + r + 1 : 0;
        const __m512 vm = _mm512_set1_ps(maxima[r]);
        __m512 sum0 = _mm512_setzero_ps(), sum1 = sum0;
        int64_t k = 0;
        for (; k + 32 <= valid; k += 32) {
            __m512 e0 = exp512(_mm512_fmsub_ps(_mm512_loadu_ps(row + k), vs, vm));
            __m512 e1 = exp512(_mm512_fmsub_ps(_mm512_loadu_ps(row + k + 16), vs, vm));
            sum0 = _mm512_add_ps(sum0, e0);
            sum1 = _mm512_add_ps(sum1, e1);
            _mm512_storeu_si512(prow + k, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
        }
        if (k < valid) {
            __m512 e0 = _mm512_maskz_mov_ps(live16(valid - k), exp512(_mm512_fmsub_ps(_mm512_loadu_ps(row + k), vs, vm)));
            __m512 e1 = _mm512_maskz_mov_ps(live16(valid - k - 16),
                                            exp512(_mm512_fmsub_ps(_mm512_loadu_ps(row + k + 16), vs, vm)));
            sum0 = _mm512_add_ps(sum0, e0);
            sum1 = _mm512_add_ps(sum1, e1);
            _mm512_storeu_si512(prow + k, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
            k += 32;
        }
        for (; k < nk; k += 32) _mm512_storeu_si512(prow + k, _mm512_setzero_si512());
        acc[r] = r < live ? _mm512_add_ps(sum0, sum1) : _mm512_set1_ps(1.f);
    }
    _mm512_storeu_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.f), reduce16(acc, 0)));
}

TAMXBF void pa_item_amx(const pa_args *a, uint8_t *priv, int head, int64_t q0) {
    const int dim = a->dim, chunks = dim / 32, g = head / (a->heads / a->kv_heads);
    const int64_t tokens = a->tokens, keys = pa_round(tokens, 32);
    const int64_t rows = tokens - q0 < PA_QBLOCK ? tokens - q0 : PA_QBLOCK;
    const int groups = rows > 16 ? 2 : 1;
    float *s = (float *)priv;
    uint16_t *p = (uint16_t *)(s + PA_QBLOCK * keys), *qpad = p + PA_QBLOCK * keys;
    float *o = (float *)(qpad + PA_QBLOCK * dim), *inv = o + PA_QBLOCK * dim;
    const uint16_t *kp = k_tiles(a, g), *vp = v_tiles(a, g);
    /* q in place unless the chunk ends inside a tile: a tile load would read rows past it. */
    const uint16_t *q = a->qkv + q0 * a->stride + (int64_t)head * dim;
    int64_t qld = a->stride * 2;
    if (q0 + 16 * groups > tokens) {
        memset(qpad, 0, (size_t)(16 * groups * dim * 2));
        for (int64_t r = 0; r < rows; ++r) memcpy(qpad + r * dim, q + r * a->stride, (size_t)dim * 2);
        q = qpad;
        qld = dim * 2;
    }
    const int64_t nk = pa_round(q0 + rows, 32); /* keys the last row sees, whole tiles (<= keys) */
    const int64_t sld = keys * 4, pld = keys * 2;
    configure();
    for (int64_t kc = 0; kc < nk; kc += 32) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int c = 0; c < chunks; ++c) {
            _tile_loadd(4, q + c * 32, qld);
            _tile_loadd(6, kp + ((kc / 16) * chunks + c) * 512, 64);
            _tile_loadd(7, kp + ((kc / 16 + 1) * chunks + c) * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            if (groups == 2) {
                _tile_loadd(5, (const char *)q + 16 * qld + c * 64, qld);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
        _tile_stored(0, s + kc, sld);
        _tile_stored(1, s + kc + 16, sld);
        if (groups == 2) {
            _tile_stored(2, s + 16 * keys + kc, sld);
            _tile_stored(3, s + 16 * keys + kc + 16, sld);
        }
    }
    for (int grp = 0; grp < groups; ++grp)
        softmax16(s + 16 * grp * keys, p + 16 * grp * keys, keys, q0 + 16 * grp, (int)(rows - 16 * grp), nk, a->scale,
                  inv + 16 * grp);
    for (int e = 0; e < dim / 16; e += 2) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kc = 0; kc < nk; kc += 32) {
            _tile_loadd(4, p + kc, pld);
            _tile_loadd(6, vp + ((kc / 32) * (dim / 16) + e) * 512, 64);
            _tile_loadd(7, vp + ((kc / 32) * (dim / 16) + e + 1) * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            if (groups == 2) {
                _tile_loadd(5, p + 16 * keys + kc, pld);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
        _tile_stored(0, o + e * 16, dim * 4);
        _tile_stored(1, o + e * 16 + 16, dim * 4);
        if (groups == 2) {
            _tile_stored(2, o + 16 * dim + e * 16, dim * 4);
            _tile_stored(3, o + 16 * dim + e * 16 + 16, dim * 4);
        }
    }
    _tile_release();
    for (int64_t r = 0; r < rows; ++r) {
        uint16_t *dst = a->out + (q0 + r) * a->out_stride + (int64_t)head * dim;
        const __m512 scale = _mm512_set1_ps(inv[r]);
        for (int d = 0; d < dim; d += 16) {
            __m512 v = _mm512_mul_ps(_mm512_loadu_ps(o + r * dim + d), scale);
            _mm256_storeu_si256((__m256i *)(dst + d), (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}
#endif
