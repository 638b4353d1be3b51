"""Quantized GEMMs in Triton: y = x @ dequant(W)^T for int8, fp8 or packed int4 W.

Decode (one row of x): reading the weights is the whole cost. A register
GEMV reads each weight tile once along K with vector loads, widens the codes,
and keeps products elementwise until one reduction at the end. fp8 streams at
~85% of the copy ceiling. int4's decode GEMV (1-6 rows, with its SwiGLU and
RoPE epilogues) is kiln/kernels/int4_gemv_triton.py.

Larger batches: a tensor-core kernel widens the 8-bit codes in registers, K
split over programs when output tiles are few. int4 past the GEMV's rows runs
kiln/kernels/int4_gemm_triton.py up to its INT4_GEMM_MAX_M rows; past that
(or with fp32 activations) it is dequantized once to a scratch and cuBLAS does
the compute-bound rest.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from kiln.kernels import backend, int4_gemm_triton, int4_gemv_triton
from kiln.kernels.int4_gemv_triton import check_group
from kiln.kernels.pdl_triton import pdl_wait


# M changes with the batch (see attention_triton); k_per_split must stay specialized: without
# its divisibility by 16 the K loop loses its 16-byte async copies (PTX: 24 cp.async -> 0).
@triton.jit(do_not_specialize=["M"])
def _woq_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, x_stride, w_stride, out_stride, k_per_split,
                FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                IEEE: tl.constexpr):
    """8-bit W [N, K] (int8 or e4m3 codes, one scale per row) on tensor cores, for batches past
    the GEMV's: the codes are widened to x's dtype in registers."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * k_per_split
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * x_stride
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * w_stride
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        q = tl.load(w_cols + offs_k[:, None], mask=mask_n[None, :], other=0)
        if FP8:  # e4m3 codes arrive as bytes (a masked fp8 load cannot take a fill value)
            w = q.to(tl.float8e4nv, bitcast=True).to(x.dtype)
        else:
            w = q.to(x.dtype)
        if IEEE:  # fp32 activations: exact products, not TF32
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    ptrs = out_ptr + offs_m[:, None].to(tl.int64) * out_stride + offs_n[None, :]
    tl.atomic_add(ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, x_stride, w_stride, out_stride, M: tl.constexpr,
                 FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr = False):
    """A few rows of x against [BLOCK_N, K] of 8-bit W: the weight tile is read once,
    K-contiguous (vector loads), and reduced per tile to keep registers few; no tensor cores,
    no split-K buffer."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.arange(0, BLOCK_M)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * w_stride
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    pdl_wait(PDL)
    for k0 in range(0, K, BLOCK_K):
        q = tl.load(w_rows + (k0 + offs_k)[None, :], mask=mask_n[:, None], other=0)
        if FP8:
            w = q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            w = q.to(tl.float32)
        for m in tl.static_range(M):
            x = tl.load(x_ptr + m * x_stride + k0 + offs_k).to(tl.float32)
            part = tl.sum(w * x[None, :], axis=1)[None, :]
            if M == 1:
                acc += part
            else:
                acc += tl.where(rows[:, None] == m, part, 0.0)
    scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    out = acc * scale[None, :]
    ptrs = out_ptr + rows[:, None] * out_stride + offs_n[None, :]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & mask_n[None, :])


@triton.jit
def _dequant_int4_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, w_stride, s_stride, out_stride,
                         BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_w = g * (GROUP // 8) + tl.arange(0, GROUP // 8)
    packed = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * w_stride + offs_w[None, :], mask=mask_n[:, None],
                     other=0)
    shifts = tl.arange(0, 8) * 4
    codes = tl.reshape((packed[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_N, GROUP))  # k = j*GROUP/8 + i
    scale = tl.load(s_ptr + offs_n.to(tl.int64) * s_stride + g, mask=mask_n, other=0.0).to(tl.float32)
    mn = tl.load(z_ptr + offs_n.to(tl.int64) * s_stride + g, mask=mask_n, other=0.0).to(tl.float32)
    w = codes.to(tl.float32) * scale[:, None] + mn[:, None]
    offs_k = g * GROUP + tl.arange(0, GROUP)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * out_stride + offs_k[None, :],
             w.to(out_ptr.dtype.element_ty), mask=mask_n[:, None])


@triton.jit
def fp8_scale(amax):
    """A row's per-token e4m3 scale from its max |x|, as quant.quantize_fp8_per_token."""
    return tl.maximum(amax / 448.0, 1e-12)


@triton.jit
def fp8_codes(x, scale):
    """fp32 x / scale, clamped to the e4m3 range (IEEE division, as the reference); the caller casts."""
    return tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0)


@triton.jit
def _fp8_per_token_kernel(x_ptr, q_ptr, s_ptr, K, x_stride, q_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * x_stride + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = fp8_scale(tl.max(amax, axis=0))
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * x_stride + offs, mask=offs < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * q_stride + offs, fp8_codes(x, scale).to(q_ptr.dtype.element_ty), mask=offs < K)
    tl.store(s_ptr + row, scale)


# Up to this many rows the 8-bit register GEMV beats the tensor-core kernel, and its
# (BLOCK_N, BLOCK_K, num_warps, num_stages): benchmarks/quant_gemm.py on the H100.
GEMV_MAX_M = 1
GEMV_TILES = {8: (4, 1024, 2, 2)}  # int4's: int4_gemv_triton.TILES


def _tiles(M: int, on_gpu: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the tensor-core kernel."""
    if not on_gpu:  # the interpreter: small tiles
        return 16, 16, 32, 4, 1
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    block_n, block_k = (64, 128) if M <= 64 else (128, 64)
    return block_m, block_n, block_k, 4, 3


def gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int,
         group: int, tiles: tuple[int, int, int, int] | None = None, up_offset: int | None = None) -> torch.Tensor:
    """The register GEMV for one row of 8-bit x (int4: int4_gemv_triton.gemv, which also takes
    `up_offset`); `tiles` overrides GEMV_TILES (for sweeps)."""
    if bits == 4:
        return int4_gemv_triton.gemv(x, w, scales, mins, group, tiles, up_offset)
    M, K = x.shape
    N = w.shape[0]
    if w.dtype == torch.float8_e4m3fn:
        w = w.view(torch.uint8)  # the kernel widens e4m3 bytes itself
    block_n, block_k, warps, stages = tiles or (GEMV_TILES[bits] if x.is_cuda else (8, 256, 1, 1))
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, block_n),)
    block_k = min(block_k, K)
    if K % block_k:
        raise ValueError(f"K={K} must be a multiple of {block_k}")
    _gemv_kernel[grid](x, w, scales, out, N, K, x.stride(0), w.stride(0), out.stride(0), M=M,
                       FP8=w.dtype == torch.uint8, BLOCK_M=triton.next_power_of_2(M), BLOCK_N=block_n,
                       BLOCK_K=block_k, num_warps=warps, num_stages=stages, **backend.pdl_launch(x))
    return out


def tensor_core_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The 8-bit tensor-core kernel for any number of rows of x."""
    M, K = x.shape
    N = w.shape[0]
    if w.dtype == torch.float8_e4m3fn:
        w = w.view(torch.uint8)
    block_m, block_n, block_k, warps, stages = _tiles(M, x.is_cuda)
    if K % block_k:
        raise ValueError(f"K={K} must be a multiple of {block_k}")
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    sms = backend.num_sms(x.device.index or 0) if x.is_cuda else 4
    # Split K until there are about two programs per SM (each split a whole number of K tiles).
    splits = 1
    while tiles * splits < 2 * sms and K % (splits * 2 * block_k) == 0 and splits < 16:
        splits *= 2
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), splits)
    _woq_kernel[grid](x, w, scales, out, M, N, K, x.stride(0), w.stride(0), out.stride(0), K // splits,
                      FP8=w.dtype == torch.uint8, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                      num_warps=warps, num_stages=stages, IEEE=x.dtype == torch.float32)
    return out.to(x.dtype)


def woq_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
               bits: int, group: int = 128) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32); int8 or fp8 w [N, K] with scales [N], or int4 w [N, K/8] with
    scales/mins [N, K/group]."""
    x = x.contiguous()
    M = x.shape[0]
    if bits == 4:
        check_group(group)
        if M <= int4_gemv_triton.INT4_GEMV_MAX_M:
            return gemv(x, w, scales, mins, bits, group)
        if M <= int4_gemm_triton.INT4_GEMM_MAX_M and x.dtype != torch.float32:
            return int4_gemm_triton.int4_gemm(x, w, scales, mins, group)
        return torch.nn.functional.linear(x, dequantize_int4(w, scales, mins, x.dtype, group))
    if M <= GEMV_MAX_M:
        return gemv(x, w, scales, mins, bits, group)
    return tensor_core_linear(x, w, scales)


def dequantize_int4(w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, dtype: torch.dtype,
                    group: int) -> torch.Tensor:
    """Packed int4 [N, K/8] -> dense [N, K] of `dtype` (one read of the codes, one write)."""
    N, K = w.shape[0], w.shape[1] * 8
    out = torch.empty(N, K, dtype=dtype, device=w.device)
    block_n = 64 if w.is_cuda else 16
    _dequant_int4_kernel[(triton.cdiv(N, block_n), K // group)](w, scales, mins, out, N, w.stride(0),
                                                                scales.stride(0), out.stride(0),
                                                                BLOCK_N=block_n, GROUP=group)
    return out


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass per row: e4m3 codes [M, K] and fp32 scales [M, 1] (amax / 448)."""
    if not x.is_cuda:  # the interpreter's e4m3 cast rounds wrongly across binades (124.3 -> 64)
        from kiln.kernels.quant import quantize_fp8_per_token as reference
        return reference(x)
    M, K = x.shape
    x = x.contiguous()
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    block = min(triton.next_power_of_2(K), 4096)
    _fp8_per_token_kernel[(M,)](x, q, s, K, x.stride(0), q.stride(0), BLOCK=block, num_warps=8)
    return q, s
