"""Shard integrity: every shard carries the settings it was made with, and a damaged or foreign shard is named.

A shard's Parquet schema metadata holds its store identity (teacher + generation parameters, as store.json),
so a shard copied in from another store, or a store whose store.json was deleted, is caught by the shards
themselves. Pages carry CRC checksums, verified on read: a 0-byte, truncated or bit-flipped shard is one line
naming the file and what to do (remove it and rerun generate: the store is keyed by row, so only that shard's
rows are generated again), never an Arrow traceback.

Run as: `table = read_shard(path, ["key"]); check_settings(path, table.schema, expected_settings(store))`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SETTINGS_KEY = b"distill.store"
REMOVE_AND_RERUN = "remove it and rerun `distill generate`: only its rows are generated again"


class StoreError(RuntimeError):
    """A store that cannot be used as asked (other generation settings, a bad row); says what to do."""


class RowError(StoreError):
    """One row that cannot be stored (bad shape, text that is not valid Unicode); the other rows are kept."""


def damaged(path: Path, exc: BaseException) -> StoreError:
    """The error for a shard Arrow cannot read: file, Arrow's reason (first line), what to do."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    reason = reason.replace(f"Could not open Parquet input source '{path}': ", "").replace(str(path), "it")[:200]
    size = path.stat().st_size if path.exists() else 0
    what = "empty (0 bytes)" if size == 0 else f"damaged or truncated ({reason})"
    return StoreError(f"{path}: shard is {what}; {REMOVE_AND_RERUN}")


def read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    """`pq.read_table` with page checksums verified; damage is a StoreError naming the file."""
    try:
        return pq.read_table(path, columns=columns, page_checksum_verification=True)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise damaged(Path(path), exc) from None


def open_shard(path: Path) -> pq.ParquetFile:
    """`pq.ParquetFile` with page checksums verified; an unreadable footer is a StoreError naming the file."""
    try:
        return pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise damaged(Path(path), exc) from None


def shard_metadata(settings: dict | None) -> dict[bytes, bytes] | None:
    """Schema metadata recording the settings a shard is made with (None: a store opened without settings)."""
    return None if settings is None else {SETTINGS_KEY: json.dumps(settings, sort_keys=True).encode()}


def shard_settings(schema: pa.Schema) -> dict | None:
    """The settings a shard records (None for shards written before shards recorded them)."""
    raw = (schema.metadata or {}).get(SETTINGS_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"unreadable settings": raw[:40].decode("latin-1")}


def read_settings(store: Path) -> dict | None:
    """store.json's settings; None when missing or unreadable (the shards then say what the store holds)."""
    try:
        data = json.loads((Path(store) / "store.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def settings_diff(have: dict, want: dict, prefix: str = "") -> list[str]:
    """'params.top_k: 4 vs 8' for every leaf that differs (have first)."""
    out = []
    for k in sorted(set(have) | set(want)):
        a, b = have.get(k), want.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {_short(a)} vs {_short(b)}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def check_settings(path: Path, schema: pa.Schema, want: dict | None) -> dict | None:
    """Refuse a shard made with other settings than `want`; returns what the next shard must match (`want`, or
    this shard's settings when `want` is None: without store.json the shards must agree with each other).
    Shards written before shards recorded their settings are taken as they are."""
    have = shard_settings(schema)
    if want is None or have is None or have == want:
        return want if want is not None else have
    diff = "; ".join(settings_diff(have, want)[:4])
    raise StoreError(
        f"{path}: shard made with other settings than this store ({diff}; shard vs store): it holds another "
        "setting's rows. If it was copied in by mistake, remove it and rerun `distill generate` (this store's "
        "missing rows are generated); to generate with these settings, set generate.store to a new directory"
    )
