/* Attention over kiln's paged KV cache, for the CPU (fp32).
 *
 * The torch reference gathers every sequence's blocks into a padded copy and
 * runs SDPA on it: the KV is read, written and read again, and SDPA's CPU
 * kernel is tiled for long queries, not the one row of a decode. Decode
 * attention is bound by reading the KV, so this reads each K and V row of a
 * (query row, KV head) once, straight from the cache; the G query heads that
 * share the KV head go together.
 *
 * Layouts as in kiln/kernels/attention.py: q, out [T, Hq, D] (q's rows q_stride
 * apart, out contiguous), the new tokens of
 * all sequences packed, sequence b owning rows query_start_loc[b] up to
 * query_start_loc[b + 1]; caches [num_blocks, BS, H, D]; block_tables
 * [B, bt_stride] int32; seq_lens [B] int32 (tokens in the cache, this step's
 * included). Query row i of sequence b sits at position seq_len - q_len + i
 * and sees keys 0 up to it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define MAX_D 256

/* Eight independent partial sums: gcc vectorizes this without -ffast-math. */
static inline __attribute__((always_inline)) float dot(const float *a, const float *b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* Head h0's first row in the block holding key l0. */
static inline __attribute__((always_inline)) const float *block_row(
        const float *cache, const int32_t *table, int64_t l0, int64_t BS, int64_t H, int64_t h0, int64_t D) {
    return cache + ((int64_t)table[l0 / BS] * BS * H + h0) * D;
}

/* The next block is elsewhere in memory (NULL: none): fetch `width` floats of its row t (rows
 * `stride` apart) while this block is worked on. */
static inline __attribute__((always_inline)) void prefetch_row(const float *next, int64_t t, int64_t stride,
                                                               int64_t width) {
    if (next)
        for (int64_t c = 0; c < width; c += 16) __builtin_prefetch(next + t * stride + c);
}

/* One query row's heads [h0, h1) (and their G query heads each) against keys [0, L). s: scratch
 * of (h1 - h0) * G * L floats. Inlined with D a constant for the common head sizes, so the row
 * loops unroll. Rows of the cache are read in order, all of the item's heads at once: a block is
 * one contiguous stream. */
static inline __attribute__((always_inline)) void attend_row_d(
        float *out, const float *q, const float *k_cache, const float *v_cache, const int32_t *table,
        int64_t L, int64_t G, int64_t H, const int64_t D, int64_t BS, int64_t h0, int64_t h1, float scale,
        float *s) {
    const int64_t NH = (h1 - h0) * G; /* query heads of this item */
    if (L <= 0) { /* a padding row with nothing in the cache: zeros, not NaN */
        for (int64_t i = 0; i < NH * D; i++) out[i] = 0.f;
        return;
    }
    for (int64_t l0 = 0; l0 < L; l0 += BS) {
        const int64_t n = L - l0 < BS ? L - l0 : BS;
        const float *k = block_row(k_cache, table, l0, BS, H, h0, D);
        const float *next = l0 + BS < L ? block_row(k_cache, table, l0 + BS, BS, H, h0, D) : NULL;
        for (int64_t t = 0; t < n; t++, k += H * D) {
            prefetch_row(next, t, H * D, (h1 - h0) * D);
            for (int64_t j = 0; j < NH; j++) s[j * L + l0 + t] = dot(q + j * D, k + (j / G) * D, D) * scale;
        }
    }
    for (int64_t j = 0; j < NH; j++) {
        float *sj = s + j * L, m = -INFINITY, sum = 0.f;
        for (int64_t l = 0; l < L; l++) m = sj[l] > m ? sj[l] : m;
        const v8 mv = splat8(m);
        v8 sumv = splat8(0.f);
        int64_t l = 0;
        for (; l + 8 <= L; l += 8) {
            const v8 p = exp8(load8(sj + l) - mv);
            store8(sj + l, p);
            sumv += p;
        }
        for (; l < L; l++) {
            sj[l] = expf(sj[l] - m);
            sum += sj[l];
        }
        sum += hsum8(sumv);
        const float inv = 1.f / sum;
        for (l = 0; l < L; l++) sj[l] *= inv;
    }
    for (int64_t i = 0; i < NH * D; i++) out[i] = 0.f;
    for (int64_t l0 = 0; l0 < L; l0 += BS) {
        const int64_t n = L - l0 < BS ? L - l0 : BS;
        const float *v = block_row(v_cache, table, l0, BS, H, h0, D);
        const float *next = l0 + BS < L ? block_row(v_cache, table, l0 + BS, BS, H, h0, D) : NULL;
        for (int64_t t = 0; t < n; t++, v += H * D) {
            prefetch_row(next, t, H * D, (h1 - h0) * D);
            for (int64_t j = 0; j < NH; j++) {
                const float p = s[j * L + l0 + t];
                const float *vh = v + (j / G) * D;
                float *o = out + j * D;
                for (int64_t d = 0; d < D; d++) o[d] += p * vh[d];
            }
        }
    }
}

static void attend_row(float *out, const float *q, const float *k_cache, const float *v_cache,
                       const int32_t *table, int64_t L, int64_t G, int64_t H, int64_t D, int64_t BS,
                       int64_t h0, int64_t h1, float scale, float *s) {
    if (D == 64)
        attend_row_d(out, q, k_cache, v_cache, table, L, G, H, 64, BS, h0, h1, scale, s);
    else if (D == 128)
        attend_row_d(out, q, k_cache, v_cache, table, L, G, H, 128, BS, h0, h1, scale, s);
    else
        attend_row_d(out, q, k_cache, v_cache, table, L, G, H, D, BS, h0, h1, scale, s);
}

/* Returns 0, or 1 for shapes it does not take, 2 when scratch memory ran out. */
int kiln_paged_attention_f32(float *out, const float *q, int64_t q_stride, const float *k_cache,
                             const float *v_cache, const int32_t *query_start_loc, const int32_t *seq_lens,
                             const int32_t *block_tables, int64_t bt_stride, int64_t B, int64_t Hq,
                             int64_t H, int64_t D, int64_t BS, float scale, int num_threads) {
    const int64_t G = Hq / H;
    if (G * H != Hq || D > MAX_D || D % 8) return 1;
    const int64_t T = query_start_loc[B];
    /* Work items (query row, group of KV heads). A row takes all its heads (its cache blocks read
     * as whole streams) unless there are too few rows to keep every thread busy. */
    const int64_t split = T >= 2 * num_threads ? 1 : H;
    const int64_t hp = H / split;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        int64_t b = 0;
        float *s = NULL;
        int64_t cap = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < T * split; w++) {
            const int64_t row = w / split, h0 = (w % split) * hp;
            if (row < query_start_loc[b]) b = 0;
            while (row >= query_start_loc[b + 1]) b++;
            const int64_t q_len = query_start_loc[b + 1] - query_start_loc[b];
            const int64_t L = seq_lens[b] - q_len + (row - query_start_loc[b]) + 1;
            if (hp * G * L > cap && L > 0) {
                free(s);
                cap = hp * G * L;
                s = malloc(sizeof(float) * cap);
                if (!s) { failed = 1; cap = 0; continue; }
            }
            attend_row(out + (row * Hq + h0 * G) * D, q + row * q_stride + h0 * G * D, k_cache, v_cache,
                       block_tables + b * bt_stride, L, G, H, D, BS, h0, h0 + hp, scale, s);
        }
        free(s);
    }
    return failed ? 2 : 0;
}
