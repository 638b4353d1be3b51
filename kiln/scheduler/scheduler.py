"""In-flight batching: every step mixes decode tokens and prompt chunks.

The scheduler is deterministic given the same calls in the same order, so
every rank of a replica can run its own copy and reach the same plan (SPMD).
"""
from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from kiln.config import SchedulerConfig
from kiln.scheduler.block_manager import BlockManager
from kiln.scheduler.request import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    # True when this chunk reaches the sequence's last token: a token is sampled.
    sample: bool
    # Async scheduling: where the sampled token goes in seq.token_ids (a placeholder until then).
    token_index: int = -1


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    num_preempted: int = 0
    advanced: bool = False  # see Scheduler.advance

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 seq_ids: Iterator[int] | None = None) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Schedulers sharing a block manager must share the id source: ids key its bookkeeping.
        self._seq_ids = seq_ids if seq_ids is not None else itertools.count(1)

    def new_seq_id(self) -> int:
        return next(self._seq_ids)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, request_id: str, index: int | None = None) -> list[Sequence]:
        """Finish the request's sequences (or only its `index`-th) and free their blocks."""
        def match(s: Sequence) -> bool:
            return s.request_id == request_id and (index is None or s.index == index)

        aborted = [s for s in self.running if match(s)] + [s for s in self.waiting if match(s)]
        for seq in aborted:
            self._finish(seq, "abort")
        return aborted

    def _finish(self, seq: Sequence, reason: str | None = None) -> None:
        if reason is not None:
            seq.finish_reason = reason
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        self.block_manager.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Free a sequence's blocks; it recomputes its KV when readmitted."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager

        # Running sequences first (decodes and unfinished prompt chunks), oldest
        # first; when blocks run out, the newest running sequence yields.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.reached_length:  # async: its last token is still being sampled; nothing left to compute
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens + n == seq.num_tokens))
                budget -= n
                i += 1
                continue
            break

        # Then new (or preempted) sequences, first come first served, while
        # tokens, sequence slots and blocks last. Not after a preemption: the
        # memory just freed belongs to those already running.
        while self.waiting and budget > 0 and out.num_preempted == 0:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting[0]
            cached = bm.match_prefix(seq)
            num_cached = len(cached) * bm.block_size
            n = min(seq.num_tokens - num_cached, budget)
            if not bm.allocate(seq, n, cached):
                break
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_cached
                bm.record_prefix_lookup(seq.num_prompt_tokens, num_cached)
            seq.num_computed_tokens = num_cached
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n, num_cached + n == seq.num_tokens))
            budget -= n
        return out

    def advance(self, out: SchedulerOutput) -> None:
        """Async scheduling: count a launched step's tokens as computed and give each sampled
        token a placeholder, so the next step can be planned before this one's tokens are known.
        `update(out, sampled)` later fills the placeholders in."""
        out.advanced = True
        for entry in out.scheduled:
            entry.seq.num_computed_tokens += entry.num_new_tokens
            if entry.sample:
                entry.token_index = entry.seq.append_placeholder()

    def update(self, out: SchedulerOutput, sampled: list[int]) -> list[Sequence]:
        """Apply a step's results; `sampled` holds one token per sampling entry.

        The tokens fill the placeholders `advance(out)` made: at launch under async
        scheduling (a later step may already be computing on them), here otherwise.
        Returns the sequences that finished in this step.
        """
        if not out.advanced:
            self.advance(out)
        finished, forks = [], []
        tokens = iter(sampled)
        for entry in out.scheduled:
            seq = entry.seq
            token = next(tokens) if entry.sample else None
            if seq.is_finished:  # aborted while the step ran
                continue
            if token is not None:
                seq.set_token(entry.token_index, token)
            # Full blocks of known tokens only: the next step's placeholder, if any, lies past them.
            self.block_manager.commit(seq)
            if token is None:
                continue
            if not seq.forked:
                seq.forked = True
                forks.append(seq)
            if seq.finish_reason is not None:
                self._finish(seq)
                finished.append(seq)
        # The other n-1 samples of a request start once its prompt's blocks are
        # cached: they join at the head of the queue and share those blocks.
        for parent in reversed(forks):
            for index in range(parent.params.n - 1, 0, -1):
                child = Sequence(self.new_seq_id(), parent.request_id, parent.token_ids[:parent.num_prompt_tokens],
                                 parent.params, parent.eos_token_ids, parent.max_model_len, index=index)
                self.waiting.appendleft(child)
        return finished
