"""The dataclasses every layer reads: one per concern, passed down whole.

Nothing here imports torch or any other part of kiln, so the scheduler (pure
Python) and the cluster layer can read the same objects the workers do.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass
class ModelConfig:
    """Shape of a Llama-family decoder. Field names follow HF `config.json`."""

    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF's `rope_scaling` dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}.
    rope_scaling: dict | None = None
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    name: str = "llama"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    def num_params(self) -> int:
        h, i, layers = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers * per_layer + emb + h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CacheConfig:
    """Paged KV cache. The number of blocks comes from a memory budget."""

    block_size: int = 16
    # Fraction of GPU memory kiln may use in total (weights + activations + KV cache).
    gpu_memory_utilization: float = 0.90
    # Explicit KV-cache budget in bytes; on CPU the default is 1 GiB.
    kv_cache_bytes: int | None = None
    # Overrides the budget: exactly this many blocks (tests use it to force preemption).
    num_blocks: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_bytes is not None:
            _positive("kv_cache_bytes", self.kv_cache_bytes)
        if self.num_blocks is not None:
            _positive("num_blocks", self.num_blocks)


@dataclass
class SchedulerConfig:
    """In-flight batching limits for one step."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 0  # 0: the model's max_position_embeddings
    # Plan and prepare step N+1 while the GPU runs step N (the host's work hides behind the
    # GPU's). None: on for a single-rank CUDA engine. step() then returns a step's tokens right after
    # launching the next step, and a sequence that stops on a sampled token (EOS) costs one dropped row.
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_model_len", self.max_model_len, allow_zero=True)


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Every collective (NCCL or gloo) fails after this long: a dead rank becomes an error, not a hang.
    collective_timeout_s: float = 120.0
    # Seconds an idle leader waits before a heartbeat step (keeps the other ranks' waits short).
    heartbeat_s: float = 0.5

    def __post_init__(self) -> None:
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _positive("pipeline_parallel_size", self.pipeline_parallel_size)
        _positive("collective_timeout_s", self.collective_timeout_s)
        _positive("heartbeat_s", self.heartbeat_s)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


QUANT_MODES = ("none", "fp8", "int8-wo", "int4-awq")


@dataclass
class QuantConfig:
    """How weights and the KV cache are stored (see kiln/kernels/quant.py)."""

    mode: str = "none"  # none | fp8 | int8-wo | int4-awq
    # auto: the model dtype; fp8: e4m3 with per-layer scales, K smoothed and Hadamard-rotated first
    # (kiln/kernels/rope.py)
    kv_cache_dtype: str = "auto"
    group_size: int = 128  # int4-awq
    calibration_tokens: int = 2048  # AWQ and FP8-KV scales are measured on this much built-in text
    # The LM head: none keeps the model dtype; int8-wo stores int8 rows with a scale each. auto:
    # int8-wo for int4-awq, whose point is batch-1 decode, where the head is a fifth of the bytes.
    lm_head: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in QUANT_MODES:
            raise ValueError(f"quant must be one of {', '.join(QUANT_MODES)}; got {self.mode!r}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be auto or fp8; got {self.kv_cache_dtype!r}")
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"group_size must be 32, 64 or 128; got {self.group_size}")
        _positive("calibration_tokens", self.calibration_tokens)
        if self.lm_head not in ("auto", "none", "int8-wo"):
            raise ValueError(f"lm_head must be auto, none or int8-wo; got {self.lm_head!r}")

    def quantizes(self) -> bool:
        """Whether a checkpoint's weights or KV cache need quantizing (a build) under these settings."""
        return self.mode != "none" or self.kv_cache_dtype == "fp8" or self.lm_head_quant() != "none"

    def lm_head_quant(self) -> str:
        """How the LM head is stored: `lm_head` with auto resolved."""
        if self.lm_head == "auto":
            return "int8-wo" if self.mode == "int4-awq" else "none"
        return self.lm_head


@dataclass
class EngineConfig:
    """Everything an Executor needs: what to load, on what, with which limits."""

    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    random_weights: bool = False
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"  # auto: cuda if available
    seed: int = 0
    # torch intra-op threads on the CPU (0: torch's default; a Ray actor defaults to its CPUs, at least 1).
    # Several CPU replicas on one machine each want a share of the cores, not all of them.
    cpu_threads: int = 0
    # CUDA graphs for decode steps; off means eager every step.
    enforce_eager: bool = False
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}")
        _positive("cpu_threads", self.cpu_threads, allow_zero=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EngineConfig":
        d = dict(d)
        return cls(cache=CacheConfig(**d.pop("cache")), scheduler=SchedulerConfig(**d.pop("scheduler")),
                   parallel=ParallelConfig(**d.pop("parallel")), quant=QuantConfig(**d.pop("quant", {})), **d)


@dataclass
class SamplingParams:
    """Per-request sampling settings; names and meanings follow vLLM / OpenAI."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs for each generated token
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._check()

    def _check(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not is_num(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (or -1 for off), got {self.top_k!r}")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        return cls(**d)


ROUTING_POLICIES = ("kv", "least-loaded", "round-robin")


@dataclass
class RouterConfig:
    """How the central router picks a replica (see kiln/cluster/router.py)."""

    policy: str = "kv"
    # kv: the work before the request's first token on replica r, in prompt tokens; lowest wins:
    #   cost(r) = prompt tokens not cached on r + uncached tokens of r's requests still in prefill
    #             + decode_cost_tokens * requests in flight on r
    # A running request adds a row to every step (and its step must end before a new prompt
    # joins): about this many prompt tokens of prefill, far less than a long history's recompute.
    decode_cost_tokens: float = 32.0
    # Replicas whose KV blocks are this full (held by running requests) go after the others.
    kv_usage_limit: float = 0.95
    # Requests a replica may hold (running + waiting) before the router stops sending it more;
    # when every replica is full, new requests get HTTP 429.
    max_queued_per_replica: int = 256
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.policy not in ROUTING_POLICIES:
            raise ValueError(f"routing policy must be one of {', '.join(ROUTING_POLICIES)}; got {self.policy!r}")
        _positive("decode_cost_tokens", self.decode_cost_tokens, allow_zero=True)
        if not 0 < self.kv_usage_limit <= 1:
            raise ValueError(f"kv_usage_limit must be in (0, 1]; got {self.kv_usage_limit}")
        _positive("max_queued_per_replica", self.max_queued_per_replica)
        _positive("retry_after_s", self.retry_after_s)


@dataclass
class ServeConfig:
    """A `kiln serve` deployment: the engine every replica runs, how many, and the HTTP front."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    num_replicas: int = 1
    # Autoscaling (Ray Serve): when max_replicas > num_replicas, replicas follow ongoing requests.
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: int = 32
    # How long load must stay above / below target before replicas are added / removed.
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None  # the name clients send as "model" (default: derived from the model)
    app_name: str = "kiln"
    # Streamed messages (server-sent events) per second the ingress sends, at most, over all requests:
    # each stream gets an equal share, and a stream's tokens in between go out together in its next
    # message (first and last tokens at once). The HTTP path's cost then stops growing with the number
    # of streams. 0: a message per engine step for every stream.
    stream_events_per_s: float = 1000.0

    def __post_init__(self) -> None:
        _positive("num_replicas", self.num_replicas)
        _positive("target_ongoing_requests", self.target_ongoing_requests)
        _positive("upscale_delay_s", self.upscale_delay_s, allow_zero=True)
        _positive("downscale_delay_s", self.downscale_delay_s, allow_zero=True)
        _positive("stream_events_per_s", self.stream_events_per_s, allow_zero=True)
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        lo = self.min_replicas if self.min_replicas is not None else self.num_replicas
        hi = self.max_replicas if self.max_replicas is not None else self.num_replicas
        if not 0 <= lo <= self.num_replicas <= hi:
            raise ValueError(f"need min_replicas <= num_replicas <= max_replicas, got {lo}, {self.num_replicas}, {hi}")

    @property
    def autoscaling(self) -> bool:
        return (self.max_replicas or self.num_replicas) > self.num_replicas or \
            (self.min_replicas is not None and self.min_replicas < self.num_replicas)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ServeConfig":
        d = dict(d)
        engine = EngineConfig.from_dict(d.pop("engine")) if "engine" in d else EngineConfig()
        router = RouterConfig(**d.pop("router")) if "router" in d else RouterConfig()
        return cls(engine=engine, router=router, **d)
