"""Build and run quantized engines on one GPU: build time, load time, speed, memory.

    python benchmarks/builder.py --name builder-h100                 # Llama-3.1-8B shape modes
    python benchmarks/builder.py --name builder-h100-70b --runs 70b-int4-awq
    python benchmarks/builder.py --name builder-h100 --merge a.json b.json  # runs split across calls

Random weights of the Llama-3.1-8B shape, built as a checkpoint would be (dense,
then calibrated and quantized; AWQ searched on random tokens), written to disk
and loaded back. For each run: build seconds (target <= 60 s for 8B, writing and
compiling the engine's kernels included), load seconds until the engine serves, in a
fresh process whose Triton cache starts empty (target <= 15 s), output tok/s
at 128/128 and 2048/128 with 256 requests, and batch-1 decode ms/token against
the weight-bytes floor. The 70B runs draw the quantized shards directly (a
dense 70B does not fit) and record memory and batch-1 ms/token.
Targets: fp8 >= 1.4x bf16 throughput; int4-awq batch-1 decode >= 2.5x faster than bf16.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COPY_TBS = 3.02
RUNS = {
    "none": ("llama-3.1-8b", "none", "auto"),
    "fp8": ("llama-3.1-8b", "fp8", "auto"),
    "int4-awq": ("llama-3.1-8b", "int4-awq", "auto"),
    "int8-wo": ("llama-3.1-8b", "int8-wo", "auto"),
    "kv-fp8": ("llama-3.1-8b", "none", "fp8"),
    "fp8-kv-fp8": ("llama-3.1-8b", "fp8", "fp8"),
    "70b-int4-awq": ("llama-3.1-70b", "int4-awq", "auto"),
    "70b-fp8": ("llama-3.1-70b", "fp8", "auto"),
    "smoke": ("smollm2-135m", "int8-wo", "auto"),  # a CPU check of this script
}


def child(run: str, phase: str, args) -> dict:
    """One phase of a run, in its own process: "build", or "load" (load and measure the built
    engine, in a process whose Triton cache starts empty: a machine that has never run kiln)."""
    import torch

    from benchmarks.throughput import measure
    from kiln.config import EngineConfig, QuantConfig, SchedulerConfig
    from kiln.workers import kernel_cache
    from kiln.workers.builder import Builder

    preset, mode, kv = RUNS[run]
    big = preset.endswith("70b")
    out_dir = os.path.join(args.workdir, run)
    if phase == "build":
        shutil.rmtree(out_dir, ignore_errors=True)
        cfg = EngineConfig(model=preset, random_weights=True, quant=QuantConfig(mode=mode, kv_cache_dtype=kv),
                           scheduler=SchedulerConfig(max_model_len=args.max_model_len, max_num_seqs=256,
                                                     max_num_batched_tokens=8192))
        t = time.perf_counter()
        meta = Builder(cfg, verbose=True, dense_random=not big).build(out_dir)
        build_s = time.perf_counter() - t
        bundle = kernel_cache.bundle_path(out_dir, torch.device("cuda")) if torch.cuda.is_available() else ""
        return {"build_seconds": round(build_s, 1),
                "engine_bytes": sum(os.path.getsize(os.path.join(out_dir, f)) for f in meta["files"].values()),
                "compiled_kernels": len(os.listdir(bundle)) if os.path.isdir(bundle) else 0}
    ns = argparse.Namespace(model=out_dir, tp=1, pp=1, device="auto", max_model_len=args.max_model_len,
                            max_num_seqs=256, max_num_batched_tokens=8192, decode_tokens=129, requests=args.requests,
                            workload=[] if big else args.workload)
    result = measure(ns, random_weights=False)
    result["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    return result


def spawn(run: str, phase: str, args, env: dict | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", run, "--phase", phase, "--requests",
           str(args.requests), "--max-model-len", str(args.max_model_len), "--workdir", args.workdir,
           "--workload", *args.workload]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if not line:
        return {"error": f"{phase}: " + (proc.stderr or proc.stdout)[-3000:]}
    result = json.loads(line[7:])
    if phase == "build":  # the builder's stage lines, each with its time: where the build time goes
        result["build_stages"] = [ln.removeprefix("kiln build: ") for ln in proc.stdout.splitlines()
                                  if ln.startswith("kiln build: ")]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="builder-h100")
    ap.add_argument("--runs", nargs="+", default=["none", "fp8", "int4-awq"])
    ap.add_argument("--workload", nargs="+", default=["128/128", "2048/128"])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--workdir", default="/tmp/kiln-engines")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="join result files of earlier calls (e.g. runs split across device calls) into --name")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phase", default="build", choices=["build", "load"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.phase, args)), flush=True)
        return
    figures, parts = {}, []
    if args.merge:  # one 10-minute device call cannot hold every run: join their result files
        for path in args.merge:
            with open(path) as f:
                rec = json.load(f)
            for run, fig in rec["figures"].items():  # a later file's run replaces an earlier file's
                if not rec.get("parts"):  # a plain run file: its runs come from its commit
                    fig["git_commit"] = rec["git_commit"]
                figures[run] = fig
            # A file that is itself a merge brings its parts, so every figure keeps its provenance.
            parts.extend(rec.get("parts") or [{k: rec[k] for k in ("benchmark", "device", "date", "git_commit",
                                                                     "command", "torch")}])
            if rec["device"] != parts[0]["device"]:
                raise ValueError(f"{path} ran on {rec['device']}, not {parts[0]['device']}")
        used = {f.get("git_commit") for f in figures.values()}  # keep the parts some figure still comes from
        parts = [p for p in parts if p["git_commit"] in used]
    else:
        for run in args.runs:
            figures[run] = spawn(run, "build", args)
            if "error" not in figures[run]:
                with tempfile.TemporaryDirectory(prefix="fresh-triton-cache-") as fresh:
                    figures[run].update(spawn(run, "load", args, env=dict(os.environ, TRITON_CACHE_DIR=fresh)))
            shutil.rmtree(os.path.join(args.workdir, run), ignore_errors=True)
            print(run, json.dumps(figures[run])[:600], flush=True)
            save(args.name, figures, parts)  # after each run, so a call cut short keeps what finished
    compare(figures, args.workload)
    print("wrote", save(args.name, figures, parts))


def save(name: str, figures: dict, parts: list) -> str:
    from benchmarks.common import write_result

    # A merged file is the parts' device and torch, not this machine's.
    extra = {"parts": parts, "device": parts[0]["device"], "torch": parts[0]["torch"]} if parts else {}
    return write_result(name, figures, model="Llama-3.1 shapes, random weights",
                        targets={"build_seconds_8b": 60, "load_seconds": 15, "fp8_throughput_vs_bf16": 1.4,
                                 "int4_batch1_speedup_vs_bf16": 2.5}, **extra)


def compare(figures: dict, workload: list[str]) -> None:
    """Add each run's speed relative to bf16 ("none") and print the table."""
    base = figures.get("none", {})
    print(f"\n{'run':14s} {'build s':>8s} {'load s':>7s} {'b1 ms':>7s} {'floor':>6s} " +
          " ".join(f"{w + ' tok/s':>16s}" for w in workload))
    for run, f in figures.items():
        if "error" in f:
            print(f"{run:14s} error")
            continue
        tps = " ".join(f"{f.get('in{}_out{}'.format(*w.split('/')), {}).get('output_tok_s', 0):16.1f}"
                       for w in workload)
        b1 = f["batch1_decode"]
        print(f"{run:14s} {f['build_seconds']:8.1f} {f['load_seconds']:7.1f} {b1['ms_per_token']:7.2f} "
              f"{b1['floor_ms']:6.2f} {tps}")
        if "error" not in base and run != "none" and "batch1_decode" in base and RUNS[run][0] == RUNS["none"][0]:
            f["batch1_speedup_vs_bf16"] = round(base["batch1_decode"]["ms_per_token"] / b1["ms_per_token"], 2)
            for w in workload:
                key = "in{}_out{}".format(*w.split("/"))
                if key in f and key in base:
                    f[f"throughput_{w.split('/')[0]}_vs_bf16"] = round(
                        f[key]["output_tok_s"] / base[key]["output_tok_s"], 2)

if __name__ == "__main__":
    main()
