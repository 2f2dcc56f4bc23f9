"""The FastAPI app: OpenAI-compatible routes over an `Engine`, with API key, limits and error shapes.

Bodies are read and validated by hand (not as FastAPI body parameters) so that the size limit applies
while reading (413) and malformed JSON or a bad field is a 400 in OpenAI's error shape, never a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from distill.data.encoding import encode_prompt
from distill.serving.engine import Engine, Row, RowEvent, SamplingParams
from distill.serving.protocol import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    OpenAIError,
    chat_logprobs,
    completion_logprobs,
    error_body,
    validation_error,
)


@dataclass
class ServeOptions:
    """Per-server limits; `None` for max_prompt_tokens means the model's context length."""

    served_model_name: str = "student"
    api_key: str | None = None
    max_prompt_tokens: int | None = None
    max_tokens_limit: int = 1024
    max_body_bytes: int = 1_000_000
    max_n: int = 16
    max_logprobs: int = 20
    return_tokens_as_token_ids: bool = False  # default for requests that do not say


def create_app(engine: Engine, options: ServeOptions | None = None) -> FastAPI:
    """The app; the engine's batching worker runs for the app's lifetime."""
    opts = options or ServeOptions()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="distill serve", lifespan=lifespan)
    app.state.engine, app.state.options = engine, opts
    _install_error_handlers(app)
    created = int(time.time())

    def auth(request: Request) -> None:
        if not opts.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), opts.api_key.encode()):
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict:
        s = engine.stats
        return {"status": "ok", "model": opts.served_model_name, "batches": s.batches, "rows": s.rows,
                "joined": s.joined, "max_rows_in_batch": s.max_rows_in_batch,
                "mean_rows_per_step": s.step_rows / max(s.steps, 1), "generated_tokens": s.generated_tokens}

    def model_card() -> dict:
        return {"id": opts.served_model_name, "object": "model", "created": created, "owned_by": "distill",
                "max_model_len": engine.context_length}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        auth(request)
        _check_model(model_id, opts)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        auth(request)
        req = await _parse(request, CompletionRequest, opts)
        prompts = _completion_prompts(req, engine)
        return await _respond(engine, opts, req, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        auth(request)
        req = await _parse(request, ChatRequest, opts)
        prompts = [_chat_prompt(req.messages, engine.tok)]
        return await _respond(engine, opts, req, prompts, chat=True)

    return app


# ---- request handling ------------------------------------------------------------------------------
async def _read_body(request: Request, limit: int) -> bytes:
    too_big = OpenAIError(413, f"request body larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: Request, schema, opts: ServeOptions):
    raw = await _read_body(request, opts.max_body_bytes)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        req = schema.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    req.check_supported()
    _check_model(req.model, opts)
    if req.n > opts.max_n:
        raise OpenAIError(400, f"n must be at most {opts.max_n}", param="n", code="invalid_value")
    k = req.logprobs if isinstance(req, CompletionRequest) else req.top_logprobs
    if k is not None and k > opts.max_logprobs:
        name = "logprobs" if isinstance(req, CompletionRequest) else "top_logprobs"
        raise OpenAIError(400, f"{name} must be at most {opts.max_logprobs}", param=name, code="invalid_value")
    return req


def _check_model(name: str, opts: ServeOptions) -> None:
    if name != opts.served_model_name:
        raise OpenAIError(404, f"The model '{name}' does not exist; this server serves "
                               f"'{opts.served_model_name}'.", param="model", code="model_not_found")


def _completion_prompts(req: CompletionRequest, engine: Engine) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        items: list = [p]
    elif p and all(isinstance(x, int) for x in p):
        items = [p]
    else:
        items = list(p)
    if not items:
        raise OpenAIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):  # the one prompt rule; an empty string stays empty (rejected below)
            ids = encode_prompt(engine.tok, item, rendered_with_template=False) if item else []
        else:
            ids = list(item)
        vocab = len(engine.tok)
        if any(not 0 <= t < max(vocab, engine.model.config.vocab_size) for t in ids):
            raise OpenAIError(400, f"prompt {i}: token id out of range", param="prompt", code="invalid_value")
        if not ids:
            raise OpenAIError(400, f"prompt {i} is empty", param="prompt", code="invalid_value")
        out.append(ids)
    return out


def _chat_prompt(messages: list[ChatMessage], tok) -> list[int]:
    turns = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(messages)]
    if getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001  (any template error is the request's fault)
            raise OpenAIError(400, f"chat template rejected the messages: {exc}", param="messages",
                              code="invalid_value") from None
        return encode_prompt(tok, text, rendered_with_template=True)
    # no template: a plain "role: content" transcript, the same fallback the hf teacher uses
    text = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
    return encode_prompt(tok, text, rendered_with_template=False)


def _max_tokens(req, prompts: list[list[int]], engine: Engine, opts: ServeOptions) -> int:
    longest = max(len(p) for p in prompts)
    param = "messages" if isinstance(req, ChatRequest) else "prompt"
    limit = opts.max_prompt_tokens or engine.context_length
    if limit and longest > limit:
        raise OpenAIError(400, f"prompt has {longest} tokens; the limit is {limit}", param=param,
                          code="context_length_exceeded")
    room = (engine.context_length - longest) if engine.context_length else opts.max_tokens_limit
    asked = req.max_tokens
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        asked = req.max_completion_tokens
    if asked is None:  # chat default: as much as fits
        asked = min(opts.max_tokens_limit, room)
        if asked < 1:
            raise OpenAIError(400, f"prompt has {longest} tokens and leaves no room in the "
                                   f"{engine.context_length}-token context", param=param,
                              code="context_length_exceeded")
        return asked
    if asked > opts.max_tokens_limit:
        raise OpenAIError(400, f"max_tokens is {asked}; the limit is {opts.max_tokens_limit}",
                          param="max_tokens", code="invalid_value")
    if asked > room:
        raise OpenAIError(400, f"prompt ({longest} tokens) + max_tokens ({asked}) exceeds the model's "
                               f"context length {engine.context_length}", param="max_tokens",
                          code="context_length_exceeded")
    return asked


class _Submission:
    """The rows of one request and the asyncio queue their events come back on."""

    def __init__(self, engine: Engine, prompts: list[list[int]], n: int, params: SamplingParams):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.rows: list[Row] = []
        for p_index, ids in enumerate(prompts):
            for j in range(n):
                index = p_index * n + j
                seed = None if params.seed is None else params.seed + j
                rp = SamplingParams(params.max_tokens, params.temperature, params.top_p, params.stop,
                                    params.logprobs, seed)

                def sink(ev: RowEvent, index=index) -> None:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (index, ev))

                self.rows.append(Row(ids, rp, sink))
        self.engine = engine

    async def events(self) -> AsyncIterator[tuple[int, RowEvent]]:
        self.engine.submit(self.rows)
        pending = len(self.rows)
        try:
            while pending:
                index, ev = await self.queue.get()
                if ev.finish_reason is not None:
                    pending -= 1
                yield index, ev
        finally:
            self.cancel()

    def cancel(self) -> None:
        for row in self.rows:
            row.cancelled.set()


async def _respond(engine: Engine, opts: ServeOptions, req, prompts: list[list[int]], chat: bool):
    max_tokens = _max_tokens(req, prompts, engine, opts)
    if chat:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
    params = SamplingParams(max_tokens, req.temperature, req.top_p, tuple(req.stop or ()), logprobs, req.seed)
    sub = _Submission(engine, prompts, req.n, params)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": opts.served_model_name, "system_fingerprint": None}
    prompt_tokens = sum(len(p) for p in prompts)
    as_ids = req.return_tokens_as_token_ids
    as_ids = opts.return_tokens_as_token_ids if as_ids is None else as_ids
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        lp_mode = None if logprobs is None else as_ids
        return StreamingResponse(_stream(sub, head, chat, lp_mode, prompt_tokens, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    n_choices = len(sub.rows)
    texts, tokens, reasons = [[] for _ in range(n_choices)], [[] for _ in range(n_choices)], [None] * n_choices
    async for index, ev in sub.events():
        if ev.error:
            sub.cancel()
            raise OpenAIError(500, f"generation failed: {ev.error}", type="server_error")
        texts[index].append(ev.text)
        tokens[index].extend(ev.tokens)
        reasons[index] = ev.finish_reason or reasons[index]
    choices = []
    for i in range(n_choices):
        text = "".join(texts[i])
        lp = None
        if logprobs is not None:
            lp = chat_logprobs(tokens[i], as_ids) if chat else completion_logprobs(tokens[i], 0, as_ids)
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                            "finish_reason": reasons[i]})
        else:
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": reasons[i]})
    completion_tokens = sum(len(t) for t in tokens)
    return {**head, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _stream(sub: _Submission, head: dict, chat: bool, lp_mode: bool | None, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[str]:
    """SSE: `data: {chunk}\\n\\n` per event, an optional usage chunk, then `data: [DONE]`.
    `lp_mode`: None (no logprobs), else whether token strings are "token_id:N"."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if include_usage else {}
    offsets = [0] * len(sub.rows)
    completion_tokens = 0

    def chunk(choices: list) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    if chat:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(len(sub.rows))])
    async for index, ev in sub.events():
        if ev.error:
            yield f"data: {json.dumps(error_body(f'generation failed: {ev.error}', 'server_error'))}\n\n"
            return
        completion_tokens += len(ev.tokens)
        lp = None
        if lp_mode is not None and ev.tokens:
            lp = (chat_logprobs(ev.tokens, lp_mode) if chat
                  else completion_logprobs(ev.tokens, offsets[index], lp_mode))
        offsets[index] += len(ev.text)
        if chat:
            delta = {"content": ev.text} if ev.text or not ev.finish_reason else {}
            yield chunk([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}])
        else:
            yield chunk([{"index": index, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}])
    if include_usage:
        usage_chunk = {**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}
        yield f"data: {json.dumps(usage_chunk)}\n\n"
    yield "data: [DONE]\n\n"


# ---- errors ----------------------------------------------------------------------------------------
def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        err = validation_error(exc)
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), param=None, code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)
