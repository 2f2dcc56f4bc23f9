"""distill.evaluation.verdict: the majority-answer baseline per metric, the teacher check on a store before
training (and `distill run`'s warning), and the generation cost a report names."""

from __future__ import annotations

import json

import pytest

from distill.config import load_config
from distill.evaluation.metrics import get_metric
from distill.evaluation.verdict import check_teacher_store, generation_cost, majority_score, provenance
from distill.store import Store

REGEX = r"answer is\s*(-?[\d.,]+)"


def test_majority_score_per_metric():
    em = get_metric("exact_match", REGEX)
    refs = ["42", "The answer is 42.", "7", None, "1,000", "1000"]
    assert majority_score("exact_match", em, refs, REGEX) == pytest.approx(2 / 5)  # '42' twice, '1000' twice
    assert majority_score("accuracy", get_metric("accuracy"), ["yes", "yes", "no"], None) == pytest.approx(2 / 3)
    rouge = get_metric("rouge_l")
    assert majority_score("rouge_l", rouge, ["a b", "a b", "c d"], None) == pytest.approx(2 / 3)
    assert majority_score("accuracy", get_metric("accuracy"), [None, None], None) is None


def _store_cfg(tmp_path, responses: list[str], references: list[str]):
    cfg = load_config({
        "run_dir": str(tmp_path / "run"),
        "teacher": {"model": "org/teacher"},
        "generate": {"input": str(tmp_path / "prompts.jsonl")},
        "eval": {"metric": "exact_match"},
    })
    with Store(cfg.path(cfg.generate.store), shard_rows=4) as store:
        for i, (text, ref) in enumerate(zip(responses, references)):
            store.add({"key": f"k{i}", "index": i, "prompt": f"Q{i}", "response": text, "reference": ref,
                       "finish_reason": "stop", "teacher": "org/teacher", "response_ids": [1, 2, 3]})
    return cfg


def test_a_teacher_that_cannot_do_the_task_is_flagged_before_training(tmp_path, capsys):
    from distill.pipeline import warn_if_teacher_fails

    refs = ["7", "3", "5", "9", "2", "8"]
    cfg = _store_cfg(tmp_path, ["The answer is 7."] * 6, refs)  # one right answer in six: the majority share
    check = check_teacher_store(cfg)
    assert check["flagged"] and check["n"] == 6 and check["score"] == pytest.approx(1 / 6)
    assert "no better than always giving the most common reference answer" in check["reason"]
    assert warn_if_teacher_fails(cfg)["flagged"]
    assert "no better than always giving the most common reference answer" in capsys.readouterr().err


def test_a_capable_teacher_passes_and_a_store_without_references_is_not_judged(tmp_path):
    refs = ["7", "3", "5", "9", "2", "8"]
    good = _store_cfg(tmp_path / "good", [f"The answer is {r}." for r in refs], refs)
    assert not check_teacher_store(good)["flagged"]
    none = _store_cfg(tmp_path / "none", ["The answer is 1."] * 3, [None] * 3)
    assert check_teacher_store(none) is None


def test_generation_cost_and_provenance(tmp_path):
    cfg = _store_cfg(tmp_path, ["a", "b", "c"], ["1", "2", "3"])
    assert generation_cost(cfg)["seconds"] is None  # generated outside `distill run`: not timed
    (tmp_path / "run" / "stages.json").write_text(json.dumps({"generate": {"status": "done", "seconds": 12.5}}))
    cost = generation_cost(cfg)
    assert cost["rows"] == 3 and cost["tokens"] == 9 and cost["seconds"] == 12.5 and not cost["api"]
    p = provenance(cfg)
    assert p["teacher"] == "org/teacher" and p["seed"] == 0 and p["train_input"].endswith("prompts.jsonl")
    assert p["generation"] == cost


def test_a_reasoning_store_is_scored_on_the_whole_trace(tmp_path):
    """generate.reasoning stores the answer apart from the reasoning; the check reads both, as eval would."""
    refs = ["7", "3", "5", "9", "2", "8"]
    cfg = _store_cfg(tmp_path, [f"the answer is {r}." for r in refs], refs)
    rows = [{"key": f"r{i}", "index": i, "prompt": f"Q{i}", "response": r, "reasoning": f"so the answer is {r}",
             "reference": r, "finish_reason": "stop", "teacher": "org/teacher", "response_ids": [1]}
            for i, r in enumerate(refs)]
    with Store(tmp_path / "reasoning", shard_rows=8) as store:
        for row in rows:
            store.add(row)
    cfg = load_config({**cfg.model_dump(mode="json"), "generate": {"input": "p.jsonl", "store": str(tmp_path / "reasoning"),
                                                                   "reasoning": True}})
    check = check_teacher_store(cfg)
    assert check["score"] == 1.0 and not check["flagged"]  # the answer column alone ('7') has no 'answer is'
