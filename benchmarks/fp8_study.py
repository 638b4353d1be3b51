"""Where fp8 W8A8's quality loss on SmolLM2 comes from, and what does not remove it (CPU).

    python benchmarks/fp8_study.py    # writes benchmarks/results/fp8-study-smollm2.json

A simulation on the embedded SmolLM2 in fp32 (attention and norms on kiln's CPU kernels): every
linear of the decoder layers computes F.linear(a(x), w), where w is the exact weight, its e4m3
rounding (one scale per output row, round to nearest), or the weight an fp8 build produces
(GPTQ, kiln/workers/gptq.py), and a(x) is x exact or rounded per token. "GPTQ weights, e4m3
per-token activations" is the same arithmetic as the fp8 engine's reference
(kiln.kernels.quant.fp8_linear_ref). Scored as benchmarks/quant_quality.py scores engines:
perplexity on kiln/data/evaluation.txt against fp32's, mean KL of the next-token distributions
from fp32's, and the mean of `--seeds` readings under 1e-6 embedding noise (one W8A8 perplexity
reading is chaotic).

The mitigations are each applied to plain rounding (RTN weights, e4m3 activations), so that
they compare with its row:
- outlier channels: the k input channels of each linear with the largest E[x^2] |w_col|^2 on
  the calibration text stay exact (weights and activations), as in LLM.int8();
- residual rotations: the residual stream in another orthonormal basis Q (its principal axes
  on the calibration text, or a random one), as QuaRot / SpinQuant do; the RMSNorm weights
  folded into the readers (q/k/v and gate/up), the writers' rows (o, down) rotated.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TYPES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def e4m3_per_token(x):
    from kiln.kernels.quant import quantize_fp8_per_token

    q, s = quantize_fp8_per_token(x)
    return q.float() * s


def int8_per_token(x):
    s = (x.abs().amax(-1, keepdim=True) / 127.0).clamp(min=1e-12)
    return (x / s).round().clamp(-127, 127) * s


def e4m3_rows(w):
    from kiln.kernels.quant import quantize_fp8

    q, s = quantize_fp8(w)
    return q.float() * s[:, None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5, help="perturbed readings per scheme")
    ap.add_argument("--name", default="fp8-study-smollm2")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from benchmarks.common import write_result
    from benchmarks.quant_quality import build, describe, readings, reference
    from kiln.config import QuantConfig
    from kiln.workers.calibration import SEQ_LEN, calibration_tokens

    with tempfile.TemporaryDirectory() as tmp:  # the weights an fp8 build produces
        built = build(tmp, QuantConfig(mode="fp8"))
        gptq = {n: m.dense_weight(torch.float32).clone() for n, m in built.executor.engine.model.linears()}
        del built

    base, ids, ref, ppl0 = reference()
    model = base.executor.engine.model
    linears = dict(model.linears())
    exact = {n: m.weight.data.clone() for n, m in linears.items()}
    rtn = {n: e4m3_rows(w) for n, w in exact.items()}
    gamma = {}  # the RMSNorm weight in front of each residual reader
    for i, layer in enumerate(model.layers):
        gamma[f"layers.{i}.self_attn.qkv_proj"] = layer.input_layernorm.data.float()
        gamma[f"layers.{i}.mlp.gate_up_proj"] = layer.post_attention_layernorm.data.float()

    # Calibration statistics: E[x^2] per input channel of every linear, and the second moment of
    # the normalized residual stream (x / gamma at the readers).
    sq = {n: 0.0 for n in linears}
    stream = torch.zeros(model.cfg.hidden_size, model.cfg.hidden_size, dtype=torch.float64)

    def recording(n):
        def f(x):
            nonlocal stream
            sq[n] = sq[n] + (x * x).sum(0)
            if n in gamma:
                xs = (x / gamma[n]).double()
                stream += xs.T @ xs
            return F.linear(x, exact[n])
        return f

    for n, m in linears.items():
        m.linear = recording(n)
    tokens = calibration_tokens(base.tokenizer, 0, QuantConfig().calibration_tokens, True)
    with torch.inference_mode():
        for j in range(0, len(tokens) - SEQ_LEN + 1, SEQ_LEN):
            base.executor.log_probs(tokens[j:j + SEQ_LEN])
    pca = torch.linalg.eigh(stream)[1].T.float().contiguous()
    rand = torch.linalg.qr(torch.randn(stream.shape, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))[0].float()

    def plain(weights, act, types=TYPES):
        def install():
            for n, m in linears.items():
                if n.split(".")[-1] not in types:
                    m.linear = lambda x, w=exact[n]: F.linear(x, w)
                elif act is None:
                    m.linear = lambda x, w=weights[n]: F.linear(x, w)
                else:
                    m.linear = lambda x, w=weights[n]: F.linear(act(x), w)
        return install

    def outliers(k):
        def install():
            for n, m in linears.items():
                keep = (sq[n] * exact[n].pow(2).sum(0)).topk(k).indices
                w = rtn[n].clone()
                w[:, keep] = 0
                m.linear = lambda x, w=w, wk=exact[n][:, keep], keep=keep: \
                    F.linear(e4m3_per_token(x), w) + x[:, keep] @ wk.T
        return install

    def rotated(Q):
        def install():
            for n, m in linears.items():
                if n in gamma:  # reader: x = x^ * gamma; in the rotated stream x' = Q x^, w' = w diag(gamma) Q^T
                    w = e4m3_rows(exact[n] * gamma[n] @ Q.T)
                    m.linear = lambda x, w=w, g=gamma[n]: F.linear(e4m3_per_token((x / g) @ Q.T), w)
                else:  # writer: the rotated stream gets Q w x; rotate back for the unrotated rest
                    w = e4m3_rows(Q @ exact[n])
                    m.linear = lambda x, w=w: F.linear(e4m3_per_token(x), w) @ Q
        return install

    table = {
        "exact (check: must read 0)": plain(exact, None),
        "RTN weights, exact activations": plain(rtn, None),
        "GPTQ weights (the fp8 build's), exact activations": plain(gptq, None),
        "exact weights, e4m3 per-token activations": plain(exact, e4m3_per_token),
        **{f"exact weights, e4m3 per-token activations at {t} only": plain(exact, e4m3_per_token, (t,))
           for t in TYPES},
        "exact weights, int8 per-token activations": plain(exact, int8_per_token),
        "GPTQ weights, e4m3 per-token activations (the fp8 engine)": plain(gptq, e4m3_per_token),
        "RTN weights, e4m3 per-token activations": plain(rtn, e4m3_per_token),
        "RTN + e4m3, 16 outlier channels per linear exact": outliers(16),
        "RTN + e4m3, 64 outlier channels per linear exact": outliers(64),
        "RTN + e4m3, residual stream in its principal axes": rotated(pca),
        "RTN + e4m3, residual stream randomly rotated": rotated(rand),
    }
    figures = {"model": "SmolLM2-135M-Instruct (embedded GGUF), fp32, decoder linears as each scheme says", "text": "kiln/data/evaluation.txt",
               "tokens": len(ids), "fp32_perplexity": round(ppl0, 4), "schemes": {}}
    for name, install in table.items():
        install()
        with torch.inference_mode():
            figures["schemes"][name] = readings(base, ids, ref, ppl0, args.seeds)
        print(describe(name, figures["schemes"][name], 64), flush=True)
    print("wrote", write_result(args.name, figures, targets={"fp8_perplexity": 0.01}))


if __name__ == "__main__":
    main()
