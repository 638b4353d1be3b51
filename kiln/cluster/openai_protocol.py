"""OpenAI request bodies (pydantic) and the errors kiln answers with.

Field names, defaults and error bodies follow the OpenAI API, so the official
client works unchanged. vLLM's common extensions (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids) are accepted too.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from kiln.config import SamplingParams


class APIError(Exception):
    """Becomes {"error": {"message", "type", "param", "code"}} with this HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: StrictInt | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # vLLM-style extensions
    top_k: StrictInt | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: StrictInt | None = None
    ignore_eos: StrictBool | None = None
    stop_token_ids: list[StrictInt] | None = None

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        extra = {k: v for k, v in dict(top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                                       min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
                                       stop_token_ids=self.stop_token_ids,
                                       presence_penalty=self.presence_penalty,
                                       frequency_penalty=self.frequency_penalty,
                                       temperature=self.temperature, top_p=self.top_p).items() if v is not None}
        try:
            return SamplingParams(n=self.n, max_tokens=max_tokens, stop=self.stop, seed=self.seed, logprobs=logprobs,
                                  **extra)
        except ValueError as e:
            msg = str(e)
            raise APIError(400, msg, param=msg.split(" ", 1)[0]) from None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise APIError(400, f"unsupported content part {p.get('type')!r}: this model reads text only",
                               param="messages")
            parts.append(p["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        n_lp = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(self.max_completion_tokens if self.max_completion_tokens is not None
                              else self.max_tokens, n_lp)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False

    def sampling_params(self) -> SamplingParams:
        return self._sampling(self.max_tokens, self.logprobs)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)
