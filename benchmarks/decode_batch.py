"""Decode step time at small batch sizes, per set of small decode CUDA graphs (GPU).

    python benchmarks/decode_batch.py --quant int4-awq --batches 4 5 6 8 --ladders 1,2,4,8 1,2,4,6,8
    python benchmarks/decode_batch.py --batches 1 2 3 4 5 6 8 --int4-gemv-max-m 6 3 --name decode-batch-h100-int4-gemv-limit

Random weights of a preset shape, drawn directly in the quantized format. For each ladder
(kiln.workers.engine.SMALL_DECODE_GRAPHS: a batch runs in the smallest captured graph that holds
it) and each batch size N: N requests of `--prompt` random tokens decode `--tokens` tokens
together (EOS ignored); ms per step is the time between the first and the last step that
emits a token for all N, over the steps in between. The graph each batch ran in is recorded.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def step_ms(llm, n: int, prompt_len: int, tokens: int, vocab: int) -> float:
    """ms per decode step with n sequences in flight."""
    import torch

    from kiln import SamplingParams

    gen = torch.Generator().manual_seed(n)
    prompts = [torch.randint(100, vocab, (prompt_len,), generator=gen).tolist() for _ in range(n)]
    params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0)
    ex = llm.executor
    for i, p in enumerate(prompts):
        ex.add_request(f"b{n}-{i}", p, params)
    stamps = []
    deadline = time.monotonic() + 300
    while ex.has_unfinished() and time.monotonic() < deadline:
        events, _ = ex.step()
        if len(events) == n:  # a step that decoded every sequence
            stamps.append(time.perf_counter())
    ex.flush()
    if ex.has_unfinished():
        raise RuntimeError(f"batch {n} did not finish in 300 s")
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--quant", default="int4-awq", choices=["none", "fp8", "int8-wo", "int4-awq"])
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 5, 6, 8])
    ap.add_argument("--ladders", nargs="+", default=["1,2,4,8", "1,2,4,6,8"],
                    help="comma-separated small graph sizes, one engine each")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=129)
    ap.add_argument("--name", default=None)
    ap.add_argument("--int4-gemv-max-m", type=int, nargs="+", default=None,
                    help="rows up to which int4 runs its GEMV instead of its GEMM, one run per value "
                         "(default: kiln.kernels.int4_gemv_triton.INT4_GEMV_MAX_M)")
    args = ap.parse_args()

    import torch

    from benchmarks.common import write_result
    from kiln import LLM
    from kiln.kernels import int4_gemv_triton
    from kiln.workers import engine

    limits = args.int4_gemv_max_m or [int4_gemv_triton.INT4_GEMV_MAX_M]
    figures = {"model": args.model, "quant": args.quant, "prompt_tokens": args.prompt, "decode_tokens": args.tokens,
               "ladders": {}}
    for limit, ladder in ((m, lad) for m in limits for lad in args.ladders):
        int4_gemv_triton.INT4_GEMV_MAX_M = limit
        key = ladder if len(limits) == 1 else f"{ladder}, int4 GEMV <= {limit} rows"
        engine.SMALL_DECODE_GRAPHS = tuple(int(x) for x in ladder.split(","))
        llm = LLM(args.model, random_weights=True, quant=args.quant, max_model_len=4096)
        eng = llm.executor.engine
        vocab = llm.executor.source.config.vocab_size
        step_ms(llm, 2, args.prompt, 8, vocab)  # warm up
        rows = {}
        for n in args.batches:
            rows[str(n)] = {"ms_per_step": round(step_ms(llm, n, args.prompt, args.tokens, vocab), 4),
                            "graph": eng._graph_size(n) if eng.graphs else None}
            print(f"{key:30s} batch {n:3d}  graph {rows[str(n)]['graph']}  "
                  f"{rows[str(n)]['ms_per_step']:.3f} ms/step", flush=True)
        figures["ladders"][key] = rows
        llm.shutdown()
        del llm, eng
        torch.cuda.empty_cache()
    name = args.name or f"decode-batch-h100-{args.quant}"
    print("wrote", write_result(name, figures))


if __name__ == "__main__":
    main()
