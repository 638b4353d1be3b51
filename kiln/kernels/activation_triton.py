"""silu(gate) * up over the fused [gate | up] projection output (Triton).

With fp8 the result is also quantized per token for the fp8 down projection
(as quant.quantize_fp8_per_token does from the rounded result), instead of
writing bf16 that a quantization kernel reads back: one program per row holds
the whole row in registers (up to ONE_PASS_MAX_COLS), finds its amax and
writes e4m3 codes; wider rows take two passes (amax, then codes). Two passes
over Llama-8B's 14336 columns cost 20 us per 256 rows on the H100, twice the
bf16 kernel: 7 dependent chunk loads each, at 2 programs per SM.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels import backend
from kiln.kernels.pdl_triton import pdl_wait
from kiln.kernels.quant import FP8, Fp8Activation
from kiln.kernels.quant_triton import fp8_codes, fp8_scale


@triton.jit
def _swiglu(row_ptr, cols, mask, n_cols):
    """silu(gate) * up at `cols` of one [gate | up] row, rounded as the reference (silu, then the
    product, each in x's dtype)."""
    gate = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row_ptr + n_cols + cols, mask=mask, other=0.0)
    return (gate * tl.sigmoid(gate)).to(up.dtype) * up


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, x_stride, out_stride, BLOCK: tl.constexpr,
                         PDL: tl.constexpr = False):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    tl.store(out_ptr + row * out_stride + cols, _swiglu(x_ptr + row * x_stride, cols, mask, n_cols), mask=mask)


ONE_PASS_MAX_COLS = 16384  # 32 gate + 32 up values per thread at 16 warps


@triton.jit
def _silu_and_mul_fp8_kernel(x_ptr, out_ptr, scale_ptr, n_cols, x_stride, out_stride, BLOCK: tl.constexpr,
                             ONE_PASS: tl.constexpr = False, PDL: tl.constexpr = False):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    if ONE_PASS:  # BLOCK covers the row
        cols = tl.arange(0, BLOCK)
        y = _swiglu(x_ptr + row * x_stride, cols, cols < n_cols, n_cols).to(tl.float32)
        scale = fp8_scale(tl.max(tl.abs(y), axis=0))
        tl.store(out_ptr + row * out_stride + cols, fp8_codes(y, scale).to(out_ptr.dtype.element_ty),
                 mask=cols < n_cols)
        tl.store(scale_ptr + row, scale)
        return
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        y = _swiglu(x_ptr + row * x_stride, cols, cols < n_cols, n_cols).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(y))
    scale = fp8_scale(tl.max(amax, axis=0))
    for c0 in range(0, n_cols, BLOCK):  # the row is in L2 now
        cols = c0 + tl.arange(0, BLOCK)
        y = _swiglu(x_ptr + row * x_stride, cols, cols < n_cols, n_cols).to(tl.float32)
        tl.store(out_ptr + row * out_stride + cols, fp8_codes(y, scale).to(out_ptr.dtype.element_ty),
                 mask=cols < n_cols)
    tl.store(scale_ptr + row, scale)


def silu_and_mul(x: torch.Tensor, fp8: bool = False) -> torch.Tensor | Fp8Activation:
    rows, width = x.shape[0], x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], width, dtype=FP8 if fp8 else x.dtype, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device) if fp8 else None
    if rows:
        assert x.stride(-1) == 1
        if fp8:
            block = triton.next_power_of_2(width)
            one_pass = block <= ONE_PASS_MAX_COLS
            block = block if one_pass else 2048
            _silu_and_mul_fp8_kernel[(rows,)](x, out, scale, width, x.stride(0), out.stride(0), BLOCK=block,
                                              ONE_PASS=one_pass, num_warps=16 if block > 4096 else 8,
                                              **backend.pdl_launch(x))
        else:
            block = min(triton.next_power_of_2(width), 2048)
            _silu_and_mul_kernel[(rows, triton.cdiv(width, block))](x, out, width, x.stride(0), out.stride(0),
                                                                     BLOCK=block, num_warps=4,
                                                                     **backend.pdl_launch(x))
    return Fp8Activation(out, scale, x.dtype) if fp8 else out
