"""Hardening round 2 (issue 21): non-finite and absurd settings, YAML alias bombs, chat content parts, lone
surrogates, damaged input files, bounded error lines, `export --out` a file, a full disk during eval.

Each case is what a new user (or a hostile file) tried on main: a traceback, a hang, a silent NaN student or a
misleading message there; one line naming the file, line or field here."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_errors import _one_line_error, _write_cfg
from typer.testing import CliRunner

import distill
from distill.cli import app
from distill.config import load_config
from distill.data.prompts import load_records
from distill.errors import ConfigError, DataError, DiskError

SRC = str(Path(distill.__file__).resolve().parents[1])  # the distill under test, for child processes


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("tree, key", [
    ({"train": {"learning_rate": float("inf")}}, "train.learning_rate"),
    ({"train": {"weight_decay": float("inf")}}, "train.weight_decay"),
    ({"train": {"losses": [{"name": "forward_kl", "weight": float("inf")}]}}, "train.losses.0.weight"),
    ({"train": {"losses": [{"name": "forward_kl", "temperature": float("inf")}]}}, "train.losses.0.temperature"),
    ({"train": {"losses": [{"name": "jsd", "params": {"beta": float("nan")}}]}}, "train.losses.0.params.beta"),
    ({"teacher": {"extra_body": {"top_k": float("-inf")}}}, "teacher.extra_body.top_k"),
    ({"generate": {"temperature": float("inf")}}, "generate.temperature"),
    ({"eval": {"cost_per_hour": float("inf")}}, "eval.cost_per_hour"),
    ({"train": {"args": {"max_grad_norm": float("inf")}}}, "train.args.max_grad_norm"),
    ({"students": [{"name": "a", "train": {"learning_rate": float("inf")}}]}, "students.0.train.learning_rate"),
])
def test_non_finite_numbers_are_refused_in_every_field(tree, key):
    with pytest.raises(ConfigError, match=rf"{key}: (not|Input should be) a finite number \(got -?(inf|nan)\)"):
        load_config(tree)


@pytest.mark.parametrize("override, key", [
    ("train.learning_rate=inf", "train.learning_rate"),
    ("train.learning_rate=1e999", "train.learning_rate"),
    ("train.losses.0.temperature=.nan", "train.losses.0.temperature"),
])
def test_non_finite_overrides_are_refused(override, key):
    with pytest.raises(ConfigError, match=rf"{key}: (not|Input should be) a finite number"):
        load_config({"train": {"losses": [{"name": "forward_kl"}]}}, [override])


@pytest.mark.parametrize("tree, key", [
    ({"seed": 1e23}, "seed"),
    ({"seed": -1}, "seed"),  # numpy seeds are 0 .. 2^32-1: a traceback in seed_everything on main
    ({"generate": {"seed": 10**23}}, "generate.seed"),
    ({"train": {"threads": 10**6}}, "train.threads"),
    ({"train": {"per_device_train_batch_size": 1e23}}, "train.per_device_train_batch_size"),
    ({"generate": {"batch_size": 10**30}}, "generate.batch_size"),
    ({"teacher": {"extra_body": {"n": [1, 10**40]}}}, r"teacher.extra_body.n\[1\]"),
])
def test_absurd_integers_are_refused(tree, key):
    with pytest.raises(ConfigError, match=rf"{key}: "):
        load_config(tree)


def test_sane_numbers_still_load():
    cfg = load_config({"seed": 2**32 - 1, "train": {"learning_rate": 1e-30, "threads": 64},
                       "teacher": {"extra_body": {"n": 2**62, "x": [1.5, -3.0]}}})
    assert cfg.seed == 2**32 - 1 and cfg.teacher.extra_body["n"] == 2**62


def _load_in_subprocess(path: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """`distill config`-free load of a config file, in a child process so that a hang (main: an alias bomb
    grows past 1 GB) fails the test instead of stopping the suite."""
    code = ("import sys\nfrom distill.config import load_config\nfrom distill.errors import ConfigError\n"
            "try:\n    load_config(sys.argv[1])\nexcept ConfigError as e:\n    print('ConfigError:', e); sys.exit(2)\n")
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    try:
        return subprocess.run([sys.executable, "-c", code, str(path)], check=False, capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading {path.name} hung for {timeout} s")


BOMB = "\n".join(
    [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefg", "bcdefgh")]
)


@pytest.mark.parametrize("text, needle", [
    ('a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + BOMB
     + "\ngenerate:\n  stop: [*h, *h, *h, *h, *h, *h, *h, *h, *h]\n", "expand to more than 1,000,000 values"),
    ("generate:\n  stop: &s [*s]\n", "refers to the list or mapping that holds it"),
])
def test_yaml_alias_bomb_is_refused_quickly(tmp_path, text, needle):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    res = _load_in_subprocess(path)
    assert res.returncode == 2 and needle in res.stdout and "Traceback" not in res.stderr, res.stdout + res.stderr


def test_aliases_of_small_values_still_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("students:\n  - {name: a, train: &t {learning_rate: 0.001}}\n  - {name: b, train: *t}\n")
    assert [s.train for s in load_config(path).students] == [{"learning_rate": 0.001}] * 2
    assert load_config({}, ["generate.stop=[a, b]"]).generate.stop == ["a", "b"]


@pytest.mark.parametrize("content, needle", [
    (bytes(range(256)) * 4, "binary file (NUL bytes)"),
    (b"train:\n  learning_rate: \xff\xfe\n", "cfg.yaml:2: not UTF-8 text (byte 0xff)"),
    (b"x: " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested too deeply"),
    (b"seed: " + b"9" * 5000 + b"\n", "a number of more than 4,300 digits"),
    (b"train:\n  learning_rate: [1\n", "cfg.yaml:3: not valid YAML"),
])
def test_unreadable_config_files_are_one_line(tmp_path, content, needle):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    res = CliRunner().invoke(app, ["train", str(path)])
    _one_line_error(res, needle)


def test_config_symlink_loop_says_so(tmp_path):
    loop = tmp_path / "cfg.yaml"
    loop.symlink_to(loop)
    _one_line_error(CliRunner().invoke(app, ["train", str(loop)]), "symlink loop")


def test_error_lines_are_bounded(tmp_path):
    path = _write_cfg(tmp_path, {"generate": {"stop": list(range(10_000))}})
    res = CliRunner().invoke(app, ["train", str(path)])
    _one_line_error(res, "10000 errors, the first 10", "generate.stop.0")
    assert len(res.output) < 3000 and max(len(line) for line in res.output.splitlines()) < 1100


def test_error_text_that_looks_like_markup_is_printed_as_is(tmp_path):
    missing = tmp_path / "[" / "x]" / "cfg.yaml"  # rich read '[/x]' as a closing tag: MarkupError on main
    res = CliRunner().invoke(app, ["train", str(missing)])
    _one_line_error(res, "config file not found", "[/x]")


# ---------------------------------------------------------------- prompts files


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_chat_content_as_a_list_of_text_parts_is_joined(tmp_path):
    rows = [{"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                          {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                       {"type": "text", "text": "there"}]}]},
            {"messages": [{"role": "user", "content": "Q?"},
                          {"role": "assistant", "content": [{"type": "text", "text": "A."}]}]}]
    first, second = load_records(_jsonl(tmp_path / "p.jsonl", rows))
    assert first.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert second.response == "A."  # not "[{'type': 'text', 'text': 'A.'}]"


@pytest.mark.parametrize("row, needle", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "p.jsonl:1: field 'messages'[0].content[0] is a 'image_url' part; only text parts"),
    ({"messages": [{"role": "user", "content": None}]}, "p.jsonl:1: field 'messages'[0].content is null"),
    ({"prompt": None}, "p.jsonl:1: field 'prompt' is null; expected a string"),
    ({"prompt": {f"k{i}": i for i in range(10_000)}}, "more)"),  # the repr is cut: '... (99xx more)'
])
def test_bad_chat_content_and_null_prompt_name_file_line_field(tmp_path, row, needle):
    with pytest.raises(DataError) as err:
        load_records(_jsonl(tmp_path / "p.jsonl", [row]))
    assert needle in str(err.value) and "fields present" not in str(err.value) and len(str(err.value)) < 600


@pytest.mark.parametrize("line, field", [
    ('{"prompt": "ok", "answer": "x\\ud800y"}', "field 'answer'"),
    ('{"prompt": "\\udfff"}', "field 'prompt'"),
    ('{"messages": [{"role": "user", "content": "a\\ud83d"}]}', "field 'messages'[0].content"),
    ('{"prompt": "ok", "meta": {"tag": "\\ud800"}}', "field 'meta'.tag"),
])
def test_lone_surrogate_is_refused_at_validation(tmp_path, line, field):
    path = _jsonl(tmp_path / "p.jsonl", ['{"prompt": "fine", "answer": "1"}', line])
    with pytest.raises(DataError, match=r"p.jsonl:2: .*lone surrogate"):
        load_records(path)
    with pytest.raises(DataError) as err:
        load_records(path)
    assert field in str(err.value)


def test_lone_surrogate_stops_generate_before_any_row_is_generated(tmp_path, teacher_dir):
    from distill.teachers.generate import generate

    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"Q: {i} + 1? A:", "answer": str(i + 1)} for i in range(3)]
                  + ['{"prompt": "Q: 9 + 1? A:", "answer": "1\\ud8000"}'])
    cfg = load_config({"run_dir": str(tmp_path / "run"), "teacher": {"model": str(teacher_dir)},
                       "generate": {"input": str(path), "max_new_tokens": 2, "shard_rows": 2}})
    with pytest.raises(DataError, match=r"p.jsonl:4: field 'answer' holds a lone surrogate"):
        generate(cfg)
    assert not list((tmp_path / "run").rglob("*.parquet"))


@pytest.mark.parametrize("name, content, needle", [
    ("deep.jsonl", '{"prompt": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "deep.jsonl:1: JSON nested too deeply"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, "deep.json: JSON nested too deeply"),
    ("big.jsonl", '{"prompt": "a", "n": ' + "9" * 5000 + "}\n", "big.jsonl:1: a JSON value cannot be read: an integer of more"),
    ("text.parquet", "prompt,answer\nhi,1\n", "text.parquet: not a readable Parquet file"),
])
def test_damaged_input_files_are_one_line(tmp_path, teacher_dir, name, content, needle):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=needle.replace("(", r"\(")):
        load_records(path)
    tree = {"run_dir": str(tmp_path / "run"), "teacher": {"model": str(teacher_dir)},
            "generate": {"input": str(path), "max_new_tokens": 2}}
    _one_line_error(CliRunner().invoke(app, ["generate", str(_write_cfg(tmp_path, tree))]), needle)


def test_input_symlink_loop_is_not_file_not_found(tmp_path):
    loop = tmp_path / "p.jsonl"
    loop.symlink_to(loop)
    with pytest.raises(DataError, match="p.jsonl: symlink loop"):
        load_records(loop)


# ---------------------------------------------------------------- export, eval


def test_export_out_an_existing_file_is_refused_first(tmp_path, teacher_dir):
    out = tmp_path / "model.bin"
    out.write_text("keep me")
    res = CliRunner().invoke(app, ["export", str(teacher_dir), "--out", str(out)])
    _one_line_error(res, "--out", "is an existing file, not a directory")
    res = CliRunner().invoke(app, ["export", str(teacher_dir), "--out", str(out / "sub")])
    _one_line_error(res, "is inside", "an existing file")
    assert out.read_text() == "keep me"


def test_full_disk_during_eval_keeps_the_previous_results(tmp_path, teacher_dir, monkeypatch):
    from conftest import make_tokenizer
    from test_evaluate import make_run_dir

    from distill.evaluation.evaluate import evaluate

    tree = make_run_dir(tmp_path, teacher_dir, make_tokenizer())
    tree["students"] = [{"name": "small"}]
    tree["eval"].update(limit=2, latency_requests=1, latency_passes=1, measure_memory=False)
    cfg = load_config(tree)
    evaluate(cfg)
    results = tmp_path / "run" / "eval" / "results.json"
    before = results.read_text()
    real = Path.write_text

    def full(self, data, *args, **kwargs):  # the disk fills while results.json is written
        if "results.json" in self.name:
            self.open("w").close()
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DiskError, match=r"no space left on device.*MB free.*earlier eval results.*kept"):
        evaluate(cfg)
    monkeypatch.setattr(Path, "write_text", real)
    assert results.read_text() == before and json.loads(before)["students"]["small"]
    assert sorted(p.name for p in results.parent.iterdir()) == ["outputs.jsonl", "results.json"]  # no temp left


def test_report_names_a_damaged_results_json(tmp_path):
    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "results.json").write_text("")  # left by a full disk before atomic writes
    res = CliRunner().invoke(app, ["report", str(_write_cfg(tmp_path, {"run_dir": str(tmp_path / "run")}))])
    _one_line_error(res, "results.json: damaged (empty or cut off", "rerun `distill eval CONFIG`")
