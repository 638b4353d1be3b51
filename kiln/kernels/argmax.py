"""Greedy decoding's argmax over the vocabulary, per row of logits.

torch's argmax reduces a row in one thread block: at batch 1 a 128K-entry row takes ~28 us on
the H100 (benchmarks/decode_profile.py), about 1% of an int4 batch-1 step. The Triton version
splits each row over many programs and combines their results in a second small kernel.
"""
from __future__ import annotations

import torch

from kiln.kernels import backend


def argmax_ref(logits: torch.Tensor) -> torch.Tensor:
    """Index of each row's largest value, the first one on ties (int64 [rows])."""
    return logits.argmax(dim=-1)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    if backend.use_triton(logits) and logits.shape[0] > 0:
        from kiln.kernels import argmax_triton
        return argmax_triton.argmax(logits)
    return argmax_ref(logits)
