"""Weight-only quantized GEMM in Triton: y = x @ dequant(W)^T, W int8 or packed int4.

At decode batch sizes the cost is reading the weights, so the kernel reads the
compact codes once, widens them to bf16 in registers and feeds tensor cores.
Few output tiles (small N, tiny M) would leave SMs idle, so K is split over
several programs that add their partial sums into an fp32 buffer.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _woq_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, x_stride, w_stride, s_stride, out_stride,
                k_per_split, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * x_stride + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        if BITS == 8:
            q = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * w_stride + offs_k[:, None], mask=mask_n[None, :],
                        other=0)
            w = q.to(x.dtype)
        else:
            # Eight 4-bit codes per int32: each word is loaded for its eight k's (cached), then shifted out.
            packed = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * w_stride + offs_k[:, None] // 8,
                             mask=mask_n[None, :], other=0)
            codes = (packed >> ((offs_k[:, None] % 8) * 4)) & 0xF
            g = k0 // GROUP  # BLOCK_K divides GROUP: one scale and zero per column for this tile
            scale = tl.load(s_ptr + offs_n.to(tl.int64) * s_stride + g, mask=mask_n, other=0.0).to(tl.float32)
            mn = tl.load(z_ptr + offs_n.to(tl.int64) * s_stride + g, mask=mask_n, other=0.0).to(tl.float32)
            w = (codes.to(tl.float32) * scale[None, :] + mn[None, :]).to(x.dtype)
        acc += tl.dot(x, w)
    if BITS == 8:  # per-output-channel scale, applied once after the sum
        scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc * scale[None, :]
    ptrs = out_ptr + offs_m[:, None].to(tl.int64) * out_stride + offs_n[None, :]
    tl.atomic_add(ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@functools.lru_cache(maxsize=4)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count if torch.cuda.is_available() else 16


def woq_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
               bits: int, group: int = 128) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32); int8 w [N, K] with scales [N], or int4 w [N, K/8] with scales/mins [N, K/group]."""
    M, K = x.shape
    N = w.shape[0]
    x = x.contiguous()
    if x.is_cuda:
        block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
        block_n, block_k = (64, 128) if M <= 64 else (128, 64)
    else:  # the interpreter: small tiles
        block_m, block_n, block_k = 16, 16, 32
    block_k = min(block_k, group) if bits == 4 else block_k
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    sms = _num_sms(x.device.index or 0) if x.is_cuda else 4
    # Split K until there are about two programs per SM (each split a whole number of K tiles).
    splits = 1
    while tiles * splits < 2 * sms and K % (splits * 2 * block_k) == 0 and splits < 16:
        splits *= 2
    if K % block_k:
        raise ValueError(f"K={K} must be a multiple of {block_k}")
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), splits)
    _woq_kernel[grid](x, w, scales, mins if mins is not None else scales, out, M, N, K, x.stride(0), w.stride(0),
                      scales.stride(0), out.stride(0), K // splits, BITS=bits, GROUP=group, BLOCK_M=block_m,
                      BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=3 if x.is_cuda else 1)
    return out.to(x.dtype)
