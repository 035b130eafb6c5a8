/* The compiled CPU pass: cur + alpha * (cur - prev) for every (prev, cur, out) dtype triple in one pass over the
 * buffers, several alphas sharing the widening, with the contract of apo_kernels (see its __init__) bit for bit.
 *
 * Work goes in blocks of BLOCK elements that stay in L1: widen prev and cur into the compute dtype once, then per
 * alpha compute r = cur + alpha * (cur - prev) and round r once into the output, counting new non-finite results.
 * The loops are branch-free so that the compiler vectorises them (SSE2 / NEON baseline, AVX2 clone on x86-64, and
 * an x86-64-v4 one for the fp8 decode).
 *
 * Exactness: built with -ffp-contract=off and without -ffast-math, so d, t and r are each rounded in the compute
 * dtype and no multiply-add is fused (tests/kernels/test_cpass.py checks the machine code and the results).
 * Conversions to and from 16 bits are integer code (round to nearest-even, subnormals, overflow to inf); fp64 to
 * 16 bits goes through fp32 rounded to odd, which makes the second rounding a correct single one. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { F16 = 0, BF16 = 1, F32 = 2, F64 = 3 };
static const int SIZE[4] = {2, 2, 4, 8};
#define BLOCK 1024
#define MAX_ALPHAS 64

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#if __GNUC__ >= 11 /* x86-64-v4 (AVX-512): the fp8 decode is integer work on 16 lanes, 1.7x the AVX2 clone's speed */
#define CLONES_V4 __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#endif
#else
#define CLONES
#endif
#ifndef CLONES_V4
#define CLONES_V4 CLONES
#endif

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint64_t f64_bits(double f) { uint64_t u; memcpy(&u, &f, 8); return u; }

/* fp16 bits -> fp32 bits, exact. Subnormals: m * 2**-24 is exact in fp32 (m < 2**10). */
static inline uint32_t h2f(uint32_t h)
{
    uint32_t s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t normal = s | ((e + 112u) << 23) | (m << 13);
    uint32_t special = s | 0x7f800000u | (m << 13);
    uint32_t sub = s | f32_bits((float)(int32_t)m * 0x1p-24f);
    uint32_t is_sub = 0u - (uint32_t)(e == 0u), is_special = 0u - (uint32_t)(e == 31u); /* masks: no branches */
    return (sub & is_sub) | (special & is_special) | (normal & ~(is_sub | is_special));
}

/* fp32 bits -> fp16 bits, nearest-even, subnormals, overflow to inf, canonical NaN. Normal results: integer
 * rounding of the 13 dropped bits. Subnormal results (|x| < 2**-14): |x| + 0.5 in fp32, whose ulp is 2**-24, the
 * fp16 subnormal step, so the hardware's nearest-even addition is exactly the wanted rounding (also under
 * flush-to-zero: the sum is normal) and the low bits are the fp16 bits, 0x400 when it rounds up to 2**-14. */
static inline uint32_t f2h(uint32_t u)
{
    uint32_t s = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    uint32_t n = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13; /* rebias, round the 13 bits */
    n = n < 0x7c00u ? n : 0x7c00u;
    uint32_t q = f32_bits(bits_f32(a) + 0.5f) - 0x3f000000u;
    uint32_t is_normal = 0u - (uint32_t)(a >= (113u << 23)), is_nan = 0u - (uint32_t)(a > 0x7f800000u);
    uint32_t r = ((n & is_normal) | (q & ~is_normal)) | s;
    return (0x7e00u & is_nan) | (r & ~is_nan);
}

/* fp32 bits -> bf16 bits: add 0x7FFF plus the kept part's lowest bit, drop 16 bits; canonical NaN. */
static inline uint32_t f2bf(uint32_t u)
{
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r;
}

/* fp64 -> fp32 bits rounded to odd: nearest-even, then a magnitude rounded up is stepped down to truncation and the
 * lowest bit set where inexact. */
static inline uint32_t d2f_odd(double x)
{
    float f = (float)x;
    double back = (double)f;
    uint32_t inexact = back != x;
    uint32_t up = inexact & (__builtin_fabs(back) > __builtin_fabs(x));
    return (f32_bits(f) - up) | inexact;
}

/* ---- blocks with fp32 math -------------------------------------------------------------------------------- */

CLONES static void widen32(int code, const char *src, float *dst, size_t n)
{
    uint32_t *u = (uint32_t *)dst;
    if (code == F32) {
        memcpy(dst, src, n * 4);
    } else {
        uint16_t h[BLOCK];
        memcpy(h, src, n * 2);
        if (code == BF16)
            for (size_t i = 0; i < n; i++) u[i] = (uint32_t)h[i] << 16;
        else
            for (size_t i = 0; i < n; i++) u[i] = h2f(h[i]);
    }
}

CLONES static void formula32(const float *c, const float *p, float a, float *r, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float d = c[i] - p[i];
        float t = a * d;
        r[i] = c[i] + t;
    }
}

/* Round r into the output; returns nonzero where any output is inf or NaN (then count_new counts exactly). */
CLONES static uint32_t store32(int code, const float *r, char *dst, size_t n)
{
    const uint32_t *u = (const uint32_t *)r;
    uint32_t any = 0;
    if (code == F32) {
        uint32_t o[BLOCK];
        for (size_t i = 0; i < n; i++) {
            uint32_t a = u[i] & 0x7fffffffu;
            o[i] = a > 0x7f800000u ? 0x7fc00000u : u[i];
            any |= a >= 0x7f800000u;
        }
        memcpy(dst, o, n * 4);
    } else {
        uint16_t o[BLOCK];
        if (code == BF16)
            for (size_t i = 0; i < n; i++) {
                uint32_t h = f2bf(u[i]);
                o[i] = (uint16_t)h;
                any |= (h & 0x7fffu) >= 0x7f80u;
            }
        else
            for (size_t i = 0; i < n; i++) {
                uint32_t h = f2h(u[i]);
                o[i] = (uint16_t)h;
                any |= (h & 0x7fffu) >= 0x7c00u;
            }
        memcpy(dst, o, n * 2);
    }
    return any;
}

/* ---- blocks with fp64 math -------------------------------------------------------------------------------- */

CLONES static void widen64(int code, const char *src, double *dst, size_t n)
{
    if (code == F64) {
        memcpy(dst, src, n * 8);
    } else if (code == F32) {
        float f[BLOCK];
        memcpy(f, src, n * 4);
        for (size_t i = 0; i < n; i++) dst[i] = (double)f[i];
    } else {
        float f[BLOCK];
        widen32(code, src, f, n);
        for (size_t i = 0; i < n; i++) dst[i] = (double)f[i];
    }
}

CLONES static void formula64(const double *c, const double *p, double a, double *r, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        double d = c[i] - p[i];
        double t = a * d;
        r[i] = c[i] + t;
    }
}

CLONES static uint32_t store64(int code, const double *r, char *dst, size_t n)
{
    if (code == F64) {
        const uint64_t *u = (const uint64_t *)r;
        uint64_t o[BLOCK];
        uint32_t any = 0;
        for (size_t i = 0; i < n; i++) {
            uint64_t a = u[i] & 0x7fffffffffffffffull;
            o[i] = a > 0x7ff0000000000000ull ? 0x7ff8000000000000ull : u[i];
            any |= a >= 0x7ff0000000000000ull;
        }
        memcpy(dst, o, n * 8);
        return any;
    }
    float f[BLOCK];
    uint32_t *fu = (uint32_t *)f;
    if (code == F32) {
        for (size_t i = 0; i < n; i++) f[i] = (float)r[i]; /* nearest-even, subnormals, overflow to inf */
    } else {
        for (size_t i = 0; i < n; i++) fu[i] = d2f_odd(r[i]);
    }
    return store32(code, f, dst, n);
}

/* The rare path: outputs just written that are inf or NaN where both inputs are finite (c, p: the widened inputs,
 * fp32 or fp64 by wide64). */
static size_t count_new(int code, const char *dst, const void *c, const void *p, int wide64, size_t n)
{
    size_t count = 0;
    for (size_t i = 0; i < n; i++) {
        int out_bad, in_ok;
        if (code == F64 || code == F32) {
            uint64_t u = 0;
            memcpy(&u, dst + i * SIZE[code], SIZE[code]);
            out_bad = code == F64 ? (u & 0x7fffffffffffffffull) >= 0x7ff0000000000000ull
                                  : (u & 0x7fffffffu) >= 0x7f800000u;
        } else {
            uint16_t h;
            memcpy(&h, dst + i * 2, 2);
            out_bad = (h & 0x7fffu) >= (code == F16 ? 0x7c00u : 0x7f80u);
        }
        if (wide64)
            in_ok = __builtin_isfinite(((const double *)c)[i]) && __builtin_isfinite(((const double *)p)[i]);
        else
            in_ok = __builtin_isfinite(((const float *)c)[i]) && __builtin_isfinite(((const float *)p)[i]);
        count += out_bad && in_ok;
    }
    return count;
}

/* ---- FP8 block-scaled tiles (issue 28) -------------------------------------------------------------------- *
 * Elements idx.. of a [rows, cols] weight (flattened) from their fp8 bytes:
 *     out[i] = table[raw[i]] * scales[(row / bo) * scols + col / bi]
 * table: the 256 fp32 values of the fp8 dtype (every one exact), so the product is the one fp32 rounding of the
 * contract, the same IEEE multiply in the same operand order as the numpy twin (apo_merge.quant.dequant), NaN
 * payloads included. The pass makes its fp32 tiles of an FP8 side this way (the slot keeps 1 byte an element, not
 * 4 written and read back); dequant_fp8 (the last section) does it in place where fp32 must be in the slot (parts
 * of packed tensors, the torch kernels). */

typedef struct {
    const float *table, *scales; /* table NULL: the side is not FP8 */
    size_t g[5];                 /* begin (the buffer's first element in the weight), cols, bo, bi, scols */
    int e4m3;                    /* the table is e4m3fn's: decoded by bit arithmetic instead, the same bits */
} Fp8;

/* Whether any of three addresses is not a multiple of 4: fp32 tables, scales and outputs are read as float. */
static int misaligned(const void *a, const void *b, const void *c)
{
    return (int)(((uintptr_t)a | (uintptr_t)b | (uintptr_t)c) & 3u);
}

/* e4m3fn byte -> fp32, exact and branch-free (vectorises, where the table lookup stays scalar). Subnormals: a * 2**-9
 * is exact in fp32 (a < 8); S.1111.111 is the table's NaN, 0x7fc00000 whatever the sign (fp8_values). */
static inline float e4m3_value(uint32_t b)
{
    uint32_t a = b & 0x7fu, s = (b & 0x80u) << 24;
    uint32_t normal = s | ((a << 20) + (120u << 23)); /* exponent bias 7 -> 127 */
    uint32_t sub = s | f32_bits((float)(int32_t)a * 0x1p-9f);
    uint32_t is_sub = 0u - (uint32_t)(a < 8u), is_nan = 0u - (uint32_t)(a == 0x7fu);
    uint32_t v = (sub & is_sub) | (normal & ~is_sub);
    return bits_f32((0x7fc00000u & is_nan) | (v & ~is_nan));
}

static int is_e4m3_table(const float *table)
{
    for (uint32_t b = 0; b < 256; b++)
        if (f32_bits(table[b]) != f32_bits(e4m3_value(b)))
            return 0;
    return 1;
}

/* out[0..m) = elements idx..idx+m of q's weight, from raw[0..m); per row part and scale block, one scale. */
CLONES_V4 static void dequant_tile(const uint8_t *raw, float *out, size_t m, const Fp8 *q, size_t idx)
{
    size_t cols = q->g[1], bo = q->g[2], bi = q->g[3], scols = q->g[4];
    size_t r = idx / cols, c = idx % cols, i = 0;
    const float *table = q->table;
    while (i < m) {
        const float *srow = q->scales + (r / bo) * scols;
        size_t end = c + (m - i) < cols ? c + (m - i) : cols; /* this row's part of the tile */
        while (c < end) {
            size_t cb = c / bi, stop = (cb + 1) * bi < end ? (cb + 1) * bi : end, k = stop - c;
            float s = srow[cb];
            const uint8_t *x = raw + i;
            float *o = out + i;
            if (q->e4m3)
                for (size_t j = 0; j < k; j++) o[j] = e4m3_value(x[j]) * s;
            else
                for (size_t j = 0; j < k; j++) o[j] = table[x[j]] * s;
            c += k;
            i += k;
        }
        if (c == cols) {
            c = 0;
            r++;
        }
    }
}

/* q from (table, scales, (begin, cols, bo, bi, scols)) for n elements; -1 with ValueError where the table, the
 * scales or the geometry do not fit (a geometry beyond the scales is refused, not read). */
static int fp8_setup(Fp8 *q, const Py_buffer *table, const Py_buffer *scales, const Py_ssize_t gs[5], Py_ssize_t n,
                     const char *who)
{
    int negative = n < 0;
    for (int k = 0; k < 5; k++) {
        negative |= gs[k] < 0;
        q->g[k] = (size_t)gs[k];
    }
    if (negative || table->len != 256 * 4 || !q->g[1] || !q->g[2] || !q->g[3] || !q->g[4] ||
        misaligned(table->buf, scales->buf, NULL)) {
        PyErr_Format(PyExc_ValueError, "%s: bad sizes", who);
        return -1;
    }
    if (n) { /* the last scale the elements read must lie inside scales */
        size_t last = q->g[0] + (size_t)n - 1, have = (size_t)scales->len / 4; /* no overflow: divisions */
        if (q->g[4] > have || (last / q->g[1]) / q->g[2] >= have / q->g[4] || (q->g[1] - 1) / q->g[3] >= q->g[4]) {
            PyErr_Format(PyExc_ValueError, "%s: scales too small for the geometry", who);
            return -1;
        }
    }
    q->table = table->buf;
    q->scales = scales->buf;
    q->e4m3 = is_e4m3_table(q->table);
    return 0;
}

/* ---- the pass --------------------------------------------------------------------------------------------- */

typedef struct {
    const char *prev, *cur;
    char **outs;
    int pc, cc, oc, nalpha;
    const double *alphas;
    size_t n;
    size_t *found;
    Fp8 pq, cq; /* an FP8 side (table set): its buffer holds the fp8 bytes, its code is F32 */
} Job;

/* Elements start..start+m of one side, in fp32: widened, or dequantized from its fp8 bytes. */
static void load32(int code, const Fp8 *q, const char *buf, size_t start, float *dst, size_t m)
{
    if (q->table)
        dequant_tile((const uint8_t *)buf + start, dst, m, q, q->g[0] + start);
    else
        widen32(code, buf + start * SIZE[code], dst, m);
}

static void load64(int code, const Fp8 *q, const char *buf, size_t start, double *dst, float *tmp, size_t m)
{
    if (q->table) {
        dequant_tile((const uint8_t *)buf + start, tmp, m, q, q->g[0] + start);
        for (size_t i = 0; i < m; i++) dst[i] = (double)tmp[i];
    } else {
        widen64(code, buf + start * SIZE[code], dst, m);
    }
}

static void run32(const Job *job)
{
    float c[BLOCK], p[BLOCK], r[BLOCK];
    int fp8_cur = job->cq.table != NULL;
    int copy_only = job->oc == job->cc && !fp8_cur;
    for (int k = 0; k < job->nalpha; k++) copy_only &= job->alphas[k] == 0.0;
    size_t cs = SIZE[job->cc], os = SIZE[job->oc];
    for (size_t start = 0; start < job->n; start += BLOCK) {
        size_t m = job->n - start < BLOCK ? job->n - start : BLOCK;
        const char *cb = fp8_cur ? (const char *)c : job->cur + start * cs; /* cur's fp32 bytes */
        if (!copy_only) {
            load32(job->cc, &job->cq, job->cur, start, c, m);
            load32(job->pc, &job->pq, job->prev, start, p, m);
        }
        for (int k = 0; k < job->nalpha; k++) {
            char *o = job->outs[k] + start * os;
            float a = (float)job->alphas[k];
            if (a == 0.0f && job->oc == job->cc) { /* cur's own bytes, NaN payloads included */
                memcpy(o, cb, m * os);
            } else {
                const float *v = c; /* alpha 0: cur, rounded once */
                if (a != 0.0f) {
                    formula32(c, p, a, r, m);
                    v = r;
                }
                if (store32(job->oc, v, o, m))
                    job->found[k] += count_new(job->oc, o, c, p, 0, m);
            }
        }
    }
}

static void run64(const Job *job)
{
    double c[BLOCK], p[BLOCK], r[BLOCK];
    float cf[BLOCK], pf[BLOCK]; /* an FP8 side's fp32 tile; cur's is its own bytes where alpha is 0 */
    int fp8_cur = job->cq.table != NULL;
    int copy_only = job->oc == job->cc && !fp8_cur;
    for (int k = 0; k < job->nalpha; k++) copy_only &= job->alphas[k] == 0.0;
    size_t cs = SIZE[job->cc], os = SIZE[job->oc];
    for (size_t start = 0; start < job->n; start += BLOCK) {
        size_t m = job->n - start < BLOCK ? job->n - start : BLOCK;
        const char *cb = fp8_cur ? (const char *)cf : job->cur + start * cs;
        if (!copy_only) {
            load64(job->cc, &job->cq, job->cur, start, c, cf, m);
            load64(job->pc, &job->pq, job->prev, start, p, pf, m);
        }
        for (int k = 0; k < job->nalpha; k++) {
            char *o = job->outs[k] + start * os;
            double a = job->alphas[k];
            if (a == 0.0 && job->oc == job->cc) {
                memcpy(o, cb, m * os);
            } else {
                const double *v = c; /* alpha 0: cur, rounded once */
                if (a != 0.0) {
                    formula64(c, p, a, r, m);
                    v = r;
                }
                if (store64(job->oc, v, o, m))
                    job->found[k] += count_new(job->oc, o, c, p, 1, m);
            }
        }
    }
}

static int overlaps(const Py_buffer *a, const Py_buffer *b)
{
    const char *a0 = a->buf, *b0 = b->buf;
    return a->len && b->len && a0 < b0 + b->len && b0 < a0 + a->len;
}

/* extrapolate_into(outs, out_code, prev, prev_code, cur, cur_code, alphas[, prev_fp8, cur_fp8]) -> list of counts.
 * alphas are already rounded to the compute dtype (exact as Python floats); codes: 0 F16, 1 BF16, 2 F32, 3 F64.
 * prev_fp8 / cur_fp8: None, or (table, scales, (begin, cols, bo, bi, scols)) as dequant_fp8 takes them: that side's
 * buffer holds one fp8 byte per element and its code is F32, the dtype of its values. */
static PyObject *extrapolate_into(PyObject *self, PyObject *args)
{
    PyObject *outs_obj, *alphas_obj, *result = NULL, *q_obj[2] = {Py_None, Py_None};
    int oc, pc, cc;
    Py_buffer prev = {0}, cur = {0}, outs[MAX_ALPHAS], qbuf[4] = {{0}};
    int nbuf = 0;
    Fp8 q[2] = {{0}}; /* prev's, cur's */
    (void)self;
    if (!PyArg_ParseTuple(args, "Oiy*iy*iO|OO", &outs_obj, &oc, &prev, &pc, &cur, &cc, &alphas_obj, &q_obj[0],
                          &q_obj[1]))
        return NULL;
    PyObject *outs_seq = PySequence_Fast(outs_obj, "outs must be a sequence");
    PyObject *alphas_seq = outs_seq ? PySequence_Fast(alphas_obj, "alphas must be a sequence") : NULL;
    if (!alphas_seq)
        goto done;
    Py_ssize_t nalpha = PySequence_Fast_GET_SIZE(alphas_seq);
    if (oc < 0 || oc > 3 || pc < 0 || pc > 3 || cc < 0 || cc > 3) {
        PyErr_SetString(PyExc_TypeError, "dtype code out of range");
        goto done;
    }
    if (PySequence_Fast_GET_SIZE(outs_seq) != nalpha || nalpha > MAX_ALPHAS) {
        PyErr_Format(PyExc_ValueError, "one output per alpha, at most %d", MAX_ALPHAS);
        goto done;
    }
    int fp8[2] = {q_obj[0] != Py_None, q_obj[1] != Py_None};
    if ((fp8[0] && pc != F32) || (fp8[1] && cc != F32)) {
        PyErr_SetString(PyExc_ValueError, "an FP8 side's values are F32");
        goto done;
    }
    double alphas[MAX_ALPHAS];
    char *out_ptrs[MAX_ALPHAS];
    size_t found[MAX_ALPHAS] = {0};
    size_t psize = fp8[0] ? 1 : SIZE[pc], csize = fp8[1] ? 1 : SIZE[cc]; /* bytes an element in the buffers */
    size_t n = (size_t)cur.len / csize;
    int bad = (size_t)cur.len != n * csize || (size_t)prev.len != n * psize;
    for (int side = 0; side < 2; side++) {
        Py_ssize_t gs[5];
        if (!fp8[side])
            continue;
        if (!PyArg_ParseTuple(q_obj[side], "y*y*(nnnnn);an FP8 side is (table, scales, (begin, cols, bo, bi, scols))",
                              &qbuf[2 * side], &qbuf[2 * side + 1], &gs[0], &gs[1], &gs[2], &gs[3], &gs[4]))
            goto done;
        if (fp8_setup(&q[side], &qbuf[2 * side], &qbuf[2 * side + 1], gs, bad ? 0 : (Py_ssize_t)n,
                      "extrapolate_into") < 0)
            goto done;
    }
    for (Py_ssize_t k = 0; k < nalpha; k++) {
        alphas[k] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(alphas_seq, k));
        if (alphas[k] == -1.0 && PyErr_Occurred())
            goto done;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(outs_seq, k), &outs[k], PyBUF_WRITABLE) < 0)
            goto done;
        nbuf++;
        out_ptrs[k] = outs[k].buf;
        bad |= (size_t)outs[k].len != n * SIZE[oc];
    }
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "prev, cur and every out must hold the same number of elements");
        goto done;
    }
    for (Py_ssize_t k = 0; k < nalpha; k++)
        if (overlaps(&outs[k], &prev) || overlaps(&outs[k], &cur)) {
            PyErr_SetString(PyExc_ValueError, "an output may not share memory with an input");
            goto done;
        }
    Job job = {prev.buf, cur.buf, out_ptrs, pc, cc, oc, (int)nalpha, alphas, n, found, q[0], q[1]};
    Py_BEGIN_ALLOW_THREADS
    if (oc == F64 || pc == F64 || cc == F64)
        run64(&job);
    else
        run32(&job);
    Py_END_ALLOW_THREADS
    result = PyList_New(nalpha);
    for (Py_ssize_t k = 0; result && k < nalpha; k++) {
        PyObject *v = PyLong_FromSize_t(found[k]);
        if (!v) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, k, v);
    }
done:
    for (int k = 0; k < nbuf; k++) PyBuffer_Release(&outs[k]);
    for (int k = 0; k < 4; k++) PyBuffer_Release(&qbuf[k]); /* a zeroed Py_buffer is released as a no-op */
    PyBuffer_Release(&prev);
    PyBuffer_Release(&cur);
    Py_XDECREF(outs_seq);
    Py_XDECREF(alphas_seq);
    return result;
}

/* the quantized-inputs section, at the end */
static PyObject *dequant_fp8(PyObject *self, PyObject *args);
static PyObject *dequant_mxfp4(PyObject *self, PyObject *args);

static PyMethodDef methods[] = {
    {"extrapolate_into", extrapolate_into, METH_VARARGS, "The fused pass over byte buffers (apo_kernels.cpass)."},
    /* quantized inputs (section at the end of this file) */
    {"dequant_fp8", dequant_fp8, METH_VARARGS, "fp8 bytes -> fp32(w) * block scale, in place (apo_merge.quant)."},
    {"dequant_mxfp4", dequant_mxfp4, METH_VARARGS, "MXFP4 expert -> e2m1 * 2^(s-127), swapped (apo_merge.quant)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpass", NULL, -1, methods};

/* VERSION: bumped with any change of behaviour, so that a stale build in a source tree is not used (cpass.py). */
PyMODINIT_FUNC PyInit__cpass(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "VERSION", 3) < 0)
        Py_CLEAR(m);
    return m;
}

/* ==== quantized inputs (issue 28): FP8 block-scaled and MXFP4 dequantization ==================================== *
 * dequant_fp8(buf, n, table, scales, geometry) -> None. buf holds n fp8 bytes at its front (elements begin..begin+n
 * of a [rows, cols] weight, flattened) and receives their n fp32 values over the same memory, as the FP8 tiles
 * section computes them; geometry = (begin, cols, bo, bi, scols). For the sides the fused pass does not dequantize
 * (parts of packed tensors, the paths that need fp32 in the slot). In place: blocks go from the last to the first,
 * each block's bytes copied out first; block k writes bytes [4*lo, 4*hi), never below its own start lo, so the raw
 * bytes of the blocks still to come (below lo) are intact. */

static PyObject *dequant_fp8(PyObject *self, PyObject *args)
{
    Py_buffer buf = {0}, table = {0}, scales = {0};
    Py_ssize_t n, gs[5];
    Fp8 q;
    PyObject *result = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*ny*y*(nnnnn)", &buf, &n, &table, &scales, &gs[0], &gs[1], &gs[2], &gs[3], &gs[4]))
        return NULL;
    if (n < 0 || (size_t)buf.len / 4 < (size_t)n || misaligned(buf.buf, NULL, NULL)) {
        PyErr_SetString(PyExc_ValueError, "dequant_fp8: bad sizes");
        goto done;
    }
    if (fp8_setup(&q, &table, &scales, gs, n, "dequant_fp8") < 0)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    uint8_t raw[BLOCK];
    for (size_t hi = (size_t)n; hi > 0;) {
        size_t lo = hi > BLOCK ? hi - BLOCK : 0;
        memcpy(raw, (const uint8_t *)buf.buf + lo, hi - lo);
        dequant_tile(raw, (float *)buf.buf + lo, hi - lo, &q, q.g[0] + lo);
        hi = lo;
    }
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&table);
    PyBuffer_Release(&scales);
    return result;
}

/* dequant_mxfp4(out, blocks, scales, fp4, pow2, (rows, groups, lo, hi)) -> None. One expert of a gpt-oss MXFP4
 * weight: blocks [rows, groups, 16] (two e2m1 nibbles a byte, the low one first), scales [rows, groups] (E8M0). Its
 * fp32 matrix is read swapped, [groups * 32, rows], as transformers' convert_moe_packed_tensors gives it: element
 * k = h * rows + r is value h of stored row r. out receives elements lo..hi of it:
 *     out[k - lo] = fp4[nibble h of row r] * pow2[scales[r, h / 32]]
 * fp4 (the 16 e2m1 values) and pow2 (2^(s-127) for every byte s) are apo_merge.quant.mxfp4's tables, exact fp32, so
 * the product is the numpy twin's one fp32 multiply. Work goes per group and tile of MX_ROWS stored rows: the tile's
 * bytes of the group stay in L1 while its (up to) 32 output rows are written, each a contiguous run. */
#define MX_ROWS 256

CLONES static void mxfp4_expert(const uint8_t *blk, const uint8_t *sc, const float *fp4, const float *pow2, float *out,
                                const size_t *g /* rows, groups, lo, hi */)
{
    size_t rows = g[0], groups = g[1], lo = g[2], hi = g[3], stride = groups * 16;
    size_t h0 = lo / rows, h1 = (hi - 1) / rows + 1, first = lo - h0 * rows, last = hi - (h1 - 1) * rows;
    size_t rmin = h1 - h0 == 1 ? first : 0, rmax = h1 - h0 == 1 ? last : rows; /* stored rows the chunk reads */
    float p[MX_ROWS];
    uint8_t bytes[MX_ROWS * 16]; /* the tile's 16 bytes of the group, packed: a power-of-two stride would alias in L1 */
    for (size_t grp = h0 / 32; grp * 32 < h1; grp++) {
        size_t a = grp * 32 > h0 ? grp * 32 : h0, z = grp * 32 + 32 < h1 ? grp * 32 + 32 : h1;
        for (size_t t0 = rmin; t0 < rmax; t0 += MX_ROWS) {
            size_t t1 = t0 + MX_ROWS < rmax ? t0 + MX_ROWS : rmax;
            for (size_t r = t0; r < t1; r++) {
                p[r - t0] = pow2[sc[r * groups + grp]];
                memcpy(bytes + (r - t0) * 16, blk + r * stride + grp * 16, 16);
            }
            for (size_t h = a; h < z; h++) {
                size_t r0 = h == h0 && first > t0 ? first : t0, r1 = h == h1 - 1 && last < t1 ? last : t1;
                const uint8_t *b = bytes + (h % 32) / 2;
                unsigned shift = (unsigned)(h & 1) * 4;
                float *o = out + (h * rows + r0 - lo);
                for (size_t r = r0; r < r1; r++) o[r - r0] = fp4[(b[(r - t0) * 16] >> shift) & 15] * p[r - t0];
            }
        }
    }
}

static PyObject *dequant_mxfp4(PyObject *self, PyObject *args)
{
    Py_buffer out = {0}, blk = {0}, sc = {0}, fp4 = {0}, pow2 = {0};
    Py_ssize_t gs[4];
    PyObject *result = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*y*y*y*y*(nnnn)", &out, &blk, &sc, &fp4, &pow2, &gs[0], &gs[1], &gs[2], &gs[3]))
        return NULL;
    Py_ssize_t rows = gs[0], groups = gs[1], lo = gs[2], hi = gs[3];
    if (rows <= 0 || groups <= 0 || rows > PY_SSIZE_T_MAX / 32 / groups || lo < 0 || hi < lo ||
        hi > rows * groups * 32 || blk.len < rows * groups * 16 || sc.len < rows * groups || out.len / 4 < hi - lo ||
        fp4.len != 16 * 4 || pow2.len != 256 * 4 || misaligned(out.buf, fp4.buf, pow2.buf)) {
        PyErr_SetString(PyExc_ValueError, "dequant_mxfp4: bad sizes");
        goto done;
    }
    size_t g[4] = {(size_t)rows, (size_t)groups, (size_t)lo, (size_t)hi};
    if (hi > lo) {
        Py_BEGIN_ALLOW_THREADS
        mxfp4_expert(blk.buf, sc.buf, fp4.buf, pow2.buf, out.buf, g);
        Py_END_ALLOW_THREADS
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&blk);
    PyBuffer_Release(&sc);
    PyBuffer_Release(&fp4);
    PyBuffer_Release(&pow2);
    return result;
}
/* ==== end of the quantized-inputs section ====================================================================== */
