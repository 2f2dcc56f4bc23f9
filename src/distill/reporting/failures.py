"""Where the student fails, for the report: right/wrong marks on shown outputs, the score per group of the
eval data (`eval.group_field`, e.g. the math tutor's 1-step vs 2-step problems), and the prompts where a
student's answer is not the teacher's.

Plain data out (labels, header + rows); report.py renders it as markdown and HTML.
"""

from __future__ import annotations


def mark(score: float | None) -> str:
    """✓ for a full score, ✗ for zero, the number for a partial one (ROUGE), '' when there is no reference."""
    if score is None:
        return ""
    if score >= 1.0:
        return "✓ correct"
    if score <= 0.0:
        return "✗ wrong"
    return f"score {score:.2f}"


def labelled_answers(sample: dict) -> list[tuple[str, str]]:
    """(label, text) for the reference, the teacher and every student of one shown prompt; each model's label
    carries its mark, so a teacher error is flagged like any other."""
    scores = sample.get("scores") or {}
    out = []
    if sample.get("reference") is not None:
        out.append(("reference", sample["reference"]))
    for who, text in [("teacher", sample["teacher"]), *sample["students"].items()]:
        if text is None:
            continue
        m = mark(scores.get(who))
        out.append((f"{who} {m}" if m else who, text))
    return out


def breakdown_table(results: dict) -> tuple[list[str], list[list[str]]] | None:
    """Score per group (rows) and model (columns), with the number of prompts; None without groups."""
    models = [("teacher", results["teacher"]), *results["students"].items()]
    groups = sorted({g for _, e in models for g in (e.get("groups") or {})})
    if not groups:
        return None
    header = ["Group", "Prompts", *(name for name, _ in models)]
    rows = []
    for g in groups:
        n = next((e["groups"][g]["n"] for _, e in models if g in (e.get("groups") or {})), 0)
        cells = []
        for _, e in models:
            cell = (e.get("groups") or {}).get(g)
            cells.append("—" if cell is None else f"{cell['score']:.3f}")
        rows.append([g, str(n), *cells])
    return header, rows


def disagreements(results: dict) -> dict[str, list[dict]]:
    """Per student, the shown prompts where its answer differs from the teacher's (from `distill eval`)."""
    return {name: rows for name, rows in (results.get("disagreements") or {}).items()}


def disagreement_answers(row: dict, student: str) -> list[tuple[str, str]]:
    """(label, text) of the reference, the teacher and this one student for one disagreement."""
    one = {**row, "students": {student: row["students"][student]}}
    return labelled_answers(one)


def disagreement_heading(name: str, k: int, shown: int, total: int | None, n_prompts: int) -> str:
    """'distilled: example 1 of 5 shown (37 of 50 prompts disagree)': the shown count and the true total
    apart, so '1 of 5' is never read as 'one disagreement in five prompts'."""
    where = f" ({total} of {n_prompts} prompts disagree)" if total is not None else ""
    return f"{name}: example {k} of {shown} shown{where}"
