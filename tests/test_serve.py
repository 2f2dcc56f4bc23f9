"""`distill serve` against the official openai client on a live uvicorn server (tiny random Llama)."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
from conftest import make_llama, make_tokenizer

KEY = "test-key"
NAME = "tiny-student"
LIMITS = {"max_prompt_tokens": 64, "max_tokens_limit": 32, "max_body_bytes": 20_000}


def save_student(out, chat_template: bool = True, hidden: int = 64, seed: int = 1):
    """A tiny random Llama student and its tokenizer in `out` (HF format), as `distill serve` loads one."""
    tok = make_tokenizer(chat_template=chat_template)
    make_llama(len(tok), hidden=hidden, layers=2, seed=seed).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return save_student(tmp_path_factory.mktemp("student"))


@contextmanager
def running(app):
    """`app` on a uvicorn server on a free 127.0.0.1 port in a background thread; yields its base url."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(student_dir):
    """The student served with an API key and tight limits; yields (base_url, app)."""
    from distill.serving.serve import build_app

    app = build_app(student_dir, served_model_name=NAME, api_key=KEY, max_batch_size=8, batch_wait_ms=20,
                    device="cpu", **LIMITS)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ref(server):
    """The served model and tokenizer, for reference computations outside the server."""
    engine = server[1].state.engine
    return engine.model, engine.tok


def hf_greedy(ref, ids: list[int], n: int) -> list[int]:
    model, tok = ref
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["model"] == NAME


def test_completion_matches_hf_greedy_and_counts_usage(client, ref):
    prompt = "Q: Tom has 12 apples. He eats 5. How many"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=0)
    ids = ref[1](prompt).input_ids
    want = hf_greedy(ref, ids, 8)
    choice = r.choices[0]
    assert choice.logprobs.model_extra["token_ids"] == want
    assert choice.text == ref[1].decode(want, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if want[-1] == 2 else "length")
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(want)
    assert r.usage.total_tokens == len(ids) + len(want)
    assert r.object == "text_completion" and r.model == NAME


def test_completion_logprobs_are_raw_model_logprobs(client, ref):
    prompt = "The quick brown fox"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    extra = lp.model_extra
    ids = ref[1](prompt).input_ids
    full = torch.tensor([ids + extra["token_ids"]])
    with torch.no_grad():
        logp = ref[0](full).logits[0, len(ids) - 1:-1].float().log_softmax(-1)
    for i, tid in enumerate(extra["token_ids"]):
        assert lp.token_logprobs[i] == pytest.approx(float(logp[i, tid]), abs=1e-4)
        top = logp[i].topk(3)
        assert extra["top_token_ids"][i] == top.indices.tolist()
        assert extra["top_token_logprobs"][i] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert extra["top_token_ids"][i][0] == tid  # greedy picks the top-1
        assert len(lp.top_logprobs[i]) <= 3
    assert len(lp.tokens) == len(lp.text_offset) == r.usage.completion_tokens


def test_chat_applies_template_and_reports_chat_logprobs(client, ref):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=2)
    tok = ref[1]
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False).input_ids
    want = hf_greedy(ref, ids, 6)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == tok.decode(want, skip_special_tokens=True)
    content = choice.logprobs.content
    assert [c.model_extra["token_id"] for c in content] == want
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.top_logprobs[0].model_extra["token_id"] == c.model_extra["token_id"]
        assert c.logprob == pytest.approx(c.top_logprobs[0].logprob) and c.bytes is not None
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)


def test_streaming_equals_non_streaming(client):
    kw = {"model": NAME, "max_tokens": 12, "temperature": 0}
    plain = client.completions.create(prompt="Distillation trains", **kw).choices[0]
    chunks = list(client.completions.create(prompt="Distillation trains", stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == plain.text
    assert chunks[-1].choices[0].finish_reason == plain.finish_reason

    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(messages=messages, **kw).choices[0]
    stream = list(client.chat.completions.create(messages=messages, stream=True, logprobs=True, top_logprobs=1,
                                                 stream_options={"include_usage": True}, **kw))
    assert stream[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.message.content
    finals = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
    assert finals == [chat.finish_reason]
    n_lp = sum(len(c.choices[0].logprobs.content) for c in stream if c.choices and c.choices[0].logprobs)
    assert stream[-1].usage is not None and stream[-1].usage.completion_tokens == n_lp


def test_raw_sse_format(server):
    body = {"model": NAME, "prompt": "hello", "max_tokens": 3, "temperature": 0, "stream": True}
    r = httpx.post(server[0] + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_n_choices_and_prompt_lists(client):
    r = client.completions.create(model=NAME, prompt=["a", "b"], n=3, max_tokens=5, temperature=1.0, seed=7)
    assert sorted(c.index for c in r.choices) == list(range(6))
    again = client.completions.create(model=NAME, prompt=["a", "b"], n=3, max_tokens=5, temperature=1.0, seed=7)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]  # seeded sampling reproduces
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=4, temperature=0.8, top_p=0.9)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.usage.completion_tokens >= 2


def _stop_inside(text: str) -> str:
    """A 2-character stop string taken from the middle of `text` (no replacement characters)."""
    for i in range(2, len(text) - 1):
        s = text[i:i + 2]
        if "\ufffd" not in s and text.find(s) == i:
            return s
    pytest.skip("greedy output too short for a stop test")


def test_stop_strings_cut_text_in_plain_and_streaming(client):
    kw = {"model": NAME, "prompt": "The quick brown fox", "temperature": 0, "max_tokens": 24}
    full = client.completions.create(**kw).choices[0].text
    stop = _stop_inside(full)
    want = full[:full.find(stop)]
    cut = client.completions.create(stop=[stop], **kw).choices[0]
    assert cut.text == want and cut.finish_reason == "stop"
    chunks = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_wrong_or_missing_api_key_is_401(server):
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.completions.create(model=NAME, prompt="hi", max_tokens=2)
    assert err.value.status_code == 401
    r = httpx.get(server[0] + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def _post(server, body, raw: bytes | None = None, path="/v1/completions"):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server[0] + path, content=content, headers=headers)


def _assert_openai_error(r, status: int, code: str | None = None, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code
    if param:
        assert err["param"] == param


def test_oversized_body_is_413(server):
    r = _post(server, {"model": NAME, "prompt": "x" * (LIMITS["max_body_bytes"] + 10)})
    _assert_openai_error(r, 413, "request_too_large")


def test_limits_are_400(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="word " * 200, max_tokens=2)
    assert err.value.status_code == 400 and err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="hi", max_tokens=LIMITS["max_tokens_limit"] + 1)
    assert err.value.param == "max_tokens"
    _assert_openai_error(_post(server, {"model": NAME, "prompt": "hi", "logprobs": 21}), 400, param="logprobs")
    _assert_openai_error(_post(server, {"model": NAME, "prompt": "hi", "n": 99}), 400, param="n")


def test_malformed_and_invalid_requests_are_4xx_in_openai_shape(server):
    _assert_openai_error(_post(server, None, raw=b'{"model": "x", "prompt": '), 400, "invalid_json")
    _assert_openai_error(_post(server, None, raw=b"[1, 2]"), 400, "invalid_json")
    _assert_openai_error(_post(server, None, raw=b"\xff\xfe"), 400, "invalid_json")
    _assert_openai_error(_post(server, {"model": NAME}), 400, param="prompt")
    _assert_openai_error(_post(server, {"model": NAME, "prompt": "hi", "temperature": "hot"}), 400,
                         param="temperature")
    _assert_openai_error(_post(server, {"model": NAME, "prompt": "hi", "max_tokens": 0}), 400, param="max_tokens")
    _assert_openai_error(_post(server, {"model": NAME, "prompt": [[99999]]}), 400, param="prompt")
    _assert_openai_error(_post(server, {"model": NAME, "prompt": "hi", "stop": ["a"] * 65}), 400, param="stop")
    _assert_openai_error(_post(server, {"model": NAME, "prompt": "hi", "presence_penalty": 1}), 400,
                         param="presence_penalty")
    _assert_openai_error(_post(server, {"model": "other", "prompt": "hi"}), 404, "model_not_found")
    chat = "/v1/chat/completions"
    _assert_openai_error(_post(server, {"model": NAME, "messages": []}, path=chat), 400, param="messages")
    _assert_openai_error(_post(server, {"model": NAME, "messages": [{"role": "bot", "content": "x"}]}, path=chat),
                         400)
    _assert_openai_error(_post(server, {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                        "top_logprobs": 2}, path=chat), 400, param="top_logprobs")
    _assert_openai_error(httpx.get(server[0] + "/v1/nothing"), 404)
    _assert_openai_error(httpx.get(server[0] + "/v1/completions"), 405)


def test_concurrent_requests_are_batched_and_correct(client, server, ref):
    engine = server[1].state.engine
    prompts = [f"Q: Tom has {a} apples. He eats {b}. How many" for a, b in
               [(12, 5), (20, 3), (9, 4), (15, 7), (30, 11), (8, 2), (44, 13), (17, 9)]]
    before, steps, step_rows = engine.stats.batches, engine.stats.steps, engine.stats.step_rows

    def ask(p):
        return client.completions.create(model=NAME, prompt=p, max_tokens=8, temperature=0, logprobs=0)

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    batches = engine.stats.batches - before
    assert len(answers) == len(prompts)
    assert batches < len(prompts), "the batcher never merged concurrent requests"
    mean_rows = (engine.stats.step_rows - step_rows) / (engine.stats.steps - steps)
    assert mean_rows > 1, "every decode step ran a single row"
    for p, a in zip(prompts, answers):  # left padding inside a batch must not change greedy outputs
        assert a.choices[0].logprobs.model_extra["token_ids"] == hf_greedy(ref, ref[1](p).input_ids, 8)


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_serves_as_the_openai_teacher_of_another_distill_run(server, ref, api, monkeypatch):
    """distill's own openai teacher backend reads exact top-k ids from this server ('token_id:N' tokens)."""
    from distill.config import GenerateConfig, TeacherConfig
    from distill.data.prompts import Record
    from distill.teachers.base import Prompt
    from distill.teachers.openai import OpenAITeacher

    monkeypatch.setenv("DISTILL_TEST_KEY", KEY)
    tcfg = TeacherConfig(backend="openai", model=NAME, base_url=server[0] + "/v1", api_key_env="DISTILL_TEST_KEY",
                         api=api, max_concurrency=3, extra_body={"return_tokens_as_token_ids": True})
    texts = ["Q: Tom has 9 apples. He eats 4. How many", "hello", "The quick brown fox"]
    prompts = [Prompt(index=i, record=Record(prompt=t), text=t) for i, t in enumerate(texts)]
    teacher = OpenAITeacher(tcfg)
    try:
        outs = list(teacher.generate(prompts, GenerateConfig(max_new_tokens=6, temperature=0.0, top_k=3)))
    finally:
        teacher.close()
    assert len(outs) == len(prompts)
    model, tok = ref
    for prompt, c in outs:
        assert c.topk_ids is not None and c.topk_ids.shape == (len(c.token_ids), 3)
        assert c.topk_ids[:, 0].tolist() == c.token_ids  # greedy: the sampled token is the top-1
        if api == "completions":
            ids = tok(prompt.text).input_ids
        else:
            ids = tok(tok.apply_chat_template([{"role": "user", "content": prompt.text}], add_generation_prompt=True,
                                              tokenize=False), add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = model(torch.tensor([ids + c.token_ids])).logits[0, len(ids) - 1:-1].float().log_softmax(-1)
        top = logp.topk(3)
        assert c.topk_ids.tolist() == top.indices.tolist()
        assert c.topk_logprobs == pytest.approx(top.values.numpy(), abs=1e-4)


def test_engine_one_batch_of_mixed_lengths_equals_unbatched_generate(ref):
    """Rows of very different lengths and max_tokens decoded in one batch give HF's unbatched greedy ids."""
    from distill.serving.engine import Engine, Row, SamplingParams

    model, tok = ref
    engine = Engine(model, tok, max_batch_size=8)
    prompts = ["hi", "Q: Lily has 43 cards. She finds 19 more. How many cards now? A: 43 + 19 = 62.",
               "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ? ! , . Distillation trains"]
    got: dict[int, list] = {i: [] for i in range(len(prompts))}
    rows = [Row(tok(p).input_ids, SamplingParams(max_tokens=4 + 3 * i, temperature=0.0, logprobs=0),
                lambda ev, i=i: got[i].append(ev)) for i, p in enumerate(prompts)]
    engine.generate(rows)
    for i, p in enumerate(prompts):
        ids = [t.id for ev in got[i] for t in ev.tokens]
        assert ids == hf_greedy(ref, tok(p).input_ids, 4 + 3 * i)
        assert got[i][-1].finish_reason in ("stop", "length")


def test_engine_rows_joining_a_running_batch_equal_unbatched_generate(ref):
    """Continuous batching: queued rows (longer and shorter prompts) join after the first decode step."""
    from distill.serving.engine import Engine, Row, SamplingParams

    model, tok = ref
    engine = Engine(model, tok, max_batch_size=8)
    first = ["Distillation trains a small student", "hi"]
    later = ["Q: Lily has 43 cards. She finds 19 more. How many cards now? A: 43 + 19 = 62. The answer", "ok",
             "The quick brown fox"]
    got: dict[str, list] = {p: [] for p in first + later}

    def row(p, n):
        return Row(tok(p).input_ids, SamplingParams(max_tokens=n, temperature=0.0, logprobs=0),
                   lambda ev, p=p: got[p].append(ev))

    engine.submit([row(p, 6) for p in later])
    engine.generate([row(p, 9) for p in first], join=True)
    assert engine.stats.joined == len(later) and engine.stats.max_rows_in_batch == len(first) + len(later)
    for p in first + later:
        ids = [t.id for ev in got[p] for t in ev.tokens]
        assert ids == hf_greedy(ref, tok(p).input_ids, 9 if p in first else 6), p


def test_streaming_with_n_and_token_id_prompts(client, ref):
    ids = ref[1]("The quick brown").input_ids
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=5, temperature=0)
    by_text = client.completions.create(model=NAME, prompt="The quick brown", max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    chunks = list(client.completions.create(model=NAME, prompt="hi", n=2, max_tokens=5, temperature=0.9, seed=1,
                                            stream=True))
    done = {c.choices[0].index for c in chunks if c.choices[0].finish_reason}
    assert done == {0, 1}


@pytest.mark.parametrize("text,stop", [("hello world. bye now", "o w"), ("hello world. bye now", "bye"),
                                       ("é€ 中文 and more", None), ("Q: 43 + 19 = 62.", "= 6")])
def test_row_state_streams_text_that_is_never_taken_back(text, stop):
    """Streamed deltas hold back possible stop prefixes and half UTF-8 characters; they add up to the final text."""
    from distill.serving.engine import Pieces, Row, RowState, SamplingParams, TokenInfo

    tok = make_tokenizer()
    ids = tok(text).input_ids
    events = []
    params = SamplingParams(max_tokens=len(ids), stop=(stop,) if stop else ())
    st = RowState(Row([1], params, events.append), tok, Pieces(tok), eos_ids={2})
    for tid in ids:
        st.push(TokenInfo(tid, *Pieces(tok).get(tid), 0.0))
    want = text[:text.find(stop)] if stop else text
    assert "".join(ev.text for ev in events) == want
    assert all("\ufffd" not in ev.text for ev in events)
    assert events[-1].finish_reason == ("stop" if stop else "length")
    kept = [t.id for ev in events for t in ev.tokens]
    assert tok.decode(kept).startswith(want) and kept == ids[:len(kept)]
