"""`distill serve` under hostile or careless input, abandoned requests, and evaluation-harness requests
(echo with prompt logprobs, many stop strings), against the real app over HTTP (tiny random Llama)."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from test_serve import _assert_openai_error, _stop_inside, running, save_student

NAME = "tiny"
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return save_student(tmp_path_factory.mktemp("student"), seed=3)


@pytest.fixture(scope="module")
def server(student_dir):
    """No API key (as an evaluation harness would run it); small batches so a big request queues."""
    from distill.serving.serve import build_app

    app = build_app(student_dir, served_model_name=NAME, max_batch_size=4, batch_wait_ms=5, device="cpu",
                    max_tokens_limit=MAX_TOKENS)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def engine(server):
    return server[1].state.engine


def post(server, body=None, raw: bytes | None = None, path="/v1/completions", timeout=60):
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server[0] + path, content=content, headers={"Content-Type": "application/json"},
                      timeout=timeout)


def body(**kw) -> dict:
    return {"model": NAME, "prompt": "hello", "max_tokens": 4, "temperature": 0, **kw}


def chat(**kw) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


def teacher_forced(engine, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, vocab) logprobs of tokens 1.. given the tokens before them, from one plain forward."""
    with torch.no_grad():
        return engine.model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


# ---- input that used to be a 500 ------------------------------------------------------------------
def test_deeply_nested_json_is_400_naming_the_field(server):
    _assert_openai_error(post(server, raw=b"[" * 100_000), 400, "invalid_json")
    r = post(server, raw=b'{"a":' * 50_000 + b"1" + b"}" * 50_000)
    _assert_openai_error(r, 400, "invalid_json", param="a")
    deep = b'{"model": "tiny", "prompt": ' + b"[" * 5_000 + b"1" + b"]" * 5_000 + b"}"
    _assert_openai_error(post(server, raw=deep), 400, param="prompt")
    deep_chat = json.dumps(chat()).encode()[:-1] + b', "tools": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    _assert_openai_error(post(server, raw=deep_chat, path="/v1/chat/completions"), 400, param="tools")


def test_integer_too_long_to_parse_is_400(server):
    raw = json.dumps(body()).encode().replace(b'"max_tokens": 4', b'"max_tokens": ' + b"9" * 5_000)
    _assert_openai_error(post(server, raw=raw), 400, "invalid_json")


@pytest.mark.parametrize("seed", [2**64, -(2**70), 2**63])
@pytest.mark.parametrize("stream", [False, True])
def test_out_of_range_seed_is_400_before_any_stream(server, seed, stream):
    r = post(server, body(seed=seed, stream=stream, temperature=1.0))
    _assert_openai_error(r, 400, "invalid_value", param="seed")
    r = post(server, chat(seed=seed, stream=stream), path="/v1/chat/completions")
    _assert_openai_error(r, 400, param="seed")


def test_seeds_at_the_int64_edges_sample_and_reproduce(server):
    for seed in (2**63 - 1, -(2**63)):  # n=3 makes seed + j run past 2**63 - 1: it wraps, like torch's seed
        a = post(server, body(seed=seed, n=3, temperature=1.0))
        b = post(server, body(seed=seed, n=3, temperature=1.0))
        assert a.status_code == 200, a.text
        assert [c["text"] for c in a.json()["choices"]] == [c["text"] for c in b.json()["choices"]]


SURROGATE = b'"abc \\udc80"'  # the JSON escape of a lone low surrogate: valid JSON, invalid Unicode


@pytest.mark.parametrize("path,template,param", [
    ("/v1/completions", b'{"model": "tiny", "prompt": %s}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": ["ok", %s]}', "prompt.1"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "ok", "stop": [%s]}', "stop.0"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "ok", "stream": true, "stop": %s}', "stop"),
    ("/v1/completions", b'{"model": %s, "prompt": "ok"}', "model"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": %s}]}',
     "messages.0.content"),
    ("/v1/chat/completions", (b'{"model": "tiny", "stream": true, "messages": [{"role": "user", "content": '
                             b'[{"type": "text", "text": %s}]}]}'), "messages.0.content.0.text"),
])
def test_lone_surrogate_is_400_naming_the_field(server, path, template, param):
    r = post(server, raw=template % SURROGATE, path=path)
    _assert_openai_error(r, 400, "invalid_value", param=param)
    assert "surrogate" in r.json()["error"]["message"]


def test_a_surrogate_pair_is_fine(server):
    r = post(server, raw=b'{"model": "tiny", "prompt": "clef \\ud834\\udd1e", "max_tokens": 2}')
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field,value", [
    ("max_tokens", True), ("max_tokens", 2.0), ("n", True), ("seed", True), ("logprobs", True),
    ("prompt", [True, False]), ("prompt", [[1, True]]), ("stream", "yes"), ("stream", 1), ("echo", 1),
    ("temperature", "0.5"), ("temperature", True), ("top_p", False), ("stop", 5), ("stream_options", {"include_usage": 1}),
])
def test_loose_values_are_400_not_coerced(server, field, value):
    r = post(server, body(**{field: value}))
    _assert_openai_error(r, 400)
    assert r.json()["error"]["param"].split(".")[0] == field


def test_plain_json_numbers_still_pass(server):
    """Strict, not pedantic: an integer where a float is expected is fine (`temperature: 0`)."""
    r = post(server, body(temperature=0, top_p=1, prompt=[5, 6, 7]))
    assert r.status_code == 200, r.text


# ---- one request never fails another -----------------------------------------------------------
def test_a_bad_request_does_not_poison_the_batch(server, engine):
    good = [body(prompt=f"Q: {i} + {i}?", max_tokens=6, temperature=1.0, seed=i) for i in range(12)]
    bad = body(prompt="Q: ?", max_tokens=6, temperature=1.0, seed=2**64)
    with ThreadPoolExecutor(13) as pool:
        answers = list(pool.map(lambda b: post(server, b), good[:6] + [bad] + good[6:]))
    codes = [r.status_code for r in answers]
    assert codes == [200] * 6 + [400] + [200] * 6, [r.text for r in answers if r.status_code != 200]
    alone = [post(server, b).json()["choices"][0]["text"] for b in good[:3]]
    assert alone == [r.json()["choices"][0]["text"] for r in answers[:3]]  # seeded: batching changed nothing


def test_engine_row_errors_fail_only_their_row(engine):
    """Rows that fail inside the engine (a seed it cannot take, a top_p that leaves nothing to sample)
    get an error event; the other rows of the same batch finish with their unbatched greedy ids."""
    from distill.serving.engine import Engine, Row, SamplingParams

    eng = Engine(engine.model, engine.tok, max_batch_size=8)
    tok = engine.tok
    prompts = ["hello there", "Q: 2 + 3?", "The quick brown fox", "ok"]
    params = [SamplingParams(6, 0.0), SamplingParams(6, 1.0, top_p=0.0),
              SamplingParams(6, 1.0, seed="x"),
              SamplingParams(6, 0.0, logprobs=2)]
    got: dict[int, list] = {i: [] for i in range(len(prompts))}
    rows = [Row(tok(p).input_ids, sp, lambda ev, i=i: got[i].append(ev)) for i, (p, sp) in
            enumerate(zip(prompts, params))]
    eng.generate(rows, join=True)
    assert [ev.finish_reason for ev in got[1]][-1] == "error" and "RuntimeError" in got[1][-1].error
    assert len(got[2]) == 1 and got[2][0].finish_reason == "error" and "ValueError" in got[2][0].error
    assert eng.stats.failed == 2
    for i in (0, 3):
        ids = tok(prompts[i]).input_ids
        with torch.no_grad():
            want = engine.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                         attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                         pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        assert [t.id for ev in got[i] for t in ev.tokens] == want
        assert got[i][-1].finish_reason in ("stop", "length")


def test_a_row_failing_in_the_engine_fails_only_its_request(server, engine, monkeypatch):
    """An exception while sampling one row (here: forced for seed 666) answers that request with a
    server error (500; in a stream, an error event then [DONE]); concurrent requests are unaffected."""
    sample = engine._sample

    def flaky(logits, st):
        if st.p.seed == 666:
            raise RuntimeError("forced failure")
        return sample(logits, st)

    monkeypatch.setattr(engine, "_sample", flaky)
    bad = body(max_tokens=8, temperature=1.0, seed=666)
    good = [body(prompt=f"item {i}", max_tokens=8, temperature=1.0, seed=i) for i in range(6)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: post(server, b), good[:3] + [bad, {**bad, "stream": True}] + good[3:]))
    assert [r.status_code for r in answers] == [200] * 3 + [500, 200] + [200] * 3
    for r in answers[:3] + answers[5:]:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    err = answers[3].json()["error"]
    assert err["type"] == "server_error" and "forced failure" in err["message"]
    events = [e[6:] for e in answers[4].text.split("\n\n") if e]
    assert "forced failure" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
    alone = [post(server, b).json()["choices"][0]["text"] for b in good]  # seeded: same as in the batch
    assert alone == [r.json()["choices"][0]["text"] for r in answers[:3] + answers[5:]]


# ---- abandoned requests -------------------------------------------------------------------------
def _wait_idle(engine, timeout=120.0):
    deadline = time.monotonic() + timeout
    while engine.queued or engine.running:
        assert time.monotonic() < deadline, "the engine never went idle"
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [False, True])
def test_a_disconnected_client_has_its_rows_cancelled(server, engine, stream):
    """A big request (16 prompts x n=16 x 64 tokens) whose client goes away once generation started: its
    queued and running rows are dropped, and a small request after it is answered."""
    _wait_idle(engine)
    prompts = [[5 + i, 6, 7, 8] for i in range(16)]
    big = body(prompt=prompts, n=16, max_tokens=MAX_TOKENS, temperature=1.0, seed=1, stream=stream)
    payload = json.dumps(big).encode()
    host, port = server[0].removeprefix("http://").split(":")
    before = (engine.stats.rows, engine.stats.cancelled, engine.stats.generated_tokens, engine.stats.failed)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
        deadline = time.monotonic() + 60
        while engine.stats.rows == before[0]:  # the big request's first rows are being prefilled
            assert time.monotonic() < deadline, "the big request never started"
            time.sleep(0.01)
        if stream:
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
    _wait_idle(engine)
    total = len(prompts) * 16
    started = engine.stats.rows - before[0]
    cancelled = engine.stats.cancelled - before[1]
    assert engine.stats.failed == before[3], "rows failed instead of being cancelled"
    assert cancelled > 0, "no row of the abandoned request was cancelled"
    assert started < total, "every row of the abandoned request was still generated"
    assert engine.stats.generated_tokens - before[2] < total * MAX_TOKENS
    small = post(server, body(max_tokens=3))
    assert small.status_code == 200 and small.json()["choices"][0]["finish_reason"] in ("stop", "length")
    health = httpx.get(server[0] + "/health").json()
    assert health["cancelled"] == engine.stats.cancelled and health["queued"] == 0


# ---- echo: prompt logprobs, as lm-eval's loglikelihood requests ask ------------------------------
def test_echo_prompt_logprobs_equal_a_teacher_forced_forward(server, engine):
    tok = engine.tok
    prompts = ["The quick brown fox jumps over the lazy dog", "Q: 2 + 3?"]  # two lengths: left padding
    r = post(server, body(prompt=prompts, echo=True, max_tokens=0, logprobs=3))
    assert r.status_code == 200, r.text
    for prompt, choice in zip(prompts, sorted(r.json()["choices"], key=lambda c: c["index"])):
        ids = tok(prompt).input_ids
        lp = choice["logprobs"]
        assert choice["text"] == prompt and choice["finish_reason"] == "length"
        assert lp["token_ids"] == ids and len(lp["tokens"]) == len(ids) == len(lp["text_offset"])
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts token 0
        want = teacher_forced(engine, ids)
        got = torch.tensor(lp["token_logprobs"][1:])
        assert torch.allclose(got, want.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-4)
        top = want.topk(3)
        assert lp["top_token_ids"][1:] == top.indices.tolist()
        assert torch.allclose(torch.tensor(lp["top_token_logprobs"][1:]), top.values, atol=1e-4)
        assert all(len(t) <= 3 for t in lp["top_logprobs"][1:])
        assert lp["text_offset"] == sorted(lp["text_offset"])
    assert r.json()["usage"]["completion_tokens"] == 0


def test_echo_with_generated_tokens_appends_the_completion(server):
    prompt = "Distillation trains"
    plain = post(server, body(prompt=prompt, max_tokens=5, logprobs=1)).json()["choices"][0]
    echo = post(server, body(prompt=prompt, max_tokens=5, logprobs=1, echo=True)).json()["choices"][0]
    assert echo["text"] == prompt + plain["text"]
    n = len(plain["logprobs"]["tokens"])
    for key in ("tokens", "token_logprobs", "top_logprobs", "token_ids"):
        assert echo["logprobs"][key][-n:] == plain["logprobs"][key]
    assert echo["logprobs"]["text_offset"][-n:] == [len(prompt) + o for o in plain["logprobs"]["text_offset"]]
    no_lp = post(server, body(prompt=prompt, max_tokens=5, echo=True)).json()["choices"][0]
    assert no_lp["text"] == echo["text"] and no_lp["logprobs"] is None
    ids_prompt = post(server, body(prompt=[5, 6, 7], max_tokens=0, echo=True, logprobs=0)).json()["choices"][0]
    assert ids_prompt["logprobs"]["token_ids"] == [5, 6, 7] and ids_prompt["logprobs"]["top_logprobs"][1] == {}


def test_echo_streams_the_prompt_first(server):
    kw = body(prompt="Distillation trains", max_tokens=5, logprobs=2, echo=True)
    plain = post(server, kw).json()["choices"][0]
    r = post(server, {**kw, "stream": True})
    events = [e[6:] for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert chunks[0]["text"] == "Distillation trains"
    assert "".join(c["text"] for c in chunks) == plain["text"]
    tokens = [t for c in chunks if c["logprobs"] for t in c["logprobs"]["token_ids"]]
    assert tokens == plain["logprobs"]["token_ids"]


def test_max_tokens_zero_needs_echo(server):
    _assert_openai_error(post(server, body(max_tokens=0)), 400, param="max_tokens")


# ---- stop sequences --------------------------------------------------------------------------------
def test_more_than_four_stops_up_to_the_limit(server):
    from distill.serving.protocol import MAX_STOP

    kw = body(prompt="The quick brown fox", max_tokens=24)
    full = post(server, kw).json()["choices"][0]["text"]
    stop = _stop_inside(full)
    stops = ["\x01zz", "\x02zz", "\x03zz", "\x04zz", stop]  # lm-eval: four of a task's own + the EOS string
    cut = post(server, {**kw, "stop": stops}).json()["choices"][0]
    assert cut["text"] == full[:full.find(stop)] and cut["finish_reason"] == "stop"
    many = [f"\x05{i}" for i in range(MAX_STOP - 1)] + [stop]
    assert post(server, {**kw, "stop": many}).json()["choices"][0]["text"] == cut["text"]
    r = post(server, {**kw, "stop": many + ["one more"]})
    _assert_openai_error(r, 400, param="stop")
    assert str(MAX_STOP) in r.json()["error"]["message"]
