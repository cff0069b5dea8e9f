/* Greedy sampling's argmax over each row of logits, in the logits' own dtype
 * (bfloat16 rows need no float32 copy first), split over rows with OpenMP on
 * torch's pool. Ties go to the first index, as torch.argmax does. */
#include <stdint.h>
#include <string.h>

/* Finite logits are assumed here (a NaN logit is already a broken model): it
 * lets the maximum be a plain reassociable reduction, which vectorises. */
#pragma GCC optimize("finite-math-only")

static inline float bf16_at(const uint16_t *p, int64_t i) {
    uint32_t bits = (uint32_t)p[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Per row: the maximum of each chunk of 512 (plain reductions, which
 * vectorise), then the first chunk holding the row's maximum, then the first
 * index in that chunk holding it. Only one chunk is scanned element by
 * element. Index 0 if nothing compares equal. */
#define CHUNK 512
#define DEFINE_ARGMAX(NAME, T, LOAD)                                                         \
void NAME(const T *x, int64_t rows, int64_t cols, int64_t *out, int64_t threads) {           \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                        \
    for (int64_t r = 0; r < rows; r++) {                                                     \
        const T *row = x + r * cols;                                                         \
        float best = LOAD(row, 0);                                                           \
        int64_t best_chunk = 0;                                                              \
        for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {                                       \
            const int64_t c1 = c0 + CHUNK < cols ? c0 + CHUNK : cols;                        \
            float m = LOAD(row, c0);                                                         \
            for (int64_t c = c0 + 1; c < c1; c++) {                                          \
                const float v = LOAD(row, c);                                                \
                m = v > m ? v : m;                                                           \
            }                                                                                \
            if (m > best) { best = m; best_chunk = c0; }                                     \
        }                                                                                    \
        const int64_t end = best_chunk + CHUNK < cols ? best_chunk + CHUNK : cols;           \
        int64_t arg = best_chunk;                                                            \
        while (arg < end && LOAD(row, arg) != best) arg++;                                   \
        out[r] = arg < end ? arg : 0;                                                        \
    }                                                                                        \
}

#define F32_AT(p, i) ((p)[i])
DEFINE_ARGMAX(argmax_rows_f32, float, F32_AT)
DEFINE_ARGMAX(argmax_rows_bf16, uint16_t, bf16_at)
