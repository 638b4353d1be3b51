"""Dense fp32 linear layers on the CPU through the native kernel in csrc/linear_cpu.c.

The weight is repacked once, at engine load, into 16-column panels
[N / 16, K, 16] (one contiguous stream per panel); `linear` then computes
x @ W^T + b for any number of rows. Against oneDNN's packed weights on 2 cores
(SmolLM2's 30 layers and head, weights streamed from memory): 30 against 39 ms
at 1 row, 43 against 53 at 8, 58 against 80 at 16, 73 against 100 at 32, even
from 64 rows up (throwaway measurements; the engine-level figures are in
benchmarks/results/cpu-throughput-smollm2.json).
"""
from __future__ import annotations

import torch

from kiln.kernels import cpu_native
from kiln.kernels.cpu_native import I64, INT, PTR

PANEL = 16


def _kernel():
    return cpu_native.function("linear_cpu", "kiln_linear_f32", (PTR, PTR, PTR, PTR, I64, I64, I64, I64, I64, INT))


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """W [N, K] as panels [N / 16, K, 16], or None where the kernel does not apply
    (not fp32 on the CPU, N not a multiple of 16, or no compiler)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2 \
            or weight.shape[0] % PANEL or _kernel() is None:
        return None
    n, k = weight.shape
    return weight.detach().reshape(n // PANEL, PANEL, k).transpose(1, 2).contiguous()


def linear(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] fp32 @ W^T (+ bias), W packed by `pack`."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    n = panels.shape[0] * PANEL
    if panels.shape[1] != k:
        raise ValueError(f"linear: input has {k} features, the weight takes {panels.shape[1]}")
    y = torch.empty(m, n, dtype=torch.float32)
    if bias is not None:
        bias = bias.contiguous()
    _kernel()(y.data_ptr(), x2.data_ptr(), panels.data_ptr(), bias.data_ptr() if bias is not None else None,
              m, k, n, x2.stride(0), n, torch.get_num_threads())
    return y.view(*shape[:-1], n)
