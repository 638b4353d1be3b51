"""Where a decode step's GPU time goes, kernel by kernel (CUDA graphs included).

    python benchmarks/decode_profile.py --quant int4-awq   # writes benchmarks/results/decode-profile-h100-int4-awq.json
    KILN_PDL=0 python benchmarks/decode_profile.py --quant fp8 --batch 256   # ...-fp8-b256.json

Random weights of a preset shape, drawn directly in the quantized format (no
build), `--batch` sequences (default 1) with 128-token prompts; `--tokens`
decode steps run under torch.profiler after a warm-up generation (the
prompts' prefill is in the profile too, about one step's worth at batch 1).
With programmatic dependent launch (KILN_PDL, on by default on Hopper) a
kernel starts before its predecessor ends and its time includes that wait:
profile with KILN_PDL=0 to attribute time to kernels. Per kernel name: launches per
step and GPU ms per step; plus the sum over kernels against the wall time per
step (the difference is launch gaps and host work the GPU waits for).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.common import write_result
    from kiln import LLM, SamplingParams

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--quant", default="none", choices=["none", "fp8", "int8-wo", "int4-awq"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    llm = LLM(args.model, random_weights=True, quant=args.quant, max_model_len=args.max_model_len,
              max_num_seqs=256)
    params = SamplingParams(temperature=0, max_tokens=args.tokens + 1, ignore_eos=True)
    prompt = [[1] + [100 + (i * 7 + b * 131) % 30000 for i in range(127)] for b in range(args.batch)]
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    llm.generate(prompt, params, use_tqdm=False)
    sync()
    t = time.perf_counter()
    llm.generate(prompt, params, use_tqdm=False)
    sync()
    wall_ms = (time.perf_counter() - t) * 1e3 / args.tokens  # the prefill is ~one step more
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        llm.generate(prompt, params, use_tqdm=False)
        sync()
    steps = args.tokens + 1
    kernels = {}
    for e in prof.key_averages():
        us = e.device_time_total if cuda else e.self_cpu_time_total  # CPU: a smoke test of this script
        if us > 0:
            kernels[e.key[:120]] = {"per_step": round(e.count / steps, 2), "ms_per_step": round(us / 1e3 / steps, 4)}
    kernels = dict(sorted(kernels.items(), key=lambda kv: -kv[1]["ms_per_step"]))
    gpu_ms = sum(k["ms_per_step"] for k in kernels.values())
    figures = {"quant": args.quant, "model": args.model, "batch": args.batch, "tokens": args.tokens,
               "pdl": os.environ.get("KILN_PDL", "1") != "0", "wall_ms_per_step": round(wall_ms, 3),
               "kernel_ms_per_step": round(gpu_ms, 3),
               "launches_per_step": round(sum(k["per_step"] for k in kernels.values()), 1), "kernels": kernels}
    print(f"wall {wall_ms:.3f} ms/step, kernels {gpu_ms:.3f} ms/step, {figures['launches_per_step']} launches")
    for name, k in list(kernels.items())[:25]:
        print(f"{k['ms_per_step']:8.4f} ms {k['per_step']:6.1f}x  {name[:90]}")
    name = args.name or f"decode-profile-h100-{args.quant}" + (f"-b{args.batch}" if args.batch > 1 else "")
    print("wrote", write_result(name, figures))


if __name__ == "__main__":
    main()
