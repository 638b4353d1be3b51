"""Which implementation the dispatchers pick: Triton kernels or torch references.

"auto" runs Triton on CUDA tensors; on the CPU it runs the native kernels of
`kiln.kernels.cpu_native` where one exists and could be built (attention,
dense fp32 linears, norms, SwiGLU, RoPE), the torch references elsewhere. "torch" runs the references
everywhere. "triton" forces the Triton kernels everywhere, which on CPU only
works under the Triton interpreter (TRITON_INTERPRET=1) and is how CI checks
that both paths agree.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

_BACKENDS = ("auto", "triton", "torch")
_backend = os.environ.get("KILN_KERNELS", "auto")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(_BACKENDS)}; got {name!r}")
    if name == "triton" and not HAS_TRITON:
        raise ValueError("kernel backend 'triton' needs the triton package (pip install triton)")
    _backend = name


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_triton(t: torch.Tensor) -> bool:
    if _backend == "torch" or not HAS_TRITON:
        return False
    if _backend == "triton":
        return True
    return t.is_cuda


# Programmatic dependent launch (Hopper and newer): a kernel launched with it may start while
# the previous kernel in the stream finishes, and waits (griddepcontrol.wait) only where it
# first needs that kernel's results. Decode at batch 1 is ~350 small kernels per token whose
# launch gaps and ramp-ups add up; a GEMV can fetch its first weights during the previous
# kernel's tail. KILN_PDL=0 turns it off.
_PDL = os.environ.get("KILN_PDL", "1") != "0"


def set_pdl(on: bool) -> bool:
    """Turn programmatic dependent launch on or off for later launches; returns the old setting."""
    global _PDL
    old, _PDL = _PDL, on
    return old


@functools.lru_cache(maxsize=8)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=8)
def num_sms(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index` (kernels size their grids by it)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def pdl_launch(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel that takes `PDL: tl.constexpr` (see pdl_triton.pdl_wait):
    empty where programmatic dependent launch is off or unsupported (CPU, the interpreter, pre-Hopper)."""
    if not (_PDL and t.is_cuda and _capability(t.device.index or 0)[0] >= 9):
        return {}
    return {"PDL": True, "launch_pdl": True}
