/* 8-wide float vectors through GCC vector extensions (AVX2 with -march=native on x86,
 * whatever the target has elsewhere), and the exp the fused kernels need. */
#ifndef KILN_SIMD_H
#define KILN_SIMD_H
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

static inline __attribute__((always_inline)) v8 splat8(float x) { return (v8){x, x, x, x, x, x, x, x}; }

static inline __attribute__((always_inline)) float hsum8(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

static inline __attribute__((always_inline)) v8 select8(v8i mask, v8 a, v8 b) {
    return (v8)(((v8i)a & mask) | ((v8i)b & ~mask));
}

/* e^x, Cephes' single-precision polynomial after x = n ln2 + r: within 2 ulp of expf for
 * x in [-87, 88] (clamped there: e^-87 is below what a softmax or a sigmoid can tell from 0). */
static inline __attribute__((always_inline)) v8 exp8(v8 x) {
    const v8 hi = splat8(88.0f), lo = splat8(-87.0f);
    x = select8(x > hi, hi, x);
    x = select8(x < lo, lo, x);
    const v8 shift = splat8(12582912.0f); /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    v8 n = (x * splat8(1.44269504088896341f) + shift) - shift;
    v8 r = x - n * splat8(0.693359375f);
    r = r - n * splat8(-2.12194440e-4f);
    v8 p = splat8(1.9875691500e-4f);
    p = p * r + splat8(1.3981999507e-3f);
    p = p * r + splat8(8.3334519073e-3f);
    p = p * r + splat8(4.1665795894e-2f);
    p = p * r + splat8(1.6666665459e-1f);
    p = p * r + splat8(5.0000001201e-1f);
    p = p * r * r + r + splat8(1.0f);
    const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    return p * (v8)e;
}

#endif
