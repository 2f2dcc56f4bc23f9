"""The teacher store: Parquet shards + manifest, resumable and safe against kill -9 (see `shards`)."""

from distill.store.integrity import RowError, StoreError
from distill.store.reader import StoreReader
from distill.store.shards import (
    Store,
    iter_keys,
    manifest,
    read_store,
    row_key,
    shard_files,
    store_stats,
)

__all__ = ["RowError", "Store", "StoreError", "StoreReader", "iter_keys", "manifest", "read_store", "row_key", "shard_files", "store_stats"]
