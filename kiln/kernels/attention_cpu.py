"""Paged attention on the CPU through the native kernel in csrc/attention_cpu.c.

Same contract as `kiln.kernels.attention.paged_attention_ref`. Decodes are
bound by reading the KV, which the kernel does once. Prompt chunks it takes
row by row too, and still beats SDPA's CPU kernel, padded or called per
sequence: one 2048-token prompt (SmolLM2's heads, 2 cores) 159 against 415 ms
per layer, 32 prompts of 16-256 tokens 28 against 57 (throwaway measurements).
"""
from __future__ import annotations

import torch

from kiln.kernels import cpu_native
from kiln.kernels.cpu_native import F32, I64, INT, PTR


def _kernel():
    return cpu_native.function("attention_cpu", "kiln_paged_attention_f32",
                               (PTR, PTR, I64, PTR, PTR, PTR, PTR, PTR, I64, I64, I64, I64, I64, I64, F32, INT), INT)


def supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the native kernel takes these tensors (fp32 on the CPU, head size a multiple of 8)."""
    return (q.dtype == torch.float32 and k_cache.dtype == torch.float32 and q.device.type == "cpu"
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256 and _kernel() is not None)


def paged_attention(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Attention of sequences 0..B-1 (rows query_start_loc[0]..query_start_loc[B] of q) into `out`.

    query_start_loc must start at 0; the int32 metadata is the step's own (already on the CPU).
    """
    T, Hq, D = q.shape
    _, bs, H, _ = k_cache.shape
    B = seq_lens.shape[0]
    if q.stride(2) != 1 or q.stride(1) != D:
        q = q.contiguous()
    assert out.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    qsl = query_start_loc.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    tables = block_tables.to(torch.int32)
    if tables.stride(1) != 1:
        tables = tables.contiguous()
    rc = _kernel()(out.data_ptr(), q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                   qsl.data_ptr(), lens.data_ptr(), tables.data_ptr(), tables.stride(0), B, Hq, H, D, bs,
                   scale, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"native CPU attention failed ({'unsupported shape' if rc == 1 else 'out of memory'})")
    return out
