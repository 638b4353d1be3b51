"""Attention over a paged KV cache: metadata, the torch reference, the dispatcher.

Layout: `k_cache`, `v_cache` are [num_blocks, block_size, num_kv_heads, head_dim];
a sequence's token at position p lives in block `block_tables[s, p // block_size]`
at offset `p % block_size`. The batch is packed: the new tokens of all
sequences are concatenated, sequence s owning rows
`query_start_loc[s]:query_start_loc[s+1]`. Sequences with one new token
(decodes) come first, so one kernel can take them and another the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kiln.kernels import backend


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32
    num_decodes: int  # the first `num_decodes` sequences have exactly one new token
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    nb, bs, h, d = k_cache.shape
    k_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, max_len, H, D] view of each sequence's cached tokens (tail is junk)."""
    B = block_tables.shape[0]
    nb, bs, h, d = cache.shape
    nblk = -(-max_len // bs)
    # index_select is several times faster than advanced indexing on CPU.
    kv = cache.index_select(0, block_tables[:, :nblk].reshape(-1).long())
    return kv.view(B, nblk * bs, h, d)[:, :max_len]


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, q_start: torch.Tensor,
            seq_lens: torch.Tensor, block_tables: torch.Tensor, max_q: int, max_kv: int, scale: float) -> torch.Tensor:
    """Padded-batch attention for one group of sequences; q rows are packed."""
    B = seq_lens.shape[0]
    T, Hq, D = q.shape
    device = q.device
    q_lens = (q_start[1:] - q_start[:-1]).long()
    if max_q == 1:  # decodes: one row per sequence, nothing to pad
        qp = q.view(B, 1, Hq, D)
    else:
        seq_idx = torch.repeat_interleave(torch.arange(B, device=device), q_lens, output_size=T)
        row_in_seq = torch.arange(T, device=device) - q_start[:-1].long()[seq_idx]
        qp = q.new_zeros(B, max_q, Hq, D)
        qp[seq_idx, row_in_seq] = q
    k = _gather_kv(k_cache, block_tables, max_kv)
    v = _gather_kv(v_cache, block_tables, max_kv)
    # Query i of sequence b sits at position ctx_b + i, where ctx_b tokens came before this step.
    ctx = (seq_lens.long() - q_lens)[:, None, None]
    i = torch.arange(max_q, device=device)[None, :, None]
    j = torch.arange(max_kv, device=device)[None, None, :]
    mask = (j <= ctx + i) & (j < seq_lens.long()[:, None, None])
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
        attn_mask=mask[:, None], scale=scale, enable_gqa=Hq != k.shape[2])
    out = out.transpose(1, 2)
    return out.reshape(B, Hq, D) if max_q == 1 else out[seq_idx, row_in_seq]


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of each new token to its sequence's cached tokens.

    The cache must already hold this step's K/V. Decodes and prefills are
    padded separately so a long prompt chunk does not pad every decode.
    """
    out = torch.empty_like(q)
    nd, qsl = meta.num_decodes, meta.query_start_loc
    if nd:
        seq_lens = meta.seq_lens[:nd]
        max_kv = meta.max_seq_len if nd == meta.num_seqs else int(seq_lens.max())
        out[:nd] = _attend(q[:nd], k_cache, v_cache, qsl[:nd + 1], seq_lens, meta.block_tables[:nd],
                           1, max_kv, scale)
    if nd < meta.num_seqs:
        start = int(qsl[nd])
        seq_lens = meta.seq_lens[nd:]
        max_kv = int(seq_lens.max())
        out[start:] = _attend(q[start:], k_cache, v_cache, qsl[nd:] - start, seq_lens, meta.block_tables[nd:],
                              meta.max_query_len, max_kv, scale)
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    if backend.use_triton(q):
        from kiln.kernels import attention_triton
        return attention_triton.paged_attention(q, k_cache, v_cache, meta, scale)
    return paged_attention_ref(q, k_cache, v_cache, meta, scale)
