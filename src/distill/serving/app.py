"""The FastAPI app: OpenAI-compatible routes over an `Engine`, with API key, limits and error shapes.

Bodies are read and validated by hand (not as FastAPI body parameters) so that the size limit applies
while reading (413) and malformed JSON or a bad field is a 400 in OpenAI's error shape, never a 500.
Everything is validated before a request's rows reach the engine (and so before a stream starts: a
stream's 200 cannot be taken back). A request whose client disconnects is abandoned: its rows are
cancelled, queued or mid-decode, so they stop costing other requests time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from distill.data.encoding import encode_prompt
from distill.data.prompt_format import PromptFormat, render_chat
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
    max_request_rows: int = 1024  # prompts x n of one request: bounds its queue memory and its share of the engine
    max_logprobs: int = 20
    return_tokens_as_token_ids: bool = False  # default for requests that do not say
    disconnect_poll_s: float = 0.1  # how often a waiting request checks that its client is still there
    # how the student was trained to see prompts (prompt_format.json); None: its chat template, if any
    prompt_format: PromptFormat | None = None


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
                "mean_rows_per_step": s.step_rows / max(s.steps, 1), "generated_tokens": s.generated_tokens,
                "cancelled": s.cancelled, "failed": s.failed, "queued": engine.queued, "running": engine.running,
                **({"draft": _draft_health(s)} if engine.draft is not None else {})}

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
        prompts, texts = _completion_prompts(req, engine, opts)
        return await _respond(request, engine, opts, req, prompts, chat=False, prompt_texts=texts)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        auth(request)
        req = await _parse(request, ChatRequest, opts)
        prompts = [_chat_prompt(req.messages, engine.tok, opts.prompt_format)]
        return await _respond(request, engine, opts, req, prompts, chat=True)

    return app


def _draft_health(s) -> dict:
    """Speculative decoding counters: acceptance (accepted / proposed draft tokens) and tokens per teacher
    forward while drafting (1.0 would mean the draft never helped)."""
    return {"rows": s.drafted_rows, "verifications": s.draft_verifications, "proposed": s.draft_proposed,
            "accepted": s.draft_accepted,
            "acceptance": s.draft_accepted / s.draft_proposed if s.draft_proposed else None,
            "tokens_per_teacher_forward": s.verified_tokens / s.draft_verifications if s.draft_verifications else None}


# ---- request handling ------------------------------------------------------------------------------
def _check_framing(request: Request) -> None:
    """JSON only (415 otherwise: a form or text/plain POST from a web page needs no CORS preflight, so it could
    drive a server without an API key), and one body length: Content-Length with Transfer-Encoding is how
    requests are smuggled past a proxy that reads the other one (RFC 9112 6.3), so it is a 400."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise OpenAIError(415, f"Content-Type must be application/json (got '{media or 'none'}')",
                          code="unsupported_media_type")
    if "content-length" in request.headers and "transfer-encoding" in request.headers:
        raise OpenAIError(400, "a request must not have both Content-Length and Transfer-Encoding",
                          code="invalid_request")


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
    _check_framing(request)
    raw = await _read_body(request, opts.max_body_bytes)
    try:
        data = json.loads(raw)
    except RecursionError:
        param = _deep_param(raw)
        where = f"'{param}'" if param else "the request body"
        raise OpenAIError(400, f"{where} is nested too deeply to parse", param=param,
                          code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, or an integer of > 4300 digits
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


_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _deep_param(raw: bytes, limit: int = 200) -> str | None:
    """The top-level field under which `raw` nests deeper than `limit` (None: the body itself, or not
    an object). Only run once parsing failed, so a normal request never pays for it."""
    depth, key, last, is_object = 0, None, None, None
    for m in _JSON_TOKEN.finditer(raw):
        tok = m.group()
        if tok[:1] == b'"':
            if depth == 1:
                last = tok  # at depth 1 a string right before a bracket is that value's key
        elif tok in (b"[", b"{"):
            if is_object is None:
                is_object = tok == b"{"
            if depth == 1:
                key = last
            depth += 1
            if depth > limit:
                break
        else:
            depth -= 1
    if depth <= limit or not is_object or key is None:
        return None
    try:
        return json.loads(key)
    except ValueError:
        return None


def _check_model(name: str, opts: ServeOptions) -> None:
    if name != opts.served_model_name:
        raise OpenAIError(404, f"The model '{name}' does not exist; this server serves "
                               f"'{opts.served_model_name}'.", param="model", code="model_not_found")


def _completion_prompts(req: CompletionRequest, engine: Engine,
                        opts: ServeOptions) -> tuple[list[list[int]], list[str]]:
    """Token ids of each prompt, and its text (what `echo` sends back: the string as sent, or the ids decoded)."""
    p = req.prompt
    if isinstance(p, str):
        items: list = [p]
    elif p and all(type(x) is int for x in p):
        items = [p]
    else:
        items = list(p)
    if not items:
        raise OpenAIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    if len(items) * req.n > opts.max_request_rows:  # before any prompt is tokenized
        raise OpenAIError(400, f"{len(items)} prompts x n={req.n} is {len(items) * req.n} sequences; this server "
                               f"takes at most {opts.max_request_rows} per request (--max-request-rows): split "
                               "the prompts over several requests", param="prompt", code="too_many_sequences")
    out, texts = [], []
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
        texts.append(item if isinstance(item, str) else engine.tok.decode(ids, skip_special_tokens=True))
    return out, texts


def _chat_prompt(messages: list[ChatMessage], tok, fmt: PromptFormat | None) -> list[int]:
    """The messages rendered as the student was trained (its prompt format), else with its chat template;
    a model with neither was never taught a chat format, so a guessed one would be garbage: a 400."""
    turns = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(messages)]
    has_template = bool(getattr(tok, "chat_template", None))
    if fmt is None and not has_template:
        raise OpenAIError(400, "this model has no chat template and no prompt format from distill train "
                               "(prompt_format.json), so chat messages cannot be rendered as it was trained; "
                               "send the prompt text to /v1/completions", param="messages", code="no_chat_format")
    fmt = fmt or PromptFormat(chat_template=True, chat_rows=True)
    try:
        text = render_chat(turns, tok, fmt)
    except Exception as exc:  # noqa: BLE001  (any template error is the request's fault)
        raise OpenAIError(400, f"chat template rejected the messages: {exc}", param="messages",
                          code="invalid_value") from None
    return encode_prompt(tok, text, rendered_with_template=fmt.chat_template and has_template)


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


class ClientGone(Exception):
    """The client of a request disconnected; its rows were cancelled."""


class _Submission:
    """The rows of one request and the asyncio queue their events come back on."""

    def __init__(self, engine: Engine, prompts: list[list[int]], n: int, params: SamplingParams):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.rows: list[Row] = []
        for p_index, ids in enumerate(prompts):
            for j in range(n):
                index = p_index * n + j
                rp = replace(params, seed=None if params.seed is None else params.seed + j)

                def sink(ev: RowEvent, index=index) -> None:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (index, ev))

                self.rows.append(Row(ids, rp, sink))
        self.engine = engine
        self.group = None  # the engine's handle for this request's queued rows

    async def events(self, request: Request, poll_s: float) -> AsyncIterator[tuple[int, RowEvent]]:
        """Every row's events until all rows finished; raises ClientGone (rows cancelled) when the
        client disconnects first."""
        self.group = self.engine.submit(self.rows)
        watcher = asyncio.create_task(self._watch(request, poll_s))
        pending = len(self.rows)
        try:
            while pending:
                item = await self.queue.get()
                if item is None:
                    raise ClientGone()
                index, ev = item
                if ev.finish_reason is not None:
                    pending -= 1
                yield index, ev
        finally:
            watcher.cancel()
            self.cancel()

    async def _watch(self, request: Request, poll_s: float) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(poll_s)
        self.cancel()
        self.queue.put_nowait(None)

    def cancel(self) -> None:
        """Rows still queued leave the queue at once; running ones leave the batch at its next step."""
        for row in self.rows:
            row.cancelled.set()
        if self.group is not None:
            self.engine.withdraw(self.group)


async def _respond(request: Request, engine: Engine, opts: ServeOptions, req, prompts: list[list[int]],
                   chat: bool, prompt_texts: list[str] | None = None):
    max_tokens = _max_tokens(req, prompts, engine, opts)
    if chat:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
    echo = not chat and req.echo
    prompt_lp = logprobs if echo else None
    params = SamplingParams(max_tokens, req.temperature, req.top_p, tuple(req.stop or ()), logprobs, req.seed,
                            prompt_lp)
    sub = _Submission(engine, prompts, req.n, params)
    echoes = [prompt_texts[i // req.n] for i in range(len(sub.rows))] if echo else None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": opts.served_model_name, "system_fingerprint": None}
    prompt_tokens = sum(len(p) for p in prompts)
    as_ids = req.return_tokens_as_token_ids
    as_ids = opts.return_tokens_as_token_ids if as_ids is None else as_ids
    lp_mode = None if logprobs is None else as_ids
    special = frozenset(engine.tok.all_special_ids)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(request, opts, sub, head, chat, lp_mode, prompt_tokens, include_usage,
                                         echoes, special),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    n_choices = len(sub.rows)
    texts, tokens, reasons = [[] for _ in range(n_choices)], [[] for _ in range(n_choices)], [None] * n_choices
    prompt_infos: list[list] = [[] for _ in range(n_choices)]
    try:
        async for index, ev in sub.events(request, opts.disconnect_poll_s):
            if ev.error:
                raise OpenAIError(500, f"generation failed: {ev.error}", type="server_error")
            prompt_infos[index].extend(ev.prompt_tokens)
            texts[index].append(ev.text)
            tokens[index].extend(ev.tokens)
            reasons[index] = ev.finish_reason or reasons[index]
    except ClientGone:  # nobody reads this answer; 499 is what nginx logs for it
        return JSONResponse(error_body("client disconnected", code="client_disconnected"), status_code=499)
    choices = []
    for i in range(n_choices):
        text = "".join(texts[i])
        lp = None
        if logprobs is not None and chat:
            lp = chat_logprobs(tokens[i], as_ids)
        elif logprobs is not None:
            start = len(echoes[i]) if echo else 0
            lp = completion_logprobs(tokens[i], start, as_ids)
            if echo:
                lp = _join_logprobs(completion_logprobs(prompt_infos[i], 0, as_ids, special), lp)
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                            "finish_reason": reasons[i]})
        else:
            choices.append({"index": i, "text": (echoes[i] if echo else "") + text, "logprobs": lp,
                            "finish_reason": reasons[i]})
    completion_tokens = sum(len(t) for t in tokens)
    return {**head, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}


def _join_logprobs(a: dict, b: dict) -> dict:
    """Echo: the prompt's logprobs, then the completion's, as one completions `logprobs` object."""
    return {key: a[key] + b[key] for key in a}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _stream(request: Request, opts: ServeOptions, sub: _Submission, head: dict, chat: bool,
                  lp_mode: bool | None, prompt_tokens: int, include_usage: bool, echoes: list[str] | None,
                  special: frozenset) -> AsyncIterator[str]:
    """SSE: `data: {chunk}\\n\\n` per event, an optional usage chunk, then `data: [DONE]`.
    `lp_mode`: None (no logprobs), else whether token strings are "token_id:N". With `echoes` (completions
    with echo) each choice's first chunk is its prompt text, with the prompt's logprobs."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if include_usage else {}
    offsets = [0] * len(sub.rows)
    echoed = [echoes is None] * len(sub.rows)
    completion_tokens = 0

    def chunk(choices: list) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    if chat:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(len(sub.rows))])
    try:
        async for index, ev in sub.events(request, opts.disconnect_poll_s):
            if ev.error:  # the 200 is sent already: an error event, then the end of the stream
                yield f"data: {json.dumps(error_body(f'generation failed: {ev.error}', 'server_error'))}\n\n"
                break
            if not echoed[index]:  # the prompt goes first, once (with its logprobs if they were asked)
                echoed[index] = True
                text = echoes[index]
                lp = None
                if lp_mode is not None and ev.prompt_tokens:
                    lp = completion_logprobs(ev.prompt_tokens, 0, lp_mode, special)
                offsets[index] = len(text)
                yield chunk([{"index": index, "text": text, "logprobs": lp, "finish_reason": None}])
                if ev.prompt_tokens:
                    continue
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
        else:
            if include_usage:
                usage_chunk = {**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}
                yield f"data: {json.dumps(usage_chunk)}\n\n"
    except ClientGone:
        return
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
