/* y = x @ W^T (+ bias) on the CPU (fp32), W packed in 16-column panels.
 *
 * At decode batch sizes a linear layer is a stream of its weights: each weight
 * is used by only M rows. oneDNN streams them at about half the memory's speed
 * there. Here W [N, K] is stored as panels [N / 16][K][16], so a thread walks
 * one panel as one contiguous stream, 64 bytes per k, with up to 6 rows x 16
 * columns of accumulators in registers (an element of x is broadcast per k);
 * more rows re-read the panel from L2 in chunks of 6. Rows go in blocks of
 * ROW_BLOCK, each block's x staying in L2 while every panel passes it, so
 * prompt-sized M runs at the FMA units' speed too.
 */
#include <stdint.h>

#include "simd.h"

#ifndef PREFETCH_LINES
#define PREFETCH_LINES 64
#endif

/* Rows [0, MR) of x against the panel of columns n0..n0+15; MR a constant after inlining. */
static inline __attribute__((always_inline)) void panel(
        float *y, const float *x, const float *w_p, const float *bias, int64_t K, int64_t n0,
        int64_t ldx, int64_t ldy, const int MR) {
    v8 acc[6][2];
    for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = (v8){0};
    const float *w = w_p + n0 * K;
    for (int64_t k = 0; k < K; k++, w += 16) {
        /* Hardware prefetchers stop at 4 KB pages; this runs PREFETCH_LINES ahead across them
         * (16-32 rows of x: 53-76 -> 50-73 ms for SmolLM2's 30 layers and head, streamed). */
        __builtin_prefetch(w + 16 * PREFETCH_LINES);
        const v8 w0 = load8(w), w1 = load8(w + 8);
        for (int r = 0; r < MR; r++) {
            const float xv = x[r * ldx + k];
            acc[r][0] += xv * w0;
            acc[r][1] += xv * w1;
        }
    }
    v8 b0 = {0}, b1 = {0};
    if (bias) b0 = load8(bias + n0), b1 = load8(bias + n0 + 8);
    for (int r = 0; r < MR; r++) {
        store8(y + r * ldy + n0, acc[r][0] + b0);
        store8(y + r * ldy + n0 + 8, acc[r][1] + b1);
    }
}

static void rows(float *y, const float *x, const float *w_p, const float *bias, int64_t M, int64_t K,
                 int64_t n0, int64_t ldx, int64_t ldy) {
    for (int64_t m = 0; m < M; m += 6) {
        const float *xm = x + m * ldx;
        float *ym = y + m * ldy;
        switch (M - m < 6 ? M - m : 6) {
            case 1: panel(ym, xm, w_p, bias, K, n0, ldx, ldy, 1); break;
            case 2: panel(ym, xm, w_p, bias, K, n0, ldx, ldy, 2); break;
            case 3: panel(ym, xm, w_p, bias, K, n0, ldx, ldy, 3); break;
            case 4: panel(ym, xm, w_p, bias, K, n0, ldx, ldy, 4); break;
            case 5: panel(ym, xm, w_p, bias, K, n0, ldx, ldy, 5); break;
            default: panel(ym, xm, w_p, bias, K, n0, ldx, ldy, 6); break;
        }
    }
}

#define ROW_BLOCK 48

/* x [M, K] (rows ldx apart), w_p [N / 16][K][16] (N a multiple of 16), bias [N] or NULL,
 * y [M, N] (rows ldy apart). */
void kiln_linear_f32(float *y, const float *x, const float *w_p, const float *bias, int64_t M, int64_t K,
                     int64_t N, int64_t ldx, int64_t ldy, int num_threads) {
    const int64_t panels = N / 16;
#pragma omp parallel num_threads(num_threads)
    for (int64_t m = 0; m < M; m += ROW_BLOCK) {
        const int64_t mb = M - m < ROW_BLOCK ? M - m : ROW_BLOCK;
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) rows(y + m * ldy, x + m * ldx, w_p, bias, mb, K, p * 16, ldx, ldy);
    }
}
