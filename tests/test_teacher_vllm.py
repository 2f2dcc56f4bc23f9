"""The vllm backend without vLLM or a GPU: its error messages, and its glue code against a stand-in engine."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import make_tokenizer

from distill.config import GenerateConfig, TeacherConfig
from distill.data.prompts import Record
from distill.teachers.base import Prompt, TeacherError
from distill.teachers.vllm import VLLMTeacher, import_vllm, topk_from_vllm


@dataclass
class Logprob:
    logprob: float
    rank: int | None
    decoded_token: str | None = None


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(TeacherError, match=r'pip install "distill\[vllm\]".*teacher.backend=hf'):
        import_vllm()


def test_missing_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TeacherError, match="needs a CUDA GPU"):
        import_vllm()


def test_topk_keeps_ranks_1_to_k_only():
    pos = {7: Logprob(np.log(0.05), 9), 3: Logprob(np.log(0.5), 1), 4: Logprob(np.log(0.3), 2)}
    ids, lps, tail = topk_from_vllm([pos], k=2)
    assert ids.tolist() == [[3, 4]] and np.allclose(np.exp(lps), [[0.5, 0.3]]) and np.allclose(tail, [0.2])
    ids, lps, tail = topk_from_vllm([pos], k=3)  # rank 9 is not in the top 3: an empty slot, safe to gather
    assert ids.tolist() == [[3, 4, 0]] and np.isneginf(lps[0, 2]) and np.allclose(tail, [0.2])


def test_engine_glue_with_a_stand_in_vllm(monkeypatch):
    tok = make_tokenizer()
    seen = {}

    class SamplingParams:
        def __init__(self, **kw):
            seen["sampling"] = kw

    class LLM:
        def __init__(self, **kw):
            seen["engine"] = kw

        def get_tokenizer(self):
            return tok

        def generate(self, prompts, sampling, use_tqdm=False):
            seen["prompts"] = prompts
            out = types.SimpleNamespace(text="w1 w2", token_ids=[5, 6], finish_reason="length",
                                        logprobs=[{5: Logprob(-0.1, 1), 9: Logprob(-3.0, 2)},
                                                  {6: Logprob(-0.2, 1), 8: Logprob(-2.0, 2)}])
            return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    teacher = VLLMTeacher(TeacherConfig(model="m", backend="vllm", tensor_parallel_size=2), top_k=2)
    assert seen["engine"]["tensor_parallel_size"] == 2 and seen["engine"]["max_logprobs"] == 20
    params = GenerateConfig(max_new_tokens=2, top_k=2, stop=["###"])
    rec = Record(prompt="hello there")
    ((_prompt, c),) = list(teacher.generate([Prompt(0, rec, teacher.render(rec))], params))
    assert seen["sampling"]["logprobs"] == 2 and seen["sampling"]["stop"] == ["###"]
    assert seen["sampling"]["max_tokens"] == 2 and seen["sampling"]["temperature"] == 0.0
    assert seen["prompts"] == [{"prompt_token_ids": tok("hello there")["input_ids"]}]
    assert c.token_ids == [5, 6] and c.prompt_ids == tok("hello there")["input_ids"]
    assert c.topk_ids.tolist() == [[5, 9], [6, 8]] and c.finish_reason == "length"


def test_stop_string_ids_follow_the_text(monkeypatch):
    """vLLM drops a matched stop string from the text but not from token_ids: the stored ids are cut to match."""
    tok = make_tokenizer()
    full = tok("The answer is 7.###")["input_ids"]

    class LLM:
        def __init__(self, **kw):
            pass

        def get_tokenizer(self):
            return tok

        def generate(self, prompts, sampling, use_tqdm=False):
            out = types.SimpleNamespace(text="The answer is 7.", token_ids=full, finish_reason="stop",
                                        stop_reason="###", logprobs=[{t: Logprob(-0.5, 1)} for t in full])
            return [types.SimpleNamespace(outputs=[out])]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **kw: kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    teacher = VLLMTeacher(TeacherConfig(model="m", backend="vllm"), top_k=1)
    rec = Record(prompt="Q?")
    ((_, c),) = list(teacher.generate([Prompt(0, rec, "Q?")], GenerateConfig(stop=["###"], top_k=1)))
    assert c.text == "The answer is 7." and tok.decode(c.token_ids) == "The answer is 7."
    assert len(c.token_ids) < len(full) and c.topk_ids.shape == (len(c.token_ids), 1)
