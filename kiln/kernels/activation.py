"""SwiGLU's activation on the fused gate/up projection output."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels import backend


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * I] laid out as [gate | up]; returns silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if backend.use_triton(x):
        from kiln.kernels import activation_triton
        return activation_triton.silu_and_mul(x)
    return silu_and_mul_ref(x)
