"""examples/cluster_offline.yaml works as written: only the paths (teacher, student, prompts) and the step count
are substituted by overrides, with a tiny local teacher whose store is filled by the hf backend (vLLM needs a
GPU). Training reads the store lazily; under torchrun each rank trains on its own share of the rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_llama
from test_distributed import launch

from distill.config import load_config, save_config

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "cluster_offline.yaml"


@pytest.fixture(scope="module")
def tiny_cluster(tmp_path_factory, teacher_dir, tokenizer):
    """(overrides that put tiny local models and prompts in place of the recipe's placeholders, the store)."""
    from distill.teachers.generate import generate

    root = tmp_path_factory.mktemp("cluster")
    student = root / "student"
    make_llama(len(tokenizer), hidden=32, layers=2, seed=2).save_pretrained(student, safe_serialization=True)
    tokenizer.save_pretrained(student)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Q: {a} + {b} = ? A:"}) + "\n"
                               for a in range(6) for b in range(6)))
    over = [f"teacher.model={teacher_dir}", f"student.model={student}", f"generate.input={prompts}",
            "generate.max_new_tokens=12", "train.max_steps=2", "train.max_length=64", "train.logging_steps=1"]
    store = generate(load_config(RECIPE, [*over, f"run_dir={root / 'gen'}", "teacher.backend=hf",
                                          "teacher.dtype=float32"]))
    return [*over, f"train.store={store}"], store


def test_recipe_trains_as_written_on_a_tiny_store(tmp_path, tiny_cluster):
    from distill.training.train import train

    over, _ = tiny_cluster
    cfg = load_config(RECIPE, [*over, f"run_dir={tmp_path / 'run'}"])
    assert cfg.teacher.backend == "vllm" and cfg.train.args["bf16"] and cfg.train.args["gradient_checkpointing"]
    (out,) = train(cfg)  # the vllm teacher is never started: offline training reads only the store
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_steps"] == 2 and summary["examples"] == 36 and summary["signal"] == "offline"
    log = [e for e in json.loads((out / "train_log.json").read_text()) if "loss_forward_kl" in e]
    assert log and all(e["loss_forward_kl"] > 0 for e in log)


def test_two_ranks_each_train_on_their_own_rows(tmp_path, tiny_cluster):
    """2 torchrun processes x batch 2 = one process x batch 4 (same losses): each rank read different rows."""
    from distill.training.train import train

    over, _ = tiny_cluster
    fast = ["train.args.bf16=false", "train.args.gradient_checkpointing=false", "train.args.dataloader_num_workers=0",
            "train.gradient_accumulation_steps=1", "train.lr_scheduler_type=constant", "train.warmup_ratio=0"]
    (one,) = train(load_config(RECIPE, [*over, *fast, "train.per_device_train_batch_size=4",
                                        f"run_dir={tmp_path / 'one'}"]))
    cfg = load_config(RECIPE, [*over, *fast, "train.per_device_train_batch_size=2", f"run_dir={tmp_path / 'two'}"])
    save_config(cfg, tmp_path / "two.yaml")
    launch(2, ["train", str(tmp_path / "two.yaml")], cwd=tmp_path)
    two = tmp_path / "two" / "students" / cfg.student.name
    logs = [[e["loss"] for e in json.loads((d / "train_log.json").read_text()) if "loss" in e] for d in (one, two)]
    assert len(logs[0]) == 2 and logs[1] == pytest.approx(logs[0], rel=1e-4)
    assert json.loads((two / "train_summary.json").read_text())["world_size"] == 2
