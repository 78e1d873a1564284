/* CPU kernels for the fp32 decode path (radixfleet.kernels.cpu_ops builds and loads this).
 *
 * Each one replaces a handful of small torch ops whose per-op overhead, at a decode step's
 * sizes (tens of rows), costs more than their arithmetic. Plain C99 + OpenMP: gcc resolves
 * libgomp.so.1 to the copy torch has already loaded, so both share one thread pool.
 * GCC vector extensions give 8-wide loads/FMAs where the compiler targets AVX2; the order
 * of every reduction is fixed, so results do not depend on the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float vf8 __attribute__((vector_size(32)));

static inline vf8 load8(const float *p) { vf8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, vf8 v) { memcpy(p, &v, sizeof v); }

static inline float hsum8(vf8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

static inline float dot(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.f;
    if (n >= 8) {
        vf8 acc = load8(a) * load8(b);
        for (i = 8; i + 8 <= n; i += 8) acc += load8(a + i) * load8(b + i);
        s = hsum8(acc);
    }
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* acc[0:n] += w * x[0:n] */
static inline void axpy(float *acc, float w, const float *x, int n) {
    int i = 0;
    vf8 wv = {w, w, w, w, w, w, w, w};
    for (; i + 8 <= n; i += 8) store8(acc + i, load8(acc + i) + wv * load8(x + i));
    for (; i < n; i++) acc[i] += w * x[i];
}

/* exp on 8 lanes: Cephes' expf (range reduction by ln 2, degree-6 polynomial), within
 * 2 ulp of libm over the softmax/SiLU range; inputs are clamped to [-87.3, 88.7]. */
typedef int vi8 __attribute__((vector_size(32)));

static inline vf8 select8(vi8 mask, vf8 a, vf8 b) {  /* mask ? a : b, lanewise */
    return (vf8)(((vi8)a & mask) | ((vi8)b & ~mask));
}

static inline vf8 exp8(vf8 x) {
    const vf8 hi = {88.7f, 88.7f, 88.7f, 88.7f, 88.7f, 88.7f, 88.7f, 88.7f}, lo = -hi + 1.4f;
    x = select8(x < lo, lo, x);
    x = select8(x > hi, hi, x);
    vf8 t = x * 1.44269504088896341f + 0.5f;
    vi8 n = __builtin_convertvector(t, vi8);
    n += (vi8)(__builtin_convertvector(n, vf8) > t);  /* truncation -> floor */
    vf8 fn = __builtin_convertvector(n, vf8);
    vf8 r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
    vf8 p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    vi8 scale = (n + 127) << 23;
    return p * (vf8)scale;
}

/* x[0:n] = exp(x - m); returns the sum. */
static inline float exp_sub_sum(float *x, float m, int n) {
    int i = 0;
    float sum = 0.f;
    if (n >= 8) {
        vf8 acc = {0};
        for (; i + 8 <= n; i += 8) {
            vf8 e = exp8(load8(x + i) - m);
            store8(x + i, e);
            acc += e;
        }
        sum = hsum8(acc);
    }
    for (; i < n; i++) { x[i] = expf(x[i] - m); sum += x[i]; }
    return sum;
}

static inline void prefetch_row(const float *p, int64_t floats) {
    for (int64_t i = 0; i < floats; i += 16) __builtin_prefetch(p + i);
}

/* Decode attention straight from the token-slot KV pool (no gather).
 *
 * q       [B, H, D]            one query token per request
 * kv      [S, 2, KVH, D]       one layer of the pool: K then V of each slot
 * table   [rows, table_stride] int32 slot of each token of each request-table row
 * rows    [B] int64            each request's row; lens [B] int32: its context length
 * out     [B, H, D]
 * scratch [B, H, scratch_len]  float, scratch_len >= max(lens)
 * One work item per request (all its heads: each K/V row of a slot is one contiguous read),
 * or per (request, kv head) when there are too few requests to keep every thread busy.
 */
void rf_decode_attention(const float *q, const float *kv, const int32_t *table, int64_t table_stride,
                         const int64_t *rows, const int32_t *lens, float *out, float *scratch,
                         int64_t scratch_len, int B, int H, int KVH, int D, float scale) {
    const int G = H / KVH;
    const int64_t tok = 2 * (int64_t)KVH * D;
    const int split = B < 8 ? KVH : 1;  /* work items per request */
    const int per = KVH / split;        /* kv heads per work item */
#pragma omp parallel for schedule(dynamic, 1)
    for (int w = 0; w < B * split; w++) {
        const int b = w / split, g0 = (w % split) * per, h0 = g0 * G, nh = per * G, n = lens[b];
        const int32_t *slot = table + rows[b] * table_stride;
        const float *qb = q + ((int64_t)b * H + h0) * D;
        float *s = scratch + ((int64_t)b * H + h0) * scratch_len;
        const int64_t row_floats = split == 1 ? tok : 0;
        for (int t = 0; t < n; t++) {
            if (t + 2 < n) {
                if (row_floats) prefetch_row(kv + slot[t + 2] * tok, row_floats);
                else prefetch_row(kv + slot[t + 2] * tok + (int64_t)g0 * D, D);
            }
            const float *k = kv + slot[t] * tok + (int64_t)g0 * D;
            for (int h = 0; h < nh; h++) s[h * scratch_len + t] = dot(qb + h * D, k + (h / G) * D, D) * scale;
        }
        float inv[256];  /* nh <= 256 (checked by the caller) */
        for (int h = 0; h < nh; h++) {
            float *sh = s + h * scratch_len, m = -INFINITY;
            for (int t = 0; t < n; t++) m = sh[t] > m ? sh[t] : m;
            inv[h] = 1.f / exp_sub_sum(sh, m, n);
        }
        float *ob = out + ((int64_t)b * H + h0) * D;
        memset(ob, 0, sizeof(float) * nh * D);
        for (int t = 0; t < n; t++) {
            if (!row_floats && t + 2 < n) prefetch_row(kv + slot[t + 2] * tok + (int64_t)(KVH + g0) * D, D);
            const float *v = kv + slot[t] * tok + (int64_t)(KVH + g0) * D;
            for (int h = 0; h < nh; h++) axpy(ob + h * D, s[h * scratch_len + t], v + (h / G) * D, D);
        }
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < D; i++) ob[h * D + i] *= inv[h];
    }
}

/* RMSNorm of each of T rows of N: out = x * rsqrt(mean(x^2) + eps) * w.
 * With res != NULL, the input row is x + res, which is also written to res_out. */
void rf_rmsnorm(const float *x, const float *res, const float *w, float *out, float *res_out,
                int T, int N, int64_t x_stride, float eps) {
    for (int r = 0; r < T; r++) {
        const float *xr = x + r * x_stride;
        float *o = out + (int64_t)r * N, *src = o;
        if (res) {
            src = res_out + (int64_t)r * N;
            const float *rr = res + (int64_t)r * N;
            for (int i = 0; i < N; i++) src[i] = xr[i] + rr[i];
        } else {
            memcpy(o, xr, sizeof(float) * N);
        }
        float ss = dot(src, src, N);
        float k = 1.f / sqrtf(ss / N + eps);
        for (int i = 0; i < N; i++) o[i] = src[i] * k * w[i];
    }
}

/* Neox rotary in place on q [T, H, D] and k [T, KVH, D] (token and head strides free, last
 * dim contiguous), with cos_sin [P, D]: cos of the D/2 frequencies, then sin. */
void rf_rotary(const int64_t *pos, float *q, float *k, const float *cos_sin, int T, int H, int KVH,
               int D, int64_t q_stride, int64_t q_head_stride, int64_t k_stride, int64_t k_head_stride) {
    const int half = D / 2;
    for (int t = 0; t < T; t++) {
        const float *c = cos_sin + pos[t] * D, *sn = c + half;
        for (int which = 0; which < 2; which++) {
            float *base = which ? k + t * k_stride : q + t * q_stride;
            const int heads = which ? KVH : H;
            const int64_t head_stride = which ? k_head_stride : q_head_stride;
            for (int h = 0; h < heads; h++) {
                float *x1 = base + h * head_stride, *x2 = x1 + half;
                for (int i = 0; i < half; i++) {
                    const float a = x1[i], b = x2[i];
                    x1[i] = a * c[i] - b * sn[i];
                    x2[i] = b * c[i] + a * sn[i];
                }
            }
        }
    }
}

/* out [T, I] = silu(x[:, :I]) * x[:, I:], x [T, 2I] */
void rf_silu_and_mul(const float *x, float *out, int T, int I) {
    for (int t = 0; t < T; t++) {
        const float *g = x + (int64_t)t * 2 * I, *u = g + I;
        float *o = out + (int64_t)t * I;
        int i = 0;
        for (; i + 8 <= I; i += 8) {
            vf8 gv = load8(g + i);
            store8(o + i, gv / (1.f + exp8(-gv)) * load8(u + i));
        }
        for (; i < I; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}
