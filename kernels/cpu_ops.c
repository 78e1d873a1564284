/* CPU kernels for the decode path (radixfleet.kernels.cpu_ops builds and loads this).
 *
 * Each one replaces a handful of small torch ops whose per-op overhead, at a decode step's
 * sizes (tens of rows), costs more than their arithmetic. Plain C99 + OpenMP: gcc resolves
 * libgomp.so.1 to the copy torch has already loaded, so both share one thread pool.
 * GCC vector extensions give 8-wide loads/FMAs where the compiler targets AVX2; the order
 * of every reduction is fixed, so results do not depend on the thread count.
 *
 * Every kernel comes twice: rf_NAME on fp32 tensors and rf_NAME_bf16 on bfloat16 ones (bf16
 * storage, fp32 arithmetic and accumulation, one round-to-nearest-even per stored value).
 * Both are one always-inlined body specialised on the constant BF (0 or 1), so the fp32
 * kernels compile to exactly the arithmetic they had before bf16 existed.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float vf8 __attribute__((vector_size(32)));

#define INLINE static inline __attribute__((always_inline))

static inline vf8 load8(const float *p) { vf8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, vf8 v) { memcpy(p, &v, sizeof v); }

static inline float hsum8(vf8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
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

/* bfloat16 <-> fp32. A bf16 is the top half of an fp32, so widening is a shift; narrowing
 * rounds to nearest even (NaNs are not preserved as such: none reach these kernels). */
typedef uint16_t bf16;
typedef unsigned short vu16x8 __attribute__((vector_size(16)));
typedef unsigned int vu8 __attribute__((vector_size(32)));

static inline float bf2f(bf16 h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline bf16 f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline vf8 load8_bf(const bf16 *p) {
    vu16x8 h; memcpy(&h, p, sizeof h);
    return (vf8)(__builtin_convertvector(h, vu8) << 16);
}
static inline void store8_bf(bf16 *p, vf8 v) {
    vu8 u = (vu8)v;
    vu16x8 h = __builtin_convertvector((u + 0x7fffu + ((u >> 16) & 1u)) >> 16, vu16x8);
    memcpy(p, &h, sizeof h);
}

/* Element i of an fp32 (BF = 0) or bf16 (BF = 1) array, read or written as fp32. */
INLINE float ld1(const void *p, int64_t i, int BF) { return BF ? bf2f(((const bf16 *)p)[i]) : ((const float *)p)[i]; }
INLINE void st1(void *p, int64_t i, float v, int BF) {
    if (BF) ((bf16 *)p)[i] = f2bf(v); else ((float *)p)[i] = v;
}
INLINE vf8 ld8(const void *p, int64_t i, int BF) { return BF ? load8_bf((const bf16 *)p + i) : load8((const float *)p + i); }
INLINE void st8(void *p, int64_t i, vf8 v, int BF) {
    if (BF) store8_bf((bf16 *)p + i, v); else store8((float *)p + i, v);
}
/* dst[0:n] (fp32) = src[0:n] (either dtype). */
INLINE void widen(float *dst, const void *src, int n, int BF) {
    int i = 0;
    for (; i + 8 <= n; i += 8) store8(dst + i, ld8(src, i, BF));
    for (; i < n; i++) dst[i] = ld1(src, i, BF);
}

/* sum a[i] * b[boff + i]: a fp32, b fp32 or bf16 */
INLINE float dot(const float *a, const void *b, int64_t boff, int n, int BF) {
    int i = 0;
    float s = 0.f;
    if (n >= 8) {
        vf8 acc = load8(a) * ld8(b, boff, BF);
        for (i = 8; i + 8 <= n; i += 8) acc += load8(a + i) * ld8(b, boff + i, BF);
        s = hsum8(acc);
    }
    for (; i < n; i++) s += a[i] * ld1(b, boff + i, BF);
    return s;
}

/* acc[0:n] += w * x[xoff : xoff + n] */
INLINE void axpy(float *acc, float w, const void *x, int64_t xoff, int n, int BF) {
    int i = 0;
    vf8 wv = {w, w, w, w, w, w, w, w};
    for (; i + 8 <= n; i += 8) store8(acc + i, load8(acc + i) + wv * ld8(x, xoff + i, BF));
    for (; i < n; i++) acc[i] += w * ld1(x, xoff + i, BF);
}

/* 16-wide fp32 dot and axpy for n % 16 == 0 (the bf16 decode attention's head dims), on
 * rows already widened to fp32. */
typedef float vf16 __attribute__((vector_size(64)));

static inline vf16 load16(const float *p) { vf16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, vf16 v) { memcpy(p, &v, sizeof v); }

static inline float dot16(const float *a, const float *b, int n) {
    vf16 acc = load16(a) * load16(b);
    for (int i = 16; i < n; i += 16) acc += load16(a + i) * load16(b + i);
    vf8 lo, hi;
    memcpy(&lo, &acc, sizeof lo);
    memcpy(&hi, (const char *)&acc + sizeof lo, sizeof hi);
    return hsum8(lo + hi);
}

static inline void axpy16(float *acc, float w, const float *x, int n) {
    vf16 wv = {w, w, w, w, w, w, w, w, w, w, w, w, w, w, w, w};
    for (int i = 0; i < n; i += 16) store16(acc + i, load16(acc + i) + wv * load16(x + i));
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

static inline void prefetch_bytes(const void *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch((const char *)p + i);
}

/* Sums of 16 vectors at once: lane i of the result is the sum of the lanes of a[i]. Pairs
 * are folded by halves (8, 4, 2, 1 lanes): 15 shuffle-adds instead of 16 horizontal sums. */
#if defined(__clang__) || __GNUC__ >= 12
#define SHUF16(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else  /* gcc < 12 has only __builtin_shuffle, with the lane indices as a vector */
typedef int vi16 __attribute__((vector_size(64)));
#define SHUF16(a, b, ...) __builtin_shuffle(a, b, (vi16){__VA_ARGS__})
#endif
static inline vf16 fold8(vf16 a, vf16 b) {
    return SHUF16(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
         + SHUF16(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
static inline vf16 fold4(vf16 a, vf16 b) {
    return SHUF16(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
         + SHUF16(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
static inline vf16 fold2(vf16 a, vf16 b) {
    return SHUF16(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
         + SHUF16(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}
static inline vf16 fold1(vf16 a, vf16 b) {
    return SHUF16(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + SHUF16(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
static inline vf16 sum16(const vf16 *a) {
    vf16 b[8], c[4];
    for (int i = 0; i < 8; i++) b[i] = fold8(a[2 * i], a[2 * i + 1]);
    for (int i = 0; i < 4; i++) c[i] = fold4(b[2 * i], b[2 * i + 1]);
    return fold1(fold2(c[0], c[1]), fold2(c[2], c[3]));
}

#define TB 16  /* tokens per block of the bf16 decode attention */

/* One bf16 decode work item (request b, kv heads g0 .. g0 + per - 1, their nh query heads)
 * in blocks of TB tokens: the block's K rows are widened to fp32 in kb [TB, per * D], then
 * each head's TB scores come out of one sum16; V likewise, each head's output held in
 * registers across the block. D % 16 == 0; qf [nh, D] fp32 queries; of [nh, D] fp32 output
 * (unnormalised); s [nh, scratch_len] the scores, then the probabilities. */
static void decode_item_bf16(const float *qf, const bf16 *kv, const int32_t *slot, int n, int64_t tok,
                             int g0, int per, int G, int D, float scale, float *s, int64_t scratch_len,
                             float *of, float *kb, float *inv) {
    const int nh = per * G, pd = per * D;
    for (int t0 = 0; t0 < n; t0 += TB) {
        const int cnt = n - t0 < TB ? n - t0 : TB;
        for (int i = 0; i < cnt; i++) widen(kb + i * pd, kv + slot[t0 + i] * tok + (int64_t)g0 * D, pd, 1);
        if (cnt < TB) memset(kb + cnt * pd, 0, sizeof(float) * (TB - cnt) * pd);
        for (int h = 0; h < nh; h++) {
            const float *qh = qf + h * D, *kh = kb + (h / G) * D;
            vf16 acc[TB];
            for (int i = 0; i < TB; i++) {
                acc[i] = load16(qh) * load16(kh + i * pd);
                for (int c = 16; c < D; c += 16) acc[i] += load16(qh + c) * load16(kh + i * pd + c);
            }
            vf16 sc = sum16(acc) * scale;
            memcpy(s + h * scratch_len + t0, &sc, sizeof(float) * cnt);
        }
    }
    for (int h = 0; h < nh; h++) {
        float *sh = s + h * scratch_len, m = -INFINITY;
        for (int t = 0; t < n; t++) m = sh[t] > m ? sh[t] : m;
        inv[h] = 1.f / exp_sub_sum(sh, m, n);
    }
    memset(of, 0, sizeof(float) * nh * D);
    for (int t0 = 0; t0 < n; t0 += TB) {
        const int cnt = n - t0 < TB ? n - t0 : TB;
        for (int i = 0; i < cnt; i++)
            widen(kb + i * pd, kv + slot[t0 + i] * tok + (int64_t)(tok / 2) + (int64_t)g0 * D, pd, 1);
        for (int h = 0; h < nh; h++) {
            const float *vh = kb + (h / G) * D, *ph = s + h * scratch_len + t0;
            for (int c = 0; c < D; c += 16) {
                vf16 o = load16(of + h * D + c);
                for (int i = 0; i < cnt; i++) o += ph[i] * load16(vh + i * pd + c);
                store16(of + h * D + c, o);
            }
        }
    }
}

/* Decode attention straight from the token-slot KV pool (no gather).
 *
 * q       [B, H, D]            one query token per request
 * kv      [S, 2, KVH, D]       one layer of the pool: K then V of each slot
 * table   [rows, table_stride] int32 slot of each token of each request-table row
 * rows    [B] int64            each request's row; lens [B] int32: its context length
 * out     [B, H, D]            (q, kv and out share the dtype)
 * scratch [B, H, scratch_len]  float, scratch_len >= max(lens)
 * One work item per request (all its heads: each K/V row of a slot is one contiguous read),
 * or per (request, kv head) when there are too few requests to keep every thread busy.
 * bf16: the work item's queries, its output and each token's K (then V) row are fp32 on the
 * stack (H * D <= 16384, checked by the caller), the dots and sums 16 wide where D allows.
 */
INLINE void decode_attention(const void *q, const void *kv, const int32_t *table, int64_t table_stride,
                             const int64_t *rows, const int32_t *lens, void *out, float *scratch,
                             int64_t scratch_len, int B, int H, int KVH, int D, float scale, int BF) {
    const int G = H / KVH;
    const int64_t tok = 2 * (int64_t)KVH * D;  /* elements per slot */
    const int esz = BF ? 2 : 4;
    const int split = B < 8 ? KVH : 1;  /* work items per request */
    const int per = KVH / split;        /* kv heads per work item */
    /* bf16 in blocks of TB tokens where the block's fp32 K (or V) rows fit 64 KB of stack */
    const int blocked = BF && D % 16 == 0 && TB * per * D <= 16384;
#pragma omp parallel for schedule(dynamic, 1)
    for (int w = 0; w < B * split; w++) {
        const int b = w / split, g0 = (w % split) * per, h0 = g0 * G, nh = per * G, n = lens[b];
        const int32_t *slot = table + rows[b] * table_stride;
        const int64_t qo = ((int64_t)b * H + h0) * D;
        float qf[BF ? nh * D : 1], of[BF ? nh * D : 1], row[BF ? per * D : 1];
        const int wide = D % 16 == 0;
        if (BF) widen(qf, (const bf16 *)q + qo, nh * D, 1);
        const float *qb = BF ? qf : (const float *)q + qo;
        float *s = scratch + ((int64_t)b * H + h0) * scratch_len;
        if (BF && blocked) {
            float kb[TB * per * D], inv[256];
            decode_item_bf16(qf, (const bf16 *)kv, slot, n, tok, g0, per, G, D, scale, s, scratch_len, of, kb, inv);
            for (int h = 0; h < nh; h++)
                for (int i = 0; i < D; i++) st1(out, qo + h * D + i, of[h * D + i] * inv[h], 1);
            continue;
        }
        const int64_t row_bytes = split == 1 ? tok * esz : 0;
        for (int t = 0; t < n; t++) {
            if (t + 2 < n) {
                if (row_bytes) prefetch_bytes((const char *)kv + slot[t + 2] * tok * esz, row_bytes);
                else prefetch_bytes((const char *)kv + (slot[t + 2] * tok + (int64_t)g0 * D) * esz, D * esz);
            }
            const int64_t k = slot[t] * tok + (int64_t)g0 * D;
            if (BF) {  /* widen this token's keys once; each of the G heads reads them from L1 */
                widen(row, (const bf16 *)kv + k, per * D, 1);
                for (int h = 0; h < nh; h++)
                    s[h * scratch_len + t] = (wide ? dot16(qb + h * D, row + (h / G) * D, D)
                                                   : dot(qb + h * D, row, (h / G) * D, D, 0)) * scale;
            } else {
                for (int h = 0; h < nh; h++) s[h * scratch_len + t] = dot(qb + h * D, kv, k + (h / G) * D, D, 0) * scale;
            }
        }
        float inv[256];  /* nh <= 256 (checked by the caller) */
        for (int h = 0; h < nh; h++) {
            float *sh = s + h * scratch_len, m = -INFINITY;
            for (int t = 0; t < n; t++) m = sh[t] > m ? sh[t] : m;
            inv[h] = 1.f / exp_sub_sum(sh, m, n);
        }
        float *ob = BF ? of : (float *)out + qo;
        memset(ob, 0, sizeof(float) * nh * D);
        for (int t = 0; t < n; t++) {
            if (!row_bytes && t + 2 < n)
                prefetch_bytes((const char *)kv + (slot[t + 2] * tok + (int64_t)(KVH + g0) * D) * esz, D * esz);
            const int64_t v = slot[t] * tok + (int64_t)(KVH + g0) * D;
            if (BF) {
                widen(row, (const bf16 *)kv + v, per * D, 1);
                for (int h = 0; h < nh; h++) {
                    if (wide) axpy16(ob + h * D, s[h * scratch_len + t], row + (h / G) * D, D);
                    else axpy(ob + h * D, s[h * scratch_len + t], row, (h / G) * D, D, 0);
                }
            } else {
                for (int h = 0; h < nh; h++) axpy(ob + h * D, s[h * scratch_len + t], kv, v + (h / G) * D, D, 0);
            }
        }
        if (BF) {
            for (int h = 0; h < nh; h++)
                for (int i = 0; i < D; i++) st1(out, qo + h * D + i, ob[h * D + i] * inv[h], 1);
        } else {
            for (int h = 0; h < nh; h++)
                for (int i = 0; i < D; i++) ob[h * D + i] *= inv[h];
        }
    }
}

/* RMSNorm of each of T rows of N: out = x * rsqrt(mean(x^2) + eps) * w.
 * With res != NULL, the input row is x + res, which is also written to res_out (in bf16 the
 * norm is taken of that rounded sum, as a bf16 model's residual stream holds it). */
INLINE void rmsnorm(const void *x, const void *res, const void *w, void *out, void *res_out,
                    int T, int N, int64_t x_stride, float eps, int BF) {
    float row[BF ? N : 1];
    for (int r = 0; r < T; r++) {
        const int64_t xo = r * x_stride, o = (int64_t)r * N;
        float *src;
        if (BF) {
            for (int i = 0; i < N; i++) {
                float v = ld1(x, xo + i, 1);
                if (res) {
                    st1(res_out, o + i, v + ld1(res, o + i, 1), 1);
                    v = ld1(res_out, o + i, 1);
                }
                row[i] = v;
            }
            src = row;
        } else {
            src = (float *)out + o;
            if (res) {
                src = (float *)res_out + o;
                for (int i = 0; i < N; i++) src[i] = ((const float *)x)[xo + i] + ((const float *)res)[o + i];
            } else {
                memcpy(src, (const float *)x + xo, sizeof(float) * N);
            }
        }
        float ss = dot(src, src, 0, N, 0);
        float k = 1.f / sqrtf(ss / N + eps);
        for (int i = 0; i < N; i++) st1(out, o + i, src[i] * k * ld1(w, i, BF), BF);
    }
}

/* Neox rotary in place on q [T, H, D] and k [T, KVH, D] (token and head strides free, last
 * dim contiguous), with cos_sin [P, D] fp32: cos of the D/2 frequencies, then sin. */
INLINE void rotary(const int64_t *pos, void *q, void *k, const float *cos_sin, int T, int H, int KVH,
                   int D, int64_t q_stride, int64_t q_head_stride, int64_t k_stride, int64_t k_head_stride,
                   int BF) {
    const int half = D / 2;
    for (int t = 0; t < T; t++) {
        const float *c = cos_sin + pos[t] * D, *sn = c + half;
        for (int which = 0; which < 2; which++) {
            void *base = which ? k : q;
            const int heads = which ? KVH : H;
            const int64_t stride = which ? k_stride : q_stride, head_stride = which ? k_head_stride : q_head_stride;
            for (int h = 0; h < heads; h++) {
                const int64_t x1 = t * stride + h * head_stride, x2 = x1 + half;
                for (int i = 0; i < half; i++) {
                    const float a = ld1(base, x1 + i, BF), b = ld1(base, x2 + i, BF);
                    st1(base, x1 + i, a * c[i] - b * sn[i], BF);
                    st1(base, x2 + i, b * c[i] + a * sn[i], BF);
                }
            }
        }
    }
}

/* out [T, I] = silu(x[:, :I]) * x[:, I:], x [T, 2I] */
INLINE void silu_and_mul(const void *x, void *out, int T, int I, int BF) {
    for (int t = 0; t < T; t++) {
        const int64_t g = (int64_t)t * 2 * I, u = g + I, o = (int64_t)t * I;
        int i = 0;
        for (; i + 8 <= I; i += 8) {
            vf8 gv = ld8(x, g + i, BF);
            st8(out, o + i, gv / (1.f + exp8(-gv)) * ld8(x, u + i, BF), BF);
        }
        for (; i < I; i++) {
            const float gs = ld1(x, g + i, BF);
            st1(out, o + i, gs / (1.f + expf(-gs)) * ld1(x, u + i, BF), BF);
        }
    }
}

/* The exported kernels: each body specialised for fp32 (BF = 0) and bf16 (BF = 1). */
#define UNPACK(...) __VA_ARGS__
#define EXPORT_BOTH(NAME, PARAMS, ARGS) \
    void rf_##NAME PARAMS { NAME(UNPACK ARGS, 0); } \
    void rf_##NAME##_bf16 PARAMS { NAME(UNPACK ARGS, 1); }

EXPORT_BOTH(decode_attention,
            (const void *q, const void *kv, const int32_t *table, int64_t table_stride, const int64_t *rows,
             const int32_t *lens, void *out, float *scratch, int64_t scratch_len, int B, int H, int KVH,
             int D, float scale),
            (q, kv, table, table_stride, rows, lens, out, scratch, scratch_len, B, H, KVH, D, scale))
EXPORT_BOTH(rmsnorm,
            (const void *x, const void *res, const void *w, void *out, void *res_out, int T, int N,
             int64_t x_stride, float eps),
            (x, res, w, out, res_out, T, N, x_stride, eps))
EXPORT_BOTH(rotary,
            (const int64_t *pos, void *q, void *k, const float *cos_sin, int T, int H, int KVH, int D,
             int64_t q_stride, int64_t q_head_stride, int64_t k_stride, int64_t k_head_stride),
            (pos, q, k, cos_sin, T, H, KVH, D, q_stride, q_head_stride, k_stride, k_head_stride))
EXPORT_BOTH(silu_and_mul, (const void *x, void *out, int T, int I), (x, out, T, I))
