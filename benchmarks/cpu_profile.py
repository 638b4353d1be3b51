"""Where kiln's CPU time goes on the cpu_throughput workload, and how close its GEMMs run to
what this CPU can do.

    python benchmarks/cpu_profile.py     # writes benchmarks/results/cpu-profile-smollm2.json

1. 32 SmolLM2 requests (prompts of 16-256 tokens, `--tokens` outputs each, greedy) under
   torch.profiler: self CPU time per op, as shares of the total.
2. The model's linear shapes through the oneDNN path kiln's CPU linears take (packed
   weights), at 32 rows (a decode step of this workload) and 2048 rows (a prefill chunk):
   GFLOP/s. The large-M figure is the practical ceiling of this CPU for fp32 GEMM.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def op_shares(tokens: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from kiln import LLM, SamplingParams

    llm = LLM(None, device="cpu")
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 49000) for _ in range(rng.randint(16, 256))] for _ in range(32)]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t
    events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(us for _, us in events)
    top = sorted(events, key=lambda kv: -kv[1])[:12]
    return {"requests": 32, "output_tokens_each": tokens, "wall_seconds_profiled": round(wall, 2),
            "self_cpu_seconds": round(total / 1e6, 2),
            "share_by_op": {k: round(us / total, 4) for k, us in top}}


def gemm_rates() -> dict:
    import torch

    from kiln.workers.loaders import resolve_model

    mc = resolve_model("smollm2-135m", random_weights=True).config
    h, i, d = mc.hidden_size, mc.intermediate_size, mc.head_dim
    shapes = {"qkv": ((mc.num_attention_heads + 2 * mc.num_key_value_heads) * d, h), "o": (h, h),
              "gate_up": (2 * i, h), "down": (h, i), "lm_head": (mc.vocab_size, h)}
    out = {}
    for rows in (32, 2048):
        flops = secs = 0.0
        for n, k in shapes.values():
            w = torch.randn(n, k)
            packed = torch.ops.mkldnn._reorder_linear_weight(w)
            x = torch.randn(rows, k)

            def run():
                return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

            for _ in range(3):
                run()
            reps = max(3, int(2e9 / (2 * rows * n * k)))
            t = time.perf_counter()
            for _ in range(reps):
                run()
            secs += (time.perf_counter() - t) / reps
            flops += 2 * rows * n * k
        out[f"rows_{rows}_gflop_s"] = round(flops / secs / 1e9, 1)
    return out


def main() -> None:
    import torch

    from benchmarks.common import write_result

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--name", default="cpu-profile-smollm2")
    args = ap.parse_args()
    figures = {"threads": torch.get_num_threads(), "ops": op_shares(args.tokens), "linears": gemm_rates()}
    for k, v in figures["ops"]["share_by_op"].items():
        print(f"{v:7.1%}  {k}")
    print(figures["linears"])
    print("wrote", write_result(args.name, figures))


if __name__ == "__main__":
    main()
