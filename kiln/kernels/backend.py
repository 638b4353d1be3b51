"""Which implementation the dispatchers pick: Triton kernels or torch references.

"auto" runs Triton on CUDA tensors and the references elsewhere. "triton"
forces the kernels everywhere, which on CPU only works under the Triton
interpreter (TRITON_INTERPRET=1) and is how CI checks that both paths agree.
"""
from __future__ import annotations

import contextlib
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
