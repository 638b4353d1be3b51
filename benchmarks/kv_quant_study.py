"""Where the FP8 KV cache's quality loss comes from, and which K/V formats would remove it (CPU).

    python benchmarks/kv_quant_study.py    # writes benchmarks/results/kv-quant-study-smollm2.json

A simulation on the embedded SmolLM2 in fp32 (torch path): each scheme rounds K (after RoPE)
and V to its format and back where the reference writes the cache (kiln.kernels.rope's
write_kv_ref); the cache stays fp32, so schemes differ only in that rounding. Scored as
benchmarks/quant_quality.py scores engines: perplexity on kiln/data/evaluation.txt against
fp32's, mean KL of the next-token distributions from fp32's, and the spread of `--seeds`
readings under 1e-6 embedding noise.

"The kv-fp8 engine" uses what a kv-fp8 build calibrates (each layer's K smoothing factors and
K / V scales) and rounds K as the engine stores it: smoothed, Hadamard-rotated, e4m3 (see
kiln/kernels/rope.py); rotating back gives what the engine's scores see. The other per-layer
e4m3 schemes take each layer's largest |K| or |V| on the calibration text, with the build's
headroom, as their scale; the build searches for a better one, so these read somewhat worse
than an engine would (plain e4m3: KL 0.026 here, 0.023 as the pre-format-4 engine). "Hadamard" schemes round
K in an orthonormal Walsh-Hadamard basis over head_dim and rotate back: what a kernel gets by
rotating q and k alike (scores unchanged).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

def _e4m3(x, scale):
    """x through an FP8 KV cache with `scale` (a float, or per-(token, head) [T, H, 1]) and back."""
    import torch

    from kiln.kernels.quant import FP8, from_kv_cache, to_kv_cache

    return from_kv_cache(to_kv_cache(x, FP8, scale), torch.float32, scale)


def _int8(x, scale):
    return (x / scale).round().clamp(-127, 127) * scale


def _per_token(x, qmax: float):
    """One scale per (token, KV head): x [T, H, D] -> [T, H, 1]."""
    return x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax


def _hadamard(d: int):
    """The orthonormal Walsh-Hadamard matrix of d (symmetric: its own inverse)."""
    from kiln.kernels.rope import hadamard_sign_matrix

    return hadamard_sign_matrix(d) * d ** -0.5


def schemes(engine: list[dict], cal: list[dict]) -> dict:
    """name -> (layer, k, v) -> (k, v) rounded. engine: per layer the kv-fp8 build's k_smooth
    [H, D], k_scale, v_scale; cal: per layer the calibration text's largest |K|, |K H| and |V|."""
    from kiln.kernels.quant import FP8_MAX
    from kiln.workers.quantize import KV_MARGIN

    def per_layer(x, top):
        return _e4m3(x, top * KV_MARGIN / FP8_MAX)

    def engine_k(i, k):
        e = engine[i]
        h = _hadamard(k.shape[-1])
        return (_e4m3((k / e["k_smooth"]) @ h, e["k_scale"]) @ h.T) * e["k_smooth"]

    def engine_v(i, v):
        return _e4m3(v, engine[i]["v_scale"])

    def hadamard_k(i, k):
        h = _hadamard(k.shape[-1])
        return per_layer(k @ h, cal[i]["k_rot"]) @ h.T

    def plain_k(i, k):
        return per_layer(k, cal[i]["k"])

    def token_e4m3(x):
        return _e4m3(x, _per_token(x, FP8_MAX))

    def hadamard_token_e4m3(x):
        h = _hadamard(x.shape[-1])
        return token_e4m3(x @ h) @ h.T

    def token_int8(x):
        return _int8(x, _per_token(x, 127.0))

    return {
        "the kv-fp8 engine: K smoothed + Hadamard, e4m3 per-layer; V e4m3 per-layer":
            lambda i, k, v: (engine_k(i, k), engine_v(i, v)),
        "K Hadamard (no smoothing), e4m3 per-layer; V as the engine":
            lambda i, k, v: (hadamard_k(i, k), engine_v(i, v)),
        "K and V plain e4m3 per-layer (the engine before format 4)":
            lambda i, k, v: (plain_k(i, k), per_layer(v, cal[i]["v"])),
        "K only: plain e4m3 per-layer, V exact": lambda i, k, v: (plain_k(i, k), v),
        "V only: e4m3 per-layer, K exact": lambda i, k, v: (k, engine_v(i, v)),
        "e4m3, per-(token, head) scales": lambda i, k, v: (token_e4m3(k), token_e4m3(v)),
        "e4m3 after a Hadamard rotation, per-(token, head) scales":
            lambda i, k, v: (hadamard_token_e4m3(k), hadamard_token_e4m3(v)),
        "K int8 per-(token, head), V as the engine": lambda i, k, v: (token_int8(k), engine_v(i, v)),
        "int8 per-(token, head), K and V": lambda i, k, v: (token_int8(k), token_int8(v)),
        "K bf16, V as the engine": lambda i, k, v: (k.bfloat16().float(), engine_v(i, v)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5, help="perturbed readings per scheme")
    ap.add_argument("--name", default="kv-quant-study-smollm2")
    args = ap.parse_args()

    import torch

    import kiln.kernels.rope as rope
    from benchmarks.common import write_result
    from benchmarks.quant_quality import build, describe, readings, reference
    from kiln.config import QuantConfig
    from kiln.kernels import backend
    from kiln.workers.calibration import SEQ_LEN, calibration_tokens

    with tempfile.TemporaryDirectory() as tmp:  # what a kv-fp8 build calibrates
        built = build(tmp, QuantConfig(kv_cache_dtype="fp8"))
        engine = [{"k_smooth": a.k_smooth.clone(), "k_scale": a.k_scale, "v_scale": a.v_scale}
                  for a in (layer.self_attn for layer in built.executor.engine.model.layers)]
        del built

    # The schemes round K and V in the torch reference's cache write (write_kv_ref); the native
    # CPU kernels write the cache themselves and would bypass them.
    backend.set_backend("torch")
    base, ids, ref, ppl0 = reference()
    model = base.executor.engine.model

    # The layer whose attention is running, for write_kv_ref (which sees only tensors).
    state = {"layer": 0, "scheme": None}
    for i, layer in enumerate(model.layers):
        layer.self_attn.register_forward_pre_hook(lambda _m, _a, i=i: state.update(layer=i))
    write = rope.write_kv_ref

    def rounded_write(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        if state["scheme"] is not None:
            k, v = state["scheme"](state["layer"], k.float(), v.float())
        write(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    rope.write_kv_ref = rounded_write
    # The calibration text's largest |K|, |K H| and |V| per layer (the build's sequences of SEQ_LEN).
    cal = [{"k": 0.0, "k_rot": 0.0, "v": 0.0} for _ in model.layers]

    def record(i, k, v):
        c, h = cal[i], _hadamard(k.shape[-1])
        c["k"], c["k_rot"] = max(c["k"], float(k.abs().max())), max(c["k_rot"], float((k @ h).abs().max()))
        c["v"] = max(c["v"], float(v.abs().max()))
        return k, v

    state["scheme"] = record
    tokens = calibration_tokens(base.tokenizer, 0, QuantConfig().calibration_tokens, True)
    with torch.inference_mode():
        for j in range(0, len(tokens) - SEQ_LEN + 1, SEQ_LEN):
            base.executor.log_probs(tokens[j:j + SEQ_LEN])
    state["scheme"] = None
    table = schemes(engine, cal)
    figures = {"model": "SmolLM2-135M-Instruct (embedded GGUF), fp32, torch path", "text": "kiln/data/evaluation.txt",
               "tokens": len(ids), "fp32_perplexity": round(ppl0, 4),
               "kv_fp8_build_scales": [[e["k_scale"], e["v_scale"]] for e in engine],
               "calibration_absmax": [{k: round(x, 4) for k, x in c.items()} for c in cal], "schemes": {}}
    try:
        for name, fn in table.items():
            state["scheme"] = fn
            with torch.inference_mode():
                figures["schemes"][name] = readings(base, ids, ref, ppl0, args.seeds)
            print(describe(name, figures["schemes"][name], 58), flush=True)
    finally:
        rope.write_kv_ref = write
    print("wrote", write_result(args.name, figures, targets={"kv_fp8_perplexity": 0.01}))


if __name__ == "__main__":
    main()
