"""Bounded, fair server work (issue 21) and a prefill that projects only what is needed (issue 18): a request's
prompts x n is capped (400), requests share the engine round-robin, an abandoned request's queued rows leave at
once, bodies must be JSON with one framing, and the prefill keeps only the last position's logits."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
import torch
from conftest import make_llama, make_tokenizer
from fastapi.testclient import TestClient
from test_serve import running

from distill.serving import Engine, SamplingParams, ServeOptions, create_app
from distill.serving.engine import Row

NAME = "tiny"


@pytest.fixture(scope="module")
def model_tok():
    tok = make_tokenizer()
    return make_llama(len(tok), hidden=32, layers=1, seed=2), tok


def _rows(prompts: list[list[int]], events: list, tag: str, **params) -> list[Row]:
    """Rows whose finishing events are appended to `events` as (tag, index)."""
    def sink(i):
        return lambda ev: events.append((tag, i)) if ev.finish_reason else None

    return [Row(p, SamplingParams(**{"max_tokens": 3, "temperature": 0.0, **params}), sink(i))
            for i, p in enumerate(prompts)]


def _prefill_calls(model) -> tuple[list, object]:
    """(kwargs and logits shape of every forward with more than one input position, the hook handle)."""
    calls: list = []

    def hook(module, args, kwargs, out):
        if kwargs["input_ids"].shape[1] > 1:
            calls.append((dict(kwargs), tuple(out.logits.shape)))

    return calls, model.register_forward_hook(hook, with_kwargs=True)


# ---- prefill: only the last position is projected onto the vocabulary -----------------------------------
def test_prefill_keeps_only_the_last_positions_logits_and_outputs_are_unchanged(model_tok):
    model, tok = model_tok
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    engine = Engine(model, tok, max_batch_size=8)
    calls, handle = _prefill_calls(model)
    texts: dict[int, list[int]] = {}
    try:
        rows = [Row(p, SamplingParams(max_tokens=6, temperature=0.0),
                    lambda ev, i=i: texts.setdefault(i, []).extend(t.id for t in ev.tokens)) for i, p in enumerate(prompts)]
        engine.generate(rows)
    finally:
        handle.remove()
    assert len(calls) == 1
    kwargs, shape = calls[0]
    assert kwargs.get("logits_to_keep") == 1 and shape == (3, 1, len(tok))
    for i, p in enumerate(prompts):  # the same tokens as plain greedy generate
        ref = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):].tolist()
        assert texts[i] == ref[: len(texts[i])] and len(texts[i]) >= 1


def test_prefill_projects_every_position_when_prompt_logprobs_are_asked(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok)
    calls, handle = _prefill_calls(model)
    try:
        engine.generate(_rows([[5, 6, 7, 8]], [], "echo", max_tokens=1, prompt_logprobs=0))
    finally:
        handle.remove()
    assert "logits_to_keep" not in calls[0][0] and calls[0][1] == (1, 4, len(tok))


# ---- bounded, fair, promptly cancelled work --------------------------------------------------------------
def test_too_many_sequences_in_one_request_is_400(model_tok):
    model, tok = model_tok
    app = create_app(Engine(model, tok), ServeOptions(served_model_name=NAME, max_request_rows=8))
    with TestClient(app) as client:
        body = {"model": NAME, "prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "too_many_sequences" and "--max-request-rows" in err["message"]
        assert "9" in err["message"] and "8" in err["message"]
        assert client.post("/v1/completions", json={**body, "n": 2, "prompt": ["a", "b", "c", "d"]}).status_code == 200


def test_a_small_request_is_answered_before_a_big_one_queued_first_finishes(model_tok):
    """Round-robin between requests: one batch slot, a 6-row request queued before a 1-row one; the small one
    finishes second, not last (a FIFO of rows makes it wait for all six)."""
    model, tok = model_tok
    engine = Engine(model, tok, max_batch_size=1, batch_wait_ms=0)
    events: list = []
    engine.submit(_rows([[5, 6, 7]] * 6, events, "big"))
    engine.submit(_rows([[8, 9]], events, "small"))
    engine.start()
    try:
        for _ in range(600):
            if len(events) == 7:
                break
            time.sleep(0.05)
    finally:
        engine.stop()
    assert len(events) == 7
    assert events.index(("small", 0)) < events.index(("big", 5))
    assert [tag for tag, _ in events][:2] == ["big", "small"]


def test_an_abandoned_requests_queued_rows_leave_the_queue_at_once(model_tok):
    """The worker is not even running: cancelling a request empties its queued rows in one step."""
    from distill.serving.app import _Submission

    model, tok = model_tok
    engine = Engine(model, tok)
    keep = engine.submit(_rows([[5, 6]] * 3, [], "other"))

    async def abandon():
        sub = _Submission(engine, [[5, 6, 7]] * 50, 4, SamplingParams(max_tokens=2))
        sub.group = engine.submit(sub.rows)
        assert engine.queued == 203
        sub.cancel()

    asyncio.run(abandon())
    assert engine.queued == 3 and engine.stats.cancelled == 200
    assert len(keep) == 3  # the other request's rows are untouched


# ---- request framing, over raw HTTP ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def url(model_tok):
    model, tok = model_tok
    with running(create_app(Engine(model, tok), ServeOptions(served_model_name=NAME))) as base:
        yield base


def _raw(url: str, head: str, body: bytes) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < 12:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        sock.settimeout(2)
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except TimeoutError:
            pass
    return int(data.split(b" ", 2)[1]), data


BODY = json.dumps({"model": NAME, "prompt": "hi", "max_tokens": 1}).encode()


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                   None])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_body_that_is_not_declared_json_is_415(url, ctype, path):
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(BODY)}\r\n"
    head += f"Content-Type: {ctype}\r\n" if ctype else ""
    status, data = _raw(url, head, BODY)
    assert status == 415 and b"application/json" in data


def test_json_with_a_charset_is_accepted(url):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(BODY)}\r\n"
            "Content-Type: Application/JSON; charset=utf-8\r\n")
    status, data = _raw(url, head, BODY)
    assert status == 200, data


def test_content_length_with_chunked_is_400(url):
    chunked = b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n"
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\nTransfer-Encoding: chunked\r\n")
    status, data = _raw(url, head, chunked)
    assert status == 400, data
    plain_chunked = head.replace(f"Content-Length: {len(BODY)}\r\n", "")
    assert _raw(url, plain_chunked, chunked)[0] == 200
