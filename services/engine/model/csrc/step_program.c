/* A decode step's layer loop as one native call (services/engine/model/step_program.py).
 *
 * At a few rows a decode step is ~7 kernel calls per layer (RMSNorm, qkv, RoPE + KV store +
 * attention, o, RMSNorm, SwiGLU gate_up, down), each doing microseconds of work, and each call
 * through ctypes costs ~5 us of Python and argument conversion: about a millisecond of a 30-layer
 * model's ~10 ms step at batch 1 (AMD EPYC, Zen 3). Here the caller lays the calls out once as
 * records (the kernel's address and its arguments, already resolved), and this loop makes them
 * in order: the same kernels on the same buffers, so the same bits.
 *
 * The kernels are in other libraries (layers.c, qlinear.c); this file knows only their
 * signatures, which the records' kinds name. */
#include <stdint.h>
#include <string.h>

enum { OP_RMS_NORM = 0, OP_QLINEAR = 1, OP_ROPE_DECODE = 2 };
#define OP_ARGS 22

/* One kernel call: its kind, its address, and its arguments in the kernel's order (pointers and
 * integers as int64, a float argument as its IEEE bits in the low 32). 24 x 8 bytes. */
typedef struct {
    int64_t kind;
    int64_t fn;
    int64_t a[OP_ARGS];
} StepOp;

/* layers.c: rms_norm_bf16, rope_store_decode_bf16; qlinear.c: qlinear, qlinear_swiglu. */
typedef void (*rms_norm_fn)(int, const uint16_t *, int64_t, const uint16_t *, uint16_t *, int64_t, int64_t, float);
typedef int (*qlinear_fn)(int, const void *, int64_t, int, int64_t, int64_t, const uint8_t *, int64_t, int,
                          const float *, const void *, int64_t, void *, int64_t, int, int8_t *, float *);
typedef int (*rope_decode_fn)(int, uint16_t *, int64_t, const int64_t *, const float *, const float *,
                              const int64_t *, int, void *, void *, int64_t, int64_t, int64_t, int64_t, int64_t,
                              const int64_t *, int64_t, const int64_t *, uint16_t *, float);

static float bits_to_f32(int64_t bits) {
    uint32_t u = (uint32_t)bits;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define PTR(i) ((void *)(intptr_t)op->a[i])

/* Runs ops[0, n) in order. Returns 0, or 1 + the index of the first call that failed, its status
 * (the kernel's own; -100 for an unknown kind) in *status; the calls after it are not made. */
int64_t run_step_program(const StepOp *ops, int64_t n, int32_t *status) {
    for (int64_t i = 0; i < n; ++i) {
        const StepOp *op = ops + i;
        int result = 0;
        switch (op->kind) {
        case OP_RMS_NORM:
            ((rms_norm_fn)(intptr_t)op->fn)((int)op->a[0], PTR(1), op->a[2], PTR(3), PTR(4), op->a[5], op->a[6],
                                             bits_to_f32(op->a[7]));
            break;
        case OP_QLINEAR:
            result = ((qlinear_fn)(intptr_t)op->fn)((int)op->a[0], PTR(1), op->a[2], (int)op->a[3], op->a[4], op->a[5],
                                                    PTR(6), op->a[7], (int)op->a[8], PTR(9), PTR(10), op->a[11],
                                                    PTR(12), op->a[13], (int)op->a[14], PTR(15), PTR(16));
            break;
        case OP_ROPE_DECODE:
            result = ((rope_decode_fn)(intptr_t)op->fn)((int)op->a[0], PTR(1), op->a[2], PTR(3), PTR(4), PTR(5),
                                                        PTR(6), (int)op->a[7], PTR(8), PTR(9), op->a[10], op->a[11],
                                                        op->a[12], op->a[13], op->a[14], PTR(15), op->a[16], PTR(17),
                                                        PTR(18), bits_to_f32(op->a[19]));
            break;
        default:
            result = -100;
        }
        if (result != 0) {
            *status = result;
            return i + 1;
        }
    }
    *status = 0;
    return 0;
}
