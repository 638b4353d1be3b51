"""Build-time quantization passes over a dense model: calibration, AWQ, FP8-KV scales.

Calibration runs the model on built-in public-domain text (kiln/data) and
records, per linear layer, the mean magnitude of each input channel plus a
sample of input rows, and per attention layer the largest |K| and |V|.

AWQ (activation-aware weight quantization) scales each input channel of a
weight by s = mean|x|^alpha before 4-bit quantization and divides the
preceding operation by s (the RMSNorm weight for q/k/v and gate/up, the up
projection's rows for down), so salient channels keep more precision at no
run-time cost; alpha is searched per layer to minimise the layer's output
error on the calibration rows.
"""
from __future__ import annotations

import os
from collections import defaultdict

import torch

from kiln.kernels import quant as qk
from kiln.kernels.attention import AttentionMetadata

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")
_ROWS_KEPT = 256  # input rows kept per layer for the alpha search


def calibration_text() -> str:
    with open(os.path.join(DATA, "calibration.txt"), encoding="utf-8") as f:
        return f.read()


def calibration_tokens(tokenizer, vocab_size: int, n: int, use_text: bool, seed: int = 0) -> list[int]:
    """Built-in text through the model's tokenizer, or random ids (random weights have no language)."""
    if use_text and tokenizer is not None:
        ids = tokenizer.encode(calibration_text())
        return (ids * (n // max(len(ids), 1) + 1))[:n]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n,), generator=g).tolist()


@torch.no_grad()
def run(model, token_ids: list[int], dtype: torch.dtype, device: torch.device, chunk: int = 512) -> None:
    """Prefill `token_ids` through `model` in chunks, with a scratch KV cache."""
    cfg = model.cfg
    layers = len(model.layers)
    hkv = model.layers[0].self_attn.num_kv_heads if layers else 1
    bs = 16
    n = len(token_ids)
    nblk = -(-n // bs)
    cache = torch.zeros(layers, 2, nblk, bs, hkv, cfg.head_dim, dtype=dtype, device=device)
    caches = [(c[0], c[1]) for c in cache]
    table = torch.arange(nblk, dtype=torch.int32, device=device)[None]
    for start in range(0, n, chunk):
        ids = torch.tensor(token_ids[start:start + chunk], device=device)
        t = ids.shape[0]
        pos = torch.arange(start, start + t, device=device)
        meta = AttentionMetadata(slot_mapping=pos, query_start_loc=torch.tensor([0, t], dtype=torch.int32,
                                                                               device=device),
                                 seq_lens=torch.tensor([start + t], dtype=torch.int32, device=device),
                                 block_tables=table, num_decodes=1 if t == 1 else 0, max_query_len=t,
                                 max_seq_len=start + t)
        model(ids, pos, caches, meta)


class Stats:
    """Per-module input statistics gathered by forward hooks."""

    def __init__(self, model) -> None:
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = defaultdict(int)
        self.rows: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.kv_amax: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._hooks = []
        for name, m in model.linears():
            self._hooks.append(m.register_forward_pre_hook(self._input_hook(name)))
        for i, layer in enumerate(model.layers):
            self._hooks.append(layer.self_attn.qkv_proj.register_forward_hook(self._kv_hook(i, layer.self_attn)))

    def _input_hook(self, name: str):
        def hook(_, args):
            x = args[0].detach().float()
            s = x.abs().sum(dim=0)
            self.abs_sum[name] = self.abs_sum[name] + s if name in self.abs_sum else s
            self.count[name] += x.shape[0]
            if sum(r.shape[0] for r in self.rows[name]) < _ROWS_KEPT:
                self.rows[name].append(x[::max(1, x.shape[0] // 64)][:64])
        return hook

    def _kv_hook(self, i: int, attn):
        def hook(_, __, out):
            q, k, v = out.split(attn.sizes, dim=-1)
            amax = self.kv_amax[i]
            amax[0] = max(amax[0], float(k.abs().max()))
            amax[1] = max(amax[1], float(v.abs().max()))
        return hook

    def mean_abs(self, name: str) -> torch.Tensor:
        return self.abs_sum[name] / max(self.count[name], 1)

    def sample(self, name: str) -> torch.Tensor:
        return torch.cat(self.rows[name])

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _fake_quant(mode: str, w: torch.Tensor, group: int) -> torch.Tensor:
    if mode == "int4-awq":
        return qk.dequantize_int4(*qk.quantize_int4(w, group), torch.float32, group)
    if mode == "fp8":
        q, s = qk.quantize_fp8(w)
        return q.float() * s[:, None]
    q, s = qk.quantize_int8(w)
    return q.float() * s[:, None]


def _search_scale(module, stats: Stats, name: str, mode: str, group: int) -> torch.Tensor:
    """The per-input-channel scale s = mean|x|^alpha (alpha in 0..1) with the least output error.

    For int4 this is AWQ; for fp8, where activations are quantized too, it also moves
    activation outliers into the weights (as SmoothQuant does), and the error counts both.
    """
    w = module.weight.data.float()
    x = stats.sample(name).to(w.device)
    ref = x @ w.T
    mean = stats.mean_abs(name).to(w.device).clamp(min=1e-5)
    best, best_err = torch.ones_like(mean), float("inf")
    for alpha in [i / 10 for i in range(11)]:
        s = mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        xs = x / s[None, :]
        if mode == "fp8":
            q, xsc = qk.quantize_fp8_per_token(xs)
            xs = q.float() * xsc
        err = float(((xs @ _fake_quant(mode, w * s[None, :], group).T - ref) ** 2).mean())
        if err < best_err:
            best, best_err = s, err
    return best


@torch.no_grad()
def apply_awq(model, stats: Stats, mode: str, group: int) -> None:
    """Fold per-channel scales into the weights and the operations before them (weights stay dense)."""
    prefix = {id(m): n for n, m in model.named_modules()}
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        s = _search_scale(attn.qkv_proj, stats, prefix[id(attn.qkv_proj)], mode, group)
        attn.qkv_proj.weight.mul_(s.to(attn.qkv_proj.weight.dtype)[None, :])
        layer.input_layernorm.div_(s.to(layer.input_layernorm.dtype))
        s = _search_scale(mlp.gate_up_proj, stats, prefix[id(mlp.gate_up_proj)], mode, group)
        mlp.gate_up_proj.weight.mul_(s.to(mlp.gate_up_proj.weight.dtype)[None, :])
        layer.post_attention_layernorm.div_(s.to(layer.post_attention_layernorm.dtype))
        # down's input is silu(gate) * up: scaling an up row scales that input channel.
        s = _search_scale(mlp.down_proj, stats, prefix[id(mlp.down_proj)], mode, group)
        mlp.down_proj.weight.mul_(s.to(mlp.down_proj.weight.dtype)[None, :])
        off, _, size = mlp.gate_up_proj.parts["up"]
        mlp.gate_up_proj.weight[off:off + size].div_(s.to(mlp.gate_up_proj.weight.dtype)[:, None])


def pick_group(model, requested: int) -> int:
    """The largest group size (<= requested) that divides every quantized layer's input width."""
    widths = [m.weight.shape[1] if m.quant == "none" else m.qweight.shape[1] * 8 for _, m in model.linears()]
    for g in (requested, 64, 32):
        if g <= requested and all(k % g == 0 for k in widths):
            return g
    raise ValueError(f"no int4 group size divides the layer widths {sorted(set(widths))}")


def set_kv_scales(model, stats: Stats, margin: float = 1.25) -> None:
    """FP8-KV scales: the largest |K| and |V| seen (with a margin) map to e4m3's maximum."""
    for i, layer in enumerate(model.layers):
        k, v = stats.kv_amax[i]
        layer.self_attn.kv_scale.copy_(torch.tensor([max(k, 1e-6) * margin / qk.FP8_MAX,
                                                     max(v, 1e-6) * margin / qk.FP8_MAX]))
    model.sync_kv_scales()


@torch.no_grad()
def quantize_model(model, mode: str, kv_fp8: bool, group: int, tokens: list[int], dtype: torch.dtype,
                   device: torch.device) -> int:
    """Quantize a loaded dense model in place (calibrating first where the mode needs it).

    Returns the int4 group size used (smaller than asked when the layer widths need it)."""
    if mode == "fp8":
        qk.check_fp8_supported(device)
    if mode == "int4-awq":
        group = pick_group(model, group)
    stats = None
    scaled = mode in ("int4-awq", "fp8")
    if scaled or kv_fp8:
        stats = Stats(model)
        try:
            run(model, tokens, dtype, device)
        finally:
            stats.remove()
    if scaled:
        apply_awq(model, stats, mode, group)
    if kv_fp8:
        set_kv_scales(model, stats)
    for _, m in model.linears():
        m.quantize_(mode, group)
    return group
