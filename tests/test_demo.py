"""`distill demo --quick`: the whole math-tutor pipeline runs end to end and reports the three models."""

import json

import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.recipes import math_tutor
from distill.recipes.demo import demo_config


@pytest.fixture(scope="module")
def math_teacher(tmp_path_factory):
    """The shipped teacher when it is there; else a random model with the recipe's tokenizer (wiring only)."""
    shipped = math_tutor.teacher_path()
    if (shipped / "config.json").exists():
        return shipped
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.modeling import load_tokenizer

    tok = load_tokenizer(math_tutor.tokenizer_path())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("math_teacher")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_demo_config_is_valid_and_student_is_10x_smaller(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.modeling import count_parameters

    cfg = demo_config(tmp_path / "run", quick=False)
    names = [s.name for s in cfg.all_students()]
    assert names == ["distilled", "labels-only"]
    assert cfg.train_for(cfg.students[1]).signal == "none"
    assert cfg.train.signal == "offline" and cfg.generate.top_k > 0
    for split in ("prompts", "labelled", "heldout"):
        assert (tmp_path / "run" / "data" / f"{split}.jsonl").exists()
    shipped = math_tutor.teacher_path()
    if (shipped / "config.json").exists():
        from distill.students.build import build_student

        n_teacher = count_parameters(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shipped)))
        student, _ = build_student(cfg.students[0], teacher_path=str(shipped))
        n_student = count_parameters(student)
        assert n_teacher >= 10 * n_student


def test_quick_demo_end_to_end(tmp_path, math_teacher):
    run_dir = tmp_path / "demo"
    fast = ["eval.latency_requests=1", "eval.latency_new_tokens=4", "generate.max_new_tokens=40",
            "eval.max_new_tokens=40"]
    res = CliRunner().invoke(app, ["demo", "--quick", "--run-dir", str(run_dir), "--teacher", str(math_teacher),
                                   "--threads", "1", *fast])
    assert res.exit_code == 0, res.output
    assert "labels-only" in res.output and "distilled" in res.output
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results["students"]) == {"distilled", "labels-only"}
    assert results["n_prompts"] == 16
    html = (run_dir / "report" / "report.html").read_text()
    assert "labels-only" in html and "data:image/png;base64" in html
    assert (run_dir / "students" / "distilled" / "README.md").exists()
    # the distilled student learned from the store's top-k, not from a live teacher
    summary = json.loads((run_dir / "students" / "distilled" / "train_summary.json").read_text())
    assert summary["signal"] == "offline"
    # rerun: every stage is skipped (the student is not retrained)
    weights = run_dir / "students" / "distilled" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = CliRunner().invoke(app, ["demo", "--quick", "--run-dir", str(run_dir), "--teacher", str(math_teacher),
                                     "--threads", "1", *fast])
    assert again.exit_code == 0, again.output
    stages = json.loads((run_dir / "stages.json").read_text())
    assert all(s["status"] == "done" for s in stages.values())
    assert weights.stat().st_mtime_ns == mtime


def test_seed_draws_the_data_and_seeds_the_run(tmp_path):
    """--seed N: another seed gives other problems (all three files) and seeds init and order; same seed, same."""
    a = demo_config(tmp_path / "a", quick=True, seed=0)
    b = demo_config(tmp_path / "b", quick=True, seed=1)
    again = demo_config(tmp_path / "c", quick=True, seed=1)
    assert (a.seed, b.seed) == (0, 1)
    for split in ("prompts", "labelled", "heldout"):
        ta, tb = ((tmp_path / d / "data" / f"{split}.jsonl").read_text() for d in ("a", "b"))
        assert ta != tb
        assert tb == (tmp_path / "c" / "data" / f"{split}.jsonl").read_text()
    assert again.seed == 1


def test_cli_passes_the_seed(tmp_path, monkeypatch):
    import distill.recipes.demo as demo_mod

    seen = {}

    def fake_demo(run_dir, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)  # stop before running anything

    monkeypatch.setattr(demo_mod, "demo", fake_demo)
    CliRunner().invoke(app, ["demo", "--quick", "--seed", "2", "--run-dir", str(tmp_path / "d")])
    assert seen.get("seed") == 2
