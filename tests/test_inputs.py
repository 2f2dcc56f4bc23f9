"""Input that used to be silently wrong: directories, broken CSV, BOMs, bad UTF-8, over-long prompts, SFT rows,
eval files without references, and `distill run` skipping stages whose outputs are gone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.config import DataConfig, load_config
from distill.data.prompts import iter_rows, load_records
from distill.errors import DataError


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plain_directory_is_refused_with_what_it_holds(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    _jsonl(d / "train.jsonl", [{"prompt": "a"}])
    _jsonl(d / "test.jsonl", [{"prompt": "b"}])
    with pytest.raises(DataError, match=r"data: a directory .*save_to_disk.* it holds: test.jsonl, train.jsonl"):
        load_records(d)


def test_save_to_disk_dataset_and_datasetdict_are_read(tmp_path):
    import datasets

    rows = {"prompt": ["p0", "p1", "p2"], "answer": ["0", "1", "2"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    assert [r.prompt for r in load_records(tmp_path / "ds")] == ["p0", "p1", "p2"]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                               "test": datasets.Dataset.from_dict({"prompt": ["t"], "answer": ["9"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r.reference for r in load_records(tmp_path / "dd")] == ["0", "1", "2"]
    assert [r.prompt for r in load_records(tmp_path / "dd", DataConfig(split="test"))] == ["t"]
    with pytest.raises(DataError, match="without split 'validation'.*train, test"):
        load_records(tmp_path / "dd", DataConfig(split="validation"))


def test_malformed_csv_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text('prompt,answer\nfine,1\n"never closed, 2\nthird,3\n')
    with pytest.raises(DataError, match=r"bad.csv:3: malformed CSV"):
        load_records(bad)
    extra = tmp_path / "extra.csv"
    extra.write_text("prompt,answer\nok,1\na,b,c\n")
    with pytest.raises(DataError, match=r"extra.csv:3: 3 fields, the header has 2"):
        load_records(extra)
    good = tmp_path / "good.csv"
    good.write_text('prompt,answer\n"two\nlines",1\nnext,2\n')
    locs = [where for where, _ in iter_rows(good)]
    assert locs == [f"{good}:2", f"{good}:4"] and load_records(good)[0].prompt == "two\nlines"


def test_bom_is_accepted_and_bad_utf8_names_the_line(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "hi", "answer": "1"}\n{"prompt": "yo"}\n')
    assert [r.prompt for r in load_records(bom)] == ["hi", "yo"]
    bom_csv = tmp_path / "bom.csv"
    bom_csv.write_bytes(b"\xef\xbb\xbfprompt,answer\nhi,1\n")
    assert load_records(bom_csv)[0].prompt == "hi"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c \xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: not valid UTF-8 \(byte 0xff at column 15\)"):
        load_records(bad)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_bytes(b"prompt\nok\n\xfe\n")
    with pytest.raises(DataError, match=r"bad.csv:3: not valid UTF-8"):
        load_records(bad_csv)


def test_prompts_longer_than_the_teacher_context(tmp_path, teacher_dir, tokenizer):
    from distill.teachers.generate import make_prompts, teacher_context

    long_prompt = " ".join(f"word{i}" for i in range(200))
    path = _jsonl(tmp_path / "long.jsonl", [{"prompt": "short one"}, {"prompt": long_prompt}])
    cfg = load_config({"teacher": {"model": str(teacher_dir)}, "generate": {"input": str(path), "max_new_tokens": 16}})
    assert teacher_context(cfg) == 256
    records = load_records(path)
    with pytest.raises(DataError, match=r"long.jsonl:2: the prompt is \d+ tokens, over the limit of 48 .*minus 16 "
                                        r"tokens.*data.truncate"):
        make_prompts(records, cfg, tokenizer, context=64)
    cut = load_config(cfg.model_dump(mode="json"), ["data.truncate=true"])
    prompts = make_prompts(records, cut, tokenizer, context=64)
    assert prompts[0].text == "short one"
    ids = tokenizer(prompts[1].text)["input_ids"]
    assert len(ids) <= 48 and prompts[1].text.endswith("word199")  # cut from the start, the end stays


def test_training_counts_rows_whose_prompt_fills_max_length(tmp_path, teacher_dir, tokenizer, capsys):
    from distill.training.train import build_examples

    rows = [{"prompt": "short?", "response": "yes"}, {"prompt": " ".join(["word"] * 80), "response": "no"}]
    path = _jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = load_config({"teacher": {"model": str(teacher_dir)},
                       "train": {"input": str(path), "signal": "none", "max_length": 16,
                                 "losses": [{"name": "cross_entropy"}]}})
    assert len(build_examples(cfg, tokenizer, same_tokenizer=True)) == 1
    assert "1 of 2 rows left out" in capsys.readouterr().out


def test_conversational_and_trl_rows_train_without_a_response_field(tmp_path, teacher_dir, tokenizer):
    from distill.training.train import build_examples

    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "2+2?"},
                                                           {"role": "assistant", "content": "four"}]}])
    trl = _jsonl(tmp_path / "trl.jsonl", [{"prompt": "3+3?", "completion": "six"},
                                          {"prompt": [{"role": "user", "content": "1+1?"}],
                                           "completion": [{"role": "assistant", "content": "two"}]}])
    record = load_records(chat)[0]
    assert record.response == "four" and record.messages == [{"role": "user", "content": "2+2?"}]
    for path, answers in ((chat, ["four"]), (trl, ["six", "two"])):
        cfg = load_config({"teacher": {"model": str(teacher_dir)},
                           "train": {"input": str(path), "signal": "none", "losses": [{"name": "cross_entropy"}]}})
        examples = build_examples(cfg, tokenizer, same_tokenizer=True)
        targets = [tokenizer.decode([t for t in ex["labels"] if t != -100], skip_special_tokens=True)
                   for ex in examples]
        assert [t.strip() for t in targets] == answers


def test_eval_without_references_is_an_error_unless_the_metric_needs_none(tmp_path, teacher_dir, monkeypatch):
    import sys
    import types

    import distill.evaluation.evaluate as ev

    monkeypatch.setattr(ev, "student_dirs", lambda cfg: {})
    held = _jsonl(tmp_path / "held.jsonl", [{"prompt": "Q: 1 + 2? A:", "question_id": 1}])
    tree = {"run_dir": str(tmp_path / "run"), "teacher": {"model": str(teacher_dir)},
            "eval": {"input": str(held), "max_new_tokens": 2, "latency_requests": 1, "measure_memory": False}}
    with pytest.raises(DataError, match=r"held.jsonl: no row has the reference field 'answer'.*question_id"):
        ev.evaluate(load_config(tree))
    assert not (tmp_path / "run" / "eval" / "results.json").exists()

    def length(prediction, reference):
        return float(len(prediction))

    length.needs_reference = False
    monkeypatch.setitem(sys.modules, "refless_metric", types.SimpleNamespace(length=length))
    results = ev.evaluate(load_config(tree, ["eval.metric=refless_metric:length"]))
    assert "teacher" in results


def test_run_reruns_stages_whose_outputs_were_removed_or_replaced(tmp_path, teacher_dir, prompts_file):
    import shutil

    from distill.pipeline import run

    held = _jsonl(tmp_path / "held.jsonl", [{"prompt": "Q: 1 + 2? A:", "answer": "3"}])
    cfg = load_config({
        "run_dir": str(tmp_path / "run"), "teacher": {"model": str(teacher_dir)},
        "generate": {"input": str(prompts_file), "max_new_tokens": 3, "top_k": 2, "batch_size": 8},
        "student": {"name": "s", "init": "prune", "num_layers": 1},
        "train": {"signal": "offline", "max_steps": 1, "per_device_train_batch_size": 4},
        "eval": {"input": str(held), "max_new_tokens": 2, "latency_requests": 1, "measure_memory": False},
    })
    run_dir = tmp_path / "run"
    assert set(run(cfg).values()) == {"ran"}
    assert set(run(cfg).values()) == {"skipped"}
    stages = json.loads((run_dir / "stages.json").read_text())
    assert str(run_dir / "eval" / "results.json") in stages["eval"]["outputs"]

    shutil.rmtree(run_dir / "report")
    assert run(cfg) == {"generate": "skipped", "train:s": "skipped", "eval": "skipped", "report": "ran"}
    assert (run_dir / "report" / "report.md").exists()

    results = run_dir / "eval" / "results.json"
    results.write_text(json.dumps({"students": {}, "teacher": {"score": None}}))  # a standalone eval's overwrite
    assert run(cfg) == {"generate": "skipped", "train:s": "skipped", "eval": "ran", "report": "ran"}
    assert "s" in json.loads(results.read_text())["students"]

    weights = run_dir / "students" / "s" / "model.safetensors"
    weights.unlink()
    assert run(cfg) == {"generate": "skipped", "train:s": "ran", "eval": "ran", "report": "ran"}
    assert weights.exists()
    assert json.loads((run_dir / "students" / "s" / "train_summary.json").read_text())["global_steps"] == 1


def test_generate_cli_refuses_a_prompt_over_the_teacher_context(tmp_path, teacher_dir):
    import yaml
    from typer.testing import CliRunner

    from distill.cli import app

    path = _jsonl(tmp_path / "huge.jsonl", [{"prompt": "ok"}, {"prompt": " ".join(f"w{i}" for i in range(400))}])
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "teacher": {"model": str(teacher_dir)},
                                   "generate": {"input": str(path), "max_new_tokens": 8}}))
    res = CliRunner().invoke(app, ["generate", str(cfg)])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "huge.jsonl:2: the prompt is" in out and "limit of 248" in out, res.output
