"""Training resume: a checkpoint cut mid-write is never resumed from; a finished training does nothing on rerun."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from distill.config import STUDENT_CONFIG_FILE, load_config
from distill.errors import DiskError, UserError
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


# ---------------------------------------------------------------- damaged checkpoints, diverged training (issue 21)


@pytest.fixture(scope="module")
def trained4(tmp_path_factory, teacher_dir) -> Path:
    """A run trained to step 4 (checkpoints 2 and 4), copied by each test that damages it."""
    base = tmp_path_factory.mktemp("trained4")
    train(_cfg(base, teacher_dir, max_steps=4))
    return base / "run"


def _nan_weights(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] * float("nan")
    save_file(state, str(path), metadata={"format": "pt"})


DAMAGE = {
    "optimizer.pt: empty file": lambda p: p.write_bytes(b""),  # on main: the process dies with "Aborted."
    "scheduler.pt: damaged": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "rng_state.pth: damaged": lambda p: p.write_bytes(bytes(b ^ 0xFF for b in p.read_bytes())),
    "model.safetensors: non-finite weights": _nan_weights,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_resumes_from_the_newest_intact_one(tmp_path, trained4, teacher_dir, damage,
                                                                      capsys):
    import shutil

    shutil.copytree(trained4, tmp_path / "run")
    root = tmp_path / "run" / "checkpoints" / "student"
    DAMAGE[damage](root / "checkpoint-4" / damage.split(":")[0])
    (out,) = train(_cfg(tmp_path, teacher_dir, max_steps=6))
    said = " ".join(capsys.readouterr().out.split())
    assert f"checkpoint-4: damaged checkpoint ({damage}" in said
    assert "moved to damaged-checkpoint-4, resuming from checkpoint-2" in said
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_steps"] == 6
    assert (root / "damaged-checkpoint-4").is_dir()  # kept for a look, out of the Trainer's way
    assert _ckpts(tmp_path) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, teacher_dir, monkeypatch):
    from distill.training.trainer import DistillationTrainer

    real = DistillationTrainer._component

    def nan_from_step_6(self, *args, **kwargs):  # as an overflowing loss would
        value = real(self, *args, **kwargs)
        return value * float("nan") if self.state.global_step >= 5 else value

    monkeypatch.setattr(DistillationTrainer, "_component", nan_from_step_6)
    with pytest.raises(UserError, match=r"step 6: the loss is nan \(not finite\).*kept"):  # on main: exit 0
        train(_cfg(tmp_path, teacher_dir, max_steps=8))
    from distill.training.checkpoints import checkpoint_problem

    root = tmp_path / "run" / "checkpoints" / "student"
    assert _ckpts(tmp_path) == ["checkpoint-2", "checkpoint-4"]  # no NaN checkpoint-6
    assert checkpoint_problem(root / "checkpoint-4") is None
    assert not (tmp_path / "run" / "students" / "student" / "model.safetensors").exists()  # no NaN student


def test_diverged_weights_are_never_saved(tmp_path, teacher_dir):
    cfg = _cfg(tmp_path, teacher_dir, max_steps=3)
    cfg.train.learning_rate, cfg.train.save_steps = 1e39, 1  # finite, but one AdamW step overflows float32
    with pytest.raises(UserError, match=r"step 1: weight .* became NaN or inf"):
        train(cfg)
    root = tmp_path / "run" / "checkpoints" / "student"
    assert not root.exists() or _ckpts(tmp_path) == []


def test_full_disk_in_torch_save_is_a_disk_error_with_the_free_space(tmp_path, teacher_dir, monkeypatch):
    import torch

    real = torch.save

    def full(obj, f, *args, **kwargs):  # what torch's C++ writer raises on a full disk: not an OSError
        if "checkpoint-4" in str(f):
            raise RuntimeError("basic_ios::clear: iostream error")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskError, match=r"no space left on device \([\d,.]+ MB free on the disk of .*\) "
                                        r"\[Errno 28\].*checkpoints already written .* are kept"):
        train(_cfg(tmp_path, teacher_dir, max_steps=4))
    assert _ckpts(tmp_path)[0] == "checkpoint-2"
    monkeypatch.setattr(torch, "save", real)
    (out,) = train(_cfg(tmp_path, teacher_dir, max_steps=4))  # the partial checkpoint-4 is redone
    assert json.loads((out / "train_summary.json").read_text())["resumed_from"].endswith("checkpoint-2")
