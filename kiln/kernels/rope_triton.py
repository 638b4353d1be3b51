"""RoPE on q and k, fused with writing k and v into the paged cache (Triton).

A program takes a block of (token, head) rows: query heads, rotated in place, or
key heads, rotated in place and stored with their values at each token's cache
slot. A slot of -1 (padding in a captured CUDA graph) writes nothing. With an FP8
cache q and k are then smoothed and Hadamard-rotated as rope.fp8_kv_transform_ref
does (see kiln/kernels/rope.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels import backend
from kiln.kernels.pdl_triton import pdl_wait
from kiln.kernels.rope import hadamard_sign_matrix


ROPE_FP8_WIDE_T = 256  # from this many tokens, 64-row programs with an FP8 cache


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
def fp8_kv_transform(r1, r2, s1, s2, h, norm, DTYPE: tl.constexpr, IEEE: tl.constexpr, SMOOTH: tl.constexpr,
                     DIVIDE: tl.constexpr):
    """Rows [r1 | r2] (fp32 after RoPE, each [rows, HALF]) as rope.fp8_kv_transform_ref leaves
    them: rounded to DTYPE; with SMOOTH divided (k) or multiplied (q) by the halves s1, s2 of the
    smoothing rows and rounded again; times the orthonormal Hadamard matrix of 2 * HALF, whose
    blocks are [[h, h], [h, -h]] * norm (h the +-1 matrix of HALF in DTYPE, norm
    (2 * HALF) ** -0.5). Returns the two halves in fp32. The operands are DTYPE values and the
    products accumulate in fp32, so the dots are exact up to summation order; IEEE (an fp32
    model) keeps fp32 operands."""
    a = r1.to(DTYPE)
    b = r2.to(DTYPE)
    if SMOOTH:
        if DIVIDE:
            a = (a.to(tl.float32) / s1).to(DTYPE)
            b = (b.to(tl.float32) / s2).to(DTYPE)
        else:
            a = (a.to(tl.float32) * s1).to(DTYPE)
            b = (b.to(tl.float32) * s2).to(DTYPE)
    if IEEE:
        ha = tl.dot(a, h, input_precision="ieee")
        hb = tl.dot(b, h, input_precision="ieee")
    else:
        ha = tl.dot(a, h)
        hb = tl.dot(b, h)
    return (ha + hb) * norm, (ha - hb) * norm


@triton.jit
def _rows_in_place(x_ptr, x_stride, tok, head, m, pos_ptr, cs_ptr, cs_stride, s_rows, h, h_norm, HALF: tl.constexpr,
                   KV_FP8: tl.constexpr, IEEE: tl.constexpr, SMOOTH: tl.constexpr, DIVIDE: tl.constexpr,
                   PDL: tl.constexpr):
    """Rows (token tok, head head; [R, 1] each, rows where m) of q or k RoPE'd in place; for an
    FP8 cache also smoothed by the rows of s_rows (k divided by them: DIVIDE) and
    Hadamard-rotated. Returns the two halves as stored. Positions, the RoPE table and the
    smoothing rows load before the PDL wait (no kernel writes them); the heads after it."""
    d = tl.arange(0, HALF)[None, :]
    pos = tl.load(pos_ptr + tok, mask=m, other=0)
    cos = tl.load(cs_ptr + pos * cs_stride + d, mask=m, other=1.0)
    sin = tl.load(cs_ptr + pos * cs_stride + HALF + d, mask=m, other=0.0)
    s1 = tl.load(s_rows + d, mask=m & SMOOTH, other=1.0)
    s2 = tl.load(s_rows + HALF + d, mask=m & SMOOTH, other=1.0)
    pdl_wait(PDL)
    x1p = x_ptr + tok * x_stride + head * (2 * HALF) + d
    r1, r2 = rotate(tl.load(x1p, mask=m, other=0.0), tl.load(x1p + HALF, mask=m, other=0.0), cos, sin)
    if KV_FP8:
        r1, r2 = fp8_kv_transform(r1, r2, s1, s2, h, h_norm, x1p.dtype.element_ty, IEEE, SMOOTH, DIVIDE)
    r1 = r1.to(x1p.dtype.element_ty)
    r2 = r2.to(x1p.dtype.element_ty)
    tl.store(x1p, r1, mask=m)
    tl.store(x1p + HALF, r2, mask=m)
    return r1, r2


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr, h_ptr, h_norm, sm_ptr, T,
                       q_stride, k_stride, v_stride, cs_stride, cache_slot_stride, inv_k_scale, inv_v_scale,
                       KV_FP8: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
                       BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr,
                       IEEE: tl.constexpr, SMOOTH: tl.constexpr, PDL: tl.constexpr = False):
    """A program takes TQ tokens x BLOCK_HQ query heads, or (after all of those) TK tokens x
    BLOCK_HKV key heads and writes their keys and values to the cache: rows (token, head)."""
    Q_BLOCKS: tl.constexpr = (HQ + BLOCK_HQ - 1) // BLOCK_HQ
    K_BLOCKS: tl.constexpr = (HKV + BLOCK_HKV - 1) // BLOCK_HKV
    pid = tl.program_id(0)
    q_programs = tl.cdiv(T, TQ) * Q_BLOCKS
    d = tl.arange(0, HALF)
    if KV_FP8:  # the Hadamard halves' +-1 matrix
        h = tl.load(h_ptr + d[:, None] * HALF + d[None, :])
    else:
        h = h_norm  # unused
    if pid < q_programs:
        # (Names apart from the other branch's: Triton wants a name's type alike in both.)
        rq = tl.arange(0, TQ * BLOCK_HQ)[:, None]
        tq = ((pid // Q_BLOCKS) * TQ + rq // BLOCK_HQ).to(tl.int64)
        hq = (pid % Q_BLOCKS) * BLOCK_HQ + rq % BLOCK_HQ
        # Each query head takes its KV head's smoothing row.
        _rows_in_place(q_ptr, q_stride, tq, hq, (tq < T) & (hq < HQ), pos_ptr, cs_ptr, cs_stride,
                       sm_ptr + (hq // (HQ // HKV)) * (2 * HALF), h, h_norm, HALF, KV_FP8, IEEE, SMOOTH, False, PDL)
    else:
        pk = pid - q_programs
        r = tl.arange(0, TK * BLOCK_HKV)[:, None]
        tok = ((pk // K_BLOCKS) * TK + r // BLOCK_HKV).to(tl.int64)
        head = (pk % K_BLOCKS) * BLOCK_HKV + r % BLOCK_HKV
        m = (tok < T) & (head < HKV)
        slot = tl.load(slot_ptr + tok, mask=m, other=-1)  # the step's slots: no kernel writes them
        r1, r2 = _rows_in_place(k_ptr, k_stride, tok, head, m, pos_ptr, cs_ptr, cs_stride,
                                sm_ptr + head * (2 * HALF), h, h_norm, HALF, KV_FP8, IEEE, SMOOTH, True, PDL)
        mw = m & (slot >= 0)
        c = slot * cache_slot_stride + head * (2 * HALF) + d[None, :]
        v1p = v_ptr + tok * v_stride + head * (2 * HALF) + d[None, :]
        v1 = tl.load(v1p, mask=mw, other=0.0).to(tl.float32)
        v2 = tl.load(v1p + HALF, mask=mw, other=0.0).to(tl.float32)
        # The rotated key as rounded above; V from fp32.
        tl.store(kc_ptr + c, kv_cache_value(r1, inv_k_scale, KV_FP8).to(kc_ptr.dtype.element_ty), mask=mw)
        tl.store(kc_ptr + c + HALF, kv_cache_value(r2, inv_k_scale, KV_FP8).to(kc_ptr.dtype.element_ty), mask=mw)
        tl.store(vc_ptr + c, kv_cache_value(v1, inv_v_scale, KV_FP8).to(vc_ptr.dtype.element_ty), mask=mw)
        tl.store(vc_ptr + c + HALF, kv_cache_value(v2, inv_v_scale, KV_FP8).to(vc_ptr.dtype.element_ty), mask=mw)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0,
                   k_smooth: torch.Tensor | None = None) -> None:
    T, HQ, D = q.shape
    HKV = k.shape[1]
    if T == 0:
        return
    assert D % 2 == 0 and triton.next_power_of_2(D // 2) == D // 2, "head_dim must be a power of two"
    assert q.stride(1) == D and k.stride(1) == D and v.stride(1) == D and q.stride(2) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    smooth = fp8 and k_smooth is not None
    if smooth:
        assert k_smooth.shape == (HKV, D) and k_smooth.dtype == torch.float32 and k_smooth.is_contiguous()
    # With an FP8 cache a program's rows (token, head) feed tl.dot (the Hadamard rotation), which
    # takes at least 16: up to 16 heads of 1+ tokens, so a decode token's dots run on several SMs;
    # 64 rows for prefill-sized steps, so each program's Hadamard load and dot setup serve more.
    if fp8:
        bq, bk = min(16, triton.next_power_of_2(HQ)), min(16, triton.next_power_of_2(HKV))
        rows = 64 if T >= ROPE_FP8_WIDE_T else 16
        tq, tk = max(1, rows // bq), max(1, rows // bk)
    else:
        bq, bk, tq, tk = triton.next_power_of_2(HQ), triton.next_power_of_2(HKV), 1, 1
    h = hadamard_sign_matrix(D // 2, q.device, q.dtype) if fp8 else cos_sin
    grid = triton.cdiv(T, tq) * triton.cdiv(HQ, bq) + triton.cdiv(T, tk) * triton.cdiv(HKV, bk)
    _rope_cache_kernel[(grid,)](
        q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, h, D ** -0.5, k_smooth if smooth else h, T,
        q.stride(0), k.stride(0), v.stride(0), cos_sin.stride(0), HKV * D, 1.0 / k_scale, 1.0 / v_scale,
        KV_FP8=fp8, HQ=HQ, HKV=HKV, HALF=D // 2, BLOCK_HQ=bq, BLOCK_HKV=bk, TQ=tq, TK=tk,
        IEEE=q.dtype == torch.float32, SMOOTH=smooth, num_warps=4, **backend.pdl_launch(q))
