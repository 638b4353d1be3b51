/* The small fused operations of a Llama layer on the CPU (fp32), each one pass over its data:
 * RMSNorm (with the residual add before it), SwiGLU's silu(gate) * up, and RoPE with the
 * paged-cache write. The torch references take 3-6 passes and as many temporaries; at a
 * prompt's thousands of rows those passes are memory traffic, at a decode's few they are
 * dispatch overhead. Semantics as kiln/kernels/{norm,activation,rope}.py. */
#include <math.h>
#include <stdint.h>

#include "simd.h"

/* out = x * rsqrt(mean(x^2) + eps) * weight over rows of H (H a multiple of 8). With residual:
 * residual += x first, in place, and the sum is what is normalized. */
void kiln_rms_norm_f32(float *out, const float *x, float *residual, const float *weight, int64_t T,
                       int64_t H, int64_t ldx, float eps, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * ldx;
        float *o = out + t * H;
        const float *src = xr;
        v8 ss = splat8(0.f);
        if (residual) {
            float *r = residual + t * H;
            for (int64_t i = 0; i < H; i += 8) {
                const v8 s = load8(r + i) + load8(xr + i);
                store8(r + i, s);
                ss += s * s;
            }
            src = r;
        } else {
            for (int64_t i = 0; i < H; i += 8) {
                const v8 s = load8(xr + i);
                ss += s * s;
            }
        }
        const v8 inv = splat8(1.0f / sqrtf(hsum8(ss) / (float)H + eps));
        for (int64_t i = 0; i < H; i += 8) store8(o + i, load8(src + i) * inv * load8(weight + i));
    }
}

/* out [T, I] = silu(x[:, :I]) * x[:, I:] (I a multiple of 8); x's rows ldx apart. */
void kiln_silu_and_mul_f32(float *out, const float *x, int64_t T, int64_t I, int64_t ldx, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t t = 0; t < T; t++) {
        const float *g = x + t * ldx, *u = g + I;
        float *o = out + t * I;
        for (int64_t i = 0; i < I; i += 8) {
            const v8 gv = load8(g + i);
            store8(o + i, gv / (splat8(1.0f) + exp8(-gv)) * load8(u + i));
        }
    }
}

/* Rotate-half RoPE of q [T, Hq, D] and k [T, Hk, D] in place (rows q_stride / k_stride apart,
 * heads D apart), then k and v (rows v_stride apart) into the caches [slots, Hk, D] at
 * slot_mapping. cos_sin [positions, D]: D/2 cosines then D/2 sines. D a multiple of 16. */
void kiln_rope_and_cache_f32(float *q, int64_t q_stride, float *k, int64_t k_stride, const float *v,
                             int64_t v_stride, const int64_t *positions, const float *cos_sin,
                             float *k_cache, float *v_cache, const int64_t *slot_mapping, int64_t T,
                             int64_t Hq, int64_t Hk, int64_t D, int num_threads) {
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t t = 0; t < T; t++) {
        const float *cs = cos_sin + positions[t] * D;
        for (int64_t h = 0; h < Hq + Hk; h++) {
            float *x = h < Hq ? q + t * q_stride + h * D : k + t * k_stride + (h - Hq) * D;
            for (int64_t i = 0; i < half; i += 8) {
                const v8 c = load8(cs + i), s = load8(cs + half + i);
                const v8 x1 = load8(x + i), x2 = load8(x + half + i);
                store8(x + i, x1 * c - x2 * s);
                store8(x + half + i, x2 * c + x1 * s);
            }
        }
        const int64_t slot = slot_mapping[t];
        if (slot < 0) continue; /* a padding row */
        float *kc = k_cache + slot * Hk * D, *vc = v_cache + slot * Hk * D;
        const float *kr = k + t * k_stride, *vr = v + t * v_stride;
        for (int64_t i = 0; i < Hk * D; i += 8) {
            store8(kc + i, load8(kr + i));
            store8(vc + i, load8(vr + i));
        }
    }
}
