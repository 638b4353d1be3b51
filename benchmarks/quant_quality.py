"""How far each quantized engine's predictions move from the fp32 model's, on the CPU.

    python benchmarks/quant_quality.py    # writes benchmarks/results/quant-quality-smollm2.json

The embedded SmolLM2-135M, built in each mode (kiln/workers/builder.py), scored on
kiln/data/evaluation.txt (never used for calibration): perplexity against fp32's, and the mean
KL divergence of the next-token distributions from fp32's (Executor.log_probs).

A single perplexity reading of W8A8 fp8 is chaotic: per-token e4m3 activations round
differently on any change of summation order, and the flips compound over the layers. So each
mode is also scored `--seeds` more times with its embeddings scaled by (1 + 1e-6 N(0, 1)),
a change far below the model's own rounding: the spread of those readings is the noise of one
reading. fp32 and the weight-only modes do not move; W8A8 does.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = {"int8-wo": {"mode": "int8-wo"}, "int4-awq": {"mode": "int4-awq"}, "fp8": {"mode": "fp8"},
         "kv-fp8": {"kv_cache_dtype": "fp8"}}


def _scores(llm, ids: list[int], ref, noise_seed: int | None) -> tuple[float, float]:
    """(perplexity, mean KL from ref) of the text, the embeddings perturbed by `noise_seed`."""
    import torch

    embed = llm.executor.engine.model.embed_tokens
    gen = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None

    def perturb(_module, _inputs, out):
        return out * (1 + 1e-6 * torch.randn(out.shape, generator=gen).to(out.dtype))

    handle = embed.register_forward_hook(perturb) if gen is not None else None
    try:
        lp = llm.executor.log_probs(ids)
    finally:
        if handle is not None:
            handle.remove()
    nll = -lp.gather(1, torch.tensor(ids[1:])[:, None]).mean()
    kl = float((ref.exp() * (ref - lp)).sum(-1).mean()) if ref is not None else 0.0
    return math.exp(float(nll)), kl


EVAL_TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kiln", "data",
                         "evaluation.txt")


def reference():
    """The embedded model in fp32 on the CPU, the evaluation text's ids, and fp32's log-probs and
    perplexity on it: what every reading is against."""
    from kiln import LLM

    base = LLM(None, device="cpu")
    ids = base.tokenizer.encode(open(EVAL_TEXT).read())
    ref = base.executor.log_probs(ids)
    return base, ids, ref, _scores(base, ids, None, None)[0]


def build(path: str, quant):
    """The embedded model built into `path` with QuantConfig `quant`, loaded on the CPU."""
    from kiln import LLM
    from kiln.config import EngineConfig
    from kiln.workers.builder import Builder
    from kiln.workers.loaders import embedded_model_path, resolve_model

    Builder(EngineConfig(device="cpu", quant=quant), verbose=False).build(path, resolve_model(embedded_model_path()))
    return LLM(path, device="cpu")


def readings(llm, ids: list[int], ref, ppl0: float, seeds: int) -> dict:
    """One reading (perplexity against fp32's, KL) and the spread of `seeds` perturbed ones."""
    import statistics

    ppl, kl = _scores(llm, ids, ref, None)
    runs = [_scores(llm, ids, ref, s) for s in range(seeds)]
    rel = [p / ppl0 - 1 for p, _ in runs]
    return {"perplexity_vs_fp32": round(ppl / ppl0 - 1, 5), "kl": round(kl, 5),
            "perturbed_perplexity_vs_fp32": {"mean": round(statistics.mean(rel), 5),
                                             "std": round(statistics.stdev(rel), 5) if len(rel) > 1 else 0.0,
                                             "min": round(min(rel), 5), "max": round(max(rel), 5)},
            "perturbed_kl_mean": round(statistics.mean(k for _, k in runs), 5)}


def describe(name: str, m: dict, width: int = 16) -> str:
    p = m["perturbed_perplexity_vs_fp32"]
    return (f"{name:{width}s} ppl {m['perplexity_vs_fp32']:+.2%}  KL {m['kl']:.4f}  perturbed: mean {p['mean']:+.2%} "
            f"std {p['std']:.2%} range {p['min']:+.2%}..{p['max']:+.2%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--seeds", type=int, default=10, help="perturbed readings per mode")
    ap.add_argument("--name", default="quant-quality-smollm2")
    ap.add_argument("--kv-smooth-alpha", type=float, nargs="+", default=None,
                    help="build kv-fp8 once per K smoothing alpha (kiln.workers.quantize.KV_SMOOTH_ALPHA) "
                         "and score each")
    args = ap.parse_args()

    from benchmarks.common import write_result
    from kiln.config import QuantConfig
    from kiln.workers import quantize

    base, ids, ref, ppl0 = reference()
    figures = {"model": "SmolLM2-135M-Instruct (embedded GGUF)", "text": "kiln/data/evaluation.txt",
               "tokens": len(ids), "fp32_perplexity": round(ppl0, 4), "modes": {}}
    noisy = [_scores(base, ids, None, s)[0] for s in range(min(args.seeds, 3))]
    figures["fp32_perplexity_perturbed"] = [round(p, 4) for p in noisy]
    runs_of = {"kv-fp8": [(f"kv-fp8 alpha {a}", a) for a in args.kv_smooth_alpha]} if args.kv_smooth_alpha else {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, name, alpha in [(m, *r) for m in args.modes for r in runs_of.get(m, [(m, None)])]:
            if alpha is not None:
                quantize.KV_SMOOTH_ALPHA = alpha
            llm = build(os.path.join(tmp, name), QuantConfig(**MODES[mode]))
            figures["modes"][name] = readings(llm, ids, ref, ppl0, args.seeds)
            print(describe(name, figures["modes"][name]), flush=True)
            del llm
    print("wrote", write_result(args.name, figures, targets={"fp8_and_int8_wo_perplexity": 0.01,
                                                             "int4_awq_perplexity": 0.05}))


if __name__ == "__main__":
    main()
