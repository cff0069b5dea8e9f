/* Paged decode attention for CPUs: one query token per sequence, reading K
 * and V straight from the block-paged cache (no gathered copy).
 *
 * Layout (as engine/attention.py):
 *   q, out:            [B, H, D]
 *   k_cache, v_cache:  [num_blocks, BS, KV, D]
 *   block_tables:      [B, MB] int64;  context_lens: [B] int64
 * Query head h reads kv head h / (H / KV).
 *
 * Work is split over sequences (OpenMP); within a sequence, one kv head at a
 * time with the G query heads that share it, so each K/V row is loaded and
 * widened to float32 once for all G. Two passes: scores for every position
 * (into `scratch`), a softmax, then the V rows weighted by it. Arithmetic is
 * float32 whatever the storage type. Built by engine/cpu_attention.py with
 * -O3 -march=native; the common (G, head_dim) pairs get their own copies so
 * the loops over them have constant trip counts, unroll, and keep the
 * queries and accumulators in registers.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

INLINE float load_f32(const float *p, int64_t i) { return p[i]; }
INLINE void store_f32(float *p, int64_t i, float x) { p[i] = x; }

INLINE float load_bf16(const uint16_t *p, int64_t i) {
    uint32_t bits = (uint32_t)p[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

INLINE void store_bf16(uint16_t *p, int64_t i, float f) {
    /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        p[i] = (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
        return;
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    p[i] = (uint16_t)(bits >> 16);
}

/* exp(x) for x <= 0 (softmax inputs after subtracting the max), as plain
 * arithmetic so the softmax loop vectorises; a libm call per score was about
 * a fifth of the kernel's time. exp(x) = 2^i * exp(r), i = round(x / ln 2),
 * r = x - i ln 2 in [-ln2/2, ln2/2] (ln 2 split in two so r is exact), and
 * exp(r) by its degree-6 Taylor polynomial. Measured relative error < 1e-5
 * over [-100, 0] (-ffast-math may fuse the split); far below bf16 precision. */
INLINE float exp_nonpos(float x) {
    x = x < -87.f ? -87.f : x;
    const float i = __builtin_roundf(x * 1.44269504088896341f);
    const float r = (x - i * 0.693145751953125f) - i * 1.428606765330187e-06f;
    float p = 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const int32_t bits = ((int32_t)i + 127) << 23;
    float two_i;
    memcpy(&two_i, &bits, sizeof two_i);
    return p * two_i;
}

/* Blocks are scattered in memory, so the hardware prefetcher loses the
 * stream at every block boundary: while a block's row t is consumed, row t
 * of the next block is requested. */
INLINE void prefetch_row(const void *p, int64_t bytes) {
#ifdef SPLITSERVE_NO_PREFETCH
    (void)p; (void)bytes;
#else
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch((const char *)p + off, 0, 0);
#endif
}

/* One (sequence, kv head) at a time: the `G` query heads sharing the kv head
 * keep their queries and output accumulators in registers (G and D are
 * compile-time constants in the common cases, so the loops over them unroll),
 * and each K/V row of that head is loaded once for all of them. */
#define DEFINE_KERNEL(NAME, T, LOAD, STORE)                                                  \
INLINE void NAME##_head(const T *q, const T *k_cache, const T *v_cache, const int64_t *table, \
                        int64_t first, int64_t ctx, T *out, const int64_t G, const int64_t D, \
                        int64_t row, int64_t BS, float scale, float *scores,                 \
                        int64_t max_ctx) {                                                   \
    float qf[G * D], acc[G * D];                                                             \
    for (int64_t i = 0; i < G * D; i++) { qf[i] = LOAD(q, i) * scale; acc[i] = 0.f; }       \
    const int64_t n = ctx - first;                                                           \
    /* pass 1: scores[g][t] = q_g . k_t */                                                   \
    for (int64_t blk = first / BS; blk * BS < ctx; blk++) {                                  \
        const int64_t t0 = blk * BS;                                                         \
        const int64_t lo = t0 > first ? t0 : first, hi = t0 + BS < ctx ? t0 + BS : ctx;      \
        const T *kb = k_cache + table[blk] * BS * row;                                       \
        const T *kn = (t0 + BS < ctx) ? k_cache + table[blk + 1] * BS * row : kb;            \
        for (int64_t t = lo; t < hi; t++) {                                                  \
            const T *kr = kb + (t - t0) * row;                                               \
            prefetch_row(kn + (t - t0) * row, D * (int64_t)sizeof(T));                       \
            float kf[D];                                                                     \
            for (int64_t d = 0; d < D; d++) kf[d] = LOAD(kr, d);                             \
            for (int64_t g = 0; g < G; g++) {                                                \
                float s = 0.f;                                                               \
                for (int64_t d = 0; d < D; d++) s += qf[g * D + d] * kf[d];                  \
                scores[g * max_ctx + (t - first)] = s;                                       \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    for (int64_t g = 0; g < G; g++) {                                                        \
        float *sg = scores + g * max_ctx;                                                    \
        float m = -INFINITY, sum = 0.f;                                                      \
        for (int64_t i = 0; i < n; i++) m = sg[i] > m ? sg[i] : m;                           \
        for (int64_t i = 0; i < n; i++) { sg[i] = exp_nonpos(sg[i] - m); sum += sg[i]; }     \
        const float inv = sum > 0.f ? 1.f / sum : 0.f;                                       \
        for (int64_t i = 0; i < n; i++) sg[i] *= inv;                                        \
    }                                                                                        \
    /* pass 2: acc[g] = sum_t p[g][t] * v_t */                                               \
    for (int64_t blk = first / BS; blk * BS < ctx; blk++) {                                  \
        const int64_t t0 = blk * BS;                                                         \
        const int64_t lo = t0 > first ? t0 : first, hi = t0 + BS < ctx ? t0 + BS : ctx;      \
        const T *vb = v_cache + table[blk] * BS * row;                                       \
        const T *vn = (t0 + BS < ctx) ? v_cache + table[blk + 1] * BS * row : vb;            \
        for (int64_t t = lo; t < hi; t++) {                                                  \
            const T *vr = vb + (t - t0) * row;                                               \
            prefetch_row(vn + (t - t0) * row, D * (int64_t)sizeof(T));                       \
            float vf[D];                                                                     \
            for (int64_t d = 0; d < D; d++) vf[d] = LOAD(vr, d);                             \
            for (int64_t g = 0; g < G; g++) {                                                \
                const float p = scores[g * max_ctx + (t - first)];                           \
                for (int64_t d = 0; d < D; d++) acc[g * D + d] += p * vf[d];                 \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    for (int64_t i = 0; i < G * D; i++) STORE(out, i, acc[i]);                               \
}                                                                                            \
                                                                                             \
INLINE void NAME##_seqs(const T *q, const T *k_cache, const T *v_cache,                      \
                        const int64_t *block_tables, const int64_t *context_lens, T *out,   \
                        int64_t begin, int64_t end, int64_t H, int64_t KV, const int64_t G, \
                        const int64_t D, int64_t BS, int64_t MB, float scale, int64_t window, \
                        float *scores, int64_t max_ctx) {                                    \
    for (int64_t b = begin; b < end; b++) {                                                  \
        const int64_t ctx = context_lens[b];                                                 \
        const int64_t first = (window > 0 && ctx > window) ? ctx - window : 0;               \
        for (int64_t kvh = 0; kvh < KV; kvh++) {                                             \
            const int64_t off = (b * H + kvh * G) * D;                                       \
            NAME##_head(q + off, k_cache + kvh * D, v_cache + kvh * D, block_tables + b * MB, \
                        first, ctx, out + off, G, D, KV * D, BS, scale, scores, max_ctx);    \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
void NAME(const T *q, const T *k_cache, const T *v_cache, const int64_t *block_tables,      \
          const int64_t *context_lens, T *out, int64_t num_seqs, int64_t H, int64_t KV,      \
          int64_t D, int64_t BS, int64_t MB, float scale, int64_t window,                   \
          float *scratch /* [threads][H * max_ctx] */, int64_t max_ctx, int64_t threads) {   \
    const int64_t G = H / KV;                                                                \
    /* Contiguous slices of sequences, one per thread of the OpenMP pool that              \
     * torch itself uses (same libgomp), so no second pool fights it for cores. */           \
    _Pragma("omp parallel for num_threads(threads) schedule(static, 1)")                     \
    for (int64_t tid = 0; tid < threads; tid++) {                                            \
        const int64_t begin = num_seqs * tid / threads, end = num_seqs * (tid + 1) / threads; \
        float *scores = scratch + tid * H * max_ctx;                                         \
        /* Constant (G, D) copies for the common shapes; the last is generic. */            \
        if (G == 1 && D == 64)                                                               \
            NAME##_seqs(q, k_cache, v_cache, block_tables, context_lens, out, begin, end, H, \
                        KV, 1, 64, BS, MB, scale, window, scores, max_ctx);                  \
        else if (G == 2 && D == 64)                                                          \
            NAME##_seqs(q, k_cache, v_cache, block_tables, context_lens, out, begin, end, H, \
                        KV, 2, 64, BS, MB, scale, window, scores, max_ctx);                  \
        else if (G == 4 && D == 64)                                                          \
            NAME##_seqs(q, k_cache, v_cache, block_tables, context_lens, out, begin, end, H, \
                        KV, 4, 64, BS, MB, scale, window, scores, max_ctx);                  \
        else if (G == 4 && D == 128)                                                         \
            NAME##_seqs(q, k_cache, v_cache, block_tables, context_lens, out, begin, end, H, \
                        KV, 4, 128, BS, MB, scale, window, scores, max_ctx);                 \
        else if (G == 8 && D == 128)                                                         \
            NAME##_seqs(q, k_cache, v_cache, block_tables, context_lens, out, begin, end, H, \
                        KV, 8, 128, BS, MB, scale, window, scores, max_ctx);                 \
        else                                                                                 \
            NAME##_seqs(q, k_cache, v_cache, block_tables, context_lens, out, begin, end, H, \
                        KV, G, D, BS, MB, scale, window, scores, max_ctx);                   \
    }                                                                                        \
}

DEFINE_KERNEL(paged_decode_f32, float, load_f32, store_f32)
DEFINE_KERNEL(paged_decode_bf16, uint16_t, load_bf16, store_bf16)
