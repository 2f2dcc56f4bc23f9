"""Progress in logs: periodic plain lines (done/total, tokens/s, ETA) when output is not a terminal, for
generate, train (the Trainer's tqdm bar off) and eval; no carriage-return redraws."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from distill.config import ConfigError, load_config
from distill.progress import Progress, default_interval, duration


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _progress(interval: float, **kw):
    out, clock = io.StringIO(), Clock()
    console = Console(file=out, width=200)
    return Progress("generate", total=26, console=console, interval=interval, clock=clock, **kw), out, clock


def test_lines_on_first_update_every_interval_and_last():
    p, out, clock = _progress(10.0)
    for step in range(26):
        clock.now = float(step)
        p.update(tokens=100)
    p.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == [
        "[generate] 1/26 rows (4%)", "[generate] 11/26 rows (42%)", "[generate] 21/26 rows (81%)",
        "[generate] 26/26 rows (100%)"]
    assert "110 tok/s" in lines[1] and "10.0s elapsed" in lines[1] and "ETA 13.6s" in lines[1]
    assert "ETA" not in lines[-1]


def test_a_resumed_stage_counts_its_rate_from_where_it_started():
    p, out, clock = _progress(0.0, start=20)
    clock.now = 2.0
    p.update(2, loss=0.5)
    assert out.getvalue().strip() == "[generate] 22/26 rows (85%) | loss 0.5 | 2.0s elapsed | ETA 4.0s"


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv("DISTILL_PROGRESS_INTERVAL", "2.5")
    assert default_interval() == 2.5
    monkeypatch.setenv("DISTILL_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ConfigError, match="DISTILL_PROGRESS_INTERVAL='soon'"):
        default_interval()
    assert (duration(5), duration(189), duration(3720)) == ("5.0s", "3m09s", "1h02m")


@pytest.fixture
def run_cfg(tmp_path, teacher_dir, prompts_file):
    """generate 8 rows, train one small student 6 steps, eval on the same 8 prompts (their answers)."""
    student = {"name": "small", "init": "config",
               "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}}
    return load_config({"run_dir": str(tmp_path / "run"), "teacher": {"model": str(teacher_dir)},
                        "students": [student]}, [
        f"generate.input={prompts_file}", "generate.max_new_tokens=6", "generate.top_k=4", "generate.batch_size=2",
        "train.max_steps=6", "train.per_device_train_batch_size=4", "train.logging_steps=3", "train.save_steps=100",
        "train.threads=1", f"eval.input={prompts_file}", "eval.max_new_tokens=4", "eval.latency_requests=1",
        "eval.latency_passes=1", "eval.latency_new_tokens=2", "eval.measure_memory=false", "eval.batch_size=4"])


def test_every_stage_prints_progress_lines_to_a_log(run_cfg, capsys, monkeypatch):
    """Output captured (not a terminal), interval 0: a line per update in generate, train and eval."""
    from distill.evaluation.evaluate import evaluate
    from distill.teachers.generate import generate
    from distill.training.train import train

    monkeypatch.setenv("DISTILL_PROGRESS_INTERVAL", "0")
    generate(run_cfg)
    train(run_cfg)
    evaluate(run_cfg)
    captured = capsys.readouterr()
    log = captured.out + captured.err
    assert "\r" not in log
    lines = log.splitlines()
    gen = [line for line in lines if line.startswith("[generate] ")]
    assert [line.split(" rows")[0] for line in gen] == [f"[generate] {i}/8" for i in range(1, 9)]
    assert all("tok/s" in line for line in gen)
    train_lines = [line for line in lines if line.startswith("[train small] ")]
    assert [line.split(" | ")[0] for line in train_lines][:2] == ["[train small] 1/6 steps (17%)",
                                                                  "[train small] 2/6 steps (33%)"]
    assert train_lines[-1].startswith("[train small] 6/6 steps (100%)") and "loss " in train_lines[-1]
    assert any(line.startswith("[eval teacher] 4/8 rows") for line in lines)
    assert any(line.startswith("[eval small] 8/8 rows") for line in lines)
    assert any(line.startswith("eval small: done in") for line in lines)


def test_a_long_interval_keeps_the_log_to_first_and_last_lines(run_cfg, capsys, monkeypatch):
    """The training log stays bounded whatever the step count: no tqdm redraws, two progress lines."""
    from distill.training.train import train

    monkeypatch.setenv("DISTILL_PROGRESS_INTERVAL", "3600")
    from distill.teachers.generate import generate

    generate(run_cfg)
    capsys.readouterr()
    train(run_cfg)
    captured = capsys.readouterr()
    log = captured.out + captured.err
    assert "\r" not in log and "it/s" not in log
    train_lines = [line.split(" | ")[0] for line in log.splitlines() if line.startswith("[train small]")]
    assert train_lines == ["[train small] 1/6 steps (17%)", "[train small] 6/6 steps (100%)"]
    assert len(log) < 4000


def test_a_terminal_gets_a_bar_not_lines():
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True)
    with Progress("generate", total=4, console=console, interval=0.0) as p:
        assert p.live
        p.update(2, tokens=50, loss=0.25)
    text = out.getvalue()
    assert "generate" in text and "2/4" in text and "loss 0.25" in text and "[generate]" not in text
