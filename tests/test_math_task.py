"""The math-tutor task: generator, splits, scoring, tokenizer, and the shipped teacher."""

from __future__ import annotations

import json
import re

import pytest

from distill.recipes import math_tutor as task
from distill.recipes import recipe_dir


def test_generator_is_deterministic_and_distinct():
    a = task.make_problems(200, seed=3, split="train")
    b = task.make_problems(200, seed=3, split="train")
    c = task.make_problems(200, seed=4, split="train")
    assert [p.prompt + p.solution for p in a] == [p.prompt + p.solution for p in b]
    assert [p.prompt for p in a] != [p.prompt for p in c]
    assert len({p.prompt for p in a}) == 200
    # a longer draw starts with the shorter one, so sets of different sizes nest
    assert [p.prompt for p in task.make_problems(50, seed=3, split="train")] == [p.prompt for p in a[:50]]


def test_splits_are_disjoint_by_arithmetic():
    train = task.make_problems(3000, seed=0, split="train")
    test = task.make_problems(500, seed=0, split="test")
    assert {p.key for p in train}.isdisjoint({p.key for p in test})
    assert all(p.split == "train" for p in train) and all(p.split == "test" for p in test)
    with pytest.raises(ValueError, match="split"):
        task.make_problems(1, split="valid")


def test_solutions_are_correct_and_numbers_stay_in_range():
    problems = task.make_problems(1000, seed=1, split="train")
    n_ops = set()
    for p in problems:
        steps = task.parse_steps(p.solution)
        n_ops.add(len(steps))
        value = int(re.search(r"has (\d+) ", p.prompt).group(1))
        for a, op, b, c in steps:
            assert a == value and str(b) in p.prompt
            assert c == (a + b if op == "+" else a - b)
            assert task.MIN_NUMBER <= b <= task.MAX_NUMBER and 0 <= c <= task.MAX_VALUE
            value = c
        assert p.answer == str(value) and p.solution.endswith(f" The answer is {value}.")
        assert task.check_solution(p.solution, p)
        assert p.prompt.startswith("Q: ") and p.prompt.endswith(" A:") and p.solution.startswith(" ")
    assert n_ops == {1, 2}


def test_check_solution_rejects_wrong_steps():
    p = next(p for p in task.make_problems(50, seed=2) if len(p.steps) == 2)
    wrong_final = p.solution.replace(f"is {p.answer}.", f"is {int(p.answer) + 1}.")
    assert not task.check_solution(wrong_final, p)
    first = task.parse_steps(p.solution)[0]
    bad_step = p.solution.replace(f"= {first[3]}.", f"= {first[3] + 10}.", 1)
    assert not task.check_solution(bad_step, p)
    assert not task.check_solution(" The answer is " + p.answer + ".", p)  # steps missing


def test_extract_answer_and_exact_match():
    assert task.extract_answer(" 43 + 19 = 62. 62 - 30 = 32. The answer is 32.") == "32"
    assert task.extract_answer("The answer is -7.") == "-7"
    assert task.extract_answer("no number here") is None
    assert task.extract_answer(None) is None
    assert task.exact_match(" 5 + 5 = 10. The answer is 10.", "10")
    assert task.exact_match(" The answer is 10. The answer is 11.", 10)  # first answer counts
    assert not task.exact_match(" The answer is 100.", "10")
    assert task.exact_match("10", "10") and not task.exact_match("", "10")


def test_recommended_regex_matches_and_config_default_needs_it():
    from distill.config import EvalConfig

    text = task.make_problems(1)[0].solution
    answer = task.make_problems(1)[0].answer
    assert re.search(task.ANSWER_REGEX, text).group(1) == answer
    # the generic default also captures the sentence's final "." — hence the recipe's own regex
    assert re.search(EvalConfig().answer_regex, text).group(1).rstrip(".") == answer


def test_write_jsonl_rows(tmp_path):
    problems = task.make_problems(5, seed=0)

    def rows(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    plain = rows(task.write_jsonl(tmp_path / "p.jsonl", problems, with_answers=False))
    assert plain == [{"prompt": p.prompt} for p in problems]
    full = rows(task.write_jsonl(tmp_path / "s.jsonl", problems, with_solutions=True))
    assert full == [{"prompt": p.prompt, "answer": p.answer, "response": p.solution} for p in problems]
    final = rows(task.write_jsonl(tmp_path / "f.jsonl", problems, final_only=True))
    assert [r["response"] for r in final] == [f" The answer is {p.answer}." for p in problems]
    with pytest.raises(ValueError, match="exclusive"):
        task.write_jsonl(tmp_path / "x.jsonl", problems, with_solutions=True, final_only=True)


def test_tokenizer_round_trip_and_shipped_copy():
    from distill.modeling import load_tokenizer

    built = task.build_tokenizer()
    shipped = load_tokenizer(task.tokenizer_path())
    texts = [p.prompt + p.solution for p in task.make_problems(300, seed=5)]
    texts += [p.prompt + p.solution for p in task.make_problems(100, seed=5, split="test")]
    for tok in (built, shipped):
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
        assert tok.chat_template is None
        for t in texts:
            ids = tok(t)["input_ids"]
            assert ids[0] == tok.bos_token_id and len(ids) == len(t) + 1  # one token per character
            assert tok.decode(ids, skip_special_tokens=True) == t
        assert all(len(tok(d, add_special_tokens=False)["input_ids"]) == 1 for d in "0123456789")
    assert built.get_vocab() == shipped.get_vocab()


def test_package_data_is_installed():
    data = recipe_dir("math_tutor")
    assert (data / "tokenizer" / "tokenizer.json").is_file()
    assert (data / "teacher" / "model.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match="math_tutor"):
        recipe_dir("no_such_recipe")


def test_shipped_teacher_is_small_and_solves_held_out_problems():
    import torch

    from distill.modeling import load_model, load_tokenizer_for

    path = task.teacher_path()
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert 0 < weights <= 25 * 1024 * 1024
    metrics = json.loads((path / "teacher_metrics.json").read_text())
    assert metrics["held_out_exact_match"] >= 0.9 and metrics["task"] == task.task_settings()

    torch.manual_seed(0)
    model = load_model(path, device="cpu").eval()
    tok = load_tokenizer_for(path)
    assert tok.get_vocab() == task.build_tokenizer().get_vocab()
    problems = task.make_problems(20, seed=123, split="test")
    preds = task.greedy_solve(model, tok, [p.prompt for p in problems])
    solved = sum(task.exact_match(t, p.answer) for t, p in zip(preds, problems))
    assert solved >= 16, list(zip(preds, [p.answer for p in problems]))
