"""Streaming, random-access reader of a teacher store: rows by index, never the whole store in memory.

`StoreReader(path)[i]` is row i of `read_store(path)` (same fields, same order: prompt order, a key written
twice read once), but only an index lives in memory: one int64 position per row. A row is decoded from its
Parquet row group on demand; a small LRU of decoded row groups (bounded in bytes) serves neighbours, so a
sequential walk decodes each group once and a shuffled one decodes one small group per row (the writer
keeps row groups to `ROW_GROUP_ROWS` rows for this).

Under torchrun / Accelerate every rank opens its own reader and the Trainer's DistributedSampler hands it
only its share of indices, so no process decodes rows it does not train on.

Run as: `rows = StoreReader("runs/x/teacher", columns=["prompt", "response"]); rows[0]["response"]`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distill.store.integrity import check_settings, damaged, open_shard, read_settings, read_shard
from distill.store.rows import SCHEMA
from distill.store.shards import shard_files

LIST_DTYPES = {"prompt_ids": np.int64, "response_ids": np.int64, "topk_ids": np.int32,
               "topk_logprobs": np.float32, "tail": np.float32}
ALL_COLUMNS = tuple(f.name for f in SCHEMA)
SHAPE_COLUMNS = ("n_tokens", "k")  # needed to reshape top-k columns


class StoreReader:
    """Map-style view of a store's rows: `len(reader)`, `reader[i]` -> row dict (see `read_store`).

    columns: the fields to decode (default: those of a `read_store` row).
    cache_bytes: budget of the decoded row-group LRU (per reader, i.e. per process).
    """

    def __init__(self, path: str | Path, columns: Sequence[str] | None = None, cache_bytes: int = 32 << 20,
                 _index: tuple | None = None):
        self.path = Path(path)
        if not (self.path / "shards").is_dir():
            raise FileNotFoundError(f"{self.path}: not a teacher store (no shards/ directory); run `distill generate`")
        cols = [c for c in ALL_COLUMNS if c not in SHAPE_COLUMNS] if columns is None else list(columns)
        unknown = sorted(set(cols) - set(ALL_COLUMNS))
        if unknown:
            raise ValueError(f"unknown store columns {unknown}; known: {', '.join(ALL_COLUMNS)}")
        # n_tokens and k reshape the top-k columns: decoded when needed, shown only when asked for
        self._hidden = tuple(c for c in SHAPE_COLUMNS if c not in cols)
        if any(c in ("topk_ids", "topk_logprobs", "topk_tokens") for c in cols):
            cols += list(self._hidden)
        self.columns = tuple(cols)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[int, int], tuple[dict, int]] = OrderedDict()
        self._cached = 0
        self._handles: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        if _index is None:
            _index = _build_index(shard_files(self.path), read_settings(self.path))
        self._files, self._file_starts, self._group_starts, self._pos = _index

    def with_columns(self, columns: Sequence[str] | None) -> StoreReader:
        """Another reader of the same rows (the index is shared, not rebuilt) decoding other columns."""
        return StoreReader(self.path, columns, self.cache_bytes,
                           _index=(self._files, self._file_starts, self._group_starts, self._pos))

    def __len__(self) -> int:
        return len(self._pos)

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> dict:
        n = len(self._pos)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for a store of {n} rows")
        pos = int(self._pos[i])
        f = int(np.searchsorted(self._file_starts, pos, side="right")) - 1
        in_file = pos - int(self._file_starts[f])
        starts = self._group_starts[f]
        g = int(np.searchsorted(starts, in_file, side="right")) - 1
        row = _row_at(self._group(f, g), in_file - int(starts[g]))
        for c in self._hidden:
            row.pop(c, None)
        return row

    def values(self, column: str) -> np.ndarray:
        """A scalar column (index, n_tokens, k) for every row, in reader order, read shard by shard."""
        if column not in ("index", "n_tokens", "k"):
            raise ValueError(f"'{column}' is not a numeric scalar column")
        parts = [read_shard(f, [column]).column(column).to_numpy().astype(np.int64) for f in self._files]
        return (np.concatenate(parts) if parts else np.zeros(0, np.int64))[self._pos]

    def list_lengths(self, column: str) -> np.ndarray:
        """Length of a list column for every row, in reader order; -1 where the value is null."""
        if column not in LIST_DTYPES and column not in ("response_tokens", "topk_tokens"):
            raise ValueError(f"'{column}' is not a list column")
        parts = []
        for f in self._files:  # one shard's column at a time (ids columns: small next to the top-k ones)
            col = read_shard(f, [column]).column(column)
            parts.append(pc.list_value_length(col).fill_null(-1).to_numpy().astype(np.int64))
        flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return flat[self._pos]

    # -- decoding
    def _handle(self, f: int) -> pq.ParquetFile:
        h = self._handles.get(f)
        if h is None:
            h = open_shard(self._files[f])
            self._handles[f] = h
            if len(self._handles) > 32:  # bounded number of open files
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(f)
        return h

    def _group(self, f: int, g: int) -> dict:
        hit = self._cache.get((f, g))
        if hit is not None:
            self._cache.move_to_end((f, g))
            return hit[0]
        try:
            table = self._handle(f).read_row_group(g, columns=list(self.columns))
        except (pa.ArrowException, OSError, ValueError) as exc:  # a page whose checksum fails: name the file
            raise damaged(self._files[f], exc) from None
        group = _decode_group(table)
        size = table.nbytes
        self._cache[(f, g)] = (group, size)
        self._cached += size
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, (_, s) = self._cache.popitem(last=False)
            self._cached -= s
        return group

    def __getstate__(self) -> dict:  # DataLoader workers: ship the index, not open files or the cache
        state = dict(self.__dict__)
        state["_cache"], state["_cached"], state["_handles"] = OrderedDict(), 0, OrderedDict()
        return state


def _build_index(files: list[Path], settings: dict | None = None
                 ) -> tuple[list[Path], np.ndarray, list[np.ndarray], np.ndarray]:
    """(files, first global position of each file, row-group starts per file, global position of each row).

    Every shard must record `settings` (store.json's; None: the shards must agree with each other).

    Duplicates: the first occurrence in file order wins (as `read_store`); rows sorted by (index, key)."""
    keys, idx, file_starts, group_starts = [], [], [0], []
    for f in files:
        t = read_shard(f, ["key", "index"])
        settings = check_settings(f, t.schema, settings)
        keys.append(t.column("key").to_numpy(zero_copy_only=False))
        idx.append(t.column("index").to_numpy().astype(np.int64))
        file_starts.append(file_starts[-1] + t.num_rows)
        md = open_shard(f).metadata
        sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        group_starts.append(np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))
    if not keys:
        return files, np.zeros(1, np.int64), [], np.zeros(0, np.int64)
    all_keys, all_idx = _fixed_width(np.concatenate(keys)), np.concatenate(idx)
    _, first = np.unique(all_keys, return_index=True)  # position of each key's first occurrence
    order = np.lexsort((all_keys[first], all_idx[first]))  # by index, then key
    return files, np.asarray(file_starts, np.int64), group_starts, first[order].astype(np.int64)


def _fixed_width(keys: np.ndarray) -> np.ndarray:
    """Keys as a fixed-width array to sort: 1 byte per character when ASCII (hash keys are), else unicode."""
    try:
        return keys.astype(np.bytes_)
    except UnicodeEncodeError:
        return keys.astype(str)


def _decode_group(table: pa.Table) -> dict[str, Any]:
    """Per column: ('list', offsets, flat numpy values, valid) for numeric lists, else the Arrow array."""
    out: dict[str, Any] = {}
    for name in table.column_names:
        arr = table.column(name).combine_chunks()
        if name in LIST_DTYPES:
            valid = ~arr.is_null().to_numpy(zero_copy_only=False)
            offsets = arr.offsets.to_numpy()
            flat = arr.values.to_numpy(zero_copy_only=False)
            out[name] = ("list", offsets, flat, valid)
        else:
            out[name] = arr
    return out


def _row_at(group: dict[str, Any], r: int) -> dict:
    """Row r of a decoded group, shaped as a `read_store` row (only the decoded columns)."""
    row: dict[str, Any] = {}
    for name, col in group.items():
        if isinstance(col, tuple):
            _, offsets, flat, valid = col
            row[name] = np.asarray(flat[offsets[r]:offsets[r + 1]], dtype=LIST_DTYPES[name]) if valid[r] else None
        else:
            row[name] = col[r].as_py()
    n, k = row.get("n_tokens"), row.get("k")
    for name in ("topk_ids", "topk_logprobs"):
        if row.get(name) is not None:
            row[name] = row[name].reshape(n, k)
    if row.get("topk_tokens") is not None:
        tok = row["topk_tokens"]
        row["topk_tokens"] = [tok[j * k:(j + 1) * k] for j in range(n)]
    for name in ("prompt_ids", "response_ids"):
        if row.get(name) is not None:
            row[name] = row[name].tolist()
    if row.get("messages") is not None:
        row["messages"] = json.loads(row["messages"])
    return row
