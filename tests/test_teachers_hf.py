"""The hf teacher: batched left-padded generation, stop strings, EOS, sampling, and exact top-k capture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_llama, make_tokenizer

from distill.config import GenerateConfig, TeacherConfig, load_config
from distill.data.prompts import Record
from distill.teachers.base import Prompt
from distill.teachers.hf import HFTeacher

PROMPTS = ["Q: Tom has 12 apples.", "Distillation trains a small student to imitate", "hello",
           "Q: Lily has 43 cards. She finds 19 more. How many cards now? A:", "The quick brown fox"]


@pytest.fixture(scope="module")
def teacher():
    tok = make_tokenizer()
    return HFTeacher(TeacherConfig(model="tiny"), model=make_llama(len(tok), layers=2), tokenizer=tok)


def _prompts(teacher, texts=PROMPTS):
    return [Prompt(i, Record(prompt=t), teacher.render(Record(prompt=t))) for i, t in enumerate(texts)]


def _run(teacher, **kw):
    params = GenerateConfig(**{"max_new_tokens": 8, "batch_size": 3, **kw})
    out = {p.index: c for p, c in teacher.generate(_prompts(teacher), params)}
    return [out[i] for i in range(len(PROMPTS))]


@torch.inference_mode()
def _dense(teacher, c):
    """log_softmax of one unpadded forward over prompt + response: rows predicting each response token."""
    ids = torch.tensor([c.prompt_ids + c.token_ids])
    logprobs = torch.log_softmax(teacher.model(ids).logits[0].float(), -1)
    p = len(c.prompt_ids)
    return logprobs[p - 1: p - 1 + len(c.token_ids)]


def test_sparse_capture_equals_dense_log_softmax(teacher):
    completions = _run(teacher, top_k=6)
    assert len({len(c.prompt_ids) for c in completions}) > 1  # padding really happens
    for c in completions:
        dense = _dense(teacher, c)
        values, ids = dense.topk(6, dim=-1)
        assert c.topk_ids.shape == (len(c.token_ids), 6) and c.topk_ids.dtype == np.int32
        np.testing.assert_array_equal(c.topk_ids, ids.numpy())
        np.testing.assert_allclose(c.topk_logprobs, values.numpy(), atol=1e-5)
        np.testing.assert_allclose(c.tail, (1 - values.exp().sum(-1)).clamp_min(0).numpy(), atol=1e-5)
        # greedy: each generated token is the argmax of the distribution that predicts it
        assert c.token_ids == dense.argmax(-1).tolist()


def test_batched_greedy_equals_one_at_a_time(teacher):
    batched = _run(teacher)
    single = _run(teacher, batch_size=1)
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.finish_reason == "length" and len(c.token_ids) == 8 for c in batched)


def test_stop_string_truncates_text_and_ids(teacher):
    free = _run(teacher)
    text = free[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    stopped = _run(teacher, stop=[stop], top_k=3)[0]
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text and text.startswith(stopped.text)
    assert teacher.tokenizer.decode(stopped.token_ids, skip_special_tokens=True) == stopped.text
    assert stopped.token_ids == free[0].token_ids[: len(stopped.token_ids)]
    assert stopped.topk_ids.shape[0] == len(stopped.token_ids)


def test_generation_ends_on_eos_and_keeps_it():
    tok = make_tokenizer()
    model = make_llama(len(tok), layers=2)
    free = _run(HFTeacher(TeacherConfig(model="tiny"), model=model, tokenizer=tok))[1]
    fake_eos = free.token_ids[3]
    cut = free.token_ids.index(fake_eos)
    model.generation_config.eos_token_id = fake_eos  # a token this random model does emit
    teacher = HFTeacher(TeacherConfig(model="tiny"), model=model, tokenizer=tok)
    c = _run(teacher, top_k=2)[1]
    assert c.finish_reason == "stop" and c.token_ids == free.token_ids[: cut + 1] and c.token_ids[-1] == fake_eos
    assert c.topk_ids.shape == (cut + 1, 2)


def test_sampling_is_seeded(teacher):
    a = _run(teacher, temperature=1.5, seed=1)
    b = _run(teacher, temperature=1.5, seed=1)
    c = _run(teacher, temperature=1.5, seed=2)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_chat_template_renders_without_double_bos():
    tok = make_tokenizer(chat_template=True)
    teacher = HFTeacher(TeacherConfig(model="tiny"), model=make_llama(len(tok), layers=1), tokenizer=tok)
    text = teacher.render(Record(messages=[{"role": "user", "content": "hi"}]))
    assert text == "<s>user: hi\n<s>assistant: "
    assert teacher.encode(text)[0] == tok.bos_token_id and teacher.encode(text)[1] != tok.bos_token_id


def test_generate_stage_on_a_saved_teacher(tmp_path, teacher_dir, prompts_file):
    from distill import generate
    from distill.store.shards import read_store, shard_files

    cfg = load_config(None, [f"run_dir={tmp_path}", f"teacher.model={teacher_dir}", f"generate.input={prompts_file}",
                             "generate.max_new_tokens=6", "generate.top_k=4", "generate.batch_size=3",
                             "generate.shard_rows=3"])
    path = generate(cfg)
    rows = read_store(path)
    assert [r["index"] for r in rows] == list(range(8)) and len({r["key"] for r in rows}) == 8
    assert rows[0]["prompt"].startswith("Q: Tom has 12 apples") and rows[0]["reference"] == "7"
    assert all(r["topk_ids"].shape == (len(r["response_ids"]), 4) for r in rows)
    assert all(r["teacher"] == f"hf:{teacher_dir}" for r in rows)
    before = {p.name: p.stat().st_mtime_ns for p in shard_files(path)}
    assert generate(cfg) == path  # a rerun finds every key done and writes nothing
    assert {p.name: p.stat().st_mtime_ns for p in shard_files(path)} == before


def _forward_calls(teacher, **kw):
    """Run a batch of 3 prompts; record (input width, cache class) of every model forward."""
    calls = []
    hook = teacher.model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((kwargs["input_ids"].shape[1], type(kwargs.get("cache")).__name__)),
        with_kwargs=True)
    try:
        params = GenerateConfig(max_new_tokens=8, batch_size=3, **kw)
        out = [c for _, c in teacher.generate(_prompts(teacher, PROMPTS[:3]), params)]
    finally:
        hook.remove()
    return calls, out


def test_topk_comes_from_the_generation_steps_without_a_second_forward(teacher):
    """One forward per generated token, none over prompt + response afterwards (it was 40% of generate's time
    on the demo teacher); the static KV cache on CPU (the dynamic one copies itself at every step)."""
    calls, out = _forward_calls(teacher, top_k=4)
    assert len(calls) == max(len(c.token_ids) for c in out) == 8
    assert all(width == 1 for width, _ in calls[1:])  # decode steps only, after the prefill
    assert {cache for _, cache in calls} == {"StaticCache"}
    assert all(c.topk_ids.shape == (len(c.token_ids), 4) for c in out)


def test_topk_falls_back_to_a_capture_pass_when_a_forward_returns_no_logits(teacher, monkeypatch):
    from distill.teachers import hf

    expected = _run(teacher, top_k=3)
    monkeypatch.setattr(hf.StepCapture, "__call__", lambda self, m, a, o: setattr(self, "missing", True))
    fallback = _run(teacher, top_k=3)
    for a, b in zip(expected, fallback):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-5)


def test_dynamic_cache_when_the_static_one_would_not_fit(teacher, monkeypatch):
    from distill.teachers import hf

    monkeypatch.setattr(hf, "STATIC_CACHE_BYTES", 1024)
    calls, _ = _forward_calls(teacher, top_k=2)
    assert {cache for _, cache in calls} == {"DynamicCache"}
