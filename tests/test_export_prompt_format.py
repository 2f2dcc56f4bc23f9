"""`distill export` carries the student's prompt_format.json (how training rendered prompts) into the export, so
`distill serve OUT` renders chat requests as the student was trained, as `distill serve STUDENT_DIR` does."""

from __future__ import annotations

import json

from conftest import make_llama, make_tokenizer

from distill.data.prompt_format import PromptFormat, load_prompt_format, save_prompt_format
from distill.exporting.export import export


def _student(out, fmt: PromptFormat | None):
    tok = make_tokenizer(chat_template=True)
    make_llama(len(tok), hidden=32, layers=1).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if fmt is not None:
        save_prompt_format(out, fmt)
    return out


def test_export_copies_the_prompt_format(tmp_path):
    fmt = PromptFormat(chat_template=False, system_prompt="Be brief.", prefix="[answer] ")
    src = _student(tmp_path / "student", fmt)
    report = export(src, tmp_path / "out")
    assert load_prompt_format(tmp_path / "out") == fmt
    assert report["prompt_format"] is True
    assert json.loads((tmp_path / "out" / "export_report.json").read_text())["prompt_format"] is True


def test_a_student_without_one_exports_without_one(tmp_path):
    report = export(_student(tmp_path / "student", None), tmp_path / "out")
    assert report["prompt_format"] is False and load_prompt_format(tmp_path / "out") is None
