"""Every shipped recipe under examples/recipes/ loads against the schema and says what its method needs."""

import json
from pathlib import Path

import pytest

from distill.config import load_config
from distill.losses import CROSS_TOKENIZER_LOSSES

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
FILES = sorted(RECIPES.glob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_recipe_loads(path):
    cfg = load_config(path)
    assert cfg.run_dir.endswith(path.stem)  # each recipe writes its own run directory
    assert cfg.train.losses and cfg.eval.input


def test_one_recipe_per_method_at_one_student_size():
    cfgs = {p.stem: load_config(p) for p in FILES}
    assert {"labels_only", "response_level", "logit_level", "chain_of_thought", "on_policy"} <= set(cfgs)
    sizes = {str(c.student.config) for name, c in cfgs.items() if name != "cross_tokenizer"}
    assert len(sizes) == 1  # the same student everywhere: the comparison is between methods

    names = {k: {t.name for t in c.train.losses} for k, c in cfgs.items()}
    assert cfgs["labels_only"].train.signal == "none" and cfgs["labels_only"].train.input
    assert cfgs["response_level"].train.signal == "none" and not cfgs["response_level"].train.input
    assert names["response_level"] == {"cross_entropy"}
    assert cfgs["logit_level"].train.signal == "offline" and cfgs["logit_level"].generate.top_k > 0
    cot = cfgs["chain_of_thought"]
    assert cot.generate.reasoning and cot.train.cot.mode == "two_task"
    assert cot.generate.answer_marker in " 43 + 19 = 62. The answer is 62."  # what the shipped teacher writes
    onp = cfgs["on_policy"]
    assert onp.train.signal == "online" and 0 < onp.train.onpolicy.lmbda <= 1
    assert names["on_policy"] - {"cross_entropy"}
    cross = cfgs["cross_tokenizer"]
    assert names["cross_tokenizer"] - {"cross_entropy"} <= CROSS_TOKENIZER_LOSSES and cross.train.signal == "online"


# ------------------------------------------------------------------------------------ end to end, a few steps

ROOT = RECIPES.parents[1]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """A few math-tutor problems in the files the recipes read (as `distill demo` writes them)."""
    from distill.recipes import math_tutor

    d = tmp_path_factory.mktemp("recipe_data")
    return {
        "prompts": math_tutor.write_jsonl(d / "prompts.jsonl", math_tutor.make_problems(8, seed=5), with_answers=False),
        "labelled": math_tutor.write_jsonl(d / "labelled.jsonl", math_tutor.make_problems(8, seed=6), final_only=True),
        "heldout": math_tutor.write_jsonl(d / "heldout.jsonl", math_tutor.make_problems(4, seed=7, split="test")),
    }


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_recipe_runs_end_to_end(path, task_files, tmp_path, monkeypatch):
    """generate -> train (2 steps) -> eval -> report from a fresh run directory, with the shipped teacher and
    the recipe's own student (its width cut down), exactly as the header's commands run it."""
    from distill.pipeline import run

    monkeypatch.chdir(ROOT)  # the recipes' paths are relative to the repository root
    cfg = load_config(path)
    overrides = [
        f"run_dir={tmp_path / 'run'}", f"eval.input={task_files['heldout']}", "eval.max_new_tokens=8",
        "eval.latency_requests=1", "eval.latency_new_tokens=2", "eval.measure_memory=false", "generate.max_new_tokens=56",
        "train.max_steps=2", "train.per_device_train_batch_size=4", "train.save_steps=1000", "train.threads=1",
        "train.onpolicy.max_new_tokens=8", "train.onpolicy.start_step=1", "student.config.hidden_size=32", "student.config.intermediate_size=32",
        "student.config.num_hidden_layers=1",
    ]
    if cfg.generate.input:
        overrides.append(f"generate.input={task_files['prompts']}")
    if cfg.train.input:
        overrides.append(f"train.input={task_files['labelled']}")
    cfg = load_config(path, overrides)
    outcome = run(cfg)
    assert all(v == "ran" for v in outcome.values()), outcome
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "students" / "student" / "train_summary.json").read_text())
    assert summary["global_steps"] == 2
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results["students"]) == {"student"} and results["n_prompts"] == 4
    assert (run_dir / "report" / "report.md").exists()
    if path.stem == "chain_of_thought":  # every teacher output split into steps + answer
        from distill.store.shards import read_store

        rows = read_store(run_dir / "teacher")
        assert rows and all(r["reasoning"] and r["response"] for r in rows)
    if path.stem == "cross_tokenizer":  # the student really has another tokenizer
        from transformers import AutoTokenizer

        student_tok = AutoTokenizer.from_pretrained(run_dir / "students" / "student")
        teacher_tok = AutoTokenizer.from_pretrained(cfg.teacher.model)
        assert student_tok.get_vocab() != teacher_tok.get_vocab()


def test_shipped_number_tokenizer_base_is_what_the_builder_writes(tmp_path):
    """The cross-tokenizer recipe's student base: rebuilt, it equals the shipped files (no drift), and it
    tokenizes numbers differently from the teacher while round-tripping text."""
    from transformers import AutoConfig, AutoTokenizer

    from distill.recipes import math_tutor

    built = math_tutor.write_number_tokenizer_base(tmp_path / "base")
    shipped = math_tutor.number_tokenizer_path()
    new, old = AutoTokenizer.from_pretrained(built), AutoTokenizer.from_pretrained(shipped)
    assert new.get_vocab() == old.get_vocab()
    assert AutoConfig.from_pretrained(shipped).vocab_size == len(old)
    text = " 43 + 19 = 62. The answer is 62."
    teacher = AutoTokenizer.from_pretrained(math_tutor.teacher_path())
    ids = old(text, add_special_tokens=False)["input_ids"]
    assert old.decode(ids) == text and len(ids) < len(teacher(text, add_special_tokens=False)["input_ids"])


def test_cross_tokenizer_student_reads_the_store_in_its_own_vocabulary(task_files, tmp_path, monkeypatch):
    """The teacher's store holds the teacher's ids; a student with its own tokenizer must train on the store's
    text in its vocabulary (it was trained on the teacher's character ids, so the saved student, read with its
    number tokenizer, wrote '9494...' at a cross-entropy of 10 while the log said 0.7)."""
    from distill.data.batching import tokenize_pair
    from distill.store import read_store
    from distill.teachers.generate import generate
    from distill.training.train import _sides, build_examples, store_path

    monkeypatch.chdir(ROOT)
    cfg = load_config(RECIPES / "cross_tokenizer.yaml", [
        f"run_dir={tmp_path / 'run'}", f"generate.input={task_files['prompts']}", "generate.max_new_tokens=40"])
    generate(cfg)
    sides = _sides(cfg, cfg.student)
    assert sides.cross is not None and not sides.same_tokenizer
    examples = build_examples(cfg, sides.tokenizer, sides.same_tokenizer)
    rows = read_store(store_path(cfg))
    want = sorted(tokenize_pair(sides.tokenizer, r["prompt"], r["response"], cfg.train.max_length)["input_ids"]
                  for r in rows)
    assert sorted(examples[i]["input_ids"] for i in range(len(examples))) == want
    assert any(i >= len(sides.teacher_tok) for ex in want for i in ex)  # number tokens, not characters
