"""The one model-card writer (distill.reporting.card): Hub metadata huggingface_hub parses back, a model-index
that round-trips, base_model only for a hub id, and training facts from the trainer's state."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from test_report import make_results

from distill.config import load_config, save_config
from distill.reporting.card import dataset_ids, hub_id, training_facts
from distill.reporting.report import report


def _run(tmp_path, teacher: str, train: dict | None = None, summary: dict | None = None):
    """A reported run: results.json as eval writes it, a config, and `distilled`'s train_summary.json."""
    run_dir = tmp_path / "run"
    results = make_results(run_dir)
    results["teacher"]["path"] = teacher
    (run_dir / "eval" / "results.json").write_text(json.dumps(results))
    if summary is not None:
        (run_dir / "students" / "distilled" / "train_summary.json").write_text(json.dumps(summary))
    tree = {"run_dir": str(run_dir), "teacher": {"model": teacher}, "train": train or {},
            "eval": {"input": "hf:org/math-eval"}, "students": [{"name": "distilled"}, {"name": "baseline"}]}
    cfg = load_config(tree)
    save_config(cfg, run_dir / "config.yaml")
    report(cfg)
    return run_dir, results


def test_report_card_metadata_parses_and_model_index_round_trips(tmp_path):
    run_dir, results = _run(tmp_path, "org/teacher-model")
    card = ModelCard.load(run_dir / "students" / "distilled" / "README.md")
    data = card.data
    assert data.base_model == "org/teacher-model" and data.library_name == "transformers"
    assert data.license == "other" and data.metrics == ["exact_match"] and data.pipeline_tag == "text-generation"
    assert data.datasets == ["org/math-eval"]  # the hf: input; local files are not hub datasets
    name, evals = model_index_to_eval_results(data.to_dict()["model-index"])
    assert name == "distilled"
    got = {e.metric_type: e.metric_value for e in evals}
    s = results["students"]["distilled"]
    assert got == {"exact_match": s["score"], "percent_of_teacher": s["percent_of_teacher"],
                   "parameters": s["params"], "size_mb": pytest.approx(s["bytes_on_disk"] / 1e6),
                   "latency_ms_p50": s["latency_ms_p50"]}
    assert {e.task_type for e in evals} == {"text-generation"} and {e.dataset_type for e in evals} == {"eval"}
    assert "# distilled" in card.text and "| Score | 0.900 | 0.810 |" in card.text


def test_base_model_is_omitted_for_a_local_teacher(tmp_path):
    teacher = tmp_path / "org" / "teacher"  # looks like org/name, but it is a directory on disk
    teacher.mkdir(parents=True)
    run_dir, _ = _run(tmp_path, str(teacher))
    data = ModelCard.load(run_dir / "students" / "distilled" / "README.md").data
    assert data.base_model is None and data.eval_results  # still a model-index
    assert hub_id(str(teacher)) is None and hub_id("org/teacher") == "org/teacher" and hub_id("/abs/x") is None


def test_training_facts_come_from_the_trainer_state_not_the_config(tmp_path):
    """An 8-epoch run whose config still says 1 epoch / 200 max steps (e.g. overridden per student)."""
    summary = {"global_steps": 96, "epochs": 8.0, "examples": 48, "train_tokens": 1500, "learning_rate": 0.003,
               "train_runtime_s": 7.0}
    run_dir, _ = _run(tmp_path, "org/teacher-model", train={"num_train_epochs": 1.0, "max_steps": 200},
                      summary=summary)
    text = (run_dir / "students" / "distilled" / "README.md").read_text()
    assert "Trained for 96 optimizer steps, 8.00 epochs, 384 examples seen (48 distinct), 12,000 tokens seen" in text
    assert "max steps 200" not in text and "epochs 1.0" not in text
    assert "Peak learning rate 0.003" in text


def test_training_facts_fall_back_to_the_last_checkpoints_trainer_state(tmp_path):
    student = tmp_path / "run" / "students" / "s"
    student.mkdir(parents=True)
    for step, epoch in ((4, 1.0), (12, 3.0)):
        ckpt = tmp_path / "run" / "checkpoints" / "s" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": epoch,
                                                             "num_input_tokens_seen": 0}))
    facts = training_facts(student)
    assert facts["steps"] == 12 and facts["epochs"] == 3.0 and facts["tokens_seen"] is None


def test_a_real_multi_epoch_run_records_its_state(tmp_path, teacher_dir):
    """train_summary.json carries what the trainer did: 3 epochs over 8 examples at batch 4 = 6 steps."""
    from distill.training.train import train

    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Q: {i} + 1? A:", "response": f" {i + 1}"})
                              for i in range(8)) + "\n")
    cfg = load_config({
        "run_dir": str(tmp_path / "run"), "teacher": {"model": str(teacher_dir)},
        "student": {"init": "config", "config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "num_key_value_heads": 2}},
        "train": {"input": str(data), "signal": "none", "losses": [{"name": "cross_entropy"}], "threads": 1,
                  "num_train_epochs": 3, "per_device_train_batch_size": 4, "save_steps": 1000, "logging_steps": 3},
    })
    (out,) = train(cfg)
    facts = training_facts(out)
    assert facts["steps"] == 6 and facts["epochs"] == pytest.approx(3.0) and facts["examples"] == 8
    assert facts["examples_seen"] == 24 and facts["tokens_seen"] > 24 and facts["learning_rate"] > 0


def test_dataset_ids_keep_hub_inputs_only():
    assert dataset_ids(["hf:org/a", "data/x.jsonl", None, "hf:org/a", "hf:gsm8k"]) == ["org/a", "gsm8k"]


def test_a_hub_eval_set_is_named_by_its_id(tmp_path):
    from distill.reporting.card import eval_results

    results = make_results(tmp_path / "run")
    results["eval_input"] = "hf:openai/gsm8k"
    assert {e.dataset_type for e in eval_results(results, "distilled")} == {"openai/gsm8k"}


def test_export_card_keeps_the_student_cards_metadata(tmp_path):
    """`distill export` of a reported student: the Hub metadata (base_model, model-index, datasets) carries over."""
    from conftest import make_llama, make_tokenizer

    from distill.exporting.export import export
    from distill.reporting.card import card_data, eval_results, render

    results = make_results(tmp_path / "run")
    student = tmp_path / "student"
    tok = make_tokenizer()
    make_llama(len(tok), hidden=32, layers=1, heads=2).save_pretrained(student)
    tok.save_pretrained(student)
    data = card_data("distilled", base_model="org/teacher-model", datasets=["org/math"], metrics=["exact_match"],
                     results=eval_results(results, "distilled"))
    render(data, "# distilled\n\nThe student card text.").save(student / "README.md")
    export(student, tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "org/teacher-model" and card.data.datasets == ["org/math"]
    assert card.data.library_name == "transformers" and "distill" in card.data.tags
    name, evals = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == "distilled" and {e.metric_type: e.metric_value for e in evals}["exact_match"] == 0.81
    assert "## From the training run" in card.text and "## distilled" in card.text  # student text, demoted
    assert "The student card text." in card.text and card.text.index("# out") < card.text.index("## distilled")
