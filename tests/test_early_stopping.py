"""train.early_stopping: training stops when the held-out loss stops improving, the best checkpoint is the student,
the summary says why and where, and resume keeps the patience counter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_resume import _cfg as resume_cfg

from distill.config import load_config
from distill.errors import ConfigError
from distill.training.early_stopping import stalled_evaluations
from distill.training.train import train


def _cfg(tmp_path: Path, teacher_dir, max_steps: int = 30, patience: int = 2, **train):
    """test_resume's tiny labels-only run, with a quarter held out and evaluated after every step."""
    tree = resume_cfg(tmp_path, teacher_dir, max_steps).model_dump(mode="json")
    tree["train"].update({"eval_fraction": 0.25, "eval_steps": 1, "threads": 1,
                          "early_stopping": {"enabled": True, "patience": patience}, **train})
    return load_config(tree)


def _summary(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())


def _ckpt_dir(tmp_path: Path) -> Path:
    return tmp_path / "run" / "checkpoints" / "student"


def test_stops_when_held_out_loss_rises_and_saves_the_best_checkpoint(tmp_path, teacher_dir):
    # lr 1.0 on a fresh student: the held-out loss falls for a step or two, then the student blows up
    (out,) = train(_cfg(tmp_path, teacher_dir, learning_rate=1.0))
    summary = _summary(out)
    log = json.loads((out / "train_log.json").read_text())
    evals = {e["step"]: e["eval_loss"] for e in log if "eval_loss" in e}
    best = min(evals, key=evals.get)
    assert summary["global_steps"] < 30 and summary["global_steps"] == max(evals)
    assert summary["global_steps"] - best == 2  # patience 2: two evaluations without improvement, then stop
    assert summary["stop_reason"] == "early stopping: no improvement in 2 evaluations"
    assert (summary["best_step"], summary["best_eval_loss"]) == (best, pytest.approx(evals[best]))
    student = load_file(out / "model.safetensors")
    best_ckpt = load_file(_ckpt_dir(tmp_path) / f"checkpoint-{best}" / "model.safetensors")
    last_ckpt = load_file(_ckpt_dir(tmp_path) / f"checkpoint-{summary['global_steps']}" / "model.safetensors")
    assert all((student[k] == best_ckpt[k]).all() for k in best_ckpt)  # the student is the best checkpoint...
    assert any((student[k] != last_ckpt[k]).any() for k in last_ckpt)  # ...not the last step's weights

    # rerun: the run stopped early, so it is done: no step, no new checkpoint, no rewrite of the student
    weights = out / "model.safetensors"
    before = (sorted(p.name for p in _ckpt_dir(tmp_path).iterdir()), weights.stat().st_mtime_ns)
    train(_cfg(tmp_path, teacher_dir, learning_rate=1.0))
    assert (sorted(p.name for p in _ckpt_dir(tmp_path).iterdir()), weights.stat().st_mtime_ns) == before

    # crashed after the last checkpoint, before the student was written: the best checkpoint is loaded, not the last
    (out / "train_summary.json").unlink()
    weights.unlink()
    train(_cfg(tmp_path, teacher_dir, learning_rate=1.0))
    assert all((load_file(weights)[k] == best_ckpt[k]).all() for k in best_ckpt)
    assert _summary(out)["best_step"] == best and _summary(out)["stop_reason"].startswith("early stopping")


def test_crashed_run_resumes_with_its_patience_counter(tmp_path, teacher_dir, monkeypatch):
    """lr 0: every held-out loss equals the first, so patience 3 stops at step 4 (1 best, 2-4 no improvement). A
    kill after step 3's checkpoint must still stop at 4, not start counting again (which would stop at 6)."""
    import distill.training.train as train_mod

    real = train_mod.mark_complete

    def killed_after_step_3():
        callback = real()
        on_save = callback.on_save

        def crash(args, state, control, **kwargs):
            on_save(args, state, control, **kwargs)
            if state.global_step == 3:
                raise KeyboardInterrupt  # the process is killed right after checkpoint-3 is complete
            return control

        callback.on_save = crash
        return callback

    cfg = _cfg(tmp_path, teacher_dir, patience=3, args={"learning_rate": 0.0})
    monkeypatch.setattr(train_mod, "mark_complete", killed_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(train_mod, "mark_complete", real)
    (out,) = train(cfg)
    summary = _summary(out)
    assert summary["resumed_from"].endswith("checkpoint-3")
    assert summary["global_steps"] == 4 and summary["best_step"] == 1
    assert summary["stop_reason"] == "early stopping: no improvement in 3 evaluations"


def test_summary_without_early_stopping_names_the_budget(tmp_path, teacher_dir):
    cfg = _cfg(tmp_path, teacher_dir, max_steps=2, early_stopping={"enabled": False})
    (out,) = train(cfg)
    summary = _summary(out)
    assert summary["stop_reason"] == "max_steps" and summary["global_steps"] == 2
    assert summary["best_step"] is None and summary["best_eval_loss"] is None


def test_config_refuses_early_stopping_without_a_held_out_split(tmp_path, teacher_dir):
    with pytest.raises(ConfigError) as err:
        load_config({"train": {"early_stopping": True}})
    line = next(x for x in str(err.value).splitlines() if "early_stopping" in x)
    assert "train.early_stopping" in line and "train.eval_fraction" in line
    with pytest.raises(ConfigError, match=r"(?s)student 'b'.*train.early_stopping: .*train.eval_fraction"):
        load_config({"students": [{"name": "a"}, {"name": "b", "train": {"early_stopping": {"enabled": True}}}]})
    cfg = load_config({"train": {"eval_fraction": 0.1}}, ["train.early_stopping=true"])  # shorthand for enabled
    assert cfg.train.early_stopping.enabled and cfg.train.early_stopping.patience == 3
    with pytest.raises(ConfigError, match="train.early_stopping.patience"):
        load_config({"train": {"eval_fraction": 0.1, "early_stopping": {"enabled": True, "patience": 0}}})
    assert not load_config({}).train.early_stopping.enabled  # off unless asked for


def test_stalled_evaluations_counts_from_the_best_by_more_than_min_delta():
    log = [{"loss": 3.0}, {"eval_loss": 2.0}, {"eval_loss": 1.95}, {"eval_loss": 1.92}, {"eval_loss": 1.91}]
    assert stalled_evaluations(log, 0.0) == 0
    assert stalled_evaluations(log, 0.1) == 3  # small gains never beat the best (2.0) by more than 0.1...
    assert stalled_evaluations(log + [{"eval_loss": 1.89}], 0.1) == 0  # ...until together they do
    assert stalled_evaluations([{"eval_loss": 1.0}, {"eval_loss": 1.0}], 0.0) == 1  # equal is no improvement
    assert stalled_evaluations([{"loss": 1.0}], 0.0) == 0  # no evaluation yet


def test_patience_running_out_on_the_last_step_is_the_budget(tmp_path):
    from types import SimpleNamespace

    from distill.training.early_stopping import stop_reason

    t = load_config({"train": {"eval_fraction": 0.1, "max_steps": 100, "early_stopping": True}}).train
    log = [{"eval_loss": 1.0}] * 4  # patience 3 used up
    assert stop_reason(SimpleNamespace(log_history=log, global_step=80, max_steps=100), t).startswith("early stopping")
    assert stop_reason(SimpleNamespace(log_history=log, global_step=100, max_steps=100), t) == "max_steps"
