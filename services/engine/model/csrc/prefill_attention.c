/* Causal attention of a fresh prefill chunk (nothing cached before it), read in place from the
 * fused qkv rows: the entry points, the choice of path and the threads.
 *
 * out[t, h] = sum_{s <= t} softmax_s(scale q[t, h] . k[s, g]) v[s, g], g = h / (heads / kv_heads)
 * (GQA: consecutive query heads share a KV head). qkv: [tokens, (heads + 2 kv_heads) * dim] bf16
 * with any row stride (q, then k, then v of each token); out: [tokens, heads * dim] bf16.
 *
 * Each KV head's K and V are first packed once into the scratch, in the layout the path's
 * products read (AMX: bf16 B tiles; the float paths: K transposed and V, float32), by all threads;
 * then the work items, (query head, block of 32 query rows), are shared out largest first
 * (the block at the end of the chunk attends to the most keys), so 2 threads end together.
 * Per item, the whole causal row of scores is kept (32 x tokens floats, 64 KB at 512 tokens)
 * and the softmax is exact over it: no running max or rescaled output as in a flash kernel,
 * which pays off only for rows that do not fit the caches.
 *
 * Paths (PA_*): AMX-BF16 tiles (prefill_attention_amx.c), AVX-512, AVX2 + FMA and portable C
 * (one body, prefill_attention_vec.c), each compiled for its instruction set by function target
 * attributes and chosen by the caller at run time. Built by prefill_attention.py. */
#include "prefill_attention.h"

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

/* AMX-BF16 tiles: cpuid's AMX-TILE and AMX-BF16 (and AVX512-BF16, the P rounding), and the
 * kernel's leave to use the tile state, asked once per process (it then holds for every thread). */
static int amx_usable(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 24 & 1) || !(d >> 22 & 1)) return 0;
    if (!__builtin_cpu_supports("avx512bf16")) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}
#endif

/* Which paths this CPU runs (bit i: path i). Asked once: cpuid traps to the hypervisor in a VM. */
int prefill_attention_paths(void) {
    static int known = -1; /* a benign race: every writer writes the same */
    if (known >= 0) return known;
    int paths = 1 << PA_PORTABLE;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) paths |= 1 << PA_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
        paths |= 1 << PA_AVX512;
#if defined(__linux__)
        if (amx_usable()) paths |= 1 << PA_AMX;
#endif
    }
#endif
    known = paths;
    return paths;
}

void pa_scratch_sizes(int path, int64_t tokens, int kv_heads, int dim, int64_t *shared, int64_t *each) {
    const int64_t keys = pa_round(tokens, 32);
    if (path == PA_AMX) {
        /* K and V as bf16 tiles; per thread scores (float), P (bf16), padded q, output, 1 / row sums */
        *shared = 2 * (int64_t)kv_heads * keys * dim * 2;
        *each = PA_QBLOCK * keys * 4 + PA_QBLOCK * keys * 2 + PA_QBLOCK * dim * 2 + PA_QBLOCK * dim * 4 + PA_QBLOCK * 4;
    } else {
        /* K transposed and V in float32; per thread scores of 8 rows and the item's scaled q */
        *shared = 2 * (int64_t)kv_heads * keys * dim * 4;
        *each = 8 * keys * 4 + PA_QBLOCK * dim * 4;
    }
    *each = pa_round(*each, PA_ALIGN);
    *shared = pa_round(*shared, PA_ALIGN);
}

/* Scratch bytes a call with that many threads needs (the caller's buffer, 64-byte aligned). */
int64_t prefill_attention_scratch_bytes(int path, int64_t tokens, int kv_heads, int dim, int threads) {
    int64_t shared, each;
    pa_scratch_sizes(path, tokens, kv_heads, dim, &shared, &each);
    return shared + (threads > 0 ? threads : 1) * each;
}

/* The threads a call runs on (OpenMP's count; the caller sizes the scratch for it). */
int prefill_attention_threads(void) { return omp_get_max_threads(); }

typedef void (*pack_fn)(const pa_args *, int, int64_t, int64_t);
typedef void (*item_fn)(const pa_args *, uint8_t *, int, int64_t);

/* Keys packed per task: a few tasks per KV head, so both threads pack. */
#define PA_PACK_KEYS 128

/* Attention of tokens rows of qkv into out (see the file's comment); scratch: scratch_bytes bytes,
 * 64-byte aligned (prefill_attention_scratch_bytes; fewer threads run when it holds fewer).
 * Returns 0, -1 for bad arguments, -2 for a path this CPU cannot run, -3 for a scratch too small
 * for one thread, -4 for a head dim the kernels do not take (a multiple of 32 up to 256). */
int prefill_attention_bf16(int path, const uint16_t *qkv, int64_t stride, int64_t tokens, int heads, int kv_heads,
                           int dim, float scale, uint16_t *out, int64_t out_stride, uint8_t *scratch,
                           int64_t scratch_bytes) {
    if (path < 0 || path >= PA_NPATHS || tokens < 0 || heads <= 0 || kv_heads <= 0 || heads % kv_heads) return -1;
    if (dim <= 0 || dim % 32 || dim > 256) return -4;
    if (stride < (int64_t)(heads + 2 * kv_heads) * dim || out_stride < (int64_t)heads * dim) return -1;
    if (stride > (1 << 26)) return -1; /* the AMX K packing gathers 16 rows by int32 byte offsets */
    if (!(prefill_attention_paths() & (1 << path))) return -2;
    if (tokens == 0) return 0;
    if (!qkv || !out || !scratch || (uintptr_t)scratch % PA_ALIGN) return -1;
    int64_t shared, each;
    pa_scratch_sizes(path, tokens, kv_heads, dim, &shared, &each);
    const int64_t fit = (scratch_bytes - shared) / each;
    if (fit < 1) return -3;
    static const pack_fn packs[PA_NPATHS] = {pa_pack_portable, pa_pack_avx2, pa_pack_avx512, pa_pack_amx};
    static const item_fn items[PA_NPATHS] = {pa_item_portable, pa_item_avx2, pa_item_avx512, pa_item_amx};
    const pack_fn pack = packs[path];
    const item_fn item = items[path];
    pa_args a = {qkv, stride, tokens, heads, kv_heads, dim, scale, out, out_stride, scratch, scratch + shared, each};
    const int64_t keys = pa_round(tokens, 32), pack_tasks = (keys + PA_PACK_KEYS - 1) / PA_PACK_KEYS;
    const int64_t blocks = (tokens + PA_QBLOCK - 1) / PA_QBLOCK, work = blocks * heads;
    int64_t threads = omp_get_max_threads();
    threads = threads < fit ? threads : fit;
    threads = threads < work ? threads : work;
#pragma omp parallel num_threads((int)threads)
    {
        uint8_t *priv = a.private + omp_get_thread_num() * each;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < kv_heads * pack_tasks; ++i) {
            const int64_t k0 = i % pack_tasks * PA_PACK_KEYS, k1 = k0 + PA_PACK_KEYS;
            pack(&a, (int)(i / pack_tasks), k0, k1 < keys ? k1 : keys);
        }
        /* The last query blocks attend to the most keys: handed out first, one at a time. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < work; ++i) item(&a, priv, (int)(i % heads), (blocks - 1 - i / heads) * PA_QBLOCK);
    }
    return 0;
}
