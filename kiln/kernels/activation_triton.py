"""silu(gate) * up over the fused [gate | up] projection output (Triton)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, x_stride, out_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + n_cols + cols, mask=mask, other=0.0)
    act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_stride + cols, act * up, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    rows, width = x.shape[0], x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    assert x.stride(-1) == 1
    block = min(triton.next_power_of_2(width), 2048)
    _silu_and_mul_kernel[(rows, triton.cdiv(width, block))](x, out, width, x.stride(0), out.stride(0),
                                                             BLOCK=block, num_warps=4)
    return out
