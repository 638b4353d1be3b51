"""Quantized GEMMs in Triton: y = x @ dequant(W)^T for int8, fp8 or packed int4 W.

Decode (one row of x): reading the weights is the whole cost. A register
GEMV reads each weight tile once along K with vector loads, widens the codes,
and keeps products elementwise until one reduction at the end. fp8 streams at
~85% of the copy ceiling. int4 codes sit eight to an int32, plane-major
within a group (nibble j of word i is k = j * group/8 + i, kiln/kernels/quant.py),
so each nibble plane meets a contiguous run of x; a thread holds a few rows of
the same words, so x is loaded and widened once for all of them. A nibble
becomes a float by masking it into the mantissa of 256.0f or 16.0f (no
int->float convert, no scaling of x), two nibbles per shift. ~4 instructions
per weight, ~63% of the copy ceiling at Llama-8B shapes on the H100: the
kernel is bound by instruction issue more than by memory. It also takes 2-3
rows of x (tiles shared through L2), and has two epilogues that save a kernel
each: SwiGLU for [gate | up], RoPE and the KV-cache write for [q | k | v].

Larger batches: a tensor-core kernel widens the codes (8-bit, or int4
unpacked and scaled per group) in registers, K split over programs when
output tiles are few. Past INT4_TC_MAX_M rows, int4 is dequantized once to a
scratch and cuBLAS does the compute-bound rest.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kiln.kernels import backend
from kiln.kernels.pdl_triton import pdl_wait


@triton.jit
def _woq_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, x_stride, w_stride, s_stride, out_stride,
                k_per_split, BITS: tl.constexpr, FP8: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """Quantized W [N, K] on tensor cores, for batches past the GEMV's: the codes are widened to
    x's dtype in registers. int4: a tile lies inside one group (GROUP % BLOCK_K == 0) and holds
    BW = BLOCK_K/8 of its words; unpacking them along a new middle axis and merging it with the
    first gives rows r = 8i + j (the register layout of the pre-plane-major packing, which the
    H100 ran fastest), which are k = group start + j * GROUP/8 + (first word) + i: x, a few
    rows, is gathered in that order instead."""
    BW: tl.constexpr = BLOCK_K // 8
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
        if BITS == 4:
            r = tl.arange(0, BLOCK_K)
            offs_k = (k0 // GROUP) * GROUP + (r % 8) * (GROUP // 8) + (k0 % GROUP) // 8 + r // 8
        x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        if BITS == 4:
            g = k0 // GROUP
            words = k0 // 8 + tl.arange(0, BW)
            packed = tl.load(w_cols + words[:, None], mask=mask_n[None, :], other=0)
            shifts = 4 * tl.arange(0, 8)
            codes = tl.reshape((packed[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
            scale = tl.load(s_ptr + offs_n.to(tl.int64) * s_stride + g, mask=mask_n, other=0.0).to(tl.float32)
            mn = tl.load(z_ptr + offs_n.to(tl.int64) * s_stride + g, mask=mask_n, other=0.0).to(tl.float32)
            w = (codes.to(tl.float32) * scale[None, :] + mn[None, :]).to(x.dtype)
        else:
            q = tl.load(w_cols + offs_k[:, None], mask=mask_n[None, :], other=0)
            if FP8:  # e4m3 codes arrive as bytes (a masked fp8 load cannot take a fill value)
                w = q.to(tl.float8e4nv, bitcast=True).to(x.dtype)
            else:
                w = q.to(x.dtype)
        if IEEE:  # fp32 activations: exact products, not TF32
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if BITS != 4:  # per output channel, once
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
def _int4_plane_bits(word, j: tl.constexpr, magic_even, magic_odd):
    """Nibble j of each word as the fp32 256 + q (even j) or 16 + q (odd j). Nibbles 2i and
    2i+1 sit on mantissa bits 15 and 19 after the same shift (the compiler shares it); ORed
    into 256.0f or 16.0f they read exactly 256 + q or 16 + q: no int->float convert, and
    256 x + q x in fp32 keeps q x to ~2^-16 of x. The magics are arguments, so they sit in
    registers and mask-and-or is one LOP3 (one immediate each)."""
    if j // 2 == 0:
        src = word << 15
    elif j // 2 == 1:
        src = word << 7
    elif j // 2 == 2:
        src = word >> 1
    else:
        src = word >> 9
    if j % 2 == 0:
        bits = (src & 0x78000) | magic_even
    else:
        bits = (src & 0x780000) | magic_odd
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _quarters(v):
    """[..., 4] -> its four [...] slices (the last axis lies within a thread: no data moves)."""
    a, b = tl.split(tl.reshape(v, v.shape[:-1] + (2, 2)))
    return tl.split(a) + tl.split(b)


@triton.jit
def _int4_tile(acc, packed, x_ptr, kw, xw, s_ptr, z_ptr, s_rows, mask_n, magic_even, magic_odd,
               BLOCK_N: tl.constexpr, C: tl.constexpr, WG: tl.constexpr):
    """acc [BLOCK_N, C] plus one tile of packed words [BLOCK_N, 4 C] (from word kw) against x."""
    p0, p1, p2, p3 = _quarters(tl.reshape(packed, (BLOCK_N, C, 4)))
    t = tl.zeros([BLOCK_N, C], dtype=tl.float32)
    x_even = tl.zeros([C], dtype=tl.float32)
    x_odd = tl.zeros([C], dtype=tl.float32)
    for j in tl.static_range(8):
        x0, x1, x2, x3 = _quarters(tl.reshape(tl.load(x_ptr + kw * 8 + j * WG + xw).to(tl.float32), (C, 4)))
        if j % 2 == 0:
            x_even += (x0 + x1) + (x2 + x3)
        else:
            x_odd += (x0 + x1) + (x2 + x3)
        t += _int4_plane_bits(p0, j, magic_even, magic_odd) * x0[None, :]
        t += _int4_plane_bits(p1, j, magic_even, magic_odd) * x1[None, :]
        t += _int4_plane_bits(p2, j, magic_even, magic_odd) * x2[None, :]
        t += _int4_plane_bits(p3, j, magic_even, magic_odd) * x3[None, :]
    scale = tl.load(s_ptr + s_rows + kw // WG, mask=mask_n[:, None], other=0.0).to(tl.float32)
    mn = tl.load(z_ptr + s_rows + kw // WG, mask=mask_n[:, None], other=0.0).to(tl.float32)
    return acc + scale * (t - (256.0 * x_even + 16.0 * x_odd)[None, :]) + mn * (x_even + x_odd)[None, :]


@triton.jit
def _int4_gemv_rows(x_ptr, w_ptr, s_ptr, z_ptr, offs_n, mask_n, K, w_stride, s_stride, magic_even, magic_odd,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, PDL: tl.constexpr):
    """fp32 x . w for the BLOCK_N weight rows offs_n (see _int4_gemv_kernel)."""
    C: tl.constexpr = BLOCK_K // 32  # chunks of 4 words per tile
    WG: tl.constexpr = GROUP // 8
    W: tl.constexpr = BLOCK_K // 8
    chunks = tl.arange(0, C)
    words = tl.arange(0, W)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * w_stride + words[None, :]
    xw = (words // WG) * GROUP + words % WG  # x offset of plane 0 of each word
    g_chunk = (chunks * 4) // WG  # group of each chunk within the tile
    s_rows = offs_n[:, None].to(tl.int64) * s_stride + g_chunk[None, :]
    acc = tl.zeros([BLOCK_N, C], dtype=tl.float32)
    KW = K // 8
    # Tiles in pairs, each loading the tile after it into registers that are free by then (the
    # other of the pair), so no tile is copied between registers. K is a whole number of tiles.
    zero = tl.zeros([BLOCK_N, W], dtype=tl.int32)  # a whole-tile (scalar) condition keeps 16-byte loads
    a = tl.load(w_rows, mask=mask_n[:, None], other=0)  # weights: no need to wait for x
    pdl_wait(PDL)
    for kw in range(0, KW, 2 * W):
        b = tl.load(w_rows + (kw + W), mask=mask_n[:, None] & (zero + (kw + W) < KW), other=0)
        acc = _int4_tile(acc, a, x_ptr, kw, xw, s_ptr, z_ptr, s_rows, mask_n, magic_even, magic_odd, BLOCK_N, C, WG)
        a = tl.load(w_rows + (kw + 2 * W), mask=mask_n[:, None] & (zero + (kw + 2 * W) < KW), other=0)
        if kw + W < KW:
            acc = _int4_tile(acc, b, x_ptr, kw + W, xw, s_ptr, z_ptr, s_rows, mask_n, magic_even, magic_odd,
                             BLOCK_N, C, WG)
    return tl.sum(acc, axis=1)


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, x_stride, w_stride, s_stride, out_stride,
                      magic_even, magic_odd, up_offset, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                      SWIGLU: tl.constexpr = False, PDL: tl.constexpr = False):
    """One row of x against [BLOCK_N, K] of plane-major int4 W. Each thread holds all BLOCK_N
    rows of a chunk of 4 consecutive words (one 16-byte load per row, inside one group), so x
    is loaded and widened once for all rows, and the chunk's 32 products per row go into one
    sum before its group's scale applies; the next tile's words load before this tile's math.
    With w = q s + min per group: x . w = s (t - 256 sum_even - 16 sum_odd) + min sum x,
    where t = sum (256 + q) x_j over even planes + (16 + q) x_j over odd ones.
    SWIGLU: W is [gate | up] (up from row `up_offset`), the program's rows are gate and up rows
    of the same BLOCK_N/2 outputs, interleaved, and it writes silu(gate) * up (N outputs).
    A few rows of x: one program per (row, tile), the rows of a tile next to each other in the
    grid, so all but the first read the tile from L2."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    x_ptr += pid_m * x_stride
    out_ptr += pid_m * out_stride
    if SWIGLU:
        r = tl.arange(0, BLOCK_N)
        out_n = pid_n * (BLOCK_N // 2) + r // 2
        offs_n = out_n + (r % 2) * up_offset
        mask_n = out_n < N
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
    out = _int4_gemv_rows(x_ptr, w_ptr, s_ptr, z_ptr, offs_n, mask_n, K, w_stride, s_stride, magic_even, magic_odd,
                          BLOCK_N, BLOCK_K, GROUP, PDL)
    if SWIGLU:  # rounded as the unfused path: the product in x's dtype, silu of the rounded gate
        gate, up = tl.split(tl.reshape(out.to(out_ptr.dtype.element_ty), (BLOCK_N // 2, 2)))
        gate = gate.to(tl.float32)
        y = (gate * tl.sigmoid(gate)).to(up.dtype) * up
        o = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + o, y, mask=o < N)
    else:
        tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _int4_qkv_rope_kernel(x_ptr, w_ptr, s_ptr, z_ptr, q_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr, K,
                          x_stride, w_stride, s_stride, q_stride, cs_stride, inv_k_scale, inv_v_scale,
                          magic_even, magic_odd, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP: tl.constexpr, KV_FP8: tl.constexpr,
                          PDL: tl.constexpr = False):
    """The int4 QKV GEMV with RoPE and the KV-cache write in its epilogue (one token per row of
    x), as rope_triton.rope_and_cache does after the plain GEMV. A program takes 4 weight rows:
    two rotation pairs (i, i + D/2) of one q or k head, or 4 rows of v. q is written rotated to
    q_ptr; k (rotated) and v go to the cache at the token's slot (none for slot -1)."""
    HALF: tl.constexpr = D // 2
    PAIR_PROGRAMS: tl.constexpr = (HQ + HKV) * HALF // 2
    t = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    r = tl.arange(0, 4)
    head = pid * 2 // HALF
    if pid < PAIR_PROGRAMS:  # rows a0, b0, a1, b1: pairs i and i + 1 of one head
        offs_n = head * D + (pid * 2) % HALF + r // 2 + (r % 2) * HALF
    else:
        offs_n = (HQ + HKV) * D + (pid - PAIR_PROGRAMS) * 4 + r
    out = _int4_gemv_rows(x_ptr + t * x_stride, w_ptr, s_ptr, z_ptr, offs_n, offs_n >= 0, K, w_stride, s_stride,
                          magic_even, magic_odd, 4, BLOCK_K, GROUP, PDL)
    y = out.to(q_ptr.dtype.element_ty)  # rounded as the GEMV's output
    slot = tl.load(slot_ptr + t)
    row = slot * (HKV * D)
    if pid < PAIR_PROGRAMS:
        a, b = tl.split(tl.reshape(y, (2, 2)))
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        i = (pid * 2) % HALF + tl.arange(0, 2)
        pos = tl.load(pos_ptr + t)
        cos = tl.load(cs_ptr + pos * cs_stride + i)
        sin = tl.load(cs_ptr + pos * cs_stride + HALF + i)
        ra = (a * cos - b * sin).to(q_ptr.dtype.element_ty)
        rb = (b * cos + a * sin).to(q_ptr.dtype.element_ty)
        if head < HQ:
            tl.store(q_ptr + t * q_stride + head * D + i, ra)
            tl.store(q_ptr + t * q_stride + head * D + HALF + i, rb)
        elif slot >= 0:
            c = row + (head - HQ) * D + i
            if KV_FP8:  # the rotated (rounded) key, scaled into e4m3's range
                tl.store(kc_ptr + c, tl.clamp(ra.to(tl.float32) * inv_k_scale, -448.0, 448.0).to(kc_ptr.dtype.element_ty))
                tl.store(kc_ptr + c + HALF,
                         tl.clamp(rb.to(tl.float32) * inv_k_scale, -448.0, 448.0).to(kc_ptr.dtype.element_ty))
            else:
                tl.store(kc_ptr + c, ra.to(kc_ptr.dtype.element_ty))
                tl.store(kc_ptr + c + HALF, rb.to(kc_ptr.dtype.element_ty))
    elif slot >= 0:
        c = row + (pid - PAIR_PROGRAMS) * 4 + r
        if KV_FP8:
            tl.store(vc_ptr + c, tl.clamp(y.to(tl.float32) * inv_v_scale, -448.0, 448.0).to(vc_ptr.dtype.element_ty))
        else:
            tl.store(vc_ptr + c, y.to(vc_ptr.dtype.element_ty))


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


@functools.lru_cache(maxsize=4)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count if torch.cuda.is_available() else 16


# Up to this many rows the register GEMV beats the tensor-core kernel (int4 and 8-bit alike),
# and (BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMV: benchmarks/quant_gemm.py on the H100.
# int4: BLOCK_K = 1024 * num_warps gives each thread 4 words (one 16-byte load) of every row.
GEMV_MAX_M = 1
# int4: one program per row of x and weight tile, reading the tile from L2 for all rows but one.
INT4_GEMV_MAX_M = 3
GEMV_TILES = {4: (4, 2048, 2, 1), 8: (4, 1024, 2, 2)}
# Past this many rows int4 is dequantized once to a scratch and cuBLAS does the rest: on the H100
# the tensor-core kernel takes 0.31 ms per Llama-8B layer at 16 rows, 0.73 at 32, the dequantize
# path 0.40 at any count up to 128 (benchmarks/results/quant-gemm-h100.json).
INT4_TC_MAX_M = 16


def _tiles(M: int, on_gpu: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the tensor-core kernel."""
    if not on_gpu:  # the interpreter: small tiles
        return 16, 16, 32, 4, 1
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    block_n, block_k = (64, 128) if M <= 64 else (128, 64)
    return block_m, block_n, block_k, 4, 3


def _check_int4_group(group: int) -> None:
    if group < 16 or group & (group - 1):  # tiles of whole groups; tl.dot needs K >= 16
        raise ValueError(f"int4 group size must be a power of two >= 16, got {group}")


def _int4_block_k(block_k: int, K: int, group: int) -> int:
    """The most whole groups, a power of two of them, up to block_k that tile K exactly."""
    _check_int4_group(group)
    ng, per = K // group, 1
    while per * 2 * group <= block_k and ng % (per * 2) == 0:
        per *= 2
    return per * group


def gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int,
         group: int, tiles: tuple[int, int, int, int] | None = None, up_offset: int | None = None) -> torch.Tensor:
    """The register GEMV for one row of x (a few for 8-bit); `tiles` overrides GEMV_TILES (for sweeps).
    int4 with `up_offset`: W is [gate | up] with up from that row, and the result is
    silu(gate) * up ([1, up_offset]), as activation.silu_and_mul of the plain product."""
    M, K = x.shape
    N = w.shape[0]
    if w.dtype == torch.float8_e4m3fn:
        w = w.view(torch.uint8)  # the kernel widens e4m3 bytes itself
    block_n, block_k, warps, stages = tiles or (GEMV_TILES[bits] if x.is_cuda else (8, 256, 1, 1))
    if bits == 4:
        if M > INT4_GEMV_MAX_M:
            raise ValueError(f"the int4 GEMV takes up to {INT4_GEMV_MAX_M} rows of x, got {M}")
        block_k = _int4_block_k(block_k, K, group)
        n_out = N if up_offset is None else up_offset
        out = torch.empty(M, n_out, dtype=x.dtype, device=x.device)
        per_program = block_n if up_offset is None else block_n // 2
        _int4_gemv_kernel[(M, triton.cdiv(n_out, per_program))](
            x, w, scales, mins, out, n_out, K, x.stride(0), w.stride(0), scales.stride(0), out.stride(0),
            0x43800000, 0x41800000,
            up_offset or 0, BLOCK_N=block_n, BLOCK_K=block_k, GROUP=group, SWIGLU=up_offset is not None,
            num_warps=warps, num_stages=stages, **backend.pdl_launch(x))
        return out
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, block_n),)
    block_k = min(block_k, K)
    if K % block_k:
        raise ValueError(f"K={K} must be a multiple of {block_k}")
    _gemv_kernel[grid](x, w, scales, out, N, K, x.stride(0), w.stride(0), out.stride(0), M=M,
                       FP8=w.dtype == torch.uint8, BLOCK_M=triton.next_power_of_2(M), BLOCK_N=block_n,
                       BLOCK_K=block_k, num_warps=warps, num_stages=stages, **backend.pdl_launch(x))
    return out


def int4_qkv_rope(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, heads: int,
                  kv_heads: int, head_dim: int, positions: torch.Tensor, cos_sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float,
                  v_scale: float) -> torch.Tensor:
    """q (rotated) [M, heads * head_dim] from an int4 [q | k | v] weight, with k (rotated) and v
    written to the cache: the GEMV and rope_triton.rope_and_cache in one kernel, for up to
    INT4_GEMV_MAX_M tokens."""
    M, K = x.shape
    group = w.shape[1] * 8 // scales.shape[1]
    if M > INT4_GEMV_MAX_M or head_dim % 4:
        raise ValueError(f"the fused int4 QKV GEMV takes up to {INT4_GEMV_MAX_M} rows and head_dim % 4 == 0")
    _, block_k, warps, stages = GEMV_TILES[4] if x.is_cuda else (4, 256, 1, 1)
    block_k = _int4_block_k(block_k, K, group)
    q = torch.empty(M, heads * head_dim, dtype=x.dtype, device=x.device)
    programs = (heads + kv_heads) * head_dim // 4 + kv_heads * head_dim // 4
    _int4_qkv_rope_kernel[(M, programs)](
        x, w, scales, mins, q, positions, cos_sin, k_cache, v_cache, slot_mapping, K, x.stride(0), w.stride(0),
        scales.stride(0), q.stride(0), cos_sin.stride(0), 1.0 / k_scale, 1.0 / v_scale, 0x43800000, 0x41800000,
        HQ=heads, HKV=kv_heads, D=head_dim, BLOCK_K=block_k, GROUP=group,
        KV_FP8=k_cache.dtype == torch.float8_e4m3fn, num_warps=warps, num_stages=stages, **backend.pdl_launch(x))
    return q


def tensor_core_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                       bits: int, group: int) -> torch.Tensor:
    """The tensor-core kernel for any number of rows of x."""
    M, K = x.shape
    N = w.shape[0]
    if w.dtype == torch.float8_e4m3fn:
        w = w.view(torch.uint8)
    block_m, block_n, block_k, warps, stages = _tiles(M, x.is_cuda)
    if bits == 4:
        block_k = min(block_k, group)
        if group % block_k:
            raise ValueError(f"int4 group size {group} must be a multiple of {block_k}")
    if K % block_k:
        raise ValueError(f"K={K} must be a multiple of {block_k}")
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    sms = _num_sms(x.device.index or 0) if x.is_cuda else 4
    # Split K until there are about two programs per SM (each split a whole number of K tiles).
    splits = 1
    while tiles * splits < 2 * sms and K % (splits * 2 * block_k) == 0 and splits < 16:
        splits *= 2
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), splits)
    _woq_kernel[grid](x, w, scales, mins if mins is not None else scales, out, M, N, K, x.stride(0), w.stride(0),
                      scales.stride(0), out.stride(0), K // splits, BITS=bits, FP8=w.dtype == torch.uint8,
                      GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                      num_stages=stages, IEEE=x.dtype == torch.float32)
    return out.to(x.dtype)


def woq_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
               bits: int, group: int = 128) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32); int8 or fp8 w [N, K] with scales [N], or int4 w [N, K/8] with
    scales/mins [N, K/group]."""
    x = x.contiguous()
    M = x.shape[0]
    if bits == 4:
        _check_int4_group(group)
        if M > INT4_TC_MAX_M:
            return torch.nn.functional.linear(x, dequantize_int4(w, scales, mins, x.dtype, group))
    if M <= (INT4_GEMV_MAX_M if bits == 4 else GEMV_MAX_M):
        return gemv(x, w, scales, mins, bits, group)
    return tensor_core_linear(x, w, scales, mins, bits, group)


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
