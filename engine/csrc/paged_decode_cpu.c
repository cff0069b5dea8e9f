/* Paged decode attention for CPUs: one query token per sequence, reading K
 * and V straight from the block-paged cache (no gathered copy).
 *
 * Layout (as engine/attention.py):
 *   q, out:            [B, H, D]
 *   k_cache, v_cache:  [num_blocks, BS, KV, D]
 *   block_tables:      [B, MB] int64;  context_lens: [B] int64
 * Query head h reads kv head h / (H / KV).
 *
 * Work is split over sequences (OpenMP), all heads of a sequence together: a block's
 * K (or V) is [BS, KV, D] contiguous, so it streams through once, front to
 * back, and each K/V row is widened to float32 once for the `group` query
 * heads that share it. Two passes per sequence: scores for every position
 * (into `scratch`), a softmax, then the V rows weighted by it. Arithmetic is
 * float32 whatever the storage type. Built by engine/cpu_attention.py with
 * -O3 -march=native; head_dim 64 and 128 get their own copies so the loops
 * over D have a constant trip count and vectorise fully.
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

#define DEFINE_KERNEL(NAME, T, LOAD, STORE)                                                  \
INLINE void NAME##_impl(const T *q, const T *k_cache, const T *v_cache,                      \
                        const int64_t *block_tables, const int64_t *context_lens, T *out,   \
                        int64_t seq_begin, int64_t seq_end, int64_t H, int64_t KV,          \
                        const int64_t D, int64_t BS, int64_t MB, float scale, int64_t window, \
                        float *scratch, int64_t max_ctx) {                                   \
    const int64_t group = H / KV, row = KV * D;                                              \
    float *scores = scratch;           /* [H][max_ctx] */                                    \
    float *qf = scores + H * max_ctx;  /* [H][D] */                                          \
    float *acc = qf + H * D;           /* [H][D] */                                          \
    float *wide = acc + H * D;         /* [D]: one K/V row in float32 */                     \
    for (int64_t b = seq_begin; b < seq_end; b++) {                                          \
        const int64_t ctx = context_lens[b];                                                 \
        const int64_t first = (window > 0 && ctx > window) ? ctx - window : 0;               \
        const int64_t n = ctx - first;                                                       \
        const int64_t *table = block_tables + b * MB;                                        \
        for (int64_t i = 0; i < H * D; i++) qf[i] = LOAD(q, b * H * D + i) * scale;          \
        /* pass 1: scores[h][t] = q_h . k_t */                                               \
        for (int64_t blk = first / BS; blk * BS < ctx; blk++) {                              \
            const int64_t t0 = blk * BS;                                                     \
            const int64_t lo = t0 > first ? t0 : first, hi = t0 + BS < ctx ? t0 + BS : ctx;  \
            const T *kb = k_cache + table[blk] * BS * row;                                   \
            const T *kn = (t0 + BS < ctx) ? k_cache + table[blk + 1] * BS * row : kb;        \
            for (int64_t t = lo; t < hi; t++) {                                              \
                prefetch_row(kn + (t - t0) * row, row * (int64_t)sizeof(T));                 \
                for (int64_t kvh = 0; kvh < KV; kvh++) {                                     \
                    const T *kr = kb + (t - t0) * row + kvh * D;                             \
                    for (int64_t d = 0; d < D; d++) wide[d] = LOAD(kr, d);                   \
                    for (int64_t g = 0; g < group; g++) {                                    \
                        const int64_t h = kvh * group + g;                                   \
                        const float *qh = qf + h * D;                                        \
                        float s = 0.f;                                                       \
                        for (int64_t d = 0; d < D; d++) s += qh[d] * wide[d];                \
                        scores[h * max_ctx + (t - first)] = s;                               \
                    }                                                                        \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        for (int64_t h = 0; h < H; h++) {                                                    \
            float *sh = scores + h * max_ctx;                                                \
            float m = -INFINITY, sum = 0.f;                                                  \
            for (int64_t i = 0; i < n; i++) m = sh[i] > m ? sh[i] : m;                       \
            for (int64_t i = 0; i < n; i++) { sh[i] = expf(sh[i] - m); sum += sh[i]; }       \
            const float inv = sum > 0.f ? 1.f / sum : 0.f;                                   \
            for (int64_t i = 0; i < n; i++) sh[i] *= inv;                                    \
        }                                                                                    \
        /* pass 2: acc[h] = sum_t p[h][t] * v_t */                                           \
        memset(acc, 0, sizeof(float) * H * D);                                               \
        for (int64_t blk = first / BS; blk * BS < ctx; blk++) {                              \
            const int64_t t0 = blk * BS;                                                     \
            const int64_t lo = t0 > first ? t0 : first, hi = t0 + BS < ctx ? t0 + BS : ctx;  \
            const T *vb = v_cache + table[blk] * BS * row;                                   \
            const T *vn = (t0 + BS < ctx) ? v_cache + table[blk + 1] * BS * row : vb;        \
            for (int64_t t = lo; t < hi; t++) {                                              \
                prefetch_row(vn + (t - t0) * row, row * (int64_t)sizeof(T));                 \
                for (int64_t kvh = 0; kvh < KV; kvh++) {                                     \
                    const T *vr = vb + (t - t0) * row + kvh * D;                             \
                    for (int64_t d = 0; d < D; d++) wide[d] = LOAD(vr, d);                   \
                    for (int64_t g = 0; g < group; g++) {                                    \
                        const int64_t h = kvh * group + g;                                   \
                        const float p = scores[h * max_ctx + (t - first)];                   \
                        float *ah = acc + h * D;                                             \
                        for (int64_t d = 0; d < D; d++) ah[d] += p * wide[d];                \
                    }                                                                        \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        for (int64_t i = 0; i < H * D; i++) STORE(out, b * H * D + i, acc[i]);               \
    }                                                                                        \
}                                                                                            \
void NAME(const T *q, const T *k_cache, const T *v_cache, const int64_t *block_tables,      \
          const int64_t *context_lens, T *out, int64_t num_seqs, int64_t H, int64_t KV,      \
          int64_t D, int64_t BS, int64_t MB, float scale, int64_t window,                   \
          float *scratch /* [threads][H * max_ctx + 2 * H * D + D] */, int64_t max_ctx,      \
          int64_t threads) {                                                                 \
    const int64_t per_thread = H * max_ctx + 2 * H * D + D;                                  \
    /* Contiguous slices of sequences, one per thread of the OpenMP pool that              \
     * torch itself uses (same libgomp), so no second pool fights it for cores. */           \
    _Pragma("omp parallel for num_threads(threads) schedule(static, 1)")                     \
    for (int64_t tid = 0; tid < threads; tid++) {                                            \
        const int64_t begin = num_seqs * tid / threads, end = num_seqs * (tid + 1) / threads; \
        float *mine = scratch + tid * per_thread;                                            \
        if (D == 64)                                                                         \
            NAME##_impl(q, k_cache, v_cache, block_tables, context_lens, out, begin, end,    \
                        H, KV, 64, BS, MB, scale, window, mine, max_ctx);                    \
        else if (D == 128)                                                                   \
            NAME##_impl(q, k_cache, v_cache, block_tables, context_lens, out, begin, end,    \
                        H, KV, 128, BS, MB, scale, window, mine, max_ctx);                   \
        else                                                                                 \
            NAME##_impl(q, k_cache, v_cache, block_tables, context_lens, out, begin, end,    \
                        H, KV, D, BS, MB, scale, window, mine, max_ctx);                     \
    }                                                                                        \
}

DEFINE_KERNEL(paged_decode_f32, float, load_f32, store_f32)
DEFINE_KERNEL(paged_decode_bf16, uint16_t, load_bf16, store_bf16)
