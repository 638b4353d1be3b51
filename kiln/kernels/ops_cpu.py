"""RMSNorm, SwiGLU's activation and RoPE + cache write on the CPU, through csrc/ops_cpu.c.

One pass each where the torch references take several (and a temporary per
pass); same contracts as `kiln.kernels.norm`, `.activation` and `.rope`, for
fp32 tensors whose feature sizes are multiples of 8 (RoPE: head size a
multiple of 16). `usable` says whether a tensor qualifies; the dispatchers ask
it and otherwise run the references.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from kiln.kernels import backend, cpu_native

_P, _I, _F, _N = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "kiln_rms_norm_f32": [_P, _P, _P, _P, _I, _I, _I, _F, _N],
    "kiln_silu_and_mul_f32": [_P, _P, _I, _I, _I, _N],
    "kiln_rope_and_cache_f32": [_P, _I, _P, _I, _P, _I, _P, _P, _P, _P, _P, _I, _I, _I, _I, _N],
}


def _fn(name: str):
    lib = cpu_native.load("ops_cpu")
    if lib is None:
        return None
    fn = getattr(lib, name)
    if fn.argtypes is None:
        fn.restype = None
        fn.argtypes = _SIGNATURES[name]
    return fn


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
    """q [T, Hq, D], k and v [T, Hk, D] (heads D apart; rows anywhere), an fp32 cache."""
    T, Hq, D = q.shape
    Hk = k.shape[1]
    for t in (q, k, v):
        assert t.stride(2) == 1 and t.stride(1) == D
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and cos_sin.is_contiguous()
    pos = positions.to(torch.int64).contiguous()
    slots = slot_mapping.to(torch.int64).contiguous()
    _fn("kiln_rope_and_cache_f32")(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                                   pos.data_ptr(), cos_sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                   slots.data_ptr(), T, Hq, Hk, D, torch.get_num_threads())
