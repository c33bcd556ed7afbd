/* GGUF linears (qlinear.h): AMX-BF16 tiles, bf16 activations. */
#include "qlinear.h"

#if defined(__x86_64__)

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
 * one instruction for the mask and the conversion. The loop is bound by ports 0 and 5.
 * Tried for Q4 (Intel Xeon SPR): float vectors of 8 rows by a column pair (lanes 2i,
 * 2i + 1), whose cvtne2ps is a B row as it stands, from one vpermb per 8 rows (128
 * instead of 140 uops per block, 61 instead of 67 TSC cycles alone in L1): per call no
 * faster at 64 rows, 1-3% slower at 128, and it needs AVX512-VBMI. */
static inline __attribute__((always_inline)) TAMXBF void amxbf_dequantize(const uint8_t *wp, const int KIND,
                                                                          int64_t b, uint8_t *buf) {
    const int64_t bstride = block_bytes(KIND), qoff = quant_offset(KIND);
    const uint8_t *blk = wp + b * bstride, *qs = blk + qoff;
    __m512i *rows = (__m512i *)(buf + b * 1024);
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
    if (KIND == KIND_Q8_0) {
        /* Sixteen int8 by vpmovsxbd from memory (a load and one shuffle, where a slli + srai
         * pair per vector and a vpermw per B row were): lanes 4i + j = row 4q + i, column 4g + j.
         * Their cvtne2ps holds row r's pairs p = 0, 1 at dword 2r + p, for rows 0-7 (and 8-15);
         * one vpermt2d per B row gathers pair p. 18 vector uops per 64 quant bytes instead of
         * 22: 64 instead of 79 TSC cycles per block alone in L1; the LM head (49152 x 576) per
         * call 5-14% faster at 16 and 64 rows, within 1% at 128 (Intel Xeon SPR,
         * bench/qlinear_amxbf.py). */
        const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        __m512 dq[4];
        for (int q = 0; q < 4; ++q)
            dq[q] = _mm512_permutexvar_ps(_mm512_add_epi32(_mm512_srli_epi32(lane, 2), _mm512_set1_epi32(4 * q)), d);
        const __m512i even = _mm512_slli_epi32(lane, 1), odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        for (int g = 0; g < 8; ++g) {
            __m512 f[4];
            for (int q = 0; q < 4; ++q) {
                __m128i v = _mm_loadu_si128((const __m128i *)(qs + 64 * g + 16 * q));
                f[q] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), dq[q]);
            }
            __m512i lo = (__m512i)_mm512_cvtne2ps_pbh(f[1], f[0]), hi = (__m512i)_mm512_cvtne2ps_pbh(f[3], f[2]);
            _mm512_store_si512(rows + 2 * g, _mm512_permutex2var_epi32(lo, even, hi));
            _mm512_store_si512(rows + 2 * g + 1, _mm512_permutex2var_epi32(lo, odd, hi));
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

/* A SwiGLU operand (qlinear.h) as amxbf_store_row leaves it: + bias, bf16 by vcvtneps2bf16. */
static inline TAMXBF __m512 amxbf_operand(const float *c, const float *bias, int64_t col, int out_bf16) {
    __m512 v = _mm512_load_ps(c);
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + col));
    if (!out_bf16) return v;
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

/* A step's C tiles in memory, waiting for their epilogue: tile 2 g + q holds row group g
 * (rows t + 16 g.., live[g] of them) by panel q (columns col + 16 q.., count[q] of them).
 * SwiGLU (up_col >= 0): panel 0 is gate, panel 1 up (its bias at up_col), out columns col... */
typedef struct {
    const float *c;
    int64_t t, col, up_col;
    int live[2], count[2];
} amxbf_pending;

/* Epilogue rows [from, to) of the 64 a step has (tile u / 16, row u % 16). */
static inline __attribute__((always_inline)) TAMXBF void amxbf_epilogue(const amxbf_pending *pd, int from, int to,
                                                                        const float *bias, const void *residual,
                                                                        int64_t res_stride, void *out,
                                                                        int64_t out_stride, int out_bf16) {
    for (int u = from; u < to; ++u) {
        const int tile = u >> 4, r = u & 15, g = tile >> 1, q = tile & 1;
        if (pd->up_col >= 0) { /* SwiGLU: row r of gate tile 2 g with the same row of up tile 2 g + 1 */
            if (q == 0 && r < pd->live[g])
                swiglu_store512(amxbf_operand(pd->c + 256 * tile + 16 * r, bias, pd->col, out_bf16),
                                amxbf_operand(pd->c + 256 * (tile + 1) + 16 * r, bias, pd->up_col, out_bf16),
                                pd->col, pd->t + 16 * g + r, out, out_stride, out_bf16);
        } else if (r < pd->live[g] && pd->count[q] > 0)
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
                                                                      int64_t out_stride, int out_bf16, int64_t pairs,
                                                                      int *failed) {
    /* With pairs (SwiGLU, qlinear.h) the panels are taken in the order gate 0, up 0, gate 1, ..:
     * each pair of a step is a gate panel and its up panel (at() maps the order to the weights). */
    const int64_t nb = k / QB, bstride = block_bytes(KIND), panels = pairs ? 2 * pairs : (n + PANEL - 1) / PANEL;
    const int64_t groups = (rows + AMX_ROWS - 1) / AMX_ROWS, steps = (groups + 1) / 2;
    const size_t panel_bytes = (size_t)nb * 1024;
#define at(P) (w + ((pairs ? ((P) >> 1) + ((P) & 1) * pairs : (P)) * nb * bstride))
    /* Two pairs of dequantized panels (the current pair's tiles run while the next pair is
     * dequantized), then A packed: tile (g, b) at packed + 512 (g nb + b), rows past the end
     * zero. Each thread packs all of A for itself: a shared copy needs a barrier, which costs
     * a scheduler slice whenever another process holds one of the cores (the pipeline's). */
    uint8_t *bufs = amxbf_buffers(4 * panel_bytes + (size_t)groups * nb * 1024);
    if (!bufs) { /* no barrier follows in here: this thread's panels are simply not computed */
        __atomic_store_n(failed, 1, __ATOMIC_RELAXED);
        return;
    }
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
        for (int64_t b = 0; b < nb; ++b) amxbf_prefetch(at(p), KIND, b);
    for (int64_t p = first; p < last && p < first + 2; ++p)
        for (int64_t b = 0; b < nb; ++b)
            amxbf_dequantize(at(p), KIND, b, bufs + (p - first) * panel_bytes);
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
                        amxbf_dequantize(at(p + 2 + q), KIND, b, next + q * panel_bytes);
                    for (int64_t q = 0; q < later; ++q) amxbf_prefetch(at(p + 4 + q), KIND, b);
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
            pending.col = pairs ? p / 2 * PANEL : p * PANEL;
            pending.up_col = pairs ? (p / 2 + pairs) * PANEL : -1;
            pending.live[0] = rows - t < AMX_ROWS ? (int)(rows - t) : AMX_ROWS;
            pending.live[1] = !two_rows ? 0 : rows - t - AMX_ROWS < AMX_ROWS ? (int)(rows - t - AMX_ROWS) : AMX_ROWS;
            pending.count[0] = n - p * PANEL < PANEL ? (int)(n - p * PANEL) : PANEL;
            pending.count[1] = !two_panels ? 0 : n - (p + 1) * PANEL < PANEL ? (int)(n - (p + 1) * PANEL) : PANEL;
        }
    }
    if (pending.c) amxbf_epilogue(&pending, 0, 64, bias, residual, res_stride, out, out_stride, out_bf16);
    _tile_release();
#undef at
}

#define FGEMM_AMXBF(NAME, KIND_) \
    QL_INTERNAL TAMXBF int NAME(const uint8_t *w, int64_t n, int64_t k, const uint16_t *x, int64_t x_stride, \
                                int64_t rows, const float *bias, const void *residual, int64_t res_stride, void *out, \
                                int64_t out_stride, int out_bf16, int64_t pairs) { \
        int failed = 0; \
        _Pragma("omp parallel") amxbf_worker(w, KIND_, n, k, x, x_stride, rows, bias, residual, res_stride, out, \
                                             out_stride, out_bf16, pairs, &failed); \
        return failed ? -3 : 0; \
    }
FGEMM_AMXBF(fgemm_amxbf_q4_0, KIND_Q4_0)
FGEMM_AMXBF(fgemm_amxbf_q4_1, KIND_Q4_1)
FGEMM_AMXBF(fgemm_amxbf_q8_0, KIND_Q8_0)

#endif /* __x86_64__ */
