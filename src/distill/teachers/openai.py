"""A teacher behind any OpenAI-compatible endpoint (vLLM, SGLang, TGI, `transformers serve`, a paid API).

Requests run on a bounded thread pool, spread round robin over one or more base URLs. Retries are ours, not
the client's (its max_retries is 0) so the policy is explicit and tested: exponential backoff with jitter on
429, 408/409, 5xx, connection errors, timeouts and malformed bodies, and the server's Retry-After when it
sends one. A fatal error (unknown model, bad key, retries exhausted) stops new requests, lets the running
ones finish, yields every finished output, and only then raises, so the store keeps all finished rows.

Top-k: with generate.top_k > 0 the request asks for logprobs/top_logprobs (APIs usually cap k at 20). An
API returns token *strings*, so rows carry `topk_tokens` / `response_tokens` and `topk_ids = None`; a vLLM
server started with `--return-tokens-as-token-ids` (or `teacher.extra_body: {return_tokens_as_token_ids:
true}`) sends "token_id:N" strings, which are parsed into ids. With `teacher.tokenizer` (the served model's
tokenizer) rows also get prompt ids (completions: the ids are sent; chat: the tokenizer's chat template is
applied as the server does), and token strings that map one-to-one onto its vocabulary become ids, so the
store feeds `train.signal=offline`.
"""

from __future__ import annotations

import email.utils
import itertools
import json
import math
import os
import queue
import random
import re
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill.config import DataConfig, GenerateConfig, TeacherConfig
from distill.data.prompts import Record, render_prompt
from distill.teachers.base import Completion, Prompt, TeacherError, teacher_identity

MAX_RETRY_AFTER = 900.0  # seconds: a Retry-After longer than this is a misconfigured server, not a plan
TOKEN_ID = re.compile(r"^token_id:(\d+)$")


class DaemonPool:
    """The part of ThreadPoolExecutor we use (submit, shutdown), on daemon threads. ThreadPoolExecutor joins
    its threads at interpreter exit, so after Ctrl-C a request hung on a dead server would hold the process for
    up to teacher.timeout; a daemon thread does not."""

    def __init__(self, workers: int, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        self._queue.put((fut, fn, args))
        return fut

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                fut.set_exception(exc)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        if not self._closed:
            self._closed = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            for _ in self._threads:
                self._queue.put(None)
        if wait:
            for t in self._threads:
                t.join()


class MalformedResponse(Exception):
    """A 200 reply whose body is not a usable completion (retried like a 5xx)."""


class Cancelled(Exception):
    """The request was abandoned because another request failed fatally."""


@dataclass
class RetryPolicy:
    """Exponential backoff with 'equal jitter': attempt a waits base * 2**a * U(0.5, 1), capped at max_delay;
    a Retry-After (or retry-after-ms) header from the server wins over the computed delay."""

    max_retries: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0

    def delay(self, attempt: int, exc: BaseException | None = None, rng: random.Random | None = None) -> float:
        after = retry_after_seconds(exc)
        if after is not None:
            return min(after, MAX_RETRY_AFTER)
        rng = rng or random.Random()
        return min(self.max_delay, self.base_delay * 2.0**attempt) * (0.5 + 0.5 * rng.random())


def retry_after_seconds(exc: BaseException | None) -> float | None:
    """Seconds asked for by the Retry-After / retry-after-ms headers of an HTTP error, if any."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def is_retryable(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, (MalformedResponse, json.JSONDecodeError, openai.APIConnectionError,
                        openai.APIResponseValidationError)):
        return True  # APITimeoutError is an APIConnectionError
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 425, 429) or exc.status_code >= 500
    return False


class OpenAITeacher:
    """`Teacher` over OpenAI-compatible HTTP endpoints."""

    def __init__(self, tcfg: TeacherConfig, dcfg: DataConfig | None = None, policy: RetryPolicy | None = None):
        import openai

        if not tcfg.model:
            raise TeacherError("teacher.model is not set: give the model name the endpoint serves")
        self.tcfg = tcfg
        self.dcfg = dcfg or DataConfig()
        self.policy = policy or RetryPolicy(tcfg.max_retries, tcfg.retry_base_delay, tcfg.retry_max_delay)
        urls = tcfg.base_url if isinstance(tcfg.base_url, list) else [tcfg.base_url]
        key = os.environ.get(tcfg.api_key_env)
        if urls == [None] and not key:
            raise TeacherError(
                f"teacher.base_url is not set (so the OpenAI API is used) and ${tcfg.api_key_env} is empty: "
                "set the key, or point teacher.base_url at your server"
            )
        self.urls = [u or "https://api.openai.com/v1" for u in urls]
        self.clients = [openai.OpenAI(base_url=u, api_key=key or "EMPTY", timeout=tcfg.timeout, max_retries=0)
                        for u in self.urls]
        self.identity = teacher_identity(tcfg)
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.requests_sent = 0
        self.tokenizer = self._token_map = None
        if tcfg.tokenizer:  # ids for the store: prompt ids, and token strings mapped to ids (distill.data.tokenmap)
            from distill.modeling import load_tokenizer_for

            self.tokenizer = load_tokenizer_for(tcfg.tokenizer, tcfg.trust_remote_code)
            if tcfg.api == "chat" and not getattr(self.tokenizer, "chat_template", None):
                raise TeacherError(f"teacher.tokenizer '{tcfg.tokenizer}' has no chat template, so the prompt ids "
                                   "the chat API sees cannot be reproduced; set teacher.api=completions")

    @classmethod
    def from_config(cls, config, device: str | None = None, tokenizer=None) -> OpenAITeacher:
        """The registry's constructor (distill.teachers.registry); an endpoint has no device or tokenizer."""
        return cls(config.teacher, config.data)

    def render(self, record: Record) -> str:
        return render_prompt(record, None, self.dcfg)  # the API applies the model's own chat template

    def messages(self, record: Record) -> list[dict[str, str]]:
        messages = record.messages or [{"role": "user", "content": record.prompt or ""}]
        if self.dcfg.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.dcfg.system_prompt}, *messages]
        return messages

    def close(self) -> None:
        for c in self.clients:
            c.close()

    # ------------------------------------------------------------ scheduling

    def generate(self, prompts: list[Prompt], params: GenerateConfig) -> Iterator[tuple[Prompt, Completion]]:
        """At most max_concurrency requests in flight; outputs yielded as they complete."""
        self._stop.clear()
        todo = iter(prompts)
        fatal: BaseException | None = None
        pool = DaemonPool(self.tcfg.max_concurrency, "distill-teacher")
        pending: dict[Future, Prompt] = {}

        def submit_one() -> None:
            prompt = next(todo, None)
            if prompt is not None:
                pending[pool.submit(self.complete, prompt, params)] = prompt

        try:
            for _ in range(self.tcfg.max_concurrency):
                submit_one()
            while pending:
                # a timeout, so Ctrl-C is seen within a second even where a signal does not wake a blocked wait
                done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for fut in done:
                    prompt = pending.pop(fut)
                    try:
                        completion = fut.result()
                    except Cancelled:
                        continue
                    except BaseException as exc:  # noqa: BLE001 - re-raised once the finished rows are out
                        if fatal is None:
                            fatal = exc
                            self._stop.set()  # running requests stop retrying; nothing new starts
                        continue
                    yield prompt, completion
                    if fatal is None:
                        submit_one()
        except KeyboardInterrupt:
            # Ctrl-C: do not wait for hung requests (up to teacher.timeout each); rows already yielded are kept
            print(f"\ndistill: stopping (Ctrl-C): {len(pending)} request(s) in flight abandoned; finished rows "
                  "are kept", file=sys.stderr, flush=True)
            raise
        finally:  # requests still pending (Ctrl-C, or the consumer stopped early): do not wait for them
            self._stop.set()
            pool.shutdown(wait=not pending, cancel_futures=True)
        if fatal is not None:
            raise fatal

    def complete(self, prompt: Prompt, params: GenerateConfig) -> Completion:
        """One prompt with retries; raises TeacherError when it cannot succeed."""
        with self._lock:
            first = next(self._counter)
        rng = random.Random(params.seed * 1_000_003 + prompt.index)
        last: BaseException | None = None
        for attempt in range(self.policy.max_retries + 1):
            if self._stop.is_set():
                raise Cancelled()
            url_i = (first + attempt) % len(self.clients)  # a retry moves on to the next server
            try:
                with self._lock:
                    self.requests_sent += 1
                return self._request(self.clients[url_i], prompt, params)
            except Exception as exc:
                last = exc
                if isinstance(exc, TeacherError):
                    raise
                if not is_retryable(exc):
                    raise self._fatal(exc, self.urls[url_i]) from exc
                if attempt < self.policy.max_retries and self._stop.wait(self.policy.delay(attempt, exc, rng)):
                    raise Cancelled() from exc
        raise self._exhausted(last, prompt)

    # ------------------------------------------------------------ one request

    def _request(self, client, prompt: Prompt, params: GenerateConfig) -> Completion:
        common: dict[str, Any] = {"model": self.tcfg.model, "max_tokens": params.max_new_tokens,
                                      "temperature": params.temperature, "top_p": params.top_p, "seed": params.seed}
        if params.stop:
            common["stop"] = list(params.stop)
        if self.tcfg.extra_body:
            common["extra_body"] = dict(self.tcfg.extra_body)
        k = params.top_k
        if self.tcfg.api == "chat":
            if k > 0:
                common.update(logprobs=True, top_logprobs=k)
            messages = self.messages(prompt.record)
            resp = client.chat.completions.create(messages=messages, **common)
            return self._with_ids(parse_chat(resp, k), prompt, messages)
        if k > 0:
            common["logprobs"] = k
        prompt_ids = self.tokenizer(prompt.text).input_ids if self.tokenizer is not None else None
        # with a tokenizer the ids are sent, so the stored prompt ids are exactly what the teacher saw
        resp = client.completions.create(prompt=prompt_ids or prompt.text, **common)
        return self._with_ids(parse_completion(resp, k), prompt, prompt_ids)

    def _with_ids(self, c: Completion, prompt: Prompt, sent: Any) -> Completion:
        """With teacher.tokenizer: the prompt ids, and token strings mapped to ids when one-to-one."""
        if self.tokenizer is None:
            return c
        if self.tcfg.api == "chat":  # the server applies the chat template; reproduce what it tokenises
            text = self.tokenizer.apply_chat_template(sent, add_generation_prompt=True, tokenize=False)
            c.prompt_ids = self.tokenizer(text, add_special_tokens=False).input_ids
        else:
            c.prompt_ids = list(sent)
        if c.token_ids is None and c.tokens is not None:
            from distill.data.tokenmap import TokenMap, TokenMapError

            with self._lock:
                if self._token_map is None:
                    self._token_map = TokenMap(self.tokenizer)
            try:
                ids = self._token_map.sequence(c.tokens, f"prompt {prompt.index} response")
                topk = self._token_map.topk(c.topk_tokens, f"prompt {prompt.index}") if c.topk_tokens else None
            except TokenMapError:
                return c  # strings kept (text-only training); `distill train` says which token fails and why
            c.token_ids, c.tokens = ids, None
            if topk is not None:
                c.topk_ids, c.topk_tokens = topk, None
        return c

    # ------------------------------------------------------------ errors

    def _fatal(self, exc: BaseException, url: str) -> TeacherError:
        import openai

        if isinstance(exc, openai.NotFoundError):
            served = self._served_models(url)
            hint = f" Models served there: {', '.join(served)}." if served else (
                " Check teacher.model, and that teacher.base_url ends with /v1.")
            return TeacherError(f"{url}: model '{self.tcfg.model}' not found (HTTP 404: {_message(exc)}).{hint}")
        if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return TeacherError(f"{url}: the API key was refused (HTTP {exc.status_code}: {_message(exc)}); "
                                f"set ${self.tcfg.api_key_env} (teacher.api_key_env names the variable)")
        if isinstance(exc, openai.APIStatusError):
            return TeacherError(f"{url}: request rejected (HTTP {exc.status_code}: {_message(exc)}); "
                                "check the generate.* settings (e.g. top_k above the server's logprobs limit)")
        return TeacherError(f"{url}: unexpected error from the teacher endpoint: {exc!r}")

    def _exhausted(self, exc: BaseException | None, prompt: Prompt) -> TeacherError:
        import openai

        tries = self.policy.max_retries + 1
        if isinstance(exc, openai.APIConnectionError) and not isinstance(exc, openai.APITimeoutError):
            return TeacherError(f"could not reach the teacher endpoint(s) {', '.join(self.urls)} after {tries} "
                                f"attempts ({_message(exc)}); is the server running at teacher.base_url?")
        return TeacherError(f"teacher endpoint(s) {', '.join(self.urls)} still failing after {tries} attempts "
                            f"on prompt {prompt.index} ({prompt.record.source}); last error: {_message(exc)}. "
                            "Finished rows are kept; rerun to resume (teacher.max_retries raises the limit)")

    def _served_models(self, url: str) -> list[str]:
        try:
            client = self.clients[self.urls.index(url)].with_options(timeout=min(5.0, self.tcfg.timeout))
            return sorted(m.id for m in client.models.list())[:20]
        except Exception:  # noqa: BLE001 - a hint only
            return []


def _message(exc: BaseException | None) -> str:
    import openai

    if isinstance(exc, openai.APIStatusError):
        body = exc.body
        if isinstance(body, dict):
            body = body.get("error", body)
            body = body.get("message", body) if isinstance(body, dict) else body
        return str(body or exc.message)[:300]
    return f"{type(exc).__name__}: {exc}"[:300]


# ---------------------------------------------------------------- parsing replies


def _first_choice(resp: Any):
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise MalformedResponse(f"reply has no choices: {str(resp)[:200]}")
    return choices[0]


def _topk_arrays(tops: list[list[tuple[str, float]]], k: int):
    """(token strings (n, k), logprobs (n, k) float32, tail (n,), ids (n, k) or None) from per-token lists."""
    n = len(tops)
    tokens = [["" for _ in range(k)] for _ in range(n)]
    logprobs = np.full((n, k), -np.inf, dtype=np.float32)
    for i, pos in enumerate(tops):
        for j, (tok, lp) in enumerate(sorted(pos, key=lambda t: -t[1])[:k]):
            tokens[i][j] = tok
            logprobs[i, j] = lp if lp is not None and math.isfinite(lp) else -np.inf
    tail = np.clip(1.0 - np.exp(logprobs).sum(-1), 0.0, None).astype(np.float32)
    ids = _token_ids([t for row in tokens for t in row if t])
    id_array = None
    if ids is not None:
        id_array = np.zeros((n, k), dtype=np.int32)  # empty slots: id 0, logprob -inf
        for i, row in enumerate(tokens):
            for j, t in enumerate(row):
                if t:
                    id_array[i, j] = int(TOKEN_ID.match(t).group(1))
    return tokens, logprobs, tail, id_array


def _token_ids(tokens: list[str]) -> list[int] | None:
    """Ids when every token is vLLM's 'token_id:N' form (return_tokens_as_token_ids), else None."""
    if not tokens:
        return None
    ids = []
    for t in tokens:
        m = TOKEN_ID.match(t)
        if m is None:
            return None
        ids.append(int(m.group(1)))
    return ids


def _completion(text: str, finish: Any, sampled: list[str] | None, tops, k: int, usage: Any,
                reasoning: str | None = None) -> Completion:
    if not isinstance(finish, str):
        raise MalformedResponse(f"reply has no finish_reason: {finish!r}")
    c = Completion(text=text, finish_reason=finish, reasoning=reasoning,
                   n_tokens=getattr(usage, "completion_tokens", None))
    if sampled is not None:
        c.tokens = sampled
        c.token_ids = _token_ids(sampled)
        if c.token_ids is not None:
            c.tokens = None
    if k > 0:
        if tops is None or sampled is None:  # the server ignores logprobs: retrying will not help
            raise TeacherError("generate.top_k > 0 asked for logprobs but the endpoint returned none; use a "
                               "server that supports logprobs/top_logprobs, or set generate.top_k=0")
        tokens, logprobs, tail, ids = _topk_arrays(tops, k)
        c.topk_logprobs, c.tail = logprobs, tail
        if ids is not None:
            c.topk_ids = ids
        else:
            c.topk_tokens = tokens
    return c


def parse_chat(resp: Any, k: int) -> Completion:
    choice = _first_choice(resp)
    message = getattr(choice, "message", None)
    if message is None:
        raise MalformedResponse("chat reply has no message")
    extra = getattr(message, "model_extra", None) or {}
    reasoning = extra.get("reasoning_content") or extra.get("reasoning")
    content = getattr(choice, "logprobs", None)
    content = getattr(content, "content", None) if content is not None else None
    sampled = tops = None
    if content is not None:
        sampled = [e.token for e in content]
        tops = [[(t.token, t.logprob) for t in (e.top_logprobs or [])] for e in content]
    return _completion(message.content or "", choice.finish_reason, sampled, tops, k,
                       getattr(resp, "usage", None), reasoning)


def parse_completion(resp: Any, k: int) -> Completion:
    choice = _first_choice(resp)
    text = getattr(choice, "text", None)
    if text is None:
        raise MalformedResponse("completion reply has no text")
    lp = getattr(choice, "logprobs", None)
    sampled = tops = None
    if lp is not None and getattr(lp, "tokens", None) is not None:
        sampled = list(lp.tokens)
        tops = [list((d or {}).items()) for d in (lp.top_logprobs or [[]] * len(sampled))]
    return _completion(text, choice.finish_reason, sampled, tops, k, getattr(resp, "usage", None))
