"""One EOS rule, one meaning of `dtype: auto`, BOS kept for GGUF, the transformers pin (issue 18)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama, make_tokenizer

from distill.modeling import eos_token_ids

# ----------------------------------------------------------------------------------------------- EOS


def _chat_model_dir(tmp_path):
    """A tiny model saved with an extra end token in its generation_config only (as Llama-3 lists <|eot_id|>):
    the token it greedily emits first. Returns (dir, that token, prompt)."""
    from distill.evaluation.generation import encode_prompts, generate_ids

    tok = make_tokenizer()
    model = make_llama(len(tok), hidden=32, layers=1, heads=2, seed=3)
    prompt = "Q: Tom has 12 apples."
    first = generate_ids(model, tok, encode_prompts(tok, [prompt]), 8, False)[0]
    end = first[0]
    assert end not in (tok.eos_token_id, tok.pad_token_id) and len(set(first)) > 1  # the test's premise
    model.generation_config.eos_token_id = [tok.eos_token_id, end]
    out = tmp_path / "chat"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out, end, prompt


def test_eval_stops_at_an_eos_listed_only_in_generation_config(tmp_path):
    """Before, eval generated past <|eot_id|>-like ends (it stopped only at the tokenizer's EOS), so a chat
    model's answer ran on into a new turn while generate, serving and on-policy stopped."""
    from distill.evaluation.generation import generate_batch, load_for_eval

    path, end, prompt = _chat_model_dir(tmp_path)
    model, tok = load_for_eval(path, device="cpu")
    assert end in eos_token_ids(model, tok)
    gen = generate_batch(model, tok, [prompt], max_new_tokens=8, batch_size=1)
    assert gen.output_ids == [[end]]


def test_every_generating_stage_stops_on_the_same_tokens(tmp_path):
    from distill.config import DataConfig, TeacherConfig
    from distill.evaluation.generation import load_for_eval
    from distill.serving.engine import Engine
    from distill.teachers.hf import HFTeacher

    path, end, _ = _chat_model_dir(tmp_path)
    model, tok = load_for_eval(path, device="cpu")
    teacher = HFTeacher(TeacherConfig(model=str(path), device="cpu"), DataConfig())
    assert teacher.eos_ids == sorted(Engine(model, tok).eos_ids) == eos_token_ids(model, tok) == [2, end]
