"""The int4 GEMM on tensor cores (Triton), for batches past the decode GEMV's few rows.

y = x @ dequant(W)^T with W packed eight codes to an int32, plane-major within a group (nibble j
of word i is k = j * group/8 + i, kiln/kernels/quant.py) and w = code * scale + min per (row,
group). One K step is one group. With groups of 128 each of its eight nibble planes is a
[BLOCK_N, 16] operand meeting a contiguous run of x, so the planes go to the tensor cores one by
one with no reshape (smaller groups unpack into one [BLOCK_N, group] tile). The codes go to the
tensor cores as they are (0..15 are exact in bf16/fp16) and the group's scale and min are
applied to the [BLOCK_M, BLOCK_N] partial product instead of to every weight:

    sum_k x_k (q_k s + m) = s * (x . q) + m * sum_k x_k

which turns a multiply-add per weight into two per output, a saving of group/BLOCK_M. Codes
widen by masking them into the mantissa of a power of two whose last place is 1 (bf16 bits
0x4300 | q = 128 + q, fp16 bits 0x6400 | q = 1024 + q): no int->float convert, and the dot's
extra 128 (1024) * sum(x) is subtracted with the min term.

The kernel computes the transposed tile, W [BLOCK_N, group] @ x^T: the dequantized weights are
then the dot's first operand, which Hopper's wgmma reads straight from registers, and a few
rows of x fill its narrow side. (As the second operand they went through shared memory: 0.18
against 0.11 ms at 8 rows, 0.64 against 0.28 at 64, quant-gemm-int4-gemm-h100.json.) K is split
over programs where weight tiles are few. H100, Llama-8B layer (four linears), bf16 cuBLAS in
brackets: 0.111 ms at 8 rows (0.163), 0.125 at 16 (0.167), 0.143 at 32 (0.168), 0.228 at 64
(0.172), 0.354 at 128 (0.181) (benchmarks/results/quant-gemm-int4-h100.json); the memory floor
of the int4 bytes is 0.04.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels import backend
from kiln.kernels.pdl_triton import pdl_wait

# rows of x -> (BLOCK_M, BLOCK_N, num_warps, num_stages, SPLIT_PER_SM), the smallest key
# >= M (benchmarks/quant_gemm.py --sweep-int4-gemm on the H100). K is split over programs until
# there are SPLIT_PER_SM programs a SM (at most 16 splits, adding fp32 partial sums atomically):
# few, long programs leave SMs idle and the rest unable to hide latency (O and down of
# Llama-8B are 64 weight tiles of 64 rows; at 8 rows splitting took 0.28 ms to 0.11 per layer).
TILES = {8: (16, 64, 2, 2, 8), 16: (16, 64, 4, 2, 8), 32: (32, 64, 4, 3, 2), 64: (64, 64, 4, 3, 2),
         128: (64, 64, 4, 3, 2)}
INTERPRETER_TILES = (16, 16, 1, 1, 4)
# Past this many rows the weights are dequantized once and cuBLAS runs the product: the codes'
# conversion, repeated for every BLOCK_M rows, stops paying for the bytes it saves (H100,
# Llama-8B layer: 0.35 ms here against 0.41 at 128 rows, 0.60 against 0.44 at 256).
INT4_GEMM_MAX_M = 128


def tiles_for(M: int) -> tuple[int, int, int, int, int]:
    for rows in sorted(TILES):
        if M <= rows:
            return TILES[rows]
    return TILES[max(TILES)]


@triton.jit
def _offset_bits(nib, dtype: tl.constexpr):
    """Codes 0..15 as the 16-bit pattern of OFFSET + q in `dtype` (bf16 128, fp16 1024)."""
    if dtype == tl.bfloat16:
        return (nib | 0x4300).to(tl.int16)
    return (nib | 0x6400).to(tl.int16)


@triton.jit
def _codes(packed, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, dtype: tl.constexpr):
    """[BLOCK_N, GROUP/8] words -> [BLOCK_N, GROUP] codes as OFFSET + q in `dtype`, k in order."""
    shifts = 4 * tl.arange(0, 8)
    nib = (packed[:, None, :] >> shifts[None, :, None]) & 0xF
    return tl.reshape(_offset_bits(nib, dtype), (BLOCK_N, GROUP)).to(dtype, bitcast=True)


@triton.jit
def _plane(packed, j: tl.constexpr, dtype: tl.constexpr):
    """Nibble plane j of the words, as OFFSET + q in `dtype` (same shape)."""
    return _offset_bits((packed >> (4 * j)) & 0xF, dtype).to(dtype, bitcast=True)


# M and the groups a split takes change with the batch: specializing on them would compile new
# variants under load, after the engine's warm-up.
@triton.jit(do_not_specialize=["M", "groups_per_split"])
def _int4_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, x_stride, w_stride, s_stride, out_stride,
                      groups_per_split, GROUP: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
    # The M tiles of one weight tile are neighbours in the grid, so all but the first read it from L2.
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)  # axis 1: the split of K
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    BW: tl.constexpr = GROUP // 8  # words of a group
    # A group of 128 is 16 words: each nibble plane is then a whole [*, 16] dot operand, so the
    # planes go to the tensor cores one by one, each meeting a contiguous run of x, with no
    # reshape between the loaded words and the dot (whose layout conversion would go through
    # shared memory). Smaller groups unpack into one [BLOCK_N, GROUP] tile.
    PLANES: tl.constexpr = BW >= 16
    words = tl.arange(0, BW)
    offs_x = words if PLANES else tl.arange(0, GROUP)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * x_stride + offs_x[None, :]
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * w_stride + words[None, :]
    s_rows = s_ptr + offs_n.to(tl.int64) * s_stride
    z_rows = z_ptr + offs_n.to(tl.int64) * s_stride
    dt = x_ptr.dtype.element_ty
    OFFSET: tl.constexpr = 128.0 if dt == tl.bfloat16 else 1024.0
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # out^T
    pdl_wait(PDL)
    g_start = tl.program_id(1) * groups_per_split
    for g in range(g_start, tl.minimum(g_start + groups_per_split, K // GROUP)):
        packed = tl.load(w_rows + g * BW, mask=mask_n[:, None], other=0)
        s = tl.load(s_rows + g, mask=mask_n, other=0.0).to(tl.float32)
        # OFFSET + q went in: take OFFSET * sum(x) back out with the min's share.
        zs = tl.load(z_rows + g, mask=mask_n, other=0.0).to(tl.float32) - OFFSET * s
        if PLANES:
            xsum = tl.zeros([BLOCK_M], dtype=tl.float32)
            part = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for j in tl.static_range(8):
                x = tl.load(x_rows + g * GROUP + j * BW, mask=mask_m[:, None], other=0.0)
                xsum += tl.sum(x.to(tl.float32), axis=1)
                part = tl.dot(_plane(packed, j, dt), tl.trans(x), part)
        else:
            x = tl.load(x_rows + g * GROUP, mask=mask_m[:, None], other=0.0)
            xsum = tl.sum(x.to(tl.float32), axis=1)
            part = tl.dot(_codes(packed, GROUP, BLOCK_N, dt), tl.trans(x))
        acc += part * s[:, None] + zs[:, None] * xsum[None, :]
    out = tl.trans(acc)
    ptrs = out_ptr + offs_m[:, None].to(tl.int64) * out_stride + offs_n[None, :]
    if SPLIT:  # fp32 partial sums of K's splits
        tl.atomic_add(ptrs, out, mask=mask_m[:, None] & mask_n[None, :])
    else:
        tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def int4_gemm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int,
              tiles: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] bf16/fp16, w int32 [N, K/8] plane-major, scales/mins [N, K/group] -> [M, N] in x's
    dtype. `tiles` overrides TILES (sweeps); SPLIT_PER_SM 0 keeps K whole."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the int4 GEMM takes bf16 or fp16 activations; got {x.dtype}")
    x = x.contiguous()
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] * 8 != K or K % group:
        raise ValueError(f"int4 weight [{N}, {w.shape[1]}] does not fit x [{M}, {K}] with group {group}")
    block_m, block_n, warps, stages, per_sm = tiles or (tiles_for(M) if x.is_cuda else INTERPRETER_TILES)
    tiles_mn = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    groups = K // group
    sms = backend.num_sms(x.device.index or 0) if x.is_cuda else 2
    splits = 1
    while tiles_mn * splits < per_sm * sms and splits * 2 <= min(groups, 16):
        splits *= 2
    per_split = triton.cdiv(groups, splits)
    splits = triton.cdiv(groups, per_split)
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device) if splits > 1 else \
        torch.empty(M, N, dtype=x.dtype, device=x.device)
    _int4_gemm_kernel[(tiles_mn, splits)](x, w, scales, mins, out, M, N, K, x.stride(0), w.stride(0),
                                          scales.stride(0), out.stride(0), per_split, GROUP=group,
                                          SPLIT=splits > 1, BLOCK_M=block_m, BLOCK_N=block_n,
                                          num_warps=warps, num_stages=stages, **backend.pdl_launch(x))
    return out.to(x.dtype) if splits > 1 else out
