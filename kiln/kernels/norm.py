"""RMSNorm, alone and fused with the residual add that precedes it."""
from __future__ import annotations

import torch

from kiln.kernels import backend, ops_cpu
from kiln.kernels.quant import Fp8Activation, fp8_activation_ref


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    residual.add_(x)
    return rms_norm_ref(residual, weight, eps), residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             fp8: bool = False) -> torch.Tensor | Fp8Activation:
    """fp8: return the result quantized per token for an fp8 linear (one pass on a GPU)."""
    if backend.use_triton(x) and (x.is_cuda or not fp8):  # (the interpreter's e4m3 cast is wrong)
        from kiln.kernels import norm_triton
        return norm_triton.rms_norm(x, weight, eps, fp8)
    if not fp8 and ops_cpu.usable(x) and x.dim() == 2 and weight.dtype == torch.float32:
        return ops_cpu.rms_norm(x, weight, eps)
    y = rms_norm_ref(x, weight, eps)
    return fp8_activation_ref(y) if fp8 else y


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       fp8: bool = False) -> tuple[torch.Tensor | Fp8Activation, torch.Tensor]:
    """residual += x (in place); returns (rms_norm(residual) * weight, residual)."""
    if backend.use_triton(x) and (x.is_cuda or not fp8):
        from kiln.kernels import norm_triton
        return norm_triton.fused_add_rms_norm(x, residual, weight, eps, fp8)
    if not fp8 and ops_cpu.usable(x) and x.dim() == 2 and residual.dtype == torch.float32 \
            and residual.is_contiguous() and weight.dtype == torch.float32:
        return ops_cpu.rms_norm(x, weight, eps, residual), residual
    y, residual = fused_add_rms_norm_ref(x, residual, weight, eps)
    return (fp8_activation_ref(y) if fp8 else y), residual
