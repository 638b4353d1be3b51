"""KV-aware routing vs least-loaded vs round-robin on a multi-turn, shared-prefix workload.

    python benchmarks/routing.py --name routing-cpu-smollm2                       # this CPU, SmolLM2
    python benchmarks/routing.py --name routing-h200 --model llama-3.1-8b --random-weights --device cuda

Workload: conversations that share a few long system prompts and grow turn by
turn (each turn resends the system prompt, the history so far and a new
question), a bounded number in flight at once. The same requests are replayed
against a fresh `kiln serve` for each policy. Reported per policy: the
prefix-cache hit rate the replicas measured, against the rate one ideal cache
(every earlier prompt's full blocks kept) would get; TTFT p50/p99 (streamed,
client side); output tokens per second.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_result  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_workload(tokenizer, args) -> list[list[dict]]:
    """conversations[c] = list of user questions; all share one of args.systems system prompts."""
    rng = random.Random(args.seed)
    vocab = tokenizer.vocab_size
    systems = [tokenizer.decode([rng.randrange(300, min(vocab, 30000)) for _ in range(args.system_tokens)])
               for _ in range(args.systems)]
    convs = []
    for c in range(args.conversations):
        questions = [tokenizer.decode([rng.randrange(300, min(vocab, 30000)) for _ in range(args.question_tokens)])
                     for _ in range(args.turns)]
        # The first turn brings a document of its own: the part only this conversation's replica can cache.
        document = tokenizer.decode([rng.randrange(300, min(vocab, 30000)) for _ in range(args.document_tokens)])
        questions[0] = document + "\n\n" + questions[0]
        convs.append({"system": systems[c % args.systems], "questions": questions})
    return convs


def _metric_sums(base: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name in ("kiln:prefix_cache_hits", "kiln:prefix_cache_queries"):
            out[fam.name] = sum(s.value for s in fam.samples if s.name.endswith("_total"))
    return out


def run_policy(policy: str, convs, args, tokenizer) -> dict:
    import openai

    port = _free_port()
    cmd = [sys.executable, "-m", "kiln.cli", "serve", "--replicas", str(args.replicas), "--routing", policy,
           "--port", str(port), "--device", args.device, "--max-queued", "1000"]
    if args.model:
        cmd += ["--model", args.model]
    if args.random_weights:
        cmd += ["--random-weights"]
    if args.kv_cache_bytes:
        cmd += ["--kv-cache-bytes", str(args.kv_cache_bytes)]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(900):
            if proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        before = _metric_sums(base)
        ttfts, out_tokens, prompts = [], [0], []
        lock = threading.Lock()

        def conversation(conv) -> None:
            messages = [{"role": "system", "content": conv["system"]}]
            for q in conv["questions"]:
                messages.append({"role": "user", "content": q})
                with lock:
                    prompts.append(tokenizer.encode_chat(messages))
                t = time.perf_counter()
                first, text, n = None, [], 0
                stream = client.chat.completions.create(
                    model=model, messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content is not None and first is None:
                        first = time.perf_counter() - t
                    if chunk.choices:
                        text.append(chunk.choices[0].delta.content or "")
                    if chunk.usage:
                        n = chunk.usage.completion_tokens
                with lock:
                    ttfts.append(first)
                    out_tokens[0] += n
                messages.append({"role": "assistant", "content": "".join(text)})

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(conversation, convs))
        wall = time.perf_counter() - t0
        time.sleep(1.5)  # the last KV reports
        after = _metric_sums(base)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    hits = after["kiln:prefix_cache_hits"] - before.get("kiln:prefix_cache_hits", 0)
    queries = after["kiln:prefix_cache_queries"] - before.get("kiln:prefix_cache_queries", 0)
    ttfts.sort()
    return {"requests": len(ttfts), "hit_rate": hits / max(queries, 1), "prompt_tokens": queries,
            "ideal_hit_rate": ideal_hit_rate(prompts, args.block_size),
            "ttft_mean_s": statistics.mean(ttfts), "ttft_p50_s": ttfts[len(ttfts) // 2],
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))],
            "output_tok_s": out_tokens[0] / wall, "wall_s": wall}


def ideal_hit_rate(prompts: list[list[int]], block_size: int) -> float:
    """One cache that keeps every block it ever saw, fed the prompts in the order they were sent."""
    from kiln.scheduler.block_manager import prompt_block_hashes

    seen: set[int] = set()
    hit = total = 0
    for ids in prompts:
        hashes = prompt_block_hashes(ids, block_size)
        usable = (len(ids) - 1) // block_size  # the last token is always computed
        n = 0
        for h in hashes[:usable]:
            if h not in seen:
                break
            n += 1
        hit += n * block_size
        total += len(ids)
        seen.update(hashes)
    return hit / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="routing-cpu-smollm2")
    ap.add_argument("--model", default=None)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--policies", nargs="+", default=["kv", "least-loaded", "round-robin"])
    ap.add_argument("--systems", type=int, default=2)
    ap.add_argument("--system-tokens", type=int, default=200)
    ap.add_argument("--document-tokens", type=int, default=400)
    ap.add_argument("--conversations", type=int, default=12)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--question-tokens", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-cache-bytes", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from kiln.workers.loaders import resolve_model

    tokenizer = resolve_model(args.model, args.random_weights).tokenizer
    convs = make_workload(tokenizer, args)
    figures = {}
    for policy in args.policies:
        figures[policy] = run_policy(policy, convs, args, tokenizer)
        print(policy, json.dumps(figures[policy]), flush=True)
    kv, rr = figures.get("kv"), figures.get("round-robin")
    if kv and rr:
        figures["kv_vs_ideal_hit_rate"] = kv["hit_rate"] / kv["ideal_hit_rate"]
        figures["round_robin_over_kv_mean_ttft"] = rr["ttft_mean_s"] / kv["ttft_mean_s"]
    print(f"\n{'policy':14s} {'hit rate':>9s} {'ideal':>7s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'tok/s':>8s}")
    for p in args.policies:
        f = figures[p]
        print(f"{p:14s} {f['hit_rate']:9.3f} {f['ideal_hit_rate']:7.3f} {f['ttft_p50_s']:9.3f} "
              f"{f['ttft_p99_s']:9.3f} {f['output_tok_s']:8.1f}")
    print("wrote", write_result(args.name, figures, workload={k: getattr(args, k) for k in (
        "replicas", "systems", "system_tokens", "document_tokens", "conversations", "turns", "question_tokens", "max_tokens",
        "concurrency")}, model=args.model or "SmolLM2-135M-Instruct",
        targets={"kv_hit_rate_vs_ideal": 0.9, "round_robin_over_kv_mean_ttft": 1.5}))


if __name__ == "__main__":
    main()
