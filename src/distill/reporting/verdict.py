"""The verdict in words, for the report's top section and the model card: who taught on what data with which
seed, what generation cost, the teacher against the majority-answer baseline, per student its 95% intervals,
the paired test, a precision warning, the collapse check, the speed claim and the break-even point.

Reads what `distill eval` stored (results['verdict'], results['provenance']); results from an older eval
without them give the lines that can be made from the rest. Plain markdown lines out; report.py renders them.
"""

from __future__ import annotations

import math
from typing import Any

from distill.evaluation.stats import DOMINANT_EXCESS, DOMINANT_SHARE, TV_LIMIT, break_even_tokens, speed_claim

WARN = "⚠"


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def provenance_line(results: dict) -> str:
    """Teacher, data, seed and generation cost in one line."""
    p = results.get("provenance") or {}
    teacher = p.get("teacher") or results["teacher"].get("path")
    backend = f" ({p['teacher_backend']} backend)" if p.get("teacher_backend") else ""
    bits = [f"Teacher `{teacher}`{backend}",
            f"held-out data `{p.get('eval_input') or results['eval_input']}` ({results['n_prompts']} prompts)"]
    if p.get("train_input"):
        bits.append(f"training prompts `{p['train_input']}`")
    bits.append(f"seed {p['seed']}" if "seed" in p else "seed not recorded")
    gen = p.get("generation")
    if gen:
        what = "completion tokens billed by the API" if gen.get("api") else "teacher tokens"
        took = f" in {gen['seconds']:,.0f} s" if gen.get("seconds") is not None else ""
        bits.append(f"generation: {gen['rows']:,} rows, {gen['tokens']:,} {what}{took}")
    return "; ".join(bits) + "."


def teacher_line(results: dict) -> str | None:
    """The teacher's score next to the majority-answer baseline, with a warning when it is no better."""
    t = (results.get("verdict") or {}).get("teacher")
    if not t or t.get("score") is None:
        return None
    base = t.get("majority_baseline")
    against = f" vs {base:.3f} for always giving the most common reference answer" if base is not None else ""
    if t.get("flagged"):
        return (f"{WARN} **The teacher cannot do this task on your data**: {t['reason']}. A student can only copy "
                "it: check the references, eval.metric and eval.answer_regex, or pick another teacher.")
    return f"**Teacher**: scores {t['score']:.3f}{against} ({t['n']} prompts)."


def speed_text(results: dict, name: str) -> str:
    """The batch-1 speed claim of a student: a ratio only when every pairing of timed passes agrees."""
    s, t = results["students"][name], results["teacher"]
    return speed_claim(t.get("latency_pass_p50_ms"), s.get("latency_pass_p50_ms"), s.get("speedup"))["text"]


def speed_cell(results: dict, name: str) -> str:
    """The model card's Speedup cell: the ratio only when it is a claim, else why not."""
    s, t = results["students"][name], results["teacher"]
    c = speed_claim(t.get("latency_pass_p50_ms"), s.get("latency_pass_p50_ms"), s.get("speedup"))
    if c["claim"] == "faster":
        return f"{c['ratio']:.2f}x faster"
    if c["claim"] == "slower":
        return f"{1 / c['ratio']:.2f}x slower"
    return "—" if c["claim"] == "unknown" else "no measurable difference"


def collapse_lines(results: dict, name: str) -> list[str]:
    c = ((results.get("verdict") or {}).get("students") or {}).get(name, {}).get("collapse") or {}
    return [f"{WARN} **{name} collapsed**: {'; '.join(c['reasons'])}."] if c.get("reasons") else []


def _interval(ci: list[float] | None, spec: str, unit: str = "") -> str:
    return "" if ci is None else f" (95% CI {ci[0]:{spec}}{unit}-{ci[1]:{spec}}{unit})"


def confidence_line(results: dict, name: str) -> str | None:
    """Score and % of the teacher with intervals, the paired test and, when too wide, a precision warning."""
    v = ((results.get("verdict") or {}).get("students") or {}).get(name)
    s = results["students"][name]
    if not v or s.get("score") is None:
        return None
    ci, test = v["ci"], v.get("test")
    bits = [f"**{name}**: {results['metric']} {s['score']:.3f}{_interval(ci['score'], '.3f')}"]
    if s.get("percent_of_teacher") is not None:
        bits.append(f"{s['percent_of_teacher']:.1f}% of the teacher{_interval(ci['percent_of_teacher'], '.1f', '%')}")
    text = ", ".join(bits) + f" on {ci['n']} prompts (paired bootstrap over prompts, seed {ci['seed']})"
    if test:
        text += (f"; {test['test']} vs the teacher: right where the teacher is wrong on {test['student_only']}, "
                 f"the reverse on {test['teacher_only']}, p = {test['p_value']:.3g}: {test['direction']}")
    text += "."
    prec = v.get("precision")
    if prec:
        text += (f" {WARN} Too few prompts for this precision: % of teacher is ±{prec['half_width']:.1f} points; about "
                 f"{prec['prompts_needed']:,} prompts would give ±{prec['limit']:.0f}.")
    return text


def break_even(results: dict, name: str, details: dict[str, Any] | None) -> dict[str, Any]:
    """One-time cost (generation + this student's training, in seconds at eval.cost_per_hour) and the served
    tokens after which the student's lower $/M tokens has paid it back."""
    s, t = results["students"][name], results["teacher"]
    gen = (results.get("provenance") or {}).get("generation") or {}
    train_s = (details or {}).get("runtime_s")
    known = [x for x in (train_s, gen.get("seconds")) if x is not None]
    seconds = sum(known) if known else None
    cost = None if seconds is None else seconds * results["cost_per_hour"] / 3600
    tokens = break_even_tokens(cost, t.get("cost_per_million_tokens"), s.get("cost_per_million_tokens"))
    return {"seconds": seconds, "cost": cost, "tokens": tokens, "train_s": train_s,
            "generation_s": gen.get("seconds"), "api_tokens": gen.get("tokens") if gen.get("api") else None}


def break_even_line(results: dict, name: str, details: dict[str, Any] | None) -> str | None:
    b = break_even(results, name, details)
    if b["cost"] is None:
        return None
    s, t = results["students"][name], results["teacher"]
    parts = [f"training {b['train_s']:,.0f} s" if b["train_s"] is not None else None,
             f"generation {b['generation_s']:,.0f} s" if b["generation_s"] is not None else "generation time unknown"]
    spent = f"{', '.join(p for p in parts if p)} at ${results['cost_per_hour']}/hour = ${b['cost']:.4f}"
    api = f", plus the API bill for {b['api_tokens']:,} teacher tokens" if b["api_tokens"] else ""
    if b["tokens"] is None:
        return f"**{name}** break-even: unknown (the teacher's $/M tokens is not known); it cost {spent}{api}."
    if math.isinf(b["tokens"]):
        return f"**{name}** never pays off: it is not cheaper per token than the teacher ({spent}{api})."
    return (f"**{name}** pays for itself after {_count(b['tokens'])} served tokens ({spent}{api}; "
            f"${s['cost_per_million_tokens']:.4f} vs ${t['cost_per_million_tokens']:.4f} per M tokens).")


def verdict_lines(results: dict, details: dict[str, dict]) -> list[str]:
    """The report's verdict section: warnings first, then the numbers with their uncertainty."""
    lines = [provenance_line(results)]
    teacher = teacher_line(results)
    if teacher:
        lines.append(teacher)
    for name in results["students"]:
        lines += collapse_lines(results, name)
    for name in results["students"]:
        lines += [x for x in (confidence_line(results, name), f"**{name}** latency: {speed_text(results, name)}.",
                              break_even_line(results, name, details.get(name))) if x]
    return lines


def verdict_method_lines(results: dict) -> list[str]:
    """How the verdict's figures were made (only when the eval stored a verdict)."""
    v = results.get("verdict")
    if not v:
        return []
    return [(
        f"Verdict: 95% intervals are percentile bootstraps over prompts (teacher and student resampled together, "
        f"seed {v['seed']}); student vs teacher: exact McNemar test on per-prompt right/wrong (an exact sign test "
        f"for graded metrics); imprecise when % of teacher is wider than ±{v['precision_points']:.0f} points; "
        f"collapsed: one answer everywhere, one answer on >= {DOMINANT_SHARE:.0%} of prompts and >= "
        f"{100 * DOMINANT_EXCESS:.0f} points more often than the teacher's most common, or total variation >= "
        f"{TV_LIMIT} from the teacher's answers; speed is claimed only when "
        "every pairing of timed passes is on the same side of 1; break-even: (generation + training seconds) x "
        "$/hour over the saving per token."
    )]
