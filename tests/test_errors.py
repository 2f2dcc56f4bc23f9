"""User errors are one line with exit code 2 naming the setting or file; bugs keep their traceback; `--debug`
and DISTILL_DEBUG=1 show every traceback; Ctrl-C against a hung API stops promptly and keeps finished rows."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from fake_openai_server import FakeOpenAIServer
from typer.testing import CliRunner

from distill.cli import app
from distill.config import load_config
from distill.errors import ConfigError, DataError, UserError, is_user_error


def _write_cfg(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _run_tree(tmp_path: Path, teacher, prompts_file, **over) -> dict:
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"prompt": "Q: 1 + 2? A:", "answer": "3"}) + "\n")
    tree = {"run_dir": str(tmp_path / "run"), "teacher": {"model": str(teacher)},
            "generate": {"input": str(prompts_file), "max_new_tokens": 3, "batch_size": 4, "shard_rows": 2},
            "student": {"init": "prune", "num_layers": 2},
            "train": {"signal": "offline", "max_steps": 1, "losses": [{"name": "forward_kl"}]},
            "eval": {"input": str(held), "max_new_tokens": 3, "latency_requests": 1, "measure_memory": False}}
    tree.update(over)
    return tree


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1, result.output
    tail = result.output[result.output.index("error:"):]
    assert result.output.startswith("error:") or "\nerror:" in result.output, result.output
    out = " ".join(tail.split())  # rich may wrap long lines
    for n in needles:
        assert n in out, (n, result.output)
    return out


def test_error_types():
    assert isinstance(ConfigError("x"), UserError) and isinstance(DataError("x"), ValueError)
    assert is_user_error(OSError(errno.ENOSPC, "No space left on device", "/x"))
    assert is_user_error(OSError(errno.EROFS, "Read-only file system", "/x"))
    assert not is_user_error(ValueError("a bug")) and not is_user_error(KeyError("k"))


def test_debug_flag_env_and_version(tmp_path, monkeypatch):
    cfg = _write_cfg(tmp_path, {"train": {"learnin_rate": 1}})
    res = CliRunner().invoke(app, ["train", str(cfg)])
    _one_line_error(res, "learning_rate")
    res = CliRunner().invoke(app, ["--debug", "train", str(cfg)])  # a real option, not "No such option"
    assert isinstance(res.exception, ConfigError) and res.exit_code == 1
    monkeypatch.setenv("DISTILL_DEBUG", "1")
    res = CliRunner().invoke(app, ["train", str(cfg)])
    assert isinstance(res.exception, ConfigError)
    monkeypatch.delenv("DISTILL_DEBUG")
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("distill ")


def test_internal_bug_keeps_its_traceback(tmp_path, monkeypatch):
    import distill.training.train as train_module

    def bug(cfg, overrides=None):
        raise ValueError("an internal bug")  # a plain ValueError is not a user error any more

    monkeypatch.setattr(train_module, "train", bug)
    res = CliRunner().invoke(app, ["train", str(_write_cfg(tmp_path, {}))])
    assert isinstance(res.exception, ValueError) and "an internal bug" in str(res.exception)


@pytest.mark.parametrize("command", ["train", "run"])
def test_missing_teacher_path(tmp_path, prompts_file, command):
    missing = tmp_path / "path" / "that" / "does" / "not" / "exist"
    cfg = _write_cfg(tmp_path, _run_tree(tmp_path, missing, prompts_file))
    res = CliRunner().invoke(app, [command, str(cfg)])
    _one_line_error(res, "teacher.model", "does not exist")
    stages = tmp_path / "run" / "stages.json"
    assert not stages.exists() or "running" not in stages.read_text()


def test_junk_teacher_dir_and_junk_teacher_file(tmp_path, teacher_dir, prompts_file):
    import shutil

    junk_dir = tmp_path / "junk_teacher"
    shutil.copytree(teacher_dir, junk_dir)
    (junk_dir / "model.safetensors").write_bytes(b"\xff" * 64)
    for command in ("train", "run"):
        res = CliRunner().invoke(app, [command, str(_write_cfg(tmp_path, _run_tree(tmp_path, junk_dir, prompts_file)))])
        _one_line_error(res, "teacher.model", "model.safetensors", "not a valid safetensors file")
    junk_file = tmp_path / "teacher.bin"
    junk_file.write_bytes(b"not a model at all")
    res = CliRunner().invoke(app, ["train", str(_write_cfg(tmp_path, _run_tree(tmp_path, junk_file, prompts_file)))])
    _one_line_error(res, "teacher.model", "is a file, not a model directory")
    bad_json = tmp_path / "bad_json_teacher"
    shutil.copytree(teacher_dir, bad_json)
    (bad_json / "config.json").write_text("{ not json")
    res = CliRunner().invoke(app, ["train", str(_write_cfg(tmp_path, _run_tree(tmp_path, bad_json, prompts_file)))])
    _one_line_error(res, "teacher.model", "config.json", "cannot be read")


def test_teacher_dependent_config_errors_found_before_any_stage(tmp_path, teacher_dir, prompts_file, monkeypatch):
    import distill.teachers.generate as gen

    monkeypatch.setattr(gen, "generate", lambda cfg: pytest.fail("generation ran before the config was checked"))
    tree = _run_tree(tmp_path, teacher_dir, prompts_file, student={"init": "prune", "num_layers": 8})
    res = CliRunner().invoke(app, ["run", str(_write_cfg(tmp_path, tree))])
    _one_line_error(res, "student.num_layers=8", "4 layers")
    tree = _run_tree(tmp_path, teacher_dir, prompts_file, student={"init": "config", "config": {"hiden_size": 8}})
    res = CliRunner().invoke(app, ["run", str(_write_cfg(tmp_path, tree))])
    _one_line_error(res, "student.config.hiden_size")
    tree = _run_tree(tmp_path, teacher_dir, prompts_file,  # 52 / 4 heads: the rotary embedding fails at step one
                     student={"init": "config", "config": {"hidden_size": 52, "num_attention_heads": 4}})
    res = CliRunner().invoke(app, ["run", str(_write_cfg(tmp_path, tree))])
    _one_line_error(res, "student.config", "head dimension 13", "must be even")
    tree = _run_tree(tmp_path, teacher_dir, prompts_file, students=[{"name": "a", "init": "prune", "layers": [0, 9]}])
    res = CliRunner().invoke(app, ["train", str(_write_cfg(tmp_path, tree))])
    _one_line_error(res, "students[0].layers", "[0, 3]")
    assert not (tmp_path / "run" / "teacher").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_disk_full_or_read_only_in_generate_keeps_finished_rows(tmp_path, teacher_dir, prompts_file, monkeypatch, code):
    import pyarrow.parquet as pq

    from distill.store.shards import read_store

    real, calls = pq.write_table, []

    def write_table(table, where, **kw):
        calls.append(where)
        if len(calls) > 1:  # the first shard lands, then the disk is full / read-only
            raise OSError(code, "disk says no", str(where))
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", write_table)
    cfg = _write_cfg(tmp_path, _run_tree(tmp_path, teacher_dir, prompts_file))
    res = CliRunner().invoke(app, ["generate", str(cfg)])
    reason = "no space left on device" if code == errno.ENOSPC else "read-only file system"
    out = _one_line_error(res, "cannot write", str(tmp_path / "run" / "teacher"), reason, "kept")
    assert f"[Errno {code}]" in out
    monkeypatch.setattr(pq, "write_table", real)
    assert len(read_store(tmp_path / "run" / "teacher")) == 2  # the shard written before the failure


def test_disk_full_in_train_names_the_path(tmp_path, teacher_dir, prompts_file, monkeypatch):
    from transformers.trainer_callback import TrainerState

    def full(self, path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(TrainerState, "save_to_json", full)
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(8)))
    tree = _run_tree(tmp_path, teacher_dir, prompts_file,
                     train={"signal": "none", "input": str(data), "max_steps": 1, "losses": [{"name": "cross_entropy"}]},
                     student={"init": "config", "config": {"hidden_size": 16, "intermediate_size": 32,
                                                           "num_hidden_layers": 1, "num_attention_heads": 2,
                                                           "num_key_value_heads": 2}})
    res = CliRunner().invoke(app, ["train", str(_write_cfg(tmp_path, tree))])
    _one_line_error(res, "cannot write", "checkpoint-1", "read-only file system", "kept")


class HungServer(FakeOpenAIServer):
    """Answers prompts with 'fast' in them; every other request hangs (far longer than the test)."""

    def fault_for(self, prompt: str, attempt: int) -> str | None:
        return None if "fast" in prompt else "timeout"


def test_ctrl_c_with_requests_hung_in_flight_stops_and_keeps_rows(tmp_path, capsys, request):
    from distill.store.shards import read_store
    from distill.teachers.generate import generate

    # Ctrl-C reaches Python's own handler, as in a fresh `distill generate`, whatever an earlier test's library
    # left installed (in the full suite the SIGINT went elsewhere and generation ran on for 300 s)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))

    prompts = tmp_path / "p.jsonl"
    texts = ["fast one", "fast two", "slow a", "slow b", "slow c", "slow d"]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    with HungServer(slow_seconds=300) as srv:
        cfg = load_config({"run_dir": str(tmp_path / "run"),
                           "teacher": {"backend": "openai", "model": "scripted", "base_url": srv.url, "timeout": 300,
                                       "max_retries": 0, "max_concurrency": 4},
                           "generate": {"input": str(prompts), "max_new_tokens": 4, "shard_rows": 100}})

        def interrupt_when_hung():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with srv.lock:
                    if sum(srv.ok.values()) == 2 and sum(srv.attempts.values()) == 6:
                        break
                time.sleep(0.05)
            time.sleep(0.3)  # let the two finished rows reach the store
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

        threading.Thread(target=interrupt_when_hung, daemon=True).start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            generate(cfg)
        elapsed = time.monotonic() - start
    assert elapsed < 120  # generous: the hung requests would hold it for 300 s
    assert "stopping (Ctrl-C): 4 request(s) in flight abandoned" in capsys.readouterr().err
    rows = read_store(tmp_path / "run" / "teacher")
    assert sorted(r["prompt"] for r in rows) == ["fast one", "fast two"]
    assert sys.exc_info() == (None, None, None)


def test_ctrl_c_in_the_cli_says_work_is_kept(tmp_path, monkeypatch):
    import distill.training.train as train_module

    def interrupted(cfg, overrides=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    res = CliRunner().invoke(app, ["train", str(_write_cfg(tmp_path, {}))])
    assert res.exit_code == 130 and "finished work is kept" in res.output and "Traceback" not in res.output


def test_divergence_without_teacher_signal_is_refused_before_training(tmp_path, teacher_dir, prompts_file):
    tree = _run_tree(tmp_path, teacher_dir, prompts_file, train={"signal": "none", "input": str(prompts_file)})
    res = CliRunner().invoke(app, ["train", str(_write_cfg(tmp_path, tree))])
    _one_line_error(res, "forward_kl", "train.signal=none")
