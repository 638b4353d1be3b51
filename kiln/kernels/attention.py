"""Attention over a paged KV cache: metadata, the torch reference, the dispatcher.

Layout: `k_cache`, `v_cache` are [num_blocks, block_size, num_kv_heads, head_dim];
a sequence's token at position p lives in block `block_tables[s, p // block_size]`
at offset `p % block_size`. The batch is packed: the new tokens of all
sequences are concatenated, sequence s owning rows
`query_start_loc[s]:query_start_loc[s+1]`. Sequences with one new token
(decodes) come first, so one kernel can take them and another the rest.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kiln.kernels import backend
from kiln.kernels.quant import from_kv_cache, to_kv_cache


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32
    num_decodes: int  # the first `num_decodes` sequences have exactly one new token
    max_query_len: int
    max_seq_len: int
    # Per-step derived data that every layer would otherwise recompute (e.g. the reference's masks).
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    nb, bs, h, d = k_cache.shape
    for cache, x, scale in ((k_cache, k, k_scale), (v_cache, v, v_scale)):
        vals = to_kv_cache(x, cache.dtype, scale)
        if cache.element_size() == 1:  # fp8: index_copy_ has no fp8 kernel on every device; bytes are bytes
            cache, vals = cache.view(torch.uint8), vals.view(torch.uint8)
        cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, vals)


@dataclass
class _Group:
    """One padded attention batch (decodes, or prompt chunks), planned once per step."""

    rows: slice | torch.Tensor  # rows of the packed q / output (an index for length-sorted decodes)
    block_ids: torch.Tensor  # [B * nblk] cache blocks to gather, per sequence in order
    B: int
    max_q: int
    max_kv: int
    mask: torch.Tensor | None  # [B, 1, max_q, max_kv]; None when every key is visible
    seq_idx: torch.Tensor | None = None  # packed row -> (sequence, row in sequence), for max_q > 1
    row_in_seq: torch.Tensor | None = None


def _plan_group(meta: AttentionMetadata, first: int, last: int, block_size: int) -> _Group:
    qsl = meta.query_start_loc
    q_start = qsl[first:last + 1].long()
    q_lens = q_start[1:] - q_start[:-1]
    seq_lens = meta.seq_lens[first:last].long()
    B = last - first
    decodes = first < meta.num_decodes
    max_q = 1 if decodes else meta.max_query_len
    max_kv = meta.max_seq_len if (decodes and last == meta.num_seqs) or (not decodes and first == 0) \
        else int(seq_lens.max())
    nblk = -(-max_kv // block_size)
    block_ids = meta.block_tables[first:last, :nblk].reshape(-1).long()
    device = seq_lens.device
    # Query i of sequence b sits at position ctx_b + i, where ctx_b tokens came before this step.
    ctx = (seq_lens - q_lens)[:, None, None]
    i = torch.arange(max_q, device=device)[None, :, None]
    j = torch.arange(max_kv, device=device)[None, None, :]
    mask = ((j <= ctx + i) & (j < seq_lens[:, None, None]))[:, None]
    rows = slice(int(q_start[0]), int(q_start[-1])) if not decodes else slice(first, last)
    group = _Group(rows, block_ids, B, max_q, max_kv, mask)
    if max_q > 1:
        T = rows.stop - rows.start
        group.seq_idx = torch.repeat_interleave(torch.arange(B, device=device), q_lens, output_size=T)
        group.row_in_seq = torch.arange(T, device=device) - (q_start[:-1] - q_start[0])[group.seq_idx]
    return group


# Decodes are padded to the longest context in their group: sorted by length and cut into groups
# of at least this many, up to DECODE_GROUPS of them, the padding (read twice: gathered, then by
# SDPA) shrinks. SmolLM2 on 2 CPU cores, 32 decodes of 60-500 tokens: 4.1 ms per layer in one
# group, 3.1 in two or four, 3.7 in eight (each group is a gather and an SDPA call).
DECODE_GROUPS = 4
DECODE_GROUP_MIN = 8


def _plan_decodes(meta: AttentionMetadata, block_size: int) -> list[_Group]:
    nd = meta.num_decodes
    k = max(1, min(DECODE_GROUPS, nd // DECODE_GROUP_MIN))
    if k == 1:
        return [_plan_group(meta, 0, nd, block_size)]
    lens = meta.seq_lens[:nd].long()
    order = torch.argsort(lens)
    groups = []
    for idx in torch.tensor_split(order, k):
        seq_lens = lens[idx]
        max_kv = int(seq_lens.max())
        nblk = -(-max_kv // block_size)
        mask = (torch.arange(max_kv, device=lens.device)[None, :] < seq_lens[:, None])[:, None, None]
        groups.append(_Group(idx, meta.block_tables[idx, :nblk].reshape(-1).long(), len(idx), 1, max_kv, mask))
    return groups


def _select(cache: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    if cache.element_size() == 1:  # fp8 through a byte view (no fp8 index_select everywhere)
        return cache.view(torch.uint8).index_select(0, ids).view(cache.dtype)
    return cache.index_select(0, ids)


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: _Group, scale: float,
            k_scale: float, v_scale: float) -> torch.Tensor:
    _, bs, h, d = k_cache.shape
    Hq = q.shape[1]
    # index_select is several times faster than advanced indexing on CPU.
    k = _select(k_cache, g.block_ids).view(g.B, -1, h, d)[:, :g.max_kv]
    v = _select(v_cache, g.block_ids).view(g.B, -1, h, d)[:, :g.max_kv]
    if g.max_q == 1:
        qp = q.view(g.B, 1, Hq, d)
    else:
        qp = q.new_zeros(g.B, g.max_q, Hq, d)
        qp[g.seq_idx, g.row_in_seq] = q
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), from_kv_cache(k, q.dtype, k_scale).transpose(1, 2),
        from_kv_cache(v, q.dtype, v_scale).transpose(1, 2),
        attn_mask=g.mask, scale=scale, enable_gqa=Hq != h).transpose(1, 2)
    return out.reshape(g.B, Hq, d) if g.max_q == 1 else out[g.seq_idx, g.row_in_seq]


def _ref_plan(meta: AttentionMetadata, block_size: int) -> list[_Group]:
    """The step's padded groups, made once and shared by all layers."""
    key = ("ref_plan", block_size)
    plan = meta.cache.get(key)
    if plan is None:
        nd, B = meta.num_decodes, meta.num_seqs
        plan = meta.cache[key] = (_plan_decodes(meta, block_size) if nd else []) + \
            ([_plan_group(meta, nd, B, block_size)] if nd < B else [])
    return plan


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float, k_scale: float = 1.0,
                        v_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of each new token to its sequence's cached tokens.

    The cache must already hold this step's K/V. Decodes and prefills are
    padded separately so a long prompt chunk does not pad every decode; the
    plan (masks, indices) is made once per step and shared by all layers.
    """
    out = torch.empty_like(q)
    for g in _ref_plan(meta, k_cache.shape[1]):
        out[g.rows] = _attend(q[g.rows], k_cache, v_cache, g, scale, k_scale, v_scale)
    return out


def _native_cpu(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    if backend.get_backend() != "auto" or q.is_cuda:
        return False
    from kiln.kernels import attention_cpu
    return attention_cpu.supported(q, k_cache)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """k_scale / v_scale: an FP8 cache holds K / k_scale and V / v_scale."""
    if backend.use_triton(q):
        from kiln.kernels import attention_triton
        return attention_triton.paged_attention(q, k_cache, v_cache, meta, scale, k_scale, v_scale)
    if _native_cpu(q, k_cache):
        from kiln.kernels import attention_cpu
        return attention_cpu.paged_attention(torch.empty(q.shape, dtype=q.dtype), q, k_cache, v_cache,
                                             meta.query_start_loc, meta.seq_lens, meta.block_tables, scale)
    return paged_attention_ref(q, k_cache, v_cache, meta, scale, k_scale, v_scale)
