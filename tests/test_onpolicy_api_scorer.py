"""The on-policy API scorer uses generation's client (issue 14): a pool of requests over every
teacher.base_url with the openai teacher's retry policy, tested against the fake OpenAI-compatible server."""

from __future__ import annotations

import pytest
from fake_openai_server import FakeOpenAIServer

from distill.config import TeacherConfig
from distill.teachers import TeacherError
from distill.teachers.openai import RetryPolicy
from distill.training.onpolicy import OpenAIScorer

PROMPTS = [[1, 40 + i, 41] for i in range(12)]
COMPLETIONS = [[7, 8 + i, 2] for i in range(12)]
FAST = RetryPolicy(max_retries=6, base_delay=0.0, max_delay=0.0)


def _expected(prompt, completion):
    ids = prompt + completion
    return [-0.01 * (t % 50) - 0.05 for t in ids[len(prompt):]]


def _scorer(urls, **kw):
    tcfg = TeacherConfig(backend="openai", model="scripted", base_url=urls, api="completions", timeout=0.5, **kw)
    return OpenAIScorer(tcfg, policy=FAST)


def test_scorer_spreads_over_every_url_and_retries_faults():
    with FakeOpenAIServer(fault_rate=0.5, seed=1, slow_seconds=1.0) as a, FakeOpenAIServer(fault_rate=0.5, seed=2) as b:
        scorer = _scorer([a.url, b.url], max_concurrency=4)
        got = scorer.token_logprobs(PROMPTS, COMPLETIONS)
        scorer.close()
        for g, p, c in zip(got, PROMPTS, COMPLETIONS):
            assert g == pytest.approx(_expected(p, c))
        assert sum(a.ok.values()) > 0 and sum(b.ok.values()) > 0  # both servers answered (round robin)
        assert sum(a.ok.values()) + sum(b.ok.values()) == len(PROMPTS)  # one success per sample
        assert sum(a.faults.values()) + sum(b.faults.values()) > 0  # faults happened and were retried
        assert scorer.pool.requests_sent > len(PROMPTS)


def test_scorer_requests_run_concurrently():
    """Before, samples went one at a time: with max_concurrency 12, requests overlap."""
    import threading
    import time

    in_flight, peak, lock = [0], [0], threading.Lock()

    def slow_score(ids):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        deadline = time.monotonic() + 5.0  # wait for a second request to arrive (never, if they were serial)
        while time.monotonic() < deadline and peak[0] < 2:
            time.sleep(0.01)
        with lock:
            in_flight[0] -= 1
        return [None] + [-0.5] * (len(ids) - 1)

    with FakeOpenAIServer(score_fn=slow_score) as srv:
        scorer = _scorer(srv.url, max_concurrency=12)
        got = scorer.token_logprobs(PROMPTS, COMPLETIONS)
    assert all(g == [-0.5] * 3 for g in got)
    assert peak[0] > 1


def test_scorer_empty_samples_and_fatal_errors():
    with FakeOpenAIServer() as srv:
        scorer = _scorer(srv.url)
        assert scorer.token_logprobs([[1, 5]], [[]]) == [[]]  # nothing sent for an empty sample
        assert sum(srv.attempts.values()) == 0
        bad = _scorer(srv.url)
        bad.pool.tcfg = bad.pool.tcfg.model_copy(update={"model": "nope"})
        with pytest.raises(TeacherError, match="model 'nope' not found"):
            bad.token_logprobs(PROMPTS[:2], COMPLETIONS[:2])
