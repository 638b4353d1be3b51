"""A sequence's state: its tokens, how many have KV in the cache, its blocks.

One request with `n` > 1 becomes `n` sequences sharing a request id; the
children join once the first has filled the prompt's KV blocks, so they read
those blocks from the prefix cache instead of recomputing them.
"""
from __future__ import annotations

import enum

from kiln.config import SamplingParams


# The token id of a placeholder: the token is still being sampled (on the device, under async scheduling).
PLACEHOLDER = -1


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    __slots__ = (
        "seq_id", "request_id", "index", "params", "token_ids", "num_prompt_tokens",
        "num_computed_tokens", "num_cached_tokens", "block_table", "block_hashes",
        "status", "finish_reason", "stop_reason", "eos_token_ids", "max_model_len",
        "forked", "num_preemptions",
    )

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: list[int],
        max_model_len: int,
        index: int = 0,
    ) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index  # which of the request's n outputs this is
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # of full blocks, computed lazily
        self.status = Status.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.stop_reason: int | str | None = None
        self.eos_token_ids = [] if params.ignore_eos else eos_token_ids
        self.max_model_len = max_model_len
        self.forked = params.n == 1 or index > 0
        self.num_preemptions = 0

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id}, req={self.request_id!r}, tokens={len(self.token_ids)}, "
                f"computed={self.num_computed_tokens}, {self.status.value})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def reached_length(self) -> bool:
        """Its last token (perhaps not sampled yet) is its last: max_tokens or the context is reached."""
        p = self.params
        return (p.max_tokens is not None and self.num_output_tokens >= p.max_tokens) \
            or self.num_tokens >= self.max_model_len

    def append_placeholder(self) -> int:
        """Reserve the place of a token still being sampled; returns its index."""
        self.token_ids.append(PLACEHOLDER)
        return len(self.token_ids) - 1

    def set_token(self, index: int, token_id: int) -> None:
        """Fill a placeholder with its sampled token and decide whether the sequence is done there."""
        self.token_ids[index] = token_id
        num_tokens = index + 1
        n_out = num_tokens - self.num_prompt_tokens
        p = self.params
        if n_out >= p.min_tokens:
            if token_id in self.eos_token_ids:
                self.finish_reason, self.stop_reason = "stop", None
            elif token_id in p.stop_token_ids:
                self.finish_reason, self.stop_reason = "stop", token_id
        if self.finish_reason is None:
            if (p.max_tokens is not None and n_out >= p.max_tokens) or num_tokens >= self.max_model_len:
                self.finish_reason = "length"
        if self.finish_reason is not None:  # a later placeholder (async scheduling) will never be a token
            del self.token_ids[num_tokens:]
