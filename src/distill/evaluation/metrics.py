"""Task metrics (prediction vs reference) and fidelity metrics (student vs teacher token distributions).

Task metrics are plain functions `(prediction: str, reference: str) -> float` so that a user metric given as
`module:function` in `eval.metric` is the same kind of thing as a built-in one. The built-in ones are named
once, in `METRICS` (name -> function, description, whether it needs a reference, aliases): config
validation, `get_metric` and the docs (`metric_help()`) all read it.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import partial
from pathlib import Path

Metric = Callable[[str, str], float]


# ---------------------------------------------------------------- answers


def normalize_answer(text: str) -> str:
    """Canonical form of an answer: numbers lose thousands separators, a trailing period, a leading '$' and
    insignificant zeros ("1,000" -> "1000", "32." -> "32", "0.50" -> "0.5"); other text is stripped and
    lower-cased."""
    s = text.strip().lower()
    num = s.replace(",", "").lstrip("$").rstrip(".")
    try:
        d = Decimal(num)
    except InvalidOperation:
        return s
    if not d.is_finite():
        return s
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_answer(text: str, pattern: str | re.Pattern) -> str | None:
    """The first match of `pattern` in `text` (its first capture group when it has one), normalised;
    None when nothing matches."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    m = rx.search(text)
    if m is None:
        return None
    return normalize_answer(m.group(1) if rx.groups else m.group(0))


def exact_match(prediction: str, reference: str, answer_regex: str = r"answer is\s*(-?[\d.,]+)") -> float:
    """1.0 when the answer extracted from the prediction equals the reference's answer.

    The reference is a bare answer ("32") or a full solution; the regex is applied to it too and, when it
    does not match, the whole reference is the answer. A prediction without a match scores 0.
    """
    got = extract_answer(prediction, answer_regex)
    if got is None:
        return 0.0
    want = extract_answer(reference, answer_regex)
    if want is None:
        want = normalize_answer(reference)
    return float(got == want)


def accuracy(prediction: str, reference: str) -> float:
    """Exact string match after strip and lower-case."""
    return float(prediction.strip().lower() == reference.strip().lower())


def _rouge_tokens(text: str) -> list[str]:
    # Same tokenisation as the reference `rouge_score` package: lower-case alphanumeric runs.
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a)*len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: harmonic mean of LCS precision (over the prediction) and recall (over the reference)."""
    pred, ref = _rouge_tokens(prediction), _rouge_tokens(reference)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class MetricSpec:
    """One built-in task metric."""

    name: str
    fn: Metric
    description: str
    needs_reference: bool = True  # prompts without a reference are skipped (not scored 0)
    aliases: tuple[str, ...] = ()
    uses_answer_regex: bool = False  # eval.answer_regex configures it

    def build(self, answer_regex: str | None = None) -> Metric:
        if not self.uses_answer_regex or answer_regex is None:
            return self.fn
        try:
            re.compile(answer_regex)
        except re.error as exc:
            raise ValueError(f"eval.answer_regex '{answer_regex}': not a valid regular expression ({exc})") from None
        return partial(self.fn, answer_regex=answer_regex)


METRICS: dict[str, MetricSpec] = {
    m.name: m
    for m in (
        MetricSpec("exact_match", exact_match, "answer extracted by eval.answer_regex equals the reference's",
                   uses_answer_regex=True),
        MetricSpec("accuracy", accuracy, "whole output equals the reference (stripped, lower-cased)"),
        MetricSpec("rouge_l", rouge_l, "ROUGE-L F1 of output vs reference (LCS of words)", aliases=("rouge", "rougeL")),
    )
}


def metric_spec(name: str) -> MetricSpec | None:
    """The built-in metric called `name` (or one of its aliases); None for anything else."""
    if name in METRICS:
        return METRICS[name]
    return next((m for m in METRICS.values() if name in m.aliases), None)


def metric_help() -> str:
    """One line per built-in metric, for docs and `--help`."""
    def line(m: MetricSpec) -> str:
        aka = f" (also {', '.join(m.aliases)})" if m.aliases else ""
        ref = "needs a reference" if m.needs_reference else "no reference needed"
        return f"{m.name}{aka}: {m.description}; {ref}"

    return "\n".join(line(m) for m in METRICS.values())


def check_metric_name(spec: str) -> str:
    """Config validation of eval.metric: a built-in name (did-you-mean on a typo) or 'module:function'."""
    if metric_spec(spec) is not None or ":" in spec:
        return spec
    names = [n for m in METRICS.values() for n in (m.name, *m.aliases)]
    hint = difflib.get_close_matches(spec, names, n=1)
    extra = f"; did you mean '{hint[0]}'?" if hint else ""
    raise ValueError(f"unknown metric '{spec}': expected one of {', '.join(METRICS)} or 'module:function'{extra}")


# ---------------------------------------------------------------- choosing a metric


def _import_user_metric(spec: str) -> Metric:
    module_name, _, func_name = spec.rpartition(":")
    where = f"eval.metric '{spec}'"
    if not module_name or not func_name:
        raise ValueError(
            f"{where}: expected one of {', '.join(METRICS)} or 'module:function' "
            "(e.g. my_metrics:f1, or path/to/file.py:f1)"
        )
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.exists():
                raise FileNotFoundError(f"no such file {path}")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)  # type: ignore[arg-type]
            loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure is the user's module: report it in one line
        raise ValueError(
            f"{where}: cannot import module '{module_name}' ({type(exc).__name__}: {exc}); "
            "make sure it is on PYTHONPATH or give a .py file path"
        ) from exc
    fn = getattr(module, func_name, None)
    if fn is None:
        raise ValueError(f"{where}: module '{module_name}' has no attribute '{func_name}'")
    if not callable(fn):
        # ValueError, not TypeError: the CLI turns ValueErrors into one clear line
        raise ValueError(f"{where}: '{func_name}' is not callable")  # noqa: TRY004
    return fn


def get_metric(spec: str, answer_regex: str | None = None) -> Metric:
    """The metric function for `eval.metric`: a registered name (METRICS) or `module:function`."""
    builtin = metric_spec(spec)
    if builtin is not None:
        return builtin.build(answer_regex)
    return _import_user_metric(spec)


def prompt_scores(metric: Metric, predictions: list[str], references: list[str | None]) -> list[float | None]:
    """The metric of every prompt; None where the prompt has no reference."""
    values: list[float | None] = []
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        if ref is None:
            values.append(None)
            continue
        value = metric(pred, ref)
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            raise ValueError(
                f"metric returned {value!r} for prompt {i}; a metric must return a number"
            ) from None
    return values


def score_outputs(
    metric: Metric, predictions: list[str], references: list[str | None]
) -> tuple[float | None, int]:
    """Mean metric over the prompts that have a reference, and how many those were (None, 0 if none)."""
    values = [v for v in prompt_scores(metric, predictions, references) if v is not None]
    if not values:
        return None, 0
    return sum(values) / len(values), len(values)


def final_answer(text: str, answer_regex: str | None) -> str | None:
    """What a model answered: the extracted answer when the task has an answer pattern (None when the text has
    none), else the whole text normalised."""
    if answer_regex is None:
        return normalize_answer(text)
    return extract_answer(text, answer_regex)


def answer_agreement(student: list[str], teacher: list[str], answer_regex: str | None) -> float | None:
    """Share of prompts where the student's final answer equals the teacher's (None without prompts).

    Token agreement overstates fidelity when the answer is one token among ten: a student can copy the
    teacher's wording and still get the number wrong. A prompt where neither gives an answer counts as a
    disagreement, not as agreeing on nothing."""
    if not teacher:
        return None
    same = 0
    for s, t in zip(student, teacher):
        a, b = final_answer(s, answer_regex), final_answer(t, answer_regex)
        same += a is not None and a == b
    return same / len(teacher)


def group_scores(values: list[float | None], groups: list[str | None]) -> dict[str, dict[str, float | int]]:
    """Mean score and count per group label (prompts without a reference or a group are left out), sorted by
    group name: the error breakdown of the report."""
    out: dict[str, list[float]] = {}
    for v, g in zip(values, groups):
        if v is not None and g is not None:
            out.setdefault(str(g), []).append(v)
    return {g: {"n": len(vs), "score": sum(vs) / len(vs)} for g, vs in sorted(out.items())}


def percent_retained(student_score: float | None, teacher_score: float | None) -> float | None:
    """Student score as a % of the teacher's; None when a score is missing or the teacher scores 0 (the
    ratio is undefined then, and a report must not show a made-up number)."""
    if student_score is None or teacher_score is None or teacher_score == 0:
        return None
    return 100.0 * student_score / teacher_score
