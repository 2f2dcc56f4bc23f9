"""Reading prompt corpora and rendering prompts for a tokenizer.

Every stage reads prompts through `load_records` so that bad input fails the same way everywhere: with the
file, the line (or row) and the field that is wrong.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.config import DataConfig
from distill.errors import DataError


@dataclass
class Record:
    """One prompt: either plain text or chat messages; `reference` is carried along for evaluation."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    reference: str | None = None
    id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "file:line" for error messages

    def prompt_text(self) -> str:
        """The prompt as plain text (the last user message for chats) for reports and keys."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages or [])


def _rows_jsonl(path: Path):
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}:{lineno}", row


def _rows_json(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict):
        data = data.get("data", data.get("rows"))
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {i}: expected an object, got {type(row).__name__}")
        yield f"{path}[{i}]", row


def _rows_csv(path: Path):
    with path.open("r", encoding="utf-8", newline="") as fh:
        for lineno, row in enumerate(csv.DictReader(fh), 2):  # line 1 is the header
            yield f"{path}:{lineno}", dict(row)


def _rows_parquet(path: Path):
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    for f in files:
        table = pq.read_table(f)
        for i, row in enumerate(table.to_pylist()):
            yield f"{f}:row {i}", row


def _rows_hf(spec: str, split: str):
    import datasets

    name = spec[3:] if spec.startswith("hf:") else spec
    ds = datasets.load_dataset(name, split=split)
    for i, row in enumerate(ds):
        yield f"{name}[{split}]:row {i}", dict(row)


def iter_rows(source: str | Path, split: str = "train"):
    """(location, row dict) pairs from JSONL / JSON / CSV / Parquet files or `hf:dataset_name`."""
    spec = str(source)
    if spec.startswith("hf:"):
        yield from _rows_hf(spec, split)
        return
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if path.is_dir():
        if any(path.glob("*.parquet")):
            yield from _rows_parquet(path)
            return
        yield from _rows_hf(str(path), split)  # a saved HF dataset directory
        return
    readers = {".jsonl": _rows_jsonl, ".ndjson": _rows_jsonl, ".json": _rows_json, ".csv": _rows_csv,
               ".parquet": _rows_parquet}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type '{suffix}'; expected .jsonl, .json, .csv or .parquet")
    yield from readers[suffix](path)


def _check_messages(messages: Any, where: str, field_name: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{field_name}' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: field '{field_name}'[{j}] must be an object with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{where}: field '{field_name}'[{j}].role is '{m['role']}'; expected system/user/assistant")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


def record_from_row(row: dict, where: str, cfg: DataConfig) -> Record:
    """Validate one row into a Record; `where` is 'file:line' for the error message."""
    messages = row.get(cfg.messages_field)
    prompt = row.get(cfg.prompt_field)
    if messages is not None and messages != "":
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                raise DataError(f"{where}: field '{cfg.messages_field}' is a string but not JSON messages") from None
        messages = _check_messages(messages, where, cfg.messages_field)
        prompt = None
    elif prompt is None:
        raise DataError(
            f"{where}: missing field '{cfg.prompt_field}' (or '{cfg.messages_field}'); "
            f"fields present: {', '.join(map(str, row)) or 'none'}"
        )
    elif not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field '{cfg.prompt_field}' must be a non-empty string, got {prompt!r}")
    reference = row.get(cfg.reference_field) if cfg.reference_field else None
    rid = row.get(cfg.id_field) if cfg.id_field else None
    used = {cfg.prompt_field, cfg.messages_field, cfg.reference_field, cfg.id_field}
    extra = {k: v for k, v in row.items() if k not in used}
    return Record(
        prompt=prompt,
        messages=messages if prompt is None else None,
        reference=None if reference is None else str(reference),
        id=None if rid is None else str(rid),
        extra=extra,
        source=where,
    )


def load_records(source: str | Path, cfg: DataConfig | None = None, limit: int | None = None) -> list[Record]:
    """All prompts of a corpus, validated. Raises DataError naming file, line and field."""
    cfg = cfg or DataConfig()
    out: list[Record] = []
    for where, row in iter_rows(source, cfg.split):
        out.append(record_from_row(row, where, cfg))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{source}: no rows found")
    return out


def render_prompt(record: Record, tokenizer=None, cfg: DataConfig | None = None) -> str:
    """The text the model sees before its answer: the chat template when the tokenizer has one (and the
    config allows it), else the plain prompt (chat messages joined as 'role: content' lines)."""
    cfg = cfg or DataConfig()
    messages = record.messages or [{"role": "user", "content": record.prompt or ""}]
    if cfg.system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    if cfg.chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if record.prompt is not None and not cfg.system_prompt:
        return record.prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
