"""One rank's model: weights on the device, the paged KV cache, CUDA graphs.

`Engine.execute` takes a step's scheduled sequences and returns the logits
of the rows that sample. Inputs are built with numpy on the host and copied
once; decode-only steps on CUDA replay a captured graph.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from kiln.config import EngineConfig, ModelConfig
from kiln.kernels import backend
from kiln.kernels.argmax import argmax
from kiln.kernels.attention import AttentionMetadata
from kiln.scheduler.scheduler import ScheduledSeq
from kiln.workers import kernel_cache
from kiln.workers.loaders import ModelSource
from kiln.workers.models import LlamaForCausalLM
from kiln.workers.parallel import ParallelContext

log = logging.getLogger("kiln.engine")
# Decode CUDA graphs below 16 sequences (then every 16): a batch runs in the smallest graph that
# holds it, the rest padding. 6 lets batches of 5-6 keep the int4 GEMV (up to 6 rows) instead
# of padding to 8 rows on tensor cores (benchmarks/decode_batch.py).
SMALL_DECODE_GRAPHS = (1, 2, 4, 6, 8)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
CPU_DEFAULT_KV_BYTES = 1 << 30


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    num_tokens: int
    graph: bool = False  # padded to a captured CUDA graph's batch size


class Engine:
    def __init__(self, config: EngineConfig, source: ModelSource, ctx: ParallelContext | None = None) -> None:
        self.config = config
        self.ctx = ctx or ParallelContext()
        self.device = resolve_device(config.device)
        if self.device.type == "cpu" and config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model_config: ModelConfig = source.config
        mc = source.config
        self.max_model_len = config.scheduler.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's context of "
                             f"{mc.max_position_embeddings} tokens")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        t0 = time.perf_counter()
        quant = config.quant
        if quant.kv_cache_dtype == "fp8":
            from kiln.kernels.quant import check_fp8_kv_cache_supported
            check_fp8_kv_cache_supported(self.device, mc.head_dim)
        bundle = contextlib.nullcontext()  # records the kernels a built engine's first load compiles
        if source.engine is not None:  # a built engine: this rank's file, straight onto the device
            from kiln.workers.builder import check_engine, load_engine_model

            check_engine(source.engine, source.path, self.device, self.ctx.tp_size, self.ctx.pp_size)
            if self.device.type == "cuda":  # compiled kernels first, so the warm-up below finds them
                kernel_cache.restore(source.path, self.device)
                if self.ctx.tp_rank == 0 and self.ctx.pp_rank == 0:
                    bundle = kernel_cache.recording(source.path, self.device)
            self.model, quant, self.dtype = load_engine_model(source.engine, source.path, self.ctx, self.device,
                                                              self.max_model_len)
        elif source.weights is None:  # random weights, drawn directly in the quantized format
            if quant.mode == "fp8":
                from kiln.kernels.quant import check_fp8_supported
                check_fp8_supported(self.device)
            with torch.device(self.device):
                self.model = LlamaForCausalLM(mc, self.ctx, self.dtype, self.device, self.max_model_len,
                                              quant.mode, quant.group_size, quant.lm_head_quant())
            self.model.init_random(config.seed)
        else:
            with torch.device(self.device):
                self.model = LlamaForCausalLM(mc, self.ctx, self.dtype, self.device, self.max_model_len)
            self.model.load_weights(source.weights())
            if quant.quantizes():
                if self.ctx.world_size > 1:
                    raise ValueError("quantizing a checkpoint needs a build: kiln build CHECKPOINT -o DIR "
                                     "--quant ... (LLM(checkpoint, quant=...) does this for you)")
                from kiln.workers.quantize import calibration_tokens, quantize_model

                if quant.mode == "int4-awq" and source.quant_block and source.quant_block < quant.group_size:
                    quant = dataclasses.replace(quant, group_size=source.quant_block)
                tokens = calibration_tokens(source.tokenizer, mc.vocab_size, quant.calibration_tokens, True)
                group = quantize_model(self.model, quant.mode, quant.kv_cache_dtype == "fp8", quant.group_size,
                                       tokens, self.dtype, self.device, quant.lm_head_quant())
                quant = dataclasses.replace(quant, group_size=group)
        self.quant = quant
        self.kv_dtype = torch.float8_e4m3fn if quant.kv_cache_dtype == "fp8" else self.dtype
        self.model.eval()
        if self.device.type == "cpu":
            for m in self.model.modules():
                if hasattr(m, "pack_for_cpu"):
                    m.pack_for_cpu()
        log.info("loaded %s (%.2fB params, %s) on %s in %.1fs", source.name, mc.num_params() / 1e9,
                 str(self.dtype).removeprefix("torch."), self.device, time.perf_counter() - t0)

        self.block_size = config.cache.block_size
        attn = self.model.layers[0].self_attn if len(self.model.layers) else None
        self.num_kv_heads = attn.num_kv_heads if attn else 1
        self.kv_cache: torch.Tensor | None = None
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        with bundle:  # every kernel variant a step can need is compiled from here on
            self.num_blocks = self._num_blocks()
            self._allocate_kv_cache(self.num_blocks)
            if self.device.type == "cuda" and not config.enforce_eager and backend.use_triton(self.model.cos_sin) \
                    and self.ctx.pp_size == 1:
                self._capture_graphs()
            if self.device.type == "cuda" and self.ctx.pp_size == 1:
                self._warmup()
        if self.device.type == "cuda":
            kernel_cache.mark_compiled()

    # -- KV cache ------------------------------------------------------------

    def block_bytes(self) -> int:
        layers = len(self.model.layers)
        return 2 * layers * self.block_size * self.num_kv_heads * self.model_config.head_dim * self.kv_dtype.itemsize

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_cache = None
        shape = (len(self.model.layers), 2, num_blocks, self.block_size, self.num_kv_heads,
                 self.model_config.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.kv_caches = [(layer[0], layer[1]) for layer in self.kv_cache]

    def _num_blocks(self) -> int:
        cc = self.config.cache
        if cc.num_blocks is not None:
            return cc.num_blocks
        if cc.kv_cache_bytes is not None:
            budget = cc.kv_cache_bytes
        elif self.device.type == "cpu":
            budget = CPU_DEFAULT_KV_BYTES
        else:
            budget = self._profile_free_memory()
        n = budget // self.block_bytes()
        if n < 1:
            raise ValueError(f"the KV cache budget ({budget} bytes) holds no {self.block_bytes()}-byte block; "
                             "raise gpu_memory_utilization or kv_cache_bytes")
        return int(n)

    @torch.no_grad()
    def _profile_free_memory(self) -> int:
        """Memory left for the KV cache after weights and the largest step's activations."""
        sc = self.config.scheduler
        tokens = min(sc.max_num_batched_tokens, self.max_model_len * sc.max_num_seqs)
        blocks = -(-tokens // self.block_size) + 1
        self._allocate_kv_cache(blocks)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        # One prompt per max_model_len chunk: attention activations as in a real step.
        lens = [min(self.max_model_len, tokens - i) for i in range(0, tokens, self.max_model_len)]
        block_ids = list(range(blocks))
        dummy, pos = [], 0
        for n in lens:
            nb = -(-n // self.block_size)
            dummy.append(_DummyEntry(n, block_ids[pos:pos + nb]))
            pos += nb
        inputs = self._prepare(dummy, graph=False)
        hidden, _ = self._forward(inputs)
        rows = hidden[:1].expand(min(sc.max_num_seqs, tokens), -1)
        torch.sort(self.model.compute_logits(rows), dim=-1, descending=True)  # the sampler's peak
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        self.kv_cache = None
        self.kv_caches = []
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        used_by_others = total - free - torch.cuda.memory_reserved()
        budget = int(total * self.config.cache.gpu_memory_utilization) - peak - used_by_others
        log.info("memory: total %.1f GiB, peak %.1f GiB (weights + activations), KV budget %.1f GiB",
                 total / 2**30, peak / 2**30, budget / 2**30)
        return max(budget, 0)

    # -- inputs --------------------------------------------------------------

    def _prepare(self, scheduled: list, graph: bool) -> StepInputs:
        bs = self.block_size
        B = len(scheduled)
        q_lens = np.fromiter((e.num_new_tokens for e in scheduled), dtype=np.int64, count=B)
        starts = np.fromiter((e.seq.num_computed_tokens for e in scheduled), dtype=np.int64, count=B)
        cu = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        T = int(cu[-1])
        input_ids = np.fromiter(chain.from_iterable(e.seq.token_ids[s:s + n] for e, s, n in
                                                    zip(scheduled, starts.tolist(), q_lens.tolist())),
                                dtype=np.int64, count=T)
        seq_idx = np.repeat(np.arange(B), q_lens)
        positions = np.arange(T, dtype=np.int64) + np.repeat(starts - cu[:-1], q_lens)
        seq_lens = starts + q_lens
        width = max(len(e.seq.block_table) for e in scheduled)
        rows = B if not graph else self._graph_size(B)
        block_tables = np.zeros((rows, width), dtype=np.int32)
        for i, e in enumerate(scheduled):
            block_tables[i, :len(e.seq.block_table)] = e.seq.block_table
        slots = block_tables[seq_idx, positions // bs].astype(np.int64) * bs + positions % bs
        sample = np.fromiter((e.sample for e in scheduled), dtype=bool, count=B)
        logits_indices = cu[1:][sample] - 1
        num_decodes = int(np.argmax(q_lens != 1)) if (q_lens != 1).any() else B
        if graph:  # pad to the captured size; padded rows write nowhere and read nothing
            pad = rows - B
            input_ids = np.concatenate([input_ids, np.zeros(pad, np.int64)])
            positions = np.concatenate([positions, np.zeros(pad, np.int64)])
            slots = np.concatenate([slots, np.full(pad, -1, np.int64)])
            seq_lens = np.concatenate([seq_lens, np.zeros(pad, np.int64)])
            cu = np.arange(rows + 1, dtype=np.int64)
            num_decodes = rows

        dev = self.device

        def put(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            t = torch.from_numpy(a).to(dtype)
            return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t

        meta = AttentionMetadata(
            slot_mapping=put(slots, torch.int64), query_start_loc=put(cu, torch.int32),
            seq_lens=put(seq_lens, torch.int32), block_tables=put(block_tables, torch.int32),
            num_decodes=num_decodes, max_query_len=int(q_lens.max()), max_seq_len=int(seq_lens.max()))
        return StepInputs(put(input_ids, torch.int64), put(positions, torch.int64), meta,
                          put(logits_indices, torch.int64), T, graph)

    # -- forward -------------------------------------------------------------

    def _forward(self, inputs: StepInputs, hidden: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, hidden, residual)

    def prepare(self, scheduled: list[ScheduledSeq]) -> StepInputs:
        """Device inputs for a step (padded to a captured graph's size when one will replay)."""
        return self._prepare(scheduled, graph=self._graph_eligible(scheduled))

    def _graph_eligible(self, scheduled: list[ScheduledSeq]) -> bool:
        return bool(self.graphs) and len(scheduled) <= self._max_graph_size \
            and all(e.num_new_tokens == 1 for e in scheduled)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, hidden: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's layers. A first stage embeds input ids; later stages take the
        previous stage's (hidden, residual). A last stage returns normed hidden states."""
        if inputs.graph:
            return self._replay(inputs), None
        return self._forward(inputs, hidden, residual)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """fp32 logits of the rows that sample (last stage only)."""
        return self.model.compute_logits(hidden[inputs.logits_indices])

    def execute(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """A whole step on a single-stage rank: fp32 logits [sampling entries, vocab]."""
        inputs = self.prepare(scheduled)
        hidden, _ = self.forward(inputs)
        return self.logits(hidden, inputs)

    # -- CUDA graphs ---------------------------------------------------------

    def _graph_size(self, batch: int) -> int:
        return next(s for s in self._graph_sizes if s >= batch)

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        """Capture decode steps for a ladder of batch sizes (pure-decode steps only)."""
        max_bs = min(self.config.scheduler.max_num_seqs, 512)
        sizes = list(SMALL_DECODE_GRAPHS) + list(range(16, max_bs + 1, 16))
        self._graph_sizes = sorted({s for s in sizes if s <= max_bs} | {max_bs})
        self._max_graph_size = self._graph_sizes[-1]
        n = self._max_graph_size
        dev = self.device
        self._g_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self._g_pos = torch.zeros(n, dtype=torch.int64, device=dev)
        self._g_slots = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self._g_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self._g_qsl = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self._g_bt = torch.zeros(n, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self._g_out = torch.zeros(n, self.model_config.hidden_size, dtype=self.dtype, device=dev)
        t0 = time.perf_counter()
        pool = None
        for bs in reversed(self._graph_sizes):
            meta = self._graph_meta(bs)
            self.model(self._g_ids[:bs], self._g_pos[:bs], self.kv_caches, meta)  # compile outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                h, _ = self.model(self._g_ids[:bs], self._g_pos[:bs], self.kv_caches, meta)
                self._g_out[:bs].copy_(h)
            pool = g.pool()
            self.graphs[bs] = g
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch 1..%d) in %.1fs", len(self.graphs), n,
                 time.perf_counter() - t0)

    @torch.inference_mode()
    def _warmup(self) -> None:
        """Compile the eager (mixed decode + prefill) step's kernel variants now, not during the
        first requests: a first mixed step otherwise stalls every request for seconds."""
        bs, t0 = self.block_size, time.perf_counter()
        # Mixed steps (long and short prompt chunks), a prompt alone (a fresh server's first step),
        # and a long-context decode beside a prompt (split-KV decode with its merge kernel).
        for batch in ([(40, 1)] * 2 + [(300, 300), (24, 24)], [(40, 1)] * 48 + [(24, 24)], [(5, 5)],
                      [(1100, 1), (5, 5)]):
            if max(n_ctx for n_ctx, _ in batch) > self.max_model_len:
                continue
            entries, nxt = [], 0
            for n_ctx, n_new in batch:
                nb = -(-n_ctx // bs)
                e = _DummyEntry(n_ctx, list(range(nxt, nxt + nb)))
                e.seq.num_computed_tokens, e.num_new_tokens = n_ctx - n_new, n_new
                entries.append(e)
                nxt += nb
            if nxt > self.num_blocks:
                return
            inputs = self._prepare(entries, graph=False)
            hidden, _ = self._forward(inputs)
            argmax(self.model.compute_logits(hidden[inputs.logits_indices]))  # the sampler's kernels too
        torch.cuda.synchronize()
        log.info("warmed up eager step kernels in %.1fs", time.perf_counter() - t0)

    def _graph_meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self._g_slots[:bs], query_start_loc=self._g_qsl[:bs + 1],
                                 seq_lens=self._g_lens[:bs], block_tables=self._g_bt[:bs], num_decodes=bs,
                                 max_query_len=1, max_seq_len=self.max_model_len)

    def _replay(self, inputs: StepInputs) -> torch.Tensor:
        bs = inputs.input_ids.shape[0]
        self._g_ids[:bs].copy_(inputs.input_ids)
        self._g_pos[:bs].copy_(inputs.positions)
        self._g_slots[:bs].copy_(inputs.meta.slot_mapping)
        self._g_lens[:bs].copy_(inputs.meta.seq_lens)
        bt = inputs.meta.block_tables  # entries past a sequence's length are never read
        self._g_bt[:bs, :bt.shape[1]].copy_(bt)
        self.graphs[bs].replay()
        return self._g_out[:bs]


@dataclass
class _DummySeq:
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]


class _DummyEntry:
    """A prompt of `n` zero tokens, shaped like a ScheduledSeq, for profiling."""

    def __init__(self, n: int, blocks: list[int]) -> None:
        self.seq = _DummySeq([0] * n, 0, blocks)
        self.num_new_tokens = n
        self.sample = True
