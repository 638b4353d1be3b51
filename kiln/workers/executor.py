"""The step loop of one replica: fetch -> schedule -> forward -> sample -> deliver.

Requests and aborts are queued and applied at the start of a step, so that
on a multi-rank replica the leader can broadcast exactly that list and every
rank's scheduler makes the same decisions (SPMD).
"""
from __future__ import annotations

from dataclasses import dataclass

from kiln.config import EngineConfig, SamplingParams
from kiln.scheduler.block_manager import BlockManager
from kiln.scheduler.request import Sequence
from kiln.scheduler.scheduler import Scheduler
from kiln.workers.engine import Engine
from kiln.workers.loaders import ModelSource, resolve_model
from kiln.workers.sampling import Sampler, TokenLogprobs


@dataclass
class TokenEvent:
    """One sampled token of one sequence, delivered after a step."""

    seq: Sequence
    token_id: int
    logprobs: TokenLogprobs | None
    finished: bool


class Executor:
    def __init__(self, config: EngineConfig, source: ModelSource | None = None) -> None:
        self.config = config
        self.source = source or resolve_model(config.model, config.random_weights)
        self.engine = Engine(config, self.source)
        self.tokenizer = self.source.tokenizer
        cfg = self.source.config
        eos = set(cfg.eos_token_ids) | set(self.tokenizer.eos_token_ids if self.tokenizer else [])
        self.eos_token_ids = sorted(eos)
        cache = config.cache
        # A sequence can never grow past what the whole cache holds.
        self.max_model_len = min(self.engine.max_model_len, self.engine.num_blocks * cache.block_size)
        self.block_manager = BlockManager(self.engine.num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.sampler = Sampler(self.engine.device)
        self._pending: list[tuple] = []
        self.num_steps = 0

    @property
    def vocab_size(self) -> int:
        return self.source.config.vocab_size

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise ValueError(f"prompt has {n} tokens, which leaves no room to generate: the context "
                             f"(max_model_len) is {self.max_model_len} tokens")
        bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")
        bad = next((t for t in params.stop_token_ids if t >= self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"stop_token_ids entry {bad} is outside the vocabulary [0, {self.vocab_size})")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.validate(prompt_token_ids, params)
        self._pending.append(("add", request_id, list(prompt_token_ids), params))

    def abort_request(self, request_id: str, index: int | None = None) -> None:
        """Abort a request, or only its `index`-th sample (e.g. it hit a stop string)."""
        self._pending.append(("abort", request_id, index))

    def has_unfinished(self) -> bool:
        return bool(self._pending) or self.scheduler.num_unfinished > 0

    def _apply_pending(self) -> list[Sequence]:
        aborted = []
        for item in self._pending:
            if item[0] == "add":
                _, request_id, prompt, params = item
                seq = Sequence(self.scheduler.new_seq_id(), request_id, prompt, params, self.eos_token_ids,
                               self.max_model_len)
                self.scheduler.add(seq)
            else:
                for seq in self.scheduler.abort(item[1], item[2]):
                    self.sampler.release(seq.seq_id)
                    aborted.append(seq)
        self._pending.clear()
        return aborted

    def step(self) -> tuple[list[TokenEvent], list[Sequence]]:
        """One step. Returns the sampled tokens and the sequences aborted before it."""
        aborted = self._apply_pending()
        out = self.scheduler.schedule()
        if out.is_empty:
            return [], aborted
        # One-token entries first: the attention kernels take decodes as one group.
        out.scheduled.sort(key=lambda e: e.num_new_tokens != 1)
        logits = self.engine.execute(out.scheduled)
        sampling = [e.seq for e in out.scheduled if e.sample]
        tokens, logprobs = self.sampler(logits, sampling)
        self.scheduler.update(out, tokens)
        self.num_steps += 1
        events = []
        for seq, tok, lp in zip(sampling, tokens, logprobs):
            if seq.finish_reason == "abort":
                continue
            events.append(TokenEvent(seq, tok, lp, seq.is_finished))
            if seq.is_finished:
                self.sampler.release(seq.seq_id)
        return events, aborted

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": bm.usage,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
        }
