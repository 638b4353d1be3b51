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
        _rms_norm_kernel[(n_rows,)](x, residual if residual is not None else x, weight, out, scale, n_cols,
                                    x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
                                    eps, HAS_RESIDUAL=residual is not None, QUANT=fp8, **_row_launch(n_cols),
                                    **backend.pdl_launch(x))
    return Fp8Activation(out, scale, x.dtype) if fp8 else out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fp8: bool = False) -> torch.Tensor | Fp8Activation:
    return _launch(x, None, weight, eps, fp8)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       fp8: bool = False) -> tuple[torch.Tensor | Fp8Activation, torch.Tensor]:
    return _launch(x, residual, weight, eps, fp8), residual


@triton.jit(do_not_specialize=["n_rows", "n_norms"])
def _rms_norm_begin_kernel(h_ptr, w_ptr, out_ptr, sum_ptr, n_cols, n_rows, n_norms, h_stride, out_stride,
                           BLOCK: tl.constexpr, SLOTS: tl.constexpr, PDL: tl.constexpr = False):
    """out = h * w; the row's partial sums: sum(h^2) and zeros for the first norm, zeros for
    the others (sum_ptr [n_norms, n_rows, SLOTS])."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    slots = tl.arange(0, SLOTS)
    pdl_wait(PDL)
    h = tl.load(h_ptr + row * h_stride + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * out_stride + cols, h * tl.load(w_ptr + cols, mask=mask, other=0.0), mask=mask)
    hf = h.to(tl.float32)
    tl.store(sum_ptr + row * SLOTS + slots, tl.where(slots == 0, tl.sum(hf * hf, axis=0).to(tl.float64), 0.0))
    for j in range(1, n_norms):
        tl.store(sum_ptr + (j * n_rows + row) * SLOTS + slots, tl.zeros([SLOTS], dtype=tl.float64))


@triton.jit
def _rms_norm_end_kernel(x_ptr, sum_ptr, out_ptr, n_cols, x_stride, out_stride, eps, BLOCK: tl.constexpr,
                         SLOTS: tl.constexpr, PDL: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    pdl_wait(PDL)
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    total = tl.sum(tl.load(sum_ptr + row * SLOTS + tl.arange(0, SLOTS)), axis=0)
    rstd = tl.rsqrt(total.to(tl.float32) / n_cols + eps)
    tl.store(out_ptr + row * out_stride + cols, (x * rstd).to(out_ptr.dtype.element_ty), mask=mask)


def _row_launch(n_cols: int) -> dict:
    block = triton.next_power_of_2(n_cols)
    return {"BLOCK": block, "num_warps": min(max(block // 256, 1), 16)}


def rms_norm_begin(h: torch.Tensor, weight: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """norm.rms_norm_begin_ref in one pass (sums [norms, M, slots] fp64, contiguous)."""
    n_rows, n_cols = h.shape
    assert h.stride(-1) == 1 and sums.is_contiguous() and sums.shape[1] == n_rows
    out = torch.empty_like(h)
    _rms_norm_begin_kernel[(n_rows,)](h, weight, out, sums, n_cols, n_rows, sums.shape[0], h.stride(0), out.stride(0),
                                      SLOTS=sums.shape[2], **_row_launch(n_cols), **backend.pdl_launch(h))
    return out


def rms_norm_end(x: torch.Tensor, sums: torch.Tensor, eps: float) -> torch.Tensor:
    """norm.rms_norm_end_ref in one pass."""
    n_rows, n_cols = x.shape
    assert x.stride(-1) == 1 and sums.is_contiguous() and sums.shape[0] == n_rows
    out = torch.empty_like(x)
    _rms_norm_end_kernel[(n_rows,)](x, sums, out, n_cols, x.stride(0), out.stride(0), eps, SLOTS=sums.shape[1],
                                    **_row_launch(n_cols), **backend.pdl_launch(x))
    return out
