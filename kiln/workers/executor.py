"""The step loop of one replica: fetch -> schedule -> forward -> sample -> deliver.

Every rank of a replica runs this same loop (SPMD). Each step the leader
(rank 0) broadcasts its queued requests and aborts as msgpack bytes; every
rank applies them and runs the same deterministic scheduler, so all ranks
agree on the batch without further talk. The sampling rank (TP rank 0 of the
last stage) broadcasts the sampled tokens, and every scheduler applies them.

With pipeline parallelism there are as many independent schedulers
("virtual engines") as stages, each owning its own requests. At tick t,
stage s computes the batch that was scheduled at tick t - s, so all stages
are busy with different micro-batches at once; a batch's tokens come back
before its scheduler plans again, P ticks later.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import msgpack
import torch

from kiln.config import EngineConfig, SamplingParams
from kiln.scheduler.block_manager import BlockManager
from kiln.scheduler.request import Sequence
from kiln.scheduler.scheduler import Scheduler, SchedulerOutput
from kiln.workers.engine import Engine, StepInputs
from kiln.workers.loaders import ModelSource, resolve_model
from kiln.workers.parallel import ParallelContext
from kiln.workers.sampling import Sampled, Sampler, TokenLogprobs


@dataclass
class TokenEvent:
    """One sampled token of one output of a request (plain data: it crosses processes)."""

    request_id: str
    index: int
    token_id: int
    logprobs: TokenLogprobs | None
    finish_reason: str | None  # set on the output's last token
    stop_reason: int | str | None
    num_cached_tokens: int

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def pack(self) -> list:
        lp = self.logprobs
        return [self.request_id, self.index, self.token_id,
                None if lp is None else [lp.logprob, lp.rank, [list(t) for t in lp.top]],
                self.finish_reason, self.stop_reason, self.num_cached_tokens]

    @classmethod
    def unpack(cls, row: list) -> "TokenEvent":
        rid, index, tok, lp, reason, stop, cached = row
        logprobs = None if lp is None else TokenLogprobs(lp[0], lp[1], [tuple(t) for t in lp[2]])
        return cls(rid, index, tok, logprobs, reason, stop, cached)


def validate_request(prompt_token_ids: list[int], params: SamplingParams, max_model_len: int,
                     vocab_size: int) -> None:
    """What every replica checks before accepting a request (ValueError naming the problem)."""
    if not prompt_token_ids:
        raise ValueError("prompt is empty")
    n = len(prompt_token_ids)
    if n >= max_model_len:
        raise ValueError(f"prompt has {n} tokens, which leaves no room to generate: the context "
                         f"(max_model_len) is {max_model_len} tokens")
    bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab_size})")
    bad = next((t for t in params.stop_token_ids if t >= vocab_size), None)
    if bad is not None:
        raise ValueError(f"stop_token_ids entry {bad} is outside the vocabulary [0, {vocab_size})")


@dataclass
class _InFlight:
    ve: int  # which virtual engine (scheduler) planned it
    out: SchedulerOutput
    inputs: StepInputs | None = None


@dataclass
class _Launched:
    """Async scheduling: a step whose tokens are still being sampled on the device."""

    out: SchedulerOutput
    sampled: Sampled
    rows: dict[int, int]  # seq_id -> row of `sampled.tokens` holding its placeholder's token


class Executor:
    def __init__(self, config: EngineConfig, source: ModelSource | None = None,
                 ctx: ParallelContext | None = None) -> None:
        self.config = config
        self.ctx = ctx or ParallelContext()
        self.source = source or resolve_model(config.model, config.random_weights)
        self.engine = Engine(config, self.source, self.ctx)
        self.tokenizer = self.source.tokenizer
        cfg = self.source.config
        eos = set(cfg.eos_token_ids) | set(self.tokenizer.eos_token_ids if self.tokenizer else [])
        self.eos_token_ids = sorted(eos)
        cache = config.cache
        # Every rank must plan with the same number of blocks: the smallest budget wins.
        num_blocks = self.ctx.all_min(self.engine.num_blocks)
        # A sequence can never grow past what the whole cache holds.
        self.max_model_len = min(self.engine.max_model_len, num_blocks * cache.block_size)
        self.block_manager = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        seq_ids = itertools.count(1)
        self.schedulers = [Scheduler(config.scheduler, self.block_manager, seq_ids) for _ in range(self.ctx.pp_size)]
        self.sampler = Sampler(self.engine.device)
        self._pending: list[list] = []
        self._deferred_aborts: list[list[tuple[str, int | None]]] = [[] for _ in self.schedulers]
        self._next_ve = 0
        self._inflight: dict[int, _InFlight] = {}
        # Async scheduling (single rank): plan and launch step N+1 before reading step N's tokens.
        sc = config.scheduler
        self.async_scheduling = self.ctx.world_size == 1 and (
            sc.async_scheduling if sc.async_scheduling is not None else self.engine.device.type == "cuda")
        self._launched: _Launched | None = None
        self.num_steps = 0
        self.shutdown_requested = False

    # -- requests ------------------------------------------------------------

    @property
    def scheduler(self) -> Scheduler:
        return self.schedulers[0]

    @property
    def vocab_size(self) -> int:
        return self.source.config.vocab_size

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, self.max_model_len, self.vocab_size)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.validate(prompt_token_ids, params)
        self._pending.append(["add", request_id, list(prompt_token_ids), params.to_dict()])

    def abort_request(self, request_id: str, index: int | None = None) -> None:
        """Abort a request, or only its `index`-th sample (e.g. it hit a stop string)."""
        self._pending.append(["abort", request_id, index])

    def request_shutdown(self) -> None:
        self._pending.append(["shutdown"])

    def has_unfinished(self) -> bool:
        return bool(self._pending) or any(s.num_unfinished for s in self.schedulers) or bool(self._inflight) \
            or self._launched is not None

    # -- the step --------------------------------------------------------------

    def _sync_pending(self) -> list[list]:
        """The leader's queued requests, identical on every rank after this."""
        ctx = self.ctx
        if ctx.world_size == 1:
            items, self._pending = self._pending, []
            return items
        data = msgpack.packb(self._pending) if ctx.rank == 0 else None
        self._pending = []
        return msgpack.unpackb(ctx.broadcast_bytes(data, 0), strict_map_key=False)

    def _apply(self, items: list[list]) -> list[Sequence]:
        aborted = []
        for item in items:
            if item[0] == "add":
                _, request_id, prompt, params = item
                ve = self._next_ve
                self._next_ve = (self._next_ve + 1) % len(self.schedulers)
                sched = self.schedulers[ve]
                sched.add(Sequence(sched.new_seq_id(), request_id, prompt, SamplingParams.from_dict(params),
                                   self.eos_token_ids, self.max_model_len))
            elif item[0] == "abort":
                for ve in range(len(self.schedulers)):
                    self._deferred_aborts[ve].append((item[1], item[2]))
            elif item[0] == "shutdown":
                self.shutdown_requested = True
        # A scheduler may only drop sequences when none of its batches is in flight
        # (a later stage could still write their KV blocks). An async step is no obstacle:
        # whatever reuses the blocks runs after it on the same stream.
        busy = {f.ve for f in self._inflight.values()}
        for ve, sched in enumerate(self.schedulers):
            if ve in busy or not self._deferred_aborts[ve]:
                continue
            for request_id, index in self._deferred_aborts[ve]:
                for seq in sched.abort(request_id, index):
                    self.sampler.release(seq.seq_id)
                    aborted.append(seq)
            self._deferred_aborts[ve].clear()
        return aborted

    def step(self) -> tuple[list[TokenEvent], list[tuple[str, int]]]:
        """One tick on this rank. Returns the sampled tokens and the (request, index) pairs aborted."""
        ctx = self.ctx
        aborted = self._apply(self._sync_pending())
        if self.async_scheduling:
            return self._step_async(), [(s.request_id, s.index) for s in aborted]
        tick = self.num_steps
        self.num_steps += 1
        ve = tick % len(self.schedulers)
        if ve not in {f.ve for f in self._inflight.values()}:
            out = self.schedulers[ve].schedule()
            if not out.is_empty:
                # One-token entries first: the attention kernels take decodes as one group.
                out.scheduled.sort(key=lambda e: e.num_new_tokens != 1)
                self._inflight[tick] = _InFlight(ve, out)
        # This stage works on the batch planned pp_rank ticks ago.
        mine = self._inflight.get(tick - ctx.pp_rank)
        logits = None
        if mine is not None:
            mine.inputs = self.engine.prepare(mine.out.scheduled)
            hidden = residual = None
            if not ctx.is_first_stage:
                shape = (mine.inputs.input_ids.shape[0], self.source.config.hidden_size)
                hidden, residual = ctx.recv_prev([shape, shape], self.engine.dtype, self.engine.device)
            hidden, residual = self.engine.forward(mine.inputs, hidden, residual)
            if ctx.is_last_stage:
                logits = self.engine.logits(hidden, mine.inputs)
            else:
                ctx.send_next([hidden, residual])
        events = []
        done = self._inflight.pop(tick - (ctx.pp_size - 1), None)
        if done is not None:
            events = self._finish(done, logits)
        return events, [(s.request_id, s.index) for s in aborted]

    def _step_async(self) -> list[TokenEvent]:
        """Launch step N+1, then read step N's tokens while the device runs it.

        Step N+1 is planned with a placeholder for each token step N samples; the
        device fills those inputs in from step N's token tensor. A sequence that
        step N finishes (EOS, a stop token) still takes one row in step N+1, whose
        token is dropped; one that finishes by length is not planned again.
        """
        self.num_steps += 1
        prev, events = self._launched, []
        sched = self.scheduler
        # Penalties count a sequence's output tokens, so none of them may be a placeholder.
        if prev is not None and any(s.params.has_penalties for s in sched.running):
            events, prev = self._resolve(prev), None
        out = sched.schedule()
        self._launched = None
        if not out.is_empty:
            out.scheduled.sort(key=lambda e: e.num_new_tokens != 1)
            self._launched = self._launch(out, prev)
        if prev is not None:
            events += self._resolve(prev)
        return events

    def _launch(self, out: SchedulerOutput, prev: _Launched | None) -> _Launched:
        inputs = self.engine.prepare(out.scheduled)
        if prev is not None:
            # A placeholder is always a decode's one input token, and decodes lead the batch: row i is entry i.
            dst, src = [], []
            for i, e in enumerate(out.scheduled):
                if e.num_new_tokens != 1:
                    break
                j = prev.rows.get(e.seq.seq_id)  # its input token is the one prev is sampling
                if j is not None:
                    dst.append(i)
                    src.append(j)
            if dst:
                idx = torch.tensor([dst, src], dtype=torch.int64)
                if inputs.input_ids.is_cuda:
                    idx = idx.pin_memory().to(inputs.input_ids.device, non_blocking=True)
                inputs.input_ids[idx[0]] = prev.sampled.tokens[idx[1]]
        hidden, _ = self.engine.forward(inputs)
        logits = self.engine.logits(hidden, inputs)
        sampling = [e.seq for e in out.scheduled if e.sample]
        sampled = self.sampler.sample(logits, sampling)
        self.scheduler.advance(out)
        return _Launched(out, sampled, {seq.seq_id: i for i, seq in enumerate(sampling)})

    def _resolve(self, launched: _Launched) -> list[TokenEvent]:
        tokens, logprobs = launched.sampled.result()
        return self._update(0, launched.out, tokens, logprobs)

    def flush(self) -> list[TokenEvent]:
        """Finish the async step in flight, if any; its tokens (before work that must see every token)."""
        launched, self._launched = self._launched, None
        return self._resolve(launched) if launched is not None else []

    def _finish(self, done: _InFlight, logits: torch.Tensor | None) -> list[TokenEvent]:
        """Sample on the sampling rank, share the tokens, update the scheduler."""
        ctx = self.ctx
        sampling = [e.seq for e in done.out.scheduled if e.sample]
        if ctx.world_size == 1:
            tokens, logprobs = self.sampler(logits, sampling)
        else:
            data = None
            if ctx.rank == ctx.sampler_rank:
                tokens, logprobs = self.sampler(logits, sampling)
                data = msgpack.packb([tokens, [None if lp is None else [lp.logprob, lp.rank, lp.top]
                                               for lp in logprobs]])
            tokens, lps = msgpack.unpackb(ctx.broadcast_bytes(data, ctx.sampler_rank))
            logprobs = [None if lp is None else TokenLogprobs(lp[0], lp[1], [tuple(t) for t in lp[2]])
                        for lp in lps]
        return self._update(done.ve, done.out, tokens, logprobs)

    def _update(self, ve: int, out: SchedulerOutput, tokens: list[int],
                logprobs: list[TokenLogprobs | None]) -> list[TokenEvent]:
        sampling = [e.seq for e in out.scheduled if e.sample]
        self.schedulers[ve].update(out, tokens)
        events = []
        for seq, tok, lp in zip(sampling, tokens, logprobs):
            if seq.finish_reason == "abort":
                continue
            reason = seq.finish_reason if seq.is_finished else None
            events.append(TokenEvent(seq.request_id, seq.index, tok, lp, reason, seq.stop_reason,
                                     seq.num_cached_tokens))
            if seq.is_finished:
                self.sampler.release(seq.seq_id)
        return events

    def score(self, token_ids: list[int]) -> list[float]:
        """log p(token_i | tokens before it) for i >= 1, in one prefill (for perplexity).

        Runs between steps on this rank's engine; not for multi-rank replicas.
        """
        lp = self._log_probs(token_ids)
        return lp.gather(1, torch.tensor(token_ids[1:], device=lp.device)[:, None])[:, 0].tolist()

    def log_probs(self, token_ids: list[int]) -> torch.Tensor:
        """The model's whole next-token distribution after each prefix: log-probabilities
        [len - 1, vocab] (fp32, on the CPU) in one prefill, for comparing models token by token
        (e.g. KL divergence of a quantized engine from its checkpoint). As `score`, between steps."""
        return self._log_probs(token_ids).cpu()

    def _log_probs(self, token_ids: list[int]) -> torch.Tensor:
        if self.ctx.world_size > 1:
            raise ValueError("score() runs on a single-rank engine")
        if len(token_ids) < 2 or len(token_ids) > self.max_model_len:
            raise ValueError(f"score() needs 2..{self.max_model_len} tokens, got {len(token_ids)}")
        if self._launched is not None:
            raise ValueError("score() runs between steps: flush() the async step in flight first")
        seq = Sequence(-1, "__score__", token_ids, SamplingParams(), [], self.max_model_len)
        if not self.block_manager.allocate(seq, len(token_ids)):
            raise ValueError("not enough free KV blocks to score this text now")
        try:
            from kiln.scheduler.scheduler import ScheduledSeq

            entry = ScheduledSeq(seq, len(token_ids), True)
            inputs = self.engine.prepare([entry])
            hidden, _ = self.engine.forward(inputs)
            with torch.inference_mode():
                logits = self.engine.model.compute_logits(hidden[:-1])
                return torch.log_softmax(logits, dim=-1)  # compute_logits gives fp32
        finally:
            self.block_manager.free(seq)

    @property
    def last_stats(self) -> dict:
        return self.stats()

    def take_kv_events(self) -> list[tuple]:
        """Blocks stored in / evicted from the prefix cache since the last call (for the router)."""
        return self.block_manager.take_events()

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_running": sum(len(s.running) for s in self.schedulers),
            "num_waiting": sum(len(s.waiting) for s in self.schedulers),
            "kv_cache_usage": bm.usage,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "num_preemptions": sum(s.num_preemptions for s in self.schedulers),
        }
