"""Build-time quantization of a dense model: GPTQ, AWQ, FP8-KV scales.

Calibration text runs through the model one decoder layer at a time
(calibration.LayerRunner): each layer is quantized from what its inputs look
like, and the next layer is then calibrated on what the quantized layer
produces, so later layers make up for earlier ones' rounding (GPTQ's
sequential scheme). Only one layer's statistics exist at a time.

- fp8: GPTQ (gptq.py) rounds each weight onto the kernels' grid (e4m3
  codes, one scale per output row) while spreading the rounding error over
  the inputs not yet rounded. int8-wo rounds to nearest: int8 is already
  within 1% of fp32 on SmolLM2 (+0.8%), and GPTQ's column loop made its CPU
  build minutes long. No SmoothQuant-style smoothing for
  fp8: a float's rounding error is relative, so moving magnitude between an
  input channel and its weights leaves the expected error of x * w as it is;
  measured on SmolLM2 it made the result worse (KL to fp32 +15%).
- int4-awq: AWQ (activation-aware weight quantization) scales each input
  channel of a weight by s = mean|x|^alpha before 4-bit quantization and
  divides the preceding operation by s (the RMSNorm weight for q/k/v and
  gate/up, the up projection's rows for down), so salient channels keep more
  precision at no run-time cost; alpha is searched per layer to minimise the
  layer's output error on calibration rows.
- FP8 KV cache: one scale for K and one for V per layer (the attention
  kernels take two floats). e4m3's rounding error is relative too, so the
  scale mostly decides where values fall between grid points -- and that
  matters for the attention sink: the key of the token at position 0 is
  nearly the same whatever the token, every query attends to it heavily, and
  its rounding alone cost SmolLM2 ~2% perplexity. Each layer's scales are
  searched over one octave above the calibration maximum (with headroom) for
  the least error in the attention output.
"""
from __future__ import annotations

import torch

from kiln.kernels import quant as qk
from kiln.kernels.rope import fp8_kv_transform_ref
from kiln.workers.calibration import AttentionCapture, InputStats, LayerRunner, calibration_tokens  # noqa: F401
from kiln.workers.gptq import gptq_quantize

GPTQ_MODES = ("fp8",)
KV_MARGIN = 1.25  # headroom over the largest |K| / |V| seen in calibration, for other text
KV_STEPS = 16  # scales tried per layer for K and for V: 2^(i/16) over one octave
KV_QUERIES = 64  # queries per calibration sequence that score a KV scale
# K's FP8 smoothing: channel c of K divided (of q multiplied) by max|K_c| ** alpha before the
# Hadamard rotation. On SmolLM2 (benchmarks/quant_quality.py --kv-smooth-alpha) KL from fp32 goes
# 0.0157 (alpha 0, rotation alone) -> 0.011 for any alpha in 0.25..0.75; perplexity readings are
# too noisy to rank those alphas, and 0.25 changes q's range least.
KV_SMOOTH_ALPHA = 0.25


def _search_scale(w: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, group: int) -> torch.Tensor:
    """The per-input-channel scale s = mean|x|^alpha (alpha in 0..1) with the least int4 output error."""
    w = w.float()
    x = x.to(w.device)
    ref = x @ w.T
    mean = mean.to(w.device).clamp(min=1e-5)
    best, best_err = torch.ones_like(mean), float("inf")
    for alpha in [i / 10 for i in range(11)]:
        s = mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        wq = qk.dequantize_int4(*qk.quantize_int4(w * s[None, :], group), torch.float32, group)
        err = float((((x / s[None, :]) @ wq.T - ref) ** 2).mean())
        if err < best_err:
            best, best_err = s, err
    return best


@torch.no_grad()
def apply_awq(layer, stats: InputStats, group: int) -> None:
    """Fold searched per-channel scales into the layer's weights and the operations before them."""
    attn, mlp = layer.self_attn, layer.mlp

    def scale_for(name: str, m) -> torch.Tensor:
        return _search_scale(m.weight.data, stats.sample(name), stats.mean_abs(name), group)

    s = scale_for("qkv_proj", attn.qkv_proj)
    attn.qkv_proj.weight.mul_(s.to(attn.qkv_proj.weight.dtype)[None, :])
    layer.input_layernorm.div_(s.to(layer.input_layernorm.dtype))
    s = scale_for("gate_up_proj", mlp.gate_up_proj)
    mlp.gate_up_proj.weight.mul_(s.to(mlp.gate_up_proj.weight.dtype)[None, :])
    layer.post_attention_layernorm.div_(s.to(layer.post_attention_layernorm.dtype))
    # down's input is silu(gate) * up: scaling an up row scales that input channel.
    s = scale_for("down_proj", mlp.down_proj)
    mlp.down_proj.weight.mul_(s.to(mlp.down_proj.weight.dtype)[None, :])
    off, _, size = mlp.gate_up_proj.parts["up"]
    mlp.gate_up_proj.weight[off:off + size].div_(s.to(mlp.gate_up_proj.weight.dtype)[:, None])


def input_widths(model) -> list[int]:
    return [m.weight.shape[1] if m.quant == "none" else m.qweight.shape[1] * 8 for _, m in model.linears()]


def pick_group(widths: list[int], requested: int) -> int:
    """The largest group size (<= requested) that divides every quantized layer's input width."""
    for g in (requested, 64, 32):
        if g <= requested and all(k % g == 0 for k in widths):
            return g
    raise ValueError(f"no int4 group size divides the layer widths {sorted(set(widths))}")


@torch.no_grad()
def quantize_layer(layer, runner: LayerRunner, mode: str, group: int) -> None:
    """Calibrate and quantize one decoder layer's linears on the runner's current inputs."""
    attn, mlp = layer.self_attn, layer.mlp
    linears = {"qkv_proj": attn.qkv_proj, "o_proj": attn.o_proj, "gate_up_proj": mlp.gate_up_proj,
               "down_proj": mlp.down_proj}
    stats = InputStats(linears, hessian=mode in GPTQ_MODES, rows=mode == "int4-awq")
    try:
        runner.run(layer)
    finally:
        stats.remove()
    if mode == "int4-awq":
        apply_awq(layer, stats, group)
    for name, m in linears.items():
        if mode in GPTQ_MODES:
            codes, scale = gptq_quantize(m.weight.data, stats.H[name], mode)
            m.quantize_(mode, group)
            m.qweight.copy_(codes)
            m.scales.copy_(scale)
        else:
            m.quantize_(mode, group)


def _fp8_round(x: torch.Tensor, scale: float) -> torch.Tensor:
    return qk.from_kv_cache(qk.to_kv_cache(x, qk.FP8, scale), x.dtype, scale)


@torch.no_grad()
def set_kv_scales(attn, capture: AttentionCapture) -> None:
    """Choose the layer's FP8 KV transform and scales. K's smoothing factors (rope.py): each
    channel's largest |K| to the power KV_SMOOTH_ALPHA (QServe's SmoothAttention), a mean of 1
    per head. Then the K and V scales: the least error in the attention output on some calibration
    queries, each head's error weighted by its share of o_proj, over one octave of scales above
    the largest |K| / |V| seen (with headroom)."""
    q, k, v = capture.q, capture.k, capture.v  # [B, Hq, L, d], [B, Hkv, L, d]
    smooth = k.abs().amax(dim=(0, 2)).clamp(min=1e-4) ** KV_SMOOTH_ALPHA
    attn.k_smooth.copy_(smooth / smooth.mean(dim=-1, keepdim=True))
    # q and k as rope_and_cache leaves them for an FP8 cache (scores unchanged).
    q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()  # [B, L, H, d]
    fp8_kv_transform_ref(q.view(-1, *q.shape[2:]), k.view(-1, *k.shape[2:]), attn.k_smooth.float())
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    B, Hq, L, d = q.shape
    hkv = k.shape[1]
    qpos = torch.arange(0, L, max(1, L // KV_QUERIES), device=q.device)
    # Each KV head's query heads side by side: [B, Hkv, group * queries, d] (no K/V copies for GQA).
    q = q[:, :, qpos].reshape(B, hkv, -1, d)
    hidden_pos = torch.arange(L, device=q.device)
    mask = (hidden_pos[None, :] > qpos[:, None]).repeat(Hq // hkv, 1)  # True: a future key
    w_o = attn.o_proj.dense_weight(torch.float32)
    head_weight = w_o.view(w_o.shape[0], Hq, d).pow(2).sum(dim=(0, 2)) / d  # per query head
    head_weight = head_weight.view(hkv, -1, 1).expand(-1, -1, qpos.numel()).reshape(1, hkv, -1, 1)

    def probs(keys: torch.Tensor) -> torch.Tensor:
        return torch.softmax((q @ keys.transpose(-1, -2) * attn.scale).masked_fill(mask, float("-inf")), dim=-1)

    def error(out: torch.Tensor) -> float:
        return float(((out - ref).pow(2) * head_weight).sum())

    p = probs(k)
    ref = p @ v
    chosen = []
    for x, err in ((k, lambda s: error(probs(_fp8_round(k, s)) @ v)), (v, lambda s: error(p @ _fp8_round(v, s)))):
        base = max(float(x.abs().max()), 1e-6) * KV_MARGIN / qk.FP8_MAX
        chosen.append(min((base * 2 ** (i / KV_STEPS) for i in range(KV_STEPS)), key=err))
    attn.kv_scale.copy_(torch.tensor(chosen))


@torch.no_grad()
def quantize_model(model, mode: str, kv_fp8: bool, group: int, tokens: list[int], dtype: torch.dtype,
                   device: torch.device, lm_head: str = "none") -> int:
    """Quantize a loaded dense model in place, calibrating on `tokens` layer by layer; the LM
    head (rounded to nearest, per row) as `lm_head` says.

    Returns the int4 group size used (smaller than asked when the layer widths need it)."""
    if mode == "fp8":
        qk.check_fp8_supported(device)
    if kv_fp8:
        qk.check_fp8_kv_cache_supported(device, model.cfg.head_dim)
    if mode == "int4-awq":
        group = pick_group(input_widths(model), group)
    if lm_head != "none" and model.lm_head is not None:
        model.lm_head.quantize_(lm_head)
    if mode == "none" and not kv_fp8:
        return group
    runner = LayerRunner(model, tokens, dtype, device)
    for layer in model.layers:
        if mode != "none":
            quantize_layer(layer, runner, mode, group)
        capture = AttentionCapture(layer.self_attn, runner) if kv_fp8 else None
        runner.advance(layer)  # the next layer calibrates on what this quantized one produces
        if capture is not None:
            set_kv_scales(layer.self_attn, capture)
    model.sync_kv_scales()
    return group
