"""Whole-engine speed on a GPU with random weights of a real shape.

    python benchmarks/throughput.py --model llama-3.1-8b --name engine-h100

For each --kernels setting (triton: the fused kernels and decode CUDA graphs;
torch: the pure-torch reference path, eager) it measures
  * output tok/s for N requests of I random prompt tokens and O output tokens
    (EOS ignored, all submitted at once), for each --workload I/O;
  * batch-1 decode ms/token: one request, time between its first and last
    output token divided by the tokens in between, against the floor of
    reading every weight once per token (weight bytes / copy bandwidth).
Each setting runs in its own process so it gets the whole GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COPY_TBS = 3.02


def measure(args, random_weights: bool = True) -> dict:
    import torch

    from kiln import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, random_weights=random_weights, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, device=args.device)
    load_s = time.perf_counter() - t0
    cfg = llm.executor.source.config
    vocab = cfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if torch.cuda.is_available() and args.device != "cpu" else (lambda: None)
    local = getattr(llm.executor, "engine", None)  # None when the ranks are Ray actors
    out: dict = {"tp": args.tp, "pp": args.pp, "load_seconds": round(load_s, 1),
                 "cuda_graphs": bool(local.graphs) if local else None}

    # Batch-1 decode.
    prompt = torch.randint(100, vocab, (128,), generator=gen).tolist()
    llm.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)  # warm up
    stamps = []
    # A token on the host is a finished step; no device sync here (it would stall async scheduling).
    for snap in llm.stream(prompt, SamplingParams(max_tokens=args.decode_tokens, ignore_eos=True, temperature=0)):
        stamps.append(time.perf_counter())
    per_tok = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    # Weight bytes per GPU: each of tp ranks reads 1/tp of the weights per token.
    # Bytes of weights each rank reads per token (from the loaded model: quantized sizes count).
    weight_bytes = (sum(t.numel() * t.element_size() for t in local.model.state_dict().values())
                    if local else cfg.num_params() * 2 // args.tp)
    floor_ms = weight_bytes / (COPY_TBS * 1e12) * 1e3
    out["batch1_decode"] = {"ms_per_token": round(per_tok * 1e3, 3), "weight_bytes": weight_bytes,
                            "floor_ms": round(floor_ms, 3), "ratio_to_floor": round(per_tok * 1e3 / floor_ms, 3),
                            "context": 128, "tokens": len(stamps)}

    for wl in args.workload:
        i, o = map(int, wl.split("/"))
        prompts = [torch.randint(100, vocab, (i,), generator=gen).tolist() for _ in range(args.requests)]
        params = SamplingParams(max_tokens=o, ignore_eos=True, temperature=0)
        # Warm up on the workload's own shape (other prompts: no prefix-cache hits later), so no
        # first-use cost (kernel variants, allocator growth) lands in the timed run.
        warm = [torch.randint(100, vocab, (i,), generator=gen).tolist() for _ in range(args.requests)]
        llm.generate(warm, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        sync()
        t = time.perf_counter()
        res = llm.generate(prompts, params, use_tqdm=False)
        sync()
        dt = time.perf_counter() - t
        n_out = sum(len(r.outputs[0].token_ids) for r in res)
        assert n_out == args.requests * o
        out[f"in{i}_out{o}"] = {"requests": args.requests, "seconds": round(dt, 3),
                                "output_tok_s": round(n_out / dt, 1),
                                "total_tok_s": round((n_out + args.requests * i) / dt, 1),
                                "preemptions": llm.executor.stats()["num_preemptions"]}
    llm.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--name", default="engine-h100")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--workload", nargs="+", default=["128/128", "2048/128"])
    ap.add_argument("--kernels", nargs="+", default=["triton", "torch"])
    ap.add_argument("--layouts", nargs="+", default=["1x1"], help="TPxPP layouts to run, e.g. 1x1 2x1 1x2")
    ap.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--decode-tokens", type=int, default=129)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return

    from benchmarks.common import write_result

    figures = {}
    for k, layout in [(k, lay) for lay in args.layouts for k in args.kernels]:
        tp, pp = map(int, layout.split("x"))
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", args.model, "--requests",
               str(args.requests), "--decode-tokens", str(args.decode_tokens), "--max-model-len",
               str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens",
               str(args.max_num_batched_tokens), "--tp", str(tp), "--pp", str(pp), "--device", args.device,
               "--workload", *args.workload]
        env = dict(os.environ, KILN_KERNELS="auto" if k == "triton" else "torch")
        if layout != "1x1":
            k = f"{k}-tp{tp}-pp{pp}"
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            figures[k] = {"error": (proc.stderr or proc.stdout)[-2000:]}
            print(f"[{k}] failed:\n{proc.stderr[-3000:]}", flush=True)
            continue
        figures[k] = json.loads(line[len("RESULT "):])
        figures[k]["wall_seconds"] = round(time.perf_counter() - t, 1)
        print(f"[{k}] {json.dumps(figures[k])}", flush=True)
    print(f"\n{'run':16s} {'b1 ms/tok':>10s} {'x floor':>8s} " + " ".join(f"{w + ' tok/s':>16s}" for w in args.workload))
    for k, f in figures.items():
        if "error" in f:
            print(f"{k:16s} error")
            continue
        b1 = f["batch1_decode"]
        keys = ["in{}_out{}".format(*w.split("/")) for w in args.workload]
        tps = " ".join(f"{f[key]['output_tok_s']:16.1f}" for key in keys)
        print(f"{k:16s} {b1['ms_per_token']:10.2f} {b1['ratio_to_floor']:8.2f} {tps}")
    print("wrote", write_result(args.name, figures, model=args.model, dtype="bfloat16", weights="random",
                                reference={"hf_transformers_static_batch256_128_128_tok_s": 2581,
                                           "hf_transformers_batch1_ms_per_token": 105}))


if __name__ == "__main__":
    main()
