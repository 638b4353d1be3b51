"""RoPE on q and k, fused with writing k and v into the paged cache (Triton).

One program per token: it rotates all of the token's query heads in place,
rotates its key heads, and stores keys and values at the token's cache slot.
A slot of -1 (padding in a captured CUDA graph) writes nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels import backend
from kiln.kernels.pdl_triton import pdl_wait


@triton.jit
def rotate(x1, x2, cos, sin):
    """The two halves of a head rotated, in fp32 (callers round to their dtype). The fused
    multiply-adds are spelled out: left to the compiler, which product it fuses follows the
    surrounding code, and the kernels sharing this must round alike."""
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    return tl.fma(x1, cos, -(x2 * sin)), tl.fma(x2, cos, x1 * sin)


@triton.jit
def kv_cache_value(x, inv_scale, FP8: tl.constexpr):
    """x as a KV cache of FP8 stores it before the cast: scaled into e4m3's range (else x).
    One return: the compiler (not the interpreter) rejects returns of different types, even
    under a constexpr condition."""
    if FP8:
        y = tl.clamp(x.to(tl.float32) * inv_scale, -448.0, 448.0)
    else:
        y = x
    return y


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr,
                       q_stride, k_stride, v_stride, cs_stride, cache_slot_stride, inv_k_scale, inv_v_scale,
                       KV_FP8: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
                       BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, PDL: tl.constexpr = False):
    t = tl.program_id(0).to(tl.int64)
    pdl_wait(PDL)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF)
    cos = tl.load(cs_ptr + pos * cs_stride + d)[None, :]
    sin = tl.load(cs_ptr + pos * cs_stride + HALF + d)[None, :]

    hq = tl.arange(0, BLOCK_HQ)[:, None]
    mq = hq < HQ
    q1p = q_ptr + t * q_stride + hq * (2 * HALF) + d[None, :]
    r1, r2 = rotate(tl.load(q1p, mask=mq, other=0.0), tl.load(q1p + HALF, mask=mq, other=0.0), cos, sin)
    tl.store(q1p, r1.to(q_ptr.dtype.element_ty), mask=mq)
    tl.store(q1p + HALF, r2.to(q_ptr.dtype.element_ty), mask=mq)

    hk = tl.arange(0, BLOCK_HKV)[:, None]
    mk = hk < HKV
    k1p = k_ptr + t * k_stride + hk * (2 * HALF) + d[None, :]
    r1, r2 = rotate(tl.load(k1p, mask=mk, other=0.0), tl.load(k1p + HALF, mask=mk, other=0.0), cos, sin)
    r1 = r1.to(k_ptr.dtype.element_ty)
    r2 = r2.to(k_ptr.dtype.element_ty)
    tl.store(k1p, r1, mask=mk)
    tl.store(k1p + HALF, r2, mask=mk)

    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        c = slot * cache_slot_stride + hk * (2 * HALF) + d[None, :]
        v1p = v_ptr + t * v_stride + hk * (2 * HALF) + d[None, :]
        v1 = tl.load(v1p, mask=mk, other=0.0).to(tl.float32)
        v2 = tl.load(v1p + HALF, mask=mk, other=0.0).to(tl.float32)
        # The rotated key as rounded above; V from fp32.
        tl.store(kc_ptr + c, kv_cache_value(r1, inv_k_scale, KV_FP8).to(kc_ptr.dtype.element_ty), mask=mk)
        tl.store(kc_ptr + c + HALF, kv_cache_value(r2, inv_k_scale, KV_FP8).to(kc_ptr.dtype.element_ty), mask=mk)
        tl.store(vc_ptr + c, kv_cache_value(v1, inv_v_scale, KV_FP8).to(vc_ptr.dtype.element_ty), mask=mk)
        tl.store(vc_ptr + c + HALF, kv_cache_value(v2, inv_v_scale, KV_FP8).to(vc_ptr.dtype.element_ty), mask=mk)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    T, HQ, D = q.shape
    HKV = k.shape[1]
    if T == 0:
        return
    assert D % 2 == 0 and triton.next_power_of_2(D // 2) == D // 2, "head_dim must be a power of two"
    assert q.stride(1) == D and k.stride(1) == D and v.stride(1) == D and q.stride(2) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    _rope_cache_kernel[(T,)](q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping,
                             q.stride(0), k.stride(0), v.stride(0), cos_sin.stride(0), HKV * D,
                             1.0 / k_scale, 1.0 / v_scale, KV_FP8=k_cache.dtype == torch.float8_e4m3fn, HQ=HQ, HKV=HKV, HALF=D // 2, BLOCK_HQ=triton.next_power_of_2(HQ),
                             BLOCK_HKV=triton.next_power_of_2(HKV), num_warps=4, **backend.pdl_launch(q))
