"""One store row -> one Parquet record: shapes checked, text checked, numbers packed compactly.

Everything that can make a row unstorable is found here, row by row, before the row joins a shard: a shard
is written whole or not at all, so one bad row must never reach `Store.flush` with finished rows beside it.

Run as: `record = to_record(row)` (raises `RowError`), then `table = records_table([record, ...])`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from distill.store.integrity import RowError

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("index", pa.int64()),
        ("prompt", pa.string()),
        ("messages", pa.string()),  # JSON text of the chat messages, or null
        ("reference", pa.string()),
        ("response", pa.string()),
        ("reasoning", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("response_tokens", pa.list_(pa.string())),  # API backends: the sampled tokens as strings
        ("n_tokens", pa.int32()),
        ("k", pa.int16()),
        ("topk_ids", pa.list_(pa.int32())),  # flattened (n_tokens * k); empty slot: id 0, logprob -inf
        ("topk_logprobs", pa.list_(pa.float16())),  # flattened (n_tokens * k); -inf where a slot is empty
        ("topk_tokens", pa.list_(pa.string())),  # API backends without token ids: flattened token strings
        ("tail", pa.list_(pa.float32())),  # (n_tokens,) = 1 - sum p_topk, clipped at 0
        ("finish_reason", pa.string()),
        ("teacher", pa.string()),
    ]
)

def _as_2d(value: Any, dtype, n: int | None, name: str) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim != 2:
        raise RowError(f"row field '{name}' must be a (n_tokens, k) array, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise RowError(f"row field '{name}' has {arr.shape[0]} rows but the response has {n} tokens")
    return arr


def to_record(row: dict) -> dict:
    """Normalise one row dict into the flat Parquet record (validating shapes)."""
    missing = [k for k in ("key", "index", "prompt", "response", "finish_reason", "teacher") if row.get(k) is None]
    if missing:
        raise RowError(f"store row is missing {missing}")
    ids = row.get("response_ids")
    tokens = row.get("response_tokens")
    n = len(ids) if ids is not None else (len(tokens) if tokens is not None else None)
    topk_ids = _as_2d(row.get("topk_ids"), np.int32, n, "topk_ids")
    topk_lp = _as_2d(row.get("topk_logprobs"), np.float32, n, "topk_logprobs")
    topk_tok = row.get("topk_tokens")
    k = 0
    for arr in (topk_ids, topk_lp):
        if arr is not None:
            k = arr.shape[1]
            n = arr.shape[0] if n is None else n
    if topk_tok is not None:
        topk_tok = [list(map(str, r)) for r in topk_tok]
        k = len(topk_tok[0]) if topk_tok else k
        if any(len(r) != k for r in topk_tok):
            raise RowError("row field 'topk_tokens' must have k entries per token")
    tail = row.get("tail")
    messages = row.get("messages")
    record = {
        "key": str(row["key"]),
        "index": int(row["index"]),
        "prompt": str(row["prompt"]),
        "messages": None if messages is None else json.dumps(messages, ensure_ascii=False),
        "reference": row.get("reference"),
        "response": str(row["response"]),
        "reasoning": row.get("reasoning"),
        "prompt_ids": None if row.get("prompt_ids") is None else [int(i) for i in row["prompt_ids"]],
        "response_ids": None if ids is None else [int(i) for i in ids],
        "response_tokens": None if tokens is None else [str(t) for t in tokens],
        "n_tokens": int(n if n is not None else (row.get("n_tokens") or 0)),  # API usage when no tokens
        "k": k,
        "topk_ids": None if topk_ids is None else topk_ids.reshape(-1),
        "topk_logprobs": None if topk_lp is None else topk_lp.astype(np.float16).reshape(-1),
        "topk_tokens": None if topk_tok is None else [t for r in topk_tok for t in r],
        "tail": None if tail is None else np.clip(np.asarray(tail, dtype=np.float32), 0.0, None).reshape(-1),
        "finish_reason": str(row["finish_reason"]),
        "teacher": str(row["teacher"]),
    }
    _check_text(record)
    return record


TEXT_COLUMNS = tuple(f.name for f in SCHEMA if f.type == pa.string() or f.type == pa.list_(pa.string()))


def _check_text(record: dict) -> None:
    """Every text field must encode as UTF-8 (Parquet's strings): a lone surrogate such as '\\ud800' (valid in
    JSON and Python, not in UTF-8) is refused here, before the row joins a shard whose other rows it would sink."""
    for name in TEXT_COLUMNS:
        value = record[name]
        if value is None:
            continue
        if not isinstance(value, (str, list)):
            raise RowError(f"field '{name}' must be text, got {type(value).__name__} {str(value)[:40]!r}")
        text = value if isinstance(value, str) else "\x00".join(map(str, value))
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = text[exc.start:exc.end][:4].encode("unicode_escape").decode()
            raise RowError(f"field '{name}' is not valid Unicode text ({bad} at character {exc.start}: "
                           f"{exc.reason}), so it cannot be stored") from None


def records_table(records: list[dict]) -> pa.Table:
    columns = {}
    for field in SCHEMA:
        values = [r[field.name] for r in records]
        if pa.types.is_list(field.type) and field.type.value_type in (pa.int32(), pa.float16(), pa.float32()):
            np_dtype = {pa.int32(): np.int32, pa.float16(): np.float16, pa.float32(): np.float32}[field.type.value_type]
            columns[field.name] = _numpy_list_array(values, np_dtype, field.type)
        else:
            columns[field.name] = pa.array(values, type=field.type)
    return pa.table(columns, schema=SCHEMA)


def _numpy_list_array(values: list, np_dtype, pa_type: pa.DataType) -> pa.Array:
    """A list<number> array built from numpy buffers (fast, and float16 without a Python detour)."""
    lengths = [0 if v is None else len(v) for v in values]
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    parts = [np.asarray(v, dtype=np_dtype) for v in values if v is not None]
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np_dtype)
    mask = pa.array([v is None for v in values], type=pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa_type.value_type), mask=mask)


def where(row: dict) -> str:
    return str(row.get("source") or f"row {row.get('index')}")


def table_without_bad_rows(records: list[dict]) -> tuple[pa.Table, list[dict], dict[str, str]]:
    """(table, the records in it, {source: reason} of those left out): should Arrow refuse a record beyond what
    `to_record` checks, the records are tried one by one and the refused ones left out, so they never cost
    the rest of the shard."""
    try:
        return records_table(records), records, {}
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        pass
    good, refused = [], {}
    for r in records:
        try:
            records_table([r])
            good.append(r)
        except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
            refused[r["source"]] = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    return records_table(good), good, refused
