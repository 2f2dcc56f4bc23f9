"""The statistics behind the verdict: how sure a score is, whether the student differs from the teacher, whether
it collapsed, whether the teacher can do the task at all, whether a speedup is real, and when distilling pays.

Pure functions on plain lists (no models, no files), so each is tested against known answers:
- `paired_bootstrap`: 95% intervals of the student's score, the teacher's and the % of the teacher's score
  kept, resampling *prompts* (teacher and student together, seeded), so the two scores stay paired;
- `paired_test`: exact McNemar test on per-prompt right/wrong (an exact sign test on score differences for
  graded metrics such as ROUGE; the same thing on 0/1 scores);
- `precision_check`: the interval is wider than the precision a report would claim; how many prompts would do;
- `answer_collapse`: one answer everywhere, a dominant answer, or an answer distribution far from the teacher's;
- `majority_baseline` / `teacher_check`: a teacher no better than always giving the most common reference;
- `speed_claim`: a latency ratio is claimed only when every pairing of timed passes agrees on its side of 1;
- `break_even_tokens`: served tokens after which the cheaper student has paid for generation and training.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

LEVEL = 0.95
BOOTSTRAP_SAMPLES = 2000
PRECISION_POINTS = 5.0  # % of teacher: an interval wider than +-5 points is flagged as too imprecise to quote
NEAR_ZERO = 0.02  # a teacher scoring at most this (metric in 0..1) cannot do the task as scored
COLLAPSE_MIN_PROMPTS = 5  # fewer answers than this say nothing about a distribution
DOMINANT_SHARE = 0.5  # a student answer given on >= half the prompts ...
DOMINANT_EXCESS = 0.25  # ... and on >= 25 points more prompts than the teacher's most common answer
TV_LIMIT = 0.5  # total variation between answer distributions above which they "differ strongly"
NO_ANSWER = "(no answer)"


# ---------------------------------------------------------------- intervals


def paired(student: Sequence[float | None], teacher: Sequence[float | None]) -> tuple[list[float], list[float]]:
    """The per-prompt scores where both models were scored (a prompt without a reference is None for both)."""
    pairs = [(s, t) for s, t in zip(student, teacher) if s is not None and t is not None]
    return [float(s) for s, _ in pairs], [float(t) for _, t in pairs]


def _percentile_interval(values, level: float) -> list[float] | None:
    import numpy as np

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def paired_bootstrap(
    student: Sequence[float], teacher: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
    level: float = LEVEL,
) -> dict[str, Any]:
    """Percentile bootstrap intervals of the mean student score, mean teacher score and 100 * student / teacher,
    resampling prompt indices with replacement (the same indices for both models: a hard prompt is hard for
    both, and ignoring that pairing would widen the % interval). Resamples where the teacher scores 0 give no
    ratio and are left out of its interval. Seeded: the same inputs give the same interval.

    student, teacher: per-prompt scores on the same prompts, (n,) each."""
    import numpy as np

    s, t = np.asarray(student, dtype=float), np.asarray(teacher, dtype=float)
    if s.shape != t.shape:
        raise ValueError(f"paired_bootstrap: {s.size} student scores vs {t.size} teacher scores")
    n = s.size
    if n == 0:
        return {"n": 0, "level": level, "samples": samples, "seed": seed, "score": None, "teacher_score": None,
                "percent_of_teacher": None}
    rng = np.random.default_rng(seed)
    s_means, t_means = [], []
    chunk = max(1, 2_000_000 // n)  # at most ~2M indices in memory at once
    for start in range(0, samples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, samples - start), n))
        s_means.append(s[idx].mean(axis=1))
        t_means.append(t[idx].mean(axis=1))
    sm, tm = np.concatenate(s_means), np.concatenate(t_means)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(tm > 0, 100.0 * sm / np.where(tm > 0, tm, 1.0), np.nan)
    return {
        "n": n,
        "level": level,
        "samples": samples,
        "seed": seed,
        "score": _percentile_interval(sm, level),
        "teacher_score": _percentile_interval(tm, level),
        "percent_of_teacher": _percentile_interval(ratio, level),
    }


def half_width(interval: Sequence[float] | None) -> float | None:
    return None if interval is None else (interval[1] - interval[0]) / 2


def precision_check(interval: Sequence[float] | None, n: int, max_half_width: float = PRECISION_POINTS) -> dict | None:
    """None when the interval (of % of teacher) is within +-max_half_width points; else the half-width and
    about how many prompts would bring it there (half-width shrinks as 1/sqrt(n))."""
    hw = half_width(interval)
    if hw is None or hw <= max_half_width or n == 0:
        return None
    return {"half_width": hw, "limit": max_half_width, "n": n,
            "prompts_needed": math.ceil(n * (hw / max_half_width) ** 2)}


# ---------------------------------------------------------------- paired test


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips (min(1, 2 * P[X <= min(k, n-k)]))."""
    if n == 0:
        return 1.0
    low = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2**n
    return min(1.0, 2 * tail)


def mcnemar_exact(student_only: int, teacher_only: int) -> float:
    """Exact McNemar p-value from the discordant pairs: prompts only the student got right (b) and prompts only
    the teacher got right (c). Under "no difference" each discordant prompt is a fair coin: b ~ Bin(b + c, 1/2)."""
    return binomial_two_sided(student_only, student_only + teacher_only)


def paired_test(student: Sequence[float], teacher: Sequence[float], alpha: float = 1 - LEVEL) -> dict[str, Any]:
    """Student vs teacher on the same prompts. 0/1 scores: exact McNemar (b = student right where the teacher
    was wrong, c = the reverse). Graded scores: the exact sign test on which model scored higher per prompt
    (ties dropped), McNemar's generalisation. `differs`: p < alpha; `direction`: which model wins then."""
    if len(student) != len(teacher):
        raise ValueError(f"paired_test: {len(student)} student scores vs {len(teacher)} teacher scores")
    binary = all(v in (0.0, 1.0) for v in (*student, *teacher))
    b = sum(s > t for s, t in zip(student, teacher))
    c = sum(s < t for s, t in zip(student, teacher))
    p = mcnemar_exact(b, c)
    differs = p < alpha
    return {
        "test": "exact McNemar" if binary else "exact sign test",
        "n": len(student),
        "student_only": b,
        "teacher_only": c,
        "p_value": p,
        "alpha": alpha,
        "differs": differs,
        "direction": ("student better" if b > c else "student worse") if differs else "no significant difference",
    }


# ---------------------------------------------------------------- collapse


def answer_distribution(answers: Sequence[str | None]) -> Counter:
    return Counter(NO_ANSWER if a is None else a for a in answers)


def total_variation(a: Counter, b: Counter) -> float:
    """0.5 * sum |p(x) - q(x)| between two answer distributions (0: the same, 1: no answer in common)."""
    na, nb = sum(a.values()), sum(b.values())
    if not na or not nb:
        return 0.0
    return 0.5 * sum(abs(a[x] * nb - b[x] * na) for x in set(a) | set(b)) / (na * nb)  # integers: exact 0 and 1


def _quote(answer: str | None, limit: int = 40) -> str:
    """An answer for a one-line message: on one line, at most `limit` characters."""
    text = " ".join(str(answer).split())
    return f"'{text}'" if len(text) <= limit else f"'{text[: limit - 3]}...'"


def answer_collapse(student: Sequence[str | None], teacher: Sequence[str | None]) -> dict[str, Any]:
    """Has the student collapsed onto one answer (or lost the teacher's spread of answers)?

    student, teacher: the final answer of each model on the same prompts (None: no answer found; counted as
    one answer "(no answer)", so a student that never answers is collapsed too). Flags (`reasons`):
    - one answer on every prompt where the teacher gives several;
    - a dominant answer: one answer on >= 50% of prompts and >= 25 points more often than the teacher's most
      common answer (the collapse seen on a real model: one number on 58% of prompts);
    - the answer distribution far from the teacher's (total variation >= 0.5), judged only when the teacher's
      answers repeat (at most n/2 distinct: classes or numbers, not free text where every answer is unique).
    """
    s, t = answer_distribution(student), answer_distribution(teacher)
    n = sum(s.values())
    top, top_n = s.most_common(1)[0] if s else (None, 0)
    t_top, t_top_n = t.most_common(1)[0] if t else (None, 0)
    share, t_share = (top_n / n if n else 0.0), (t_top_n / sum(t.values()) if t else 0.0)
    tv = total_variation(s, t)
    reasons = []
    if n >= COLLAPSE_MIN_PROMPTS:
        if len(s) == 1 and len(t) > 1:
            reasons.append(f"gives one answer on every prompt ({_quote(top)}); the teacher gives {len(t)} different ones")
        elif share >= DOMINANT_SHARE and share - t_share >= DOMINANT_EXCESS:
            reasons.append(f"gives {_quote(top)} on {share:.0%} of prompts (the teacher's most common answer: "
                           f"{t_share:.0%})")
        if len(t) <= n / 2 and tv >= TV_LIMIT:
            reasons.append(f"its answers are distributed unlike the teacher's (total variation {tv:.2f})")
    return {
        "n": n,
        "most_common": top,
        "most_common_share": share,
        "teacher_most_common": t_top,
        "teacher_most_common_share": t_share,
        "distinct": len(s),
        "teacher_distinct": len(t),
        "distinct_ratio": len(s) / len(t) if t else None,
        "total_variation": tv,
        "collapsed": bool(reasons),
        "reasons": reasons,
    }


# ---------------------------------------------------------------- can the teacher do the task


def majority_baseline(answers: Sequence[str | None]) -> tuple[str | None, float]:
    """(the most common reference answer, its share): the score of always giving it, for a metric that
    compares answers exactly (exact match, accuracy)."""
    known = [a for a in answers if a is not None]
    if not known:
        return None, 0.0
    answer, count = Counter(known).most_common(1)[0]
    return answer, count / len(known)


def teacher_check(score: float | None, baseline: float | None, n: int) -> dict[str, Any]:
    """Flags a teacher that cannot do the task on the user's data: score ~0 (<= NEAR_ZERO) or no better than
    the majority baseline. A distilled student can only copy what the teacher does."""
    reason = None
    if score is not None and n:
        if score <= NEAR_ZERO:
            reason = f"the teacher scores {score:.3f} on {n} prompts: it cannot do this task as scored"
        elif baseline is not None and score <= baseline:
            reason = (f"the teacher scores {score:.3f}, no better than always giving the most common reference "
                      f"answer ({baseline:.3f})")
    return {"score": score, "majority_baseline": baseline, "n": n, "flagged": reason is not None, "reason": reason}


# ---------------------------------------------------------------- speed and money


def speed_claim(teacher_passes_ms: Sequence[float] | None, student_passes_ms: Sequence[float] | None,
                ratio: float | None = None) -> dict[str, Any]:
    """Whether a batch-1 speed ratio may be claimed: the range of teacher/student over every pairing of the two
    models' timed passes (p50 of each pass) must lie wholly above 1 (faster) or below 1 (slower). One pass per
    model gives no spread, so no claim; a range that straddles 1 is "no measurable difference".

    ratio: the headline teacher p50 / student p50 (default: median pass of each)."""
    t = [x for x in teacher_passes_ms or [] if x and x > 0]
    s = [x for x in student_passes_ms or [] if x and x > 0]
    if not t or not s:
        return {"claim": "unknown", "ratio": ratio, "range": None, "text": "latency not measured"}
    if ratio is None:
        ratio = sorted(t)[len(t) // 2] / sorted(s)[len(s) // 2]
    low, high = min(t) / max(s), max(t) / min(s)
    if len(t) < 2 or len(s) < 2:
        return {"claim": "none", "ratio": ratio, "range": None,
                "text": f"no speed claim from a single timed pass (measured {ratio:.2f}x; local models: "
                        "eval.latency_passes >= 2; an API teacher is timed once)"}
    if low > 1:
        claim, text = "faster", f"{ratio:.2f}x faster at batch 1 (p50; passes {low:.2f}-{high:.2f}x)"
    elif high < 1:
        claim, text = "slower", f"{1 / ratio:.2f}x slower at batch 1 (p50; passes {1 / high:.2f}-{1 / low:.2f}x)"
    else:
        claim, text = "none", f"no measurable latency difference (passes {low:.2f}-{high:.2f}x, straddling 1)"
    return {"claim": claim, "ratio": ratio, "range": [low, high], "text": text}


def break_even_tokens(one_time_cost: float | None, teacher_per_million: float | None,
                      student_per_million: float | None) -> float | None:
    """Served tokens after which the student's saving per token has paid for generation and training:
    one_time_cost / (teacher $/token - student $/token). None when a figure is unknown; inf when the student
    is not cheaper per token (it never pays off)."""
    if one_time_cost is None or teacher_per_million is None or student_per_million is None:
        return None
    saving = (teacher_per_million - student_per_million) / 1e6
    if saving <= 0:
        return math.inf
    return one_time_cost / saving
