"""`distill serve TEACHER --draft STUDENT`: speculative decoding in the server keeps the teacher's output (greedy:
identical; sampling: the teacher's distribution), counts acceptance, streams, and refuses a foreign vocabulary."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from conftest import make_llama, make_tokenizer, save_sharp_teacher
from test_serve import running
from typer.testing import CliRunner

from distill.serving import Engine
from distill.serving.engine import Row, SamplingParams
from distill.serving.serve import build_app, load_draft
from distill.serving.speculative import Drafter, accept_or_replace

PROMPTS = ["Q: Tom has 12 apples.", "The quick brown fox", "Distillation trains", "user: hello"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A sharp teacher, itself as a draft (always accepted) and an unrelated sharp draft (mostly rejected)."""
    tok = make_tokenizer()
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("teacher", "same", "other")}
    save_sharp_teacher(dirs["teacher"], tok, layers=2, seed=1)
    save_sharp_teacher(dirs["same"], tok, layers=2, seed=1)
    save_sharp_teacher(dirs["other"], tok, layers=1, seed=7)
    return dirs


def _complete(url: str, prompt: str, **kw) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": 16, "temperature": 0, **kw}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _serve_all(dirs, draft: str | None, **kw) -> tuple[list[dict], dict]:
    app = build_app(dirs["teacher"], served_model_name="m", device="cpu", batch_wait_ms=0,
                    draft=dirs[draft] if draft else None, **kw)
    with running(app) as url:
        outs = [_complete(url, p, logprobs=2) for p in PROMPTS]
        health = httpx.get(url + "/health").json()
    return outs, health


@pytest.fixture(scope="module")
def plain(dirs):
    return _serve_all(dirs, None)


def test_greedy_output_with_a_draft_is_the_teachers(dirs, plain):
    """An unrelated draft (most proposals rejected): the served text and logprobs are the teacher's own."""
    outs, health = _serve_all(dirs, "other")
    ref, ref_health = plain
    assert "draft" not in ref_health
    for got, want in zip(outs, ref):
        assert got["text"] == want["text"] and got["finish_reason"] == want["finish_reason"]
        lp, want_lp = got["logprobs"], want["logprobs"]
        assert lp["tokens"] == want_lp["tokens"]  # logprobs work with a draft: the teacher's own
        assert lp["token_logprobs"] == pytest.approx(want_lp["token_logprobs"], abs=1e-4)
        assert [list(t) for t in lp["top_logprobs"]] == [list(t) for t in want_lp["top_logprobs"]]
    d = health["draft"]
    assert d["rows"] == len(PROMPTS) and d["verifications"] > 0 and d["tokens_per_teacher_forward"] >= 1
    assert 0 <= d["accepted"] < d["proposed"]


def test_streaming_stops_and_limits_with_a_draft(dirs):
    app = build_app(dirs["teacher"], served_model_name="m", device="cpu", batch_wait_ms=0, draft=dirs["other"])
    with running(app) as url:
        whole = _complete(url, PROMPTS[0], max_tokens=12)
        body = {"model": "m", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "stream": True}
        parts, finish = [], None
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    parts.append(choice["text"])
                    finish = choice["finish_reason"] or finish
        assert "".join(parts) == whole["text"] and finish == whole["finish_reason"] == "length"
        assert len(parts) > 2  # streamed piece by piece, not in one block at the end
        stop = whole["text"][3:5]
        cut = _complete(url, PROMPTS[0], max_tokens=12, stop=[stop])
        assert cut["finish_reason"] == "stop" and cut["text"] == whole["text"][:whole["text"].index(stop)]
        n = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": PROMPTS[1], "max_tokens": 5,
                                                        "temperature": 0}).json()
        assert n["usage"]["completion_tokens"] == 5
        assert httpx.get(url + "/health").json()["draft"]["rows"] == 4


def _rows(tok, n_tokens: int = 14) -> tuple[list[Row], list[list]]:
    """Two greedy rows and the event list each one's sink fills."""
    events: list[list] = [[] for _ in PROMPTS[:2]]
    rows = [Row(tok(p)["input_ids"], SamplingParams(max_tokens=n_tokens, temperature=0), ev.append)
            for p, ev in zip(PROMPTS, events)]
    return rows, events


def _texts(events: list[list]) -> list[str]:
    return ["".join(ev.text for ev in evs) for evs in events]


def test_a_drafted_row_hands_over_to_the_batch_when_others_queue(dirs):
    """Row 1 is drafted alone; row 2 is queued meanwhile: row 1 goes on batched with row 2 joining it."""
    from distill.exporting.export import load_student

    teacher, tok, _ = load_student(dirs["teacher"], device="cpu")
    plain = Engine(teacher, tok)
    ref, ref_events = _rows(tok)
    plain.generate(ref[:1])
    plain.generate(ref[1:])
    engine = Engine(teacher, tok, draft=load_draft(dirs["other"], tok, teacher, "auto", 4))
    rows, events = _rows(tok)
    engine.submit(rows[1:])
    engine.generate(rows[:1], join=True)
    assert _texts(events) == _texts(ref_events) and all(_texts(events))
    assert engine.stats.drafted_rows == 1 and engine.stats.joined == 1
    assert all(r.done for r in rows)


def test_speculative_sampling_keeps_the_teachers_distribution():
    """Draft token d ~ q, accepted with min(1, p/q), else a draw from norm(max(0, p - q)): the result is ~ p."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.4, 0.1, 0.1, 0.3])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    trials = 8000
    for _ in range(trials):
        d = int(torch.multinomial(q, 1, generator=gen))
        replacement = accept_or_replace(p, q, d, gen)
        counts[d if replacement is None else replacement] += 1
    assert (counts / trials - p).abs().max() < 0.02  # 3.5 standard errors at 8,000 draws


def test_a_draft_with_another_vocabulary_is_refused_in_one_line(dirs, tmp_path):
    from distill.cli import app

    tok = make_tokenizer(vocab_size=280)
    make_llama(len(tok), hidden=32, layers=1).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    res = CliRunner().invoke(app, ["serve", str(dirs["teacher"]), "--draft", str(tmp_path), "--port", "0"],
                             env={"COLUMNS": "400"})  # one line, however long the temporary path
    lines = [line for line in res.output.splitlines() if line.strip() and "Loading weights" not in line]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "--draft" in lines[0] and "vocabulary differs" in lines[0] and "280 tokens" in lines[0]


def test_drafter_rejects_nothing_when_it_is_the_teacher(dirs):
    """The greedy path through Engine.generate directly: the same text, acceptance 1 (no server)."""
    from distill.exporting.export import load_student

    teacher, tok, _ = load_student(dirs["teacher"], device="cpu")
    engine = Engine(teacher, tok, draft=Drafter(teacher, tokens=3))
    (rows, events), (ref, ref_events) = _rows(tok), _rows(tok)
    for r, w in zip(rows, ref):
        engine.generate([r])
        Engine(teacher, tok).generate([w])
    assert _texts(events) == _texts(ref_events)
    assert engine.stats.draft_accepted == engine.stats.draft_proposed > 0
    assert engine.stats.draft_verifications < engine.stats.generated_tokens / 2  # several tokens per forward


def test_sampling_with_a_draft_is_seeded_and_a_cancelled_row_stops(dirs):
    from distill.exporting.export import load_student

    teacher, tok, _ = load_student(dirs["teacher"], device="cpu")
    engine = Engine(teacher, tok, draft=load_draft(dirs["other"], tok, teacher, "auto", 3))
    texts = []
    for _ in range(2):
        events: list = []
        params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=123)
        engine.generate([Row(tok(PROMPTS[0])["input_ids"], params, events.append)])
        assert events[-1].finish_reason in ("stop", "length")
        texts.append("".join(ev.text for ev in events))
    assert texts[0] == texts[1] and texts[0]  # the row's seed drives both the draft's and the teacher's draws

    events = []

    def sink(ev):  # the client leaves after the first streamed piece
        events.append(ev)
        row.cancelled.set()

    row = Row(tok(PROMPTS[1])["input_ids"], SamplingParams(max_tokens=30, temperature=0), sink)
    engine.generate([row])
    assert engine.stats.cancelled == 1 and sum(len(ev.tokens) for ev in events) < 30


def test_the_draft_recipe_trains_for_acceptance():
    """DistillSpec: TVD (1 - TVD is the expected acceptance) on the student's own samples, after an offline phase."""
    from pathlib import Path

    from distill.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "recipes" / "draft.yaml")
    assert "tvd" in {loss.name for loss in cfg.train.losses} and cfg.train.signal == "online"
    assert 0 < cfg.train.onpolicy.lmbda and 0 < cfg.train.onpolicy.start_step < cfg.train.max_steps
