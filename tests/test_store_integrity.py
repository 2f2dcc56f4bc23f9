"""Store integrity (issue 21): shards record their settings, damage is one line naming the file, one writer per
worker id, and a row that cannot be stored never costs the other rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from test_store import META, _row  # tests/ is on sys.path (pytest rootdir-relative imports)

from distill.store import RowError, Store, StoreError, StoreReader, read_store, shard_files

OTHER = {"teacher": "hf:tiny", "params": {"max_new_tokens": 16}}


def _store(path, meta=META, n=4, shard_rows=2, start=0):
    with Store(path, shard_rows=shard_rows, meta=meta) as store:
        for i in range(start, start + n):
            store.add(_row(i, key=f"{json.dumps(meta['params'])}-{i}"))
    return path


def _done_keys(path, meta=META):
    """What generate does first: the keys already in the store."""
    with Store(path, meta=meta) as store:
        return store.done_keys()


def _read_all(path):
    """What training does: index the store, then decode every row of every column."""
    return [row for row in StoreReader(path)]


def test_a_shard_from_another_store_is_named(tmp_path):
    a, b = _store(tmp_path / "a"), _store(tmp_path / "b", OTHER)
    stray = shard_files(b)[0]
    shutil.copy(stray, a / "shards" / stray.name.replace("w000of001", "w009of010"))
    for use in (lambda: _done_keys(a), lambda: StoreReader(a), lambda: read_store(a)):
        with pytest.raises(StoreError, match=r"w009of010.*other settings.*max_new_tokens: 16 vs 8.*remove it"):
            use()
    (a / "shards" / stray.name.replace("w000of001", "w009of010")).unlink()  # the advice: remove it and rerun
    assert len(_read_all(a)) == 4 and len(_done_keys(a)) == 4


@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
def test_without_store_json_the_shards_still_refuse_other_settings(tmp_path, damage):
    _store(tmp_path)
    if damage == "deleted":
        (tmp_path / "store.json").unlink()
    else:
        (tmp_path / "store.json").write_text("{not json")
    with pytest.raises(StoreError, match="other settings.*max_new_tokens: 8 vs 16"):
        Store(tmp_path, meta=OTHER)
    Store(tmp_path, meta=META).close()  # the same settings: store.json is written again
    assert json.loads((tmp_path / "store.json").read_text())["params"] == META["params"]
    with pytest.raises(StoreError, match="other settings"):
        Store(tmp_path, meta=OTHER)


def _flip_in_column(path, column: str) -> None:
    """Flip one bit inside the data of `column`'s first column chunk."""
    md = pq.ParquetFile(path).metadata
    names = [md.schema.column(i).path.split(".")[0] for i in range(md.num_columns)]
    chunk = md.row_group(0).column(names.index(column))
    start = chunk.dictionary_page_offset or chunk.data_page_offset  # the chunk starts with its dictionary
    at = start + chunk.total_compressed_size - 3  # inside the last page's data, past its header
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["empty", "truncated", "bit flip"])
def test_a_damaged_shard_is_one_line_naming_it(tmp_path, damage):
    _store(tmp_path, n=6)
    bad = shard_files(tmp_path)[1]
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    else:
        _flip_in_column(bad, "key")
    for use in (lambda: _done_keys(tmp_path), lambda: _read_all(tmp_path),
                lambda: read_store(tmp_path)):
        with pytest.raises(StoreError, match="remove it and rerun") as err:
            use()
        assert str(bad) in str(err.value) and "\n" not in str(err.value)
    bad.unlink()
    assert len(_read_all(tmp_path)) == 4


def test_a_bit_flip_in_a_top_k_page_is_caught_on_read(tmp_path):
    _store(tmp_path, n=2)
    (bad,) = shard_files(tmp_path)
    _flip_in_column(bad, "topk_logprobs")
    reader = StoreReader(tmp_path, columns=["key", "topk_logprobs"])  # the index (keys) is intact
    with pytest.raises(StoreError, match=f"{bad.name}: shard is damaged.*remove it and rerun"):
        reader[0]


def test_second_writer_of_one_worker_is_refused(tmp_path):
    first = Store(tmp_path, meta=META)
    with pytest.raises(StoreError, match=rf"process {os.getpid()} is writing this store.*--shard"):
        Store(tmp_path, meta=META)
    Store(tmp_path, meta=META, worker="w001of002").close()  # another worker id: its own shards
    first.close()
    Store(tmp_path, meta=META).close()  # released on close


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    code = ("import sys, os; from distill.store import Store; s = Store(sys.argv[1]); s.add({**{'key': 'k', "
            "'index': 0, 'prompt': 'p', 'response': 'r', 'finish_reason': 'stop', 'teacher': 't'}}); "
            "s.flush(); os._exit(0)")  # dies holding the lock, without close()
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    assert (tmp_path / ".w000of001.lock").read_text().strip().isdigit()  # its pid is still in the file
    with Store(tmp_path) as store:
        assert store.done_keys() == {"k"}


def test_a_row_that_cannot_be_stored_costs_no_other_row(tmp_path):
    bad = {**_row(2), "reference": "x\ud800y", "source": "prompts.jsonl:3"}  # valid JSON, not UTF-8
    with Store(tmp_path, shard_rows=3, meta=META) as store:
        store.add(_row(0))
        store.add(_row(1))
        with pytest.raises(RowError, match=r"prompts.jsonl:3: field 'reference' is not valid Unicode"):
            store.add(bad)
        store.add(_row(3))  # fills the shard: written with the three good rows
        store.add(_row(4))
    assert [r["index"] for r in read_store(tmp_path)] == [0, 1, 3, 4]


def test_unwritable_rows_found_by_arrow_are_left_out_of_the_shard(tmp_path, monkeypatch):
    """Should Arrow refuse a row that `add` let through, flush writes the others and names that one."""
    from distill.store import rows

    monkeypatch.setattr(rows, "_check_text", lambda record: None)  # as if the check missed something
    refused = pytest.raises(RowError, match=r"1 row\(s\) could not be stored.*prompts.jsonl:2")
    with refused, Store(tmp_path, shard_rows=10, meta=META) as store:
        store.add(_row(0))
        store.add({**_row(1), "response": "\udcff", "source": "prompts.jsonl:2"})
        store.add(_row(2))
    assert [r["index"] for r in read_store(tmp_path)] == [0, 2]
