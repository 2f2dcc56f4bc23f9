"""`distill sweep`: a shape per size (valid, near its parameter target, the teacher's heads), the recommendation
(a pure function of the rows), and a tiny end-to-end sweep that writes sweep.json + plot and resumes."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from conftest import make_llama
from typer.testing import CliRunner

from distill.config import StudentConfig, load_config
from distill.errors import ConfigError
from distill.modeling import count_parameters
from distill.size_sweep import ladder_students, pareto_frontier, parse_sizes, plan_ladder, recommend
from distill.students.build import config_student
from distill.students.minitron import choose_shape


@pytest.fixture(scope="module")
def tiny_config():
    return make_llama(300, hidden=64, layers=4).config  # 202,816 parameters, 4 heads of 16


def _built_params(model_config, student: StudentConfig) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return count_parameters(AutoModelForCausalLM.from_config(config_student(student, copy.deepcopy(model_config))))


@pytest.mark.parametrize("init", ["config", "minitron"])
def test_each_size_gets_a_valid_shape_near_its_target(tiny_config, init):
    teacher, rungs = plan_ladder(tiny_config, [2, 3, 10, 30], StudentConfig(), init)
    assert teacher == 202_816
    assert [r.name for r in rungs] == ["x2", "x3", "x10", "x30"]
    params = [r.params for r in rungs]
    assert params == sorted(params, reverse=True)
    for r in rungs:
        assert r.target_params == teacher // r.size
        assert 0.75 * r.target_params <= r.params <= r.target_params, r
        assert r.shape["num_attention_heads"] % r.shape["num_key_value_heads"] == 0
        assert r.shape["hidden_size"] % r.shape["num_attention_heads"] == 0
        if init == "config":  # a fresh student keeps the teacher's 4 heads; head_dim shrinks, even
            assert (r.shape["num_attention_heads"], r.shape["num_key_value_heads"]) == (4, 4)
            assert r.shape["head_dim"] * 4 == r.shape["hidden_size"] and r.shape["head_dim"] % 2 == 0
        else:  # minitron keeps head_dim (16) and drops whole heads
            assert "head_dim" not in r.shape
    students = ladder_students(StudentConfig(train={"max_steps": 3}), rungs, init, tiny_config)
    assert all(s.init == init and s.train == {"max_steps": 3} for s in students)
    for s, r in zip(students, rungs):
        if init == "config":  # the fresh student really is that size, with the teacher's head_dim (16, even)
            built = config_student(s, copy.deepcopy(tiny_config))
            assert built.head_dim == r.shape["head_dim"] and _built_params(tiny_config, s) == r.params
        else:  # minitron cuts exactly the planned shape
            assert dataclasses.asdict(choose_shape(tiny_config, s)) == {**r.shape, "head_dim": None}


def test_real_model_shapes_keep_heads_and_the_impossible_size_says_what_is_reachable():
    """SmolLM2-135M's shape (49k vocab, tied embeddings, 9 heads / 3 key-value heads of 64) on the meta device."""
    from transformers import LlamaConfig

    smol = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, head_dim=64)
    teacher, rungs = plan_ladder(smol, [3, 10, 30], StudentConfig(), "config")
    assert 130e6 < teacher < 140e6
    for r in rungs:  # the teacher's 9 heads in 3 key/value groups, head_dim even
        assert (r.shape["num_attention_heads"], r.shape["num_key_value_heads"]) == (9, 3)
        assert r.shape["hidden_size"] == 9 * r.shape["head_dim"] and r.shape["head_dim"] % 2 == 0
        assert r.params <= r.target_params
    # 3x and 10x land within 4% of the target; 30x is nearly all embeddings (1 layer, hidden 72: 81%)
    assert [r.params / r.target_params > 0.96 for r in rungs] == [True, True, False]
    assert rungs[1].shape["hidden_size"] == 144 and rungs[1].shape["num_hidden_layers"] == 28
    with pytest.raises(ConfigError, match=r"--sizes: 200x .* 9 heads; embeddings and head alone: 3,539,016\); "
                                          r"the largest reachable size is 37\.8x: drop 200"):
        plan_ladder(smol, [10, 200], StudentConfig(), "config")
    with pytest.raises(ConfigError, match=r"--sizes: 30x and 35x give the same student .*; drop one"):
        plan_ladder(smol, [30, 35], StudentConfig(), "config")
    _, cut = plan_ladder(smol, [10], StudentConfig(), "minitron")  # minitron: head_dim 64 kept, whole groups
    assert cut[0].shape["num_attention_heads"] == 3 * cut[0].shape["num_key_value_heads"]


def test_refusals_are_one_line_config_errors(tmp_path):
    from transformers import GPT2Config

    from distill.size_sweep import sweep

    with pytest.raises(ConfigError, match="GPT2Config is not a Llama-style decoder"):
        plan_ladder(GPT2Config(), [3], StudentConfig(), "config")
    with pytest.raises(ConfigError, match="--threshold 90: give the fraction"):
        sweep({"run_dir": str(tmp_path)}, threshold=90)
    with pytest.raises(ConfigError, match="makes its own students"):
        sweep({"run_dir": str(tmp_path), "students": [{"name": "a"}]})
    with pytest.raises(ConfigError, match="--init prune: the sweep shapes students as config or minitron"):
        sweep({"run_dir": str(tmp_path)}, init="prune")
    with pytest.raises(ConfigError, match="teacher.model: `distill sweep` shapes students from the teacher.s config"):
        sweep({"run_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="student.model: cannot read the config of /nowhere"):
        sweep({"run_dir": str(tmp_path), "teacher": {"model": "m"}, "student": {"model": "/nowhere"}})


def test_sizes_are_checked():
    assert parse_sizes("10,3,3") == [3.0, 10.0]
    for bad, match in (("3,ten", "not a number"), ("1", "above 1"), ("", "not a number")):
        with pytest.raises(ConfigError, match=match):
            parse_sizes(bad)


# ---------------------------------------------------------------- recommendation (pure)


def _row(name, params, low, pct=None, score=0.5, **kw):
    ci = None if low is None else [low, low + 10]
    return {"name": name, "teacher": False, "params": params, "score": score, "retention_ci": ci,
            "percent_of_teacher": pct if pct is not None else (low or 0) + 5, **kw}


TEACHER_ROW = {"name": "teacher", "teacher": True, "params": 1000, "score": 0.8, "retention_ci": None}


def test_recommends_the_smallest_student_whose_lower_bound_meets_the_threshold():
    rows = [TEACHER_ROW, _row("x3", 300, 95), _row("x10", 100, 90.5), _row("x30", 30, 70)]
    rec = recommend(rows, 0.9)
    assert rec["recommended"] == "x10" and rec["closest"] is None
    assert "ship x10" in rec["text"] and "90.5%" in rec["text"]
    assert recommend(rows, 0.6)["recommended"] == "x30"
    assert recommend(rows, 0.905)["recommended"] == "x10"  # the bound meets the threshold exactly


def test_none_qualifies_names_the_closest():
    rows = [TEACHER_ROW, _row("x3", 300, 80), _row("x10", 100, 85), _row("x30", 30, None)]
    rec = recommend(rows, 0.9)
    assert rec["recommended"] is None and rec["closest"] == "x10"
    assert rec["text"].startswith("no student qualifies") and "lower bound 85.0%" in rec["text"]
    empty = recommend([TEACHER_ROW, _row("x3", 300, None)], 0.9)
    assert empty["recommended"] is None and empty["closest"] is None and "none has a retention interval" in empty["text"]


def test_ties_go_to_the_higher_bound_then_the_smaller():
    same_size = [_row("b", 100, 91), _row("a", 100, 93), _row("c", 300, 99)]
    assert recommend(same_size, 0.9)["recommended"] == "a"
    same_bound = [_row("big", 300, 80), _row("small", 100, 80)]
    assert recommend(same_bound, 0.9)["closest"] == "small"
    assert recommend([_row("b", 100, 91), _row("a", 100, 91)], 0.9)["recommended"] == "a"  # then by name


def test_pareto_frontier_drops_dominated_models():
    rows = [{"name": "teacher", "params": 1000, "score": 0.9}, {"name": "x3", "params": 300, "score": 0.92},
            {"name": "x10", "params": 100, "score": 0.7}, {"name": "x30", "params": 30, "score": 0.75},
            {"name": "x20", "params": 30, "score": 0.6}, {"name": "nolat", "params": None, "score": 0.99}]
    assert pareto_frontier(rows, "params") == ["x30", "x3"]


# ---------------------------------------------------------------- end to end


def test_sweep_trains_each_size_on_one_store_and_a_rerun_trains_nothing(tmp_path, teacher_dir, prompts_file):
    import distill
    from distill.cli import app

    held = tmp_path / "heldout.jsonl"
    held.write_text("\n".join(json.dumps({"prompt": f"Q: Tom has {a} apples. He eats {b}. How many apples now? A:",
                                          "answer": str(a - b)}) for a, b in [(12, 5), (20, 3), (9, 4), (8, 2)]) + "\n")
    metric = tmp_path / "metric.py"  # a graded score a random teacher does not get 0 on: distinct characters
    metric.write_text("def variety(prediction, reference):\n    return len(set(prediction)) / (len(prediction) + 1)\n")
    cfg_file = tmp_path / "cfg.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"),
        "teacher": {"model": str(teacher_dir)},
        "generate": {"input": str(prompts_file), "max_new_tokens": 6, "top_k": 4, "batch_size": 8},
        "train": {"signal": "offline", "max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1,
                  "losses": [{"name": "forward_kl"}]},
        "eval": {"input": str(held), "metric": f"{metric}:variety", "max_new_tokens": 4, "latency_requests": 1,
                 "latency_passes": 2, "latency_new_tokens": 2, "batch_size": 4, "measure_memory": False},
    }))
    summary = distill.sweep(load_config(cfg_file), sizes="3,10", threshold=0.9)
    run_dir = tmp_path / "run"
    assert summary["outcome"]["generate"] == "ran"
    assert {k for k, v in summary["outcome"].items() if v == "ran"} >= {"train:x3", "train:x10", "eval"}
    data = json.loads((run_dir / "sweep" / "sweep.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["teacher", "x3", "x10"]
    assert data["rows"][1]["params"] > data["rows"][2]["params"]
    assert all(r["params"] == p["params"] for r, p in zip(data["rows"][1:], data["rungs"]))  # built = planned
    assert (run_dir / "sweep" / "sweep.png").stat().st_size > 0
    assert "sweep.png" in (run_dir / "sweep" / "sweep.md").read_text()
    rec, rows = data["recommendation"], data["rows"]
    assert all(r["retention_ci"] for r in rows[1:]) and rec == recommend(rows, 0.9)
    assert rec["recommended"] or rec["closest"]
    assert set(data["frontier"]) == {"params", "latency_ms_p50", "cost_per_million_tokens"}
    assert any("too small for this precision" in w for w in data["warnings"])  # 4 held-out prompts
    weights = run_dir / "students" / "x3" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    result = CliRunner().invoke(app, ["sweep", str(cfg_file), "--sizes", "3,10", "--threshold", "0.9"])
    assert result.exit_code == 0, result.output
    assert "train:x3: skipped" in result.output and "train:x10: skipped" in result.output
    assert data["recommendation"]["text"] in result.output
    assert weights.stat().st_mtime_ns == mtime


def test_default_sizes_leave_out_what_the_teacher_cannot_reach(tmp_path, teacher_dir):
    from distill.size_sweep import sweep_config

    cfg = load_config({"run_dir": str(tmp_path), "teacher": {"model": str(teacher_dir)},
                       "student": {"train": {"max_steps": 7}}})
    run_cfg, plan = sweep_config(cfg, None)
    assert [s.name for s in run_cfg.students] == ["x3", "x10", "x30"]
    assert all(s.init == "config" and s.train == {"max_steps": 7} for s in run_cfg.students)
    assert plan["dropped"] == [plan["dropped"][0]] and "100x asks for 2,028" in plan["dropped"][0]
    assert plan["dropped"][0].endswith("the largest reachable size is 38.5x")


def test_cli_impossible_size_is_one_line(tmp_path, teacher_dir):
    from distill.cli import app

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"run_dir: {tmp_path / 'run'}\nteacher: {{model: {teacher_dir}}}\n")
    result = CliRunner().invoke(app, ["sweep", str(cfg_file), "--sizes", "3,100"])
    assert result.exit_code == 2
    assert "the largest reachable size is 38.5x: drop 100 from --sizes" in result.output
    assert "Traceback" not in result.output
