"""Chat requests on a served student are rendered exactly as `distill train` rendered its prompts (the rule is
saved in the student dir as prompt_format.json); a model with no chat template and no saved rule gets a 400
that points at /v1/completions instead of a made-up format it never saw (issue 18)."""

from __future__ import annotations

import json

import pytest
from conftest import make_tokenizer, save_sharp_teacher
from fastapi.testclient import TestClient
from test_serve import save_student

from distill.config import load_config
from distill.serving.app import _chat_prompt
from distill.serving.protocol import ChatMessage
from distill.serving.serve import build_app
from distill.training.train import _examples_from_file, train

QUESTION = "Q: Tom has 12 apples. He eats 5. How many apples now? A:"


def _train_student(tmp_path, tokenizer, **data) -> tuple:
    """A student trained for one step on prompt/response rows under `data` settings: (its dir, its config)."""
    teacher = tmp_path / "teacher"
    save_sharp_teacher(teacher, tokenizer)
    rows = [{"prompt": QUESTION, "response": " 12 - 5 = 7. The answer is 7."}] * 4
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config({
        "run_dir": str(tmp_path / "run"), "teacher": {"model": str(teacher)}, "data": data,
        "student": {"init": "config", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                  "num_attention_heads": 4, "num_key_value_heads": 4}},
        "train": {"input": str(path), "signal": "none", "max_steps": 1, "per_device_train_batch_size": 4,
                  "save_steps": 1000, "losses": [{"name": "cross_entropy"}]},
    })
    (out,) = train(cfg)
    return out, cfg


def _training_prompt_ids(cfg, tokenizer) -> list[int]:
    """The prompt ids of the first training example, as the trainer built them."""
    ex = _examples_from_file(cfg, tokenizer, cfg.train.input)[0]
    return ex["input_ids"][: ex["prompt_len"]]


@pytest.mark.parametrize("template,data", [
    (False, {}),  # the demo: plain prompts, no template: the question verbatim (not "user: ...\nassistant:")
    (True, {"chat_template": False}),  # a template the run chose not to use must not be applied either
    (True, {}),  # trained with the template: the template
    (False, {"system_prompt": "Be brief."}),  # the run's system prompt comes along
])
def test_chat_renders_exactly_the_training_prompt(tmp_path, template, data):
    from distill.data.prompt_format import PROMPT_FORMAT_FILE, load_prompt_format

    tok = make_tokenizer(chat_template=template)
    out, cfg = _train_student(tmp_path, tok, **data)
    assert (out / PROMPT_FORMAT_FILE).is_file()
    fmt = load_prompt_format(out)
    served = _chat_prompt([ChatMessage(role="user", content=QUESTION)], tok, fmt)
    assert served == _training_prompt_ids(cfg, tok)


def test_demo_like_student_answers_chat_as_completions(tmp_path):
    """Over HTTP, the chat answer of a plain-prompt student equals its completion of the question text."""
    tok = make_tokenizer()
    out, _ = _train_student(tmp_path, tok)
    app = build_app(out, served_model_name="s", device="cpu")
    with TestClient(app) as client:
        chat = client.post("/v1/chat/completions", json={
            "model": "s", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "temperature": 0})
        plain = client.post("/v1/completions", json={"model": "s", "prompt": QUESTION, "max_tokens": 8,
                                                     "temperature": 0})
    assert chat.status_code == 200 and plain.status_code == 200
    assert chat.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]
    assert chat.json()["choices"][0]["message"]["content"] == plain.json()["choices"][0]["text"]


def test_chat_rows_render_as_the_transcript_training_saw(tmp_path):
    """A student trained on chat `messages` rows saw a 'role: content' transcript: a one-question chat gets it."""
    from distill.data.prompt_format import load_prompt_format

    tok = make_tokenizer()
    teacher = tmp_path / "teacher"
    save_sharp_teacher(teacher, tok)
    path = tmp_path / "chats.jsonl"
    row = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]}
    path.write_text(json.dumps(row) + "\n")
    cfg = load_config({"run_dir": str(tmp_path / "run"), "teacher": {"model": str(teacher)},
                       "train": {"input": str(path), "signal": "none", "max_steps": 1, "save_steps": 1000,
                                 "losses": [{"name": "cross_entropy"}]},
                       "student": {"init": "config", "config": {"hidden_size": 32, "intermediate_size": 64,
                                                                "num_hidden_layers": 1, "num_attention_heads": 4,
                                                                "num_key_value_heads": 4}}})
    (out,) = train(cfg)
    served = _chat_prompt([ChatMessage(role="user", content="hello")], tok, load_prompt_format(out))
    assert tok.decode(served, skip_special_tokens=True) == "user: hello\nassistant:"
    assert served == _training_prompt_ids(cfg, tok)


def test_model_without_template_or_format_is_400_naming_completions(tmp_path):
    student = save_student(tmp_path / "bare", chat_template=False)
    app = build_app(student, served_model_name="s", device="cpu")
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"model": "s", "messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 2})
        assert r.status_code == 400
        err = r.json()["error"]
        assert "/v1/completions" in err["message"] and err["param"] == "messages"
        assert client.post("/v1/completions", json={"model": "s", "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_model_with_its_own_template_and_no_format_uses_the_template(tmp_path):
    from distill.data.prompt_format import load_prompt_format

    student = save_student(tmp_path / "templated", chat_template=True)
    tok = make_tokenizer(chat_template=True)
    ids = _chat_prompt([ChatMessage(role="user", content="hi")], tok, load_prompt_format(student))
    assert tok.decode(ids) == "<s>user: hi\n<s>assistant: "
