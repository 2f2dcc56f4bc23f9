"""Chain-of-thought distillation: reasoning requested and split into the store, two-task / trace examples, and a
two-task student that reasons when asked and answers bare when not."""

import json

import pytest
import torch

from distill.config import load_config
from distill.data.cot import (
    WeightedCollator,
    cot_pairs,
    request_reasoning,
    split_reasoning,
    student_prompt,
)
from distill.data.prompts import Record

PROBLEMS = [  # (prompt, reasoning, answer): tiny, deterministic, memorisable
    ("Q: 3 + 4 =", "three plus four is seven.", "7"),
    ("Q: 5 + 1 =", "five plus one is six.", "6"),
    ("Q: 2 + 6 =", "two plus six is eight.", "8"),
    ("Q: 4 + 5 =", "four plus five is nine.", "9"),
]


def test_split_reasoning():
    assert split_reasoning("a then b.\nAnswer: 42") == ("a then b.", "42")
    assert split_reasoning("Answer: is quoted. so\nAnswer: 5") == ("Answer: is quoted. so", "5")  # the last marker
    assert split_reasoning("just 42") == (None, "just 42")
    assert split_reasoning("<think>hmm, 6*7</think>\n42") == ("hmm, 6*7", "42")
    assert split_reasoning("<think>x</think> Answer: 3") == ("x", "3")


def test_request_reasoning_goes_into_the_prompt_or_last_user_turn():
    suffix = " Think step by step."
    assert request_reasoning(Record(prompt="Q?"), suffix).prompt == "Q? Think step by step."
    chat = Record(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "Q?"}])
    got = request_reasoning(chat, suffix)
    assert got.messages[-1]["content"] == "Q? Think step by step." and chat.messages[-1]["content"] == "Q?"


def test_two_task_and_trace_pairs_with_weights():
    cfg = load_config({"train": {"cot": {"mode": "two_task", "alpha": 0.8}}})
    suffix = cfg.generate.reasoning_prompt
    rows = [{"prompt": "Q: 3 + 4 =" + suffix, "reasoning": "3 + 4 = 7.", "response": "7"},
            {"prompt": "Q: no reasoning", "reasoning": None, "response": "x"}]
    pairs = cot_pairs(rows, cfg)
    assert pairs == [("[answer] Q: 3 + 4 =", "7", pytest.approx(1.6)),
                     ("[rationale] Q: 3 + 4 =", "3 + 4 = 7.\nAnswer: 7", pytest.approx(0.4))]
    trace = cot_pairs(rows, load_config({"train": {"cot": {"mode": "trace"}}}))
    assert trace == [("Q: 3 + 4 =", "3 + 4 = 7.\nAnswer: 7", 1.0)]
    assert student_prompt("Q", cfg.train.cot) == "[rationale] Q"
    assert student_prompt("Q", cfg.train.cot, "answer") == "[answer] Q"


def test_task_weights_scale_the_loss_per_example(tokenizer):
    """alpha weights answer vs rationale tokens: 2a * sum(answer) + 2(1-a) * sum(rationale), one normaliser."""
    from distill.data.batching import DistillCollator, tokenize_pair
    from distill.losses import LOSSES
    from distill.training.trainer import DistillationTrainer

    exs = [tokenize_pair(tokenizer, "[answer] Q:", " 7", 32), tokenize_pair(tokenizer, "[rationale] Q:", " 3 + 4 = 7.", 32)]
    exs[0]["loss_weight"], exs[1]["loss_weight"] = 1.6, 0.4
    batch = WeightedCollator(DistillCollator(tokenizer.pad_token_id))(exs)
    torch.manual_seed(0)
    logits = torch.randn(2, batch["input_ids"].shape[1] - 1, len(tokenizer))
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    kw = {"num_items_in_batch": int(mask.sum())}
    got = DistillationTrainer._weighted(LOSSES["cross_entropy"], logits, targets, mask, kw, batch["loss_weight"])
    rows = torch.tensor([[True], [False]])
    want = 1.6 * LOSSES["cross_entropy"](logits, targets, mask & rows, **kw) + \
        0.4 * LOSSES["cross_entropy"](logits, targets, mask & ~rows, **kw)
    torch.testing.assert_close(got, want)
    plain = LOSSES["cross_entropy"](logits, targets, mask, **kw)
    half = torch.tensor([1.0, 1.0])
    torch.testing.assert_close(DistillationTrainer._weighted(LOSSES["cross_entropy"], logits, targets, mask, kw, half), plain)


def test_generate_with_reasoning_splits_into_the_store(tmp_path, prompts_file, teacher_dir, monkeypatch):
    """The teacher sees the reasoning request; the store keeps reasoning and answer apart."""
    import importlib

    gen = importlib.import_module("distill.teachers.generate")  # the module (distill.teachers.generate is also the function)
    from distill.store.shards import read_store
    from distill.teachers import Completion

    seen = []

    class Scripted:
        def generate(self, prompts, params):
            for p in prompts:
                seen.append(p.text)
                yield p, Completion(text=f"I count carefully for {p.index}.\nAnswer: {p.index}", finish_reason="stop")

        def close(self):
            pass

    monkeypatch.setattr(gen, "_build", lambda config, device, tokenizer: Scripted())
    cfg = load_config({"run_dir": str(tmp_path / "run"), "teacher": {"model": str(teacher_dir)},
                       "generate": {"input": str(prompts_file), "reasoning": True}})
    path = gen.generate(cfg)
    rows = read_store(path)
    assert len(rows) == 8 and all(cfg.generate.reasoning_prompt in t for t in seen)
    for row in rows:
        assert row["reasoning"] == f"I count carefully for {row['index']}."
        assert row["response"] == str(row["index"])
    # the CoT pairs strip the request again: the task prefix (or trace) tells the student what to do
    pairs = cot_pairs(rows, load_config({**cfg.model_dump(mode="json"), "train": {"cot": {"mode": "two_task"}}}))
    assert len(pairs) == 16 and all(cfg.generate.reasoning_prompt not in p for p, _, _ in pairs)


def _greedy(model, tokenizer, prompt: str, n: int = 40) -> str:
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_two_task_student_reasons_when_asked_and_answers_bare_when_not(tmp_path, teacher_dir, tokenizer):
    from distill.modeling import load_model
    from distill.training.train import train

    data = tmp_path / "cot.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "reasoning": " " + r, "response": " " + a})
                              for p, r, a in PROBLEMS) + "\n")
    cfg = load_config({
        "run_dir": str(tmp_path / "run"),
        "teacher": {"model": str(teacher_dir)},
        "student": {"init": "config", "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                                  "num_attention_heads": 4, "num_key_value_heads": 4}},
        "generate": {"answer_marker": "Answer:"},
        "train": {"input": str(data), "signal": "none", "losses": [{"name": "cross_entropy"}], "max_steps": 120,
                  "learning_rate": 1e-2, "per_device_train_batch_size": 8, "lr_scheduler_type": "constant",
                  "logging_steps": 40, "save_steps": 1000, "cot": {"mode": "two_task", "alpha": 0.5}},
    })
    (out,) = train(cfg)
    student = load_model(out)
    for prompt, reasoning, answer in PROBLEMS:
        with_reasoning = _greedy(student, tokenizer, student_prompt(prompt, cfg.train.cot, "rationale"))
        bare = _greedy(student, tokenizer, student_prompt(prompt, cfg.train.cot, "answer"))
        assert with_reasoning.strip() == f"{reasoning}\nAnswer: {answer}", with_reasoning
        assert bare.strip() == answer, bare


def test_no_split_error_names_the_marker_and_an_output(tmp_path):
    """0 rows split: the error says which marker was looked for and shows what the teacher wrote instead."""
    from distill.data.cot import no_reasoning_message

    store = tmp_path / "teacher"
    store.mkdir()
    (store / "store.json").write_text(json.dumps({"params": {"reasoning": True, "answer_marker": "Answer:"}}))
    rows = [{"prompt": "Q: 3 + 4 =", "reasoning": None, "response": "3 + 4 = 7. The answer is 7."}] * 3
    cfg = load_config({"generate": {"reasoning": True}, "train": {"cot": {"mode": "two_task"}}})
    msg = no_reasoning_message(rows, str(store), cfg)
    assert "0 of 3" in msg and "'Answer:'" in msg and "The answer is 7." in msg and "generate.answer_marker" in msg
    (store / "store.json").write_text(json.dumps({"params": {"reasoning": False}}))
    assert "without generate.reasoning=true" in no_reasoning_message(rows, str(store), cfg)


def test_trace_separator_follows_the_tokenizer(tokenizer):
    """A newline between steps and answer only when the tokenizer can write one (the math tutor's cannot)."""
    from distill.data.cot import trace_separator
    from distill.recipes import math_tutor

    assert trace_separator(tokenizer) == "\n"
    assert trace_separator(math_tutor.build_tokenizer()) == " "
