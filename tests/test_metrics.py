"""Task metrics against hand-computed values, user metrics, % retained, and the fidelity tensor function."""

from __future__ import annotations

import math

import pytest
import torch

from distill.evaluation.fidelity import token_fidelity
from distill.evaluation.metrics import (
    accuracy,
    exact_match,
    extract_answer,
    get_metric,
    lcs_length,
    normalize_answer,
    percent_retained,
    rouge_l,
    score_outputs,
)


@pytest.mark.parametrize(
    "raw, want",
    [
        ("1,000", "1000"),
        ("32.", "32"),
        ("32.0", "32"),
        ("0.50", "0.5"),
        ("-7", "-7"),
        ("$1,250.", "1250"),
        (" Paris ", "paris"),
        ("1.2.3", "1.2.3"),
    ],
)
def test_normalize_answer(raw, want):
    assert normalize_answer(raw) == want


def test_extract_answer_uses_first_match_and_group():
    text = "43 + 19 = 62. 62 - 30 = 32. The answer is 32. Later: the answer is 5."
    assert extract_answer(text, r"answer is\s*(-?[\d.,]+)") == "32"
    assert extract_answer(text, r"\d+ \+ \d+") == "43 + 19"  # no group: the whole match
    assert extract_answer("no number here", r"answer is\s*(-?[\d.,]+)") is None


def test_exact_match_with_extraction_and_normalisation():
    pred = "A: 600 + 400 = 1000. The answer is 1,000."
    assert exact_match(pred, "1000") == 1.0
    assert exact_match(pred, "The answer is 1000.") == 1.0  # full-solution references are extracted too
    assert exact_match(pred, "999") == 0.0
    assert exact_match("I think 1000", "1000") == 0.0  # no extractable answer scores 0
    assert exact_match("Result: 7", "7", answer_regex=r"Result:\s*(\d+)") == 1.0


def test_accuracy_strips_and_lowercases():
    assert accuracy("  Paris\n", "paris") == 1.0
    assert accuracy("Paris, France", "paris") == 0.0


def test_rouge_l_hand_computed():
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4  # the textbook example
    # LCS = the cat on the mat (5 of 6 tokens each side): P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS = a c: P = 2/4, R = 2/2, F = 2PR/(P+R) = 2/3
    assert rouge_l("a b c d", "A, C!") == pytest.approx(2 / 3)
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "a b") == 0.0
    assert rouge_l("same words", "same words") == 1.0


def test_get_metric_builtins():
    assert get_metric("accuracy") is accuracy
    assert get_metric("rouge_l") is rouge_l
    em = get_metric("exact_match", r"=\s*(\d+)")
    assert em("2 + 3 = 5", "5") == 1.0
    with pytest.raises(ValueError, match="answer_regex"):
        get_metric("exact_match", "(unclosed")


def test_user_metric_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_metrics_mod.py").write_text(
        "def length_ratio(prediction, reference):\n    return len(prediction) / len(reference)\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = get_metric("my_metrics_mod:length_ratio")
    assert fn("abcd", "ab") == 2.0
    by_path = get_metric(f"{tmp_path / 'my_metrics_mod.py'}:length_ratio")
    assert by_path("ab", "abcd") == 0.5
    with pytest.raises(ValueError, match="'NOT_CALLABLE' is not callable"):
        get_metric("my_metrics_mod:NOT_CALLABLE")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'.*ModuleNotFoundError"),
        ("math:no_such_function", "module 'math' has no attribute 'no_such_function'"),
        ("bleu", "expected one of exact_match, accuracy, rouge_l or 'module:function'"),
        ("/no/such/file.py:f", "cannot import module '/no/such/file.py'"),
    ],
)
def test_user_metric_bad_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        get_metric(spec)
    assert f"eval.metric '{spec}'" in str(err.value)


def test_score_outputs_skips_missing_references_and_checks_return_type():
    score, n = score_outputs(accuracy, ["a", "b", "c"], ["a", None, "x"])
    assert (score, n) == (0.5, 2)
    assert score_outputs(accuracy, ["a"], [None]) == (None, 0)
    with pytest.raises(ValueError, match="must return a number"):
        score_outputs(lambda p, r: "yes", ["a"], ["a"])


def test_percent_retained():
    assert percent_retained(0.45, 0.9) == pytest.approx(50.0)
    assert percent_retained(0.95, 0.9) == pytest.approx(105.5555, rel=1e-4)
    assert percent_retained(0.3, 0.0) is None  # undefined, not infinite or zero
    assert percent_retained(None, 0.9) is None


def test_token_fidelity_identical_and_hand_computed():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = logits.argmax(-1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    agree, n, kl = token_fidelity(logits, logits.clone(), targets, mask)
    assert (agree, n) == (8, 8)
    assert kl == pytest.approx(0.0, abs=1e-6)

    # teacher p = (0.5, 0.5), student q = (0.25, 0.75): KL = 0.5 ln 2 + 0.5 ln(2/3); student argmax = 1
    t = torch.log(torch.tensor([[[0.5, 0.5]]]))
    s = torch.log(torch.tensor([[[0.25, 0.75]]]))
    agree, n, kl = token_fidelity(s, t, torch.tensor([[0]]), torch.ones(1, 1, dtype=torch.bool))
    assert (agree, n) == (0, 1)
    assert kl == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-5)


def test_token_fidelity_no_nan_with_minus_inf_and_padded_vocab():
    teacher = torch.tensor([[[0.0, float("-inf"), 1.0]]])
    student = torch.tensor([[[0.0, 2.0, 1.0, 9.0]]])  # one padded vocab row, cut off
    agree, n, kl = token_fidelity(student, teacher, torch.tensor([[2]]), torch.ones(1, 1, dtype=torch.bool))
    assert n == 1 and agree == 0 and math.isfinite(kl) and kl > 0
