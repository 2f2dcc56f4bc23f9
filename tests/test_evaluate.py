"""`distill eval` on a fake run directory: a tiny teacher, a student that IS the teacher, a smaller one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_llama, make_tokenizer
from typer.testing import CliRunner

from distill.config import ConfigError, load_config
from distill.evaluation.cost import percentile
from distill.evaluation.evaluate import evaluate
from distill.evaluation.generation import generate_batch, load_for_eval

TRAIN_LOG = [
    {
        "step": s,
        "epoch": s / 40,
        "loss": 3.0 / s**0.5,
        "learning_rate": 5e-4 * (1 - s / 40),
        "loss/forward_kl": 2.0 / s**0.5,
        "loss/cross_entropy": 1.0 / s**0.5,
    }
    for s in range(1, 41, 5)
] + [{"train_runtime": 12.5, "train_loss": 1.1, "step": 40, "epoch": 1.0}]


def make_run_dir(root: Path, teacher_dir: Path, tokenizer, references: list[str] | None = None) -> dict:
    """run_dir with students 'same' (the teacher's weights) and 'small' (1 layer, width 32), their training
    logs and summaries, and an eval file of 6 prompts; returns the config tree."""
    run = root / "run"
    same = run / "students" / "same"
    shutil.copytree(teacher_dir, same)
    small = run / "students" / "small"
    make_llama(len(tokenizer), hidden=32, layers=1, heads=2, seed=1).save_pretrained(small)
    tokenizer.save_pretrained(small)
    for d in (same, small):
        (d / "train_log.json").write_text(json.dumps(TRAIN_LOG))
        (d / "train_summary.json").write_text(
            json.dumps({"teacher_params": 1, "student_params": 1, "train_runtime_s": 12.5})
        )
    prompts = [
        f"Q: Tom has {a} apples. He eats {b}. How many apples now? A:"
        for a, b in [(12, 5), (20, 3), (9, 4), (15, 7), (30, 11), (8, 2)]
    ]
    refs = references or [str(i) for i in range(len(prompts))]
    eval_file = root / "eval.jsonl"
    eval_file.write_text(
        "\n".join(
            json.dumps({"prompt": p, "answer": r, "group": "first two" if i < 2 else "rest"})
            for i, (p, r) in enumerate(zip(prompts, refs))
        )
        + "\n"
    )
    return {
        "run_dir": str(run),
        "teacher": {"model": str(teacher_dir)},
        "students": [{"name": "same"}, {"name": "small"}],
        "train": {"threads": 1},
        "eval": {
            "input": str(eval_file),
            "metric": "accuracy",
            "max_new_tokens": 6,
            "batch_size": 4,
            "latency_requests": 4,
            "latency_new_tokens": 4,
            "cost_per_hour": 2.5,
            "samples": 3,
        },
    }


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, teacher_dir):
    """One full evaluation shared by the tests below. The first two references are the teacher's own greedy
    outputs, so the teacher scores 2/6 under `accuracy`."""
    tok = make_tokenizer()
    model, t_tok = load_for_eval(teacher_dir, "cpu")
    prompts = [f"Q: Tom has {a} apples. He eats {b}. How many apples now? A:" for a, b in [(12, 5), (20, 3)]]
    teacher_out = generate_batch(model, t_tok, prompts, 6, 2).texts
    tree = make_run_dir(
        tmp_path_factory.mktemp("evalrun"), teacher_dir, tok, references=[*teacher_out, "x", "y", "z", "w"]
    )
    cfg = load_config(tree)
    return cfg, evaluate(cfg)


def test_scores_and_percent_retained(evaluated):
    _, res = evaluated
    assert res["metric"] == "accuracy" and res["n_prompts"] == 6
    assert res["teacher"]["score"] == pytest.approx(2 / 6)
    same, small = res["students"]["same"], res["students"]["small"]
    assert same["score"] == pytest.approx(2 / 6)
    assert same["percent_of_teacher"] == pytest.approx(100.0)
    assert small["percent_of_teacher"] == pytest.approx(100 * small["score"] / res["teacher"]["score"])


def test_fidelity_is_perfect_for_the_teacher_itself(evaluated):
    _, res = evaluated
    same = res["students"]["same"]
    assert same["fidelity_tokens"] > 0
    assert same["agreement"] == 1.0
    assert same["kl"] == pytest.approx(0.0, abs=1e-5)


def test_fidelity_of_a_different_model(evaluated):
    _, res = evaluated
    small = res["students"]["small"]
    assert small["fidelity_tokens"] == res["students"]["same"]["fidelity_tokens"]
    assert small["agreement"] < 1.0
    assert small["kl"] > 0.01


def test_cost_fields_are_sane(evaluated):
    cfg, res = evaluated
    teacher, small = res["teacher"], res["students"]["small"]
    for entry in (teacher, small):
        assert entry["params"] > 0 and entry["bytes_on_disk"] > 0
        assert 0 < entry["latency_ms_p50"] <= entry["latency_ms_p95"]
        assert entry["tokens_per_s"] > 0
        assert entry["peak_memory_bytes"] > 0 and entry["memory_method"].startswith("cpu")
        assert entry["cost_per_million_tokens"] == pytest.approx(2.5 / 3600 / entry["tokens_per_s"] * 1e6)
    assert teacher["bytes_on_disk"] == (Path(cfg.teacher.model) / "model.safetensors").stat().st_size
    assert teacher["params"] > small["params"]
    assert small["size_ratio"] == pytest.approx(teacher["params"] / small["params"])
    assert small["speedup"] == pytest.approx(teacher["latency_ms_p50"] / small["latency_ms_p50"])
    assert small["throughput_ratio"] == pytest.approx(small["tokens_per_s"] / teacher["tokens_per_s"])


def test_results_and_outputs_written(evaluated):
    cfg, res = evaluated
    on_disk = json.loads((Path(cfg.run_dir) / "eval" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert len(res["samples"]) == 3
    assert set(res["samples"][0]["students"]) == {"same", "small"}
    assert res["samples"][0]["teacher"] == res["samples"][0]["students"]["same"]
    rows = [
        json.loads(line) for line in (Path(cfg.run_dir) / "eval" / "outputs.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 6 and rows[0]["reference"] == res["samples"][0]["reference"]


def test_per_prompt_marks_and_error_breakdown_by_group(evaluated):
    """The teacher is right on exactly the first two prompts (group 'first two'), wrong on the rest."""
    _, res = evaluated
    assert res["group_field"] == "group"
    assert res["teacher"]["groups"] == {"first two": {"n": 2, "score": 1.0}, "rest": {"n": 4, "score": 0.0}}
    assert res["students"]["same"]["groups"] == res["teacher"]["groups"]
    assert [s["scores"]["teacher"] for s in res["samples"]] == [1.0, 1.0, 0.0]
    assert [s["group"] for s in res["samples"]] == ["first two", "first two", "rest"]
    assert set(res["samples"][0]["scores"]) == {"teacher", "same", "small"}


def test_answer_agreement_and_disagreements(evaluated):
    cfg, res = evaluated
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "eval" / "outputs.jsonl").read_text().splitlines()]
    same, small = res["students"]["same"], res["students"]["small"]
    assert same["answer_agreement"] == 1.0 and res["disagreements"]["same"] == []
    differ = [r["prompt"] for r in rows if r["students"]["small"].strip().lower() != r["teacher"].strip().lower()]
    assert small["answer_agreement"] == pytest.approx(1 - len(differ) / 6)
    assert [d["prompt"] for d in res["disagreements"]["small"]] == differ[: cfg.eval.samples]


def test_latency_comes_from_several_passes(evaluated):
    cfg, res = evaluated
    for entry in (res["teacher"], *res["students"].values()):
        assert len(entry["latency_pass_p50_ms"]) == cfg.eval.latency_passes == 3
        assert entry["latency_spread"] >= 0 and isinstance(entry["latency_noisy"], bool)
        lo, hi = min(entry["latency_pass_p50_ms"]), max(entry["latency_pass_p50_ms"])
        assert entry["latency_spread"] == pytest.approx((hi - lo) / sorted(entry["latency_pass_p50_ms"])[1])
    assert "speedup_noisy" in res["students"]["small"]


def test_latency_summary_flags_noise():
    from distill.evaluation.cost import latency_summary

    steady = latency_summary([[0.10, 0.11, 0.10], [0.10, 0.10, 0.11], [0.11, 0.10, 0.10]])
    assert steady["latency_ms_p50"] == pytest.approx(100.0) and not steady["latency_noisy"]
    assert steady["latency_spread"] == pytest.approx(0.0)
    slow_pass = latency_summary([[0.10] * 3, [0.10] * 3, [0.20] * 3])
    assert slow_pass["latency_spread"] == pytest.approx(1.0) and slow_pass["latency_noisy"]
    tail = latency_summary([[0.1] * 18 + [8.0, 8.0]])  # one pass: only the tail can flag it
    assert tail["latency_spread"] is None and tail["latency_noisy"]


def test_answer_agreement_and_group_scores_units():
    from distill.evaluation.metrics import answer_agreement, group_scores

    rx = r"The answer is (-?\d+)"
    teacher = [" 2 + 3 = 5. The answer is 5.", " The answer is 7.", "no answer", " The answer is 1."]
    student = [" 2 + 3 = 6. The answer is 5.", " 7 - 1 = 6. The answer is 6.", "none either", " The answer is 1"]
    assert answer_agreement(student, teacher, rx) == 0.5  # a pair with no answer at all does not agree
    assert answer_agreement(["Paris "], ["paris"], None) == 1.0
    assert answer_agreement([], [], rx) is None
    assert group_scores([1.0, 0.0, None, 1.0], ["a", "b", "a", None]) == {
        "a": {"n": 1, "score": 1.0},
        "b": {"n": 1, "score": 0.0},
    }


def test_batched_left_padded_generation_matches_one_by_one(teacher_dir):
    model, tok = load_for_eval(teacher_dir, "cpu")
    prompts = ["Q: Tom has 12 apples.", "Hi", "The quick brown fox jumps over the lazy dog. 0123"]
    batched = generate_batch(model, tok, prompts, 5, batch_size=3)
    single = [generate_batch(model, tok, [p], 5, batch_size=1) for p in prompts]
    assert batched.output_ids == [g.output_ids[0] for g in single]
    assert batched.texts == [g.texts[0] for g in single]


def test_fidelity_equals_a_naive_unpadded_computation(teacher_dir, tokenizer):
    """Left-padded batches with logits_to_keep give the agreement and KL of one unpadded row at a time."""
    import torch

    from distill.evaluation.fidelity import fidelity

    teacher, tok = load_for_eval(teacher_dir, "cpu")
    student = make_llama(len(tokenizer), hidden=32, layers=1, heads=2, seed=3)
    gen = generate_batch(
        teacher, tok, ["Hi", "Q: Tom has 12 apples. He eats 5.", "The quick brown fox"], 5, 3
    )
    gen.output_ids[1] = gen.output_ids[1][:2]  # responses of different lengths
    agree = count = 0
    kl = 0.0
    for p, o in zip(gen.prompt_ids, gen.output_ids):
        ids = torch.tensor([p + o])
        with torch.no_grad():
            ls = torch.log_softmax(student(ids).logits[0, len(p) - 1 : -1].float(), -1)
            lt = torch.log_softmax(teacher(ids).logits[0, len(p) - 1 : -1].float(), -1)
        agree += (ls.argmax(-1) == torch.tensor(o)).sum().item()
        kl += (lt.exp() * (lt - ls)).sum().item()
        count += len(o)
    got = fidelity(student, teacher, gen, tok.pad_token_id, batch_size=3)
    assert got["fidelity_tokens"] == count
    assert got["agreement"] == pytest.approx(agree / count)
    assert got["kl"] == pytest.approx(kl / count, rel=1e-4)


def test_lora_student_and_other_tokenizer(tmp_path, teacher_dir, tokenizer):
    """A LoRA adapter is loaded with peft and merged; a student with another vocabulary gets null fidelity
    with the reason."""
    from peft import LoraConfig, get_peft_model

    tree = make_run_dir(tmp_path, teacher_dir, tokenizer)
    students = Path(tree["run_dir"]) / "students"
    base, _ = load_for_eval(teacher_dir, "cpu")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(students / "lora")
    other_tok = make_tokenizer(vocab_size=280)
    make_llama(len(other_tok), hidden=32, layers=1, heads=2).save_pretrained(students / "other")
    other_tok.save_pretrained(students / "other")
    tree["students"] = [{"name": "lora"}, {"name": "other"}]
    tree["eval"].update(measure_memory=False, latency_requests=1, samples=0)
    res = evaluate(load_config(tree))
    lora, other = res["students"]["lora"], res["students"]["other"]
    assert lora["adapter"] is True
    assert lora["bytes_on_disk"] == (students / "lora" / "adapter_model.safetensors").stat().st_size
    assert lora["agreement"] == 1.0  # fresh LoRA (B = 0) equals the base model
    assert other["agreement"] is None and other["kl"] is None
    assert "different vocabularies" in other["fidelity_note"]
    assert lora["peak_memory_bytes"] is None and lora["memory_method"].startswith("off")
    assert res["samples"] == []


def test_teacher_behind_an_openai_endpoint(tmp_path, teacher_dir, tokenizer):
    """An API teacher is scored from its replies; latency is timed per request; fidelity and the figures an
    API cannot give are null, and the report says so."""
    from fake_openai_server import FakeOpenAIServer, reply_text

    from distill.reporting.report import report

    tree = make_run_dir(tmp_path, teacher_dir, tokenizer)
    prompts = [json.loads(line)["prompt"] for line in Path(tree["eval"]["input"]).read_text().splitlines()]
    refs = [reply_text(p) if i < 3 else "no" for i, p in enumerate(prompts)]
    Path(tree["eval"]["input"]).write_text(
        "".join(json.dumps({"prompt": p, "answer": r}) + "\n" for p, r in zip(prompts, refs))
    )
    tree["students"] = [{"name": "small"}]
    tree["eval"].update(measure_memory=False, latency_requests=3)
    with FakeOpenAIServer() as srv:
        tree["teacher"] = {"backend": "openai", "model": "scripted", "base_url": srv.url, "timeout": 5.0}
        res = evaluate(load_config(tree))
    teacher, small = res["teacher"], res["students"]["small"]
    assert teacher["api"] is True and teacher["path"] == "openai:chat:scripted"
    assert teacher["score"] == pytest.approx(0.5)
    assert res["samples"][0]["teacher"] == refs[0]
    assert 0 < teacher["latency_ms_p50"] <= teacher["latency_ms_p95"] and teacher["tokens_per_s"] > 0
    assert teacher["params"] is None and teacher["cost_per_million_tokens"] is None
    assert small["agreement"] is None and "served over an API" in small["fidelity_note"]
    assert small["percent_of_teacher"] == pytest.approx(100 * small["score"] / 0.5)
    assert small["size_ratio"] is None
    out = report(load_config(tree))
    assert "is served over an API" in (out / "report.md").read_text()
    card = (Path(tree["run_dir"]) / "students" / "small" / "README.md").read_text()
    assert "base_model" not in card.split("---")[1] and "openai:chat:scripted" in card


def test_missing_student_and_bad_config_are_clear_errors(tmp_path, teacher_dir, tokenizer):
    tree = make_run_dir(tmp_path, teacher_dir, tokenizer)
    tree["students"].append({"name": "absent"})
    with pytest.raises(FileNotFoundError, match=r"student 'absent': no model at .*absent.*distill train"):
        evaluate(load_config(tree))
    tree["students"].pop()
    with pytest.raises(ValueError, match="cannot import module 'nope_mod'"):
        evaluate(load_config(tree, ["eval.metric=nope_mod:f"]))
    with pytest.raises(ConfigError, match="eval.input"):
        evaluate(load_config(tree, ["eval.input=null"]))


def test_cli_eval_reports_missing_student(tmp_path, teacher_dir, tokenizer):
    import yaml

    from distill.cli import app

    tree = make_run_dir(tmp_path, teacher_dir, tokenizer)
    shutil.rmtree(Path(tree["run_dir"]) / "students" / "small")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    result = CliRunner().invoke(app, ["eval", str(cfg_file), "eval.limit=2"])
    assert result.exit_code == 2
    assert "student 'small'" in result.output


def test_percentile_matches_linear_interpolation():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 95) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)


def test_package_exports_callable_stages():
    import distill
    import distill.evaluation.evaluate
    import distill.reporting.report

    assert callable(distill.evaluate) and distill.evaluate.__module__ == "distill.evaluation.evaluate"
    assert callable(distill.report) and distill.report.__module__ == "distill.reporting.report"


def test_two_task_cot_student_is_asked_with_its_task_prefix(tmp_path, teacher_dir, tokenizer, monkeypatch):
    import sys

    ev_module = sys.modules["distill.evaluation.evaluate"]  # `distill.evaluate` is the function
    tree = make_run_dir(tmp_path, teacher_dir, tokenizer)
    tree["students"] = [{"name": "same"},
                        {"name": "small", "train": {"cot": {"mode": "two_task", "inference": "rationale"}}}]
    tree["eval"].update(measure_memory=False, latency_requests=1)
    seen: dict[str, list[str]] = {}
    real = ev_module.generate_batch

    def spy(model, tok, prompts, *args, label="", **kwargs):
        seen.setdefault(label.split(":")[0], list(prompts))
        return real(model, tok, prompts, *args, label=label, **kwargs)

    monkeypatch.setattr(ev_module, "generate_batch", spy)
    evaluate(load_config(tree))
    assert all(p.startswith("[rationale] ") for p in seen["small"])
    assert not any(p.startswith("[") for p in seen["same"] + seen["teacher"])


def test_math_tutor_heldout_rows_carry_their_group(tmp_path):
    from distill.recipes import math_tutor

    problems = math_tutor.make_problems(20, seed=3, split="test")
    path = math_tutor.write_jsonl(tmp_path / "h.jsonl", problems, with_groups=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["group"] for r in rows] == [f"{len(p.steps)}-step" for p in problems]
    assert {r["group"] for r in rows} == {"1-step", "2-step"}


def test_verdict_and_provenance_in_results(evaluated):
    """results.json carries the verdict (teacher vs majority baseline, per student intervals, paired test,
    collapse check, speed claim) and names teacher, data and seed."""
    from collections import Counter

    cfg, res = evaluated
    v = res["verdict"]
    refs = [json.loads(line)["reference"] for line in (Path(cfg.run_dir) / "eval" / "outputs.jsonl").open()]
    baseline = Counter(r.strip() for r in refs).most_common(1)[0][1] / 6
    assert v["teacher"]["score"] == pytest.approx(2 / 6) and v["teacher"]["majority_baseline"] == pytest.approx(baseline)
    same = v["students"]["same"]  # the teacher's own weights: identical on every prompt
    assert same["ci"]["n"] == 6 and same["ci"]["seed"] == cfg.seed
    assert same["ci"]["percent_of_teacher"] == pytest.approx([100.0, 100.0])
    assert same["test"]["p_value"] == 1.0 and same["test"]["test"] == "exact McNemar"
    assert same["precision"] is None and not same["collapse"]["collapsed"]
    assert same["collapse"]["total_variation"] == 0.0
    small = v["students"]["small"]
    assert small["speed"]["claim"] in ("faster", "slower", "none") and small["speed"]["text"]
    assert set(small["collapse"]) >= {"most_common_share", "distinct_ratio", "total_variation", "reasons"}
    assert res["disagreement_counts"]["same"] == 0
    assert res["disagreement_counts"]["small"] >= len(res["disagreements"]["small"])
    p = res["provenance"]
    assert p["teacher"] == cfg.teacher.model and p["eval_input"] == cfg.eval.input and p["seed"] == cfg.seed
    assert p["generation"] is None  # no store in this run
