/* CPU kernels of pdserve, called through ctypes (kernels/cpu.py compiles this file).
 *
 * Paged attention: variable-length causal query chunks (decode rows and prefill
 * chunks in one call), K and V read in place through the block tables (no gather),
 * online softmax in float32. Row-wise fused ops: RMSNorm (+ residual), SiLU-and-mul,
 * rotary + KV store. W8A8: per-token int8 quantization (alone and fused into RMSNorm
 * and SiLU-and-mul) and the int8 GEMM over a pre-packed weight (AVX512-VNNI, AVX2). Dense
 * float32 / bfloat16 linear layers over a weight packed at load (FMA, AVX512-BF16). The LoRA
 * delta of a layer (every adapter slot and part in one call). The KV layout of one layer is
 * [num_blocks, 2, block_size, num_kv_heads, head_dim]; index 0 of dim 1 is K.
 * Element types: float32 ("f32") and bfloat16 ("bf16", stored as uint16). AVX-512
 * (and AVX512-BF16) code where the compiler targets it, portable C otherwise.
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
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

/* 2^f for f in [0, 1): a degree-6 polynomial (relative error ~2e-7) in Horner steps, written
 * once for every vector width: MULADD(a, b, c) = a * b + c, SET(c) the constant c. */
#define EXP2_FRACTION(f, MULADD, SET)                                                        \
    MULADD(MULADD(MULADD(MULADD(MULADD(MULADD(SET(1.5403530e-4f), f, SET(1.3333558e-3f)), f, \
    SET(9.6181291e-3f)), f, SET(5.5504109e-2f)), f, SET(2.4022651e-1f)), f, SET(6.9314718e-1f)), f, SET(1.0f))
#define SCALAR_MULADD(a, b, c) ((a) * (b) + (c))
#define SCALAR_SET(c) (c)

/* exp(x), vectorizable (no calls, no branches): 2^(x log2 e) with a degree-6 polynomial
 * for the fraction; relative error ~2e-7; the exponent is clamped to [-126, 126]. */
ALWAYS_INLINE float exp_approx(float x) {
    float t = x * 1.44269504f;
    t = t < -126.f ? -126.f : (t > 126.f ? 126.f : t);
    float fl = (float)(int)t;
    fl = fl > t ? fl - 1.f : fl;  /* floor */
    float f = t - fl, r = EXP2_FRACTION(f, SCALAR_MULADD, SCALAR_SET);
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

/* A query row's online-softmax state: q (in float) scaled, accumulators zero, no max yet;
 * then, after every block, each head's accumulator divided by its sum. */
ALWAYS_INLINE void row_start(float *qf, float *acc, float *m, float *l, int hq, int d, float scale) {
    for (int i = 0; i < hq * d; i++) { qf[i] *= scale; acc[i] = 0.f; }
    for (int g = 0; g < hq; g++) { m[g] = -INFINITY; l[g] = 0.f; }
}

ALWAYS_INLINE void row_finish(float *acc, const float *l, int hq, int d) {
    for (int hd = 0; hd < hq; hd++) {
        float inv = 1.f / l[hd], *ah = acc + hd * d;
        for (int i = 0; i < d; i++) ah[i] *= inv;
    }
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
    row_start(qf, acc, m, l, hq, d, scale);                                                 \
    for (int j = 0; j * bs < len; j++) {                                                     \
        int n = len - j * bs < bs ? len - j * bs : bs;                                       \
        const T *kb = kv + (size_t)table[j] * stride;                                  \
        LOAD(kb, kf, n * tok);                                                               \
        LOAD(kb + (size_t)bs * tok, vf, n * tok);                                            \
        for (int h = 0; h < hkv; h++)                                                        \
            attend_block_any(qf + h * group * d, kf + h * d, vf + h * d, n, tok, group, d,  \
                             bs, s, m + h * group, l + h * group, acc + h * group * d);     \
    }                                                                                        \
    row_finish(acc, l, hq, d);                                                               \
    STORE(acc, out, hq * d);                                                                 \
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* Horizontal sums of 16 vectors without a per-vector reduction (45 instructions):
 * reduce4 leaves the partial sums of a[0..3] in the 4 lanes of each 128-bit lane, and
 * reduce_join(x, y) makes of two such results for tokens a0..a3 and b0..b3 one for
 * a0..a3, b0..b3 with half as many partial sums: join(join(c0, c1), join(c2, c3)) has
 * the 16 full sums. */
static inline __m512 reduce4(const __m512 *a) {
    __m512 b0 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
    __m512 b1 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
    __m512d x = _mm512_castps_pd(b0), y = _mm512_castps_pd(b1);
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
}

static inline __m512 reduce_join(__m512 x, __m512 y) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* exp(x) for x <= 88 (0 below -100): 2^(x log2 e), degree-6 polynomial on the fraction, scalef for the
 * exponent; relative error ~2e-7. */
static inline __m512 exp512(__m512 x) {
    __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-100.f)), _mm512_set1_ps(1.44269504f));
    __m512 fl = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, fl), r = EXP2_FRACTION(f, _mm512_fmadd_ps, _mm512_set1_ps);
    return _mm512_scalef_ps(r, fl);
}

static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* acc += a * b over 16 float32 lanes / 32 bf16 lanes in pairs (vectors as loaded). */
static inline __m512 fma_f32(__m512 acc, __m512i a, __m512i b) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc);
}

#if defined(__AVX512BF16__)
static inline __m512 dot_bf16(__m512 acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}
#define HAVE_BF16_VEC 1
#endif

/* Decode rows take the cache in spans of up to SPAN_CHUNKS chunks of up to 16 tokens
 * (a chunk never crosses a block), one online-softmax update per span and query head:
 * per chunk, scores -> max -> exp -> sum -> rescale -> P.V is one long dependent chain,
 * so a span puts several chunks' independent work between the updates. The query heads
 * of a KV head go in tiles of up to 3 (HEADS_MAX) that share each K and V load. */
#define SPAN_CHUNKS 4
#define HEADS_MAX 3

typedef struct {
    const char *k[SPAN_CHUNKS];  /* K of the chunk's first token (head 0); V is bs tokens on */
    int start[SPAN_CHUNKS], cnt[SPAN_CHUNKS], nch, end;  /* end: the token after the span */
} span_t;

/* The span of a sequence's cache from token p, up to token `last` (byte strides). */
static inline void span_at(span_t *s, const char *kv, size_t stride, const int32_t *table, int bs,
                           size_t tok_bytes, int p, int last) {
    for (s->nch = 0; s->nch < SPAN_CHUNKS && p < last; s->nch++) {
        int off = p % bs, c = bs - off < 16 ? bs - off : 16;
        c = last - p < c ? last - p : c;
        s->k[s->nch] = kv + (size_t)table[p / bs] * stride + off * tok_bytes;
        s->start[s->nch] = p;
        s->cnt[s->nch] = c;
        p += c;
    }
    s->end = p;
}

/* Asks for a span's K and V rows into L2, `lines` cache lines per step: spread over
 * the work of the span before it, not in one burst that fills the queues. */
typedef struct { const char *at[2 * SPAN_CHUNKS]; size_t len[2 * SPAN_CHUNKS], done; int parts, i; } ahead_t;

static inline void ahead_of(ahead_t *a, const span_t *s, size_t v_bytes, size_t tok_bytes) {
    a->parts = a->i = 0;
    a->done = 0;
    for (int c = 0; c < s->nch; c++)
        for (int kv = 0; kv < 2; kv++) {
            a->at[a->parts] = s->k[c] + kv * v_bytes;
            a->len[a->parts++] = s->cnt[c] * tok_bytes;
        }
}

static inline void ahead_step(ahead_t *a, int lines) {
    for (; lines > 0 && a->i < a->parts; lines--) {
        __builtin_prefetch(a->at[a->i] + a->done, 0, 2);
        a->done += 64;
        if (a->done >= a->len[a->i]) { a->i++; a->done = 0; }
    }
}

/* Scores of up to 16 tokens (rows of k, stride tok) against G query rows (q, d apart)
 * into s[0..G-1]; lanes past n are -inf. Each K load serves the G rows; TOKS (4 or 8)
 * tokens at a time keep the accumulators and the G query vectors in registers (the
 * choices, and where the partial sums are joined, are what GCC 12 allocates without
 * spills in the hot loop). Rows past n read token n - 1 again (never past the chunk), so
 * the loop needs no branch. f32: FMA over D; bf16: dot products of bf16 pairs. */
#define SCORES(NAME, T, STEP, DOT, TOKS)                                                       \
ALWAYS_INLINE void NAME(const T *q, int d, const T *k, int n, int tok, float scale, __m512 *s, \
                        const int G) {                                                       \
    __m512 part[4][HEADS_MAX];                                                               \
    for (int t0 = 0; t0 < 16; t0 += TOKS) {                                                  \
        __m512 acc[HEADS_MAX][TOKS];                                                         \
        const T *kt[TOKS];                                                                   \
        for (int t = 0; t < TOKS; t++) {                                                     \
            kt[t] = k + (size_t)(t0 + t < n ? t0 + t : n - 1) * tok;                         \
            for (int g = 0; g < G; g++) acc[g][t] = _mm512_setzero_ps();                     \
        }                                                                                    \
        for (int i = 0; i < d; i += STEP) {                                                  \
            __m512i qi[HEADS_MAX];                                                           \
            for (int g = 0; g < G; g++) qi[g] = _mm512_loadu_si512(q + (size_t)g * d + i);   \
            for (int t = 0; t < TOKS; t++) {                                                 \
                __m512i kv = _mm512_loadu_si512(kt[t] + i);                                  \
                for (int g = 0; g < G; g++) acc[g][t] = DOT(acc[g][t], qi[g], kv);           \
            }                                                                                \
        }                                                                                    \
        for (int g = 0; g < G; g++) {                                                        \
            part[t0 / 4][g] = reduce4(acc[g]);                                               \
            if (TOKS == 8) part[t0 / 4][g] = reduce_join(part[t0 / 4][g], reduce4(acc[g] + 4)); \
        }                                                                                    \
    }                                                                                        \
    __mmask16 keep = (__mmask16)((1u << n) - 1u);                                            \
    for (int g = 0; g < G; g++) {                                                            \
        __m512 sum = TOKS == 8 ? reduce_join(part[0][g], part[2][g])                         \
                               : reduce_join(reduce_join(part[0][g], part[1][g]), reduce_join(part[2][g], part[3][g])); \
        s[g] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), keep, _mm512_mul_ps(sum, _mm512_set1_ps(scale))); \
    }                                                                                        \
}

/* One query head's online-softmax update over a span: s[c] are its scores (-inf past
 * n[c]) and become P = exp(s - m_new) (0 past n[c]); returns exp(m_old - m_new), the
 * factor of the old accumulator. */
static inline float span_softmax(__m512 *s, const int *n, int nch, float *m, float *l) {
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int c = 0; c < nch; c++) mv = _mm512_max_ps(mv, s[c]);
    float mx = _mm512_reduce_max_ps(mv);
    mx = *m > mx ? *m : mx;
    __m512 sum = _mm512_setzero_ps(), mb = _mm512_set1_ps(mx);
    for (int c = 0; c < nch; c++) {
        s[c] = _mm512_maskz_mov_ps((__mmask16)((1u << n[c]) - 1u), exp512(_mm512_sub_ps(s[c], mb)));
        sum = _mm512_add_ps(sum, s[c]);
    }
    /* exp512, not expf: a call would spill every live vector register */
    float corr = *m == -INFINITY ? 0.f : _mm512_cvtss_f32(exp512(_mm512_set1_ps(*m - mx)));
    *l = *l * corr + _mm512_reduce_add_ps(sum);
    *m = mx;
    return corr;
}

/* Scores and softmax of a span for G query heads: e[g][c] = P of chunk c, corr[g] the
 * factor of head g's accumulator. */
#define SPAN_P(NAME, T, SCORES)                                                                \
ALWAYS_INLINE void NAME(const T *q, const span_t *sp, const int *n, int nch, size_t off, int tok, \
                        int d, float scale, float *m, float *l, __m512 (*e)[SPAN_CHUNKS],   \
                        float *corr, const int G) {                                          \
    for (int c = 0; c < nch; c++) {                                                          \
        __m512 s[HEADS_MAX];                                                                 \
        SCORES(q, d, (const T *)sp->k[c] + off, n[c], tok, scale, s, G);                     \
        for (int g = 0; g < G; g++) e[g][c] = s[g];                                          \
    }                                                                                        \
    for (int g = 0; g < G; g++) corr[g] = span_softmax(e[g], n, nch, m + g, l + g);         \
}

/* A span of one KV head for its `group` query heads, in tiles of up to HEADS_MAX (2 + 2
 * rather than 3 + 1). */
#define HEAD_TILES(NAME, T, HEADS)                                                             \
static void NAME(const T *q, const span_t *sp, const int *n, int nch, size_t off, size_t v_off, \
                 int tok, int group, int d, float scale, float *m, float *l, float *acc) {   \
    for (int g = 0; g < group;) {                                                            \
        int left = group - g, G = left >= 3 && left != 4 ? 3 : left >= 2 ? 2 : 1;           \
        const T *qg = q + (size_t)g * d;                                                     \
        float *ag = acc + (size_t)g * d;                                                     \
        if (G == 3) HEADS(qg, sp, n, nch, off, v_off, tok, d, scale, m + g, l + g, ag, 3);   \
        else if (G == 2) HEADS(qg, sp, n, nch, off, v_off, tok, d, scale, m + g, l + g, ag, 2); \
        else HEADS(qg, sp, n, nch, off, v_off, tok, d, scale, m + g, l + g, ag, 1);          \
        g += G;                                                                              \
    }                                                                                        \
}

/* A span of one KV head for G of its query heads (q: theirs, d apart): the first n[c]
 * tokens of chunk c < nch, K at k[c] + off, V v_off elements on; acc[G * d] float32,
 * d % 32 == 0. P.V: each V load serves the G heads, W * 16 head dims at a time. */
#define SPAN_VEC(NAME, T, SCORES, LOADV)                                                       \
SPAN_P(NAME##_p, T, SCORES)                                                                  \
ALWAYS_INLINE void NAME##_pv(const span_t *sp, const int *n, int nch, size_t voff, int tok, int d, \
                             float (*p)[SPAN_CHUNKS][16], const float *corr, float *acc,     \
                             const int G, const int W) {                                     \
    __m512 a[HEADS_MAX][4];                                                                  \
    for (int g = 0; g < G; g++)                                                              \
        for (int u = 0; u < W; u++)                                                          \
            a[g][u] = _mm512_mul_ps(_mm512_loadu_ps(acc + (size_t)g * d + 16 * u), _mm512_set1_ps(corr[g])); \
    for (int c = 0; c < nch; c++) {                                                          \
        const T *v = (const T *)sp->k[c] + voff;                                             \
        for (int t = 0; t < n[c]; t++) {                                                     \
            __m512 vt[4];                                                                    \
            for (int u = 0; u < W; u++) vt[u] = LOADV(v + (size_t)t * tok + 16 * u);         \
            for (int g = 0; g < G; g++) {                                                    \
                __m512 pt = _mm512_set1_ps(p[g][c][t]);                                      \
                for (int u = 0; u < W; u++) a[g][u] = _mm512_fmadd_ps(pt, vt[u], a[g][u]);    \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    for (int g = 0; g < G; g++)                                                              \
        for (int u = 0; u < W; u++) _mm512_storeu_ps(acc + (size_t)g * d + 16 * u, a[g][u]); \
}                                                                                            \
ALWAYS_INLINE void NAME##_heads(const T *q, const span_t *sp, const int *n, int nch, size_t off, \
                                size_t v_off, int tok, int d, float scale, float *m, float *l, \
                                float *acc, const int G) {                                   \
    float p[HEADS_MAX][SPAN_CHUNKS][16] __attribute__((aligned(64))), corr[HEADS_MAX];       \
    __m512 e[HEADS_MAX][SPAN_CHUNKS];                                                        \
    NAME##_p(q, sp, n, nch, off, tok, d, scale, m, l, e, corr, G);                           \
    for (int g = 0; g < G; g++)                                                              \
        for (int c = 0; c < nch; c++) _mm512_store_ps(p[g][c], e[g][c]);                     \
    int x0 = 0;                                                                              \
    for (; x0 + 64 <= d; x0 += 64) NAME##_pv(sp, n, nch, v_off + off + x0, tok, d, p, corr, acc + x0, G, 4); \
    if (x0 < d) NAME##_pv(sp, n, nch, v_off + off + x0, tok, d, p, corr, acc + x0, G, 2);   \
}                                                                                            \
HEAD_TILES(NAME, T, NAME##_heads)

SCORES(scores_f32, float, 16, fma_f32, 8)
SPAN_VEC(span_vec_f32, float, scores_f32, load16_f32)
#ifdef HAVE_BF16_VEC
SCORES(scores_bf16, uint16_t, 32, dot_bf16, 4)
SPAN_VEC(span_vec_bf16, uint16_t, scores_bf16, load16_bf16)

#define PAIR_PV(d) ((d) % 64 == 0 && (d) <= 256)  /* decode P.V as bf16 pairs */

/* The rows' head dims back in order after the pair P.V of span_pair_bf16, which keeps
 * each 32 dims x in the order in-lane unpacks leave them: x + {0-3, 8-11, 16-19, 24-27},
 * then x + {4-7, 12-15, 20-23, 28-31}. */
static void unpair_rows(float *scratch, int rows, int per, int hq, int d) {
    static const int32_t lo[16] = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
    static const int32_t hi[16] = {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
    if (!PAIR_PV(d)) return;
    __m512i lo_idx = _mm512_loadu_si512(lo), hi_idx = _mm512_loadu_si512(hi);
    for (int r = 0; r < rows; r++)
        for (int x = 0; x < hq * d; x += 32) {
            float *a = scratch + (size_t)r * per + x;
            __m512 u = _mm512_loadu_ps(a), w = _mm512_loadu_ps(a + 16);
            _mm512_storeu_ps(a, _mm512_permutex2var_ps(u, lo_idx, w));
            _mm512_storeu_ps(a + 16, _mm512_permutex2var_ps(u, hi_idx, w));
        }
}

/* P.V of a span into 64 head dims of G heads as dot products of bf16 pairs (P rounded
 * to bf16, as torch's bf16 attention does): tokens 2i and 2i+1 of V are paired by
 * in-lane unpacks (head dims in unpair_rows' order) right where they are used. */
ALWAYS_INLINE void span_pair_pv(const span_t *sp, const int *n, int nch, size_t voff, int tok, int d,
                                int32_t (*pp)[SPAN_CHUNKS][8], const float *corr, float *acc, const int G) {
    __m512 a[HEADS_MAX][4];
    for (int g = 0; g < G; g++)
        for (int u = 0; u < 4; u++)
            a[g][u] = _mm512_mul_ps(_mm512_loadu_ps(acc + (size_t)g * d + 16 * u), _mm512_set1_ps(corr[g]));
    for (int c = 0; c < nch; c++) {
        const uint16_t *v = (const uint16_t *)sp->k[c] + voff;
        for (int tp = 0; 2 * tp < n[c]; tp++) {
            const uint16_t *va = v + (size_t)(2 * tp) * tok, *vb = va + tok;
            __mmask32 kb = 2 * tp + 1 < n[c] ? ~0u : 0u;  /* V past n may be anything, even NaN */
            __m512i a0 = _mm512_loadu_si512(va), a1 = _mm512_loadu_si512(va + 32);
            __m512i b0 = _mm512_maskz_loadu_epi16(kb, vb), b1 = _mm512_maskz_loadu_epi16(kb, vb + 32);
            __m512i w[4] = {_mm512_unpacklo_epi16(a0, b0), _mm512_unpackhi_epi16(a0, b0),
                            _mm512_unpacklo_epi16(a1, b1), _mm512_unpackhi_epi16(a1, b1)};
            for (int g = 0; g < G; g++) {
                __m512i pb = _mm512_set1_epi32(pp[g][c][tp]);
                for (int u = 0; u < 4; u++) a[g][u] = dot_bf16(a[g][u], w[u], pb);
            }
        }
    }
    for (int g = 0; g < G; g++)
        for (int u = 0; u < 4; u++) _mm512_storeu_ps(acc + (size_t)g * d + 16 * u, a[g][u]);
}

ALWAYS_INLINE void span_pair_heads(const uint16_t *q, const span_t *sp, const int *n, int nch, size_t off,
                                   size_t v_off, int tok, int d, float scale, float *m, float *l, float *acc,
                                   const int G) {
    float corr[HEADS_MAX];
    __m512 e[HEADS_MAX][SPAN_CHUNKS];
    int32_t pp[HEADS_MAX][SPAN_CHUNKS][8] __attribute__((aligned(32)));
    span_vec_bf16_p(q, sp, n, nch, off, tok, d, scale, m, l, e, corr, G);
    for (int g = 0; g < G; g++)
        for (int c = 0; c < nch; c++) _mm256_store_si256((__m256i *)pp[g][c], (__m256i)_mm512_cvtneps_pbh(e[g][c]));
    for (int x0 = 0; x0 < d; x0 += 64) span_pair_pv(sp, n, nch, v_off + off + x0, tok, d, pp, corr, acc + x0, G);
}
HEAD_TILES(span_pair_bf16, uint16_t, span_pair_heads)

/* bf16 spans: pair P.V where the head size allows, else the plain vector span. */
static inline void span_bf16(const uint16_t *q, const span_t *sp, const int *n, int nch, size_t off, size_t v_off,
                             int tok, int group, int d, float scale, float *m, float *l, float *acc) {
    if (PAIR_PV(d)) span_pair_bf16(q, sp, n, nch, off, v_off, tok, group, d, scale, m, l, acc);
    else span_vec_bf16(q, sp, n, nch, off, v_off, tok, group, d, scale, m, l, acc);
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
 * [0, ctx0 + r). The cache is walked once for the whole tile, a span at a time (it
 * stays in cache while every row that needs it reads it), every KV head. The next span
 * is requested into L2 spread over the current one's work; the first one all at once
 * (its blocks are scattered, so the hardware would find them one miss at a time).
 * Scratch per row: acc[Hq*D], m[Hq], l[Hq]. Output rows are rounded to T. */
#define ATTN_VEC_TILE(NAME, T, SPAN, STORE, ORDER)                                             \
static void NAME(const T *q, long sq, const T *kv, size_t stride, const int32_t *table,      \
                 int ctx0, int rows, T *out, int hq, int hkv, int d, int bs, float scale,    \
                 float *scratch) {                                                           \
    int group = hq / hkv, tok = hkv * d, per = hq * d + 2 * hq, last = ctx0 + rows - 1;       \
    size_t tb = (size_t)tok * sizeof(T), sb = stride * sizeof(T), v_off = (size_t)bs * tok;  \
    span_t sp, next;                                                                         \
    ahead_t ahead;                                                                           \
    init_rows(scratch, rows, per, hq, d);                                                    \
    span_at(&sp, (const char *)kv, sb, table, bs, tb, 0, last);                              \
    ahead_of(&ahead, &sp, v_off * sizeof(T), tb);                                            \
    ahead_step(&ahead, 1 << 30);                                                             \
    while (sp.nch > 0) {                                                                     \
        span_at(&next, (const char *)kv, sb, table, bs, tb, sp.end, last);                   \
        ahead_of(&ahead, &next, v_off * sizeof(T), tb);                                      \
        int first = sp.start[0] + 1 - ctx0 > 0 ? sp.start[0] + 1 - ctx0 : 0;                 \
        int quota = (int)((next.end - sp.end) * 2 * tb / 64 / ((rows - first) * hkv)) + 1; \
        for (int r = first; r < rows; r++) {                                                 \
            int n[SPAN_CHUNKS], nch = 0, seen = ctx0 + r;                                    \
            for (; nch < sp.nch && sp.start[nch] < seen; nch++)                              \
                n[nch] = seen - sp.start[nch] < sp.cnt[nch] ? seen - sp.start[nch] : sp.cnt[nch]; \
            float *acc = scratch + (size_t)r * per, *m = acc + hq * d, *l = m + hq;          \
            for (int h = 0; h < hkv; h++) {                                                  \
                ahead_step(&ahead, quota);                                                   \
                SPAN(q + r * sq + (size_t)h * group * d, &sp, n, nch, (size_t)h * d, v_off, tok, \
                     group, d, scale, m + h * group, l + h * group, acc + (size_t)h * group * d); \
            }                                                                                \
        }                                                                                    \
        ahead_step(&ahead, 1 << 30);                                                         \
        sp = next;                                                                           \
    }                                                                                        \
    ORDER(scratch, rows, per, hq, d);                                                        \
    normalize_rows(scratch, rows, per, hq, d);                                               \
    for (int r = 0; r < rows; r++) STORE(scratch + (size_t)r * per, out + (size_t)r * hq * d, hq * d); \
}

static inline void in_order(float *scratch, int rows, int per, int hq, int d) {
    (void)scratch, (void)rows, (void)per, (void)hq, (void)d;
}
ATTN_VEC_TILE(attn_vec_tile_f32, float, span_vec_f32, store_f32, in_order)
#ifdef HAVE_BF16_VEC
ATTN_VEC_TILE(attn_vec_tile_bf16, uint16_t, span_bf16, store_bf16, unpair_rows)
#endif

#ifdef HAVE_BF16_VEC
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

#if defined(__AVX2__)
#include <immintrin.h>
/* The two bfloat16 of each 32-bit lane as float32: the low one by a shift, the high one by a mask. */
ALWAYS_INLINE __m256 bf16_lo8(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
ALWAYS_INLINE __m256 bf16_hi8(__m256i v) {
    return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
/* AVX2 + FMA (no AVX-512): one query row over the paged cache, in spans of up to 32 tokens
 * of a block. Per (query head, 8 tokens): 8 dot products as 8-lane FMA chains over D,
 * reduced together into one vector of 8 scores (hsum8); per span one online-softmax update
 * (vector exp), then P.V as FMAs of each token's V into the head's accumulator registers.
 * The query heads of a KV head go stage by stage (all scores, all updates, all P.V), so
 * their latency chains overlap. K and V are read from the cache in place (bf16 widened on
 * load) and re-read from L1 by the other heads. Needs D % 8 == 0 (else the portable task
 * runs). Scratch: qf[Hq*D], acc[Hq*D], m[Hq], l[Hq]. */
ALWAYS_INLINE __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
ALWAYS_INLINE __m256 load8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* lane t = the sum of v[t]'s 8 lanes */
ALWAYS_INLINE __m256 hsum8(const __m256 *v) {
    __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

ALWAYS_INLINE float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

ALWAYS_INLINE float hadd8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* exp_approx on 8 lanes (same polynomial, exponent clamped to [-126, 126]). */
ALWAYS_INLINE __m256 exp256(__m256 x) {
    __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504f));
    t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-126.f)), _mm256_set1_ps(126.f));
    __m256 fl = _mm256_floor_ps(t), f = _mm256_sub_ps(t, fl), r = EXP2_FRACTION(f, _mm256_fmadd_ps, _mm256_set1_ps);
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fl), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(r, _mm256_castsi256_ps(e));
}

/* The stages of a query head against a few tokens (k, v: the first token's slice of
 * the head's KV head, `tokb` bytes apart). Element modes: 0 float32; 1 bfloat16, widened 8
 * at a time; 2 bfloat16 with D % 16 == 0, read 16 at a time, each 32-bit lane's pair widened
 * by a shift (the even element) and a mask (the odd one): one load and two ALU ops for 16
 * values instead of two loads and four. In mode 2 the query row and the accumulators are
 * kept in that pair order (per 16 elements: the 8 even ones, then the 8 odd ones). */
#define XSTEP(mode) ((mode) == 2 ? 16 : 8)

ALWAYS_INLINE __m256 kdot_step(__m256 s, const float *qh, const char *kt, int x, int mode) {
    if (mode == 0) return _mm256_fmadd_ps(_mm256_loadu_ps(qh + x), load8_f32((const float *)kt + x), s);
    if (mode == 1) return _mm256_fmadd_ps(_mm256_loadu_ps(qh + x), load8_bf16((const uint16_t *)kt + x), s);
    __m256i kk = _mm256_loadu_si256((const __m256i *)((const uint16_t *)kt + x));
    return _mm256_fmadd_ps(_mm256_loadu_ps(qh + x + 8), bf16_hi8(kk),
                           _mm256_fmadd_ps(_mm256_loadu_ps(qh + x), bf16_lo8(kk), s));
}

/* The 8 scores as 8 FMA chains over D, reduced together (hsum8); lanes >= c are -inf.
 * `whole`: the block has slots for all 8 tokens (their K may be read, whatever they hold). */
ALWAYS_INLINE __m256 scores8(const float *qh, const char *k, int c, int whole, size_t tokb, int d, int mode) {
    __m256 s[8];
    for (int t = 0; t < 8; t++) s[t] = _mm256_setzero_ps();
    if (whole)
        for (int x = 0; x < d; x += XSTEP(mode))
            for (int t = 0; t < 8; t++) s[t] = kdot_step(s[t], qh, k + t * tokb, x, mode);
    else
        for (int x = 0; x < d; x += XSTEP(mode))
            for (int t = 0; t < c; t++) s[t] = kdot_step(s[t], qh, k + t * tokb, x, mode);
    __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(c),
                                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    return _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), hsum8(s), keep);
}

/* The online-softmax update over a span of c <= 8 * SPAN8 tokens (their scores sc[c / 8]):
 * the head's max and sum, pp[c] the weights; returns the factor that rescales the accumulator. */
#define SPAN8 4
ALWAYS_INLINE float softmax_span(const __m256 *sc, int c, float *m, float *l, float *pp) {
    int nch = (c + 7) / 8;
    float mx = *m;
    for (int ch = 0; ch < nch; ch++) {
        float x = hmax8(sc[ch]);
        mx = mx > x ? mx : x;
    }
    __m256 sum = _mm256_setzero_ps();
    for (int ch = 0; ch < nch; ch++) {
        __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(c - 8 * ch),
                                                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
        __m256 p = _mm256_and_ps(exp256(_mm256_sub_ps(sc[ch], _mm256_set1_ps(mx))), keep);
        sum = _mm256_add_ps(sum, p);
        _mm256_storeu_ps(pp + 8 * ch, p);
    }
    float corr = *m == -INFINITY ? 0.f : exp_approx(*m - mx);
    *l = *l * corr + hadd8(sum);
    *m = mx;
    return corr;
}

/* acc = acc * corr + sum_t pp[t] V[t], in up to 8 accumulator registers per 64 elements. */
ALWAYS_INLINE void pv8(float *acc, const float *pp, float corr, const char *v, int c, size_t tokb, int d, int mode) {
    for (int x0 = 0; x0 < d; x0 += 64) {
        __m256 a[8];
        for (int j = 0; j < 8; j++)
            if (x0 + 8 * j < d) a[j] = _mm256_mul_ps(_mm256_loadu_ps(acc + x0 + 8 * j), _mm256_set1_ps(corr));
        for (int t = 0; t < c; t++) {
            __m256 pt = _mm256_set1_ps(pp[t]);
            const char *vt = v + t * tokb;
            if (mode == 2) {
                for (int j = 0; j < 4; j++)
                    if (x0 + 16 * j < d) {
                        __m256i vv = _mm256_loadu_si256((const __m256i *)((const uint16_t *)vt + x0 + 16 * j));
                        a[2 * j] = _mm256_fmadd_ps(pt, bf16_lo8(vv), a[2 * j]);
                        a[2 * j + 1] = _mm256_fmadd_ps(pt, bf16_hi8(vv), a[2 * j + 1]);
                    }
            } else {
                for (int j = 0; j < 8; j++)
                    if (x0 + 8 * j < d)
                        a[j] = _mm256_fmadd_ps(pt, mode == 0 ? load8_f32((const float *)vt + x0 + 8 * j)
                                                             : load8_bf16((const uint16_t *)vt + x0 + 8 * j), a[j]);
            }
        }
        for (int j = 0; j < 8; j++)
            if (x0 + 8 * j < d) _mm256_storeu_ps(acc + x0 + 8 * j, a[j]);
    }
}

/* ng <= HEAD_TILE query heads of one KV head against a span of c <= 8 * SPAN8 tokens of a
 * block (`room`: the block's slots from the span's first token), stage by stage, so that the
 * heads' dependent chains (reductions, exp, the scalar max and sum) overlap; one softmax
 * update per span; K and V come from L1 after the first head. */
#define HEAD_TILE 4
ALWAYS_INLINE void attend_heads(const float *qf, const char *k, const char *v, int c, int room, size_t tokb, int d,
                                int ng, float *m, float *l, float *acc, int mode) {
    __m256 sc[HEAD_TILE][SPAN8];
    float pp[HEAD_TILE][8 * SPAN8], corr[HEAD_TILE];
    int nch = (c + 7) / 8;
    for (int g = 0; g < ng; g++)
        for (int ch = 0; ch < nch; ch++)
            sc[g][ch] = scores8(qf + g * d, k + 8 * ch * tokb, c - 8 * ch < 8 ? c - 8 * ch : 8, 8 * ch + 8 <= room,
                                tokb, d, mode);
    for (int g = 0; g < ng; g++) corr[g] = softmax_span(sc[g], c, m + g, l + g, pp[g]);
    for (int g = 0; g < ng; g++) pv8(acc + g * d, pp[g], corr[g], v, c, tokb, d, mode);
}

/* Head sizes with their own copy (constant trip counts unroll into registers). */
#define ATTEND_HEADS(NAME, MODE)                                                               \
static void NAME(const float *qf, const char *k, const char *v, int c, int room, size_t tokb, int d, int ng, \
                 float *m, float *l, float *acc) {                                           \
    if (d == 64) attend_heads(qf, k, v, c, room, tokb, 64, ng, m, l, acc, MODE);             \
    else if (d == 128) attend_heads(qf, k, v, c, room, tokb, 128, ng, m, l, acc, MODE);      \
    else attend_heads(qf, k, v, c, room, tokb, d, ng, m, l, acc, MODE);                      \
}
ATTEND_HEADS(attend_heads_f32, 0)
ATTEND_HEADS(attend_heads_bf16, 1)
ATTEND_HEADS(attend_heads_pairs, 2)

/* A bf16 row to float32 in pair order, and back (n % 16 == 0). */
static inline void load_bf16_pairs(const uint16_t *src, float *dst, int n) {
    for (int g = 0; g < n; g += 16)
        for (int i = 0; i < 8; i++) {
            dst[g + i] = bf16_to_f32(src[g + 2 * i]);
            dst[g + 8 + i] = bf16_to_f32(src[g + 2 * i + 1]);
        }
}
static inline void store_bf16_pairs(const float *src, uint16_t *dst, int n) {
    for (int g = 0; g < n; g += 16)
        for (int i = 0; i < 8; i++) {
            dst[g + 2 * i] = f32_to_bf16(src[g + i]);
            dst[g + 2 * i + 1] = f32_to_bf16(src[g + 8 + i]);
        }
}

/* One query row: per span of a block, each KV head's query heads in tiles of HEAD_TILE. */
#define DECODE_TASK2(NAME, T, LOAD, STORE, ATTEND)                                             \
static void NAME(const T *q, const T *kv, const int32_t *table, int len, T *out,             \
                 int hq, int hkv, int d, int bs, size_t stride, float scale, float *scratch) { \
    int group = hq / hkv, tok = hkv * d;                                                     \
    float *qf = scratch, *acc = qf + hq * d, *m = acc + hq * d, *l = m + hq;                 \
    LOAD(q, qf, hq * d);                                                                     \
    row_start(qf, acc, m, l, hq, d, scale);                                                 \
    for (int j = 0; j * bs < len; j++) {                                                     \
        int n = len - j * bs < bs ? len - j * bs : bs;                                       \
        const T *kb = kv + (size_t)table[j] * stride, *vb = kb + (size_t)bs * tok;           \
        for (int t0 = 0; t0 < n; t0 += 8 * SPAN8)                                            \
            for (int h = 0; h < hkv; h++)                                                    \
                for (int g0 = 0; g0 < group; g0 += HEAD_TILE) {                              \
                    int hd = h * group + g0, ng = group - g0 < HEAD_TILE ? group - g0 : HEAD_TILE; \
                    size_t at = (size_t)t0 * tok + (size_t)h * d;                            \
                    ATTEND(qf + hd * d, (const char *)(kb + at), (const char *)(vb + at),    \
                           n - t0 < 8 * SPAN8 ? n - t0 : 8 * SPAN8, bs - t0, (size_t)tok * sizeof(T), d, ng, \
                           m + hd, l + hd, acc + hd * d);                                    \
                }                                                                            \
    }                                                                                        \
    row_finish(acc, l, hq, d);                                                               \
    STORE(acc, out, hq * d);                                                                 \
}
DECODE_TASK2(decode_task2_f32, float, load_f32, store_f32, attend_heads_f32)
DECODE_TASK2(decode_task2_bf16, uint16_t, load_bf16, store_bf16, attend_heads_bf16)
DECODE_TASK2(decode_task2p_bf16, uint16_t, load_bf16_pairs, store_bf16_pairs, attend_heads_pairs)
#define ROW_TASK_f32(d) ((d) % 8 == 0 ? decode_task2_f32 : decode_task_f32)
#define ROW_TASK_bf16(d) ((d) % 16 == 0 ? decode_task2p_bf16 : (d) % 8 == 0 ? decode_task2_bf16 : decode_task_bf16)
#else
#define ROW_TASK_f32(d) decode_task_f32
#define ROW_TASK_bf16(d) decode_task_bf16
#endif

/* The same tile without AVX-512: one row at a time (the query row is copied to float), in
 * AVX2 where the build has it, else portable C. */
#define ATTN_TILE(NAME, T, SUF)                                                                \
static void NAME(const T *q, long sq, const T *kv, size_t stride, const int32_t *table,      \
                 int ctx0, int rows, T *out, int hq, int hkv, int d, int bs, float scale,    \
                 float *scratch) {                                                           \
    for (int r = 0; r < rows; r++)                                                           \
        ROW_TASK_##SUF(d)(q + r * sq, kv, table, ctx0 + r, out + (size_t)r * hq * d, hq, hkv, d, bs, stride, \
                         scale, scratch);                                                    \
}
ATTN_TILE(attn_tile_f32, float, f32)
ATTN_TILE(attn_tile_bf16, uint16_t, bf16)

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
/* bf16 rows 16 at a time (GCC leaves the scalar rounding below unvectorized: 3.6x slower
 * than float32 at 2,048 rows); float32's loops vectorize as written. i: where they stop. */
#if defined(HAVE_BF16_VEC)
#define RMS_SUM_bf16(xr, rr, hr, i, n, ss)                                                     \
    {                                                                                        \
        __m512 acc = _mm512_setzero_ps();                                                    \
        for (; i + 16 <= n; i += 16) {                                                       \
            __m512 h = load16_bf16(xr + i);                                                  \
            if (rr) h = round_bf16_512(_mm512_add_ps(h, load16_bf16(rr + i)));               \
            _mm256_storeu_si256((__m256i *)(hr + i), (__m256i)_mm512_cvtneps_pbh(h));        \
            acc = _mm512_fmadd_ps(h, h, acc);                                                \
        }                                                                                    \
        ss += _mm512_reduce_add_ps(acc);                                                     \
    }
#define RMS_SCALE_bf16(hr, w, orow, inv, i, n)                                                 \
    for (; i + 16 <= n; i += 16) {                                                           \
        __m512 y = _mm512_mul_ps(load16_bf16(w + i),                                         \
                                 round_bf16_512(_mm512_mul_ps(load16_bf16(hr + i), _mm512_set1_ps(inv)))); \
        _mm256_storeu_si256((__m256i *)(orow + i), (__m256i)_mm512_cvtneps_pbh(y));          \
    }
#else
#define RMS_SUM_bf16(xr, rr, hr, i, n, ss)
#define RMS_SCALE_bf16(hr, w, orow, inv, i, n)
#endif
#define RMS_SUM_f32(xr, rr, hr, i, n, ss)
#define RMS_SCALE_f32(hr, w, orow, inv, i, n)
#define RMS_NORM(SUF, T)                                                                       \
void pd_rms_norm_##SUF(const T *x, long sx, const T *res, long sr, const T *w, T *out,       \
                       T *res_out, int rows, int n, float eps, int threads) {                \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                        \
    for (int r = 0; r < rows; r++) {                                                         \
        const T *xr = x + r * sx, *rr = res ? res + r * sr : NULL;                           \
        T *hr = res_out + (size_t)r * n, *orow = out + (size_t)r * n;                        \
        float ss = 0.f;                                                                      \
        int i = 0;                                                                           \
        RMS_SUM_##SUF(xr, rr, hr, i, n, ss)                                                  \
        _Pragma("omp simd reduction(+:ss)")                                                  \
        for (int j = i; j < n; j++) {                                                        \
            float h = rr ? ROUND_##SUF(GET_##SUF(xr, j) + GET_##SUF(rr, j)) : GET_##SUF(xr, j); \
            PUT_##SUF(hr, j, h);                                                             \
            ss += h * h;                                                                     \
        }                                                                                    \
        float inv = 1.f / sqrtf(ss / n + eps);                                               \
        i = 0;                                                                               \
        RMS_SCALE_##SUF(hr, w, orow, inv, i, n)                                              \
        _Pragma("omp simd")                                                                  \
        for (int j = i; j < n; j++)                                                          \
            PUT_##SUF(orow, j, GET_##SUF(w, j) * ROUND_##SUF(GET_##SUF(hr, j) * inv));       \
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

/* ---- W8A8: per-token int8 quantization (alone or fused into RMSNorm / SiLU-and-mul) and
 * the int8 GEMM. Quantization is symmetric per row, as reference.quant_per_token_ref:
 * scale = amax / 127 (1 for an all-zero row), q = round-half-even(v / scale), a true
 * division (not a reciprocal multiply), so q and scale equal the reference's. ---- */

static inline float quant_scale(float amax) { return amax > 0.f ? amax / 127.f : 1.f; }

#if defined(__AVX512F__)
static inline __mmask16 tail_mask(int n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u); }

static float amax_row(const float *v, int n) {
    __m512 m = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16)
        m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(n - i), v + i)));
    return _mm512_reduce_max_ps(m);
}

static void quant_row(const float *v, int n, int8_t *q, float *scale) {
    float s = quant_scale(amax_row(v, n));
    __m512 sv = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m512 x = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(m, v + i), sv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
        _mm512_mask_cvtsepi32_storeu_epi8(q + i, m, _mm512_cvtps_epi32(x));
    }
    *scale = s;
}
#else
static void quant_row(const float *v, int n, int8_t *q, float *scale) {
    float amax = 0.f;
    for (int i = 0; i < n; i++) amax = fabsf(v[i]) > amax ? fabsf(v[i]) : amax;
    float s = quant_scale(amax);
    for (int i = 0; i < n; i++) {
        float x = nearbyintf(v[i] / s);
        q[i] = (int8_t)(x < -127.f ? -127.f : (x > 127.f ? 127.f : x));
    }
    *scale = s;
}
#endif

/* x [rows, n] (row stride sx) -> q [rows, n] int8, scale [rows] float32. */
#define QUANT_PER_TOKEN(SUF, T)                                                                \
void pd_quant_per_token_##SUF(const T *x, long sx, int8_t *q, float *scale, int rows, int n,  \
                              int threads) {                                                 \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                        \
    for (int r = 0; r < rows; r++) {                                                         \
        float v[n > 0 ? n : 1];                                                              \
        for (int i = 0; i < n; i++) v[i] = GET_##SUF(x + r * sx, i);                          \
        quant_row(v, n, q + (size_t)r * n, scale + r);                                       \
    }                                                                                        \
}

/* pd_rms_norm's normed row (rounded as there: to T, times w, to T), quantized per row;
 * res_out = x + residual is written only when residual is given. */
#define RMS_NORM_QUANT(SUF, T)                                                                 \
void pd_rms_norm_quant_##SUF(const T *x, long sx, const T *res, long sr, const T *w, int8_t *q, \
                             float *scale, T *res_out, int rows, int n, float eps, int threads) { \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                        \
    for (int r = 0; r < rows; r++) {                                                         \
        const T *xr = x + r * sx, *rr = res ? res + r * sr : NULL;                           \
        float h[n > 0 ? n : 1], ss = 0.f;                                                    \
        _Pragma("omp simd reduction(+:ss)")                                                  \
        for (int i = 0; i < n; i++) {                                                        \
            h[i] = rr ? ROUND_##SUF(GET_##SUF(xr, i) + GET_##SUF(rr, i)) : GET_##SUF(xr, i); \
            ss += h[i] * h[i];                                                               \
        }                                                                                    \
        if (rr)                                                                              \
            for (int i = 0; i < n; i++) PUT_##SUF(res_out + (size_t)r * n, i, h[i]);          \
        float inv = 1.f / sqrtf(ss / n + eps);                                               \
        _Pragma("omp simd")                                                                  \
        for (int i = 0; i < n; i++) h[i] = ROUND_##SUF(GET_##SUF(w, i) * ROUND_##SUF(h[i] * inv)); \
        quant_row(h, n, q + (size_t)r * n, scale + r);                                       \
    }                                                                                        \
}

/* pd_silu_and_mul's output row (same rounding), quantized per row; x [rows, 2n]. */
#if defined(__AVX512F__)
#define SILU_ROW_f32(g, u, v, i, n)                                                            \
    for (; i + 16 <= n; i += 16)                                                             \
        _mm512_storeu_ps(v + i, _mm512_mul_ps(silu512(_mm512_loadu_ps(g + i)), _mm512_loadu_ps(u + i)));
#else
#define SILU_ROW_f32(g, u, v, i, n)
#endif
#if defined(HAVE_BF16_VEC)
#define SILU_ROW_bf16(g, u, v, i, n)                                                           \
    for (; i + 16 <= n; i += 16)                                                             \
        _mm512_storeu_ps(v + i, round_bf16_512(_mm512_mul_ps(round_bf16_512(silu512(load16_bf16(g + i))), \
                                                             load16_bf16(u + i))));
#else
#define SILU_ROW_bf16(g, u, v, i, n)
#endif
#define SILU_MUL_QUANT(SUF, T)                                                                 \
void pd_silu_and_mul_quant_##SUF(const T *x, long sx, int8_t *q, float *scale, int rows, int n, \
                                 int threads) {                                              \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                        \
    for (int r = 0; r < rows; r++) {                                                         \
        const T *g = x + r * sx, *u = g + n;                                                 \
        float v[n > 0 ? n : 1];                                                              \
        int i = 0;                                                                           \
        SILU_ROW_##SUF(g, u, v, i, n)                                                        \
        for (; i < n; i++) {                                                                 \
            float a = GET_##SUF(g, i);                                                       \
            v[i] = ROUND_##SUF(ROUND_##SUF(a / (1.f + expf(-a))) * GET_##SUF(u, i));         \
        }                                                                                    \
        quant_row(v, n, q + (size_t)r * n, scale + r);                                       \
    }                                                                                        \
}

QUANT_PER_TOKEN(f32, float)
QUANT_PER_TOKEN(bf16, uint16_t)
RMS_NORM_QUANT(f32, float)
RMS_NORM_QUANT(bf16, uint16_t)
SILU_MUL_QUANT(f32, float)
SILU_MUL_QUANT(bf16, uint16_t)

/* The int8 GEMM: out[r, c] = (sum_k a[r, k] * w[c, k]) * a_scale[r] * w_scale[c] (+ bias[c]),
 * the int32 sum exact, the epilogue in float64 (as reference.int8_linear_ref, so the
 * result equals it) and rounded once to the output type.
 *
 * The weight is packed once (pd_int8_prepack): blocks of 16 output columns, each
 * ceil(K/4) groups of [16 columns][4 k] int8 (what one vpdpbusd multiplies: 4 products
 * per 32-bit lane), then 16 int32 holding 128 * each column's sum. Columns past N and k
 * past K are zero. vpdpbusd multiplies unsigned by signed bytes, so the activations go
 * in as q + 128 and the 128 * column sums come off at the end (wrapping int32
 * arithmetic: exact whenever the true sum fits in int32). */
#define W_GROUP_BYTES 64  /* 16 columns x 4 k */

static inline size_t packed_block_bytes(int k) { return ((size_t)(k + 3) / 4 + 1) * W_GROUP_BYTES; }

void pd_int8_prepack(const int8_t *w, long sw, int n, int k, int8_t *packed, int threads) {
    int blocks = (n + 15) / 16, groups = (k + 3) / 4;
    _Pragma("omp parallel for schedule(static) num_threads(threads)")
    for (int b = 0; b < blocks; b++) {
        int8_t *dst = packed + (size_t)b * packed_block_bytes(k);
        int32_t comp[16];
        for (int c = 0; c < 16; c++) {
            int col = b * 16 + c, sum = 0;
            for (int kk = 0; kk < groups * 4; kk++) {
                int8_t v = col < n && kk < k ? w[(size_t)col * sw + kk] : 0;
                dst[(size_t)(kk / 4) * W_GROUP_BYTES + c * 4 + kk % 4] = v;
                sum += v;
            }
            comp[c] = (int32_t)((uint32_t)sum * 128u);
        }
        memcpy(dst + (size_t)groups * W_GROUP_BYTES, comp, sizeof comp);
    }
}

/* One output value from its exact int32 sum (float64, no contraction into an FMA, so it
 * rounds as the reference does). */
__attribute__((optimize("fp-contract=off")))
static inline double dequant1(int32_t acc, float as, float ws, const float *bias, int c) {
    double v = (double)acc * (double)as * (double)ws;
    if (bias) v = v + (double)bias[c];
    return v;
}

/* Stores a row segment of `len` values (float64) to out as float32 (bf16 = 0) or bfloat16
 * (via float32, as torch casts a float64 tensor). */
static inline void store_row_f64(const double *v, int len, void *out, long so, int r, int c0, int bf16) {
    for (int i = 0; i < len; i++) {
        float f = (float)v[i];
        if (bf16) ((uint16_t *)out)[r * so + c0 + i] = f32_to_bf16(f);
        else ((float *)out)[r * so + c0 + i] = f;
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__)  /* every VNNI CPU has all three */
#define INT8_GEMM_VEC 2
#define INT8_MR 6  /* rows per register tile */
#define INT8_NR 4  /* blocks of 16 columns per register tile: 24 accumulators + 4 weights */
typedef uint8_t int8_act_t;  /* the activations as the tiles read them: q + 128 */

/* One row of activations as the tiles read them, padded to su (whole groups). */
static inline void int8_act_row(const int8_t *src, int k, uint8_t *dst, int su) {
    int i = 0;
    for (; i < k; i++) dst[i] = (uint8_t)src[i] ^ 0x80u;
    for (; i < su; i++) dst[i] = 0x80;
}

static inline __m256i f32_to_bf16_512(__m512 x) {
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(x);
#else  /* round to nearest even on the bits (finite values) */
    __m512i u = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
#endif
}

/* 16 outputs of row r from their int32 sums: float64 epilogue, one rounding. */
static inline void dequant16(__m512i acc, float as, const float *ws, const float *bias, int len, void *out,
                             long so, int r, int c0, int bf16) {
    __mmask16 m = tail_mask(len);
    __m512 wsv = _mm512_maskz_loadu_ps(m, ws + c0);
    __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias + c0) : _mm512_setzero_ps();
    __m512d a = _mm512_set1_pd((double)as);
    __m256 half[2];
    for (int h = 0; h < 2; h++) {
        __m512d v = _mm512_cvtepi32_pd(h ? _mm512_extracti64x4_epi64(acc, 1) : _mm512_castsi512_si256(acc));
        __m512d s = _mm512_cvtps_pd(h ? _mm512_extractf32x8_ps(wsv, 1) : _mm512_castps512_ps256(wsv));
        v = _mm512_mul_round_pd(_mm512_mul_round_pd(v, a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), s,
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        if (bias) {
            __m512d b = _mm512_cvtps_pd(h ? _mm512_extractf32x8_ps(bv, 1) : _mm512_castps512_ps256(bv));
            v = _mm512_add_round_pd(v, b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        }
        half[h] = _mm512_cvtpd_ps(v);
    }
    __m512 f = _mm512_insertf32x8(_mm512_castps256_ps512(half[0]), half[1], 1);
    if (bf16) _mm256_mask_storeu_epi16((uint16_t *)out + r * so + c0, m, f32_to_bf16_512(f));
    else _mm512_mask_storeu_ps((float *)out + r * so + c0, m, f);
}

/* acc += u8 a . s8 b in groups of 4. NOTE: inline asm, as GCC 12 copies and spills the
 * accumulators of the intrinsic's tied operand (half speed); "+v" keeps them in place. */
static inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}

/* One group of 4 k: acc[i][j] += row i's 4 bytes . block j's 16 columns. */
ALWAYS_INLINE void vnni_step(__m512i acc[INT8_MR][INT8_NR], const uint8_t *a, size_t sa, const int8_t *w,
                             size_t bw, int g, int mr, int nr) {
    __m512i wv[INT8_NR];
#pragma GCC unroll 8
    for (int j = 0; j < nr; j++) wv[j] = _mm512_loadu_si512(w + j * bw + (size_t)g * W_GROUP_BYTES);
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
        int32_t x4;
        memcpy(&x4, a + i * sa + (size_t)g * 4, 4);
        __m512i x = _mm512_set1_epi32(x4);
#pragma GCC unroll 8
        for (int j = 0; j < nr; j++) acc[i][j] = dpbusd(acc[i][j], x, wv[j]);
    }
}

/* A register tile: MR rows of the unsigned activations (row stride sa) times NR packed
 * blocks (bw bytes apart), over all `groups` groups of 4 k, then the epilogue. A single
 * row sums even and odd groups apart, so that more than NR dependency chains overlap. */
ALWAYS_INLINE void vnni_tile(const uint8_t *a, size_t sa, const int8_t *w, size_t bw, int groups, int mr,
                             int nr, int r0, int c0, int n, const float *as, const float *ws, const float *bias,
                             void *out, long so, int bf16) {
    __m512i acc[2][INT8_MR][INT8_NR];
    int split = mr == 1 ? 2 : 1, g = 0;
#pragma GCC unroll 8
    for (int u = 0; u < split; u++)
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++)
#pragma GCC unroll 8
            for (int j = 0; j < nr; j++) acc[u][i][j] = _mm512_setzero_si512();
    for (; g + split <= groups; g += split)
#pragma GCC unroll 2
        for (int u = 0; u < split; u++) vnni_step(acc[u], a, sa, w, bw, g + u, mr, nr);
    for (; g < groups; g++) vnni_step(acc[0], a, sa, w, bw, g, mr, nr);
    for (int j = 0; j < nr; j++) {
        __m512i comp = _mm512_loadu_si512(w + j * bw + (size_t)groups * W_GROUP_BYTES);
        int c = c0 + 16 * j, len = n - c < 16 ? n - c : 16;
        for (int i = 0; i < mr; i++) {
            __m512i sum = split == 2 ? _mm512_add_epi32(acc[0][i][j], acc[1][i][j]) : acc[0][i][j];
            dequant16(_mm512_sub_epi32(sum, comp), as[r0 + i], ws, bias, len, out, so, r0 + i, c, bf16);
        }
    }
}

#define VNNI_TILE(MR, NR)                                                                      \
static void vnni_tile_##MR##x##NR(const uint8_t *a, size_t sa, const int8_t *w, size_t bw, int groups, int r0, \
                                  int c0, int n, const float *as, const float *ws, const float *bias, void *out, \
                                  long so, int bf16) {                                       \
    vnni_tile(a, sa, w, bw, groups, MR, NR, r0, c0, n, as, ws, bias, out, so, bf16);          \
}
#define VNNI_TILES(MR) VNNI_TILE(MR, 1) VNNI_TILE(MR, 2) VNNI_TILE(MR, 3) VNNI_TILE(MR, 4)
VNNI_TILES(1) VNNI_TILES(2) VNNI_TILES(3) VNNI_TILES(4) VNNI_TILES(5) VNNI_TILES(6)
#define VNNI_ROW(MR) {vnni_tile_##MR##x1, vnni_tile_##MR##x2, vnni_tile_##MR##x3, vnni_tile_##MR##x4}
#define INT8_TILE_TABLE {VNNI_ROW(1), VNNI_ROW(2), VNNI_ROW(3), VNNI_ROW(4), VNNI_ROW(5), VNNI_ROW(6)}

#elif defined(__AVX2__)
#include <immintrin.h>
#define INT8_GEMM_VEC 1
#define INT8_MR 3  /* rows per register tile: 4 accumulators each */
#define INT8_NR 1
/* AVX2 without VNNI: the same packed weight, signed products. Each 16-byte quarter of a
 * group (4 columns x 4 k) is widened to int16 once (vpmovsxbw) and shared by the tile's
 * rows; a row's 4 activations, kept widened, are broadcast to the 4 columns and vpmaddwd
 * sums each column's products in pairs into int32: exact for every int8 value (vpmaddubsw's
 * 16-bit pair sums could saturate) and with no unsigned offset, so the column sums are not
 * read. A quarter's accumulator holds two partial sums per column, added at the end. */
typedef int16_t int8_act_t;

static inline void int8_act_row(const int8_t *src, int k, int16_t *dst, int su) {
    int i = 0;
    for (; i < k; i++) dst[i] = src[i];
    for (; i < su; i++) dst[i] = 0;
}

/* One group of 4 k: acc[i][q] += row i's 4 activations . quarter q's 4 columns. */
ALWAYS_INLINE void i8avx2_step(__m256i acc[INT8_MR][4], const int16_t *a, size_t sa, const int8_t *w, int g,
                               int mr) {
    const int8_t *wg = w + (size_t)g * W_GROUP_BYTES;
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) {
        __m256i wq = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wg + 16 * q)));
#pragma GCC unroll 4
        for (int i = 0; i < mr; i++) {
            int64_t x4;
            memcpy(&x4, a + i * sa + (size_t)g * 4, sizeof x4);
            acc[i][q] = _mm256_add_epi32(acc[i][q], _mm256_madd_epi16(_mm256_set1_epi64x(x4), wq));
        }
    }
}

/* Up to 8 outputs of row r from columns c.. (len of them): dequant1's float64 epilogue, in
 * vectors where all 8 are real; no FMA contraction, so the values equal the reference's. */
__attribute__((optimize("fp-contract=off")))
static void dequant8(__m256i acc, float as, const float *ws, const float *bias, int len, void *out, long so, int r,
                     int c, int bf16) {
    int32_t s[8];
    double v[8];
    _mm256_storeu_si256((__m256i *)s, acc);
    if (len < 8) {
        for (int j = 0; j < len; j++) v[j] = dequant1(s[j], as, ws[c + j], bias, c + j);
    } else {
        __m256d a = _mm256_set1_pd((double)as);
        for (int h = 0; h < 2; h++) {
            __m256d x = _mm256_cvtepi32_pd(_mm_loadu_si128((const __m128i *)(s + 4 * h)));
            x = _mm256_mul_pd(_mm256_mul_pd(x, a), _mm256_cvtps_pd(_mm_loadu_ps(ws + c + 4 * h)));
            if (bias) x = _mm256_add_pd(x, _mm256_cvtps_pd(_mm_loadu_ps(bias + c + 4 * h)));
            _mm256_storeu_pd(v + 4 * h, x);
        }
    }
    store_row_f64(v, len, out, so, r, c, bf16);
}

/* A register tile: mr rows of widened activations (row stride sa) times one packed block,
 * over all `groups` groups of 4 k, then the epilogue. The quarters' pair sums are added
 * (hadd gives columns 0 1 4 5 | 2 3 6 7; the permute puts them in order). */
ALWAYS_INLINE void i8avx2_tile(const int16_t *a, size_t sa, const int8_t *w, int groups, int mr, int r0, int c0,
                               int n, const float *as, const float *ws, const float *bias, void *out, long so,
                               int bf16) {
    __m256i acc[INT8_MR][4];
#pragma GCC unroll 4
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++) acc[i][q] = _mm256_setzero_si256();
    for (int g = 0; g < groups; g++) i8avx2_step(acc, a, sa, w, g, mr);
    int len = n - c0 < 16 ? n - c0 : 16;
    for (int i = 0; i < mr; i++)
        for (int h = 0; h < 2 && 8 * h < len; h++) {
            __m256i sum = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[i][2 * h], acc[i][2 * h + 1]), 0xd8);
            dequant8(sum, as[r0 + i], ws, bias, len - 8 * h < 8 ? len - 8 * h : 8, out, so, r0 + i, c0 + 8 * h, bf16);
        }
}

#define I8AVX2_TILE(MR)                                                                        \
static void i8avx2_tile_##MR(const int16_t *a, size_t sa, const int8_t *w, size_t bw, int groups, int r0, int c0, \
                             int n, const float *as, const float *ws, const float *bias, void *out, long so, \
                             int bf16) {                                                     \
    (void)bw;                                                                                \
    i8avx2_tile(a, sa, w, groups, MR, r0, c0, n, as, ws, bias, out, so, bf16);                \
}
I8AVX2_TILE(1) I8AVX2_TILE(2) I8AVX2_TILE(3)
#define INT8_TILE_TABLE {{i8avx2_tile_1}, {i8avx2_tile_2}, {i8avx2_tile_3}}
#else
#define INT8_GEMM_VEC 0
#endif

#if INT8_GEMM_VEC
/* A register tile: rows [r0, r0 + MR) of the activations (as int8_act_row leaves them, row
 * stride sa) times NR packed blocks (bw bytes apart) from column c0, with the epilogue. */
typedef void (*int8_tile_fn)(const int8_act_t *, size_t, const int8_t *, size_t, int, int, int, int,
                             const float *, const float *, const float *, void *, long, int);
static const int8_tile_fn INT8_TILE_FNS[INT8_MR][INT8_NR] = INT8_TILE_TABLE;

/* Work split: the column blocks evenly over the threads (a thread's columns stay in its
 * cache across all rows); rows too when there are fewer blocks than threads. */
static void int8_gemm(const int8_t *a, long sa, const float *as, const int8_t *packed, const float *ws,
                      const float *bias, void *out, long so, int m, int n, int k, int bf16, int threads) {
    int groups = (k + 3) / 4, blocks = (n + 15) / 16;
    size_t bw = packed_block_bytes(k), su = (size_t)groups * 4;
    size_t act_bytes = (size_t)m * su * sizeof(int8_act_t);
    int8_act_t *act = aligned_alloc(64, (act_bytes / 64 + 1) * 64);  /* never 0 bytes (K = 0) */
    if (!act) abort();  /* as the linear: an unwritten output must never pass for a result */
    int nparts = blocks < threads ? blocks : threads;
    int mparts = threads / nparts, mtiles = (m + INT8_MR - 1) / INT8_MR;
    mparts = mparts < mtiles ? mparts : mtiles;
    _Pragma("omp parallel num_threads(threads)")
    {
        _Pragma("omp for schedule(static)")
        for (int r = 0; r < m; r++) int8_act_row(a + (size_t)r * sa, k, act + (size_t)r * su, (int)su);
        _Pragma("omp for schedule(static)")
        for (int part = 0; part < nparts * mparts; part++) {
            int pn = part % nparts, pm = part / nparts;
            int b0 = (int)((long)blocks * pn / nparts), b1 = (int)((long)blocks * (pn + 1) / nparts);
            int t0 = (int)((long)mtiles * pm / mparts), t1 = (int)((long)mtiles * (pm + 1) / mparts);
            int r1 = t1 * INT8_MR < m ? t1 * INT8_MR : m;
            for (int b = b0; b < b1; b += INT8_NR) {
                int nr = b1 - b < INT8_NR ? b1 - b : INT8_NR;
                for (int r = t0 * INT8_MR; r < r1; r += INT8_MR) {
                    int mr = r1 - r < INT8_MR ? r1 - r : INT8_MR;
                    INT8_TILE_FNS[mr - 1][nr - 1](act + (size_t)r * su, su, packed + (size_t)b * bw, bw, groups, r,
                                                  b * 16, n, as, ws, bias, out, so, bf16);
                }
            }
        }
    }
    free(act);
}
#else
/* Portable: the same packed weight, signed products (the column sums are not needed).
 * Slow (a few GFLOP/s): CpuKernels.prepack_int8_weight leaves weights unpacked in such
 * builds, so that the engine multiplies with torch._int_mm instead. */
static void int8_gemm(const int8_t *a, long sa, const float *as, const int8_t *packed, const float *ws,
                      const float *bias, void *out, long so, int m, int n, int k, int bf16, int threads) {
    int groups = (k + 3) / 4, blocks = (n + 15) / 16;
    size_t bw = packed_block_bytes(k);
    _Pragma("omp parallel for schedule(static) num_threads(threads)")
    for (int b = 0; b < blocks; b++) {
        const int8_t *wb = packed + (size_t)b * bw;
        int len = n - b * 16 < 16 ? n - b * 16 : 16;
        for (int r = 0; r < m; r++) {
            const int8_t *ar = a + (size_t)r * sa;
            int32_t acc[16] = {0};
            for (int kk = 0; kk < k; kk++) {
                const int8_t *wk = wb + (size_t)(kk / 4) * W_GROUP_BYTES + kk % 4;
                int32_t x = ar[kk];
                for (int c = 0; c < 16; c++) acc[c] += x * wk[4 * c];
            }
            double v[16];
            for (int c = 0; c < len; c++) v[c] = dequant1(acc[c], as[r], ws[b * 16 + c], bias, b * 16 + c);
            store_row_f64(v, len, out, so, r, b * 16, bf16);
        }
    }
}
#endif

/* Which int8 GEMM int8_linear runs: 2 AVX512-VNNI, 1 AVX2, 0 the portable loop. */
int pd_int8_gemm_vec(void) { return INT8_GEMM_VEC; }

/* a [m, k] int8 (row stride sa), a_scale [m], packed from pd_int8_prepack, w_scale [n],
 * bias [n] or NULL (all float32); out [m, n] (row stride so). */
void pd_int8_linear_f32(const int8_t *a, long sa, const float *as, const int8_t *packed, const float *ws,
                        const float *bias, float *out, long so, int m, int n, int k, int threads) {
    if (m > 0 && n > 0) int8_gemm(a, sa, as, packed, ws, bias, out, so, m, n, k, 0, threads);
}
void pd_int8_linear_bf16(const int8_t *a, long sa, const float *as, const int8_t *packed, const float *ws,
                         const float *bias, uint16_t *out, long so, int m, int n, int k, int threads) {
    if (m > 0 && n > 0) int8_gemm(a, sa, as, packed, ws, bias, out, so, m, n, k, 1, threads);
}

/* ---- Dense linear layers (float32, bfloat16) over a weight packed once at load:
 * out[r, c] = sum_k x[r, k] * w[c, k] (+ bias[c]), float32 sums, rounded once to the
 * element type (bias added in float32 before that rounding). One kernel for every number
 * of rows: register tiles of 6 rows x 64 columns, as the int8 GEMM's.
 *
 * Packed layout (kernels/cpu.py pack_linear_weight builds it; the same in every build):
 * G = 2 (bf16) or 1 (f32) consecutive k per 32-bit lane, KG = ceil(K / G) groups, k past
 * K zero. Columns go in blocks of 16; block b starts at byte 64 KG b and holds its KG
 * groups one after another, each [w columns][G k] with w = 16, except a last block of the
 * N mod 16 remaining columns (nothing is padded past N). A full group is 64 bytes: the 16
 * columns that one vdpbf16ps (bf16 pairs) or one FMA (f32) multiplies by a broadcast group
 * of one activation row. ---- */


#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* Group g of one activation row (32 bits: one float32, or a bf16 pair); `last`: bf16's final
 * half group of an odd K, the pair (x[k - 1], 0), since the row may end at x[k - 1]. */
ALWAYS_INLINE int32_t lin_group_of_row(const char *row, int g, int k, int last) {
    int32_t v;
    if (last) v = ((const uint16_t *)row)[k - 1];
    else memcpy(&v, row + (size_t)g * 4, 4);
    return v;
}
#define HAVE_LINEAR_VEC 1
#define LIN_MR 6  /* rows per register tile */
#define LIN_ROWS LIN_MR
#define LIN_NR 4  /* blocks of 16 columns per register tile: 24 accumulators + 4 weights */
#define LIN_GROUP_BYTES 64

/* acc += x . w lane-wise: f32 one FMA; bf16 the dot product of each lane's pair. */
ALWAYS_INLINE __m512 lin_madd(__m512 acc, __m512i x, __m512i w, int bf16) {
    if (!bf16) return _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(w), acc);
#if defined(__AVX512BF16__)
    /* NOTE: inline asm, as for vpdpbusd: GCC 12 spills the intrinsic's tied accumulators */
    __asm__("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
    return acc;
#else  /* the pair's two products as float32 FMAs (bf16 -> f32 is a shift) */
    __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)),
                          acc);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(x, hi)), _mm512_castsi512_ps(_mm512_and_si512(w, hi)),
                           acc);
#endif
}

/* One group of every row against NR weight blocks (bs bytes apart); a tail block's group is
 * its w columns (gs bytes, mask lm). `last`: bf16's final half group of an odd K, whose
 * activation pair is (x[k - 1], 0): the row may end at x[k - 1]. */
ALWAYS_INLINE void lin_step(__m512 acc[LIN_MR][LIN_NR], const char *x, size_t sx, const char *w, size_t bs,
                            size_t gs, __mmask16 lm, int g, int k, int mr, int nr, int tail, int last, int bf16,
                            const char *pf) {
    __m512i wv[LIN_NR];
#pragma GCC unroll 8
    for (int j = 0; j < nr; j++)
        wv[j] = tail ? _mm512_maskz_loadu_epi32(lm, w + j * bs + g * gs) : _mm512_loadu_si512(w + j * bs + g * gs);
    if (pf)
#pragma GCC unroll 8
        for (int j = 0; j < LIN_NR; j++) _mm_prefetch(pf + j * bs + (size_t)g * LIN_GROUP_BYTES, _MM_HINT_T1);
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
        int32_t v = lin_group_of_row(x + i * sx, g, k, last);
        __m512i xb = _mm512_set1_epi32(v);
#pragma GCC unroll 8
        for (int j = 0; j < nr; j++) acc[i][j] = lin_madd(acc[i][j], xb, wv[j], bf16);
    }
}

static inline __m256i lin_to_bf16(__m512 v) {
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(v);
#else  /* round to nearest even on the bits; NaN stays NaN (as f32_to_bf16) */
    __m512i u = _mm512_castps_si512(v), top = _mm512_srli_epi32(u, 16);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_and_si512(top, _mm512_set1_epi32(1)),
                                                                      _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_or_si512(top, _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
#endif
}

/* 16 (lm) outputs at column c of one row: + bias, rounded to the element type. */
ALWAYS_INLINE void lin_store(__m512 v, const void *bias, int c, __mmask16 lm, char *out, int bf16) {
    if (bf16) {
        if (bias)
            v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lm, (const uint16_t *)bias + c)), 16)));
        _mm256_mask_storeu_epi16(out, lm, lin_to_bf16(v));
    } else {
        if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(lm, (const float *)bias + c));
        _mm512_mask_storeu_ps(out, lm, v);
    }
}

/* A register tile: mr rows (x, out: row strides in bytes) times nr blocks of 16 columns
 * from c0, over all of K. A single row sums even and odd groups apart, so that more than
 * nr dependency chains overlap. pf: the next column tile's weights, fetched into L2 along
 * the way (NULL: none). */
ALWAYS_INLINE void lin_tile(const char *x, size_t sx, const char *w, size_t bs, size_t gs, __mmask16 lm, int k,
                            const void *bias, char *out, size_t so, int c0, int mr, int nr, int tail, int bf16,
                            const char *pf) {
    __m512 acc[2][LIN_MR][LIN_NR];
    int split = mr == 1 ? 2 : 1, kg = bf16 ? k / 2 : k, g = 0;
    if (!tail) gs = LIN_GROUP_BYTES, lm = 0xffff;
#pragma GCC unroll 8
    for (int u = 0; u < split; u++)
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++)
#pragma GCC unroll 8
            for (int j = 0; j < nr; j++) acc[u][i][j] = _mm512_setzero_ps();
    for (; g + split <= kg; g += split)
#pragma GCC unroll 2
        for (int u = 0; u < split; u++) lin_step(acc[u], x, sx, w, bs, gs, lm, g + u, k, mr, nr, tail, 0, bf16, pf);
    for (; g < kg; g++) lin_step(acc[0], x, sx, w, bs, gs, lm, g, k, mr, nr, tail, 0, bf16, pf);
    if (bf16 && (k & 1)) lin_step(acc[0], x, sx, w, bs, gs, lm, g, k, mr, nr, tail, 1, bf16, pf);
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            __m512 v = split == 2 ? _mm512_add_ps(acc[0][i][j], acc[1][i][j]) : acc[0][i][j];
            int c = c0 + 16 * j;
            lin_store(v, bias, c, lm, out + i * so + (size_t)c * (bf16 ? 2 : 4), bf16);
        }
}

typedef void (*lin_tile_fn)(const char *, size_t, const char *, size_t, size_t, __mmask16, int, const void *, char *,
                            size_t, int, const char *);
/* pf is tested once per tile: a tile without it compiles to the loop without prefetches */
#define LIN_TILE(SUF, BF16, MR, NR, TAIL)                                                      \
static void lin_tile_##SUF##_##MR##x##NR##_##TAIL(const char *x, size_t sx, const char *w, size_t bs, size_t gs, \
                                                  __mmask16 lm, int k, const void *bias, char *out, size_t so, \
                                                  int c0, const char *pf) {                  \
    if (pf) lin_tile(x, sx, w, bs, gs, lm, k, bias, out, so, c0, MR, NR, TAIL, BF16, pf);      \
    else lin_tile(x, sx, w, bs, gs, lm, k, bias, out, so, c0, MR, NR, TAIL, BF16, NULL);       \
}
#define LIN_TILES(SUF, BF16, MR)                                                               \
    LIN_TILE(SUF, BF16, MR, 1, 0) LIN_TILE(SUF, BF16, MR, 2, 0) LIN_TILE(SUF, BF16, MR, 3, 0) \
    LIN_TILE(SUF, BF16, MR, 4, 0) LIN_TILE(SUF, BF16, MR, 1, 1)
#define LIN_ALL_TILES(SUF, BF16)                                                               \
    LIN_TILES(SUF, BF16, 1) LIN_TILES(SUF, BF16, 2) LIN_TILES(SUF, BF16, 3)                   \
    LIN_TILES(SUF, BF16, 4) LIN_TILES(SUF, BF16, 5) LIN_TILES(SUF, BF16, 6)
LIN_ALL_TILES(f32, 0)
LIN_ALL_TILES(bf16, 1)
/* [mr - 1][nr] with nr = 0 the tail block's tile (one block of fewer than 16 columns) */
#define LIN_ROW(SUF, MR) {lin_tile_##SUF##_##MR##x1_1, lin_tile_##SUF##_##MR##x1_0, lin_tile_##SUF##_##MR##x2_0, \
                          lin_tile_##SUF##_##MR##x3_0, lin_tile_##SUF##_##MR##x4_0}
#define LIN_FNS(SUF) {LIN_ROW(SUF, 1), LIN_ROW(SUF, 2), LIN_ROW(SUF, 3), LIN_ROW(SUF, 4), LIN_ROW(SUF, 5), \
                      LIN_ROW(SUF, 6)}
static const lin_tile_fn LIN_TILE_FNS[2][LIN_MR][LIN_NR + 1] = {LIN_FNS(f32), LIN_FNS(bf16)};

/* Rows [r0, r1) times column blocks [b0, b1) of one packed weight (n columns, bs bytes per
 * block); each column tile runs all its row tiles before the next: its weights come from the
 * cache after the first. With more than one row tile, the second fetches the next column
 * tile's weights into L2, so the next first pass, which would wait on memory, reads them from
 * there (the rows of the passes after the first are compute-bound: the loads hide under
 * them; a single pass is already a memory stream the hardware prefetches well). */
static void lin_range(const char *x, size_t sxb, const char *packed, size_t bs, const void *bias, char *out,
                      size_t sob, int r0, int r1, int b0, int b1, int n, int k, int bf16) {
    int full = n / 16, tw = n % 16;
    const lin_tile_fn (*fns)[LIN_NR + 1] = LIN_TILE_FNS[bf16];
    for (int b = b0; b < b1; b += LIN_NR) {
        int nr = b1 - b < LIN_NR ? b1 - b : LIN_NR;
        int nfull = b + nr <= full ? nr : full - b;  /* the tail block, if here, is the chunk's last */
        const char *next = b + nr < b1 ? packed + (size_t)(b + nr) * bs : NULL;
        for (int r = r0; r < r1; r += LIN_MR) {
            int mr = r1 - r < LIN_MR ? r1 - r : LIN_MR;
            const char *xr = x + (size_t)r * sxb;
            char *orow = out + (size_t)r * sob;
            const char *pf = r == r0 + LIN_MR ? next : NULL;
            if (nfull > 0)
                fns[mr - 1][nfull](xr, sxb, packed + (size_t)b * bs, bs, 0, 0, k, bias, orow, sob, b * 16, pf);
            if (nfull < nr)
                fns[mr - 1][0](xr, sxb, packed + (size_t)full * bs, bs, (size_t)tw * 4,
                               (__mmask16)((1u << tw) - 1u), k, bias, orow, sob, full * 16, NULL);
        }
    }
}

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_LINEAR_VEC 1
#define HAVE_LINEAR_AVX2 1
/* AVX2 + FMA (no AVX-512): the same packed weight, 8 lanes per register, so a 64-byte group
 * is two halves (columns 0-7, 8-15). A register tile is up to LIN2_MR rows (float32) or
 * LIN2_BF16_MR rows (bfloat16) times one block of 16 columns over all of K: float32 one FMA
 * per half and row; bfloat16 two, the activation rows widened to float32 once per call
 * (lin_range) and each weight half's pairs widened once per group (a shift, a mask) and
 * shared by the rows (5 rows: 10 accumulators and 2 weight vectors stay in the 16
 * registers; at 6 one accumulator spilled and its chain set the pace). A single row sums
 * four interleaved chains of groups (and two rows two), so enough FMAs are in flight. The
 * tail block (N mod 16 columns) runs in plain C: at most 15 columns. */
#define LIN2_MR 6
#define LIN2_BF16_MR 5
#define LIN_ROWS LIN2_MR
#define LIN_GROUP_BYTES 64


/* One group g of mr rows against one block (w: the block's first group); x is float32 in
 * both cases (bf16 rows widened by lin_range). bf16: the pair's first k against the low
 * halves of the 32-bit lanes, then its second against the high halves, so that only two
 * widened weight vectors are live next to the 12 accumulators. */
ALWAYS_INLINE void lin2_step(__m256 acc[LIN2_MR][2], const char *x, size_t sx, const char *w, int g, int mr,
                             int bf16) {
    __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + (size_t)g * LIN_GROUP_BYTES));
    __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + (size_t)g * LIN_GROUP_BYTES + 32));
    if (!bf16) {
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) {
            __m256 xb = _mm256_broadcast_ss((const float *)(x + i * sx) + g);
            acc[i][0] = _mm256_fmadd_ps(xb, _mm256_castsi256_ps(w0), acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(xb, _mm256_castsi256_ps(w1), acc[i][1]);
        }
        return;
    }
    __m256 a0 = bf16_lo8(w0), a1 = bf16_lo8(w1);
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
        __m256 xl = _mm256_broadcast_ss((const float *)(x + i * sx) + 2 * g);
        acc[i][0] = _mm256_fmadd_ps(xl, a0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(xl, a1, acc[i][1]);
    }
    __m256 b0 = bf16_hi8(w0), b1 = bf16_hi8(w1);
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
        __m256 xh = _mm256_broadcast_ss((const float *)(x + i * sx) + 2 * g + 1);
        acc[i][0] = _mm256_fmadd_ps(xh, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(xh, b1, acc[i][1]);
    }
}

ALWAYS_INLINE void lin2_store(__m256 v, const void *bias, int c, char *out, int bf16) {
    if (!bf16) {
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps((const float *)bias + c));
        _mm256_storeu_ps((float *)out, v);
        return;
    }
    float f[8];
    _mm256_storeu_ps(f, v);
    for (int j = 0; j < 8; j++)
        ((uint16_t *)out)[j] = f32_to_bf16(f[j] + (bias ? bf16_to_f32(((const uint16_t *)bias)[c + j]) : 0.f));
}

/* mr rows (x, out: row strides in bytes; x float32, bf16 rows widened and padded to an even
 * K with a zero) times the full block w of 16 columns from c0, over all of K. */
ALWAYS_INLINE void lin2_tile(const char *x, size_t sx, const char *w, int k, const void *bias, char *out,
                             size_t so, int c0, int mr, int bf16) {
    enum { CHAINS = 4 };
    __m256 acc[CHAINS][LIN2_MR][2];
    int split = mr == 1 ? 4 : mr == 2 ? 2 : 1, kg = bf16 ? (k + 1) / 2 : k, g = 0;
#pragma GCC unroll 8
    for (int u = 0; u < split; u++)
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) acc[u][i][0] = acc[u][i][1] = _mm256_setzero_ps();
    for (; g + split <= kg; g += split)
#pragma GCC unroll 4
        for (int u = 0; u < split; u++) lin2_step(acc[u], x, sx, w, g + u, mr, bf16);
    for (; g < kg; g++) lin2_step(acc[0], x, sx, w, g, mr, bf16);
    /* NOTE: unrolled, so that no accumulator is indexed at run time: otherwise GCC keeps the
     * array in memory and stores every accumulator after every FMA (half the float32 speed) */
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            __m256 v = acc[0][i][h];
#pragma GCC unroll 4
            for (int u = 1; u < split; u++) v = _mm256_add_ps(v, acc[u][i][h]);
            int c = c0 + 8 * h;
            lin2_store(v, bias, c, out + i * so + (size_t)c * (bf16 ? 2 : 4), bf16);
        }
}

typedef void (*lin2_tile_fn)(const char *, size_t, const char *, int, const void *, char *, size_t, int);
#define LIN2_TILE(SUF, BF16, MR)                                                               \
static void lin2_tile_##SUF##_##MR(const char *x, size_t sx, const char *w, int k, const void *bias, char *out, \
                                   size_t so, int c0) {                                      \
    lin2_tile(x, sx, w, k, bias, out, so, c0, MR, BF16);                                     \
}
#define LIN2_TILES(SUF, BF16)                                                                  \
    LIN2_TILE(SUF, BF16, 1) LIN2_TILE(SUF, BF16, 2) LIN2_TILE(SUF, BF16, 3)                   \
    LIN2_TILE(SUF, BF16, 4) LIN2_TILE(SUF, BF16, 5) LIN2_TILE(SUF, BF16, 6)
LIN2_TILES(f32, 0)
LIN2_TILES(bf16, 1)
#define LIN2_FNS(SUF) {lin2_tile_##SUF##_1, lin2_tile_##SUF##_2, lin2_tile_##SUF##_3, lin2_tile_##SUF##_4, \
                       lin2_tile_##SUF##_5, lin2_tile_##SUF##_6}
static const lin2_tile_fn LIN2_TILE_FNS[2][LIN2_MR] = {LIN2_FNS(f32), LIN2_FNS(bf16)};

/* The tail block's tw < 16 columns (from c0) for rows [r0, r1), in plain C. */
static void lin2_tail(const char *x, size_t sxb, const char *w, int tw, int k, const void *bias, char *out,
                      size_t sob, int c0, int r0, int r1, int bf16) {
    int gk = bf16 ? 2 : 1;
    for (int r = r0; r < r1; r++) {
        float acc[16] = {0};
        for (int kk = 0; kk < k; kk++) {
            size_t at = (size_t)(kk / gk) * tw * gk + kk % gk;  /* element of column 0 */
            float xv = bf16 ? bf16_to_f32(((const uint16_t *)(x + r * sxb))[kk]) : ((const float *)(x + r * sxb))[kk];
            for (int c = 0; c < tw; c++)
                acc[c] += xv * (bf16 ? bf16_to_f32(((const uint16_t *)w)[at + (size_t)c * gk]) : ((const float *)w)[at + c]);
        }
        for (int c = 0; c < tw; c++) {
            if (bf16)
                ((uint16_t *)(out + r * sob))[c0 + c] =
                    f32_to_bf16(acc[c] + (bias ? bf16_to_f32(((const uint16_t *)bias)[c0 + c]) : 0.f));
            else
                ((float *)(out + r * sob))[c0 + c] = acc[c] + (bias ? ((const float *)bias)[c0 + c] : 0.f);
        }
    }
}

/* Rows [r0, r1) times column blocks [b0, b1) of one packed weight (n columns, bs bytes per
 * block); each block runs all its row tiles before the next, its weights from the cache after
 * the first. */
static void lin_range(const char *x, size_t sxb, const char *packed, size_t bs, const void *bias, char *out,
                      size_t sob, int r0, int r1, int b0, int b1, int n, int k, int bf16) {
    int full = n / 16, kp = k + (k & 1), tile_rows = bf16 ? LIN2_BF16_MR : LIN2_MR;
    const lin2_tile_fn *fns = LIN2_TILE_FNS[bf16];
    /* bf16 rows widened to float32 once here, not once per block and pair in the tiles */
    float small[bf16 ? 4096 : 1], *xf = NULL;
    const char *xt = x + (size_t)r0 * sxb;
    size_t sxt = sxb;
    if (bf16 && r1 > r0) {
        size_t count = (size_t)(r1 - r0) * kp;
        xf = count <= 4096 ? small : malloc(count * sizeof(float));
        if (!xf) abort();
        for (int r = r0; r < r1; r++) {
            const uint16_t *src = (const uint16_t *)(x + (size_t)r * sxb);
            float *dst = xf + (size_t)(r - r0) * kp;
            load_bf16(src, dst, k);
            if (k & 1) dst[k] = 0.f;
        }
        xt = (const char *)xf;
        sxt = (size_t)kp * sizeof(float);
    }
    for (int b = b0; b < b1; b++) {
        if (b >= full) {
            lin2_tail(x, sxb, packed + (size_t)full * bs, n % 16, k, bias, out, sob, full * 16, r0, r1, bf16);
            continue;
        }
        for (int r = r0; r < r1; r += tile_rows) {
            int mr = r1 - r < tile_rows ? r1 - r : tile_rows;
            fns[mr - 1](xt + (size_t)(r - r0) * sxt, sxt, packed + (size_t)b * bs, k, bias, out + (size_t)r * sob, sob,
                        b * 16);
        }
    }
    if (xf && xf != small) free(xf);
}

#else
#define HAVE_LINEAR_VEC 0
/* Portable: the same packed weight, one block of columns and one row at a time. */
static void linear_gemm(const char *x, long sx, const char *packed, const void *bias, char *out, long so, int m,
                        int n, int k, int bf16, int threads) {
    int g_k = bf16 ? 2 : 1, kg = (k + g_k - 1) / g_k, blocks = (n + 15) / 16;
    _Pragma("omp parallel for schedule(static) num_threads(threads)")
    for (int b = 0; b < blocks; b++) {
        int w = n - b * 16 < 16 ? n - b * 16 : 16;
        const char *wb = packed + (size_t)b * kg * 64;
        for (int r = 0; r < m; r++) {
            float acc[16] = {0};
            for (int kk = 0; kk < k; kk++) {
                size_t at = (size_t)(kk / g_k) * w * g_k + kk % g_k;  /* element of column 0 */
                size_t xi = (size_t)r * sx + kk;
                float xv = bf16 ? bf16_to_f32(((const uint16_t *)x)[xi]) : ((const float *)x)[xi];
                for (int c = 0; c < w; c++)
                    acc[c] += xv * (bf16 ? bf16_to_f32(((const uint16_t *)wb)[at + (size_t)c * g_k])
                                         : ((const float *)wb)[at + c]);
            }
            for (int c = 0; c < w; c++) {
                int col = b * 16 + c;
                if (bf16) {
                    float v = acc[c] + (bias ? bf16_to_f32(((const uint16_t *)bias)[col]) : 0.f);
                    ((uint16_t *)out)[(size_t)r * so + col] = f32_to_bf16(v);
                } else {
                    ((float *)out)[(size_t)r * so + col] = acc[c] + (bias ? ((const float *)bias)[col] : 0.f);
                }
            }
        }
    }
}
#endif

#if HAVE_LINEAR_VEC
/* Work split: the column blocks evenly over the threads, rows too when there are fewer
 * blocks than threads (no more threads than parts wake up). */
static void linear_gemm(const char *x, long sx, const char *packed, const void *bias, char *out, long so, int m,
                        int n, int k, int bf16, int threads) {
    int elt = bf16 ? 2 : 4, kg = bf16 ? (k + 1) / 2 : k, blocks = (n + 15) / 16;
    size_t bs = (size_t)kg * LIN_GROUP_BYTES, sxb = (size_t)sx * elt, sob = (size_t)so * elt;
    int nparts = blocks < threads ? blocks : threads;
    int mparts = threads / nparts, mtiles = (m + LIN_ROWS - 1) / LIN_ROWS;
    mparts = mparts < mtiles ? mparts : mtiles;
    _Pragma("omp parallel for schedule(static) num_threads(nparts * mparts)")
    for (int part = 0; part < nparts * mparts; part++) {
        int pn = part % nparts, pm = part / nparts;
        int b0 = (int)((long)blocks * pn / nparts), b1 = (int)((long)blocks * (pn + 1) / nparts);
        int t0 = (int)((long)mtiles * pm / mparts), t1 = (int)((long)mtiles * (pm + 1) / mparts);
        lin_range(x, sxb, packed, bs, bias, out, sob, t0 * LIN_ROWS, t1 * LIN_ROWS < m ? t1 * LIN_ROWS : m, b0, b1, n, k,
                  bf16);
    }
}

#define GROUP_BLOCKS 8  /* column blocks of 16 per task of a grouped GEMM */

/* Expert e multiplies rows [offsets[e], offsets[e + 1]) of x by its own packed weight (at
 * packed + e * estride bytes): one parallel region over (expert, 128-column chunk) tasks, so
 * the few rows each expert gets in a decode step still spread over every thread, and
 * experts without rows cost nothing. */
static void grouped_gemm(const char *x, long sx, const char *packed, size_t estride, const int32_t *offsets,
                         int experts, char *out, long so, int n, int k, int bf16, int threads) {
    int elt = bf16 ? 2 : 4, kg = bf16 ? (k + 1) / 2 : k, blocks = (n + 15) / 16;
    int chunks = (blocks + GROUP_BLOCKS - 1) / GROUP_BLOCKS;
    size_t bs = (size_t)kg * LIN_GROUP_BYTES, sxb = (size_t)sx * elt, sob = (size_t)so * elt;
    _Pragma("omp parallel for schedule(dynamic) num_threads(threads)")
    for (long t = 0; t < (long)experts * chunks; t++) {
        int e = (int)(t / chunks), b0 = (int)(t % chunks) * GROUP_BLOCKS;
        if (offsets[e] < offsets[e + 1])
            lin_range(x, sxb, packed + (size_t)e * estride, bs, NULL, out, sob, offsets[e], offsets[e + 1], b0,
                      b0 + GROUP_BLOCKS < blocks ? b0 + GROUP_BLOCKS : blocks, n, k, bf16);
    }
}
#else
/* Portable: each expert with rows through the linear GEMM. */
static void grouped_gemm(const char *x, long sx, const char *packed, size_t estride, const int32_t *offsets,
                         int experts, char *out, long so, int n, int k, int bf16, int threads) {
    int elt = bf16 ? 2 : 4;
    for (int e = 0; e < experts; e++)
        if (offsets[e] < offsets[e + 1])
            linear_gemm(x + (size_t)offsets[e] * sx * elt, sx, packed + (size_t)e * estride, NULL,
                        out + (size_t)offsets[e] * so * elt, so, offsets[e + 1] - offsets[e], n, k, bf16, threads);
}
#endif

/* Which linear paths are vectorized: bit 0 float32, bit 1 bfloat16. AVX-512: float32 FMAs, and
 * bfloat16 with the AVX512-BF16 dot products (without them, bf16 runs as float32 FMAs: tested,
 * not chosen). AVX2 + FMA: both, bfloat16 as float32 FMAs (torch's own bf16 matmul has no
 * faster path on such a CPU). */
int pd_linear_vec(void) {
#if HAVE_LINEAR_VEC && (defined(__AVX512BF16__) || defined(HAVE_LINEAR_AVX2))
    return 3;
#else
    return HAVE_LINEAR_VEC;
#endif
}

/* x [m, k] (row stride sx), packed as above, bias [n] or NULL; out [m, n] (row stride so). */
void pd_linear_f32(const float *x, long sx, const float *packed, const float *bias, float *out, long so, int m, int n,
                   int k, int threads) {
    if (m > 0 && n > 0)
        linear_gemm((const char *)x, sx, (const char *)packed, bias, (char *)out, so, m, n, k, 0, threads);
}
void pd_linear_bf16(const uint16_t *x, long sx, const uint16_t *packed, const uint16_t *bias, uint16_t *out, long so,
                    int m, int n, int k, int threads) {
    if (m > 0 && n > 0)
        linear_gemm((const char *)x, sx, (const char *)packed, bias, (char *)out, so, m, n, k, 1, threads);
}

/* ---- The experts of a sparse MLP, grouped: rows [P, hidden] are the (token, expert) pairs
 * sorted by expert (expert e's rows [offsets[e], offsets[e + 1])); w13 [E] packed [2I, hidden]
 * weights (gate rows, then up rows) s13 elements apart, w2 [E] packed [hidden, I] s2 apart.
 * h [P, 2I] and act [P, I] are scratch; out [P, hidden] gets each pair's
 * down(silu(gate) * up), the SiLU product rounded to T as the op-by-op path rounds it. */
#define MOE_EXPERTS(SUF, T, BF16)                                                              \
void pd_moe_experts_##SUF(const T *rows, const int32_t *offsets, int experts, const T *w13, size_t s13, \
                          const T *w2, size_t s2, T *h, T *act, T *out, int p, int hidden, int inter,   \
                          int threads) {                                                     \
    if (p <= 0) return;                                                                      \
    grouped_gemm((const char *)rows, hidden, (const char *)w13, s13 * sizeof(T), offsets, experts, \
                 (char *)h, 2 * inter, 2 * inter, hidden, BF16, threads);                    \
    pd_silu_and_mul_##SUF(h, 2 * inter, act, p, inter, threads);                             \
    grouped_gemm((const char *)act, inter, (const char *)w2, s2 * sizeof(T), offsets, experts, \
                 (char *)out, hidden, hidden, inter, BF16, threads);                         \
}
MOE_EXPERTS(f32, float, 0)
MOE_EXPERTS(bf16, uint16_t, 1)

/* ---- One Llama-family decoder layer in one call: the ops above in the order the model's
 * Python forward calls them, on the same buffers, so the result is the same to the bit; the
 * per-op call overhead (a dozen calls per layer) is paid once. ---- */

/* One projection's LoRA stacks (pd_lora_delta's a [S, parts * r, k] and b [S, n, r]); a NULL
 * a: the projection has no adapters. */
typedef struct {
    const void *a, *b;
    const int32_t *ends;                                         /* [parts]: each part's last column + 1 */
    int parts, r;
} pd_lora_stacks;

typedef struct {
    pd_lora_stacks qkv, o, gate_up, down;
} pd_layer_lora;

typedef struct {
    const void *input_norm, *post_norm;                          /* [hidden] */
    const void *qkv, *qkv_bias, *o, *o_bias, *gate_up, *down;    /* packed weights; biases [n] or NULL */
    float eps, scale;
    int hidden, hq, hkv, d, inter;
    const pd_layer_lora *lora;                                   /* NULL: no projection has adapters */
} pd_layer_weights;

/* A W8A8 layer: int8 weights packed by pd_int8_prepack with float32 per-column scales; the
 * activations quantized per token on the way into each projection, as W8A8LinearMethod does. */
typedef struct {
    const void *input_norm, *post_norm;                          /* [hidden], the activation type */
    const int8_t *qkv, *o, *gate_up, *down;                      /* packed */
    const float *qkv_scale, *o_scale, *gate_up_scale, *down_scale;
    const float *qkv_bias, *o_bias;                              /* float32 [n] or NULL */
    float eps, scale;
    int hidden, hq, hkv, d, inter;
} pd_w8a8_layer_weights;

typedef struct {
    int rows, batch, width, bs, threads, first;                  /* first: no residual yet */
    const int64_t *positions, *slots;
    const float *cos_sin;
    const int32_t *tables, *qsl, *lens;
    void *x, *res;              /* [rows, hidden]: the layer's input (its output on return); the residual */
    void *qkv, *attn, *h, *gate_up, *act;                        /* workspace rows */
    float *scratch;             /* threads * pd_attention_scratch_floats(...) */
    int8_t *q;                  /* W8A8: [rows, max(hidden, hq * d, inter)] quantized rows */
    float *q_scale;             /* W8A8: [rows] */
    /* the step's tokens grouped by adapter slot (pd_lora_delta's); lora_slots 0: no token has one */
    const int32_t *lora_sorted, *lora_start, *lora_count, *lora_ranks;
    int lora_slots;
} pd_layer_step;

void pd_lora_delta_f32(float *y, long sy, const float *x, long sx, const float *a, const float *b,
                       const int32_t *sorted, const int32_t *start, const int32_t *count, const int32_t *ends,
                       int parts, int n, int k, int r, int slots, const int32_t *ranks, int threads);
void pd_lora_delta_bf16(uint16_t *y, long sy, const uint16_t *x, long sx, const uint16_t *a, const uint16_t *b,
                        const int32_t *sorted, const int32_t *start, const int32_t *count, const int32_t *ends,
                        int parts, int n, int k, int r, int slots, const int32_t *ranks, int threads);

/* y [rows, n] += the LoRA delta of x [rows, k] where the projection has adapters and the step
 * has adapter tokens: what LoRALinearMethod adds after the base matmul. */
#define LAYER_LORA(SUF, w, s, part, y, x, n, k)                                                \
    if ((w)->lora && (w)->lora->part.a && (s)->lora_slots)                                   \
        pd_lora_delta_##SUF(y, n, x, k, (w)->lora->part.a, (w)->lora->part.b, (s)->lora_sorted, \
                            (s)->lora_start, (s)->lora_count, (w)->lora->part.ends, (w)->lora->part.parts, \
                            n, k, (w)->lora->part.r, (s)->lora_slots, (s)->lora_ranks, (s)->threads);

#define DECODER_LAYER(SUF, T)                                                                  \
void pd_decoder_layer_##SUF(const pd_layer_weights *w, const pd_layer_step *s, T *kv, size_t stride) { \
    int hid = w->hidden, qn = w->hq * w->d, kvn = w->hkv * w->d, qkvn = qn + 2 * kvn, i2 = 2 * w->inter; \
    int rows = s->rows, th = s->threads;                                                     \
    T *x = s->x, *res = s->res, *h = s->h, *qkv = s->qkv, *attn = s->attn;                   \
    pd_rms_norm_##SUF(x, hid, s->first ? NULL : res, hid, w->input_norm, h, res, rows, hid, w->eps, th); \
    pd_linear_##SUF(h, hid, w->qkv, w->qkv_bias, qkv, qkvn, rows, qkvn, hid, th);           \
    LAYER_LORA(SUF, w, s, qkv, qkv, h, qkvn, hid)                                            \
    pd_rotary_store_##SUF(qkv, qkvn, qkv + qn, qkvn, qkv + qn + kvn, qkvn, s->positions, s->cos_sin, kv, \
                          stride, s->slots, rows, w->hq, w->hkv, w->d, s->bs, th);           \
    pd_paged_attention_##SUF(qkv, qkvn, kv, stride, s->tables, s->width, s->qsl, s->lens, attn, \
                             s->batch, w->hq, w->hkv, w->d, s->bs, w->scale, s->scratch, th); \
    pd_linear_##SUF(attn, qn, w->o, w->o_bias, h, hid, rows, hid, qn, th);                   \
    LAYER_LORA(SUF, w, s, o, h, attn, hid, qn)                                               \
    pd_rms_norm_##SUF(h, hid, res, hid, w->post_norm, x, res, rows, hid, w->eps, th);        \
    pd_linear_##SUF(x, hid, w->gate_up, NULL, s->gate_up, i2, rows, i2, hid, th);            \
    LAYER_LORA(SUF, w, s, gate_up, (T *)s->gate_up, x, i2, hid)                              \
    pd_silu_and_mul_##SUF(s->gate_up, i2, s->act, rows, w->inter, th);                       \
    pd_linear_##SUF(s->act, w->inter, w->down, NULL, x, hid, rows, hid, w->inter, th);       \
    LAYER_LORA(SUF, w, s, down, x, (T *)s->act, hid, w->inter)                               \
}

/* The W8A8 layer: RMSNorm + quantize -> int8 qkv -> rotary + KV store -> attention ->
 * quantize -> int8 o -> RMSNorm + quantize -> int8 gate_up -> SiLU-and-mul + quantize -> int8
 * down. The first layer's residual is its input itself (pd_rms_norm_quant writes none). */
#define DECODER_LAYER_W8A8(SUF, T)                                                             \
void pd_decoder_layer_w8a8_##SUF(const pd_w8a8_layer_weights *w, const pd_layer_step *s, T *kv, size_t stride) { \
    int hid = w->hidden, qn = w->hq * w->d, kvn = w->hkv * w->d, qkvn = qn + 2 * kvn, i2 = 2 * w->inter; \
    int rows = s->rows, th = s->threads;                                                     \
    T *x = s->x, *res = s->res, *h = s->h, *qkv = s->qkv, *attn = s->attn;                   \
    int8_t *q = s->q;                                                                        \
    float *qs = s->q_scale;                                                                  \
    if (s->first) memcpy(res, x, (size_t)rows * hid * sizeof(T));                            \
    pd_rms_norm_quant_##SUF(x, hid, s->first ? NULL : res, hid, w->input_norm, q, qs, res, rows, hid, w->eps, th); \
    pd_int8_linear_##SUF(q, hid, qs, w->qkv, w->qkv_scale, w->qkv_bias, qkv, qkvn, rows, qkvn, hid, th); \
    pd_rotary_store_##SUF(qkv, qkvn, qkv + qn, qkvn, qkv + qn + kvn, qkvn, s->positions, s->cos_sin, kv, \
                          stride, s->slots, rows, w->hq, w->hkv, w->d, s->bs, th);           \
    pd_paged_attention_##SUF(qkv, qkvn, kv, stride, s->tables, s->width, s->qsl, s->lens, attn, \
                             s->batch, w->hq, w->hkv, w->d, s->bs, w->scale, s->scratch, th); \
    pd_quant_per_token_##SUF(attn, qn, q, qs, rows, qn, th);                                 \
    pd_int8_linear_##SUF(q, qn, qs, w->o, w->o_scale, w->o_bias, h, hid, rows, hid, qn, th); \
    pd_rms_norm_quant_##SUF(h, hid, res, hid, w->post_norm, q, qs, res, rows, hid, w->eps, th); \
    pd_int8_linear_##SUF(q, hid, qs, w->gate_up, w->gate_up_scale, NULL, s->gate_up, i2, rows, i2, hid, th); \
    pd_silu_and_mul_quant_##SUF(s->gate_up, i2, q, qs, rows, w->inter, th);                 \
    pd_int8_linear_##SUF(q, w->inter, qs, w->down, w->down_scale, NULL, x, hid, rows, hid, w->inter, th); \
}

DECODER_LAYER(f32, float)
DECODER_LAYER(bf16, uint16_t)
DECODER_LAYER_W8A8(f32, float)
DECODER_LAYER_W8A8(bf16, uint16_t)

/* ---- The LoRA delta of one layer, every adapter slot and every part of the layer in one call
 * (reference.lora_delta_ref): y[t, part p] += (x[t] @ A_s[rows of p]^T) @ B_s[part p]^T for
 * each token t of slot s. Two phases in one parallel region: the shrink of each slot's tokens
 * (all parts at once) into a scratch of the element type, each value rounded to it as torch
 * rounds the first matmul; then the expand, the delta rounded to y's type before the add.
 * Tasks are (slot, up to LORA_TOKENS of its tokens, block of A rows / of y's columns), the
 * blocks sized to about LORA_TASK_MACS each: a decode step's few tokens per slot still spread
 * over every thread, and a prefill slot's many tokens split by tokens. The shrink: float32 dot
 * products over contiguous k, four at a time with one operand shared, left to the compiler's
 * vectorizer. The expand: B's rows hold R values per output column, so each task transposes
 * 64 columns of B at a time into a float32 tile that every token of the block multiplies into
 * eight vector accumulators (a lone token takes dot products over B's rows instead). Each slot
 * has a rank (at most R, the stacks zero-padded to R): both phases touch only the first rank rows
 * of each part of A_s and the first rank values of each row of B_s, a rank-0 slot nothing. ---- */

#define LORA_TOKENS 128
#define LORA_COLS 64
#define LORA_TASK_MACS 32768

typedef struct { int slot, j0, j1; } lora_block_t;  /* tokens [j0, j1) of the slot's group */

/* Items of n per block (a multiple of `align`, or n) for tasks of about LORA_TASK_MACS, at
 * `cost` multiply-adds per item. */
static int lora_block_size(int n, long cost, int align) {
    long per = LORA_TASK_MACS / (cost > 0 ? cost : 1);
    per = per < align ? align : per / align * align;
    return per < n ? (int)per : n;
}

/* Each slot's tokens in blocks of at most LORA_TOKENS (malloc'd; *count of them), but those of
 * rank-0 slots (ranks NULL: none); *rows: the end of the last such slot's tokens in sorted order
 * (the scratch's rows). */
static inline int lora_slot_tokens(const int32_t *count, const int32_t *ranks, int s) {
    return ranks && ranks[s] <= 0 ? 0 : count[s];  /* a rank-0 slot's tokens: no work */
}
static lora_block_t *lora_blocks(const int32_t *start, const int32_t *count, const int32_t *ranks, int slots,
                                 int *nblocks, int *rows) {
    int n = 0, end = 0;
    for (int s = 0; s < slots; s++) {
        int c = lora_slot_tokens(count, ranks, s);
        n += (c + LORA_TOKENS - 1) / LORA_TOKENS;
        if (c > 0 && start[s] + c > end) end = start[s] + c;
    }
    lora_block_t *blocks = malloc((size_t)(n > 0 ? n : 1) * sizeof *blocks);
    if (!blocks) abort();
    n = 0;
    for (int s = 0; s < slots; s++)
        for (int j = 0; j < lora_slot_tokens(count, ranks, s); j += LORA_TOKENS)
            blocks[n++] = (lora_block_t){s, j, count[s] - j < LORA_TOKENS ? count[s] : j + LORA_TOKENS};
    *nblocks = n;
    *rows = end;
    return blocks;
}

/* out[q] = u . v[q], q < 4, float32 sums. */
#define LORA_DOTS(SUF, T)                                                                      \
static inline float lora_dot_##SUF(const T *u, const T *v, int n) {                          \
    float acc = 0.f;                                                                         \
    _Pragma("omp simd reduction(+:acc)")                                                     \
    for (int i = 0; i < n; i++) acc += GET_##SUF(u, i) * GET_##SUF(v, i);                    \
    return acc;                                                                              \
}                                                                                            \
static inline void lora_dots4_##SUF(const T *u, const T *const *v, int n, float *out) {      \
    const T *v0 = v[0], *v1 = v[1], *v2 = v[2], *v3 = v[3];                                  \
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;                                            \
    _Pragma("omp simd reduction(+:a0, a1, a2, a3)")                                          \
    for (int i = 0; i < n; i++) {                                                            \
        float w = GET_##SUF(u, i);                                                           \
        a0 += w * GET_##SUF(v0, i);                                                          \
        a1 += w * GET_##SUF(v1, i);                                                          \
        a2 += w * GET_##SUF(v2, i);                                                          \
        a3 += w * GET_##SUF(v3, i);                                                          \
    }                                                                                        \
    out[0] = a0; out[1] = a1; out[2] = a2; out[3] = a3;                                      \
}

/* Shrink of tokens [j0, j1) of one slot, A rows [r0, r1): sh[j, r] = x[tok[j]] . a[r] (sh
 * rows pr apart). Four tokens per A row, then the rest one token against four A rows. */
#define LORA_SHRINK(SUF, T)                                                                    \
static void lora_shrink_##SUF(const T *x, long sx, const T *a, const int32_t *tok, T *sh, int pr, int k, \
                              int j0, int j1, int r0, int r1) {                              \
    float d[4];                                                                              \
    int j = j0;                                                                              \
    for (; j + 4 <= j1; j += 4) {                                                            \
        const T *xs[4] = {x + tok[j] * sx, x + tok[j + 1] * sx, x + tok[j + 2] * sx, x + tok[j + 3] * sx}; \
        for (int r = r0; r < r1; r++) {                                                      \
            lora_dots4_##SUF(a + (size_t)r * k, xs, k, d);                                   \
            for (int q = 0; q < 4; q++) PUT_##SUF(sh, (size_t)(j + q) * pr + r, d[q]);       \
        }                                                                                    \
    }                                                                                        \
    for (; j < j1; j++) {                                                                    \
        const T *xr = x + tok[j] * sx;                                                       \
        T *row = sh + (size_t)j * pr;                                                        \
        int r = r0;                                                                          \
        for (; r + 4 <= r1; r += 4) {                                                        \
            const T *as[4] = {a + (size_t)r * k, a + (size_t)(r + 1) * k, a + (size_t)(r + 2) * k, \
                              a + (size_t)(r + 3) * k};                                      \
            lora_dots4_##SUF(xr, as, k, d);                                                  \
            for (int q = 0; q < 4; q++) PUT_##SUF(row, r + q, d[q]);                         \
        }                                                                                    \
        for (; r < r1; r++) PUT_##SUF(row, r, lora_dot_##SUF(xr, a + (size_t)r * k, k));     \
    }                                                                                        \
}

/* Eight float32 lanes in whatever registers the target has (a GCC / Clang vector extension: one
 * AVX register, or two SSE / NEON ones), moved in and out with memcpy: the expand's accumulators,
 * eight named ones, stay in registers (GCC keeps a float[64] accumulator on the stack: 2x slower). */
typedef float lora_v8 __attribute__((vector_size(32)));

#define LORA_FMA8(acc, v, p)                                                                   \
    {                                                                                        \
        lora_v8 b_;                                                                          \
        memcpy(&b_, (p), sizeof b_);                                                         \
        acc += (v) * b_;                                                                     \
    }

/* out[c] = sum_i s[i] * bt[i][c] for the LORA_COLS columns of a transposed B tile. */
#define LORA_COLS_DOT(SUF, T)                                                                  \
static inline void lora_cols_##SUF(const T *s, const float *bt, int r, float *out) {         \
    lora_v8 c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0}, c4 = {0}, c5 = {0}, c6 = {0}, c7 = {0};  \
    for (int i = 0; i < r; i++) {                                                            \
        float v = GET_##SUF(s, i);                                                           \
        const float *row = bt + (size_t)i * LORA_COLS;                                       \
        LORA_FMA8(c0, v, row) LORA_FMA8(c1, v, row + 8) LORA_FMA8(c2, v, row + 16) LORA_FMA8(c3, v, row + 24) \
        LORA_FMA8(c4, v, row + 32) LORA_FMA8(c5, v, row + 40) LORA_FMA8(c6, v, row + 48) LORA_FMA8(c7, v, row + 56) \
    }                                                                                        \
    lora_v8 acc[8] = {c0, c1, c2, c3, c4, c5, c6, c7};                                       \
    memcpy(out, acc, sizeof acc);                                                            \
}

/* bt[i * LORA_COLS + c] = b[c * r + i] for the tile's w columns (zeros past them) and the first
 * rank values of each: B's rows read as the expand's transposed tile. With AVX2, whole 8 x 8
 * blocks (a full tile, eight values at a time) go through registers; the rest element by element. */
#if defined(__AVX2__)
static inline void lora_transpose8(__m256 *v) {
    __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
    __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
    __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    v[0] = _mm256_permute2f128_ps(s0, s4, 0x20), v[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    v[2] = _mm256_permute2f128_ps(s2, s6, 0x20), v[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    v[4] = _mm256_permute2f128_ps(s0, s4, 0x31), v[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    v[6] = _mm256_permute2f128_ps(s2, s6, 0x31), v[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
static inline __m256 lora_load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 lora_load8_bf16(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
#define LORA_TRANSPOSE_BLOCKS(SUF, b, r, rank, w, bt, i0)                                      \
    if (w == LORA_COLS)                                                                      \
        for (; i0 + 8 <= rank; i0 += 8)                                                      \
            for (int c = 0; c < LORA_COLS; c += 8) {                                         \
                __m256 v[8];                                                                 \
                for (int q = 0; q < 8; q++) v[q] = lora_load8_##SUF(b + (size_t)(c + q) * r + i0); \
                lora_transpose8(v);                                                          \
                for (int q = 0; q < 8; q++) _mm256_storeu_ps(bt + (size_t)(i0 + q) * LORA_COLS + c, v[q]); \
            }
#else
#define LORA_TRANSPOSE_BLOCKS(SUF, b, r, rank, w, bt, i0)
#endif
#define LORA_TRANSPOSE(SUF, T)                                                                 \
static void lora_transpose_##SUF(const T *b, int r, int rank, int w, float *bt) {            \
    int i0 = 0;                                                                              \
    LORA_TRANSPOSE_BLOCKS(SUF, b, r, rank, w, bt, i0)                                        \
    for (int c = 0; c < LORA_COLS; c++)                                                      \
        for (int i = i0; i < rank; i++) bt[i * LORA_COLS + c] = c < w ? GET_##SUF(b + (size_t)c * r, i) : 0.f; \
}

/* Expand of tokens [j0, j1) of one slot into columns [c0, c1) of one part: y[tok[j], c] +=
 * round(sh[j] . b[c]) over the first `rank` of the R values, sh pointing at the part's values of
 * row 0 (rows pr apart), b's rows r apart; bt: room for rank x LORA_COLS floats. */
#define LORA_EXPAND(SUF, T)                                                                    \
LORA_COLS_DOT(SUF, T)                                                                        \
LORA_TRANSPOSE(SUF, T)                                                                       \
static void lora_expand_dots_##SUF(T *y, long sy, const T *b, const int32_t *tok, const T *sh, int pr, int r, \
                                   int rank, int j0, int j1, int c0, int c1) {               \
    float d[4];                                                                              \
    for (int j = j0; j < j1; j++) {                                                          \
        const T *sr = sh + (size_t)j * pr;                                                   \
        T *yr = y + tok[j] * sy;                                                             \
        int c = c0;                                                                          \
        for (; c + 4 <= c1; c += 4) {                                                        \
            const T *bs[4] = {b + (size_t)c * r, b + (size_t)(c + 1) * r, b + (size_t)(c + 2) * r, \
                              b + (size_t)(c + 3) * r};                                      \
            lora_dots4_##SUF(sr, bs, rank, d);                                               \
            for (int q = 0; q < 4; q++) PUT_##SUF(yr, c + q, GET_##SUF(yr, c + q) + ROUND_##SUF(d[q])); \
        }                                                                                    \
        for (; c < c1; c++)                                                                  \
            PUT_##SUF(yr, c, GET_##SUF(yr, c) + ROUND_##SUF(lora_dot_##SUF(sr, b + (size_t)c * r, rank))); \
    }                                                                                        \
}                                                                                            \
static void lora_expand_##SUF(T *y, long sy, const T *b, const int32_t *tok, const T *sh, int pr, int r, \
                              int rank, int j0, int j1, int c0, int c1, float *bt) {         \
    float d[LORA_COLS];                                                                      \
    if (j1 - j0 == 1) {  /* one token: a transposed tile would serve it once */                \
        lora_expand_dots_##SUF(y, sy, b, tok, sh, pr, r, rank, j0, j1, c0, c1);               \
        return;                                                                              \
    }                                                                                        \
    for (int cb = c0; cb < c1; cb += LORA_COLS) {                                            \
        int w = c1 - cb < LORA_COLS ? c1 - cb : LORA_COLS;                                   \
        lora_transpose_##SUF(b + (size_t)cb * r, r, rank, w, bt);                            \
        for (int j = j0; j < j1; j++) {                                                      \
            lora_cols_##SUF(sh + (size_t)j * pr, bt, rank, d);                               \
            T *yr = y + tok[j] * sy + cb;                                                    \
            for (int c = 0; c < w; c++) PUT_##SUF(yr, c, GET_##SUF(yr, c) + ROUND_##SUF(d[c])); \
        }                                                                                    \
    }                                                                                        \
}

/* y [T, n] (row stride sy), x [T, k] (row stride sx), a [slots, parts * r, k], b [slots, n, r];
 * sorted, start, count: reference.group_by_slot's; ends [parts]: where each part's columns end
 * (the last n); ranks [slots]: how many leading rows of each part of a slot's A (and leading
 * values of each row of its B) may be non-zero, each in [0, r], the rest never read (NULL: r
 * for every slot). Rows of tokens in no slot, or in a rank-0 slot, are not touched. */
#define LORA_DELTA(SUF, T)                                                                     \
LORA_DOTS(SUF, T)                                                                            \
LORA_SHRINK(SUF, T)                                                                          \
LORA_EXPAND(SUF, T)                                                                          \
void pd_lora_delta_##SUF(T *y, long sy, const T *x, long sx, const T *a, const T *b, const int32_t *sorted, \
                         const int32_t *start, const int32_t *count, const int32_t *ends, int parts, int n, \
                         int k, int r, int slots, const int32_t *ranks, int threads) {       \
    int nblocks, rows, pr = parts * r;                                                       \
    lora_block_t *blocks = lora_blocks(start, count, ranks, slots, &nblocks, &rows);         \
    if (!nblocks) {                                                                          \
        free(blocks);                                                                        \
        return;                                                                              \
    }                                                                                        \
    /* the shrunk rows [rows, pr], then each thread's transposed B tile */                   \
    size_t sh_bytes = ((size_t)rows * pr * sizeof(T) + 63) / 64 * 64;                         \
    char *scratch = malloc(sh_bytes + (size_t)threads * r * LORA_COLS * sizeof(float) + 64);  \
    if (!scratch) abort();                                                                   \
    T *sh = (T *)scratch;                                                                    \
    long per_block = (rows + nblocks - 1) / nblocks;                                         \
    int rb = lora_block_size(pr, per_block * k, 4), cb = lora_block_size(n, per_block * r, LORA_COLS); \
    int rtasks = rb ? (pr + rb - 1) / rb : 0, ctasks = cb ? (n + cb - 1) / cb : 0;           \
    _Pragma("omp parallel num_threads(threads)")                                             \
    {                                                                                        \
        _Pragma("omp for schedule(dynamic)")                                                 \
        for (long t = 0; t < (long)nblocks * rtasks; t++) {                                  \
            lora_block_t blk = blocks[t / rtasks];                                           \
            int r0 = (int)(t % rtasks) * rb, r1 = r0 + rb < pr ? r0 + rb : pr;               \
            int rank = ranks ? ranks[blk.slot] : r;                                          \
            for (int p = r0 / r; p * r < r1; p++) {  /* each part's rows below the rank */     \
                int lo = r0 > p * r ? r0 : p * r, hi = r1 < p * r + rank ? r1 : p * r + rank;  \
                if (lo < hi)                                                                 \
                    lora_shrink_##SUF(x, sx, a + (size_t)blk.slot * pr * k, sorted + start[blk.slot], \
                                      sh + (size_t)start[blk.slot] * pr, pr, k, blk.j0, blk.j1, lo, hi); \
            }                                                                                \
        }                                                                                    \
        float *bt = (float *)(scratch + sh_bytes) + (size_t)omp_get_thread_num() * r * LORA_COLS; \
        _Pragma("omp for schedule(dynamic)")                                                 \
        for (long t = 0; t < (long)nblocks * ctasks; t++) {                                  \
            lora_block_t blk = blocks[t / ctasks];                                           \
            int c = (int)(t % ctasks) * cb, c1 = c + cb < n ? c + cb : n, p = 0;             \
            int rank = ranks ? ranks[blk.slot] : r;                                          \
            const T *bs = b + (size_t)blk.slot * n * r, *ss = sh + (size_t)start[blk.slot] * pr; \
            for (; c < c1; c = ends[p] < c1 ? ends[p] : c1) {  /* the parts the block spans */ \
                while (ends[p] <= c) p++;                                                    \
                lora_expand_##SUF(y, sy, bs, sorted + start[blk.slot], ss + (size_t)p * r, pr, r, rank, \
                                  blk.j0, blk.j1, c, ends[p] < c1 ? ends[p] : c1, bt);       \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    free(scratch);                                                                           \
    free(blocks);                                                                            \
}

LORA_DELTA(f32, float)
LORA_DELTA(bf16, uint16_t)
