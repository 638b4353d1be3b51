"""SwiGLU's activation on the fused gate/up projection output."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels import backend, ops_cpu
from kiln.kernels.quant import Fp8Activation, fp8_activation_ref


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * I] laid out as [gate | up]; returns silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor, fp8: bool = False) -> torch.Tensor | Fp8Activation:
    """fp8: return the result quantized per token for an fp8 linear (one pass on a GPU)."""
    if backend.use_triton(x) and (x.is_cuda or not fp8):  # (the interpreter's e4m3 cast is wrong)
        from kiln.kernels import activation_triton
        return activation_triton.silu_and_mul(x, fp8)
    if not fp8 and ops_cpu.usable(x, 16) and x.dim() == 2:
        return ops_cpu.silu_and_mul(x)
    y = silu_and_mul_ref(x)
    return fp8_activation_ref(y) if fp8 else y
