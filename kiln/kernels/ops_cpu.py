"""RMSNorm, SwiGLU's activation and RoPE + cache write on the CPU, through csrc/ops_cpu.c.

One pass each where the torch references take several (and a temporary per
pass); same contracts as `kiln.kernels.norm`, `.activation` and `.rope`, for
fp32 tensors whose feature sizes are multiples of 8 (RoPE: head size a
multiple of 16). `usable` says whether a tensor qualifies; the dispatchers ask
it and otherwise run the references.
"""
from __future__ import annotations

import functools

import torch

from kiln.kernels import backend, cpu_native
from kiln.kernels.cpu_native import F32, I64, INT, PTR

_SIGNATURES = {
    "kiln_rms_norm_f32": (PTR, PTR, PTR, PTR, I64, I64, I64, F32, INT),
    "kiln_silu_and_mul_f32": (PTR, PTR, I64, I64, I64, INT),
    "kiln_rope_and_cache_f32": (PTR, I64, PTR, I64, PTR, I64, PTR, PTR, PTR, PTR, PTR, I64, I64, I64, I64, INT),
}


def _fn(name: str):
    return cpu_native.function("ops_cpu", name, _SIGNATURES[name])


@functools.cache
def _built() -> bool:
    return cpu_native.load("ops_cpu") is not None


def usable(x: torch.Tensor, multiple: int = 8) -> bool:
    """x is an fp32 CPU tensor with unit stride in its last dim (a multiple of `multiple`), the
    backend is "auto", and the kernels could be built."""
    return (x.dtype == torch.float32 and not x.is_cuda and x.shape[-1] % multiple == 0 and x.stride(-1) == 1
            and backend.get_backend() == "auto" and x.device.type == "cpu" and _built())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """rms_norm(x) * weight; with `residual`, residual += x first (in place) and the sum is normed."""
    T, H = x.shape
    out = torch.empty(T, H, dtype=torch.float32)
    if residual is not None:
        assert residual.is_contiguous() and residual.shape == x.shape
    _fn("kiln_rms_norm_f32")(out.data_ptr(), x.data_ptr(), residual.data_ptr() if residual is not None else None,
                             weight.contiguous().data_ptr(), T, H, x.stride(0), eps, torch.get_num_threads())
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    T, two_i = x.shape
    out = torch.empty(T, two_i // 2, dtype=torch.float32)
    _fn("kiln_silu_and_mul_f32")(out.data_ptr(), x.data_ptr(), T, two_i // 2, x.stride(0), torch.get_num_threads())
    return out


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """q [T, Hq, D], k and v [T, Hk, D] (heads D apart, as the dispatcher checks; rows anywhere),
    an fp32 cache."""
    T, Hq, D = q.shape
    Hk = k.shape[1]
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and cos_sin.is_contiguous()
    pos = positions.to(torch.int64).contiguous()
    slots = slot_mapping.to(torch.int64).contiguous()
    _fn("kiln_rope_and_cache_f32")(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                                   pos.data_ptr(), cos_sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                   slots.data_ptr(), T, Hq, Hk, D, torch.get_num_threads())
