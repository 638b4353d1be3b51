"""Row-wise argmax in two passes (Triton): chunks of a row in parallel, then one program per
row picks the best chunk. Ties go to the lowest index, as torch.argmax's; a NaN counts as +inf
(torch's takes a NaN over an inf: a row holding both is broken either way)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels import backend
from kiln.kernels.pdl_triton import pdl_wait

CHUNK = 4096


@triton.jit(do_not_specialize=["n_cols"])
def _chunk_argmax_kernel(x_ptr, val_ptr, idx_ptr, n_cols, x_stride, n_chunks, CHUNK: tl.constexpr,
                         PDL: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = c * CHUNK + tl.arange(0, CHUNK)
    pdl_wait(PDL)
    x = tl.load(x_ptr + row * x_stride + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)
    tl.store(val_ptr + row * n_chunks + c, tl.max(x, axis=0))
    tl.store(idx_ptr + row * n_chunks + c, c * CHUNK + tl.argmax(x, axis=0, tie_break_left=True))


@triton.jit(do_not_specialize=["n_chunks"])
def _pick_chunk_kernel(val_ptr, idx_ptr, out_ptr, n_chunks, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    pdl_wait(PDL)
    v = tl.load(val_ptr + row * n_chunks + c, mask=c < n_chunks, other=float("-inf"))
    best = tl.argmax(v, axis=0, tie_break_left=True)  # chunks in index order: the first maximum
    tl.store(out_ptr + row, tl.load(idx_ptr + row * n_chunks + best))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """kiln.kernels.argmax.argmax_ref of a [rows, cols] tensor."""
    rows, cols = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    chunk = min(CHUNK, triton.next_power_of_2(cols))
    n_chunks = triton.cdiv(cols, chunk)
    vals = torch.empty(rows, n_chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(rows, n_chunks, dtype=torch.int64, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    pdl = backend.pdl_launch(logits)
    _chunk_argmax_kernel[(rows, n_chunks)](logits, vals, idx, cols, logits.stride(0), n_chunks, CHUNK=chunk,
                                           num_warps=8 if chunk >= 2048 else 4, **pdl)
    _pick_chunk_kernel[(rows,)](vals, idx, out, n_chunks, BLOCK=triton.next_power_of_2(n_chunks), num_warps=1, **pdl)
    return out
