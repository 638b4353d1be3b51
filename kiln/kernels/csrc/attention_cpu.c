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

#define MAX_G 16
#define MAX_D 256

/* Eight independent partial sums: gcc vectorizes this without -ffast-math. */
static inline __attribute__((always_inline)) float dot(const float *a, const float *b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* One query row's G heads against keys [0, L) of one KV head. s: G * L scratch. Inlined with D
 * a constant for the common head sizes, so the row loops unroll and accumulators stay in registers. */
static inline __attribute__((always_inline)) void attend_row_d(
        float *out, const float *q, const float *k_cache, const float *v_cache, const int32_t *table,
        int64_t L, int64_t G, int64_t H, const int64_t D, int64_t BS, int64_t h, float scale, float *s) {
    if (L <= 0) { /* a padding row with nothing in the cache: zeros, not NaN */
        for (int64_t i = 0; i < G * D; i++) out[i] = 0.f;
        return;
    }
    for (int64_t l0 = 0; l0 < L; l0 += BS) {
        const int64_t n = L - l0 < BS ? L - l0 : BS;
        const float *k = k_cache + ((int64_t)table[l0 / BS] * BS * H + h) * D;
        for (int64_t t = 0; t < n; t++, k += H * D)
            for (int64_t g = 0; g < G; g++) s[g * L + l0 + t] = dot(q + g * D, k, D) * scale;
    }
    for (int64_t g = 0; g < G; g++) {
        float *sg = s + g * L, m = -INFINITY, sum = 0.f;
        for (int64_t l = 0; l < L; l++) m = sg[l] > m ? sg[l] : m;
        for (int64_t l = 0; l < L; l++) {
            sg[l] = expf(sg[l] - m);
            sum += sg[l];
        }
        /* Head by head, so one head's D accumulators fit in registers; V is re-read from cache. */
        float acc[MAX_D];
        for (int64_t d = 0; d < D; d++) acc[d] = 0.f;
        for (int64_t l0 = 0; l0 < L; l0 += BS) {
            const int64_t n = L - l0 < BS ? L - l0 : BS;
            const float *v = v_cache + ((int64_t)table[l0 / BS] * BS * H + h) * D;
            for (int64_t t = 0; t < n; t++, v += H * D) {
                const float p = sg[l0 + t];
                for (int64_t d = 0; d < D; d++) acc[d] += p * v[d];
            }
        }
        const float inv = 1.f / sum;
        for (int64_t d = 0; d < D; d++) out[g * D + d] = acc[d] * inv;
    }
}

static void attend_row(float *out, const float *q, const float *k_cache, const float *v_cache,
                       const int32_t *table, int64_t L, int64_t G, int64_t H, int64_t D, int64_t BS,
                       int64_t h, float scale, float *s) {
    if (D == 64)
        attend_row_d(out, q, k_cache, v_cache, table, L, G, H, 64, BS, h, scale, s);
    else if (D == 128)
        attend_row_d(out, q, k_cache, v_cache, table, L, G, H, 128, BS, h, scale, s);
    else
        attend_row_d(out, q, k_cache, v_cache, table, L, G, H, D, BS, h, scale, s);
}

/* Returns 0, or 1 for shapes it does not take, 2 when scratch memory ran out. */
int kiln_paged_attention_f32(float *out, const float *q, int64_t q_stride, const float *k_cache,
                             const float *v_cache, const int32_t *query_start_loc, const int32_t *seq_lens,
                             const int32_t *block_tables, int64_t bt_stride, int64_t B, int64_t Hq,
                             int64_t H, int64_t D, int64_t BS, float scale, int num_threads) {
    const int64_t G = Hq / H;
    if (G * H != Hq || G > MAX_G || D > MAX_D || D % 8) return 1;
    const int64_t T = query_start_loc[B];
    int failed = 0;
    /* Work items (query row, KV head), rows in order; a row's sequence is found by a forward scan. */
#pragma omp parallel num_threads(num_threads)
    {
        int64_t b = 0;
        float *s = NULL;
        int64_t cap = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < T * H; w++) {
            const int64_t row = w / H, h = w % H;
            if (row < query_start_loc[b]) b = 0;
            while (row >= query_start_loc[b + 1]) b++;
            const int64_t q_len = query_start_loc[b + 1] - query_start_loc[b];
            const int64_t L = seq_lens[b] - q_len + (row - query_start_loc[b]) + 1;
            if (G * L > cap && L > 0) {
                free(s);
                cap = G * L;
                s = malloc(sizeof(float) * cap);
                if (!s) { failed = 1; cap = 0; continue; }
            }
            attend_row(out + (row * Hq + h * G) * D, q + row * q_stride + h * G * D, k_cache, v_cache,
                       block_tables + b * bt_stride, L, G, H, D, BS, h, scale, s);
        }
        free(s);
    }
    return failed ? 2 : 0;
}
