/* Loops over a weight viewed as rows x n (n = input channels x kernel taps), row-major and
 * contiguous, for ENorm. Each passes over the weight once and the compiler vectorises it; from
 * ATen the same work needs a squared temporary, two passes, or a reduction over runs of a few
 * kernel taps (several times slower). Built and loaded by kernels.py. Loops split between
 * torch's OpenMP threads: the library links the libgomp that torch has already loaded. */
#include <stdint.h>
#include <stddef.h>

#define LANES 64  /* partial sums per reduction: several vector registers */

#define KERNELS(T, S)                                                                           \
/* out[o] = sum_j w[o, j]^2 v[j] */                                                            \
void rowsq_##S(const T *w, const T *v, T *out, int64_t rows, int64_t n, int threads) {         \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                           \
    for (int64_t o = 0; o < rows; o++) {                                                        \
        const T *x = w + o * n;                                                                 \
        T acc[LANES] = {0}, s = 0;  /* independent partial sums: no chain of dependent adds */  \
        int64_t j = 0;                                                                          \
        for (; j + LANES <= n; j += LANES) {                                                    \
            _Pragma("omp simd")                                                                 \
            for (int k = 0; k < LANES; k++) acc[k] += x[j + k] * x[j + k] * v[j + k];           \
        }                                                                                       \
        for (; j < n; j++) s += x[j] * x[j] * v[j];                                             \
        for (int k = 0; k < LANES; k++) s += acc[k];                                            \
        out[o] = s;                                                                             \
    }                                                                                           \
}                                                                                               \
/* acc[j] = sum_o u[o] w[o, j]^2 */                                                            \
void colsq_##S(const T *w, const T *u, T *acc, int64_t rows, int64_t n) {                      \
    for (int64_t j = 0; j < n; j++) acc[j] = 0;                                                 \
    for (int64_t o = 0; o < rows; o++) {                                                        \
        const T *x = w + o * n;                                                                 \
        const T a = u[o];                                                                       \
        _Pragma("omp simd")                                                                     \
        for (int64_t j = 0; j < n; j++) acc[j] += a * x[j] * x[j];                              \
    }                                                                                           \
}                                                                                               \
/* sum of w^2 and the number of zero entries */                                                \
double sumsq_##S(const T *w, int64_t size, int64_t *zeros) {                                    \
    double s = 0;  /* blocks summed in T, the blocks in double: the total of a large layer */   \
    int64_t z = 0;                                                                              \
    for (int64_t b = 0; b < size; b += 4096) {                                                  \
        const int64_t e = b + 4096 < size ? b + 4096 : size;                                    \
        T acc[LANES] = {0}, t = 0;                                                              \
        int64_t j = b;                                                                          \
        for (; j + LANES <= e; j += LANES) {                                                    \
            _Pragma("omp simd")                                                                 \
            for (int k = 0; k < LANES; k++) { acc[k] += w[j + k] * w[j + k]; z += w[j + k] == 0; } \
        }                                                                                       \
        for (; j < e; j++) { t += w[j] * w[j]; z += w[j] == 0; }                                \
        for (int k = 0; k < LANES; k++) t += acc[k];                                            \
        s += t;                                                                                 \
    }                                                                                           \
    *zeros = z;                                                                                 \
    return s;                                                                                   \
}                                                                                               \
/* e[n] = sum_t w[n, t]^2 over the taps of each (output, input) pair of a conv weight */        \
void energy_##S(const T *w, T *e, int64_t pairs, int64_t taps, int threads) {                \
    if (taps == 9) {  /* 3 x 3: a fixed count the compiler unrolls and vectorises across pairs */ \
        _Pragma("omp parallel for simd schedule(static) num_threads(threads)")                  \
        for (int64_t n = 0; n < pairs; n++) {                                                   \
            const T *x = w + n * 9;                                                             \
            e[n] = x[0] * x[0] + x[1] * x[1] + x[2] * x[2] + x[3] * x[3] + x[4] * x[4]          \
                 + x[5] * x[5] + x[6] * x[6] + x[7] * x[7] + x[8] * x[8];                       \
        }                                                                                       \
        return;                                                                                 \
    }                                                                                           \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                           \
    for (int64_t n = 0; n < pairs; n++) {                                                       \
        const T *x = w + n * taps;                                                              \
        T s = 0;                                                                                \
        for (int64_t t = 0; t < taps; t++) s += x[t] * x[t];                                    \
        e[n] = s;                                                                               \
    }                                                                                           \
}                                                                                               \
/* w[o, j] *= a[o] b[(o / per) * n + j]: row o is in block o / per */                          \
void scale_##S(T *w, const T *a, const T *b, int64_t rows, int64_t n, int64_t per, int threads) { \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                           \
    for (int64_t o = 0; o < rows; o++) {                                                        \
        T *x = w + o * n;                                                                       \
        const T *c = b + (o / per) * n;                                                         \
        const T f = a[o];                                                                       \
        _Pragma("omp simd")                                                                     \
        for (int64_t j = 0; j < n; j++) x[j] *= f * c[j];                                       \
    }                                                                                           \
}

KERNELS(float, f32)
KERNELS(double, f64)
