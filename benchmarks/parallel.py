"""Tensor / pipeline parallel speed: NCCL all-reduce alone, then whole-engine runs.

    python benchmarks/parallel.py --name parallel-h200      # on nvidia-h200-x2 (or -x4)

1. All-reduce alone: bf16 [tokens, hidden] tensors between 2 GPUs (one process
   each, NCCL), median latency and algorithm bandwidth. A TP decode step does
   2 all-reduces per layer, so 2 x layers x latency(batch) is its all-reduce
   cost, which the report sets against the measured step time.
2. The engine at each layout (tp=1, tp=2, pp=2; with 4 GPUs also the 70B shape
   at tp=4): batch-1 decode ms/token and 128/128 output tok/s (benchmarks/throughput.py).
Targets (issue 4): tp=2 batch-1 speedup >= 1.6x; tp=2 and pp=2 each >= 1.7x tp=1 tok/s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _allreduce_worker(rank: int, world: int, port: int, device: str, hidden: int, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = {}
    for tokens in (1, 64, 256, 8192):
        x = torch.randn(tokens, hidden, device=dev, dtype=dtype)
        for _ in range(10):
            dist.all_reduce(x)
        reps = 200 if tokens <= 256 else 50
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(x)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / reps
        nbytes = x.numel() * x.element_size()
        rows[str(tokens)] = {"us": round(dt * 1e6, 2), "bytes": nbytes, "alg_GBps": round(nbytes / dt / 1e9, 1)}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def allreduce(world: int, device: str, hidden: int) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.spawn(_allreduce_worker, args=(world, 29600 + os.getpid() % 1000, device, hidden, f.name), nprocs=world)
        return json.load(open(f.name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="parallel-h200")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2"])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--workload", default="128/128")
    args = ap.parse_args()

    from benchmarks.common import write_result
    from kiln.workers.loaders.presets import PRESETS

    cfg = PRESETS[args.model]
    figures: dict = {"allreduce_2gpu": allreduce(2, args.device, cfg.hidden_size)}
    out = f"/tmp/kiln-parallel-{os.getpid()}"
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "throughput.py"),
           "--model", args.model, "--kernels", "triton", "--layouts", *args.layouts, "--requests",
           str(args.requests), "--workload", args.workload, "--device", args.device, "--name", out]
    subprocess.run(cmd, check=True)
    runs = json.load(open(out + ".json"))["figures"]
    figures["engine"] = runs
    key = "in{}_out{}".format(*args.workload.split("/"))
    base = runs.get("triton", {})
    summary = {}
    for name, r in runs.items():
        if "error" in r or "error" in base:
            continue
        summary[name] = {
            "batch1_ms_per_token": r["batch1_decode"]["ms_per_token"],
            "batch1_speedup_vs_tp1": round(base["batch1_decode"]["ms_per_token"] / r["batch1_decode"]["ms_per_token"], 2),
            "output_tok_s": r[key]["output_tok_s"],
            "throughput_vs_tp1": round(r[key]["output_tok_s"] / base[key]["output_tok_s"], 2),
        }
        if r.get("tp", 1) > 1:
            ar = figures["allreduce_2gpu"]["1"]["us"]
            summary[name]["allreduce_per_decode_step_ms"] = round(2 * cfg.num_hidden_layers * ar / 1e3, 3)
    figures["summary"] = summary
    print(json.dumps(summary, indent=1))
    print("wrote", write_result(args.name, figures, model=args.model,
                                targets={"tp2_batch1_speedup": 1.6, "tp2_and_pp2_throughput_vs_tp1": 1.7}))


if __name__ == "__main__":
    main()
