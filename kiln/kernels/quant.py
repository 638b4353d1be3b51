"""Weight (and activation) quantization: formats, torch references, dispatch.

Every format quantizes rows (output channels) independently, so a tensor-
parallel shard of rows quantizes to the same bytes as the rows of the whole.

- fp8      W8A8: e4m3 weights with a scale per output channel; activations
           quantized per token at run time; GEMM by torch._scaled_mm (Hopper).
- int8-wo  int8 weights, scale per output channel; activations stay bf16.
- int4-awq 4-bit codes in groups of 128 along K, w = code * scale + min with an fp16
           scale and min per group (asymmetric; GGUF's Q4_1 layout, so a Q4_1
           checkpoint re-quantizes exactly at group 32), 8 codes packed per
           int32 plane-major within each group: nibble j of the group's word i
           holds k = j * group/8 + i, so the decode GEMV meets each nibble plane
           with a contiguous run of x (vector loads). AWQ's activation-aware
           scaling is applied by the builder first.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kiln.kernels import backend

QUANT_MODES = ("none", "fp8", "int8-wo", "int4-awq")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT4_GROUP = 128


# -- fp8 ---------------------------------------------------------------------------

def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (e4m3 codes [N, K], fp32 scale [N])."""
    scale = (w.float().abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    q = (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Activation(NamedTuple):
    """An activation already quantized per token for a W8A8 GEMM (by the norm or activation
    kernel that produced it, which saves a pass over x): e4m3 codes [M, K], fp32 scales [M, 1],
    and the dtype the GEMM returns."""
    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


def fp8_activation_ref(y: torch.Tensor) -> Fp8Activation:
    return Fp8Activation(*quantize_fp8_per_token(y), y.dtype)


def fp8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    xq, xs = quantize_fp8_per_token(x)
    y = F.linear(xq.float() * xs, q.float() * scale[:, None])
    return (y + bias.float() if bias is not None else y).to(x.dtype)


# Up to this many rows (decode batches) reading the weight is the whole cost, and
# _scaled_mm plus the activation quantization launch more than it saves: the
# weight-only kernel widens the e4m3 codes in registers and keeps x in bf16.
FP8_WEIGHT_ONLY_MAX_M = 16  # benchmarks/quant_gemm.py on the H100: _scaled_mm wins from 32 rows


def fp8_quantizes_input(rows: int) -> bool:
    """Whether an fp8 linear of `rows` rows runs W8A8 (so its producer may hand it an Fp8Activation)."""
    return rows > FP8_WEIGHT_ONLY_MAX_M


def fp8_linear(x: torch.Tensor | Fp8Activation, q: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(x, Fp8Activation):
        xq, xs, dtype = x
        if xq.is_cuda:
            y = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale[None, :], out_dtype=dtype, use_fast_accum=True)
        else:
            y = F.linear(xq.float() * xs, q.float() * scale[:, None]).to(dtype)
        return y + bias if bias is not None else y
    if not backend.use_triton(x):
        return fp8_linear_ref(x, q, scale, bias)
    from kiln.kernels import quant_triton
    if not fp8_quantizes_input(x.shape[0]):
        y = quant_triton.woq_linear(x, q, scale, None, bits=8)
    else:
        xq, xs = quant_triton.quantize_fp8_per_token(x)
        if x.is_cuda:
            # Fast accumulation: 5-11% faster on the H100 at Llama-8B shapes; the output's relative
            # error goes from 1.7e-3 to 2.1-3.3e-3, far below what quantizing x and W costs.
            y = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale[None, :], out_dtype=x.dtype,
                                 use_fast_accum=True)
        else:  # the interpreter checks the quantization kernel; the GEMM is the reference's
            y = F.linear(xq.float() * xs, q.float() * scale[:, None]).to(x.dtype)
    return y + bias if bias is not None else y


def check_fp8_supported(device: torch.device, what: str = "quant 'fp8'",
                        instead: str = "Use --quant int8-wo or int4-awq") -> None:
    """A clear error where `what` would meet e4m3 on a GPU without it (Triton cannot even compile
    e4m3 before compute capability 8.9)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"{what} needs a GPU with FP8 (compute capability >= 8.9, e.g. H100, L4, RTX 4090); "
                             f"{torch.cuda.get_device_name(device)} is {major}.{minor}. {instead}")


def check_fp8_kv_cache_supported(device: torch.device, head_dim: int | None = None) -> None:
    """The GPU must have e4m3, and head_dim must be a power of two: an FP8 cache holds K
    Walsh-Hadamard-rotated over the head (kiln/kernels/rope.py)."""
    check_fp8_supported(device, "kv_cache_dtype 'fp8'", "Use --kv-cache-dtype auto")
    if head_dim is not None and (head_dim < 1 or head_dim & (head_dim - 1)):
        raise ValueError(f"kv_cache_dtype 'fp8' needs a power-of-two head_dim (K is stored Hadamard-rotated); "
                         f"this model's head_dim is {head_dim}. Use --kv-cache-dtype auto")


# -- int8 weight-only --------------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.float().abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    return y + bias if bias is not None else y


# -- int4, group-wise asymmetric -----------------------------------------------------

def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] -> (packed int32 [N, K/8], scales [N, K/group] fp16, mins [N, K/group] fp16)."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 quantization needs K ({k}) to be a multiple of the group size ({group})")
    g = w.float().view(n, k // group, group)
    lo = g.amin(dim=2).to(torch.float16)
    scale = ((g.amax(dim=2) - lo.float()) / 15.0).clamp(min=1e-8).to(torch.float16)
    codes = torch.round((g - lo.float()[..., None]) / scale.float()[..., None]).clamp(0, 15)
    return pack_int4(codes.to(torch.int32).view(n, k), group), scale, lo


def pack_int4(codes: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """Codes [N, K] in 0..15 -> int32 [N, K/8]; nibble j of word i of a group is k = j * group/8 + i."""
    n, k = codes.shape
    c = codes.view(n, k // group, 8, group // 8).transpose(2, 3).to(torch.int32)  # [n, group, word, plane]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=codes.device)
    return (c << shifts).sum(dim=3, dtype=torch.int32).view(n, k // 8)


def unpack_int4(packed: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    n, k8 = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    planes = (packed.view(n, k8 * 8 // group, group // 8, 1) >> shifts) & 0xF  # [n, group, word, plane]
    return planes.transpose(2, 3).reshape(n, k8 * 8)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, dtype: torch.dtype,
                    group: int | None = None) -> torch.Tensor:
    n, k = packed.shape[0], packed.shape[1] * 8
    group = group or k // scales.shape[1]
    codes = unpack_int4(packed, group).float()
    s = scales.float().repeat_interleave(group, dim=1)
    m = mins.float().repeat_interleave(group, dim=1)
    return (codes * s + m).to(dtype)


def int4_linear_ref(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, dequantize_int4(packed, scales, mins, x.dtype), bias)


# -- dispatch ------------------------------------------------------------------------

def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if backend.use_triton(x):
        from kiln.kernels import quant_triton
        y = quant_triton.woq_linear(x, q, scale, None, bits=8)
        return y + bias if bias is not None else y
    return int8_linear_ref(x, q, scale, bias)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    if backend.use_triton(x):
        from kiln.kernels import quant_triton
        y = quant_triton.woq_linear(x, packed, scales, mins, bits=4,
                                    group=packed.shape[1] * 8 // scales.shape[1])
        return y + bias if bias is not None else y
    return int4_linear_ref(x, packed, scales, mins, bias)


def _int4_gemv(x: torch.Tensor):
    """kiln.kernels.int4_gemv_triton where its GEMV takes x (Triton, a few rows); else None."""
    if not backend.use_triton(x):
        return None
    from kiln.kernels import int4_gemv_triton
    return int4_gemv_triton if x.shape[0] <= int4_gemv_triton.INT4_GEMV_MAX_M else None


def int4_swiglu(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                up_offset: int) -> torch.Tensor | None:
    """silu(gate) * up for an int4 [gate | up] weight (up from row `up_offset`) in the GEMV's own
    epilogue, saving the SwiGLU kernel where the GEMV runs; else None."""
    kernels = _int4_gemv(x)
    if kernels is None:
        return None
    return kernels.gemv(x.contiguous(), packed, scales, mins, packed.shape[1] * 8 // scales.shape[1],
                        up_offset=up_offset)


def int4_qkv_rope(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, heads: int,
                  kv_heads: int, head_dim: int, positions: torch.Tensor, cos_sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor | None:
    """q with RoPE applied, k and v in the cache, from an int4 [q | k | v] weight in one GEMV whose
    epilogue does what rope.rope_and_cache does, where that kernel runs and the cache is of the
    model's dtype (an FP8 cache's Hadamard rotation needs whole heads); else None."""
    kernels = _int4_gemv(x)
    if kernels is None or k_cache.dtype == FP8:
        return None
    return kernels.qkv_rope(x.contiguous(), packed, scales, mins, heads, kv_heads, head_dim, positions, cos_sin,
                            k_cache, v_cache, slot_mapping)


# -- the FP8 KV cache ----------------------------------------------------------------

def to_kv_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Values as stored in a KV cache of `cache_dtype` (fp8 stores x / scale)."""
    if cache_dtype == FP8:
        return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x.to(cache_dtype)


def from_kv_cache(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    if x.dtype == FP8:
        return (x.float() * scale).to(dtype)
    return x.to(dtype)
