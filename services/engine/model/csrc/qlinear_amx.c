/* GGUF linears (qlinear.h): AMX int8 tiles, int8 activations. */
#include "qlinear.h"

#if defined(__x86_64__)

/* ---- AMX int8 ----------------------------------------------------------------
 * One TDPBxxD per 16 activation rows, panel and block: A = the 16 rows' 32 int8
 * activations of the block (row stride k), B = the panel's block as 8 rows of 64
 * bytes, row j holding 4 bytes of each of the 16 weight rows (columns 4j..4j+3).
 * That is the panel layout itself for Q8_0's chunks; Q4 nibbles are unpacked
 * once per panel (low nibbles of chunks 0-3, then the high ones: columns 0-15,
 * 16-31). C[t][n] is then token t's integer block sum for output row n, one zmm
 * per token with the lanes of the VNNI path, so the per-block epilogue is the
 * same. A block's scales differ per row and token, so sums cannot run on in the
 * tile across blocks: each block's C is stored and scaled into float sums.
 * That epilogue is the cost, so the tiles must never wait for it nor it for them:
 * up to 4 C tiles (64 activation rows) per block, stored to one of two buffers
 * while the previous block's are scaled (float sums in memory, 64 x 16).
 * Activations are signed: TDPBSUD (s8 x u8) for Q4_1, TDPBSSD for Q8_0 as
 * stored and for Q4_0 unpacked to u - 8, which leaves those two no minimum term.
 * Rows are padded to 16 by the caller (zero activations, zero scales). */


#define AMX_TILES 4

/* tmm0-3: C (16 x 16 int32), tmm4-5: A (16 rows x 32 bytes), tmm6-7: B (8 rows x 64 bytes). */
static inline TAMX void amx_configure(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; ++i) {
        cfg.rows[i] = i >= 6 ? 8 : 16;
        cfg.colsb[i] = i == 4 || i == 5 ? 32 : 64;
    }
    _tile_loadconfig(&cfg);
}

/* A panel's Q4 nibbles as TDP B operands: per block 8 rows of 64 bytes (see above). */
static inline TAMX void amx_unpack_q4(const uint8_t *wp, int kind, int64_t nb, uint8_t *buf) {
    const int64_t bstride = block_bytes(kind), qoff = quant_offset(kind);
    const __m512i low4 = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(kind == KIND_Q4_0 ? 8 : 0);
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *qs = wp + b * bstride + qoff;
        for (int c = 0; c < 4; ++c) {
            __m512i v = _mm512_loadu_si512(qs + 64 * c);
            __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            _mm512_store_si512(buf + b * 512 + 64 * c, _mm512_sub_epi8(lo, eight));
            _mm512_store_si512(buf + b * 512 + 256 + 64 * c, _mm512_sub_epi8(hi, eight));
        }
    }
}

/* C tile CT of block b for activation rows xt + 16 g (A tile AT, B tile BT): zeroed and multiplied. */
#define AMX_DP(CT, AT, BT, g)                                                                       \
    do {                                                                                           \
        _tile_zero(CT);                                                                            \
        _tile_loadd(AT, xt + (g) * AMX_ROWS * k + b * QB, k);                                      \
        if (KIND == KIND_Q4_1)                                                                     \
            _tile_dpbsud(CT, AT, BT);                                                              \
        else                                                                                       \
            _tile_dpbssd(CT, AT, BT);                                                              \
    } while (0)

/* Block b's products for `tiles` groups of 16 rows into cb[0..tiles) (B tile BT). */
#define AMX_ISSUE(BT)                                                                               \
    do {                                                                                           \
        _tile_loadd(BT, KIND == KIND_Q8_0 ? wp + b * bstride + qoff : buf + b * 512, 64);          \
        AMX_DP(0, 4, BT, 0);                                                                       \
        if (tiles > 1) AMX_DP(1, 5, BT, 1);                                                        \
        if (tiles > 2) AMX_DP(2, 4, BT, 2);                                                        \
        if (tiles > 3) AMX_DP(3, 5, BT, 3);                                                        \
        _tile_stored(0, cb[0], 64);                                                                \
        if (tiles > 1) _tile_stored(1, cb[1], 64);                                                 \
        if (tiles > 2) _tile_stored(2, cb[2], 64);                                                 \
        if (tiles > 3) _tile_stored(3, cb[3], 64);                                                 \
    } while (0)

static inline __attribute__((always_inline)) TAMX void amx_issue(const int KIND, const int8_t *xt, int64_t k,
                                                                 const uint8_t *wp, const uint8_t *buf, int64_t b,
                                                                 int tiles, int32_t (*cb)[256]) {
    const int64_t bstride = block_bytes(KIND), qoff = quant_offset(KIND);
    if (b & 1)
        AMX_ISSUE(7);
    else
        AMX_ISSUE(6);
}

/* sums[r] += C[r] * d * dx[r] (+ m * dx[r] * sum(qx[r]) for Q4_1) over the 16 rows of tile g. */
static inline __attribute__((always_inline)) TAMX void amx_epilogue(const int KIND, const int32_t *c, __m512 d,
                                                                    __m512 m, const float *xs, int64_t b, int64_t nb,
                                                                    int g, float *sums) {
    for (int i = 0; i < AMX_ROWS; ++i) {
        int r = g * AMX_ROWS + i;
        const float *sc = xs + (r * nb + b) * 2;
        __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(c + 16 * i));
        __m512 acc = _mm512_fmadd_ps(v, _mm512_mul_ps(d, _mm512_set1_ps(sc[0])), _mm512_load_ps(sums + 16 * r));
        if (KIND == KIND_Q4_1) acc = _mm512_fmadd_ps(m, _mm512_set1_ps(sc[1]), acc);
        _mm512_store_ps(sums + 16 * r, acc);
    }
}

/* Block b's epilogue interleaved with block b + 1's tiles (B tile BT): each tile's
 * store is issued one 16-row epilogue later than its product, so that neither the
 * tile unit nor the vector units wait on the other (a store right after its
 * TDP, or a whole block's epilogue between them, stalls the core). */
#define AMX_STEP(BT)                                                                                \
    do {                                                                                           \
        _tile_loadd(BT, KIND == KIND_Q8_0 ? wp + b * bstride + qoff : buf + b * 512, 64);          \
        AMX_DP(0, 4, BT, 0);                                                                       \
        if (tiles > 1) AMX_DP(1, 5, BT, 1);                                                        \
        amx_epilogue(KIND, prev[0], d, m, xs, b - 1, nb, 0, sums);                                 \
        _tile_stored(0, cb[0], 64);                                                                \
        if (tiles > 2) AMX_DP(2, 4, BT, 2);                                                        \
        if (tiles > 1) amx_epilogue(KIND, prev[1], d, m, xs, b - 1, nb, 1, sums);                  \
        if (tiles > 1) _tile_stored(1, cb[1], 64);                                                 \
        if (tiles > 3) AMX_DP(3, 5, BT, 3);                                                        \
        if (tiles > 2) amx_epilogue(KIND, prev[2], d, m, xs, b - 1, nb, 2, sums);                  \
        if (tiles > 2) _tile_stored(2, cb[2], 64);                                                 \
        if (tiles > 3) amx_epilogue(KIND, prev[3], d, m, xs, b - 1, nb, 3, sums);                  \
        if (tiles > 3) _tile_stored(3, cb[3], 64);                                                 \
    } while (0)

/* Block b's tiles into cb, and block b - 1's epilogue from prev (scales at blk_prev). */
static inline __attribute__((always_inline)) TAMX void amx_step(const int KIND, const int8_t *xt, int64_t k,
                                                                const uint8_t *wp, const uint8_t *buf, int64_t b,
                                                                int64_t nb, int tiles, int32_t (*cb)[256],
                                                                int32_t (*prev)[256], const float *xs,
                                                                float *sums) {
    const int64_t bstride = block_bytes(KIND), qoff = quant_offset(KIND);
    const uint8_t *blk = wp + (b - 1) * bstride;
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
    __m512 m = KIND == KIND_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)))
                                 : _mm512_setzero_ps();
    if (b & 1)
        AMX_STEP(7);
    else
        AMX_STEP(6);
}

/* The last block's epilogue, with no tiles to overlap. */
static inline __attribute__((always_inline)) TAMX void amx_last(const int KIND, const uint8_t *blk,
                                                                int32_t (*prev)[256], const float *xs, int64_t b,
                                                                int64_t nb, int tiles, float *sums) {
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
    __m512 m = KIND == KIND_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)))
                                 : _mm512_setzero_ps();
    for (int g = 0; g < tiles; ++g) amx_epilogue(KIND, prev[g], d, m, xs, b, nb, g, sums);
}

/* The float sums of activation rows xt.. (tiles groups of 16) by the panel at wp (its Q4 nibbles
 * unpacked in buf), into sums (16 per row). */
static inline __attribute__((always_inline)) TAMX void amx_panel_sums(const int KIND, const int8_t *xt, int64_t k,
                                                                      const uint8_t *wp, const uint8_t *buf,
                                                                      int64_t nb, int tiles, int32_t (*cbuf)[AMX_TILES][256],
                                                                      const float *st, float *sums) {
    const int64_t bstride = block_bytes(KIND);
    memset(sums, 0, sizeof(float) * 16 * AMX_ROWS * (size_t)tiles);
    amx_issue(KIND, xt, k, wp, buf, 0, tiles, cbuf[0]);
    for (int64_t b = 1; b < nb; ++b)
        amx_step(KIND, xt, k, wp, buf, b, nb, tiles, cbuf[b & 1], cbuf[(b - 1) & 1], st, sums);
    amx_last(KIND, wp + (nb - 1) * bstride, cbuf[(nb - 1) & 1], st, nb - 1, nb, tiles, sums);
}

/* One thread's share of the panels (or, with pairs, of the SwiGLU panel pairs: qlinear.h),
 * inside the caller's parallel region; inlined there so that KIND is a constant in the outlined
 * region (one per kind). */
static inline __attribute__((always_inline)) TAMX void amx_worker(const uint8_t *w, const int KIND, int64_t n,
                                                                  int64_t k, const int8_t *xq, const float *xs,
                                                                  int64_t rows, const float *bias,
                                                                  const void *residual, int64_t res_stride,
                                                                  void *out, int64_t out_stride, int out_bf16,
                                                                  int64_t pairs, int *failed) {
    const int64_t nb = k / QB, bstride = block_bytes(KIND), panels = pairs ? pairs : (n + PANEL - 1) / PANEL;
    const int64_t padded = (rows + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS, up_offset = pairs * nb * bstride;
    {
        amx_configure();
        /* The panel's unpacked nibbles, and the up panel's after them with pairs. */
        uint8_t *buf = KIND == KIND_Q8_0 ? NULL : (uint8_t *)aligned_alloc(64, (size_t)nb * 512 * (pairs ? 2 : 1));
        uint8_t *up_buf = buf ? buf + nb * 512 : NULL;
        /* Without its buffer a thread still takes its share of the loop (the omp for ends in a
         * barrier every thread must reach), computing nothing: the call fails as a whole. */
        const int usable = KIND == KIND_Q8_0 || buf;
        if (!usable) __atomic_store_n(failed, 1, __ATOMIC_RELAXED);
        int32_t cbuf[2][AMX_TILES][256] __attribute__((aligned(64)));
        float sums[AMX_TILES * AMX_ROWS * 16] __attribute__((aligned(64)));
        float gate[AMX_TILES * AMX_ROWS * 16] __attribute__((aligned(64))); /* with pairs: the gate's sums */
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; ++p) {
            if (!usable) continue;
            const uint8_t *wp = w + p * nb * bstride;
            int count = n - p * PANEL < PANEL ? (int)(n - p * PANEL) : PANEL;
            if (KIND != KIND_Q8_0) amx_unpack_q4(wp, KIND, nb, buf);
            if (KIND != KIND_Q8_0 && pairs) amx_unpack_q4(wp + up_offset, KIND, nb, up_buf);
            __asm__ volatile("" ::: "memory"); /* tileloadd's asm names no memory operand */
            for (int64_t t = 0; t < padded; t += AMX_TILES * AMX_ROWS) {
                int tiles = (int)((padded - t) / AMX_ROWS < AMX_TILES ? (padded - t) / AMX_ROWS : AMX_TILES);
                const int8_t *xt = xq + t * k;
                const float *st = xs + t * nb * 2;
                int live = rows - t < tiles * AMX_ROWS ? (int)(rows - t) : tiles * AMX_ROWS;
                amx_panel_sums(KIND, xt, k, wp, buf, nb, tiles, cbuf, st, pairs ? gate : sums);
                if (!pairs) {
                    for (int r = 0; r < live; ++r)
                        store512(_mm512_load_ps(sums + 16 * r), count, p * PANEL, bias, residual, t + r, res_stride,
                                 out, out_stride, out_bf16);
                    continue;
                }
                amx_panel_sums(KIND, xt, k, wp + up_offset, up_buf, nb, tiles, cbuf, st, sums);
                for (int r = 0; r < live; ++r)
                    swiglu_store512(swiglu_operand512(_mm512_load_ps(gate + 16 * r), bias, p * PANEL, out_bf16),
                                    swiglu_operand512(_mm512_load_ps(sums + 16 * r), bias, (p + pairs) * PANEL, out_bf16),
                                    p * PANEL, t + r, out, out_stride, out_bf16);
            }
        }
        free(buf);
        _tile_release();
    }
}

QL_INTERNAL TAMX int gemm_amx_q4_0(const uint8_t *w, int64_t n, int64_t k, const int8_t *xq, const float *xs,
                               int64_t rows, const float *bias, const void *residual, int64_t res_stride, void *out,
                               int64_t out_stride, int out_bf16, int64_t pairs) {
    int failed = 0;
#pragma omp parallel
    amx_worker(w, KIND_Q4_0, n, k, xq, xs, rows, bias, residual, res_stride, out, out_stride, out_bf16, pairs,
               &failed);
    return failed ? -3 : 0;
}
QL_INTERNAL TAMX int gemm_amx_q4_1(const uint8_t *w, int64_t n, int64_t k, const int8_t *xq, const float *xs,
                               int64_t rows, const float *bias, const void *residual, int64_t res_stride, void *out,
                               int64_t out_stride, int out_bf16, int64_t pairs) {
    int failed = 0;
#pragma omp parallel
    amx_worker(w, KIND_Q4_1, n, k, xq, xs, rows, bias, residual, res_stride, out, out_stride, out_bf16, pairs,
               &failed);
    return failed ? -3 : 0;
}
QL_INTERNAL TAMX int gemm_amx_q8_0(const uint8_t *w, int64_t n, int64_t k, const int8_t *xq, const float *xs,
                               int64_t rows, const float *bias, const void *residual, int64_t res_stride, void *out,
                               int64_t out_stride, int out_bf16, int64_t pairs) {
    int failed = 0;
#pragma omp parallel
    amx_worker(w, KIND_Q8_0, n, k, xq, xs, rows, bias, residual, res_stride, out, out_stride, out_bf16, pairs,
               &failed);
    return failed ? -3 : 0;
}

#endif /* __x86_64__ */
