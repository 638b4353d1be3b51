"""Rotary position embedding (HF "rotate half" layout) and the paged-cache write.

`rope_and_cache` is what the attention layer calls: rotate q and k in place,
then store k and v at their cache slots. The Triton version does both in one
pass over k.

With an FP8 cache, q and k then leave transformed so that scores stay the same but
e4m3 rounds K more gently (`fp8_kv_transform_ref`): each channel of k is divided,
and of q multiplied, by a per-(KV head, channel) smoothing factor the builder
calibrates (QServe's SmoothAttention), and both are multiplied by an orthonormal
Walsh-Hadamard matrix over head_dim (q.k = Hq.Hk). K's few large channels, which
carry the scores that matter, are shrunk and spread over all channels before
e4m3's 3-bit mantissa rounds them; that rounding was nine tenths of the FP8
cache's loss (benchmarks/kv_quant_study.py). V is stored as it is. The attention
kernels need no change.
"""
from __future__ import annotations

import math

import torch

from kiln.kernels import backend, ops_cpu
from kiln.kernels.attention import write_kv_ref
from kiln.kernels.quant import FP8

ROPE_TYPES = ("default", "llama3", "linear", "freq_factors")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "freq_factors":  # GGUF stores llama3 scaling as per-frequency divisors
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: {', '.join(ROPE_TYPES)}")


def rope_cos_sin(head_dim: int, max_positions: int, theta: float, scaling: dict | None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """[max_positions, head_dim] float32: cos of each frequency, then sin."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


def apply_rope_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; returns the rotated tensor in x's dtype (math in fp32)."""
    half = x.shape[-1] // 2
    cs = cos_sin[positions.long()]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


_HADAMARD: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def hadamard_sign_matrix(n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[n, n] Sylvester Hadamard matrix of +-1 (n a power of two); symmetric, H @ H = n I. Made
    once per device and dtype (a CUDA graph keeps pointing at it)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, got {n}")
    key = (n, str(device), dtype)
    if key not in _HADAMARD:
        h = torch.ones(1, 1)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[key] = h.to(device, dtype)
    return _HADAMARD[key]


def hadamard_ref(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] times the orthonormal Walsh-Hadamard matrix (its own inverse), in x's dtype
    (math in fp32)."""
    d = x.shape[-1]
    return ((x.float() @ hadamard_sign_matrix(d, x.device)) * d ** -0.5).to(x.dtype)


def fp8_kv_transform_ref(q: torch.Tensor, k: torch.Tensor, k_smooth: torch.Tensor | None) -> None:
    """q [T, Hq, D] and k [T, Hkv, D] (after RoPE) as an FP8 cache wants them, in place: smoothed
    by k_smooth [Hkv, D] (k divided, each query head multiplied by its KV head's row), rounded,
    then Hadamard-rotated."""
    if k_smooth is not None:
        group = q.shape[1] // k.shape[1]
        q.copy_(q.float() * k_smooth.repeat_interleave(group, 0))
        k.copy_(k.float() / k_smooth)
    q.copy_(hadamard_ref(q))
    k.copy_(hadamard_ref(k))


def rope_and_cache_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0,
                       k_smooth: torch.Tensor | None = None) -> None:
    hq, hk = q.shape[1], k.shape[1]
    if q.stride() == k.stride() and k.data_ptr() == q.data_ptr() + hq * q.stride(1) * q.element_size():
        # q and k are neighbours in the fused QKV output: rotate them as one tensor.
        qk = q.as_strided((q.shape[0], hq + hk, q.shape[2]), q.stride())
        qk.copy_(apply_rope_ref(qk, positions, cos_sin))
    else:
        q.copy_(apply_rope_ref(q, positions, cos_sin))
        k.copy_(apply_rope_ref(k, positions, cos_sin))
    if k_cache.dtype == FP8:
        fp8_kv_transform_ref(q, k, k_smooth)
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0,
                   k_smooth: torch.Tensor | None = None) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place; write k, v into the cache. When the cache
    is FP8, q and k are also smoothed (k_smooth [Hkv, D] float32, None for none) and
    Hadamard-rotated, and K and V are stored divided by k_scale / v_scale."""
    if backend.use_triton(q):
        from kiln.kernels import rope_triton
        return rope_triton.rope_and_cache(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping,
                                          k_scale, v_scale, k_smooth)
    if k_cache.dtype == torch.float32 and ops_cpu.usable(q, 16) and cos_sin.dtype == torch.float32 \
            and all(t.stride(1) == t.shape[2] and t.stride(2) == 1 for t in (q, k, v)):
        return ops_cpu.rope_and_cache(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
    return rope_and_cache_ref(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, k_scale, v_scale,
                              k_smooth)
