/* qcompile._histogram: the bin counting of `calibrate._bin_counts`, exactly, without numpy's
 * five passes over the batch (an optional accelerator: calibrate falls back to numpy without it).
 *
 *   add_counts(x, counts, scale)
 *     x       C-contiguous float32 buffer, finite, |x * scale| <= bins / 2
 *     counts  C-contiguous writable int64 buffer of `bins` (even) counters
 *     counts[clamp(floor(x[i] * scale) + bins / 2, 0, bins - 1)] += 1   for every i
 *
 * x * scale is the float32 product numpy computes (`x * np.float32(scale)`); floor is exact
 * (truncate, then step down where the truncation rounded up), so every element lands in the
 * bin numpy's path gives it. The bin indices are computed 256 at a time (a loop the compiler
 * vectorises; an AVX2 clone is chosen at load time on CPUs that have it) and counted into four
 * interleaved 32-bit sub-histograms (no store-to-load chain between neighbouring elements),
 * which are added into `counts` every 2**30 elements, so no 32-bit counter can overflow. The
 * GIL is released while counting.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 4
#define BLOCK 256
#define FLUSH ((Py_ssize_t)1 << 30)

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

CLONES static void bin_indices(const float *x, int n, float scale, int32_t half, int32_t last, int32_t *idx) {
    for (int i = 0; i < n; i++) {
        float q = x[i] * scale;
        int32_t t = (int32_t)q;
        t -= (float)t > q; /* floor */
        t += half;
        t = t < 0 ? 0 : t;
        idx[i] = t < last ? t : last;
    }
}

static void count(const float *x, Py_ssize_t n, float scale, int64_t *out, Py_ssize_t bins, uint32_t *sub) {
    int32_t idx[BLOCK];
    for (Py_ssize_t start = 0; start < n; start += FLUSH) {
        Py_ssize_t end = n - start < FLUSH ? n : start + FLUSH;
        memset(sub, 0, sizeof(uint32_t) * LANES * (size_t)bins);
        for (Py_ssize_t s = start; s < end; s += BLOCK) {
            int m = (int)(end - s < BLOCK ? end - s : BLOCK), i = 0;
            bin_indices(x + s, m, scale, (int32_t)(bins / 2), (int32_t)(bins - 1), idx);
            for (; i + LANES <= m; i += LANES) {
                sub[idx[i]]++;
                sub[bins + idx[i + 1]]++;
                sub[2 * bins + idx[i + 2]]++;
                sub[3 * bins + idx[i + 3]]++;
            }
            for (; i < m; i++) sub[idx[i]]++;
        }
        for (int l = 0; l < LANES; l++)
            for (Py_ssize_t b = 0; b < bins; b++) out[b] += sub[l * bins + b];
    }
}

static PyObject *add_counts(PyObject *self, PyObject *args) {
    Py_buffer x, c;
    float scale;
    if (!PyArg_ParseTuple(args, "y*w*f", &x, &c, &scale)) return NULL;
    Py_ssize_t n = x.len / (Py_ssize_t)sizeof(float), bins = c.len / (Py_ssize_t)sizeof(int64_t);
    uint32_t *sub = NULL;
    if (bins < 2 || bins % 2 || bins > INT32_MAX || !(sub = malloc(sizeof(uint32_t) * LANES * (size_t)bins))) {
        PyBuffer_Release(&x);
        PyBuffer_Release(&c);
        return bins < 2 || bins % 2 || bins > INT32_MAX ? PyErr_Format(PyExc_ValueError, "counts must hold an even number of bins, got %zd", bins)
                                                         : PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    count((const float *)x.buf, n, scale, (int64_t *)c.buf, bins, sub);
    Py_END_ALLOW_THREADS
    free(sub);
    PyBuffer_Release(&x);
    PyBuffer_Release(&c);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"add_counts", add_counts, METH_VARARGS, "add_counts(x: float32 buffer, counts: int64 buffer, scale: float) -> None"},
    {NULL, NULL, 0, NULL},
};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_histogram", "Exact float32 bin counting (see the C source).", -1, methods};
PyMODINIT_FUNC PyInit__histogram(void) { return PyModule_Create(&module); }
