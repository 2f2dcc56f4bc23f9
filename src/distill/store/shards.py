"""The teacher store: Parquet shards of teacher outputs plus a manifest, resumable and safe against kill -9.

Layout of a store directory:
    store.json                      teacher identity + generation parameters (a store holds one setting)
    shards/{worker}-{seq}-{rand}.parquet   finished shards; written to a hidden temp file, then renamed; each
                                    records the settings it was made with in its schema metadata
    manifest.{worker}.json          per-worker index of its shards (rows, tokens), replaced atomically
    .{worker}.lock                  held by the process writing as that worker (`distill.store.lock`)

The shard files are the source of truth: readers list `shards/*.parquet`, so a kill between a shard's
rename and its manifest update loses nothing, and N workers (`--shard i/n`, torchrun ranks) never write
the same file. Rows are keyed by a hash of (prompt, teacher, generation parameters); a rerun skips keys
already in a shard, and a key present twice (two workers, an overlapping rerun) is read once.

A shard made with other settings, or damaged (0 bytes, truncated, a flipped bit: pages carry checksums), is a
one-line `StoreError` naming the file (`distill.store.integrity`). A row that cannot be stored (text that is
not valid Unicode) is refused by `add()` before it joins a shard, so it never costs the other rows.

Sparse columns are compact: top-k ids int32 and logprobs float16, flattened per row with the row's `k`;
`read_store` reshapes them to (n_tokens, k) arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill.store.integrity import (
    RowError,
    StoreError,
    check_settings,
    open_shard,
    read_settings,
    read_shard,
    shard_metadata,
)
from distill.store.lock import StoreLock
from distill.store.rows import table_without_bad_rows, to_record, where

SCHEMA_VERSION = 1
ROW_GROUP_ROWS = 8  # small row groups: a random-access reader (store.reader) decodes 8 rows to get one
SPARSE_COLUMNS = ("topk_ids", "topk_logprobs", "topk_tokens")

def row_key(prompt: str, messages: Any, teacher: str, params: dict, occurrence: int = 0) -> str:
    """Content hash of one teacher output: same prompt + teacher + parameters -> same key.

    `occurrence` numbers repeats of one prompt in a corpus so duplicates each get a row, while reordering
    the corpus keeps every key.
    """
    blob = json.dumps(
        {"prompt": prompt, "messages": messages, "teacher": teacher, "params": params, "n": occurrence},
        sort_keys=True, ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def shard_files(path: str | Path) -> list[Path]:
    """Finished shard files of a store, in a stable order (hidden temp files are never listed)."""
    shards = Path(path) / "shards"
    return sorted(p for p in shards.glob("*.parquet") if not p.name.startswith("."))


# ---------------------------------------------------------------- writing


class Store:
    """Writer side of a store: `add()` rows as they finish; every `shard_rows` rows become one shard file.

    with Store(path, shard_rows=256, worker="w000of002", meta={...}) as store:
        todo = [p for p in prompts if p.key not in store.done_keys()]
        for row in ...: store.add(row)      # flushed in shards; close() flushes the rest

    `meta` (teacher identity + generation parameters) is written to store.json on first use and into every
    shard's metadata; opening a store written with different settings is an error, so one store never mixes
    two teachers or settings (a shard copied in from another store is named). The writer holds a lock on its
    worker id until `close()`: a second process writing as the same worker is refused.

    A row that cannot be stored raises `RowError` from `add()` and is not buffered; the other rows are kept.
    """

    def __init__(self, path: str | Path, shard_rows: int = 256, worker: str = "w000of001",
                 meta: dict | None = None):
        if shard_rows < 1:
            raise StoreError(f"shard_rows must be >= 1, got {shard_rows}")
        if not worker or any(c in worker for c in "/\\-. "):
            raise StoreError(f"worker id '{worker}' must be non-empty without '/', '-', '.', spaces")
        self.path = Path(path)
        self.shard_rows = shard_rows
        self.worker = worker
        self.shards_dir = self.path / "shards"
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        self._buffer: list[dict] = []
        self._done: set[str] | None = None
        self.rows_written = 0
        self.tokens_written = 0
        # as JSON reads it back (lists, not tuples), so it compares equal to what shards and store.json record
        self.settings = None if meta is None else json.loads(json.dumps({"schema_version": SCHEMA_VERSION, **meta}))
        self._lock = StoreLock(self.path, worker)
        self._lock.acquire()
        try:
            self._clean_own_temp_files()  # safe under the lock: no live process writes as this worker
            self._seq = self._next_seq()
            if meta is not None:
                self._check_meta()
        except BaseException:
            self._lock.release()
            raise

    # -- identity
    def _check_meta(self) -> None:
        wanted = self.settings
        have = read_settings(self.path)
        if have is not None and {k: have.get(k) for k in wanted} != wanted:
            diff = sorted(k for k in wanted if have.get(k) != wanted[k])
            raise StoreError(
                f"{self.path}: this store was written with other settings ({', '.join(diff)} differ: "
                f"{ {k: have.get(k) for k in diff} } vs { {k: wanted[k] for k in diff} }); "
                "set generate.store to a new directory, or delete the old store to regenerate"
            )
        if have is not None:
            return
        # store.json missing or unreadable (deleted, hand-edited): the shards' own settings must agree
        for f in shard_files(self.path):
            check_settings(f, open_shard(f).schema_arrow, wanted)
        _atomic_write_text(self.path / "store.json", json.dumps(wanted, indent=2, sort_keys=True))

    def _clean_own_temp_files(self) -> None:
        # Only this worker's: another worker may be writing its own temp file right now.
        for tmp in self.shards_dir.glob(f".{self.worker}-*.tmp"):
            tmp.unlink(missing_ok=True)

    def _next_seq(self) -> int:
        seqs = [int(p.name.split("-")[1]) for p in shard_files(self.path) if p.name.startswith(self.worker + "-")]
        return max(seqs, default=-1) + 1

    # -- reading what is done
    def done_keys(self) -> set[str]:
        """Keys of every finished row in the store (all workers), plus rows buffered in this writer."""
        if self._done is None:
            self._done = set()
            for f in shard_files(self.path):
                table = read_shard(f, ["key"])
                check_settings(f, table.schema, self.settings)
                self._done.update(table.column("key").to_pylist())
        return self._done | {r["key"] for r in self._buffer}

    # -- writing
    def add(self, row: dict) -> None:
        """Buffer one finished row; a full buffer is written as a shard at once. A row that cannot be stored
        raises `RowError` naming it (its `source`, else its index) and is left out; buffered rows stay."""
        try:
            record = to_record(row)
        except RowError as exc:
            raise RowError(f"{where(row)}: {exc}") from None
        record["source"] = where(row)  # not a column: names the row if Arrow still refuses it in flush()
        self._buffer.append(record)
        if len(self._buffer) >= self.shard_rows:
            self.flush()

    def flush(self) -> Path | None:
        """Write buffered rows as one shard: temp file, fsync, atomic rename, then the manifest."""
        if not self._buffer:
            return None
        table, self._buffer, refused = table_without_bad_rows(self._buffer)
        final = self._write(table) if self._buffer else None
        if refused:
            raise RowError(f"{len(refused)} row(s) could not be stored and were left out (the others are kept): "
                           + "; ".join(f"{k}: {v}" for k, v in list(refused.items())[:3]))
        return final

    def _write(self, table: pa.Table) -> Path:
        name = f"{self.worker}-{self._seq:06d}-{secrets.token_hex(3)}.parquet"
        # unique per process and attempt: two writers can never share a temp file
        tmp = self.shards_dir / f".{self.worker}-{self._seq:06d}-{os.getpid()}-{secrets.token_hex(3)}.tmp"
        table = table.replace_schema_metadata(shard_metadata(self.settings))
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS, write_page_checksum=True)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        final = self.shards_dir / name
        os.replace(tmp, final)
        _fsync_dir(self.shards_dir)
        tokens = int(sum(r["n_tokens"] for r in self._buffer))
        if self._done is not None:
            self._done.update(r["key"] for r in self._buffer)
        self.rows_written += len(self._buffer)
        self.tokens_written += tokens
        self._buffer = []
        self._seq += 1
        self._update_manifest(final, table.num_rows, tokens)
        return final

    def _update_manifest(self, shard: Path, rows: int, tokens: int) -> None:
        mpath = self.path / f"manifest.{self.worker}.json"
        entries = []
        if mpath.exists():
            try:
                entries = json.loads(mpath.read_text()).get("shards", [])
            except json.JSONDecodeError:
                entries = []
        entries.append({"file": f"shards/{shard.name}", "rows": rows, "tokens": tokens,
                        "bytes": shard.stat().st_size, "time": time.time()})
        _atomic_write_text(mpath, json.dumps({"worker": self.worker, "shards": entries}, indent=1))

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._lock.release()

    def __enter__(self) -> Store:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # also on errors: finished rows are never dropped


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- reading


def manifest(path: str | Path) -> list[dict]:
    """Every finished shard with its row count and size, derived from the shard files themselves.

    The per-worker manifest files may lag a killed writer by one shard; deriving it here means a kill -9
    between a shard's rename and its manifest update loses nothing."""
    out = []
    for f in shard_files(path):
        meta = open_shard(f).metadata
        out.append({"file": f"shards/{f.name}", "rows": meta.num_rows, "bytes": f.stat().st_size})
    return out


def _split(flat: np.ndarray | None, offsets: np.ndarray, valid: np.ndarray) -> list[np.ndarray | None]:
    if flat is None:
        return [None] * len(valid)
    return [flat[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(valid))]


def _list_column(table: pa.Table, name: str, dtype) -> list[np.ndarray | None]:
    arr = table.column(name).combine_chunks()
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
    offsets = np.asarray(arr.offsets.to_numpy())
    flat = np.asarray(arr.values.to_numpy(zero_copy_only=False)).astype(dtype, copy=False)
    return _split(flat, offsets, valid) if len(arr) else []  # offsets index .values, slices included


def _rows_of(table: pa.Table) -> list[dict]:
    plain = {name: table.column(name).to_pylist() for name in
             ("key", "index", "prompt", "messages", "reference", "response", "reasoning", "response_tokens",
              "topk_tokens", "n_tokens", "k", "finish_reason", "teacher")}
    prompt_ids = _list_column(table, "prompt_ids", np.int64)
    response_ids = _list_column(table, "response_ids", np.int64)
    topk_ids = _list_column(table, "topk_ids", np.int32)
    topk_lp = _list_column(table, "topk_logprobs", np.float32)
    tail = _list_column(table, "tail", np.float32)
    rows = []
    for i in range(table.num_rows):
        n, k = plain["n_tokens"][i], plain["k"][i]
        tok = plain["topk_tokens"][i]
        rows.append({
            "key": plain["key"][i],
            "index": plain["index"][i],
            "prompt": plain["prompt"][i],
            "messages": None if plain["messages"][i] is None else json.loads(plain["messages"][i]),
            "reference": plain["reference"][i],
            "response": plain["response"][i],
            "reasoning": plain["reasoning"][i],
            "prompt_ids": None if prompt_ids[i] is None else prompt_ids[i].tolist(),
            "response_ids": None if response_ids[i] is None else response_ids[i].tolist(),
            "response_tokens": plain["response_tokens"][i],
            "topk_ids": None if topk_ids[i] is None else topk_ids[i].reshape(n, k),
            "topk_logprobs": None if topk_lp[i] is None else topk_lp[i].reshape(n, k),
            "topk_tokens": None if tok is None else [tok[j * k:(j + 1) * k] for j in range(n)],
            "tail": tail[i],
            "finish_reason": plain["finish_reason"][i],
            "teacher": plain["teacher"][i],
        })
    return rows


def read_store(path: str | Path) -> list[dict]:
    """All finished rows of a store, merged over shards and workers, each key once, in prompt order.

    Everything in memory at once: for small stores and checks. Training and evaluation read a store with
    `distill.store.reader.StoreReader`, which gives the same rows by index without loading them all.

    Each row: key, index, prompt, messages, reference, response, reasoning, prompt_ids, response_ids,
    response_tokens, topk_ids (n_tokens, k) int32, topk_logprobs (n_tokens, k) float32, topk_tokens,
    tail (n_tokens,) float32, finish_reason, teacher. Row i of topk_* predicts response_ids[i].
    """
    path = Path(path)
    if not (path / "shards").is_dir():
        raise FileNotFoundError(f"{path}: not a teacher store (no shards/ directory); run `distill generate`")
    seen: set[str] = set()
    rows: list[dict] = []
    want = read_settings(path)
    for f in shard_files(path):
        table = read_shard(f)
        want = check_settings(f, table.schema, want)
        for row in _rows_of(table):
            if row["key"] in seen:
                continue
            seen.add(row["key"])
            rows.append(row)
    rows.sort(key=lambda r: (r["index"], r["key"]))
    return rows


def store_stats(path: str | Path) -> dict:
    """rows, tokens, k, bytes on disk and bytes per (token, k) top-k entry (ids + logprobs, compressed)."""
    files = shard_files(path)
    keys: set[str] = set()
    tokens = entries = sparse_bytes = total_bytes = 0
    k_seen: set[int] = set()
    for f in files:
        total_bytes += f.stat().st_size
        t = read_shard(f, ["key", "n_tokens", "k"])
        for key, n, k in zip(*(t.column(c).to_pylist() for c in ("key", "n_tokens", "k"))):
            if key in keys:
                continue
            keys.add(key)
            tokens += n
            entries += n * k
            if k:
                k_seen.add(k)
        md = open_shard(f).metadata
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                if col.path_in_schema.split(".")[0] in SPARSE_COLUMNS:
                    sparse_bytes += col.total_compressed_size
    return {
        "rows": len(keys),
        "tokens": tokens,
        "k": max(k_seen) if k_seen else 0,
        "shards": len(files),
        "bytes": total_bytes,
        "sparse_bytes": sparse_bytes,
        "bytes_per_entry": (sparse_bytes / entries) if entries else None,
    }


def iter_keys(path: str | Path) -> Iterable[str]:
    """Every key in every shard, duplicates included (for checks and tests of crash safety)."""
    for f in shard_files(path):
        yield from read_shard(f, ["key"]).column("key").to_pylist()
