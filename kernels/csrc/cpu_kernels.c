/* CPU kernels of pdserve, called through ctypes (kernels/cpu.py compiles this file).
 *
 * Paged attention: variable-length causal query chunks (decode rows and prefill
 * chunks in one call), K and V read in place through the block tables (no gather),
 * online softmax in float32. Row-wise fused ops: RMSNorm (+ residual), SiLU-and-mul,
 * rotary + KV store. The KV layout of one layer is
 * [num_blocks, 2, block_size, num_kv_heads, head_dim]; index 0 of dim 1 is K.
 * Element types: float32 ("f32") and bfloat16 ("bf16", stored as uint16). AVX-512
 * (and AVX512-BF16) code where the compiler targets it, portable C otherwise.
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline void load_f32(const float *src, float *dst, int n) { memcpy(dst, src, (size_t)n * sizeof(float)); }
static inline void store_f32(const float *src, float *dst, int n) { memcpy(dst, src, (size_t)n * sizeof(float)); }

static inline void load_bf16(const uint16_t *src, float *dst, int n) {
    for (int i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
}
static inline void store_bf16(const float *src, uint16_t *dst, int n) {
    for (int i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
}

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define PREFETCH_BLOCKS 2  /* how far ahead in a block table the next reads are requested */

ALWAYS_INLINE float dot_f32(const float *a, const float *b, int n) {
    float acc = 0.f;
#pragma omp simd reduction(+:acc)
    for (int i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

ALWAYS_INLINE void axpy_f32(float p, const float *x, float *y, int n) {
#pragma omp simd
    for (int i = 0; i < n; i++) y[i] += p * x[i];
}

/* exp(x), vectorizable (no calls, no branches): 2^(x log2 e) with a degree-6 polynomial
 * for the fraction; relative error ~2e-7; the exponent is clamped to [-126, 126]. */
ALWAYS_INLINE float exp_approx(float x) {
    float t = x * 1.44269504f;
    t = t < -126.f ? -126.f : (t > 126.f ? 126.f : t);
    float fl = (float)(int)t;
    fl = fl > t ? fl - 1.f : fl;  /* floor */
    float f = t - fl, r = 1.5403530e-4f;
    r = r * f + 1.3333558e-3f;
    r = r * f + 9.6181291e-3f;
    r = r * f + 5.5504109e-2f;
    r = r * f + 2.4022651e-1f;
    r = r * f + 6.9314718e-1f;
    r = r * f + 1.0f;
    int32_t bits = ((int32_t)fl + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return r * scale;
}

/* exp for x <= 0 (softmax weights after subtracting the max): 0 below -87. */
ALWAYS_INLINE float exp_neg(float x) { return x < -87.f ? 0.f : exp_approx(x); }

/* Online softmax update of one head over n scores (overwritten with their weights):
 * rescales acc[d] and returns the new running max through *m, the sum through *l. */
ALWAYS_INLINE void softmax_update(float *s, int n, float *m, float *l, float *acc, int d) {
    float mx = *m;
    for (int t = 0; t < n; t++) mx = s[t] > mx ? s[t] : mx;
    float corr = exp_neg(*m - mx), sum = 0.f;
#pragma omp simd reduction(+:sum)
    for (int t = 0; t < n; t++) { s[t] = exp_neg(s[t] - mx); sum += s[t]; }
#pragma omp simd
    for (int i = 0; i < d; i++) acc[i] *= corr;
    *l = *l * corr + sum;
    *m = mx;
}

/* One block of one KV head for its `group` query heads: scores, softmax update, P.V.
 * kf/vf are the block's K and V in float32, token stride `tok`; s is group * bs. */
ALWAYS_INLINE void attend_block(const float *qf, const float *kf, const float *vf, int n, int tok,
                                int group, int d, int bs, float *s, float *m, float *l, float *acc) {
    for (int t = 0; t < n; t++)
        for (int g = 0; g < group; g++) s[g * bs + t] = dot_f32(qf + g * d, kf + t * tok, d);
    for (int g = 0; g < group; g++) softmax_update(s + g * bs, n, m + g, l + g, acc + g * d, d);
    for (int t = 0; t < n; t++)
        for (int g = 0; g < group; g++) axpy_f32(s[g * bs + t], vf + t * tok, acc + g * d, d);
}

/* Head sizes with their own compiled copy (constant trip counts unroll into registers). */
static void attend_block_any(const float *qf, const float *kf, const float *vf, int n, int tok,
                             int group, int d, int bs, float *s, float *m, float *l, float *acc) {
    if (d == 64) attend_block(qf, kf, vf, n, tok, group, 64, bs, s, m, l, acc);
    else if (d == 128) attend_block(qf, kf, vf, n, tok, group, 128, bs, s, m, l, acc);
    else attend_block(qf, kf, vf, n, tok, group, d, bs, s, m, l, acc);
}

/* One query row (portable C): every query head over the row's `len` keys, one block
 * at a time (K and V of a block converted to float32 once for all heads). Scratch:
 * qf[Hq*D], acc[Hq*D], kf[bs*Hkv*D], vf[bs*Hkv*D], s[group*bs], m[Hq], l[Hq]. */
#define DECODE_TASK(NAME, T, LOAD, STORE)                                                      \
static void NAME(const T *q, const T *kv, const int32_t *table, int len, T *out,             \
                 int hq, int hkv, int d, int bs, size_t stride, float scale, float *scratch) {             \
    int group = hq / hkv, tok = hkv * d;                                                     \
    float *qf = scratch, *acc = qf + hq * d, *kf = acc + hq * d, *vf = kf + bs * tok;       \
    float *s = vf + bs * tok, *m = s + group * bs, *l = m + hq;                              \
    LOAD(q, qf, hq * d);                                                                     \
    for (int i = 0; i < hq * d; i++) { qf[i] *= scale; acc[i] = 0.f; }                       \
    for (int g = 0; g < hq; g++) { m[g] = -INFINITY; l[g] = 0.f; }                           \
    for (int j = 0; j * bs < len; j++) {                                                     \
        int n = len - j * bs < bs ? len - j * bs : bs;                                       \
        const T *kb = kv + (size_t)table[j] * stride;                                  \
        LOAD(kb, kf, n * tok);                                                               \
        LOAD(kb + (size_t)bs * tok, vf, n * tok);                                            \
        for (int h = 0; h < hkv; h++)                                                        \
            attend_block_any(qf + h * group * d, kf + h * d, vf + h * d, n, tok, group, d,  \
                             bs, s, m + h * group, l + h * group, acc + h * group * d);     \
    }                                                                                        \
    for (int hd = 0; hd < hq; hd++) {                                                        \
        float inv = 1.f / l[hd], *ah = acc + hd * d;                                         \
        for (int i = 0; i < d; i++) ah[i] *= inv;                                            \
    }                                                                                        \
    STORE(acc, out, hq * d);                                                                 \
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* r[t] = sum of the 16 lanes of a[t], t = 0..15, in 45 instructions (no per-vector
 * horizontal reduction). */
static inline __m512 reduce16(const __m512 *a) {
    __m512 b[8], c[4];
    for (int k = 0; k < 8; k++)
        b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
    for (int k = 0; k < 4; k++) {
        __m512d x = _mm512_castps_pd(b[2 * k]), y = _mm512_castps_pd(b[2 * k + 1]);
        c[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    __m512 f01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
    __m512 f23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(f01, f23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(f01, f23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* exp(x) for x <= 88 (0 below -100): 2^(x log2 e), degree-6 polynomial on the fraction, scalef for the
 * exponent; relative error ~2e-7. */
static inline __m512 exp512(__m512 x) {
    __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-100.f)), _mm512_set1_ps(1.44269504f));
    __m512 fl = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, fl), r = _mm512_set1_ps(1.5403530e-4f);
    r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(1.3333558e-3f));
    r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(9.6181291e-3f));
    r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(5.5504109e-2f));
    r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(2.4022651e-1f));
    r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(6.9314718e-1f));
    r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(r, fl);
}

static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* Scores of up to 16 tokens (rows of k, stride tok) against one query row; lanes past
 * n are -inf. f32: FMA over D; bf16: dot products of bf16 pairs (AVX512-BF16). */
static inline __m512 scores16_f32(const float *q, const float *k, int n, int tok, int d, float scale) {
    __m512 acc[16];
    for (int t = 0; t < 16; t++) {
        acc[t] = _mm512_setzero_ps();
        if (t < n)
            for (int i = 0; i < d; i += 16)
                acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(k + (size_t)t * tok + i), acc[t]);
    }
    __m512 s = _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale));
    return _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), (__mmask16)((1u << n) - 1u), s);
}

#if defined(__AVX512BF16__)
static inline __m512 scores16_bf16(const uint16_t *q, const uint16_t *k, int n, int tok, int d, float scale) {
    __m512 acc[16];
    for (int t = 0; t < 16; t++) {
        acc[t] = _mm512_setzero_ps();
        if (t < n)
            for (int i = 0; i < d; i += 32)
                acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_loadu_si512(q + i),
                                          (__m512bh)_mm512_loadu_si512(k + (size_t)t * tok + i));
    }
    __m512 s = _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale));
    return _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), (__mmask16)((1u << n) - 1u), s);
}
#define HAVE_BF16_VEC 1
#endif

/* Up to 16 tokens of one KV head for its `group` query heads: scores, online softmax,
 * P.V into acc[group * d] (float32). */
#define CHUNK_VEC(NAME, T, SCORES, LOADV)                                                      \
static inline void NAME(const T *q, const T *k, const T *v, int n, int tok, int group, int d, \
                        float scale, float *m, float *l, float *acc) {                       \
    float p[group][16];                                                                      \
    for (int g = 0; g < group; g++) {                                                        \
        __m512 s = SCORES(q + (size_t)g * d, k, n, tok, d, scale);                           \
        float mx = _mm512_reduce_max_ps(s);                                                  \
        mx = m[g] > mx ? m[g] : mx;                                                          \
        __m512 e = exp512(_mm512_sub_ps(s, _mm512_set1_ps(mx)));                             \
        e = _mm512_maskz_mov_ps((__mmask16)((1u << n) - 1u), e);                             \
        float corr = m[g] == -INFINITY ? 0.f : expf(m[g] - mx);                              \
        l[g] = l[g] * corr + _mm512_reduce_add_ps(e);                                        \
        m[g] = mx;                                                                           \
        _mm512_storeu_ps(p[g], e);                                                           \
        __m512 c = _mm512_set1_ps(corr);                                                     \
        for (int i = 0; i < d; i += 16)                                                      \
            _mm512_storeu_ps(acc + g * d + i, _mm512_mul_ps(_mm512_loadu_ps(acc + g * d + i), c)); \
    }                                                                                        \
    for (int t = 0; t < n; t++)                                                              \
        for (int i = 0; i < d; i += 16) {                                                    \
            __m512 vv = LOADV(v + (size_t)t * tok + i);                                      \
            for (int g = 0; g < group; g++) {                                                \
                float *a = acc + g * d + i;                                                  \
                _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(p[g][t]), vv, _mm512_loadu_ps(a))); \
            }                                                                                \
        }                                                                                    \
}

CHUNK_VEC(chunk_vec_f32, float, scores16_f32, load16_f32)
#ifdef HAVE_BF16_VEC
CHUNK_VEC(chunk_vec_bf16, uint16_t, scores16_bf16, load16_bf16)

/* vp[tp][x / 16] = head dims x..x+15 of tokens 2tp and 2tp+1 as bf16 pairs (tokens past
 * n are zeros, never read): P.V then runs as dot products of bf16 pairs. */
static inline void pair_values_bf16(const uint16_t *v, int n, int tok, int d, __m512i *vp) {
    static const uint16_t lo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                     8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    static const uint16_t hi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                     24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
    __m512i lo_idx = _mm512_loadu_si512(lo), hi_idx = _mm512_loadu_si512(hi);
    for (int tp = 0; tp < 8; tp++)
        for (int x = 0; x < d; x += 32) {
            int ta = 2 * tp, tb = 2 * tp + 1;
            __m512i a = ta < n ? _mm512_loadu_si512(v + (size_t)ta * tok + x) : _mm512_setzero_si512();
            __m512i b = tb < n ? _mm512_loadu_si512(v + (size_t)tb * tok + x) : _mm512_setzero_si512();
            vp[tp * (d / 16) + x / 16] = _mm512_permutex2var_epi16(a, lo_idx, b);
            vp[tp * (d / 16) + x / 16 + 1] = _mm512_permutex2var_epi16(a, hi_idx, b);
        }
}

/* chunk_vec_bf16 with P.V as bf16 pair dot products (P rounded to bf16, as torch's
 * bf16 attention does): V is paired once for the group's heads, the accumulators stay
 * in registers across the chunk's tokens. d % 64 == 0, d <= 256. */
static inline void chunk_pair_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, int n, int tok,
                                   int group, int d, float scale, float *m, float *l, float *acc) {
    __m512i vp[8 * 16];
    pair_values_bf16(v, n, tok, d, vp);
    for (int g = 0; g < group; g++) {
        __m512 s = scores16_bf16(q + (size_t)g * d, k, n, tok, d, scale);
        float mx = _mm512_reduce_max_ps(s);
        mx = m[g] > mx ? m[g] : mx;
        __m512 e = exp512(_mm512_sub_ps(s, _mm512_set1_ps(mx)));
        e = _mm512_maskz_mov_ps((__mmask16)((1u << n) - 1u), e);
        float corr = m[g] == -INFINITY ? 0.f : expf(m[g] - mx);
        l[g] = l[g] * corr + _mm512_reduce_add_ps(e);
        m[g] = mx;
        int32_t pp[8];
        _mm256_storeu_si256((__m256i *)pp, (__m256i)_mm512_cvtneps_pbh(e));
        float *ag = acc + (size_t)g * d;
        for (int x0 = 0; x0 < d; x0 += 64) {
            __m512 a[4];
            for (int u = 0; u < 4; u++) a[u] = _mm512_mul_ps(_mm512_loadu_ps(ag + x0 + 16 * u), _mm512_set1_ps(corr));
            for (int tp = 0; 2 * tp < n; tp++) {
                __m512bh pb = (__m512bh)_mm512_set1_epi32(pp[tp]);
                for (int u = 0; u < 4; u++)
                    a[u] = _mm512_dpbf16_ps(a[u], pb, (__m512bh)vp[tp * (d / 16) + x0 / 16 + u]);
            }
            for (int u = 0; u < 4; u++) _mm512_storeu_ps(ag + x0 + 16 * u, a[u]);
        }
    }
}

/* bf16 chunks: pair P.V where the head size allows, else the plain vector chunk. */
static inline void chunk_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, int n, int tok,
                              int group, int d, float scale, float *m, float *l, float *acc) {
    if (d % 64 == 0 && d <= 256) chunk_pair_bf16(q, k, v, n, tok, group, d, scale, m, l, acc);
    else chunk_vec_bf16(q, k, v, n, tok, group, d, scale, m, l, acc);
}
#endif

/* Per-row online-softmax state of a tile, rows `per` floats apart: acc[Hq*D], m[Hq], l[Hq]. */
static void init_rows(float *scratch, int rows, int per, int hq, int d) {
    for (int r = 0; r < rows; r++) {
        float *acc = scratch + (size_t)r * per, *m = acc + hq * d, *l = m + hq;
        for (int i = 0; i < hq * d; i++) acc[i] = 0.f;
        for (int g = 0; g < hq; g++) { m[g] = -INFINITY; l[g] = 0.f; }
    }
}

/* acc /= l for every head of every row, in place (the caller stores the rows). */
static void normalize_rows(float *scratch, int rows, int per, int hq, int d) {
    for (int r = 0; r < rows; r++) {
        float *acc = scratch + (size_t)r * per, *l = acc + hq * d + hq;
        for (int hd = 0; hd < hq; hd++) {
            float inv = 1.f / l[hd], *ah = acc + hd * d;
            for (int i = 0; i < d; i++) ah[i] *= inv;
        }
    }
}

/* A tile of consecutive query rows of one sequence, vectorized: row r attends keys
 * [0, ctx0 + r). Blocks are walked once for the whole tile (a block stays in cache
 * while every row that needs it reads it), 16 tokens at a time, every KV head.
 * Scratch per row: acc[Hq*D], m[Hq], l[Hq]. Output rows are rounded to T. */
#define ATTN_VEC_TILE(NAME, T, CHUNK, STORE)                                                    \
static void NAME(const T *q, long sq, const T *kv, size_t stride, const int32_t *table,      \
                 int ctx0, int rows, T *out, int hq, int hkv, int d, int bs, float scale,    \
                 float *scratch) {                                                           \
    int group = hq / hkv, tok = hkv * d, per = hq * d + 2 * hq, last = ctx0 + rows - 1;       \
    init_rows(scratch, rows, per, hq, d);                                                    \
    for (int j = 0; j * bs < last; j++) {                                                    \
        const T *kb = kv + (size_t)table[j] * stride, *vb = kb + (size_t)bs * tok;           \
        const char *ahead = (j + PREFETCH_BLOCKS) * bs < last                                  \
            ? (const char *)(kv + (size_t)table[j + PREFETCH_BLOCKS] * stride) : NULL;         \
        size_t ahead_bytes = (size_t)2 * bs * tok * sizeof(T), ahead_done = 0;               \
        int quota = (int)(ahead_bytes / 64 / (hkv * ((bs + 15) / 16))) + 1;                   \
        int first = j * bs + 1 - ctx0 > 0 ? j * bs + 1 - ctx0 : 0;                           \
        for (int r = first; r < rows; r++) {                                                 \
            int n = ctx0 + r - j * bs < bs ? ctx0 + r - j * bs : bs;                         \
            float *acc = scratch + (size_t)r * per, *m = acc + hq * d, *l = m + hq;          \
            for (int t0 = 0; t0 < n; t0 += 16) {                                             \
                int c = n - t0 < 16 ? n - t0 : 16;                                           \
                for (int h = 0; h < hkv; h++) {                                              \
                    /* spread over the block's work, not in one burst that fills the queues */  \
                    for (int x = 0; ahead && x < quota && ahead_done < ahead_bytes; x++, ahead_done += 64) \
                        __builtin_prefetch(ahead + ahead_done, 0, 2);                         \
                    CHUNK(q + r * sq + (size_t)h * group * d, kb + (size_t)t0 * tok + h * d, \
                          vb + (size_t)t0 * tok + h * d, c, tok, group, d, scale,            \
                          m + h * group, l + h * group, acc + (size_t)h * group * d);       \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        for (; ahead && ahead_done < ahead_bytes; ahead_done += 64) __builtin_prefetch(ahead + ahead_done, 0, 2); \
    }                                                                                        \
    normalize_rows(scratch, rows, per, hq, d);                                               \
    for (int r = 0; r < rows; r++) STORE(scratch + (size_t)r * per, out + (size_t)r * hq * d, hq * d); \
}

ATTN_VEC_TILE(attn_vec_tile_f32, float, chunk_vec_f32, store_f32)
#ifdef HAVE_BF16_VEC
ATTN_VEC_TILE(attn_vec_tile_bf16, uint16_t, chunk_bf16, store_bf16)
#endif

#ifdef HAVE_BF16_VEC
/* Four (row, head) pairs against one 16-token chunk (kt, vp as in attn_pair_tile_bf16):
 * scores, online softmax update, P.V; the four are independent, so their chains overlap. */
static inline void pair_chunk4(const int32_t *const *qd, const __m512i *kt, const __m512i *vp,
                               const __mmask16 *keep, int d, float scale, float *const *acc,
                               float *const *m, float *const *l) {
    __m512 sc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int i = 0; i < d / 2; i++) {
        __m512bh k = (__m512bh)kt[i];
        for (int u = 0; u < 4; u++) sc[u] = _mm512_dpbf16_ps(sc[u], (__m512bh)_mm512_set1_epi32(qd[u][i]), k);
    }
    int32_t pp[4][8];
    float corr[4];
    for (int u = 0; u < 4; u++) {
        __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), keep[u], _mm512_mul_ps(sc[u], _mm512_set1_ps(scale)));
        float mx = _mm512_reduce_max_ps(s);
        mx = *m[u] > mx ? *m[u] : mx;
        __m512 e = _mm512_maskz_mov_ps(keep[u], exp512(_mm512_sub_ps(s, _mm512_set1_ps(mx))));
        corr[u] = *m[u] == -INFINITY ? 0.f : expf(*m[u] - mx);
        *l[u] = *l[u] * corr[u] + _mm512_reduce_add_ps(e);
        *m[u] = mx;
        _mm256_storeu_si256((__m256i *)pp[u], (__m256i)_mm512_cvtneps_pbh(e));
    }
    for (int x = 0; x < d; x += 16) {
        __m512 a[4];
        for (int u = 0; u < 4; u++) a[u] = _mm512_mul_ps(_mm512_loadu_ps(acc[u] + x), _mm512_set1_ps(corr[u]));
        for (int tp = 0; tp < 8; tp++) {
            __m512bh v = (__m512bh)vp[tp * (d / 16) + x / 16];
            for (int u = 0; u < 4; u++) a[u] = _mm512_dpbf16_ps(a[u], (__m512bh)_mm512_set1_epi32(pp[u][tp]), v);
        }
        for (int u = 0; u < 4; u++) _mm512_storeu_ps(acc[u] + x, a[u]);
    }
}

/* Prefill tile in bfloat16: both products as dot products of bf16 pairs. Per 16-token
 * chunk of one KV head, K is transposed once into pairs of head dims per token
 * (kt[i] = dims 2i, 2i+1 of 16 tokens) and V into pairs of tokens per head dim
 * (vp[j] = tokens 2j, 2j+1 of each dim), then every row x head of the tile reuses them:
 * 16 scores cost D/2 instructions and P.V D/2 more. P is rounded to bf16 for P.V, as
 * torch's attention does for bf16. Scratch per row: acc[Hq*D], m[Hq], l[Hq]; then
 * kt and vp for one chunk. */
static void attn_pair_tile_bf16(const uint16_t *q, long sq, const uint16_t *kv, size_t stride,
                                const int32_t *table, int ctx0, int rows, uint16_t *out, int hq, int hkv,
                                int d, int bs, float scale, float *scratch) {
    int group = hq / hkv, tok = hkv * d, per = hq * d + 2 * hq, last = ctx0 + rows - 1, pairs = d / 2;
    __m512i *kt = (__m512i *)(((uintptr_t)(scratch + (size_t)rows * per) + 63) & ~(uintptr_t)63);
    __m512i *vp = kt + pairs;  /* [8 token pairs][d / 16] */
    float *spare = (float *)(vp + 8 * (d / 16));  /* a row's worth for the dropped pairs */
    init_rows(scratch, rows, per, hq, d);
    __m512i gather_idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(tok / 2));
    for (int j = 0; j * bs < last; j++) {
        const uint16_t *kb = kv + (size_t)table[j] * stride, *vb = kb + (size_t)bs * tok;
        int n = last - j * bs < bs ? last - j * bs : bs;
        for (int t0 = 0; t0 < n; t0 += 16) {
            int c = n - t0 < 16 ? n - t0 : 16;
            __mmask16 valid = (__mmask16)((1u << c) - 1u);
            for (int h = 0; h < hkv; h++) {
                const uint16_t *k0 = kb + (size_t)t0 * tok + h * d, *v0 = vb + (size_t)t0 * tok + h * d;
                for (int i = 0; i < pairs; i++)
                    kt[i] = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, gather_idx,
                                                        (const int *)k0 + i, 4);
                pair_values_bf16(v0, c, tok, d, vp);
                int first = j * bs + t0 + 1 - ctx0 > 0 ? j * bs + t0 + 1 - ctx0 : 0;
                int jobs = (rows - first) * group;  /* (row, head) pairs reading this chunk */
                for (int job0 = 0; job0 < jobs; job0 += 4) {
                    const int32_t *qd[4];
                    float *acc[4], *m[4], *l[4];
                    __mmask16 keep[4];
                    for (int u = 0; u < 4; u++) {  /* past the end: repeat the last pair, results dropped */
                        int k = job0 + u < jobs ? job0 + u : jobs - 1, r = first + k / group, hd = h * group + k % group;
                        int seen = ctx0 + r - (j * bs + t0);
                        keep[u] = seen >= c ? valid : (__mmask16)((1u << seen) - 1u);
                        qd[u] = (const int32_t *)(q + r * sq + (size_t)hd * d);
                        float *row = job0 + u < jobs ? scratch + (size_t)r * per : spare;
                        acc[u] = row + (size_t)(job0 + u < jobs ? hd : 0) * d;
                        m[u] = row + hq * d + (job0 + u < jobs ? hd : 0);
                        l[u] = m[u] + hq;
                    }
                    pair_chunk4(qd, kt, vp, keep, d, scale, acc, m, l);
                }
            }
        }
    }
    normalize_rows(scratch, rows, per, hq, d);
    for (int r = 0; r < rows; r++) store_bf16(scratch + (size_t)r * per, out + (size_t)r * hq * d, hq * d);
}
#endif
#endif /* __AVX512F__ */

DECODE_TASK(decode_task_f32, float, load_f32, store_f32)
DECODE_TASK(decode_task_bf16, uint16_t, load_bf16, store_bf16)

/* The same tile in portable C: one row at a time (the query row is copied to float). */
#define ATTN_TILE(NAME, T, TASK)                                                                \
static void NAME(const T *q, long sq, const T *kv, size_t stride, const int32_t *table,      \
                 int ctx0, int rows, T *out, int hq, int hkv, int d, int bs, float scale,    \
                 float *scratch) {                                                           \
    for (int r = 0; r < rows; r++)                                                           \
        TASK(q + r * sq, kv, table, ctx0 + r, out + (size_t)r * hq * d, hq, hkv, d, bs, stride, scale, scratch); \
}
ATTN_TILE(attn_tile_f32, float, decode_task_f32)
ATTN_TILE(attn_tile_bf16, uint16_t, decode_task_bf16)

#define TILE_ROWS 32
#define PAIR_MIN_ROWS 4  /* tiles with fewer rows (decode) do not repay the pair transposes */

size_t pd_attention_scratch_floats(int hq, int hkv, int d, int bs) {
    size_t portable = (size_t)2 * hq * d + 2 * (size_t)bs * hkv * d + (size_t)(hq / hkv) * bs + 2 * (size_t)hq;
    size_t tile = (size_t)(TILE_ROWS + 1) * (hq * d + 2 * hq) + (size_t)(d / 2 + 8 * (d / 16)) * 16 + 16;
    return portable > tile ? portable : tile;
}

/* Causal attention of variable-length query chunks over the paged cache: sequence b
 * owns query rows qsl[b]..qsl[b+1], the last rows of its lens[b]-token context (a
 * decode step is one row). q rows are `sq` elements apart, heads contiguous; out is
 * [rows, hq, d]. Work is split in tiles of up to TILE_ROWS rows of one sequence;
 * scratch holds threads * pd_attention_scratch_floats(...) floats. */
#define ATTN_KERNEL(SUF, T, VEC, PAIR)                                                         \
void pd_paged_attention_##SUF(const T *q, long sq, const T *kv, size_t stride, const int32_t *tables, \
                              int width, const int32_t *qsl, const int32_t *lens, T *out,   \
                              int batch, int hq, int hkv, int d, int bs, float scale,       \
                              float *scratch, int threads) {                                 \
    int ntasks = 0;                                                                          \
    for (int b = 0; b < batch; b++) ntasks += (qsl[b + 1] - qsl[b] + TILE_ROWS - 1) / TILE_ROWS; \
    int task_seq[ntasks > 0 ? ntasks : 1], task_row[ntasks > 0 ? ntasks : 1], k = 0;         \
    for (int b = 0; b < batch; b++)                                                          \
        for (int r = qsl[b]; r < qsl[b + 1]; r += TILE_ROWS) { task_seq[k] = b; task_row[k++] = r; } \
    size_t per_thread = pd_attention_scratch_floats(hq, hkv, d, bs);                         \
    _Pragma("omp parallel for schedule(dynamic) num_threads(threads)")                       \
    for (int t = 0; t < ntasks; t++) {                                                       \
        int b = task_seq[t], r0 = task_row[t];                                               \
        int rows = qsl[b + 1] - r0 < TILE_ROWS ? qsl[b + 1] - r0 : TILE_ROWS;                \
        int ctx0 = lens[b] - (qsl[b + 1] - r0) + 1;                                          \
        (PAIR != NULL && d % 64 == 0 && rows >= PAIR_MIN_ROWS ? PAIR                          \
         : VEC != NULL && d % 32 == 0 ? VEC : attn_tile_##SUF)(                              \
            q + r0 * sq, sq, kv, stride, tables + (size_t)b * width, ctx0, rows,             \
            out + (size_t)r0 * hq * d, hq, hkv, d, bs, scale,                                \
            scratch + per_thread * (size_t)omp_get_thread_num());                           \
    }                                                                                        \
}

typedef void (*tile_fn_f32)(const float *, long, const float *, size_t, const int32_t *, int, int, float *,
                            int, int, int, int, float, float *);
typedef void (*tile_fn_bf16)(const uint16_t *, long, const uint16_t *, size_t, const int32_t *, int, int,
                             uint16_t *, int, int, int, int, float, float *);
#if defined(__AVX512F__)
static const tile_fn_f32 VEC_F32 = attn_vec_tile_f32;
#else
static const tile_fn_f32 VEC_F32 = NULL;
#endif
#ifdef HAVE_BF16_VEC
static const tile_fn_bf16 VEC_BF16 = attn_vec_tile_bf16;
#else
static const tile_fn_bf16 VEC_BF16 = NULL;
#endif

#ifdef HAVE_BF16_VEC
static const tile_fn_bf16 PAIR_BF16 = attn_pair_tile_bf16;
#else
static const tile_fn_bf16 PAIR_BF16 = NULL;
#endif
static const tile_fn_f32 PAIR_F32 = NULL;

ATTN_KERNEL(f32, float, VEC_F32, PAIR_F32)
ATTN_KERNEL(bf16, uint16_t, VEC_BF16, PAIR_BF16)

/* ---- Row-wise fused ops. Each rounds to the element type wherever the torch reference
 * (kernels/reference.py) rounds, so bfloat16 results match it to the last bit except
 * where a float32 sum is ordered differently. ---- */

#define ROUND_f32(x) (x)
#define ROUND_bf16(x) bf16_to_f32(f32_to_bf16(x))
#define GET_f32(p, i) ((p)[i])
#define GET_bf16(p, i) bf16_to_f32((p)[i])
#define PUT_f32(p, i, x) ((p)[i] = (x))
#define PUT_bf16(p, i, x) ((p)[i] = f32_to_bf16(x))

/* out = w * (h / rms(h)) with h = x (+ residual); res_out = h (as the reference returns it).
 * x, residual, out, res_out: [rows, n] with row strides; residual may be NULL. */
#define RMS_NORM(SUF, T)                                                                       \
void pd_rms_norm_##SUF(const T *x, long sx, const T *res, long sr, const T *w, T *out,       \
                       T *res_out, int rows, int n, float eps, int threads) {                \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                        \
    for (int r = 0; r < rows; r++) {                                                         \
        const T *xr = x + r * sx, *rr = res ? res + r * sr : NULL;                           \
        T *hr = res_out + (size_t)r * n, *orow = out + (size_t)r * n;                        \
        float ss = 0.f;                                                                      \
        _Pragma("omp simd reduction(+:ss)")                                                  \
        for (int i = 0; i < n; i++) {                                                        \
            float h = rr ? ROUND_##SUF(GET_##SUF(xr, i) + GET_##SUF(rr, i)) : GET_##SUF(xr, i); \
            PUT_##SUF(hr, i, h);                                                             \
            ss += h * h;                                                                     \
        }                                                                                    \
        float inv = 1.f / sqrtf(ss / n + eps);                                               \
        _Pragma("omp simd")                                                                  \
        for (int i = 0; i < n; i++)                                                          \
            PUT_##SUF(orow, i, GET_##SUF(w, i) * ROUND_##SUF(GET_##SUF(hr, i) * inv));       \
    }                                                                                        \
}

/* out[r, i] = silu(x[r, i]) * x[r, n + i], silu rounded first (as torch does). */
#if defined(__AVX512F__)
static inline __m512 silu512(__m512 a) {
    __m512 e = exp512(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), _mm512_set1_ps(88.f)));
    return _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}
#define SILU_VEC_f32(g, u, o, i, n)                                                            \
    for (; i + 16 <= n; i += 16)                                                             \
        _mm512_storeu_ps(o + i, _mm512_mul_ps(silu512(_mm512_loadu_ps(g + i)), _mm512_loadu_ps(u + i)));
#else
#define SILU_VEC_f32(g, u, o, i, n)
#endif
#if defined(HAVE_BF16_VEC)
static inline __m512 round_bf16_512(__m512 x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}
#define SILU_VEC_bf16(g, u, o, i, n)                                                           \
    for (; i + 16 <= n; i += 16) {                                                           \
        __m512 y = _mm512_mul_ps(round_bf16_512(silu512(load16_bf16(g + i))), load16_bf16(u + i)); \
        _mm256_storeu_si256((__m256i *)(o + i), (__m256i)_mm512_cvtneps_pbh(y));             \
    }
#else
#define SILU_VEC_bf16(g, u, o, i, n)
#endif
#define SILU_MUL(SUF, T)                                                                       \
void pd_silu_and_mul_##SUF(const T *x, long sx, T *out, int rows, int n, int threads) {      \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                        \
    for (int r = 0; r < rows; r++) {                                                         \
        const T *g = x + r * sx, *u = g + n;                                                 \
        T *o = out + (size_t)r * n;                                                          \
        int i = 0;                                                                           \
        SILU_VEC_##SUF(g, u, o, i, n)                                                        \
        for (; i < n; i++) {                                                                 \
            float a = GET_##SUF(g, i);                                                       \
            PUT_##SUF(o, i, ROUND_##SUF(a / (1.f + expf(-a))) * GET_##SUF(u, i));           \
        }                                                                                    \
    }                                                                                        \
}

/* Rotate-half rotary embedding of q and k in place, then k and v into the paged cache.
 * q [T, hq, d] (row stride sq), k and v [T, hkv, d] (row strides sk, sv), cos_sin
 * [max_pos, d] float32 (cos of the d/2 frequencies, then sin), cache blocks of
 * [2, bs, hkv, d] at `stride` elements apart; slot < 0: not stored. */
#define ROTARY_STORE(SUF, T)                                                                   \
static inline void rotate_##SUF(T *x, const float *cs, int d) {                              \
    int half = d / 2;                                                                        \
    for (int i = 0; i < half; i++) {                                                         \
        float c = ROUND_##SUF(cs[i]), s = ROUND_##SUF(cs[half + i]);                         \
        float a = GET_##SUF(x, i), b = GET_##SUF(x, half + i);                               \
        float lo = ROUND_##SUF(ROUND_##SUF(a * c) + ROUND_##SUF(-b * s));                    \
        float hi = ROUND_##SUF(ROUND_##SUF(b * c) + ROUND_##SUF(a * s));                     \
        PUT_##SUF(x, i, lo);                                                                 \
        PUT_##SUF(x, half + i, hi);                                                          \
    }                                                                                        \
}                                                                                            \
void pd_rotary_store_##SUF(T *q, long sq, T *k, long sk, const T *v, long sv,               \
                           const int64_t *pos, const float *cos_sin, T *cache, size_t stride, \
                           const int64_t *slots, int tokens, int hq, int hkv, int d, int bs,  \
                           int threads) {                                                    \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                        \
    for (int t = 0; t < tokens; t++) {                                                       \
        const float *cs = cos_sin + (size_t)pos[t] * d;                                      \
        for (int h = 0; h < hq; h++) rotate_##SUF(q + t * sq + (size_t)h * d, cs, d);        \
        for (int h = 0; h < hkv; h++) rotate_##SUF(k + t * sk + (size_t)h * d, cs, d);       \
        if (slots[t] < 0) continue;                                                          \
        T *dst = cache + (size_t)(slots[t] / bs) * stride + (size_t)(slots[t] % bs) * hkv * d; \
        memcpy(dst, k + t * sk, (size_t)hkv * d * sizeof(T));                                \
        memcpy(dst + (size_t)bs * hkv * d, v + t * sv, (size_t)hkv * d * sizeof(T));         \
    }                                                                                        \
}

RMS_NORM(f32, float)
RMS_NORM(bf16, uint16_t)
SILU_MUL(f32, float)
SILU_MUL(bf16, uint16_t)
ROTARY_STORE(f32, float)
ROTARY_STORE(bf16, uint16_t)
