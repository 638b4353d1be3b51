"""The OpenAI-compatible HTTP front: /v1/chat/completions, /v1/completions,
/v1/models, /health, /metrics.

Validates input (bad input: 4xx with an OpenAI error body; the server keeps
serving), applies the chat template, tokenizes, asks the router for a replica
(429 with Retry-After when every queue is full), and turns the replica's
token stream into text: incremental detokenization, stop strings, logprobs,
server-sent events. A client that disconnects aborts its request.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from kiln.cluster.metrics import Metrics
from kiln.cluster.openai_protocol import APIError, ChatCompletionRequest, CompletionRequest
from kiln.cluster.protocol import Chunk
from kiln.cluster.router import Overloaded, Router
from kiln.config import SamplingParams, ServeConfig
from kiln.outputs import RequestState
from kiln.scheduler.block_manager import prompt_block_hashes
from kiln.tokenizer import Tokenizer
from kiln.workers.executor import TokenEvent

DISCONNECT_CHECK_S = 1.0


class Backend(Protocol):
    """How the server reaches replicas (Ray Serve handles in deployment.py)."""

    def stream(self, request_id: str, prompt: list[int], params: SamplingParams,
               hashes: list[int]) -> AsyncIterator[Chunk]: ...

    async def abort(self, request_id: str, index: int | None) -> None: ...

    async def ready(self) -> tuple[bool, dict]: ...


class OpenAIServer:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, config: ServeConfig, model_name: str,
                 max_model_len: int, router: Router) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.config = config
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.router = router
        self.metrics = Metrics(router)
        self.block_size = config.engine.cache.block_size
        self.created = int(time.time())

    # -- checks ----------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def _check_length(self, prompt: list[int], params: SamplingParams, param: str) -> None:
        if not prompt:
            raise APIError(400, "the prompt is empty", param=param)
        if len(prompt) >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                                f"has {len(prompt)} tokens", param=param, code="context_length_exceeded")
        if params.max_tokens is not None and len(prompt) + params.max_tokens > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                                f"({len(prompt)}) plus max_tokens ({params.max_tokens}) exceeds it",
                           param="max_tokens", code="context_length_exceeded")
        vocab = self.tokenizer.vocab_size
        if any(t < 0 or t >= vocab for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param=param)

    # -- one request -------------------------------------------------------------

    async def _run(self, prompt_ids: list[int], params: SamplingParams, prompt_text: str | None,
                   is_disconnected=None) -> AsyncIterator[RequestState]:
        """Yield the request's state after each chunk of tokens, until it finishes."""
        request_id = uuid.uuid4().hex
        state = RequestState(request_id, prompt_text, prompt_ids, params, self.tokenizer)
        hashes = prompt_block_hashes(prompt_ids, self.block_size)
        try:
            self.router.admit(request_id)
        except Overloaded as e:
            self.metrics.rejected.inc()
            raise APIError(429, f"server overloaded: {e}; retry shortly", type_="rate_limit_exceeded",
                           headers={"Retry-After": str(self.config.router.retry_after_s)}) from None
        t0 = checked = time.perf_counter()
        first = last = None
        replica = ""
        stream = self.backend.stream(request_id, prompt_ids, params, hashes)
        try:
            async for chunk in stream:
                replica = state.replica = chunk.replica or replica
                if chunk.error:
                    raise APIError(chunk.error.get("status", 500), chunk.error.get("message", "replica error"),
                                   type_="invalid_request_error" if chunk.error.get("status") == 400
                                   else "server_error")
                now = time.perf_counter()
                n0 = 0
                for row in chunk.events:
                    ev = TokenEvent.unpack(row)
                    n0 += ev.index == 0
                    if state.add_token(ev.index, ev.token_id, ev.logprobs, ev.finish_reason, ev.stop_reason,
                                       ev.num_cached_tokens) and not state.finished:
                        await self.backend.abort(request_id, ev.index)
                for _, index in chunk.aborted:
                    co = state.output.outputs[index]
                    if not co.finished:
                        co.finish_reason = "abort"
                state.output.finished = all(o.finished for o in state.output.outputs)
                if chunk.events:
                    if first is None:
                        first = now
                        self.metrics.ttft.labels(replica).observe(now - t0)
                        self.router.first_token(request_id)
                    elif n0:  # a message may carry several tokens: spread the gap over them
                        itl = self.metrics.itl.labels(replica)
                        for _ in range(n0):
                            itl.observe((now - last) / n0)
                    last = now
                yield state
                if state.finished:
                    break
                # Asking costs an ASGI receive per message; checking now and then is enough.
                if is_disconnected is not None and now - checked > DISCONNECT_CHECK_S:
                    checked = now
                    if await is_disconnected():
                        break
        finally:
            await stream.aclose()  # if we stop early (disconnect, error), the replica aborts the request
            self.router.finished(request_id)
            if state.finished:
                out = state.output
                self.metrics.e2e.labels(replica).observe(time.perf_counter() - t0)
                self.metrics.prompt_tokens.labels(replica).inc(len(prompt_ids))
                self.metrics.generation_tokens.labels(replica).inc(sum(len(o.token_ids) for o in out.outputs))
                for o in out.outputs:
                    self.metrics.requests.labels(o.finish_reason or "unknown").inc()

    async def _merge(self, runs: list[AsyncIterator[RequestState]]) -> AsyncIterator[tuple[int, RequestState]]:
        """Run several requests at once (a completions call with many prompts), yielding as they progress."""
        if len(runs) == 1:
            async for st in runs[0]:
                yield 0, st
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, run: AsyncIterator[RequestState]) -> None:
            try:
                async for st in run:
                    await queue.put((i, st, None))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                await queue.put((i, None, e))
            finally:
                await queue.put((i, None, StopAsyncIteration()))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(runs)]
        done = 0
        try:
            while done < len(runs):
                i, st, err = await queue.get()
                if isinstance(err, StopAsyncIteration):
                    done += 1
                elif err is not None:
                    raise err
                else:
                    yield i, st
        finally:
            for t in tasks:
                t.cancel()

    # -- chat ----------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        params = body.sampling_params()
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt_ids = self.tokenizer.encode_chat(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        self._check_length(prompt_ids, params, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        run = self._run(prompt_ids, params, None, request.is_disconnected)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            first = await _first(run)  # errors (429, replica refusal) become HTTP errors, not a broken stream
            return StreamingResponse(self._chat_stream(rid, first, run, params, include_usage, len(prompt_ids)),
                                     media_type="text/event-stream")
        state = None
        async for state in run:
            pass
        out = state.output
        choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                    "logprobs": {"content": _chat_logprobs(o.logprobs, o.token_ids, params.logprobs)}
                    if o.logprobs is not None else None,
                    "finish_reason": _finish(o.finish_reason)} for o in out.outputs]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()),
                             "model": self.model_name, "choices": choices,
                             "usage": _usage(len(prompt_ids), out)},
                            headers={"x-kiln-replica": state.replica})

    async def _chat_stream(self, rid: str, first: RequestState | None, run, params: SamplingParams,
                           include_usage: bool, n_prompt: int) -> AsyncIterator[str]:
        created = int(time.time())
        sent_text = [0] * params.n
        sent_lp = [0] * params.n
        done = [False] * params.n

        def chunk(choices: list, usage=None) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": choices}
            if include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(params.n)])
        state = first
        try:
            async for state in _chain(first, run):
                choices = []
                for o in state.output.outputs:
                    i = o.index
                    if done[i]:
                        continue
                    text = state.stream_text(i)
                    delta_text, sent_text[i] = text[sent_text[i]:], len(text)
                    lps = None
                    if o.logprobs is not None and len(o.logprobs) > sent_lp[i]:
                        k = sent_lp[i]
                        lps = {"content": _chat_logprobs(o.logprobs[k:], o.token_ids[k:], params.logprobs)}
                        sent_lp[i] = len(o.logprobs)
                    if delta_text or lps or o.finished:
                        choices.append({"index": i, "delta": {"content": delta_text} if delta_text else {},
                                        "logprobs": lps, "finish_reason": _finish(o.finish_reason)})
                        done[i] = o.finished
                if choices:
                    yield chunk(choices)
            if include_usage and state is not None:
                yield chunk([], _usage(n_prompt, state.output))
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    # -- completions ---------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        params = body.sampling_params()
        prompts = []
        for p in body.prompts():
            ids = self.tokenizer.encode(p) if isinstance(p, str) else p
            self._check_length(ids, params, "prompt")
            prompts.append((p if isinstance(p, str) else None, ids))
        rid = f"cmpl-{uuid.uuid4().hex}"
        runs = [self._run(ids, params, text, request.is_disconnected) for text, ids in prompts]
        merged = self._merge(runs)
        n = params.n
        n_prompt = sum(len(ids) for _, ids in prompts)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            first = await _first(merged)
            return StreamingResponse(self._completion_stream(rid, first, merged, prompts, params, body.echo,
                                                             include_usage, n_prompt),
                                     media_type="text/event-stream")
        final: dict[int, RequestState] = {}
        async for i, st in merged:
            final[i] = st
        choices, completion_tokens = [], 0
        for pi, (text, ids) in enumerate(prompts):
            for o in final[pi].output.outputs:
                completion_tokens += len(o.token_ids)
                prefix = (text if text is not None else self.tokenizer.decode(ids)) if body.echo else ""
                choices.append({"index": pi * n + o.index, "text": prefix + o.text,
                                "logprobs": _completion_logprobs(o.logprobs, o.token_ids, params.logprobs)
                                if o.logprobs is not None else None,
                                "finish_reason": _finish(o.finish_reason)})
        return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()),
                             "model": self.model_name, "choices": choices,
                             "usage": {"prompt_tokens": n_prompt, "completion_tokens": completion_tokens,
                                       "total_tokens": n_prompt + completion_tokens}})

    async def _completion_stream(self, rid, first, merged, prompts, params, echo, include_usage,
                                 n_prompt) -> AsyncIterator[str]:
        created = int(time.time())
        n = params.n
        sent_text: dict[int, int] = {}
        sent_lp: dict[int, int] = {}
        done: set[int] = set()
        last: dict[int, RequestState] = {}

        def chunk(choices: list, usage=None) -> str:
            body = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": choices}
            if include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            async for pi, state in _chain(first, merged):
                last[pi] = state
                choices = []
                for o in state.output.outputs:
                    idx = pi * n + o.index
                    if idx in done:
                        continue
                    text = state.stream_text(o.index)
                    if idx not in sent_text:
                        sent_text[idx], sent_lp[idx] = 0, 0
                        if echo:
                            t, ids = prompts[pi]
                            text_prefix = t if t is not None else self.tokenizer.decode(ids)
                            choices.append({"index": idx, "text": text_prefix, "logprobs": None,
                                            "finish_reason": None})
                    delta = text[sent_text[idx]:]
                    sent_text[idx] = len(text)
                    lps = None
                    if o.logprobs is not None and len(o.logprobs) > sent_lp[idx]:
                        k = sent_lp[idx]
                        lps = _completion_logprobs(o.logprobs[k:], o.token_ids[k:], params.logprobs)
                        sent_lp[idx] = len(o.logprobs)
                    if delta or lps or o.finished:
                        choices.append({"index": idx, "text": delta, "logprobs": lps,
                                        "finish_reason": _finish(o.finish_reason)})
                        if o.finished:
                            done.add(idx)
                if choices:
                    yield chunk(choices)
            if include_usage:
                completion = sum(len(o.token_ids) for st in last.values() for o in st.output.outputs)
                yield chunk([], {"prompt_tokens": n_prompt, "completion_tokens": completion,
                                 "total_tokens": n_prompt + completion})
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    # -- the rest --------------------------------------------------------------------

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "kiln", "max_model_len": self.max_model_len}]}


async def _first(run):
    """The first item of a run (so that errors surface before the HTTP response starts)."""
    try:
        return await run.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(first, rest):
    if first is not None:
        yield first
    async for item in rest:
        yield item


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("stop" if reason == "abort" else reason)


def _usage(n_prompt: int, out) -> dict:
    completion = sum(len(o.token_ids) for o in out.outputs)
    return {"prompt_tokens": n_prompt, "completion_tokens": completion, "total_tokens": n_prompt + completion}


def _top(entry: dict, n: int) -> list:
    return sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= n), key=lambda lp: lp.rank)


def _chat_logprobs(entries: list[dict], token_ids: list[int], n: int) -> list[dict]:
    def item(lp) -> dict:
        tok = lp.decoded_token or ""
        return {"token": tok, "logprob": lp.logprob, "bytes": list(tok.encode())}

    return [{**item(entry[t]), "top_logprobs": [item(lp) for lp in _top(entry, n)]}
            for entry, t in zip(entries, token_ids)]


def _completion_logprobs(entries: list[dict], token_ids: list[int], n: int, start: int = 0) -> dict:
    tokens, token_lps, tops, offsets, pos = [], [], [], [], start
    for entry, t in zip(entries, token_ids):
        chosen = entry[t]
        tokens.append(chosen.decoded_token)
        token_lps.append(chosen.logprob)
        tops.append({lp.decoded_token: lp.logprob for lp in _top(entry, n)})
        offsets.append(pos)
        pos += len(chosen.decoded_token or "")
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


class _APIKey:
    """Checks `Authorization: Bearer KEY` on /v1/*. Plain ASGI: Starlette's BaseHTTPMiddleware would
    relay every streamed chunk through an extra in-memory stream and task switch."""

    def __init__(self, app, server: OpenAIServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send) -> None:
        key = self.server.config.api_key
        if key and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            want = f"Bearer {key}".encode()
            if dict(scope["headers"]).get(b"authorization") != want:
                body = APIError(401, "missing or wrong API key (Authorization: Bearer ...)",
                                type_="authentication_error", code="invalid_api_key").body()
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_fastapi(server: OpenAIServer) -> FastAPI:
    app = FastAPI(title="kiln", version="0.1.0", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        server.metrics.errors.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            msg, param = f"malformed JSON body: {err.get('msg', '')}", None
        else:
            param = ".".join(loc) or None
            msg = f"{param}: {err.get('msg', 'invalid value')}" if param else err.get("msg", "invalid request")
        server.metrics.errors.labels("400").inc()
        return JSONResponse(APIError(400, msg, param=param).body(), status_code=400)

    app.add_middleware(_APIKey, server=server)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await server.chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await server.completions(body, request)

    @app.get("/v1/models")
    async def models() -> dict:
        return server.models()

    @app.get("/health")
    async def health() -> Response:
        ok, detail = await server.backend.ready()
        return JSONResponse({"status": "ok" if ok else "unavailable", **detail}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
