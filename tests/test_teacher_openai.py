"""The openai backend against a real HTTP server on 127.0.0.1 with injected 429s, 500s, timeouts and bad bodies."""

from __future__ import annotations

import json
import random
import socket

import httpx
import numpy as np
import openai
import pytest
from fake_openai_server import FAULTS, FakeOpenAIServer, reply_text
from typer.testing import CliRunner

from distill import generate
from distill.config import load_config
from distill.store.shards import iter_keys, read_store
from distill.teachers import TeacherError
from distill.teachers.openai import RetryPolicy, retry_after_seconds


def _prompts(tmp_path, n: int):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question number {i}?", "answer": str(i)}) + "\n" for i in range(n)))
    return path


def _config(tmp_path, urls, n=8, **over):
    base = {"run_dir": str(tmp_path / "run"), "teacher.backend": "openai", "teacher.model": "scripted",
            "teacher.base_url": urls, "teacher.timeout": 5.0, "teacher.max_retries": 4,
            "teacher.retry_base_delay": 0.005, "teacher.retry_max_delay": 0.02, "teacher.max_concurrency": 4,
            "generate.input": str(_prompts(tmp_path, n)), "generate.top_k": 3, "generate.shard_rows": 5,
            "generate.max_new_tokens": 16}
    base.update(over)
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in base.items()])


def test_faults_on_a_third_of_calls_every_prompt_stored_exactly_once(tmp_path):
    with FakeOpenAIServer(fault_rate=0.3, seed=3, slow_seconds=2.0) as srv:
        path = generate(_config(tmp_path, srv.url, n=40, **{"teacher.timeout": 1.0}))
    calls = sum(srv.attempts.values())
    assert set(srv.faults) == set(FAULTS), srv.faults  # every kind of fault really happened
    assert 0.2 <= sum(srv.faults.values()) / calls <= 0.4
    assert all(srv.ok[f"question number {i}?"] == 1 for i in range(40))  # no request repeated after success
    keys = list(iter_keys(path))
    rows = read_store(path)
    assert len(keys) == len(set(keys)) == len(rows) == 40
    for i, row in enumerate(rows):
        assert row["index"] == i and row["reference"] == str(i)
        assert row["response"] == reply_text(f"question number {i}?")
        assert row["response_tokens"] == row["response"].split(" ") and row["topk_ids"] is None
        assert len(row["topk_tokens"]) == len(row["response_tokens"]) and row["topk_tokens"][0][0] == row["response_tokens"][0]
        np.testing.assert_allclose(row["topk_logprobs"], np.log([[0.5, 0.25, 0.125]] * 4), atol=1e-3)
        np.testing.assert_allclose(row["tail"], 0.125, atol=1e-6)
        assert row["teacher"] == "openai:chat:scripted"


def test_retry_after_wins_over_backoff():
    req = httpx.Request("POST", "http://x/v1/chat/completions")

    def err(headers):
        return openai.RateLimitError("slow down", response=httpx.Response(429, headers=headers, request=req), body=None)

    policy = RetryPolicy(max_retries=5, base_delay=1.0, max_delay=10.0)
    assert policy.delay(0, err({"retry-after": "7"})) == 7.0
    assert policy.delay(3, err({"retry-after-ms": "250"})) == 0.25
    assert 0 < retry_after_seconds(err({"retry-after": "Wed, 21 Oct 2099 07:28:00 GMT"}))
    rng = random.Random(0)
    delays = [policy.delay(a, err({}), rng) for a in range(6)]
    for a, d in enumerate(delays):  # exponential with jitter in [1/2, 1] of the step, capped
        step = min(10.0, 2.0**a)
        assert step / 2 <= d <= step
    assert len(set(delays)) == len(delays)


def test_unknown_model_is_a_clear_error(tmp_path):
    with FakeOpenAIServer() as srv, pytest.raises(TeacherError, match=r"model 'nope' not found.*served there: scripted"):
        generate(_config(tmp_path, srv.url, **{"teacher.model": "nope"}))


def test_unreachable_endpoint_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(TeacherError, match=rf"could not reach .*{port}.* after 2 attempts"):
        generate(_config(tmp_path, url, **{"teacher.max_retries": 1}))


def test_retries_exhausted_keeps_finished_rows_and_rerun_resumes(tmp_path):
    bad = "question number 5?"
    cfg = _config(tmp_path, None, **{"teacher.max_concurrency": 1, "teacher.max_retries": 2,
                                     "generate.shard_rows": 100})
    with FakeOpenAIServer(always_fail={bad}) as srv:
        cfg.teacher.base_url = srv.url
        with pytest.raises(TeacherError, match=r"still failing after 3 attempts on prompt 5"):
            generate(cfg)
    assert srv.attempts[bad] == 3
    assert [r["index"] for r in read_store(cfg.path("teacher"))] == [0, 1, 2, 3, 4]  # flushed before the raise
    with FakeOpenAIServer() as fixed:
        cfg.teacher.base_url = fixed.url
        generate(cfg)
    assert sorted(fixed.attempts) == [f"question number {i}?" for i in (5, 6, 7)]  # done rows not requested again
    assert len(read_store(cfg.path("teacher"))) == 8


def test_endpoint_without_logprobs_fails_fast(tmp_path):
    with FakeOpenAIServer(logprobs=False) as srv, pytest.raises(TeacherError, match="returned none"):
        generate(_config(tmp_path, srv.url, **{"teacher.max_concurrency": 1}))
    assert sum(srv.attempts.values()) == 1  # not retried: the answer would not change


def test_round_robin_over_base_urls(tmp_path):
    with FakeOpenAIServer() as a, FakeOpenAIServer() as b:
        path = generate(_config(tmp_path, [a.url, b.url], n=12))
    assert sum(a.attempts.values()) == sum(b.attempts.values()) == 6
    assert len(read_store(path)) == 12


def test_completions_api_and_vllm_token_ids(tmp_path):
    with FakeOpenAIServer() as srv:
        rows = read_store(generate(_config(tmp_path / "c", srv.url, n=3, **{"teacher.api": "completions"})))
        assert rows[1]["response"] == reply_text("question number 1?")
        assert rows[1]["topk_tokens"][0][0] == rows[1]["response_tokens"][0] and rows[1]["topk_ids"] is None
        assert rows[1]["teacher"] == "openai:completions:scripted"
        ids = read_store(generate(_config(tmp_path / "i", srv.url, n=3,
                                          **{"teacher.extra_body": {"return_tokens_as_token_ids": True}})))
    row = ids[0]
    assert row["topk_tokens"] is None and row["topk_ids"].dtype == np.int32 and row["topk_ids"].shape == (4, 3)
    words = row["response"].split(" ")
    assert row["response_ids"] == [int(w[1:]) for w in words] == row["topk_ids"][:, 0].tolist()


def test_cli_reports_teacher_errors_in_one_line(tmp_path):
    from distill.cli import app

    with FakeOpenAIServer() as srv:
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "teacher": {
            "backend": "openai", "model": "nope", "base_url": srv.url, "max_retries": 0},
            "generate": {"input": str(_prompts(tmp_path, 2))}}))
        result = CliRunner().invoke(app, ["generate", str(cfg)])
    assert result.exit_code == 1
    assert "model 'nope' not found" in result.output and "Traceback" not in result.output
