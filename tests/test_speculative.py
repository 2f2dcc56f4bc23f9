"""The student as a speculative draft: the teacher's greedy output is unchanged, acceptance is counted."""

from __future__ import annotations

import torch
from conftest import make_llama

from distill.evaluation.speculative import draft_check


def _sharp(vocab: int, layers: int, seed: int):
    model = make_llama(vocab, hidden=64, layers=layers, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # peaked distributions: no near-ties for argmax to flip on
    return model


def _prompts(vocab: int, n: int = 4):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (6 + i,), generator=g).tolist() for i in range(n)]


def test_draft_equal_to_teacher_is_always_accepted():
    teacher = _sharp(120, layers=2, seed=1)
    report = draft_check(teacher, teacher, _prompts(120), max_new_tokens=12, eos_token_id=2, pad_token_id=0)
    assert report["identical"] == report["n_prompts"] == 4
    assert report["draft_tokens_proposed"] > 0
    assert report["acceptance"] == 1.0
    assert report["tokens_per_teacher_forward"] > 1.0  # several tokens per teacher forward
    assert report["teacher_tokens"] == report["assisted_tokens"]


def test_other_draft_keeps_the_teachers_output_and_is_partly_rejected():
    teacher = _sharp(120, layers=2, seed=1)
    draft = _sharp(120, layers=1, seed=7)  # an unrelated model: most proposals are wrong
    report = draft_check(teacher, draft, _prompts(120), max_new_tokens=12, eos_token_id=2, pad_token_id=0)
    assert report["identical"] == report["n_prompts"]  # lossless: the output is the teacher's own
    assert report["acceptance"] is not None and report["acceptance"] < 0.5
    assert report["draft_tokens_accepted"] < report["draft_tokens_proposed"]
    assert report["speedup"] is not None and report["speedup"] > 0
