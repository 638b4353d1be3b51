"""Tensor-parallel building blocks: each rank holds only its shard.

Weights load through `load(shard_id, tensor)`, where `tensor` is the whole
checkpoint tensor or a lazy safetensors slice: slicing it reads only this
rank's rows, so a rank never materialises the full weight.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.kernels import backend, linear_cpu
from kiln.kernels import quant as quant_kernels
from kiln.workers.parallel import ParallelContext


def _can_pack() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class _Linear(nn.Module):
    """y = x W^T + b, with W dense or quantized (kiln/kernels/quant.py).

    A dense weight is a parameter `weight`; a quantized one is the buffers
    `qweight`, `scales` (and `mins` for int4). On CPU a dense fp32 weight is
    repacked once: into column panels for kiln's native kernel
    (kiln/kernels/linear_cpu.py), or where that does not apply for oneDNN,
    which runs small-batch products 30-45% faster than the plain weight.
    """

    _packed: torch.Tensor | None = None  # oneDNN's layout
    _panels: torch.Tensor | None = None  # linear_cpu's layout
    quant: str = "none"
    group: int = quant_kernels.INT4_GROUP

    def _make_weight(self, n_out: int, n_in: int, dtype: torch.dtype, device: torch.device, quant: str,
                     group: int) -> None:
        self.quant, self.group = quant, group
        if quant == "none":
            self.weight = nn.Parameter(torch.empty(n_out, n_in, dtype=dtype, device=device), requires_grad=False)
            return
        if quant == "int4-awq" and n_in % group:
            raise ValueError(f"int4-awq needs input features ({n_in}) divisible by the group size ({group})")
        shapes = {
            "fp8": {"qweight": ((n_out, n_in), quant_kernels.FP8), "scales": ((n_out,), torch.float32)},
            "int8-wo": {"qweight": ((n_out, n_in), torch.int8), "scales": ((n_out,), torch.float32)},
            "int4-awq": {"qweight": ((n_out, n_in // 8), torch.int32),
                         "scales": ((n_out, n_in // group), torch.float16),
                         "mins": ((n_out, n_in // group), torch.float16)},
        }[quant]
        for name, (shape, dt) in shapes.items():
            self.register_buffer(name, torch.empty(shape, dtype=dt, device=device))

    @torch.no_grad()
    def quantize_(self, mode: str, group: int = quant_kernels.INT4_GROUP) -> None:
        """Replace the dense weight by its quantized form (rows independently)."""
        if mode == "none" or self.quant != "none":
            return
        w = self.weight.data
        del self.weight
        self._packed = self._panels = None
        self.quant, self.group = mode, group
        if mode == "fp8":
            q, sc = quant_kernels.quantize_fp8(w)
            self.register_buffer("qweight", q)
            self.register_buffer("scales", sc)
        elif mode == "int8-wo":
            q, sc = quant_kernels.quantize_int8(w)
            self.register_buffer("qweight", q)
            self.register_buffer("scales", sc)
        else:
            q, sc, z = quant_kernels.quantize_int4(w, group)
            self.register_buffer("qweight", q)
            self.register_buffer("scales", sc)
            self.register_buffer("mins", z)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.quant == "none":
            return self.weight.to(dtype)
        if self.quant in ("fp8", "int8-wo"):
            return (self.qweight.float() * self.scales[:, None]).to(dtype)
        return quant_kernels.dequantize_int4(self.qweight, self.scales, self.mins, dtype, self.group)

    def pack_for_cpu(self) -> None:
        if self.quant != "none" or self.weight.device.type != "cpu" or self.weight.dtype != torch.float32:
            return
        self._panels = linear_cpu.pack(self.weight)
        if self._panels is None and _can_pack():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())

    def takes_fp8_input(self, rows: int) -> bool:
        """Whether this linear runs W8A8 at `rows` rows, so its producer should hand it an
        Fp8Activation (quantized in the same pass) instead of a tensor it would quantize."""
        return self.quant == "fp8" and quant_kernels.fp8_quantizes_input(rows)

    def linear(self, x: torch.Tensor | quant_kernels.Fp8Activation) -> torch.Tensor:
        bias = getattr(self, "bias", None)
        if self.quant == "fp8":
            return quant_kernels.fp8_linear(x, self.qweight, self.scales, bias)
        if self.quant == "int8-wo":
            return quant_kernels.int8_linear(x, self.qweight, self.scales, bias)
        if self.quant == "int4-awq":
            return quant_kernels.int4_linear(x, self.qweight, self.scales, self.mins, bias)
        if self._panels is not None and backend.get_backend() == "auto":
            return linear_cpu.linear(x, self._panels, bias)
        if self._packed is not None and x.shape[0] > 0:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")
        return F.linear(x, self.weight, bias)


def shape_of(t) -> tuple[int, ...]:
    """Shape of a tensor, numpy array or lazy safetensors slice."""
    return tuple(t.get_shape()) if hasattr(t, "get_shape") else tuple(t.shape)


def _copy(dst: torch.Tensor, src) -> None:
    if hasattr(src, "get_shape"):  # a whole lazy safetensors slice
        src = src[:]
    src = src if isinstance(src, torch.Tensor) else torch.as_tensor(src)
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"weight shape {tuple(src.shape)} does not match the model's {tuple(dst.shape)}")
    dst.copy_(src)


class MergedColumnLinear(_Linear):
    """y = x W^T for several fused outputs (q|k|v, gate|up), each split over ranks.

    `parts` lists (shard_id, first checkpoint row for this rank, rows on this rank).
    """

    def __init__(self, in_features: int, parts: list[tuple[str, int, int]], bias: bool,
                 dtype: torch.dtype, device: torch.device, quant: str = "none", group: int = 128) -> None:
        super().__init__()
        self.parts: dict[str, tuple[int, int, int]] = {}
        offset = 0
        for shard_id, start, size in parts:
            self.parts[shard_id] = (offset, start, size)
            offset += size
        self._make_weight(offset, in_features, dtype, device, quant, group)
        self.bias = nn.Parameter(torch.empty(offset, dtype=dtype, device=device), requires_grad=False) if bias else None

    def load(self, shard_id: str, tensor, is_bias: bool = False) -> None:
        offset, start, size = self.parts[shard_id]
        dst = (self.bias if is_bias else self.weight)[offset:offset + size]
        _copy(dst, tensor[start:start + size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up computed by the GEMV itself where a kernel does that (int4, a few rows);
        else None, and the caller runs the product and the activation apart."""
        if self.quant != "int4-awq" or self.bias is not None or set(self.parts) != {"gate", "up"}:
            return None
        return quant_kernels.int4_swiglu(x, self.qweight, self.scales, self.mins, self.parts["up"][0])


class RowParallelLinear(_Linear):
    """Input features split over ranks; partial outputs are summed by all-reduce."""

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext,
                 dtype: torch.dtype, device: torch.device, shard: tuple[int, int] | None = None,
                 quant: str = "none", group: int = 128) -> None:
        super().__init__()
        self.ctx = ctx
        self.start, self.size = shard or ctx.shard(in_features)
        self._make_weight(out_features, self.size, dtype, device, quant, group)

    def load(self, tensor) -> None:
        _copy(self.weight, tensor[:, self.start:self.start + self.size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ctx.all_reduce(self.linear(x))


class VocabParallelEmbedding(_Linear):
    """Embedding rows split over ranks; the vocab is padded to a multiple of tp."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // ctx.tp_size)
        self.start = ctx.tp_rank * self.per_rank
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)

    def load(self, tensor) -> None:
        end = min(self.start + self.per_rank, self.vocab_size)
        rows = shape_of(tensor)[0]
        if rows != self.vocab_size:
            raise ValueError(f"embedding has {rows} rows, the model's vocab_size is {self.vocab_size}")
        _copy(self.weight[:end - self.start], tensor[self.start:end])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0)
        return self.ctx.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Each rank scores its vocab shard; the shards are gathered on every rank. `quant` int8-wo
    allocates int8 rows (to load an engine's); a dense head is quantized with `quantize_`."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext,
                 dtype: torch.dtype, device: torch.device, quant: str = "none") -> None:
        super().__init__(vocab_size, hidden_size, ctx, dtype, device)
        if quant != "none":
            del self.weight
            self._make_weight(self.per_rank, hidden_size, dtype, device, quant, quant_kernels.INT4_GROUP)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.ctx.all_gather_last_dim(self.linear(hidden))
        return logits[:, :self.vocab_size]
