"""The int4 decode GEMV (Triton): one to INT4_GEMV_MAX_M rows of x against plane-major int4 W.

Reading the weights is the whole cost, and the kernel is bound by instruction issue as much as
by memory (~3.8 SASS instructions per weight). K is a compile-time constant, so the tiles of a
row are straight-line code (a loop only past two tiles) whose loads need no masks: masked
loads zeroed their registers first and cost 13% more instructions (batch-1 int4 Llama-8B on
the H100: 2.455 -> 2.294 ms per token, benchmarks/results/builder-h100.json). int4 codes sit
eight to an int32, plane-major within a group (nibble j of word i is k = j * group/8 + i,
kiln/kernels/quant.py), so each nibble plane meets a contiguous run of x; a thread holds a
few rows of the same words, so x is loaded and widened once for all of them. A nibble becomes
a float by masking it into the mantissa of 256.0f or 16.0f (no int->float convert, no scaling
of x), two nibbles per shift. A few rows of x: one program per (row, tile), neighbours in the
grid, so all but the first read the tile from L2.

Two epilogues each save a kernel at small-batch decode: SwiGLU for [gate | up] (`gemv` with
`up_offset`), and RoPE with the KV-cache write for [q | k | v] (`qkv_rope`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels import backend
from kiln.kernels.pdl_triton import pdl_wait
from kiln.kernels.rope_triton import rotate

# One program per row of x and weight tile, reading the tile from L2 for all rows but one. Each
# row past the first adds ~0.034 ms per Llama-8B layer on the H100 (quant-gemm-h100.json), so
# from 4 rows the int4 GEMM (int4_gemm_triton, 0.111 ms at up to 8) is faster even without this
# GEMV's fused SwiGLU / RoPE epilogues. Llama-8B decode steps on the H100 (decode_batch.py
# --int4-gemv-max-m, decode-batch-h100-int4-gemv-limit.json): the GEMV wins at 1 and 2 rows,
# the GEMM from 4; at 3 rows the two kernels' per-layer times are equal and the epilogues decide.
INT4_GEMV_MAX_M = 3
# (BLOCK_N, BLOCK_K, num_warps, num_stages) on a GPU (benchmarks/quant_gemm.py --sweep, H100);
# BLOCK_K = 1024 * num_warps gives each thread 4 words (one 16-byte load) of every row.
TILES = (4, 2048, 2, 1)
INTERPRETER_TILES = (8, 256, 1, 1)
# The QKV + RoPE GEMV: (rows a program, BLOCK_K, warps, stages). 8 rows (768 programs at
# Llama-8B, one H100 wave) made the kernel faster without PDL but the batch-1 step slower with
# it, in an A/B on the H100: 4 it is.
QKV_TILES = (4, 2048, 2, 1)
INTERPRETER_QKV_TILES = (8, 256, 1, 1)
# No register cap: the compiler takes 127 at Llama-8B's 4096-wide rows and 167 at 14336, and caps
# of 128 and 112 (maxnreg) made batch-1 decode slightly slower in an A/B on the H100.
# 256.0f and 16.0f, passed as arguments so they sit in registers (mask-and-or is then one LOP3).
MAGIC_EVEN, MAGIC_ODD = 0x43800000, 0x41800000


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
def _int4_tile(acc, packed, x_ptr, kw, xw, s_ptr, z_ptr, s_rows, magic_even, magic_odd,
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
    scale = tl.load(s_ptr + s_rows + kw // WG).to(tl.float32)
    mn = tl.load(z_ptr + s_rows + kw // WG).to(tl.float32)
    return acc + scale * (t - (256.0 * x_even + 16.0 * x_odd)[None, :]) + mn * (x_even + x_odd)[None, :]


@triton.jit
def _int4_gemv_rows(x_ptr, w_ptr, s_ptr, z_ptr, offs_n, mask_n, K: tl.constexpr, w_stride, s_stride, magic_even,
                    magic_odd, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, PDL: tl.constexpr):
    """fp32 x . w for the BLOCK_N weight rows offs_n (see _int4_gemv_kernel)."""
    C: tl.constexpr = BLOCK_K // 32  # chunks of 4 words per tile
    WG: tl.constexpr = GROUP // 8
    W: tl.constexpr = BLOCK_K // 8
    NT: tl.constexpr = K // BLOCK_K  # K is a whole number of tiles
    chunks = tl.arange(0, C)
    words = tl.arange(0, W)
    # Rows past N read row 0 (their sums are not stored), so no load needs a mask: a masked load
    # zeroes its registers first and loses its 16-byte width to a per-word guard.
    rows = tl.where(mask_n, offs_n, 0)[:, None].to(tl.int64)
    w_rows = w_ptr + rows * w_stride + words[None, :]
    xw = (words // WG) * GROUP + words % WG  # x offset of plane 0 of each word
    s_rows = rows * s_stride + ((chunks * 4) // WG)[None, :]  # the group of each chunk
    acc = tl.zeros([BLOCK_N, C], dtype=tl.float32)
    # Tiles in pairs, each loading the tile after it into registers that are free by then (the
    # other of the pair), so no tile is copied between registers; the last one or two tiles
    # (known from K) follow, so every load is in bounds.
    a = tl.load(w_rows)  # weights: no need to wait for x
    pdl_wait(PDL)
    for i in range(0, (NT - 1) // 2):
        kw = i * (2 * W)
        b = tl.load(w_rows + (kw + W))
        acc = _int4_tile(acc, a, x_ptr, kw, xw, s_ptr, z_ptr, s_rows, magic_even, magic_odd, BLOCK_N, C, WG)
        a = tl.load(w_rows + (kw + 2 * W))
        acc = _int4_tile(acc, b, x_ptr, kw + W, xw, s_ptr, z_ptr, s_rows, magic_even, magic_odd, BLOCK_N, C, WG)
    kw = ((NT - 1) // 2) * (2 * W)
    if NT % 2 == 0:
        b = tl.load(w_rows + (kw + W))
        acc = _int4_tile(acc, a, x_ptr, kw, xw, s_ptr, z_ptr, s_rows, magic_even, magic_odd, BLOCK_N, C, WG)
        acc = _int4_tile(acc, b, x_ptr, kw + W, xw, s_ptr, z_ptr, s_rows, magic_even, magic_odd, BLOCK_N, C, WG)
    else:
        acc = _int4_tile(acc, a, x_ptr, kw, xw, s_ptr, z_ptr, s_rows, magic_even, magic_odd, BLOCK_N, C, WG)
    return tl.sum(acc, axis=1)


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K: tl.constexpr, x_stride, w_stride, s_stride,
                      out_stride, magic_even, magic_odd, up_offset, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP: tl.constexpr, SWIGLU: tl.constexpr = False, PDL: tl.constexpr = False):
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
def _int4_qkv_rope_kernel(x_ptr, w_ptr, s_ptr, z_ptr, q_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr, K: tl.constexpr,
                          x_stride, w_stride, s_stride, q_stride, cs_stride,
                          magic_even, magic_odd, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                          ROWS: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                          PDL: tl.constexpr = False):
    """The int4 QKV GEMV with RoPE and the KV-cache write in its epilogue (one token per row of
    x), as rope_triton.rope_and_cache does after the plain GEMV. A program takes ROWS weight
    rows: ROWS/2 rotation pairs (i, i + D/2) of one q or k head, or ROWS rows of v. q is written
    rotated to q_ptr; k (rotated) and v go to the cache at the token's slot (none for slot -1)."""
    HALF: tl.constexpr = D // 2
    P: tl.constexpr = ROWS // 2
    PAIR_PROGRAMS: tl.constexpr = (HQ + HKV) * HALF // P
    t = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    r = tl.arange(0, ROWS)
    head = pid * P // HALF
    if pid < PAIR_PROGRAMS:  # rows a0, b0, a1, b1, ...: pairs i .. i + P - 1 of one head
        offs_n = head * D + (pid * P) % HALF + r // 2 + (r % 2) * HALF
    else:
        offs_n = (HQ + HKV) * D + (pid - PAIR_PROGRAMS) * ROWS + r
    # The epilogue's inputs first, before the GEMV waits on the previous kernel: the step's
    # positions and slots (copied in before its first kernel) and the RoPE table are no kernel's
    # output, and in a kernel that runs as one wave their dependent loads would otherwise add
    # two memory latencies to its end.
    slot = tl.load(slot_ptr + t)
    i = (pid * P) % HALF + tl.arange(0, P)
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cs_ptr + pos * cs_stride + i)
    sin = tl.load(cs_ptr + pos * cs_stride + HALF + i)
    out = _int4_gemv_rows(x_ptr + t * x_stride, w_ptr, s_ptr, z_ptr, offs_n, offs_n >= 0, K, w_stride, s_stride,
                          magic_even, magic_odd, ROWS, BLOCK_K, GROUP, PDL)
    y = out.to(q_ptr.dtype.element_ty)  # rounded as the GEMV's output
    row = slot * (HKV * D)
    if pid < PAIR_PROGRAMS:
        a, b = tl.split(tl.reshape(y, (P, 2)))
        ra, rb = rotate(a, b, cos, sin)
        ra = ra.to(q_ptr.dtype.element_ty)
        rb = rb.to(q_ptr.dtype.element_ty)
        if head < HQ:
            tl.store(q_ptr + t * q_stride + head * D + i, ra)
            tl.store(q_ptr + t * q_stride + head * D + HALF + i, rb)
        elif slot >= 0:
            c = row + (head - HQ) * D + i
            tl.store(kc_ptr + c, ra)
            tl.store(kc_ptr + c + HALF, rb)
    elif slot >= 0:
        c = row + (pid - PAIR_PROGRAMS) * ROWS + r
        tl.store(vc_ptr + c, y)


def check_group(group: int) -> None:
    if group < 16 or group & (group - 1):  # tiles of whole groups; tl.dot needs K >= 16
        raise ValueError(f"int4 group size must be a power of two >= 16, got {group}")


def block_k_for(block_k: int, K: int, group: int) -> int:
    """The most whole groups, a power of two of them, up to block_k that tile K exactly."""
    check_group(group)
    ng, per = K // group, 1
    while per * 2 * group <= block_k and ng % (per * 2) == 0:
        per *= 2
    return per * group


def gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int,
         tiles: tuple[int, int, int, int] | None = None, up_offset: int | None = None) -> torch.Tensor:
    """x [M <= INT4_GEMV_MAX_M, K] @ dequant(w)^T; `tiles` overrides TILES (for sweeps). With
    `up_offset`: w is [gate | up] with up from that row, and the result is silu(gate) * up
    ([M, up_offset]), as activation.silu_and_mul of the plain product."""
    M, K = x.shape
    N = w.shape[0]
    if M > INT4_GEMV_MAX_M:
        raise ValueError(f"the int4 GEMV takes up to {INT4_GEMV_MAX_M} rows of x, got {M}")
    block_n, block_k, warps, stages = tiles or (TILES if x.is_cuda else INTERPRETER_TILES)
    block_k = block_k_for(block_k, K, group)
    n_out = N if up_offset is None else up_offset
    out = torch.empty(M, n_out, dtype=x.dtype, device=x.device)
    per_program = block_n if up_offset is None else block_n // 2
    _int4_gemv_kernel[(M, triton.cdiv(n_out, per_program))](
        x, w, scales, mins, out, n_out, K, x.stride(0), w.stride(0), scales.stride(0), out.stride(0),
        MAGIC_EVEN, MAGIC_ODD, up_offset or 0, BLOCK_N=block_n, BLOCK_K=block_k, GROUP=group,
        SWIGLU=up_offset is not None, num_warps=warps, num_stages=stages, **backend.pdl_launch(x))
    return out


def qkv_rope(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, heads: int,
             kv_heads: int, head_dim: int, positions: torch.Tensor, cos_sin: torch.Tensor,
             k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
             tiles: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """q (rotated) [M, heads * head_dim] from an int4 [q | k | v] weight, with k (rotated) and v
    written to the cache: the GEMV and rope_triton.rope_and_cache in one kernel, for up to
    INT4_GEMV_MAX_M tokens. `tiles` overrides QKV_TILES (rows a program, BLOCK_K, warps, stages).
    The cache must be of x's dtype: an FP8 cache's K is Hadamard-rotated over whole heads, which
    a program holding a few rows of a head cannot do (rope_and_cache does it)."""
    M, K = x.shape
    if k_cache.dtype != x.dtype or v_cache.dtype != x.dtype:
        raise ValueError(f"the fused int4 QKV GEMV writes a {x.dtype} KV cache, got {k_cache.dtype}")
    group = w.shape[1] * 8 // scales.shape[1]
    rows, block_k, warps, stages = tiles or (QKV_TILES if x.is_cuda else INTERPRETER_QKV_TILES)
    if M > INT4_GEMV_MAX_M or head_dim % rows:  # a program's rotation pairs stay within half a head
        raise ValueError(f"the fused int4 QKV GEMV takes up to {INT4_GEMV_MAX_M} rows and head_dim % {rows} == 0")
    block_k = block_k_for(block_k, K, group)
    q = torch.empty(M, heads * head_dim, dtype=x.dtype, device=x.device)
    programs = (heads + kv_heads) * head_dim // rows + kv_heads * head_dim // rows
    _int4_qkv_rope_kernel[(M, programs)](
        x, w, scales, mins, q, positions, cos_sin, k_cache, v_cache, slot_mapping, K, x.stride(0), w.stride(0),
        scales.stride(0), q.stride(0), cos_sin.stride(0), MAGIC_EVEN, MAGIC_ODD,
        HQ=heads, HKV=kv_heads, D=head_dim, ROWS=rows, BLOCK_K=block_k, GROUP=group,
        num_warps=warps, num_stages=stages, **backend.pdl_launch(x))
    return q
