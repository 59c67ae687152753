/* Fused fp32 CPU kernels for the routed experts' activations (am_moe.experts.native).
 *
 * Each kernel makes one pass over a block of rows where the ATen path makes five to sixteen
 * (one per elementwise op). Rows are the expert's routed rows; h holds the first
 * projection's output, gate half [0, f) then up half [f, 2f) for "geglu" (f columns for
 * "relu2"); w is the per-row routing weight (NULL: 1). All pointers are fp32, rows are
 * `ld*` floats apart, columns contiguous. No allocation, no threads, no global state.
 * am_gather_rows copies the routed rows out of the tokens before the loop.
 *
 * gelu_tanh(g) = g * sigmoid(z), z = 2 sqrt(2/pi) (g + 0.044715 g^3) (tanh(u) =
 * 2 sigmoid(2u) - 1), and d gelu_tanh / dg = s + g s (1 - s) dz/dg with s = sigmoid(z).
 * The exponential is a range reduction plus a degree-7 Taylor polynomial (relative error
 * ~1e-7, the rounding of fp32) written in plain arithmetic so the compiler vectorizes it.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define AM_C2 1.5957691216057308f  /* 2 sqrt(2/pi) */
#define AM_C2K 0.0713548162726f    /* 2 sqrt(2/pi) * 0.044715 */

static inline float am_exp(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float magic = 12582912.0f; /* 1.5 * 2^23: x + magic - magic rounds x to an integer */
    float n = (x * 1.44269504088896341f + magic) - magic;
    float r = x - n * 0.693145751953125f; /* ln 2 in two parts, exact product first */
    r = r - n * 1.428606765330187e-06f;
    float p = 1.984126984126984e-04f;
    p = p * r + 1.388888888888889e-03f;
    p = p * r + 8.333333333333333e-03f;
    p = p * r + 4.166666666666667e-02f;
    p = p * r + 1.666666666666667e-01f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23; /* 2^n, n in [-126, 127] after the clamp */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float am_gelu_sigmoid(float g) {
    return 1.0f / (1.0f + am_exp(-(g * (AM_C2 + AM_C2K * g * g))));
}

/* a[r, j] = gelu_tanh(gate) * up * w[r]. */
void am_geglu_fwd(const float *h, int64_t rows, int64_t f, int64_t ldh, const float *w,
                  float *a, int64_t lda) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *g = h + r * ldh, *u = g + f;
        float *o = a + r * lda;
        const float wr = w ? w[r] : 1.0f;
#pragma omp simd
        for (int64_t j = 0; j < f; ++j) {
            const float x = g[j];
            o[j] = ((x * am_gelu_sigmoid(x)) * u[j]) * wr;
        }
    }
}

/* From the upstream gradient ga of a = gelu_tanh(gate) * up (before the routing weight):
 * gw[r] = sum_j a * ga (the routing weight's gradient; skipped when gw is NULL),
 * gh = d(a * w[r]) / d(gate, up) . ga, gate half then up half, and, when sa is not NULL,
 * sa = a * w[r] (the forward's output, which the down projection's weight gradient needs:
 * computed here it costs no second pass over h). */
static inline void am_geglu_bwd_rows(const float *h, int64_t rows, int64_t f, int64_t ldh,
                                     const float *w, const float *ga, int64_t ldga, float *gh,
                                     int64_t ldgh, float *gw, float *sa, int64_t ldsa,
                                     const int store_a) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *g = h + r * ldh, *u = g + f, *d = ga + r * ldga;
        float *og = gh + r * ldgh, *ou = og + f, *oa = store_a ? sa + r * ldsa : 0;
        const float wr = w ? w[r] : 1.0f;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < f; ++j) {
            const float x = g[j], up = u[j], dj = d[j];
            const float s = am_gelu_sigmoid(x);
            const float gl = x * s;
            acc += (gl * up) * dj;
            if (store_a) oa[j] = (gl * up) * wr;
            const float dw = dj * wr;
            ou[j] = dw * gl;
            og[j] = (dw * up) * (s + gl * (1.0f - s) * (AM_C2 + 3.0f * AM_C2K * x * x));
        }
        if (gw) gw[r] = acc;
    }
}

/* The exported backward of activation NAME: two instantiations of its row loop, with and
 * without the weighted activation's store, so the inner loop carries no per-element branch. */
#define AM_BACKWARD_ENTRY(NAME)                                                              \
    void am_##NAME##_bwd(const float *h, int64_t rows, int64_t f, int64_t ldh, const float *w, \
                         const float *ga, int64_t ldga, float *gh, int64_t ldgh, float *gw,    \
                         float *sa, int64_t ldsa) {                                           \
        if (sa)                                                                               \
            am_##NAME##_bwd_rows(h, rows, f, ldh, w, ga, ldga, gh, ldgh, gw, sa, ldsa, 1);     \
        else                                                                                  \
            am_##NAME##_bwd_rows(h, rows, f, ldh, w, ga, ldga, gh, ldgh, gw, sa, ldsa, 0);     \
    }

AM_BACKWARD_ENTRY(geglu)

/* a[r, j] = relu(h)^2 * w[r]. */
void am_relu2_fwd(const float *h, int64_t rows, int64_t f, int64_t ldh, const float *w,
                  float *a, int64_t lda) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *x = h + r * ldh;
        float *o = a + r * lda;
        const float wr = w ? w[r] : 1.0f;
#pragma omp simd
        for (int64_t j = 0; j < f; ++j) {
            const float p = x[j] > 0.0f ? x[j] : 0.0f;
            o[j] = (p * p) * wr;
        }
    }
}

/* gw[r] = sum_j relu(h)^2 * ga (NULL: skipped); gh = 2 relu(h) * ga * w[r]; and, when sa
 * is not NULL, sa = relu(h)^2 * w[r] (as in am_geglu_bwd). */
static inline void am_relu2_bwd_rows(const float *h, int64_t rows, int64_t f, int64_t ldh,
                                     const float *w, const float *ga, int64_t ldga, float *gh,
                                     int64_t ldgh, float *gw, float *sa, int64_t ldsa,
                                     const int store_a) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *x = h + r * ldh, *d = ga + r * ldga;
        float *o = gh + r * ldgh, *oa = store_a ? sa + r * ldsa : 0;
        const float wr = w ? w[r] : 1.0f;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < f; ++j) {
            const float p = x[j] > 0.0f ? x[j] : 0.0f;
            acc += (p * p) * d[j];
            if (store_a) oa[j] = (p * p) * wr;
            o[j] = ((d[j] * wr) * p) * 2.0f;
        }
        if (gw) gw[r] = acc;
    }
}

AM_BACKWARD_ENTRY(relu2)

/* dst[r, :] = src[idx[r], :] for r < n, d floats per row (rows lds / ldd floats apart).
 * The routed rows (tens of MB) are written once and read back by the next matmul from
 * memory anyway: with AVX-512 the stores stream past the caches (no read of each destination
 * line before it is written), a third faster than a cached copy at the bench/moe.py shape.
 * Returns 0, or 1 + the first r whose idx[r] is outside [0, src_rows) (nothing past it is
 * written). */
int64_t am_gather_rows(const float *src, int64_t src_rows, int64_t lds, const int64_t *idx,
                       int64_t n, int64_t d, float *dst, int64_t ldd) {
    for (int64_t r = 0; r < n; ++r) {
        const int64_t i = idx[r];
        if (i < 0 || i >= src_rows) return r + 1;
        const float *s = src + i * lds;
        float *o = dst + r * ldd;
        if (r + 2 < n && idx[r + 2] >= 0 && idx[r + 2] < src_rows) {
            const char *next = (const char *)(src + idx[r + 2] * lds);
            for (int64_t j = 0; j < d * (int64_t)sizeof(float); j += 64)
                __builtin_prefetch(next + j);
        }
        int64_t j = 0;
#if defined(__AVX512F__)
        if (((uintptr_t)o & 63) == 0)
            for (; j + 16 <= d; j += 16) _mm512_stream_ps(o + j, _mm512_loadu_ps(s + j));
#endif
        if (j < d) memcpy(o + j, s + j, (size_t)(d - j) * sizeof(float));
    }
#if defined(__AVX512F__)
    _mm_sfence(); /* streaming stores are visible to later loads on any core */
#endif
    return 0;
}

/* Lets the loader check that the library it opened is the one built from this source. */
int am_native_kernels_abi(void) { return 3; }
