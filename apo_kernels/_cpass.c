/* The compiled CPU pass: cur + alpha * (cur - prev) for every (prev, cur, out) dtype triple in one pass over the
 * buffers, several alphas sharing the widening, with the contract of apo_kernels (see its __init__) bit for bit.
 *
 * Work goes in blocks of BLOCK elements that stay in L1: widen prev and cur into the compute dtype once, then per
 * alpha compute r = cur + alpha * (cur - prev) and round r once into the output, counting new non-finite results.
 * The loops are branch-free so that the compiler vectorises them (SSE2 / NEON baseline, AVX2 clone on x86-64).
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
#else
#define CLONES
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
    return e == 31u ? special : (e == 0u ? sub : normal);
}

/* fp32 bits -> fp16 bits, nearest-even, subnormals, overflow to inf, canonical NaN. */
static inline uint32_t f2h(uint32_t u)
{
    uint32_t s = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    uint32_t n = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13; /* normal: rebias, round the 13 bits */
    n = n < 0x7c00u ? n : 0x7c00u;
    uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u; /* subnormal: the significand shifted into 2**-24 units */
    uint32_t sh = 126u - (e < 112u ? e : 112u);            /* 14..126 */
    sh = sh < 31u ? sh : 31u;                               /* >= 25 gives 0 either way */
    uint32_t q = m >> sh, rem = m & ((1u << sh) - 1u), half = 1u << (sh - 1u);
    q += (rem > half) | ((rem == half) & q & 1u);
    uint32_t r = (a >= (113u << 23) ? n : q) | s;
    return a > 0x7f800000u ? 0x7e00u : r;
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

/* 1 where both inputs are finite. */
CLONES static void finite32(const float *c, const float *p, uint8_t *fin, size_t n)
{
    const uint32_t *cu = (const uint32_t *)c, *pu = (const uint32_t *)p;
    for (size_t i = 0; i < n; i++)
        fin[i] = ((cu[i] & 0x7fffffffu) < 0x7f800000u) & ((pu[i] & 0x7fffffffu) < 0x7f800000u);
}

CLONES static void formula32(const float *c, const float *p, float a, float *r, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float d = c[i] - p[i];
        float t = a * d;
        r[i] = c[i] + t;
    }
}

/* Round r into the output; returns the count of non-finite outputs where fin is 1. */
CLONES static size_t store32(int code, const float *r, const uint8_t *fin, char *dst, size_t n)
{
    const uint32_t *u = (const uint32_t *)r;
    uint32_t count = 0;
    if (code == F32) {
        uint32_t o[BLOCK];
        for (size_t i = 0; i < n; i++) {
            uint32_t a = u[i] & 0x7fffffffu;
            o[i] = a > 0x7f800000u ? 0x7fc00000u : u[i];
            count += (a >= 0x7f800000u) & fin[i];
        }
        memcpy(dst, o, n * 4);
    } else {
        uint16_t o[BLOCK];
        if (code == BF16)
            for (size_t i = 0; i < n; i++) {
                uint32_t h = f2bf(u[i]);
                o[i] = (uint16_t)h;
                count += ((h & 0x7fffu) >= 0x7f80u) & fin[i];
            }
        else
            for (size_t i = 0; i < n; i++) {
                uint32_t h = f2h(u[i]);
                o[i] = (uint16_t)h;
                count += ((h & 0x7fffu) >= 0x7c00u) & fin[i];
            }
        memcpy(dst, o, n * 2);
    }
    return count;
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

CLONES static void finite64(const double *c, const double *p, uint8_t *fin, size_t n)
{
    const uint64_t *cu = (const uint64_t *)c, *pu = (const uint64_t *)p;
    const uint64_t inf = 0x7ff0000000000000ull, mag = 0x7fffffffffffffffull;
    for (size_t i = 0; i < n; i++) fin[i] = ((cu[i] & mag) < inf) & ((pu[i] & mag) < inf);
}

CLONES static void formula64(const double *c, const double *p, double a, double *r, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        double d = c[i] - p[i];
        double t = a * d;
        r[i] = c[i] + t;
    }
}

CLONES static size_t store64(int code, const double *r, const uint8_t *fin, char *dst, size_t n)
{
    uint32_t count = 0;
    if (code == F64) {
        const uint64_t *u = (const uint64_t *)r;
        uint64_t o[BLOCK];
        for (size_t i = 0; i < n; i++) {
            uint64_t a = u[i] & 0x7fffffffffffffffull;
            o[i] = a > 0x7ff0000000000000ull ? 0x7ff8000000000000ull : u[i];
            count += (a >= 0x7ff0000000000000ull) & fin[i];
        }
        memcpy(dst, o, n * 8);
        return count;
    }
    float f[BLOCK];
    uint32_t *fu = (uint32_t *)f;
    if (code == F32) {
        for (size_t i = 0; i < n; i++) f[i] = (float)r[i]; /* nearest-even, subnormals, overflow to inf */
    } else {
        for (size_t i = 0; i < n; i++) fu[i] = d2f_odd(r[i]);
    }
    return store32(code, f, fin, dst, n);
}

/* ---- the pass --------------------------------------------------------------------------------------------- */

typedef struct {
    const char *prev, *cur;
    char **outs;
    int pc, cc, oc, nalpha;
    const double *alphas;
    size_t n;
    size_t *found;
} Job;

static void run32(const Job *job)
{
    float c[BLOCK], p[BLOCK], r[BLOCK];
    uint8_t fin[BLOCK];
    int copy_only = job->oc == job->cc;
    for (int k = 0; k < job->nalpha; k++) copy_only &= job->alphas[k] == 0.0;
    size_t ps = SIZE[job->pc], cs = SIZE[job->cc], os = SIZE[job->oc];
    for (size_t start = 0; start < job->n; start += BLOCK) {
        size_t m = job->n - start < BLOCK ? job->n - start : BLOCK;
        const char *cb = job->cur + start * cs;
        if (!copy_only) {
            widen32(job->cc, cb, c, m);
            widen32(job->pc, job->prev + start * ps, p, m);
            finite32(c, p, fin, m);
        }
        for (int k = 0; k < job->nalpha; k++) {
            char *o = job->outs[k] + start * os;
            float a = (float)job->alphas[k];
            if (a == 0.0f && job->oc == job->cc) { /* cur's own bytes, NaN payloads included */
                memcpy(o, cb, m * os);
            } else if (a == 0.0f) {
                job->found[k] += store32(job->oc, c, fin, o, m);
            } else {
                formula32(c, p, a, r, m);
                job->found[k] += store32(job->oc, r, fin, o, m);
            }
        }
    }
}

static void run64(const Job *job)
{
    double c[BLOCK], p[BLOCK], r[BLOCK];
    uint8_t fin[BLOCK];
    int copy_only = job->oc == job->cc;
    for (int k = 0; k < job->nalpha; k++) copy_only &= job->alphas[k] == 0.0;
    size_t ps = SIZE[job->pc], cs = SIZE[job->cc], os = SIZE[job->oc];
    for (size_t start = 0; start < job->n; start += BLOCK) {
        size_t m = job->n - start < BLOCK ? job->n - start : BLOCK;
        const char *cb = job->cur + start * cs;
        if (!copy_only) {
            widen64(job->cc, cb, c, m);
            widen64(job->pc, job->prev + start * ps, p, m);
            finite64(c, p, fin, m);
        }
        for (int k = 0; k < job->nalpha; k++) {
            char *o = job->outs[k] + start * os;
            double a = job->alphas[k];
            if (a == 0.0 && job->oc == job->cc) {
                memcpy(o, cb, m * os);
            } else if (a == 0.0) {
                job->found[k] += store64(job->oc, c, fin, o, m);
            } else {
                formula64(c, p, a, r, m);
                job->found[k] += store64(job->oc, r, fin, o, m);
            }
        }
    }
}

static int overlaps(const Py_buffer *a, const Py_buffer *b)
{
    const char *a0 = a->buf, *b0 = b->buf;
    return a->len && b->len && a0 < b0 + b->len && b0 < a0 + a->len;
}

/* extrapolate_into(outs, out_code, prev, prev_code, cur, cur_code, alphas) -> list of counts. alphas are already
 * rounded to the compute dtype (exact as Python floats); codes: 0 F16, 1 BF16, 2 F32, 3 F64. */
static PyObject *extrapolate_into(PyObject *self, PyObject *args)
{
    PyObject *outs_obj, *alphas_obj, *result = NULL;
    int oc, pc, cc;
    Py_buffer prev = {0}, cur = {0}, outs[MAX_ALPHAS];
    int nbuf = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oiy*iy*iO", &outs_obj, &oc, &prev, &pc, &cur, &cc, &alphas_obj))
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
    double alphas[MAX_ALPHAS];
    char *out_ptrs[MAX_ALPHAS];
    size_t found[MAX_ALPHAS] = {0};
    size_t n = (size_t)cur.len / SIZE[cc];
    int bad = (size_t)cur.len != n * SIZE[cc] || (size_t)prev.len != n * SIZE[pc];
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
    Job job = {prev.buf, cur.buf, out_ptrs, pc, cc, oc, (int)nalpha, alphas, n, found};
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
    PyBuffer_Release(&prev);
    PyBuffer_Release(&cur);
    Py_XDECREF(outs_seq);
    Py_XDECREF(alphas_seq);
    return result;
}

static PyMethodDef methods[] = {
    {"extrapolate_into", extrapolate_into, METH_VARARGS, "The fused pass over byte buffers (apo_kernels.cpass)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpass", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpass(void) { return PyModule_Create(&module); }
