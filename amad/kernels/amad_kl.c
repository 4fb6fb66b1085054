/*
 * Fused CPU kernels for the AMAD KL loss ("No Head Left Behind", AAAI 2024: Eq. 2 and Eq. 9).
 *
 * Built on first use by amad/kernels/__init__.py with the system C compiler and called through
 * ctypes; amad/losses.py falls back to its PyTorch implementation when they are unavailable.
 *
 * Shapes (float32, C-contiguous):
 *   T (B, Ht, Q, K) teacher maps, S (B, Hs, Q, K) student maps, valid (B, Q) 0/1 bytes or NULL
 *   (every row valid). Rows with valid == 0 are never read, so they may hold anything.
 * Per batch element b, over its n_b valid rows (row weight rw = 1/n_b, 0 when n_b == 0):
 *   w_ij = <t_i, s_j> / (max(|t_i|, eps) max(|s_j|, eps))        cosines of flattened maps
 *   a_ij = softmax_j(w_ij / tau)                                  alignment weights (Eq. 2)
 *   M_i  = sum_j a_ij S_j                                          the mixture of student maps
 *   loss_i = rw * sum_q sum_k T_i log((T_i + eps) / (M_i + eps))   mean KL over valid rows (Eq. 9)
 * (rows of a sum to 1, so M_i + eps = sum_j a_ij S_j + eps.)
 *
 * Why it is fast: each batch element is one unit of work, so its maps (~140 KB for 12 heads at
 * 53 tokens) stay in the core's L2 cache between the Gram pass and the KL pass; the mixture is
 * formed block by block in a small buffer and never stored whole; the logarithm is a polynomial the
 * compiler vectorises (Cephes logf, < 1 ulp on normal inputs) instead of a libm call; the Gram
 * products and both gradient sums take the student heads four at a time, so one load of a teacher
 * (or D) vector feeds four multiply-adds (about 0.35 ms less per call at the default shapes); the KL
 * pass prefetches the next batch element's maps, which come from DRAM (the teacher wrote them long
 * before); the gradient is computed in the same pass as the loss (see forward_one). Batch
 * elements are spread over OpenMP threads (the same libgomp that PyTorch loaded, so the two share
 * one thread pool).
 *
 * Values: the Gram pass flags, per batch element, NaN or negative entries in valid rows
 * (status 1) and entries above `limit`, +inf included (status 2). The caller hands both to the
 * PyTorch implementation, which raises on the first and computes the second exactly; with entries in [0, limit] and eps >= 1e-30 every argument of
 * the logarithm is a finite normal float, which the polynomial needs.
 *
 * No -ffast-math: the NaN checks and IEEE semantics must survive compilation.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 256 /* elements of a row block: the mixture buffer stays in L1 */

int amad_kernels_abi(void) { return 3; }

int amad_kernels_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The next run of consecutive valid rows at or after `from`: returns its first row (Q if none)
 * and sets *len. */
static int64_t next_run(const uint8_t *valid, int64_t Q, int64_t from, int64_t *len) {
    if (!valid) {
        *len = from < Q ? Q - from : 0;
        return from < Q ? from : Q;
    }
    while (from < Q && !valid[from]) from++;
    int64_t end = from;
    while (end < Q && valid[end]) end++;
    *len = end - from;
    return from;
}

#define FOR_EACH_RUN(vb, Q, q0, n) \
    for (int64_t n, q0 = next_run(vb, Q, 0, &n); q0 < Q; q0 = next_run(vb, Q, q0 + n, &n))

static int64_t count_valid(const uint8_t *vb, int64_t Q) {
    if (!vb) return Q;
    int64_t c = 0;
    for (int64_t q = 0; q < Q; q++) c += vb[q] != 0;
    return c;
}

/* One hardware vector of floats: GCC/Clang vector extensions, as wide as the target's registers
 * (a wider type would be split into pieces and, across calls, passed through memory). */
#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4 /* SSE2, NEON */
#endif
typedef float vecf __attribute__((vector_size(VL * 4)));
typedef int32_t veci __attribute__((vector_size(VL * 4)));

static inline vecf loadv(const float *p) {
    vecf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void storev(float *p, vecf v) { memcpy(p, &v, sizeof v); }

static inline float hsumv(vecf v) {
    float s = 0.0f;
    for (int u = 0; u < VL; u++) s += v[u];
    return s;
}

static inline vecf vmin(vecf a, vecf b) {
    veci lt = a < b; /* all-ones lanes where a < b */
    return (vecf)((lt & (veci)a) | (~lt & (veci)b));
}

/* First n < VL elements of p in a vector, the other lanes `fill`; and the matching store. */
static inline vecf loadv_part(const float *p, int64_t n, float fill) {
    vecf v = (vecf){0} + fill;
    for (int64_t u = 0; u < n; u++) v[u] = p[u];
    return v;
}

static inline void storev_part(float *p, vecf v, int64_t n) {
    for (int64_t u = 0; u < n; u++) p[u] = v[u];
}

/* Natural log of finite normal floats > 0 (Cephes logf, < 1 ulp), written with vector operations so
 * that it vectorises on every target (GCC does not vectorise a scalar form of it without
 * AVX-512's masked conversions). */
static inline vecf log_normalv(vecf x) {
    veci u = (veci)x;
    veci e = ((u >> 23) & 0xff) - 126;              /* x = m 2^e, m in [0.5, 1) */
    vecf m = (vecf)((u & 0x007fffff) | 0x3f000000);
    veci small = m < 0.70710678118654752440f; /* all ones where true */
    e += small;                                /* e - 1 there */
    m = (m - 1.0f) + (vecf)(small & (veci)m);  /* there (m + m) - 1: log(x) = log1p(m) + e log 2 */
    vecf z = m * m;
    vecf y = ((((((((7.0376836292E-2f * m - 1.1514610310E-1f) * m + 1.1676998740E-1f) * m
                   - 1.2420140846E-1f) * m + 1.4249322787E-1f) * m - 1.6668057665E-1f) * m
                 + 2.0000714765E-1f) * m - 2.4999993993E-1f) * m + 3.3333331174E-1f) * m * z;
    vecf fe = __builtin_convertvector(e, vecf);
    y += -2.12194440e-4f * fe; /* log 2 split in two parts for accuracy */
    y += -0.5f * z;
    return (m + y) + 0.693359375f * fe;
}

void amad_log_array(const float *x, float *y, int64_t n) { /* for the tests of the logarithm */
    int64_t k = 0;
    for (; k + VL <= n; k += VL) storev(y + k, log_normalv(loadv(x + k)));
    if (k < n) storev_part(y + k, log_normalv(loadv_part(x + k, n - k, 1.0f)), n - k);
}

/* Sum of squares of x[0:n] in one pass that also lowers *lo to its minimum and raises *hi to its
 * maximum. A NaN entry makes the sum NaN (min/max may skip it) and +inf makes *hi inf: the
 * caller checks all three. */
static float square_sum_range(const float *x, int64_t n, float *lo, float *hi) {
    vecf a0 = {0}, a1 = {0}, mn = {0}, mx = {0};
    int64_t k = 0;
    for (; k + 2 * VL <= n; k += 2 * VL) {
        vecf v0 = loadv(x + k), v1 = loadv(x + k + VL);
        a0 += v0 * v0;
        a1 += v1 * v1;
        mn = vmin(mn, vmin(v0, v1));
        mx = -vmin(-mx, vmin(-v0, -v1));
    }
    float s = hsumv(a0 + a1), l = *lo, h = *hi;
    for (int u = 0; u < VL; u++) {
        l = mn[u] < l ? mn[u] : l;
        h = mx[u] > h ? mx[u] : h;
    }
    for (; k < n; k++) {
        s += x[k] * x[k];
        l = x[k] < l ? x[k] : l;
        h = x[k] > h ? x[k] : h;
    }
    *lo = l;
    *hi = h;
    return s;
}

/* Student heads are processed in chunks of up to CHUNK, each with its own register accumulator,
 * so that one load of a teacher (or D) vector feeds CHUNK multiply-adds (a plain dot product per
 * pair needs two loads per multiply-add, and loads are what bounds these loops). */
#define CHUNK 4

/* Pointers p0..p3 of type `type *` to the next `nj` (1..CHUNK) rows p_j = s0 + j * stride, the
 * unused ones pointing at s0 (never read or written). CHUNK_ROWS: read-only rows r0..r3. */
#define CHUNK_ROWS_AS(type, p, s0, stride, nj)                                 \
    type *p##0 = (s0), *p##1 = (nj) > 1 ? (s0) + (stride) : (s0),              \
         *p##2 = (nj) > 2 ? (s0) + 2 * (stride) : (s0),                        \
         *p##3 = (nj) > 3 ? (s0) + 3 * (stride) : (s0)
#define CHUNK_ROWS(s0, stride, nj) CHUNK_ROWS_AS(const float, r, s0, stride, nj)

/* w[j] += <t, s_j> for the nj rows s_j = s0 + j * QK over t[0:L]; with `stats` also *sq += |t|^2
 * and *lo / *hi lowered / raised to t's minimum / maximum (as square_sum_range). Two vectors per
 * step: 2 * (nj + 1) independent accumulator chains. */
static inline void gram_chunk(const float *t, const float *s0, int64_t QK, const int nj, int64_t L, float *w,
                              const int stats, float *sq, float *lo, float *hi) {
    CHUNK_ROWS(s0, QK, nj);
    vecf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    vecf q0 = {0}, q1 = {0}, mn = {0}, mx = {0};
    int64_t k = 0;
    for (; k + 2 * VL <= L; k += 2 * VL) {
        const vecf u = loadv(t + k), v = loadv(t + k + VL);
        a0 += u * loadv(r0 + k);
        b0 += v * loadv(r0 + k + VL);
        if (nj > 1) { a1 += u * loadv(r1 + k); b1 += v * loadv(r1 + k + VL); }
        if (nj > 2) { a2 += u * loadv(r2 + k); b2 += v * loadv(r2 + k + VL); }
        if (nj > 3) { a3 += u * loadv(r3 + k); b3 += v * loadv(r3 + k + VL); }
        if (stats) {
            q0 += u * u;
            q1 += v * v;
            mn = vmin(mn, vmin(u, v));
            mx = -vmin(-mx, vmin(-u, -v));
        }
    }
    float d0 = hsumv(a0 + b0), d1 = hsumv(a1 + b1), d2 = hsumv(a2 + b2), d3 = hsumv(a3 + b3);
    float sqs = hsumv(q0 + q1), l = *lo, h = *hi;
    if (stats)
        for (int u = 0; u < VL; u++) {
            l = mn[u] < l ? mn[u] : l;
            h = mx[u] > h ? mx[u] : h;
        }
    for (; k < L; k++) {
        const float x = t[k];
        d0 += x * r0[k];
        if (nj > 1) d1 += x * r1[k];
        if (nj > 2) d2 += x * r2[k];
        if (nj > 3) d3 += x * r3[k];
        if (stats) {
            sqs += x * x;
            l = x < l ? x : l;
            h = x > h ? x : h;
        }
    }
    w[0] += d0;
    if (nj > 1) w[1] += d1;
    if (nj > 2) w[2] += d2;
    if (nj > 3) w[3] += d3;
    if (stats) {
        *sq += sqs;
        *lo = l;
        *hi = h;
    }
}

/* One teacher row against every student head: w[0:Hs] += <t, s_j>, *sq += |t|^2, range as above. */
static void gram_row(const float *t, const float *S, int64_t QK, int64_t Hs, int64_t L, float *w, float *sq,
                     float *lo, float *hi) {
    for (int64_t j0 = 0; j0 < Hs; j0 += CHUNK) {
        const int64_t left = Hs - j0;
        const int stats = j0 == 0;
        const float *s0 = S + j0 * QK;
        /* constant chunk sizes, so each call is compiled with its own accumulators */
        if (left >= 4) gram_chunk(t, s0, QK, 4, L, w + j0, stats, sq, lo, hi);
        else if (left == 3) gram_chunk(t, s0, QK, 3, L, w + j0, stats, sq, lo, hi);
        else if (left == 2) gram_chunk(t, s0, QK, 2, L, w + j0, stats, sq, lo, hi);
        else gram_chunk(t, s0, QK, 1, L, w + j0, stats, sq, lo, hi);
    }
}

/* m[0:L] = eps + sum_j a[j] S_j[k0 : k0 + L], with S_j = S + j QK. */
static inline void mixture_block(float *m, const float *a, const float *S, int64_t Hs, int64_t QK,
                                 int64_t k0, int64_t L, float eps) {
#pragma omp simd
    for (int64_t k = 0; k < L; k++) m[k] = eps;
    for (int64_t j = 0; j < Hs; j++) {
        const float aj = a[j], *sj = S + j * QK + k0;
#pragma omp simd
        for (int64_t k = 0; k < L; k++) m[k] += aj * sj[k];
    }
}

/* Per-thread scratch memory, carved into the buffers below (sizes in scratch_bytes). */
typedef struct {
    vecf *acc;        /* Ht: per-head KL sums */
    vecf *dots;       /* Ht * Hs: <D_i, S_j> */
    float *D;         /* Ht * BLOCK: D_i = T_i / (M_i + eps) for one block */
    float *dots_tail; /* Ht * Hs: scalar tails of dots */
    float *coef;      /* Hs * Ht: [j][i] = dL/dM_i scale for student head j */
    float *d_gts;     /* Hs * Ht: gradient of <t_i, s_j> */
    float *small;     /* 3 * Hs: ns, d_sq, ga */
} scratch_t;

static size_t scratch_bytes(int64_t Ht, int64_t Hs) {
    const size_t vectors = (size_t)(Ht + Ht * Hs), floats = (size_t)(Ht * BLOCK + 3 * Ht * Hs + 3 * Hs);
    return (sizeof(vecf) * vectors + sizeof(float) * floats + 63) & ~(size_t)63;
}

static scratch_t scratch_carve(void *mem, int64_t Ht, int64_t Hs) {
    scratch_t sc;
    sc.acc = (vecf *)mem;
    sc.dots = sc.acc + Ht;
    sc.D = (float *)(sc.dots + Ht * Hs);
    sc.dots_tail = sc.D + Ht * BLOCK;
    sc.coef = sc.dots_tail + Ht * Hs;
    sc.d_gts = sc.coef + Ht * Hs;
    sc.small = sc.d_gts + Ht * Hs;
    return sc;
}

/* Gradient w.r.t. the student maps, in three steps: grad_begin, grad_block for every block of
 * valid elements (with sc->D filled for that block), grad_finish. g (Ht) is the upstream
 * gradient of the per-head losses; NULL means all ones.
 *
 * Through the mixture: dL/dM_i = -g_i rw D_i with D_i = T_i / (M_i + eps), so
 * dL/dS_j = sum_i a_ij dL/dM_i and dL/da_ij = sum <dL/dM_i, S_j>; then back through Eq. 2
 * (softmax, cosines, eps-floored norms) to the Gram products, whose gradient needs T again. */
static void grad_begin(scratch_t *sc, int64_t Ht, int64_t Hs, const float *a, const float *g, float rw) {
    for (int64_t x = 0; x < Ht * Hs; x++) {
        sc->dots[x] = (vecf){0};
        sc->dots_tail[x] = 0.0f;
    }
    for (int64_t i = 0; i < Ht; i++)
        for (int64_t j = 0; j < Hs; j++) sc->coef[j * Ht + i] = -(g ? g[i] : 1.0f) * rw * a[i * Hs + j];
}

/* dots[i][j] += <D_i, s_j> over k < LV for the nj student rows of one chunk (j0 = first row). */
static inline void grad_dots_chunk(scratch_t *sc, const float *s0, int64_t QK, const int nj, int64_t Ht,
                                   int64_t Hs, int64_t j0, int64_t LV) {
    CHUNK_ROWS(s0, QK, nj);
    for (int64_t i = 0; i < Ht; i++) {
        const float *di = sc->D + i * BLOCK;
        vecf *dots = sc->dots + i * Hs + j0;
        vecf a0 = dots[0], a1 = {0}, a2 = {0}, a3 = {0};
        if (nj > 1) a1 = dots[1];
        if (nj > 2) a2 = dots[2];
        if (nj > 3) a3 = dots[3];
        for (int64_t k = 0; k < LV; k += VL) {
            const vecf d = loadv(di + k);
            a0 += d * loadv(r0 + k);
            if (nj > 1) a1 += d * loadv(r1 + k);
            if (nj > 2) a2 += d * loadv(r2 + k);
            if (nj > 3) a3 += d * loadv(r3 + k);
        }
        dots[0] = a0;
        if (nj > 1) dots[1] = a1;
        if (nj > 2) dots[2] = a2;
        if (nj > 3) dots[3] = a3;
    }
}

/* g_j[k] += (self ? e[j] s_j[k] : 0) + sum_i c_j[i] x_i[k] over k in [begin, LV), for the nj rows
 * g_j = grad + j * QK of one chunk, with coefficient rows c_j = coef + j * Ht, Ht sources
 * x_i = X + i * X_stride and (with `self`) s_j = s0 + j * QK. The loop both gradient sums share. */
static inline void mix_into_chunk(float *grad, const float *coef, const float *X, int64_t X_stride, int64_t QK, const int nj,
                                  int64_t Ht, int64_t begin, int64_t LV, const int self, const float *s0, const float *e) {
    CHUNK_ROWS(self ? s0 : grad, QK, nj);
    CHUNK_ROWS_AS(float, g, grad, QK, nj);
    CHUNK_ROWS_AS(const float, c, coef, Ht, nj);
    const float e0 = self ? e[0] : 0.0f, e1 = self && nj > 1 ? e[1] : 0.0f, e2 = self && nj > 2 ? e[2] : 0.0f,
                e3 = self && nj > 3 ? e[3] : 0.0f;
    for (int64_t k = begin; k < LV; k += VL) {
        vecf v0 = loadv(g0 + k), v1 = {0}, v2 = {0}, v3 = {0};
        if (nj > 1) v1 = loadv(g1 + k);
        if (nj > 2) v2 = loadv(g2 + k);
        if (nj > 3) v3 = loadv(g3 + k);
        if (self) {
            v0 += e0 * loadv(r0 + k);
            if (nj > 1) v1 += e1 * loadv(r1 + k);
            if (nj > 2) v2 += e2 * loadv(r2 + k);
            if (nj > 3) v3 += e3 * loadv(r3 + k);
        }
        for (int64_t i = 0; i < Ht; i++) {
            const vecf x = loadv(X + i * X_stride + k);
            v0 += c0[i] * x;
            if (nj > 1) v1 += c1[i] * x;
            if (nj > 2) v2 += c2[i] * x;
            if (nj > 3) v3 += c3[i] * x;
        }
        storev(g0 + k, v0);
        if (nj > 1) storev(g1 + k, v1);
        if (nj > 2) storev(g2 + k, v2);
        if (nj > 3) storev(g3 + k, v3);
    }
}

/* g_j[k] += sum_i coef[j][i] D_i[k] over k < LV for the nj gradient rows of one chunk. */
static inline void grad_sum_chunk(scratch_t *sc, float *g0, int64_t QK, const int nj, int64_t Ht, int64_t j0,
                                  int64_t LV) {
    mix_into_chunk(g0, sc->coef + j0 * Ht, sc->D, BLOCK, QK, nj, Ht, 0, LV, 0, NULL, NULL);
}

static void grad_block(scratch_t *sc, const float *S, int64_t Ht, int64_t Hs, int64_t QK, int64_t k0,
                       int64_t L, float *grad_s) {
    const int64_t LV = L & ~(int64_t)(VL - 1);
    for (int64_t j0 = 0; j0 < Hs; j0 += CHUNK) {
        const int64_t left = Hs - j0;
        const float *s0 = S + j0 * QK + k0;
        float *g0 = grad_s + j0 * QK + k0;
        if (left >= 4) {
            grad_dots_chunk(sc, s0, QK, 4, Ht, Hs, j0, LV);
            grad_sum_chunk(sc, g0, QK, 4, Ht, j0, LV);
        } else if (left == 3) {
            grad_dots_chunk(sc, s0, QK, 3, Ht, Hs, j0, LV);
            grad_sum_chunk(sc, g0, QK, 3, Ht, j0, LV);
        } else if (left == 2) {
            grad_dots_chunk(sc, s0, QK, 2, Ht, Hs, j0, LV);
            grad_sum_chunk(sc, g0, QK, 2, Ht, j0, LV);
        } else {
            grad_dots_chunk(sc, s0, QK, 1, Ht, Hs, j0, LV);
            grad_sum_chunk(sc, g0, QK, 1, Ht, j0, LV);
        }
    }
    for (int64_t j = 0; j < Hs; j++) { /* the scalar tails */
        const float *sj = S + j * QK + k0, *cj = sc->coef + j * Ht;
        float *gj = grad_s + j * QK + k0;
        for (int64_t k = LV; k < L; k++) {
            float v = gj[k];
            for (int64_t i = 0; i < Ht; i++) {
                const float d = sc->D[i * BLOCK + k];
                sc->dots_tail[i * Hs + j] += d * sj[k];
                v += cj[i] * d;
            }
            gj[k] = v;
        }
    }
}

/* The Gram products' part of the gradient for the nj student heads j0.. of one chunk, over
 * k in [begin, LV): g_j[k] += d_sq[j] s_j[k] + sum_i d_gts[j][i] T_i[k]. */
static inline void cosine_grad_chunk(scratch_t *sc, const float *T, const float *S, float *grad_s, const float *d_sq,
                                     int64_t QK, const int nj, int64_t Ht, int64_t j0, int64_t begin, int64_t LV) {
    mix_into_chunk(grad_s + j0 * QK, sc->d_gts + j0 * Ht, T, QK, QK, nj, Ht, begin, LV, 1, S + j0 * QK, d_sq + j0);
}

static void grad_finish(scratch_t *sc, const float *T, const float *S, const uint8_t *vb, int64_t Ht,
                        int64_t Hs, int64_t Q, int64_t K, float tau, float eps, const float *a,
                        const float *w, const float *nt, const float *sq_s, const float *g, float rw,
                        float *grad_s) {
    const int64_t QK = Q * K;
    const float floor2 = eps * eps;
    float *ns = sc->small, *d_sq = ns + Hs, *ga = d_sq + Hs;
    for (int64_t j = 0; j < Hs; j++) {
        ns[j] = sqrtf(sq_s[j] > floor2 ? sq_s[j] : floor2);
        d_sq[j] = 0.0f;
    }
    for (int64_t i = 0; i < Ht; i++) {
        const float *ai = a + i * Hs, gi = g ? g[i] : 1.0f;
        float inner = 0.0f;
        for (int64_t j = 0; j < Hs; j++) {
            ga[j] = (hsumv(sc->dots[i * Hs + j]) + sc->dots_tail[i * Hs + j]) * (-gi * rw);
            inner += ai[j] * ga[j];
        }
        for (int64_t j = 0; j < Hs; j++) {
            const float gw = ai[j] * (ga[j] - inner) / tau; /* softmax, then the 1/tau */
            sc->d_gts[j * Ht + i] = gw / (nt[i] * ns[j]);
            d_sq[j] -= gw * w[i * Hs + j] / ns[j];
        }
    }
    /* d|s_j|^2 = d ns_j / (2 ns_j) where the floor is not active; the Gram gradient is twice that. */
    for (int64_t j = 0; j < Hs; j++) d_sq[j] = sq_s[j] >= floor2 ? d_sq[j] / ns[j] : 0.0f;
    FOR_EACH_RUN(vb, Q, q0, n) {
        const int64_t begin = q0 * K, end = (q0 + n) * K, LV = begin + ((end - begin) & ~(int64_t)(VL - 1));
        for (int64_t j0 = 0; j0 < Hs; j0 += CHUNK) {
            const int64_t left = Hs - j0;
            if (left >= 4) cosine_grad_chunk(sc, T, S, grad_s, d_sq, QK, 4, Ht, j0, begin, LV);
            else if (left == 3) cosine_grad_chunk(sc, T, S, grad_s, d_sq, QK, 3, Ht, j0, begin, LV);
            else if (left == 2) cosine_grad_chunk(sc, T, S, grad_s, d_sq, QK, 2, Ht, j0, begin, LV);
            else cosine_grad_chunk(sc, T, S, grad_s, d_sq, QK, 1, Ht, j0, begin, LV);
        }
        for (int64_t j = 0; j < Hs; j++) { /* the scalar tail */
            const float *sj = S + j * QK, *cj = sc->d_gts + j * Ht, cs = d_sq[j];
            float *gj = grad_s + j * QK;
            for (int64_t k = LV; k < end; k++) {
                float v = gj[k] + cs * sj[k];
                for (int64_t i = 0; i < Ht; i++) v += cj[i] * T[i * QK + k];
                gj[k] = v;
            }
        }
    }
}

/* One batch element forward. Writes loss (Ht), a and w (Ht, Hs), nt (Ht), sq_s (Hs); returns
 * the status (0 ok, 1 NaN or negative, 2 above limit). With grad_s (Hs, Q, K) non-NULL it also
 * writes the gradient of sum_i loss_i (without the path through the weights if detach_weights)
 * while this element's maps are still in cache: the backward pass then only scales it, as the
 * gradient is linear in the upstream gradient. */
static int8_t forward_one(const float *T, const float *S, const uint8_t *vb, int64_t Ht,
                          int64_t Hs, int64_t Q, int64_t K, float tau, float eps, float limit,
                          float *loss, float *a, float *w, float *nt, float *sq_s, float *grad_s,
                          int detach_weights, int ahead, scratch_t *sc) {
    const int64_t QK = Q * K;
    const float floor2 = eps * eps;
    float lo = 0.0f, hi = 0.0f;
    /* Gram pass over valid rows: w holds <t_i, s_j> and nt |t_i|^2 until normalised below. */
    memset(w, 0, sizeof(float) * Ht * Hs);
    memset(nt, 0, sizeof(float) * Ht);
    memset(sq_s, 0, sizeof(float) * Hs);
    FOR_EACH_RUN(vb, Q, q0, n) {
        const int64_t off = q0 * K, L = n * K;
        for (int64_t j = 0; j < Hs; j++) sq_s[j] += square_sum_range(S + j * QK + off, L, &lo, &hi);
        for (int64_t i = 0; i < Ht; i++) gram_row(T + i * QK + off, S + off, QK, Hs, L, w + i * Hs, nt + i, &lo, &hi);
    }
    float sums = 0.0f; /* NaN if any valid entry was NaN */
    for (int64_t i = 0; i < Ht; i++) sums += nt[i];
    for (int64_t j = 0; j < Hs; j++) sums += sq_s[j];
    if (sums != sums || lo < 0.0f) return 1;
    if (!(hi <= limit)) return 2;
    /* Eq. 2: cosines (norms floored at eps) and the softmax over student heads. */
    for (int64_t i = 0; i < Ht; i++) {
        nt[i] = sqrtf(nt[i] > floor2 ? nt[i] : floor2);
        float mx = -INFINITY;
        for (int64_t j = 0; j < Hs; j++) {
            float ns = sqrtf(sq_s[j] > floor2 ? sq_s[j] : floor2);
            w[i * Hs + j] /= nt[i] * ns;
            float z = w[i * Hs + j] / tau;
            a[i * Hs + j] = z;
            mx = z > mx ? z : mx;
        }
        float total = 0.0f;
        for (int64_t j = 0; j < Hs; j++) {
            a[i * Hs + j] = expf(a[i * Hs + j] - mx);
            total += a[i * Hs + j];
        }
        for (int64_t j = 0; j < Hs; j++) a[i * Hs + j] /= total;
    }
    /* Eq. 9, block by block: a block of the student maps stays in L1 across the teacher heads.
     * Per-head sums are kept as vectors across blocks (one horizontal sum per head at the end). */
    const int64_t valid_rows = count_valid(vb, Q);
    const float rw = valid_rows ? 1.0f / (float)valid_rows : 0.0f;
    if (grad_s) {
        memset(grad_s, 0, sizeof(float) * Hs * QK);
        grad_begin(sc, Ht, Hs, a, NULL, rw);
    }
    for (int64_t i = 0; i < Ht; i++) sc->acc[i] = (vecf){0};
    FOR_EACH_RUN(vb, Q, q0, n) {
        const int64_t end = (q0 + n) * K;
        for (int64_t k0 = q0 * K; k0 < end; k0 += BLOCK) {
            const int64_t L = end - k0 < BLOCK ? end - k0 : BLOCK, LV = L & ~(int64_t)(VL - 1);
            for (int64_t i = 0; i < Ht; i++) {
                const float *ti = T + i * QK + k0;
                float *m = sc->D + i * BLOCK; /* the mixture, then D_i = T_i / (M_i + eps) */
                mixture_block(m, a + i * Hs, S, Hs, QK, k0, L, eps);
                vecf v = sc->acc[i];
                if (ahead) /* this block of the next batch element, for its Gram pass (one line per 16) */
                    for (int64_t k = 0; k < L; k += 16) __builtin_prefetch(ti + k + Ht * QK);
                for (int64_t k = 0; k < LV; k += VL) {
                    const vecf t = loadv(ti + k), r = 1.0f / loadv(m + k); /* one division for both */
                    v += t * log_normalv((t + eps) * r);
                    if (grad_s) storev(m + k, t * r);
                }
                if (LV < L) { /* the last partial vector: padding lanes have t = 0, m = 1, so add 0 */
                    const vecf t = loadv_part(ti + LV, L - LV, 0.0f), r = 1.0f / loadv_part(m + LV, L - LV, 1.0f);
                    v += t * log_normalv((t + eps) * r);
                    if (grad_s) storev_part(m + LV, t * r, L - LV);
                }
                sc->acc[i] = v;
            }
            if (ahead) /* likewise the student maps; spread over this pass, the longest, to overlap compute */
                for (int64_t j = 0; j < Hs; j++)
                    for (int64_t k = 0; k < L; k += 16) __builtin_prefetch(S + j * QK + k0 + k + Hs * QK);
            if (grad_s) grad_block(sc, S, Ht, Hs, QK, k0, L, grad_s);
        }
    }
    for (int64_t i = 0; i < Ht; i++) loss[i] = (float)((double)hsumv(sc->acc[i]) * (double)rw);
    if (grad_s && valid_rows && !detach_weights)
        grad_finish(sc, T, S, vb, Ht, Hs, Q, K, tau, eps, a, w, nt, sq_s, NULL, rw, grad_s);
    return 0;
}

/* One batch element backward from its saved forward results: grad_s (Hs, Q, K) for the
 * upstream gradient g (Ht) of the per-head losses. */
static void backward_one(const float *T, const float *S, const uint8_t *vb, int64_t Ht, int64_t Hs,
                         int64_t Q, int64_t K, float tau, float eps, const float *a,
                         const float *w, const float *nt, const float *sq_s, const float *g,
                         int detach_weights, float *grad_s, scratch_t *sc) {
    const int64_t QK = Q * K;
    memset(grad_s, 0, sizeof(float) * Hs * QK);
    const int64_t valid_rows = count_valid(vb, Q);
    if (!valid_rows) return;
    const float rw = 1.0f / (float)valid_rows;
    grad_begin(sc, Ht, Hs, a, g, rw);
    FOR_EACH_RUN(vb, Q, q0, n) {
        const int64_t end = (q0 + n) * K;
        for (int64_t k0 = q0 * K; k0 < end; k0 += BLOCK) {
            const int64_t L = end - k0 < BLOCK ? end - k0 : BLOCK;
            for (int64_t i = 0; i < Ht; i++) {
                const float *ti = T + i * QK + k0;
                float *di = sc->D + i * BLOCK;
                mixture_block(di, a + i * Hs, S, Hs, QK, k0, L, eps);
#pragma omp simd
                for (int64_t k = 0; k < L; k++) di[k] = ti[k] / di[k];
            }
            grad_block(sc, S, Ht, Hs, QK, k0, L, grad_s);
        }
    }
    if (!detach_weights) grad_finish(sc, T, S, vb, Ht, Hs, Q, K, tau, eps, a, w, nt, sq_s, g, rw, grad_s);
}

/* Forward over the batch; per-element outputs as in forward_one (grad_s (B, Hs, Q, K) may be
 * NULL), status (B): 3 where scratch memory could not be allocated. */
void amad_kl_forward(const float *T, const float *S, const uint8_t *valid, int64_t B, int64_t Ht,
                     int64_t Hs, int64_t Q, int64_t K, float tau, float eps, float limit,
                     float *loss, float *a, float *w, float *nt, float *sq_s, float *grad_s,
                     int detach_weights, int8_t *status, int nthreads) {
    const int64_t QK = Q * K;
#pragma omp parallel num_threads(nthreads)
    {
        void *mem = aligned_alloc(64, scratch_bytes(Ht, Hs));
        scratch_t sc;
        if (mem) sc = scratch_carve(mem, Ht, Hs);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            if (!mem) {
                status[b] = 3;
                continue;
            }
            const uint8_t *vb = valid ? valid + b * Q : NULL;
            float *gb = grad_s ? grad_s + b * Hs * QK : NULL;
            status[b] = forward_one(T + b * Ht * QK, S + b * Hs * QK, vb, Ht, Hs, Q, K, tau, eps, limit,
                                    loss + b * Ht, a + b * Ht * Hs, w + b * Ht * Hs, nt + b * Ht,
                                    sq_s + b * Hs, gb, detach_weights, b + 1 < B, &sc);
        }
        free(mem);
    }
}

/* Backward over the batch: writes every element of grad_s (B, Hs, Q, K); g is (B, Ht). Returns
 * non-zero when scratch memory could not be allocated. */
int amad_kl_backward(const float *T, const float *S, const uint8_t *valid, int64_t B, int64_t Ht,
                     int64_t Hs, int64_t Q, int64_t K, float tau, float eps, const float *a,
                     const float *w, const float *nt, const float *sq_s, const float *g,
                     int detach_weights, float *grad_s, int nthreads) {
    const int64_t QK = Q * K;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        void *mem = aligned_alloc(64, scratch_bytes(Ht, Hs));
        scratch_t sc;
        if (mem) sc = scratch_carve(mem, Ht, Hs);
        failed = !mem;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++)
            if (mem)
                backward_one(T + b * Ht * QK, S + b * Hs * QK, valid ? valid + b * Q : NULL, Ht, Hs, Q, K,
                             tau, eps, a + b * Ht * Hs, w + b * Ht * Hs, nt + b * Ht, sq_s + b * Hs,
                             g + b * Ht, detach_weights, grad_s + b * Hs * QK, &sc);
        free(mem);
    }
    return failed;
}
