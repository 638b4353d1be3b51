"""The Python entry point: `LLM`, shaped like vLLM's and TensorRT-LLM's.

    from kiln import LLM, SamplingParams
    llm = LLM()                                   # embedded SmolLM2-135M-Instruct
    out = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(out[0].outputs[0].text)
"""
from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Iterator

from kiln.config import CacheConfig, EngineConfig, ParallelConfig, QuantConfig, SamplingParams, SchedulerConfig
from kiln.outputs import CompletionOutput, Logprob, RequestOutput, RequestState
from kiln.tokenizer import Tokenizer
from kiln.workers.executor import Executor
from kiln.workers.loaders import ModelSource, resolve_model

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]

Prompt = str | list[int]


class LLM:
    def __init__(
        self,
        model: str | ModelSource | None = None,
        *,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        random_weights: bool = False,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        block_size: int = 16,
        gpu_memory_utilization: float = 0.90,
        kv_cache_bytes: int | None = None,
        num_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        device: str = "auto",
        cpu_threads: int = 0,
        seed: int = 0,
        collective_timeout_s: float = 120.0,
        quant: str = "none",
        kv_cache_dtype: str = "auto",
        async_scheduling: bool | None = None,
    ) -> None:
        """`model`: None (the embedded SmolLM2), a GGUF file, an HF directory, an engine directory
        from `kiln build`, or a preset name with random_weights=True. A checkpoint path is built
        into an engine (quantized as asked) in ~/.cache/kiln/engines on first use and loaded from
        there after; set KILN_ENGINE_CACHE=off to load checkpoints directly."""
        # A ModelSource (from kiln.workers.loaders.resolve_model) lets engines share one parsed checkpoint.
        source = model if isinstance(model, ModelSource) else None
        self.config = EngineConfig(
            model=source.path if source else model, random_weights=random_weights, dtype=dtype, device=device, seed=seed,
            enforce_eager=enforce_eager, cpu_threads=cpu_threads,
            cache=CacheConfig(block_size=block_size, gpu_memory_utilization=gpu_memory_utilization,
                              kv_cache_bytes=kv_cache_bytes, num_blocks=num_blocks,
                              enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      max_model_len=max_model_len or 0, async_scheduling=async_scheduling),
            parallel=ParallelConfig(tensor_parallel_size, pipeline_parallel_size,
                                    collective_timeout_s=collective_timeout_s),
            quant=QuantConfig(mode=quant, kv_cache_dtype=kv_cache_dtype))
        if source is None and not random_weights:
            source = self._engine_source(model)
        if self.config.parallel.world_size > 1:
            # One Ray actor per rank; this process keeps the tokenizer and drives them.
            from kiln.workers.worker import RayExecutor

            if source is None:
                source = resolve_model(model, random_weights)
            self.executor = RayExecutor(self.config, source)
        else:
            self.executor = Executor(self.config, source)
        self._ids = itertools.count()
        self._states: dict[str, RequestState] = {}

    def _engine_source(self, model: str | None) -> ModelSource | None:
        """Resolve `model`; build (or reuse) a cached engine for a checkpoint path."""
        cfg = self.config
        q = cfg.quant
        wants_build = q.quantizes() or cfg.parallel.world_size > 1
        if model is None and not wants_build:
            return None
        source = resolve_model(model)
        if source.engine is not None:
            build = source.engine["build"]
            if cfg.parallel.world_size == 1:  # an engine brings its layout along
                cfg.parallel.tensor_parallel_size = build["tensor_parallel_size"]
                cfg.parallel.pipeline_parallel_size = build["pipeline_parallel_size"]
            cfg.model = source.path
            return source
        if os.environ.get("KILN_ENGINE_CACHE") == "off" and not wants_build:
            return source
        from kiln.workers.builder import cached_engine

        path = cached_engine(cfg, source)
        cfg.model = path
        return resolve_model(path)

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.executor.tokenizer

    @property
    def healthy(self) -> bool:
        """False once a rank of a multi-GPU replica has died or a collective timed out."""
        return getattr(self.executor, "healthy", True)

    def shutdown(self) -> None:
        """Stop worker ranks (tensor/pipeline parallel) and free their GPUs; a no-op for one rank."""
        if hasattr(self.executor, "shutdown"):
            self.executor.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- requests ------------------------------------------------------------

    def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (random weights): pass prompts as token-id lists")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, prompt
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _submit(self, text: str | None, ids: list[int], params: SamplingParams) -> RequestState:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        request_id = str(next(self._ids))
        self.executor.add_request(request_id, ids, params)
        state = RequestState(request_id, text, ids, params, self.tokenizer)
        self._states[request_id] = state
        return state

    def _step(self) -> list[RequestState]:
        """One engine step; returns the states that changed."""
        return self._handle(*self.executor.step())

    def _handle(self, events: list, aborted: list[tuple[str, int]]) -> list[RequestState]:
        changed: dict[str, RequestState] = {}
        for request_id, index in aborted:
            state = self._states.get(request_id)
            if state is not None and not state.finished:
                co = state.output.outputs[index]
                if not co.finished:
                    co.finish_reason = "abort"
                    state.output.finished = all(o.finished for o in state.output.outputs)
                changed[request_id] = state
        for ev in events:
            state = self._states.get(ev.request_id)
            if state is None:
                continue
            if state.add_token(ev.index, ev.token_id, ev.logprobs, ev.finish_reason, ev.stop_reason,
                               ev.num_cached_tokens):
                self.executor.abort_request(ev.request_id, ev.index)
            changed[ev.request_id] = state
        for rid, state in changed.items():
            if state.finished:
                self._states.pop(rid, None)
        return list(changed.values())

    def _normalize(self, prompts, sampling_params) -> tuple[list[Prompt], list[SamplingParams]]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a string, a list of strings or token-id lists; "
                             f"got {type(prompts).__name__}")
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        return prompts, params

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Generate for every prompt, all in flight together; outputs in prompt order."""
        prompts, params = self._normalize(prompts, sampling_params)
        # Check every prompt before any runs, so one bad input leaves nothing half-done.
        encoded = [self._encode(p) for p in prompts]
        for (_, ids), sp in zip(encoded, params):
            if not isinstance(sp, SamplingParams):
                raise ValueError(f"sampling_params must be SamplingParams, got {type(sp).__name__}")
            self.executor.validate(ids, sp)
        states = [self._submit(text, ids, sp) for (text, ids), sp in zip(encoded, params)]
        show = use_tqdm if use_tqdm is not None else (len(states) >= 8 and sys.stderr.isatty())
        bar = None
        if show:
            from tqdm import tqdm
            bar = tqdm(total=len(states), desc="generating", unit="req", dynamic_ncols=True)
        done, tokens, t0 = 0, 0, time.perf_counter()
        try:
            while any(not s.finished for s in states):
                self._step()
                if bar is not None:
                    finished_now = sum(1 for s in states if s.finished) - done
                    tokens = sum(len(o.token_ids) for s in states for o in s.output.outputs)
                    bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):.0f} tok/s", refresh=False)
                    bar.update(finished_now)
                    done += finished_now
        except BaseException:
            for s in states:
                if not s.finished:
                    self.executor.abort_request(s.request_id)
                    self._states.pop(s.request_id, None)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [s.output for s in states]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield snapshots of one request as tokens arrive; the last has finished=True.

        Each snapshot's texts are safe to show: text that may begin a stop
        string is held back until it is known not to.
        """
        state = self._submit(*self._encode(prompt), sampling_params or SamplingParams())
        try:
            while not state.finished:
                if state in self._step():
                    yield self._snapshot(state)
        finally:
            if not state.finished:
                self.executor.abort_request(state.request_id)
                self._states.pop(state.request_id, None)

    @staticmethod
    def _snapshot(state: RequestState) -> RequestOutput:
        out = state.output
        outputs = [CompletionOutput(o.index, state.stream_text(o.index), list(o.token_ids), o.finish_reason,
                                    o.stop_reason, list(o.logprobs) if o.logprobs is not None else None,
                                    o.cumulative_logprob) for o in out.outputs]
        return RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, outputs, out.finished,
                             out.num_cached_tokens)

    def perplexity(self, text: str) -> float:
        """exp(mean negative log-likelihood) of `text` under the model (single-rank engines)."""
        import math

        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        self._handle(self.executor.flush(), [])  # an async step in flight must not share the step
        lps = self.executor.score(self.tokenizer.encode(text))
        return math.exp(-sum(lps) / len(lps))

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | list | None = None,
             use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (random weights), so it cannot chat")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts (or a list of such lists)")
        conversations = messages if isinstance(messages[0], list) else [messages]
        prompts = [self.tokenizer.encode_chat(conv) for conv in conversations]
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        for out, ids in zip(outputs, prompts):
            out.prompt = self.tokenizer.decode(ids, skip_special_tokens=False)
        return outputs

    def chat_stream(self, messages: list[dict], sampling_params: SamplingParams | None = None
                    ) -> Iterator[RequestOutput]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (random weights), so it cannot chat")
        return self.stream(self.tokenizer.encode_chat(messages), sampling_params)
