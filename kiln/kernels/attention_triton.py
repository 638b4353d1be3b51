"""Paged attention in Triton: split-KV decode and varlen causal prefill/extend.

Decode (one query token per sequence): a program owns one (sequence, KV head,
split) and computes all the query heads that share that KV head, so each
cached K/V byte is read once. Long contexts with few sequences are cut into
splits (flash-decoding) whose partial results a second kernel merges by
log-sum-exp. The split count depends only on the batch shape, so a captured
CUDA graph stays valid for any context length.

Prefill/extend: a program owns a tile of one sequence's new query rows for one
head, and walks that sequence's cached keys (prefix and the new chunk)
through its block table, with the causal limit at position ctx + row.
Tiles are found in-kernel from per-sequence tile counts, so the launch needs
no host synchronisation.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from kiln.kernels import backend
from kiln.kernels.attention import AttentionMetadata
from kiln.kernels.pdl_triton import pdl_wait

_LOG2E = 1.4426950408889634
# Tile shape of the prefill kernel on GPUs (chosen on the H100 with benchmarks/kernels.py --sweep);
# short chunks use smaller tiles so padding rows do not dominate.
PREFILL_CONFIG = {"BLOCK_M": 256, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
PREFILL_CONFIG_SHORT = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


# Counts that change from step to step are not specialized on (Triton would compile a variant
# for 1, for multiples of 16 and for the rest), nor is the 16-byte alignment of the prefill rows'
# slices of seq_lens and block_tables (it follows the number of decode rows before them): a
# variant first met under load stalls every request for the ~2 s it compiles (two such prefill
# variants cost a 2048/128 run 4 s on the H100).
@triton.jit(do_not_specialize=["num_splits"])
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, lens_ptr, out_ptr, mid_o_ptr, mid_lse_ptr,
                   q_stride, bt_stride, tok_stride, block_stride, out_stride, num_splits, scale_log2, out_scale,
                   G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   PAGE: tl.constexpr, DIRECT: tl.constexpr, F16: tl.constexpr = False, PDL: tl.constexpr = False):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    # The step's lengths are no kernel's output (copied in before its first kernel): read before
    # waiting on the previous kernel, so the first block-table read does not queue behind it.
    seq_len = tl.load(lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = s * per_split
    end = tl.minimum(start + per_split, seq_len)
    pdl_wait(PDL)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    heads = kvh * G + g
    mask_g = g < G
    q = tl.load(q_ptr + b * q_stride + heads[:, None] * D + d[None, :], mask=mask_g[:, None], other=0.0)
    if F16:  # e4m3 widens to fp16 in one instruction (to bf16 it takes several): compute in fp16
        q = q.to(tl.float16)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    kv_off = kvh * D + d[None, :]
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs < end
        page = tl.load(bt_ptr + b * bt_stride + offs // PAGE, mask=mask_n, other=0).to(tl.int64)
        row = page * block_stride + (offs % PAGE) * tok_stride
        k = tl.load(kc_ptr + row[:, None] + kv_off, mask=mask_n[:, None], other=0.0).to(q.dtype)
        qk = tl.dot(q, tl.trans(k)) * scale_log2
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        v = tl.load(vc_ptr + row[:, None] + kv_off, mask=mask_n[:, None], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = acc * (out_scale / safe_l)[:, None]
    if DIRECT:
        tl.store(out_ptr + b * out_stride + heads[:, None] * D + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=mask_g[:, None])
    else:
        # Partial result and its log2-sum-exp; an empty split has lse = -inf and weighs nothing.
        lse = tl.where(l_i > 0, m_i + tl.math.log2(safe_l), float("-inf"))
        base = (b * (G * tl.num_programs(1)) + heads) * num_splits + s
        tl.store(mid_o_ptr + base[:, None] * D + d[None, :], o, mask=mask_g[:, None])
        tl.store(mid_lse_ptr + base, lse, mask=mask_g)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(mid_o_ptr, mid_lse_ptr, out_ptr, out_stride, num_splits,
                          D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr = False):
    pdl_wait(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    hq = tl.num_programs(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    base = (b * hq + h) * num_splits
    lse = tl.load(mid_lse_ptr + base + sp, mask=sp < num_splits, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.math.exp2(lse - top)
    o = tl.load(mid_o_ptr + (base + sp)[:, None] * D + d[None, :], mask=(sp < num_splits)[:, None], other=0.0)
    total = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * out_stride + h * D + d, res.to(out_ptr.dtype.element_ty))


@triton.jit
def _prefill_tiles(acc, l_i, m_i, q, kc_ptr, vc_ptr, bt_row, lo, hi, q_pos, seq_len, kv_off, tok_stride,
                   block_stride, scale_log2, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, MASKED: tl.constexpr):
    """Online-softmax over key tiles [lo, hi); MASKED applies the causal limit."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            in_seq = offs_n < seq_len
            page = tl.load(bt_row + offs_n // PAGE, mask=in_seq, other=0).to(tl.int64)
        else:
            page = tl.load(bt_row + offs_n // PAGE).to(tl.int64)
        krow = page * block_stride + (offs_n % PAGE) * tok_stride
        k = tl.load(kc_ptr + krow[:, None] + kv_off).to(q.dtype)
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            qk = tl.where((offs_n[None, :] <= q_pos[:, None]) & in_seq[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
        if MASKED:  # a row may have seen no key yet (only rows past the sequence's end)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_safe = m_new
        p = tl.math.exp2(qk * scale_log2 - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        v = tl.load(vc_ptr + krow[:, None] + kv_off).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["num_seqs", "lens_ptr", "bt_ptr"])
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, qsl_ptr, lens_ptr, cu_tiles_ptr, out_ptr,
                    num_seqs, q_stride, out_stride, bt_stride, tok_stride, block_stride, scale_log2, out_scale,
                    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    PAGE: tl.constexpr, F16: tl.constexpr = False):
    h = tl.program_id(0)  # heads vary fastest: the G heads of one KV head run together and share K/V in L2
    total = tl.load(cu_tiles_ptr + num_seqs)
    tile = total - 1 - tl.program_id(1)  # last tiles (the most keys under the causal mask) first
    if tile < 0:
        return
    # Binary search: the sequence b with cu_tiles[b] <= tile < cu_tiles[b + 1].
    lo = 0
    hi = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(cu_tiles_ptr + mid) <= tile:
            lo = mid
        else:
            hi = mid
    b = lo
    m0 = (tile - tl.load(cu_tiles_ptr + b)) * BLOCK_M
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    seq_len = tl.load(lens_ptr + b)
    ctx = seq_len - q_len

    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < q_len
    d = tl.arange(0, D)
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * q_stride + h * D + d[None, :], mask=mask_m[:, None], other=0.0)
    if F16:  # as in the decode kernel: an FP8 cache widens to fp16 cheaply
        q = q.to(tl.float16)
    kv_off = (h // G) * D + d[None, :]
    bt_row = bt_ptr + b.to(tl.int64) * bt_stride

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # Keys before ctx + m0 are visible to every row of the tile: no mask needed there.
    full = (ctx + m0) // BLOCK_N * BLOCK_N
    last = ctx + tl.minimum(m0 + BLOCK_M, q_len)
    acc, l_i, m_i = _prefill_tiles(acc, l_i, m_i, q, kc_ptr, vc_ptr, bt_row, 0, full, ctx + offs_m, seq_len,
                                   kv_off, tok_stride, block_stride, scale_log2, BLOCK_N, PAGE, False)
    acc, l_i, m_i = _prefill_tiles(acc, l_i, m_i, q, kc_ptr, vc_ptr, bt_row, full, last, ctx + offs_m, seq_len,
                                   kv_off, tok_stride, block_stride, scale_log2, BLOCK_N, PAGE, True)
    o = acc * (out_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]
    tl.store(out_ptr + rows[:, None] * out_stride + h * D + d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None])


def decode_splits(batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Splits per sequence: enough programs to fill the GPU, at least ~256 keys each."""
    sms = backend.num_sms(device.index or 0) if device.type == "cuda" else 16
    fill = triton.cdiv(2 * sms, batch * num_kv_heads)
    return max(1, min(fill, triton.cdiv(max_seq_len, 256), 64))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, max_seq_len: int, scale: float, out: torch.Tensor,
                 k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """An FP8 cache holds K / k_scale and V / v_scale: the scales fold into the softmax scale
    and the output, so the inner loop only widens the loaded bytes."""
    B, HQ, D = q.shape
    _, page, HKV, _ = k_cache.shape
    G = HQ // HKV
    splits = decode_splits(B, HKV, max_seq_len, q.device)
    block_g = max(16, triton.next_power_of_2(G))
    # num_warps / num_stages from a sweep on the H100 (B=256, 192-1024 keys); with an FP8 cache the
    # dots run in fp16, since e4m3 widens to fp16 in one instruction and to bf16 in several.
    common = dict(G=G, BLOCK_G=block_g, D=D, BLOCK_N=64, PAGE=page, num_warps=2, num_stages=4,
                  F16=k_cache.element_size() == 1, **backend.pdl_launch(q))
    args = (q.stride(0), block_tables.stride(0), k_cache.stride(1), k_cache.stride(0), out.stride(0))
    if splits == 1:
        _decode_kernel[(B, HKV, 1)](q, k_cache, v_cache, block_tables, seq_lens, out, out, out, *args, 1,
                                    scale * k_scale * _LOG2E, v_scale, DIRECT=True, **common)
        return
    mid_o = torch.empty(B, HQ, splits, D, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(B, HQ, splits, dtype=torch.float32, device=q.device)
    _decode_kernel[(B, HKV, splits)](q, k_cache, v_cache, block_tables, seq_lens, out, mid_o, mid_lse, *args,
                                     splits, scale * k_scale * _LOG2E, v_scale, DIRECT=False, **common)
    _decode_reduce_kernel[(B, HQ)](mid_o, mid_lse, out, out.stride(0), splits, D=D,
                                   BLOCK_S=triton.next_power_of_2(splits), num_warps=4, **backend.pdl_launch(q))


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float, out: torch.Tensor,
                  max_query_len: int | None = None, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    T, HQ, D = q.shape
    _, page, HKV, _ = k_cache.shape
    B = seq_lens.shape[0]
    if not q.is_cuda:
        cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    else:
        cfg = PREFILL_CONFIG if (max_query_len or T) >= 256 else PREFILL_CONFIG_SHORT
    block_m = cfg["BLOCK_M"]
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    cu_tiles = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    torch.cumsum((q_lens + block_m - 1) // block_m, 0, out=cu_tiles[1:])
    grid = (HQ, triton.cdiv(T, block_m) + B)  # an upper bound on the tiles; spare programs exit at once
    _prefill_kernel[grid](q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, cu_tiles, out, B,
                          q.stride(0), out.stride(0), block_tables.stride(0), k_cache.stride(1),
                          k_cache.stride(0), scale * k_scale * _LOG2E, v_scale, G=HQ // HKV, D=D, PAGE=page,
                          F16=k_cache.element_size() == 1, **cfg)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Same contract as `kiln.kernels.attention.paged_attention_ref`."""
    out = torch.empty_like(q)
    nd, B = meta.num_decodes, meta.num_seqs
    if nd:
        paged_decode(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], meta.max_seq_len,
                     scale, out[:nd], k_scale, v_scale)
    if nd < B:
        qsl = meta.query_start_loc[nd:]
        # Prefill rows start after the nd decode rows; rebase the offsets to index q[nd:].
        paged_prefill(q[nd:], k_cache, v_cache, meta.block_tables[nd:], qsl - nd, meta.seq_lens[nd:], scale,
                      out[nd:], meta.max_query_len, k_scale, v_scale)
    return out
