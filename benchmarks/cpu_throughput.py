"""kiln vs HF transformers `generate`: 32 concurrent SmolLM2 requests on this CPU.

Workload: 32 requests with prompts of 16-256 tokens and outputs of 16-256
tokens (a mix, as real traffic has), greedy, EOS ignored so both systems make
exactly the tokens asked for. HF runs them as one left-padded static batch
(its fastest mode): it must keep going until the longest output is done, so
it is credited only with the tokens each request asked for. A second
workload gives every request the same output length, to compare the engines
with no scheduling advantage. With --repeats N the two alternate N times (a
shared machine's speed drifts by tens of percent over minutes); the figures
are the medians, and the speedup's spread over the pairs is recorded.

    python benchmarks/cpu_throughput.py --repeats 2
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import write_result  # noqa: E402


def workload(n: int, seed: int, fixed_out: int | None, vocab: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(16, 256))] for _ in range(n)]
    outs = [fixed_out or rng.randint(16, 256) for _ in range(n)]
    return prompts, outs


def run_kiln(llm, prompts, outs) -> float:
    from kiln import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in outs]
    t = time.perf_counter()
    res = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    assert [len(r.outputs[0].token_ids) for r in res] == outs
    return dt


def run_hf(model, prompts, outs, pad_id: int) -> float:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    new = max(outs)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=pad_id)
    dt = time.perf_counter() - t
    assert out.shape[1] == width + new
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="kiln / HF pairs per workload")
    args = ap.parse_args()

    from kiln import LLM
    from kiln.workers.loaders import embedded_model_path

    llm = LLM(device="cpu")
    vocab = llm.executor.vocab_size
    path = embedded_model_path()
    hf = None
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=torch.float32).eval()
    figures = {}
    for name, fixed in (("mixed_outputs", None), ("equal_outputs_128", 128)):
        prompts, outs = workload(args.requests, args.seed, fixed, vocab)
        tokens = sum(outs)
        warm, _ = workload(4, args.seed + 1, 8, vocab)  # other prompts: no prefix-cache head start
        run_kiln(llm, warm, [8] * 4)
        ks, hs = [], []
        for i in range(args.repeats):
            # Each pair's prompts differ in their first token: no prefix-cache hits on a repeat.
            run = [[100 + (p[0] - 100 + i) % (vocab - 100)] + p[1:] for p in prompts]
            ks.append(run_kiln(llm, run, outs))
            if hf is not None:
                hs.append(run_hf(hf, run, outs, pad_id=2))
        k = statistics.median(ks)
        row = {"requests": args.requests, "output_tokens": tokens, "prompt_tokens": sum(map(len, prompts)),
               "kiln_seconds": round(k, 2), "kiln_output_tok_s": round(tokens / k, 1)}
        if hf is not None:
            h = statistics.median(hs)
            row.update(hf_seconds=round(h, 2), hf_output_tok_s=round(tokens / h, 1), speedup=round(h / k, 2))
        if args.repeats > 1:
            row.update(kiln_seconds_each=[round(x, 2) for x in ks], hf_seconds_each=[round(x, 2) for x in hs],
                       speedup_each_pair=[round(h_ / k_, 2) for k_, h_ in zip(ks, hs)])
        figures[name] = row
        print(name, row, flush=True)
    import transformers

    path = write_result("cpu-throughput-smollm2", figures, model="SmolLM2-135M-Instruct (GGUF Q4_1, fp32)",
                        transformers=transformers.__version__, target="kiln >= 3x HF on mixed_outputs")
    print("wrote", path)


if __name__ == "__main__":
    main()
