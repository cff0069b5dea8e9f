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

/* Two passes per row: the maximum (a plain reduction, which vectorises), then
 * the first index holding it (index 0 if none compares equal). */
#define DEFINE_ARGMAX(NAME, T, LOAD)                                                         \
void NAME(const T *x, int64_t rows, int64_t cols, int64_t *out, int64_t threads) {           \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                        \
    for (int64_t r = 0; r < rows; r++) {                                                     \
        const T *row = x + r * cols;                                                         \
        float best = LOAD(row, 0);                                                           \
        for (int64_t c = 1; c < cols; c++) {                                                 \
            const float v = LOAD(row, c);                                                    \
            best = v > best ? v : best;                                                      \
        }                                                                                    \
        int64_t arg = 0;                                                                     \
        while (arg < cols && LOAD(row, arg) != best) arg++;                                  \
        out[r] = arg < cols ? arg : 0;                                                       \
    }                                                                                        \
}

#define F32_AT(p, i) ((p)[i])
DEFINE_ARGMAX(argmax_rows_f32, float, F32_AT)
DEFINE_ARGMAX(argmax_rows_bf16, uint16_t, bf16_at)
