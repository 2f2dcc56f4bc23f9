"""One tokenisation rule for prompts: the same record gives the same prompt ids in training, teacher
generation, evaluation, serving, on-policy sampling and the cross-tokenizer teacher side, with one start
token and never two (issue 14, defect 2: training rows began [1, 1, 87, ...], eval rows [1, 87, ...])."""

from __future__ import annotations

import json

import pytest
from conftest import make_llama, make_tokenizer

from distill.config import DataConfig, GenerateConfig, TeacherConfig, load_config
from distill.data.batching import DistillCollator, tokenize_pair
from distill.data.crosstok import add_teacher_side
from distill.data.encoding import encode_prompt, special_prefix, uses_template
from distill.data.prompts import Record, render_prompt
from distill.evaluation.generation import generate_batch
from distill.serving.app import ServeOptions, _chat_prompt, _completion_prompts
from distill.serving.protocol import ChatMessage, CompletionRequest
from distill.teachers.base import Prompt
from distill.teachers.hf import HFTeacher
from distill.training.onpolicy import prompts_from_batch
from distill.training.train import _examples_from_file

PROMPT = "Q: Tom has 12 apples. He eats 5. How many apples now? A:"


def _tokenizer(kind: str):
    """llama_chat: adds BOS itself and its chat template writes <s> too (the double-BOS case);
    bos_plain: adds BOS, no template; postproc_bos: BOS from its post-processor while add_bos_token is False
    (the shipped math-tutor tokenizer's shape); plain: no BOS at all."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    base = make_tokenizer(chat_template=True)
    if kind == "plain":
        return make_tokenizer()
    if kind == "postproc_bos":
        tok = make_tokenizer()
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
        assert not getattr(tok, "add_bos_token", False) and tok("hi")["input_ids"][0] == tok.bos_token_id
        return tok
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", add_bos_token=True)
    if kind == "llama_chat":
        tok.chat_template = base.chat_template
    return tok


class _Engine:  # what _completion_prompts reads of the serving engine
    def __init__(self, tok, model):
        self.tok, self.model = tok, model


@pytest.mark.parametrize("kind", ["llama_chat", "bos_plain", "postproc_bos", "plain"])
def test_same_record_same_prompt_ids_in_every_stage(kind, tmp_path):
    tok = _tokenizer(kind)
    model = make_llama(len(tok), hidden=16, layers=1, heads=2)
    record = Record(prompt=PROMPT)
    data = DataConfig()
    text = render_prompt(record, tok, data)
    templated = uses_template(tok, data)
    bos = tok.bos_token_id

    # training (a prompt/response file, as train.input)
    src = tmp_path / "train.jsonl"
    src.write_text(json.dumps({"prompt": PROMPT, "response": "7"}) + "\n")
    cfg = load_config({"train": {"max_length": 128}})
    [ex] = _examples_from_file(cfg, tok, str(src))
    training = ex["input_ids"][: ex["prompt_len"]]

    # the hf teacher (generate stage): the prompt ids it stores with every row
    teacher = HFTeacher(TeacherConfig(model="tiny"), data, model=model, tokenizer=tok)
    [(_, completion)] = list(teacher.generate([Prompt(0, record, teacher.render(record))],
                                              GenerateConfig(max_new_tokens=1)))
    generation = completion.prompt_ids

    # evaluation, as evaluate() calls it
    evaluation = generate_batch(model, tok, [text], 1, 1, add_special_tokens=not templated).prompt_ids[0]

    # serving: chat messages (the server applies the template) when there is one, else the plain prompt
    if templated:
        serving = _chat_prompt([ChatMessage(role="user", content=PROMPT)], tok, None)
    else:
        serving = _completion_prompts(CompletionRequest(model="m", prompt=PROMPT), _Engine(tok, model), ServeOptions())[0][0]

    # on-policy sampling reads the prompt back out of the training batch
    batch = DistillCollator(pad_token_id=tok.pad_token_id)([ex])
    onpolicy = prompts_from_batch(batch["input_ids"], batch["labels"])[0]

    assert training == generation == evaluation == serving == onpolicy
    if kind == "plain":
        assert training[0] != bos  # this tokenizer adds no BOS, and nothing adds one for it
    else:
        assert training[0] == bos and training[1] != bos  # one start token, not two

    if not templated:  # the cross-tokenizer teacher side re-encodes decoded plain text by the same rule
        [crossed] = add_teacher_side([ex], tok, tok, 128)
        assert crossed["teacher_input_ids"][: ex["prompt_len"]] == training


def test_encode_prompt_rules():
    tok = _tokenizer("bos_plain")
    bos = tok.bos_token_id
    plain = tok("hi", add_special_tokens=False)["input_ids"]
    assert special_prefix(tok) == [bos] and special_prefix(make_tokenizer()) == []
    assert encode_prompt(tok, "hi", rendered_with_template=False) == [bos, *plain]
    assert encode_prompt(tok, "<s>hi", rendered_with_template=False) == [bos, *plain]  # BOS already there
    assert encode_prompt(tok, "<s>hi", rendered_with_template=True) == [bos, *plain]
    assert encode_prompt(tok, "hi", rendered_with_template=True) == plain  # the template owns specials
    assert encode_prompt(make_tokenizer(), "", rendered_with_template=False) == [bos]  # empty: a start token


def test_tokenize_pair_templated_prompt_gets_one_bos():
    """The reproduction of the defect: before, this row began [1, 1, 87, ...]."""
    tok = _tokenizer("llama_chat")
    text = render_prompt(Record(prompt="hi"), tok, DataConfig())
    ex = tokenize_pair(tok, text, "5", 64, rendered_with_template=True)
    assert ex["input_ids"][:2] == tok(text, add_special_tokens=False)["input_ids"][:2]
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"][1] != tok.bos_token_id
