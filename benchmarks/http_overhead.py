"""What the HTTP path costs per token: `kiln serve` vs `LLM.generate` on the same engine.

    python benchmarks/http_overhead.py --model llama-3.1-8b --random-weights --name http-overhead-h100
    python benchmarks/http_overhead.py --tiny --device cpu --name http-overhead-cpu-tiny   # CPU smoke run

The same R requests (random token-id prompts of I tokens, O output tokens, EOS
ignored) run twice: once through LLM.generate in-process, once through
`kiln serve` (one replica: Ray Serve, the router, msgpack chunks, incremental
detokenization, SSE) with the OpenAI client streaming. Mean TPOT is
(last token - first token) / (tokens - 1) per request. Target: the HTTP path
adds < 5% to mean TPOT. Both parts also report mean_step_ms, the time in
Executor.step (served: from the replicas' kiln:engine_step_seconds): when the
served one is the larger, the replica's serving work slows its engine; when
they match, the difference lies in delivery.

`--tiny` serves a 2-layer, 64-wide Llama with random weights and a synthetic
tokenizer: its CPU step takes milliseconds, as a large model's GPU step does,
so the per-token cost of the HTTP path shows on a CPU too.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_model(path: str) -> str:
    """A tiny random-weight Llama directory (config.json + synthetic tokenizer) at `path`."""
    from kiln.tokenizer import Tokenizer

    os.makedirs(path, exist_ok=True)
    vocab, eos = 32000, 2
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 4096, "eos_token_id": eos}
    tk = Tokenizer.synthetic(vocab, eos)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    tk.tk.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": tk.chat_template, "eos_token": tk.eos_token}, f)
    return path


def prompts(args) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(100, 30000) for _ in range(args.input_len)] for _ in range(args.requests)]


def engine_tpot(args) -> dict:
    """In-process: every request's first and last token times, from the engine's step loop."""
    import torch

    from kiln import LLM, SamplingParams

    if args.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(1)  # as in the served replica: Ray starts its actors with OMP_NUM_THREADS=1
    llm = LLM(args.model, random_weights=args.random_weights, device=args.device,
              max_model_len=args.max_model_len, kv_cache_bytes=args.kv_cache_bytes)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    llm.generate(prompts(args)[:4], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    step, timed = llm.executor.step, [0, 0.0]

    def timed_step():  # time in Executor.step, as the served replica reports it (kiln:engine_step_seconds)
        t = time.perf_counter()
        out = step()
        timed[0] += 1
        timed[1] += time.perf_counter() - t
        return out

    llm.executor.step = timed_step
    states = [llm._submit(None, p, params) for p in prompts(args)]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    t0 = time.perf_counter()
    while any(not s.finished for s in states):
        for s in llm._step():
            now = time.perf_counter()
            first.setdefault(s.request_id, now)
            last[s.request_id] = now
    wall = time.perf_counter() - t0
    tpots = [(last[s.request_id] - first[s.request_id]) / (args.output_len - 1) for s in states]
    return {"mean_tpot_ms": statistics.mean(tpots) * 1e3, "wall_s": wall,
            "output_tok_s": args.requests * args.output_len / wall, "mean_step_ms": timed[1] / timed[0] * 1e3}


def engine_steps(base: str) -> tuple[float, float]:
    """The served replicas' engine steps and seconds in them, from /metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    found = {"kiln:engine_steps_total": 0.0, "kiln:engine_step_seconds_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in found:
            found[name] += float(line.rsplit(" ", 1)[1])
    return found["kiln:engine_steps_total"], found["kiln:engine_step_seconds_total"]


def http_tpot(args) -> dict:
    import http.client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "kiln.cli", "serve", "--port", str(port), "--device", args.device,
           "--max-model-len", str(args.max_model_len)]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--random-weights"] if args.random_weights else []
    cmd += ["--kv-cache-bytes", str(args.kv_cache_bytes)] if args.kv_cache_bytes else []
    cmd += ["--stream-events-per-s", str(args.stream_events_per_s)] if args.stream_events_per_s is not None else []
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(900):
            if proc.poll() is not None:
                raise RuntimeError("kiln serve exited")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        with urllib.request.urlopen(base + "/v1/models", timeout=30) as r:
            model = json.loads(r.read())["data"][0]["id"]
        tpots, events, lock = [], [], threading.Lock()

        def one(p, record=True) -> None:
            # Plain http.client + SSE parsing: the GPU machines have no openai package.
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
            body = {"model": model, "prompt": p, "max_tokens": args.output_len if record else 4, "temperature": 0,
                    "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            stamps, n = [], 0
            for line in resp:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
            conn.close()
            if record:
                assert n == args.output_len, n
                with lock:
                    tpots.append((stamps[-1] - stamps[0]) / (args.output_len - 1))
                    events.append(len(stamps))

        one(prompts(args)[0], record=False)  # warm up
        time.sleep(1.0)  # the replica's load report (with its step counters) reaches the router
        steps0 = engine_steps(base)
        threads = [threading.Thread(target=one, args=(p,)) for p in prompts(args)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        time.sleep(1.0)
        steps1 = engine_steps(base)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return {"mean_tpot_ms": statistics.mean(tpots) * 1e3, "wall_s": wall,
            "output_tok_s": args.requests * args.output_len / wall,
            "tokens_per_event": args.output_len / statistics.mean(events),
            # the served engine's own step time: against the engine's, what the replica's serving work costs it
            "mean_step_ms": (steps1[1] - steps0[1]) / max(1.0, steps1[0] - steps0[0]) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="http-overhead")
    ap.add_argument("--model", default=None)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--kv-cache-bytes", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="a tiny random-weight model (CPU runs; see above)")
    ap.add_argument("--stream-events-per-s", type=float, default=None, help="kiln serve's (default: its default)")
    ap.add_argument("--part", choices=["engine", "http"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        import tempfile

        args.model = tiny_model(os.path.join(tempfile.gettempdir(), "kiln-http-overhead-tiny"))
        args.random_weights = True
    if args.part:
        print("RESULT " + json.dumps(engine_tpot(args) if args.part == "engine" else http_tpot(args)), flush=True)
        return
    from benchmarks.common import write_result

    figures = {}
    for part in ("engine", "http"):  # separate processes: each gets the whole GPU
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--part", part] + sys.argv[1:],
                             capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{part} failed:\n{out.stderr[-3000:]}")
        figures[part] = json.loads(line[7:])
        print(part, figures[part], flush=True)
    figures["tpot_overhead"] = figures["http"]["mean_tpot_ms"] / figures["engine"]["mean_tpot_ms"] - 1
    print(f"HTTP path adds {figures['tpot_overhead'] * 100:.1f}% to mean TPOT (target < 5%)")
    model = "tiny" if args.tiny else args.model or "SmolLM2-135M-Instruct"
    print("wrote", write_result(args.name, figures, model=model,
                                workload={"requests": args.requests, "input_len": args.input_len,
                                          "output_len": args.output_len,
                                          "stream_events_per_s": args.stream_events_per_s}))


if __name__ == "__main__":
    main()
