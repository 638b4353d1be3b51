"""RMSNorm and residual-add + RMSNorm in one pass over each row (Triton).

With fp8 the row is also quantized per token for the fp8 linear that reads it
(e4m3 codes and an fp32 scale, as quant.quantize_fp8_per_token computes them
from the rounded result), so x is not written in bf16 only to be read again.
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
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, scale_ptr, n_cols, x_stride, res_stride, out_stride, eps,
                     HAS_RESIDUAL: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    pdl_wait(PDL)
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # The residual stream is updated in place; its rounding matches the reference's add_.
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * res_stride + cols, x, mask=mask)
        x = x.to(tl.float32)
    var = tl.sum(x * x, axis=0) / n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (x * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty) * w
    if QUANT:
        yf = y.to(tl.float32)
        scale = fp8_scale(tl.max(tl.abs(yf), axis=0))
        tl.store(out_ptr + row * out_stride + cols, fp8_codes(yf, scale).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)
    else:
        tl.store(out_ptr + row * out_stride + cols, y, mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            fp8: bool) -> torch.Tensor | Fp8Activation:
    n_rows, n_cols = x.shape
    assert x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1)
    out = torch.empty_like(x, dtype=FP8 if fp8 else x.dtype)
    scale = torch.empty(n_rows, 1, dtype=torch.float32, device=x.device) if fp8 else out
    if n_rows:
        block = triton.next_power_of_2(n_cols)
        warps = min(max(block // 256, 1), 16)
        _rms_norm_kernel[(n_rows,)](x, residual if residual is not None else x, weight, out, scale, n_cols,
                                    x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
                                    eps, HAS_RESIDUAL=residual is not None, QUANT=fp8, BLOCK=block, num_warps=warps,
                                    **backend.pdl_launch(x))
    return Fp8Activation(out, scale, x.dtype) if fp8 else out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fp8: bool = False) -> torch.Tensor | Fp8Activation:
    return _launch(x, None, weight, eps, fp8)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       fp8: bool = False) -> tuple[torch.Tensor | Fp8Activation, torch.Tensor]:
    return _launch(x, residual, weight, eps, fp8), residual
