"""The teacher store: Parquet shards + manifest, resumable and safe against kill -9 (see `shards`)."""

from distill.store.reader import StoreReader
from distill.store.shards import (
    Store,
    StoreError,
    iter_keys,
    manifest,
    read_store,
    row_key,
    shard_files,
    store_stats,
)

__all__ = ["Store", "StoreError", "StoreReader", "iter_keys", "manifest", "read_store", "row_key", "shard_files", "store_stats"]
