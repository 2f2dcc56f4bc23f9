"""Training resume: a checkpoint cut mid-write is never resumed from; a finished training does nothing on rerun."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from distill.config import STUDENT_CONFIG_FILE, load_config
from distill.errors import DiskError
from distill.training.checkpoints import CHECKPOINT_COMPLETE, checkpoint_state, last_checkpoint
from distill.training.train import train

TEXT = ["Q: Tom has 12 apples. He eats 5. How many apples now? A: 7.", "The quick brown fox jumps over the dog.",
        "Distillation trains a small student.", "Lily has 43 cards and finds 19 more."]


def _cfg(tmp_path: Path, teacher_dir, max_steps: int):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT * 4))
    return load_config({
        "run_dir": str(tmp_path / "run"),
        "teacher": {"model": str(teacher_dir)},
        "student": {"init": "config", "config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "num_key_value_heads": 2}},
        "train": {"input": str(data), "signal": "none", "losses": [{"name": "cross_entropy"}], "max_steps": max_steps,
                  "save_steps": 2, "save_total_limit": 3, "logging_steps": 1, "per_device_train_batch_size": 4,
                  "lr_scheduler_type": "constant", "learning_rate": 1e-2},
    })


def _ckpts(tmp_path: Path) -> list[str]:
    root = tmp_path / "run" / "checkpoints" / "student"
    return sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-"))


def test_rerun_of_finished_training_does_nothing(tmp_path, teacher_dir):
    cfg = _cfg(tmp_path, teacher_dir, max_steps=4)
    (out,) = train(cfg)
    assert _ckpts(tmp_path) == ["checkpoint-2", "checkpoint-4"]
    root = tmp_path / "run" / "checkpoints" / "student"
    assert all((root / c / CHECKPOINT_COMPLETE).exists() for c in _ckpts(tmp_path))  # recognisably complete
    weights = out / "model.safetensors"
    before = (weights.read_bytes(), weights.stat().st_mtime_ns)

    train(cfg)  # finished: no step, no checkpoint, no rewrite
    assert _ckpts(tmp_path) == ["checkpoint-2", "checkpoint-4"]
    assert (weights.read_bytes(), weights.stat().st_mtime_ns) == before
    assert json.loads((out / "train_summary.json").read_text())["global_steps"] == 4

    # crashed after the last checkpoint but before the student was written: load it, do not step again
    (out / "train_summary.json").unlink()
    weights.unlink()
    train(cfg)
    assert _ckpts(tmp_path) == ["checkpoint-2", "checkpoint-4"]
    assert weights.read_bytes() == before[0]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_steps"] == 4 and summary["resumed_from"].endswith("checkpoint-4")


def test_checkpoint_cut_mid_write_resumes_from_previous_complete_one(tmp_path, teacher_dir, monkeypatch):
    from transformers.trainer_callback import TrainerState

    train(_cfg(tmp_path, teacher_dir, max_steps=4))
    real = TrainerState.save_to_json

    def full_disk(self, path):  # the disk fills while checkpoint-6 is written: its trainer_state.json never lands
        if "checkpoint-6" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(self, path)

    monkeypatch.setattr(TrainerState, "save_to_json", full_disk)
    cfg = _cfg(tmp_path, teacher_dir, max_steps=6)
    with pytest.raises(DiskError, match=r"checkpoint-6.*no space left.*kept"):
        train(cfg)
    root = tmp_path / "run" / "checkpoints" / "student"
    partial = root / "checkpoint-6"
    assert partial.is_dir() and not (partial / "trainer_state.json").exists()
    assert checkpoint_state(partial) is None and checkpoint_state(root / "checkpoint-4") is not None
    assert last_checkpoint(str(root), clean=False).endswith("checkpoint-4")

    monkeypatch.setattr(TrainerState, "save_to_json", real)
    (out,) = train(cfg)  # resumes from 4 (the partial 6 is removed), reaches 6
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-4") and summary["global_steps"] == 6
    assert (partial / CHECKPOINT_COMPLETE).exists()


def test_run_config_stays_the_runs_and_each_student_keeps_its_own(tmp_path, teacher_dir):
    """Issue 14 defect 1: run_dir/config.yaml is not overwritten by the last student's view."""
    import yaml

    from distill.reporting.report import training_details

    cfg = _cfg(tmp_path, teacher_dir, max_steps=2)
    tree = cfg.model_dump(mode="json")
    small = tree["student"]["config"]
    tree["students"] = [{"name": "a", "init": "config", "config": small},
                        {"name": "b", "init": "config", "config": small,
                         "train": {"max_steps": 1, "learning_rate": 5e-3}}]
    cfg = load_config(tree)
    train(cfg)
    run_dir = tmp_path / "run"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 2 and [s["name"] for s in saved["students"]] == ["a", "b"]
    own_b = yaml.safe_load((run_dir / "students" / "b" / STUDENT_CONFIG_FILE).read_text())
    assert own_b["train"]["max_steps"] == 1 and own_b["student"]["name"] == "b"
    assert load_config(run_dir / "config.yaml").train.max_steps == 2  # reloading the run trains the run
    details = {n: training_details(run_dir, n, cfg) for n in ("a", "b")}
    assert (details["a"]["max_steps"], details["a"]["learning_rate"]) == (2, 1e-2)
    assert (details["b"]["max_steps"], details["b"]["learning_rate"]) == (1, 5e-3)
