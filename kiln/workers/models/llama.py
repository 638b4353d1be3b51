"""The Llama family (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2) in plain torch.

GQA, RoPE, RMSNorm and SwiGLU; the hot operations go through the kernel
dispatchers in `kiln.kernels`. The batch is packed (no padding): tokens of
all sequences in one [T, hidden] tensor, with `AttentionMetadata` saying
which rows belong to which sequence and where their KV lives.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch
import torch.nn as nn

from kiln.config import ModelConfig
from kiln.kernels.activation import silu_and_mul
from kiln.kernels.attention import AttentionMetadata, paged_attention
from kiln.kernels.norm import fused_add_rms_norm, rms_norm
from kiln.kernels.quant import Fp8Activation, int4_qkv_rope
from kiln.kernels.rope import rope_cos_sin, rope_and_cache
from kiln.workers.models.layers import (MergedColumnLinear, ParallelLMHead, RowParallelLinear,
                                        VocabParallelEmbedding, _copy)
from kiln.workers.parallel import ParallelContext, layer_range

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def head_split(num_heads: int, num_kv_heads: int, ctx: ParallelContext) -> tuple[int, int, int, int]:
    """(first KV head, KV heads, first query head, query heads) of this rank.

    KV heads are dealt out as evenly as possible and each rank takes the query
    heads that attend to its KV heads, so uneven counts work (SmolLM2's 3 KV
    heads over 2 ranks: 2 + 1). With fewer KV heads than ranks, each KV head is
    replicated and its query heads are split among the ranks that share it.
    """
    tp, r = ctx.tp_size, ctx.tp_rank
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp:
        lo, hi = r * num_kv_heads // tp, (r + 1) * num_kv_heads // tp
        return lo, hi - lo, lo * group, (hi - lo) * group
    if tp % num_kv_heads or group % (tp // num_kv_heads):
        raise ValueError(f"tensor_parallel_size={tp} cannot split {num_heads} query heads over "
                         f"{num_kv_heads} KV heads evenly")
    share = tp // num_kv_heads
    kv = r // share
    per = group // share
    return kv, 1, kv * group + (r % share) * per, per


def validate_layout(cfg: ModelConfig, tp: int, pp: int) -> None:
    """Raise ValueError now if the model cannot be split tp x pp (before any rank starts)."""
    layer_range(cfg.num_hidden_layers, 0, pp)
    for rank in range(tp):
        ctx = ParallelContext(tp_rank=rank, tp_size=tp)
        head_split(cfg.num_attention_heads, cfg.num_key_value_heads, ctx)
        ctx.shard(cfg.intermediate_size)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype, device: torch.device,
                 quant: str = "none", group: int = 128) -> None:
        super().__init__()
        d = cfg.head_dim
        kv_start, self.num_kv_heads, q_start, self.num_heads = head_split(
            cfg.num_attention_heads, cfg.num_key_value_heads, ctx)
        self.head_dim = d
        self.scale = d ** -0.5
        q_rows, kv_rows = self.num_heads * d, self.num_kv_heads * d
        self.qkv_proj = MergedColumnLinear(
            cfg.hidden_size,
            [("q", q_start * d, q_rows), ("k", kv_start * d, kv_rows), ("v", kv_start * d, kv_rows)],
            cfg.attention_bias, dtype, device, quant, group)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size, ctx, dtype, device,
                                        shard=(q_start * d, q_rows), quant=quant, group=group)
        self.sizes = [q_rows, kv_rows, kv_rows]
        # Scales of K and V in an FP8 KV cache (stored value = x / scale); saved with the engine.
        self.register_buffer("kv_scale", torch.ones(2, dtype=torch.float32, device=device))
        # With an FP8 cache, K's channels are divided (and q's multiplied) by these before the
        # Hadamard rotation (kiln/kernels/rope.py); this rank's KV heads, from kv_start.
        self.kv_start = kv_start
        self.register_buffer("k_smooth", torch.ones(self.num_kv_heads, d, dtype=torch.float32, device=device))
        self.k_scale = self.v_scale = 1.0

    def sync_kv_scales(self) -> None:
        """Cache the scales as Python floats: kernels take them as arguments, and reading a
        GPU tensor on every step would stall the host."""
        self.k_scale, self.v_scale = (float(x) for x in self.kv_scale.tolist())

    def _int4_qkv_rope(self, x, positions, cos_sin, k_cache, v_cache, slots) -> torch.Tensor | None:
        p = self.qkv_proj
        if p.quant != "int4-awq" or p.bias is not None:
            return None
        return int4_qkv_rope(x, p.qweight, p.scales, p.mins, self.num_heads, self.num_kv_heads, self.head_dim,
                             positions, cos_sin, k_cache, v_cache, slots)

    def forward(self, positions: torch.Tensor, x: torch.Tensor | Fp8Activation, cos_sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        T = positions.shape[0]
        k_cache, v_cache = kv_cache
        q = self._int4_qkv_rope(x, positions, cos_sin, k_cache, v_cache, meta.slot_mapping)
        if q is None:
            q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
            q = q.view(T, self.num_heads, self.head_dim)
            k = k.view(T, self.num_kv_heads, self.head_dim)
            v = v.view(T, self.num_kv_heads, self.head_dim)
            rope_and_cache(q, k, v, positions, cos_sin, k_cache, v_cache, meta.slot_mapping, self.k_scale,
                           self.v_scale, self.k_smooth)
        else:  # small-batch int4 decode: the GEMV did RoPE and the cache write (one kernel fewer)
            q = q.view(T, self.num_heads, self.head_dim)
        out = paged_attention(q, k_cache, v_cache, meta, self.scale, self.k_scale, self.v_scale)
        return self.o_proj(out.view(T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype, device: torch.device,
                 quant: str = "none", group: int = 128) -> None:
        super().__init__()
        start, n = ctx.shard(cfg.intermediate_size)
        self.gate_up_proj = MergedColumnLinear(cfg.hidden_size, [("gate", start, n), ("up", start, n)],
                                               False, dtype, device, quant, group)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, ctx, dtype, device,
                                           quant=quant, group=group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.gate_up_proj.swiglu(x)
        if fused is not None:  # small-batch int4 decode: one kernel fewer per layer
            return self.down_proj(fused)
        gate_up = self.gate_up_proj(x)
        return self.down_proj(silu_and_mul(gate_up, self.down_proj.takes_fp8_input(gate_up.shape[0])))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype, device: torch.device,
                 quant: str = "none", group: int = 128) -> None:
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.self_attn = LlamaAttention(cfg, ctx, dtype, device, quant, group)
        self.mlp = LlamaMLP(cfg, ctx, dtype, device, quant, group)
        self.input_layernorm = nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype, device=device),
                                            requires_grad=False)
        self.post_attention_layernorm = nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype, device=device),
                                                     requires_grad=False)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None,
                cos_sin: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        # An fp8 linear that quantizes its input gets it quantized by the norm (one pass, no bf16 copy).
        T = h.shape[0]
        fp8 = self.self_attn.qkv_proj.takes_fp8_input(T)
        if residual is None:
            residual = h
            h = rms_norm(h, self.input_layernorm, self.eps, fp8)
        else:
            h, residual = fused_add_rms_norm(h, residual, self.input_layernorm, self.eps, fp8)
        h = self.self_attn(positions, h, cos_sin, kv_cache, meta)
        h, residual = fused_add_rms_norm(h, residual, self.post_attention_layernorm, self.eps,
                                         self.mlp.gate_up_proj.takes_fp8_input(T))
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """One pipeline stage's share of the model (all of it when pp=1)."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype, device: torch.device,
                 max_positions: int, quant: str = "none", group: int = 128, lm_head_quant: str = "none") -> None:
        """`quant` (and `lm_head_quant` for the LM head) other than none allocates quantized
        weights (to load an engine file or fill with random values); a dense model is quantized
        later (kiln/workers/quantize.py)."""
        super().__init__()
        if cfg.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {cfg.architecture!r}; kiln supports "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        self.cfg, self.ctx = cfg, ctx
        self.start_layer, self.end_layer = layer_range(cfg.num_hidden_layers, ctx.pp_rank, ctx.pp_size)
        self.embed_tokens = (VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx, dtype, device)
                             if ctx.is_first_stage else None)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, ctx, dtype, device, quant, group)
                                    for _ in range(self.start_layer, self.end_layer))
        self.norm = self.lm_head = None
        if ctx.is_last_stage:
            self.norm = nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype, device=device), requires_grad=False)
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ctx, dtype, device, lm_head_quant)
            if self.lm_head_tied():
                self.lm_head.weight = self.embed_tokens.weight
        if device.type == "meta":  # a skeleton whose loader brings the table (arange on meta costs
            # a ~3 s first import of torch's reference ops and sympy)
            table = torch.empty(max_positions, cfg.head_dim, device=device)
        else:
            table = rope_cos_sin(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, device)
        self.register_buffer("cos_sin", table, persistent=False)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                hidden: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """First stage embeds `input_ids`; later stages take (hidden, residual).

        The last stage returns the final-normed hidden states and None.
        """
        if self.embed_tokens is not None:
            hidden = self.embed_tokens(input_ids)
        for layer, kv in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, self.cos_sin, kv, meta)
        if self.norm is not None:
            hidden, _ = fused_add_rms_norm(hidden, residual, self.norm, self.cfg.rms_norm_eps)
            return hidden, None
        return hidden, residual

    def lm_head_tied(self) -> bool:
        """Whether the LM head is the embedding table itself (tied and not stored quantized)."""
        return self.cfg.tie_word_embeddings and self.embed_tokens is not None and self.lm_head is not None \
            and self.lm_head.quant == "none"

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # -- weights -------------------------------------------------------------

    def _targets(self) -> dict[str, Callable[[object], None]]:
        """Checkpoint (HF) name -> loader, for every tensor this stage needs."""
        t: dict[str, Callable[[object], None]] = {}
        if self.embed_tokens is not None:
            t["model.embed_tokens.weight"] = self.embed_tokens.load
        if self.lm_head is not None:
            t["model.norm.weight"] = partial(_copy, self.norm)
            if not self.lm_head_tied():
                # Tied weights on a last stage that has no embedding: read the embedding.
                t["model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"] = \
                    self.lm_head.load
        for i, layer in enumerate(self.layers, start=self.start_layer):
            p = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            for s in "qkv":
                t[p + f"self_attn.{s}_proj.weight"] = partial(attn.qkv_proj.load, s)
                if self.cfg.attention_bias:
                    t[p + f"self_attn.{s}_proj.bias"] = partial(attn.qkv_proj.load, s, is_bias=True)
            t[p + "self_attn.o_proj.weight"] = attn.o_proj.load
            t[p + "mlp.gate_proj.weight"] = partial(mlp.gate_up_proj.load, "gate")
            t[p + "mlp.up_proj.weight"] = partial(mlp.gate_up_proj.load, "up")
            t[p + "mlp.down_proj.weight"] = mlp.down_proj.load
            t[p + "input_layernorm.weight"] = partial(_copy, layer.input_layernorm)
            t[p + "post_attention_layernorm.weight"] = partial(_copy, layer.post_attention_layernorm)
        return t

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, object]]) -> None:
        """Load from (HF name, tensor or lazy slice) pairs; every needed tensor must come."""
        targets = self._targets()
        missing = set(targets)
        for name, tensor in weights:
            load = targets.get(name)
            if load is None:
                continue  # another stage's layer, rotary buffers, ...
            try:
                load(tensor)
            except (ValueError, RuntimeError) as e:
                raise ValueError(f"checkpoint tensor {name}: {e}") from None
            missing.discard(name)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors the model needs, e.g. "
                             f"{', '.join(sorted(missing)[:3])}")

    @torch.no_grad()
    def init_random(self, seed: int) -> None:
        """Random weights of the right shape, for speed work: same cost, meaningless text.

        Quantized weights get random codes with scales that dequantize to about N(0, 0.02^2).
        """
        gen = torch.Generator(device=self.cos_sin.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() == 1 and "bias" not in name:
                p.fill_(1.0)  # norm weights
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for m in self.modules():
            q = getattr(m, "qweight", None)
            if q is None:
                continue
            if m.quant == "fp8":
                q.copy_(torch.randn(q.shape, generator=gen, device=q.device).to(q.dtype))
                m.scales.fill_(0.02)
            elif m.quant == "int8-wo":
                q.copy_(torch.randint(-127, 128, q.shape, generator=gen, device=q.device, dtype=torch.int8))
                m.scales.fill_(0.02 / 73)
            else:
                q.copy_(torch.randint(-2**31, 2**31 - 1, q.shape, generator=gen, device=q.device, dtype=torch.int32))
                m.scales.fill_(0.02 / 4.6)
                m.mins.fill_(-0.02 * 7.5 / 4.6)

    def linears(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.named_modules() if hasattr(m, "quantize_") and n.split(".")[-1] in
                ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")]

    def sync_kv_scales(self) -> None:
        for layer in self.layers:
            layer.self_attn.sync_kv_scales()
