"""KV-aware routing vs least-loaded vs round-robin on multi-turn chat traffic with KV caches under pressure.

    python benchmarks/routing.py                                                  # this CPU, SmolLM2
    python benchmarks/routing.py --name routing-h200 --model llama-3.1-8b --random-weights --device cuda \
        --kv-cache-bytes 0 --cpu-threads 0

Workload (what production multi-turn traffic looks like where routing matters):
- A few long system prompts, each shared by many conversations (the part every replica ends up caching).
- Each conversation then carries a long context of its own (a document of --document-tokens in the first
  turn: a RAG context, a pasted file, an earlier session), which only the replica that served it caches.
- Conversations grow turn by turn: each turn resends the system prompt, the whole history (questions and
  the model's answers, which become part of it) and a new question.
- All conversations are open at once, as users are: after an answer comes back its user "thinks" while
  other users' turns run, and its next turn joins the ready set; each free client slot (--concurrency
  requests in flight) takes a ready conversation at random (seeded). Arrivals are not skewed towards any
  replica or policy.
- Each replica's KV cache is given an explicit budget (--kv-cache-bytes, recorded with the result) that
  holds about --cache-fraction of the whole workload's distinct tokens: together the replicas can hold
  every conversation once, but one replica cannot hold all of them, as production caches cannot.
- Each CPU replica runs on --cpu-threads torch threads (1: two replicas on two cores do not contend).

The same requests are replayed against a fresh `kiln serve` for each policy, one after another, and the
whole sequence --repeat times (the CPU may be shared with other work: each pass is kept, figures are their
mean). Reported per policy: the prefix-cache hit rate the replicas measured (cached prompt tokens / prompt tokens),
against `ideal_hit_rate`: one unbounded cache that sees every request in the order they were sent and
keeps every full block of every prompt and of every answer (as the next turn spells it), an upper bound
no real cache reaches; TTFT mean/p50/p99 (streamed, client side), and the mean for first turns (cold
under every policy) and later ones apart; output tokens per second. Each fresh server is warmed up first
with unrelated requests (a GPU server compiles kernels on its first steps).
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


def make_workload(tokenizer, args) -> list[dict]:
    """Per conversation: its system prompt (one of args.systems) and its user turns, the first with its document."""
    rng = random.Random(args.seed)
    hi = min(tokenizer.vocab_size, 30000)

    def text(n: int) -> str:
        return tokenizer.decode([rng.randrange(300, hi) for _ in range(n)])

    systems = [text(args.system_tokens) for _ in range(args.systems)]
    convs = []
    for c in range(args.conversations):
        document = text(args.document_tokens)
        questions = [text(args.question_tokens) for _ in range(args.turns)]
        questions[0] = document + "\n\n" + questions[0]
        convs.append({"system": systems[c % args.systems], "questions": questions})
    return convs


def distinct_tokens(tokenizer, convs, args) -> int:
    """Tokens in the distinct full KV blocks of the whole workload (answers stood in for by random text)."""
    from kiln.scheduler.block_manager import prompt_block_hashes

    rng = random.Random(args.seed + 1)
    hi = min(tokenizer.vocab_size, 30000)
    blocks: set[int] = set()
    for conv in convs:
        messages = [{"role": "system", "content": conv["system"]}]
        for q in conv["questions"]:
            answer = tokenizer.decode([rng.randrange(300, hi) for _ in range(args.max_tokens)])
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
        blocks.update(prompt_block_hashes(tokenizer.encode_chat(messages, add_generation_prompt=False),
                                          args.block_size))
    return len(blocks) * args.block_size


def _metric_sums(base: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name in ("kiln:prefix_cache_hits", "kiln:prefix_cache_queries"):
            out[fam.name] = sum(s.value for s in fam.samples if s.name.endswith("_total"))
    return out


def serve_command(policy: str, port: int, args) -> list[str]:
    cmd = [sys.executable, "-m", "kiln.cli", "serve", "--replicas", str(args.replicas), "--routing", policy,
           "--port", str(port), "--device", args.device, "--max-queued", "1000",
           "--cpu-threads", str(args.cpu_threads), "--block-size", str(args.block_size)]
    if args.model:
        cmd += ["--model", args.model]
    if args.random_weights:
        cmd += ["--random-weights"]
    if args.kv_cache_bytes:
        cmd += ["--kv-cache-bytes", str(args.kv_cache_bytes)]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    return cmd


def warm_up(client, model: str, tokenizer, replicas: int, longest: int) -> None:
    """Requests unrelated to the workload, from short to as long as its longest prompt, several at once
    on every replica, before anything is measured: a fresh GPU server compiles kernels on its first
    steps of each kind, which would land on whichever policy runs first. (The hit rates count from
    after this; its blocks are the first evicted.)"""
    rng = random.Random(12345)
    hi = min(tokenizer.vocab_size, 30000)
    lengths = sorted({min(16, longest), min(512, longest), longest})

    def one(i: int) -> None:
        n = max(1, lengths[i % len(lengths)] - 32)  # (the chat template adds a few tokens)
        text = tokenizer.decode([rng.randrange(300, hi) for _ in range(n)])
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], max_tokens=4,
                                       temperature=0)

    n = len(lengths) * 2 * replicas
    for rnd in range(2):
        with concurrent.futures.ThreadPoolExecutor(4 * replicas) as pool:
            list(pool.map(one, range(rnd * n, (rnd + 1) * n)))


def run_policy(policy: str, convs, args, tokenizer) -> dict:
    import openai

    port = _free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))  # this checkout's kiln
    proc = subprocess.Popen(serve_command(policy, port, args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, cwd=root, start_new_session=True)
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
        warm_up(client, model, tokenizer, args.replicas, args.warm_up_tokens)
        before = _metric_sums(base)
        ttfts, out_tokens = [], [0]
        by_turn: dict[bool, list[float]] = {True: [], False: []}  # TTFTs of first turns, of later ones
        events: list[tuple[str, list[int]]] = []  # ("prompt" | "answer", token ids), in the order they happened
        histories = [[{"role": "system", "content": c["system"]}] for c in convs]
        next_turn = [0] * len(convs)
        ready = list(range(len(convs)))  # conversations whose user is ready to send the next turn
        lock = threading.Condition()
        pick = random.Random(args.seed)
        busy = [0]
        deadline = time.monotonic() + args.time_limit

        def take() -> int | None:
            with lock:
                for _ in range(100_000):  # bounded wait: another slot's turn may bring a conversation back
                    if ready:
                        busy[0] += 1
                        return ready.pop(pick.randrange(len(ready)))
                    if not busy[0] or time.monotonic() > deadline:
                        return None
                    lock.wait(timeout=1.0)
            return None

        def turn(c: int) -> None:
            messages = histories[c]
            messages.append({"role": "user", "content": convs[c]["questions"][next_turn[c]]})
            with lock:
                events.append(("prompt", tokenizer.encode_chat(messages)))
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
            messages.append({"role": "assistant", "content": "".join(text)})
            with lock:
                ttfts.append(first)
                by_turn[next_turn[c] == 0].append(first)
                out_tokens[0] += n
                events.append(("answer", tokenizer.encode_chat(messages, add_generation_prompt=False)))
                next_turn[c] += 1
                busy[0] -= 1
                if next_turn[c] < len(convs[c]["questions"]) and time.monotonic() < deadline:
                    ready.append(c)
                lock.notify_all()

        def client_slot() -> None:
            for _ in range(sum(len(c["questions"]) for c in convs)):
                c = take()
                if c is None:
                    return
                try:
                    turn(c)
                except BaseException:
                    with lock:  # the other slots stop waiting for this conversation
                        busy[0] -= 1
                        lock.notify_all()
                    raise

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            for f in [pool.submit(client_slot) for _ in range(args.concurrency)]:
                f.result()
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
    expected = sum(len(c["questions"]) for c in convs)
    return {"requests": len(ttfts), "complete": len(ttfts) == expected, "hit_rate": hits / max(queries, 1),
            "prompt_tokens": queries, "ideal_hit_rate": ideal_hit_rate(events, args.block_size),
            "ttft_mean_s": statistics.mean(ttfts), "ttft_p50_s": ttfts[len(ttfts) // 2],
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))],
            # The first turn (system prompt + the conversation's own document) is cold under every policy;
            # routing can only help the turns after it.
            "ttft_mean_first_turn_s": statistics.mean(by_turn[True] or [0.0]),
            "ttft_mean_later_turns_s": statistics.mean(by_turn[False] or [0.0]),
            "output_tok_s": out_tokens[0] / wall, "wall_s": wall}


def ideal_hit_rate(events: list[tuple[str, list[int]]], block_size: int) -> float:
    """One unbounded cache, fed the requests in the order they were sent: it keeps every full block of every
    prompt, and of every prompt + answer once the answer is back (as the next turn's prompt spells it)."""
    from kiln.scheduler.block_manager import prompt_block_hashes

    seen: set[int] = set()
    hit = total = 0
    for kind, ids in events:
        hashes = prompt_block_hashes(ids, block_size)
        if kind == "prompt":
            usable = (len(ids) - 1) // block_size  # the last token is always computed
            n = 0
            for h in hashes[:usable]:
                if h not in seen:
                    break
                n += 1
            hit += n * block_size
            total += len(ids)
        seen.update(hashes)
    return hit / max(total, 1)


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
    ap.add_argument("--document-tokens", type=int, default=500)
    ap.add_argument("--conversations", type=int, default=12)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--question-tokens", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=24, help="answer length (the answer joins the history)")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--cache-fraction", type=float, default=0.6,
                    help="each replica's KV budget, as a fraction of the workload's distinct tokens")
    ap.add_argument("--kv-cache-bytes", type=int, default=None,
                    help="each replica's KV budget (default: from --cache-fraction; 0: the server's default)")
    ap.add_argument("--cpu-threads", type=int, default=1, help="torch threads per replica (0: the default)")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--time-limit", type=float, default=900, help="seconds per policy before no new turns start")
    ap.add_argument("--repeat", type=int, default=2, help="passes over the policies (the CPU may be shared)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from kiln.workers.loaders import resolve_model

    source = resolve_model(args.model, args.random_weights)
    tokenizer = source.tokenizer
    convs = make_workload(tokenizer, args)
    workload_tokens = distinct_tokens(tokenizer, convs, args)
    kv_bytes_per_token = source.config.kv_bytes_per_token(4 if args.device == "cpu" else 2)
    if args.kv_cache_bytes is None:
        blocks = int(args.cache_fraction * workload_tokens) // args.block_size
        args.kv_cache_bytes = blocks * args.block_size * kv_bytes_per_token
    # Warm-up prompts as long as the workload's longest, within what a replica's context can hold.
    args.warm_up_tokens = args.system_tokens + args.document_tokens + args.turns * (args.question_tokens +
                                                                                  args.max_tokens)
    for cap in (args.kv_cache_bytes and args.kv_cache_bytes // kv_bytes_per_token, args.max_model_len):
        if cap:
            args.warm_up_tokens = min(args.warm_up_tokens, cap - args.max_tokens - 16)
    print(f"workload: {workload_tokens} distinct tokens; each replica's KV cache: {args.kv_cache_bytes} bytes "
          f"= {args.kv_cache_bytes // kv_bytes_per_token} tokens", flush=True)
    runs = []
    for _ in range(args.repeat):  # each pass runs every policy once, one after another (noise shows across passes)
        runs.append({})
        for policy in args.policies:
            runs[-1][policy] = run_policy(policy, convs, args, tokenizer)
            print(policy, json.dumps(runs[-1][policy]), flush=True)
    # Per policy: the mean of each figure over the passes; every pass is kept under "runs".
    figures: dict = {p: {k: statistics.mean(r[p][k] for r in runs) for k in runs[0][p] if k != "complete"}
                     | {"complete": all(r[p]["complete"] for r in runs)} for p in args.policies}
    if "kv" in figures and "round-robin" in figures:
        for f in [figures] + runs:
            f["kv_vs_ideal_hit_rate"] = f["kv"]["hit_rate"] / f["kv"]["ideal_hit_rate"]
            f["round_robin_over_kv_mean_ttft"] = f["round-robin"]["ttft_mean_s"] / f["kv"]["ttft_mean_s"]
    figures["runs"] = runs
    print(f"\n{'policy':14s} {'hit rate':>9s} {'ideal':>7s} {'TTFT mean':>10s} {'p50':>7s} {'p99':>7s} {'tok/s':>7s}")
    for i, f in enumerate(runs + [figures]):
        print("mean of the passes" if i == len(runs) else f"pass {i + 1}")
        for p in args.policies:
            g = f[p]
            print(f"{p:14s} {g['hit_rate']:9.3f} {g['ideal_hit_rate']:7.3f} {g['ttft_mean_s']:10.3f} "
                  f"{g['ttft_p50_s']:7.3f} {g['ttft_p99_s']:7.3f} {g['output_tok_s']:7.1f}")
    workload = {k: getattr(args, k) for k in (
        "replicas", "systems", "system_tokens", "document_tokens", "conversations", "turns", "question_tokens",
        "max_tokens", "concurrency", "block_size", "cpu_threads", "repeat", "seed")}
    workload.update(distinct_tokens=workload_tokens, kv_cache_bytes_per_replica=args.kv_cache_bytes or None,
                    kv_cache_tokens_per_replica=args.kv_cache_bytes // kv_bytes_per_token or None,
                    ideal="one unbounded cache: every full block of every prompt and answer, in send order")
    print("wrote", write_result(args.name, figures, workload=workload, model=args.model or "SmolLM2-135M-Instruct",
                                targets={"kv_hit_rate_vs_ideal": 0.9, "round_robin_over_kv_mean_ttft": 1.5}))


if __name__ == "__main__":
    main()
