"""Request outputs and the per-request state that builds them from tokens.

Shared by the Python API and the HTTP server: incremental detokenization,
stop strings (with the text that might begin one held back from streams),
logprobs, finish reasons.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kiln.config import SamplingParams
from kiln.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or string that ended it
    # Per generated token: {token id: Logprob} holding the sampled token and the top-N.
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


class RequestState:
    """Accumulates one request's tokens into text, watching for stop strings."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer: Tokenizer | None) -> None:
        self.request_id = request_id
        self.params = params
        self.tokenizer = tokenizer
        self.output = RequestOutput(request_id, prompt, list(prompt_token_ids),
                                    [CompletionOutput(i, logprobs=[] if params.logprobs is not None else None,
                                                      cumulative_logprob=0.0 if params.logprobs is not None else None)
                                     for i in range(params.n)])
        self.detokenizers = [IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
                             if tokenizer else None for _ in range(params.n)]
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        self.replica = ""  # which replica served it (set by the HTTP server)

    @property
    def finished(self) -> bool:
        return self.output.finished

    def add_token(self, index: int, token_id: int, logprobs, finish_reason: str | None,
                  stop_reason: int | str | None, num_cached_tokens: int = 0) -> bool:
        """Record a token; returns True if a stop string ended this output (the caller aborts it)."""
        co = self.output.outputs[index]
        if co.finished:
            return False
        if index == 0 and not co.token_ids:
            self.output.num_cached_tokens = num_cached_tokens
        co.token_ids.append(token_id)
        if logprobs is not None and co.logprobs is not None:
            entry = {tid: Logprob(lp, r + 1, self._piece(tid)) for r, (tid, lp) in enumerate(logprobs.top)}
            entry[token_id] = Logprob(logprobs.logprob, logprobs.rank, self._piece(token_id))
            co.logprobs.append(entry)
            co.cumulative_logprob += logprobs.logprob
        stopped = False
        detok = self.detokenizers[index]
        if detok is not None:
            delta = detok.add([token_id])
            co.text += delta
            hit = find_stop(co.text, len(delta), self.params.stop) if self.params.stop and delta else None
            if hit is not None:
                pos, s = hit
                co.text = co.text[:pos + len(s)] if self.params.include_stop_str_in_output else co.text[:pos]
                finish_reason, stop_reason, stopped = "stop", s, True
        if finish_reason is not None:
            co.finish_reason, co.stop_reason = finish_reason, stop_reason
            self.output.finished = all(o.finished for o in self.output.outputs)
        return stopped

    def abort(self) -> None:
        for co in self.output.outputs:
            if not co.finished:
                co.finish_reason = "abort"
        self.output.finished = True

    def stream_text(self, index: int) -> str:
        """Text safe to show now: a tail that could start a stop string waits."""
        co = self.output.outputs[index]
        if co.finished or not self._holdback:
            return co.text
        return co.text[:max(0, len(co.text) - self._holdback)]

    def _piece(self, token_id: int) -> str | None:
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else None
