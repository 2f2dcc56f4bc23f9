"""The verdict of an evaluation: the statistics of distill.evaluation.stats applied to what `distill eval`
measured, and the facts a reader needs to trust it (teacher, data, seed, what generation cost).

- `verdict`: per student, 95% intervals on its score and % of the teacher's (paired bootstrap over prompts,
  seeded with the run's seed), the paired test against the teacher, a precision warning and the collapse
  check; for the teacher, its score next to the majority-answer baseline (a teacher that cannot do the task);
- `provenance`: teacher, held-out and training data, seeds, generation cost (store rows and tokens, and the
  seconds `distill run` timed);
- `check_teacher_store`: the teacher check on a store's rows that carry a reference, before training
  (`distill run` calls it after generation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.config import Config
from distill.data.cot import trace_text
from distill.evaluation.metrics import (
    Metric,
    extract_answer,
    final_answer,
    get_metric,
    normalize_answer,
    prompt_scores,
)
from distill.evaluation.stats import (
    PRECISION_POINTS,
    answer_collapse,
    majority_baseline,
    paired,
    paired_bootstrap,
    paired_test,
    precision_check,
    teacher_check,
)

STAGES_FILE = "stages.json"  # distill.pipeline.STAGES_FILE (pipeline imports this module, not the reverse)


def answer_regex_for(metric_name: str, answer_regex: str | None) -> str | None:
    """The pattern that extracts a model's final answer: eval.answer_regex for exact_match, else None (the whole
    normalised output is the answer)."""
    return answer_regex if metric_name == "exact_match" else None


def majority_score(metric_name: str, metric: Metric, references: list[str | None], answer_regex: str | None) -> float | None:
    """The score of always giving the most common reference answer. exact_match compares extracted answers
    (as the metric does); any other metric scores the most common reference text against every reference."""
    refs = [r for r in references if r is not None]
    if not refs:
        return None
    if metric_name == "exact_match" and answer_regex is not None:
        keys = [extract_answer(r, answer_regex) or normalize_answer(r) for r in refs]
        return majority_baseline(keys)[1]
    common = majority_baseline([r.strip() for r in refs])[0]
    return sum(float(metric(common, r)) for r in refs) / len(refs)


def teacher_verdict(teacher_marks: list[float | None], references: list[str | None], metric_name: str,
                    metric: Metric, answer_regex: str | None) -> dict[str, Any]:
    """The teacher's score on the scored prompts next to the majority baseline, flagged when it is no better."""
    scored = [m for m in teacher_marks if m is not None]
    score = sum(scored) / len(scored) if scored else None
    return teacher_check(score, majority_score(metric_name, metric, references, answer_regex), len(scored))


def student_verdict(student_marks: list[float | None], teacher_marks: list[float | None],
                    student_texts: list[str], teacher_texts: list[str], answer_regex: str | None,
                    seed: int) -> dict[str, Any]:
    """Intervals, paired test, precision warning and collapse check of one student against the teacher."""
    s, t = paired(student_marks, teacher_marks)
    ci = paired_bootstrap(s, t, seed=seed)
    return {
        "ci": ci,
        "test": paired_test(s, t) if s else None,
        "precision": precision_check(ci["percent_of_teacher"], ci["n"]),
        "collapse": answer_collapse([final_answer(x, answer_regex) for x in student_texts],
                                    [final_answer(x, answer_regex) for x in teacher_texts]),
    }


def verdict(cfg: Config, marks: dict[str, list[float | None]], teacher_texts: list[str],
            outputs: dict[str, list[str]], references: list[str | None], metric: Metric) -> dict[str, Any]:
    """results['verdict'] of `distill eval`: the teacher check and, per student, `student_verdict`."""
    ev = cfg.eval
    regex = answer_regex_for(ev.metric, ev.answer_regex)
    return {
        "level": 0.95,
        "seed": cfg.seed,
        "precision_points": PRECISION_POINTS,
        "teacher": teacher_verdict(marks["teacher"], references, ev.metric, metric, regex),
        "students": {
            name: student_verdict(marks[name], marks["teacher"], texts, teacher_texts, regex, cfg.seed)
            for name, texts in outputs.items()
        },
    }


# ---------------------------------------------------------------- provenance


def generation_cost(cfg: Config) -> dict[str, Any] | None:
    """What filling the teacher store cost: rows and teacher tokens (completion tokens as the API counted them
    for an API teacher) and the wall seconds `distill run` timed for the generate stage (None when the store was
    made by a separate `distill generate`). None without a store."""
    from distill.store import store_stats

    store = cfg.path(cfg.generate.store) if cfg.generate.input else None
    if store is None or not (store / "shards").is_dir():
        return None
    stats = store_stats(store)
    stages_file = Path(cfg.run_dir) / STAGES_FILE
    stage = json.loads(stages_file.read_text()).get("generate", {}) if stages_file.is_file() else {}
    return {
        "store": str(store),
        "rows": stats["rows"],
        "tokens": stats["tokens"],
        "seconds": stage.get("seconds") if stage.get("status") == "done" else None,
        "api": cfg.teacher.backend == "openai",
    }


def provenance(cfg: Config) -> dict[str, Any]:
    """Who taught, on what data, with which seeds: the facts a report must name for its numbers to mean
    anything."""
    return {
        "teacher": cfg.teacher.model,
        "teacher_backend": cfg.teacher.backend,
        "eval_input": cfg.eval.input,
        "train_input": cfg.generate.input or cfg.train.input,
        "seed": cfg.seed,
        "generate_seed": cfg.generate.seed,
        "generation": generation_cost(cfg),
    }


# ---------------------------------------------------------------- before training


def check_teacher_store(cfg: Config, limit: int = 500) -> dict[str, Any] | None:
    """The teacher check on up to `limit` store rows that carry a reference, with the eval metric: flags a
    teacher that cannot do the task before any student is trained on its outputs. None when no row has a
    reference or there is no store."""
    import pyarrow.parquet as pq

    from distill.store import shard_files

    store = cfg.path(cfg.generate.store) if cfg.generate.input else None
    if store is None:
        return None
    texts, refs = [], []
    for f in shard_files(store):
        table = pq.read_table(f, columns=["response", "reasoning", "reference"])
        for text, why, ref in zip(*(table.column(c).to_pylist() for c in ("response", "reasoning", "reference"))):
            if ref is not None and len(refs) < limit:  # scored like eval scores the teacher: the whole output
                texts.append(text or "" if why is None else trace_text(why, text or "", cfg.generate.answer_marker))
                refs.append(ref)
        if len(refs) >= limit:
            break
    if not refs:
        return None
    metric = get_metric(cfg.eval.metric, cfg.eval.answer_regex)
    regex = answer_regex_for(cfg.eval.metric, cfg.eval.answer_regex)
    return teacher_verdict(prompt_scores(metric, texts, refs), refs, cfg.eval.metric, metric, regex)
