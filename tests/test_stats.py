"""distill.evaluation.stats against known answers: exact McNemar p-values, bootstrap intervals that cover the
truth at their nominal rate on synthetic data, collapse detection on constructed answer lists, the teacher
check, the speed claim and break-even."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distill.evaluation.stats import (
    answer_collapse,
    binomial_two_sided,
    break_even_tokens,
    majority_baseline,
    mcnemar_exact,
    paired,
    paired_bootstrap,
    paired_test,
    precision_check,
    speed_claim,
    teacher_check,
    total_variation,
)


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (0, 0, 1.0),
        (0, 5, 2 / 32),  # 2 * P[X <= 0], X ~ Bin(5, 1/2)
        (1, 9, 2 * 11 / 1024),  # 2 * (1 + 10) / 2^10 = 0.021484375
        (5, 5, 1.0),
        (2, 8, 2 * (1 + 10 + 45) / 1024),  # 0.109375
        (12, 3, 2 * (1 + 15 + 105 + 455) / 2**15),  # 0.03515625
    ],
)
def test_exact_mcnemar_p_values(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)
    assert mcnemar_exact(c, b) == pytest.approx(p, rel=1e-12)  # two-sided: symmetric


def test_binomial_matches_a_direct_sum():
    n = 25
    for k in range(n + 1):
        pmf = [math.comb(n, i) / 2**n for i in range(n + 1)]
        direct = sum(q for q in pmf if q <= pmf[k] + 1e-15)  # two-sided by likelihood: symmetric at p=1/2
        assert binomial_two_sided(k, n) == pytest.approx(min(1.0, direct), rel=1e-9)


def test_paired_test_counts_discordant_prompts():
    student = [1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    teacher = [1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    res = paired_test([float(x) for x in student], [float(x) for x in teacher])
    assert res["test"] == "exact McNemar" and (res["student_only"], res["teacher_only"]) == (1, 9)
    assert res["p_value"] == pytest.approx(0.021484375) and res["differs"] and res["direction"] == "student worse"
    same = paired_test([1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    assert same["p_value"] == 1.0 and not same["differs"] and same["direction"] == "no significant difference"
    graded = paired_test([0.5, 0.7, 0.2], [0.4, 0.7, 0.9])
    assert graded["test"] == "exact sign test" and (graded["student_only"], graded["teacher_only"]) == (1, 1)


def test_paired_drops_prompts_without_a_reference():
    assert paired([1.0, None, 0.0], [0.0, None, 1.0]) == ([1.0, 0.0], [0.0, 1.0])


def _synthetic(rng, n):
    """Correlated right/wrong per prompt: teacher right w.p. 0.8, student right w.p. 0.9 where the teacher is
    and 0.3 where it is not -> student mean 0.78, % of teacher 97.5."""
    t = rng.random(n) < 0.8
    s = np.where(t, rng.random(n) < 0.9, rng.random(n) < 0.3)
    return s.astype(float), t.astype(float)


def test_bootstrap_intervals_cover_the_truth_at_about_95_percent():
    rng = np.random.default_rng(1234)
    trials, hits_score, hits_pct = 200, 0, 0
    for i in range(trials):
        s, t = _synthetic(rng, 200)
        ci = paired_bootstrap(s, t, samples=400, seed=i)
        hits_score += ci["score"][0] <= 0.78 <= ci["score"][1]
        hits_pct += ci["percent_of_teacher"][0] <= 97.5 <= ci["percent_of_teacher"][1]
    # binomial(200, 0.95) has sd 1.5%: 0.90..0.99 is more than 3 sd either way
    assert 0.90 <= hits_score / trials <= 0.99
    assert 0.90 <= hits_pct / trials <= 0.99


def test_bootstrap_is_seeded_and_paired():
    rng = np.random.default_rng(0)
    s, t = _synthetic(rng, 100)
    assert paired_bootstrap(s, t, seed=3) == paired_bootstrap(s, t, seed=3)
    assert paired_bootstrap(s, t, seed=3) != paired_bootstrap(s, t, seed=4)
    same = paired_bootstrap(t, t, seed=0)  # the teacher against itself: exactly 100% in every resample
    assert same["percent_of_teacher"] == pytest.approx([100.0, 100.0])
    empty = paired_bootstrap([], [])
    assert empty["n"] == 0 and empty["percent_of_teacher"] is None


def test_bootstrap_interval_shrinks_with_more_prompts():
    rng = np.random.default_rng(7)
    small = paired_bootstrap(*_synthetic(rng, 50), seed=0)["percent_of_teacher"]
    large = paired_bootstrap(*_synthetic(rng, 2000), seed=0)["percent_of_teacher"]
    assert (large[1] - large[0]) < (small[1] - small[0]) / 3


def test_precision_check_says_how_many_prompts_would_do():
    assert precision_check([95.0, 104.0], 400) is None  # +-4.5 points
    warn = precision_check([80.0, 100.0], 50)  # +-10 points: 4x the prompts for +-5
    assert warn == {"half_width": 10.0, "limit": 5.0, "n": 50, "prompts_needed": 200}


def test_collapse_one_answer():
    teacher = ["3", "5", "7", "9", "3", "11", "2", "8"]
    res = answer_collapse(["7"] * 8, teacher)
    assert res["collapsed"] and res["distinct"] == 1 and res["most_common_share"] == 1.0
    assert "one answer on every prompt ('7')" in res["reasons"][0]


def test_collapse_dominant_answer_like_the_minitron_student():
    teacher = [str(i % 12) for i in range(100)]  # 12 answers, the most common on 9%
    student = ["42"] * 58 + [str(i % 12) for i in range(42)]
    res = answer_collapse(student, teacher)
    assert res["collapsed"] and res["most_common"] == "42" and res["most_common_share"] == pytest.approx(0.58)
    assert any("'42' on 58% of prompts" in r for r in res["reasons"])


def test_collapse_never_answering_counts_as_one_answer():
    res = answer_collapse([None] * 6, ["1", "2", "3", "1", "2", "3"])
    assert res["collapsed"] and res["most_common"] == "(no answer)"


def test_no_collapse_for_a_good_student_or_free_text_or_a_one_class_task():
    teacher = [str(i % 10) for i in range(60)]
    good = list(teacher)
    for i in range(0, 60, 5):
        good[i] = str((i + 3) % 10)  # wrong on 20% of prompts, still spread like the teacher
    assert not answer_collapse(good, teacher)["collapsed"]
    free_t = [f"teacher sentence {i}" for i in range(20)]
    free_s = [f"student sentence {i}" for i in range(20)]  # every answer unique: no TV judgement on free text
    res = answer_collapse(free_s, free_t)
    assert res["total_variation"] == 1.0 and not res["collapsed"]
    assert not answer_collapse(["yes"] * 10, ["yes"] * 10)["collapsed"]  # the teacher itself answers one class
    assert not answer_collapse(["1", "1"], ["1", "2"])["collapsed"]  # too few prompts to judge


def test_collapse_flags_a_distribution_far_from_the_teachers():
    teacher = ["a"] * 10 + ["b"] * 10 + ["c"] * 10
    student = ["a"] * 2 + ["d"] * 14 + ["e"] * 14  # no dominant answer, but mostly answers the teacher never gives
    res = answer_collapse(student, teacher)
    assert res["collapsed"] and res["total_variation"] == pytest.approx(28 / 30)
    assert "distributed unlike the teacher's" in res["reasons"][0]


def test_total_variation_known_values():
    from collections import Counter

    assert total_variation(Counter("aabb"), Counter("aabb")) == 0.0
    assert total_variation(Counter("aa"), Counter("bb")) == 1.0
    assert total_variation(Counter("aaab"), Counter("abbb")) == pytest.approx(0.5)


def test_majority_baseline_and_the_teacher_check():
    assert majority_baseline(["7", "7", "3", None, "7", "1"]) == ("7", 0.6)
    assert majority_baseline([None]) == (None, 0.0)
    zero = teacher_check(0.0, 0.2, 40)
    assert zero["flagged"] and "scores 0.000 on 40 prompts" in zero["reason"]
    low = teacher_check(0.5, 0.6, 40)
    assert low["flagged"] and "no better than always giving the most common reference answer" in low["reason"]
    assert not teacher_check(0.8, 0.2, 40)["flagged"]
    assert not teacher_check(None, 0.2, 0)["flagged"]


def test_speed_claim_only_when_every_pass_agrees():
    faster = speed_claim([50.0, 52.0, 48.0], [10.0, 11.0, 9.5])
    assert faster["claim"] == "faster" and faster["text"].startswith("5.00x faster")
    slower = speed_claim([10.0, 10.5], [12.0, 13.0])
    assert slower["claim"] == "slower" and "slower" in slower["text"] and "faster" not in slower["text"]
    noisy = speed_claim([8.2, 12.0, 9.0], [10.0, 9.5, 11.0])  # a "0.82x faster" from noisy passes
    assert noisy["claim"] == "none" and noisy["text"].startswith("no measurable latency difference")
    single = speed_claim([8.2], [10.0])
    assert single["claim"] == "none" and "single timed pass" in single["text"]
    assert speed_claim(None, [1.0])["claim"] == "unknown"


def test_break_even_tokens():
    # $2 of generation + training; teacher $10/M tokens, student $2/M: saves $8/M -> 250,000 tokens
    assert break_even_tokens(2.0, 10.0, 2.0) == pytest.approx(250_000)
    assert break_even_tokens(2.0, 2.0, 3.0) == math.inf  # the student is not cheaper: never pays off
    assert break_even_tokens(None, 10.0, 2.0) is None and break_even_tokens(1.0, None, 2.0) is None


def test_a_long_collapsed_answer_is_quoted_on_one_short_line():
    long = "The answer is\n" + "x" * 200
    res = answer_collapse([long] * 6, [str(i) for i in range(6)])
    assert res["collapsed"] and "\n" not in res["reasons"][0] and len(res["reasons"][0]) < 120
    assert res["most_common"] == long  # results.json keeps the answer itself
