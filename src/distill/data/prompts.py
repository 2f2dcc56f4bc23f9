"""Reading prompt corpora and rendering prompts for a tokenizer.

Every stage reads prompts through `load_records` so that bad input fails the same way everywhere: with the
file, the line (or row) and the field that is wrong.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.config import DataConfig
from distill.errors import DataError, not_found, short_repr


@dataclass
class Record:
    """One prompt: either plain text or chat messages; `reference` is carried along for evaluation."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    reference: str | None = None
    response: str | None = None  # the target answer of SFT rows (last assistant turn, or TRL's `completion`)
    id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "file:line" for error messages

    def prompt_text(self) -> str:
        """The prompt as plain text (the last user message for chats) for reports and keys."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages or [])


def _decode(data: bytes, path: Path) -> str:
    """UTF-8 text (a leading BOM, as Windows editors write it, is dropped); bad bytes name the line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); "
                        "re-save the file as UTF-8") from None


def _rows_jsonl(path: Path):
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _decode(raw, path) if lineno == 1 else _decode_line(raw, path, lineno)
            if not line.strip():
                continue
            row = _parse_json(line, f"{path}:{lineno}")
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}:{lineno}", row


def _parse_json(text: str, where: str) -> Any:
    """json.loads whose every failure is a DataError at `where`: bad syntax, nesting too deep for the parser
    (RecursionError), an integer of more than 4,300 digits (ValueError: Python's int conversion limit)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read (thousands of levels); flatten the row") from None
    except ValueError as exc:
        why = "an integer of more than 4,300 digits" if "digits" in str(exc) else str(exc).split(";")[0]
        raise DataError(f"{where}: a JSON value cannot be read: {why}; write it as a string or fix it") from None


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                        f"{exc.start + 1}); re-save the file as UTF-8") from None


def _rows_json(path: Path):
    data = _parse_json(_decode(path.read_bytes(), path), str(path))
    if isinstance(data, dict):
        data = data.get("data", data.get("rows"))
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {i}: expected an object, got {type(row).__name__}")
        yield f"{path}[{i}]", row


def _rows_csv(path: Path):
    """Strict CSV: an unterminated quote or a row with more or fewer fields than the header is an error."""
    reader = csv.reader(io.StringIO(_decode(path.read_bytes(), path), newline=""), strict=True)
    header: list[str] | None = None
    start = 1
    try:
        for row in reader:
            where = f"{path}:{start}"
            if header is None:
                header = row
            elif row:  # blank lines are skipped
                if len(row) != len(header):
                    raise DataError(f"{where}: {len(row)} fields, the header has {len(header)} "
                                    f"({', '.join(header)}); quote fields that contain commas")
                yield where, dict(zip(header, row))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}:{start}: malformed CSV ({exc}); a quoted field is probably not closed") from None


def _rows_parquet(path: Path):
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    for f in files:
        try:
            table = pq.read_table(f)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError; ArrowIOError an OSError
            raise DataError(f"{f}: not a readable Parquet file ({str(exc).splitlines()[0][:200]}); give a Parquet "
                            "file, or the file's real extension (.jsonl, .json, .csv)") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"{f}:row {i}", row


def _rows_hf(spec: str, split: str):
    import datasets

    name = spec.removeprefix("hf:")
    ds = datasets.load_dataset(name, split=split)
    for i, row in enumerate(ds):
        yield f"{name}[{split}]:row {i}", dict(row)


def _rows_saved(path: Path, split: str):
    """A `Dataset.save_to_disk` / `DatasetDict.save_to_disk` directory (read with datasets.load_from_disk)."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    where = str(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: a saved DatasetDict without split '{split}' (data.split); it has: "
                            f"{', '.join(ds)}")
        ds, where = ds[split], f"{path}[{split}]"
    for i, row in enumerate(ds):
        yield f"{where}:row {i}", dict(row)


SAVED_DATASET_FILES = ("dataset_info.json", "state.json")  # Dataset.save_to_disk
SAVED_DICT_FILE = "dataset_dict.json"  # DatasetDict.save_to_disk


def _rows_dir(path: Path, split: str):
    if (path / SAVED_DICT_FILE).is_file() or all((path / f).is_file() for f in SAVED_DATASET_FILES):
        yield from _rows_saved(path, split)
        return
    if any(path.glob("*.parquet")):
        yield from _rows_parquet(path)
        return
    held = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(held[:10]) + (f", ... ({len(held)} entries)" if len(held) > 10 else "")
    raise DataError(f"{path}: a directory that is neither a saved dataset (Dataset.save_to_disk: dataset_info.json "
                    f"+ state.json; DatasetDict: dataset_dict.json) nor a folder of *.parquet files; it holds: "
                    f"{shown or 'nothing'}. Give one .jsonl/.json/.csv/.parquet file, such a directory, or hf:NAME")


def iter_rows(source: str | Path, split: str = "train"):
    """(location, row dict) pairs from JSONL / JSON / CSV / Parquet files, a `save_to_disk` dataset
    directory, a folder of Parquet files or `hf:dataset_name`."""
    spec = str(source)
    if spec.startswith("hf:"):
        yield from _rows_hf(spec, split)
        return
    path = Path(spec)
    if not path.exists():
        raise DataError(not_found(path))
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from _rows_dir(path, split)
        return
    readers = {".jsonl": _rows_jsonl, ".ndjson": _rows_jsonl, ".json": _rows_json, ".csv": _rows_csv,
               ".parquet": _rows_parquet}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type '{suffix}'; expected .jsonl, .json, .csv or .parquet")
    yield from readers[suffix](path)


def content_text(content: Any, where: str, key: str) -> str:
    """A chat message's content as text: a string, or OpenAI's list of parts (`[{"type": "text", "text": ...}]`)
    whose text parts are joined. Null content and non-text parts (images, audio) are refused, naming `key`."""
    if isinstance(content, str):
        return content
    if isinstance(content, (int, float)) and not isinstance(content, bool):  # a bare number, as before
        return str(content)
    if content is None:
        raise DataError(f"{where}: field {key} is null; expected a string (or a list of text parts)")
    if not isinstance(content, list):
        raise DataError(f"{where}: field {key} is a {type(content).__name__}; expected a string (or a list of "
                        f"text parts), got {short_repr(content)}")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise DataError(f"{where}: field {key}[{i}] is a '{kind}' part; only text parts "
                            '({"type": "text", "text": "..."}) can be distilled: drop the others')
        texts.append(part["text"])
    return "".join(texts)


def _check_messages(messages: Any, where: str, field_name: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{field_name}' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: field '{field_name}'[{j}] must be an object with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{where}: field '{field_name}'[{j}].role is {short_repr(m['role'], 60)}; expected "
                            "system/user/assistant")
    return [{"role": str(m["role"]), "content": content_text(m["content"], where, f"'{field_name}'[{j}].content")}
            for j, m in enumerate(messages)]


def _last_assistant(messages: Any, where: str = "", key: str = "completion") -> str | None:
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "assistant":
        return content_text(messages[-1].get("content", ""), where, f"'{key}'[{len(messages) - 1}].content")
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_writable(value: Any, where: str, key: str) -> None:
    """Every string of a row can be written as UTF-8: a lone surrogate (valid JSON: "\\ud800" without its pair)
    would pass here and fail when the store writes its shard, costing the other rows of that shard on every rerun."""
    if isinstance(value, str):
        bad = _SURROGATE.search(value)
        if bad:
            raise DataError(f"{where}: field {key} holds a lone surrogate (\\u{ord(bad.group()):04x} at character "
                            f"{bad.start()}), which is not text and cannot be written as UTF-8; fix or drop that "
                            "character (a \\uXXXX escape without its pair)")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_writable(k, where, f"{key} key")
            _check_writable(v, where, f"{key}.{k}" if key else f"'{k}'")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_writable(v, where, f"{key}[{i}]")


def record_from_row(row: dict, where: str, cfg: DataConfig) -> Record:
    """Validate one row into a Record; `where` is 'file:line' for the error message.

    Conversational SFT rows (`messages` ending with an assistant turn) give that turn as `response` and the
    turns before it as the prompt; TRL-style rows (`prompt` + `completion`, as text or as message lists) give
    `completion` as the response."""
    _check_writable(row, where, "")
    messages = row.get(cfg.messages_field)
    prompt = row.get(cfg.prompt_field)
    field_name = cfg.messages_field
    if (messages is None or messages == "") and isinstance(prompt, list):  # TRL conversational prompt
        messages, prompt, field_name = prompt, None, cfg.prompt_field
    response = None
    completion = row.get("completion")
    if isinstance(completion, str) and completion:
        response = completion
    elif isinstance(completion, list):
        response = _last_assistant(completion, where)
    if messages is not None and messages != "":
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                raise DataError(f"{where}: field '{field_name}' is a string but not JSON messages") from None
        messages = _check_messages(messages, where, field_name)
        last = _last_assistant(messages, where, field_name)
        if last is not None:
            if len(messages) == 1:
                raise DataError(f"{where}: field '{field_name}' has only an assistant turn; a prompt needs a "
                                "user turn before it")
            messages, response = messages[:-1], response or last
        prompt = None
    elif prompt is None and cfg.prompt_field in row:
        raise DataError(f"{where}: field '{cfg.prompt_field}' is null; expected a string (or '{cfg.messages_field}': "
                        "a list of chat messages)")
    elif prompt is None:
        raise DataError(
            f"{where}: missing field '{cfg.prompt_field}' (or '{cfg.messages_field}'); "
            f"fields present: {_names(row)}"
        )
    elif not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field '{cfg.prompt_field}' must be a non-empty string, got {short_repr(prompt)}")
    reference = row.get(cfg.reference_field) if cfg.reference_field else None
    rid = row.get(cfg.id_field) if cfg.id_field else None
    used = {cfg.prompt_field, cfg.messages_field, cfg.reference_field, cfg.id_field}
    extra = {k: v for k, v in row.items() if k not in used}
    return Record(
        prompt=prompt,
        messages=messages if prompt is None else None,
        reference=None if reference is None else str(reference),
        response=response,
        id=None if rid is None else str(rid),
        extra=extra,
        source=where,
    )


def _names(row: dict, most: int = 20) -> str:
    names = [str(k)[:60] for k in row]
    more = f", ... ({len(names) - most} more)" if len(names) > most else ""
    return ", ".join(names[:most]) + more or "none"


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


def fit_prompt(text: str, where: str, tokenizer, limit: int, truncate: bool, add_special_tokens: bool,
               why: str = "") -> tuple[str, bool]:
    """The prompt text if it has at most `limit` tokens; else a DataError naming file:line and the limit, or,
    with data.truncate, the prompt cut from the start (the question and the generation prompt at its end
    stay) and True."""
    n = len(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    if n <= limit:
        return text, False
    if not truncate:
        raise DataError(f"{where}: the prompt is {n} tokens, over the limit of {limit}{why}; shorten it, or set "
                        "data.truncate=true to cut long prompts from the start")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = max(1, limit - (n - len(ids)))
    for _ in range(4):  # decode -> encode may not round-trip exactly: cut a little more until it fits
        cut = tokenizer.decode(ids[-keep:])
        over = len(tokenizer(cut, add_special_tokens=add_special_tokens)["input_ids"]) - limit
        if over <= 0:
            return cut, True
        keep = max(1, keep - over)
    return cut, True


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
