"""The teacher store: round trip, compact columns, dedup across shards/workers, crash leftovers, identity."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from distill.store.shards import Store, StoreError, iter_keys, read_store, row_key, shard_files, store_stats

META = {"teacher": "hf:tiny", "params": {"max_new_tokens": 8}}


def _row(i: int, n: int = 3, k: int = 4, key: str | None = None) -> dict:
    rng = np.random.default_rng(i)
    logits = rng.normal(size=(n, 50))
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-lp, axis=-1)[:, :k]
    top = np.take_along_axis(lp, ids, -1)
    return {
        "key": key or row_key(f"prompt {i}", None, "hf:tiny", {"max_new_tokens": 8}),
        "index": i, "prompt": f"prompt {i}", "messages": [{"role": "user", "content": f"p{i}"}],
        "reference": str(i), "response": f"answer {i}", "reasoning": None,
        "prompt_ids": [1, 2, 3 + i], "response_ids": [int(t) for t in ids[:, 0]],
        "topk_ids": ids, "topk_logprobs": top, "tail": 1 - np.exp(top).sum(-1),
        "finish_reason": "length", "teacher": "hf:tiny",
    }


def test_round_trip_shapes_dtypes_and_order(tmp_path):
    rows = [_row(i) for i in range(7)]
    with Store(tmp_path, shard_rows=3, meta=META) as store:
        for r in reversed(rows):  # finish order differs from prompt order
            store.add(r)
    assert len(shard_files(tmp_path)) == 3  # 3 + 3 + 1
    out = read_store(tmp_path)
    assert [r["index"] for r in out] == list(range(7))
    for want, got in zip(rows, out):
        assert got["key"] == want["key"] and got["response"] == want["response"]
        assert got["messages"] == want["messages"] and got["prompt_ids"] == want["prompt_ids"]
        assert got["topk_ids"].dtype == np.int32 and got["topk_ids"].shape == (3, 4)
        assert got["topk_logprobs"].dtype == np.float32 and got["tail"].dtype == np.float32
        np.testing.assert_array_equal(got["topk_ids"], want["topk_ids"])
        np.testing.assert_allclose(got["topk_logprobs"], want["topk_logprobs"], atol=1e-2, rtol=1e-3)
        np.testing.assert_allclose(got["tail"], want["tail"], atol=1e-6)
        assert got["reasoning"] is None and got["topk_tokens"] is None


def test_parquet_columns_are_compact(tmp_path):
    with Store(tmp_path, shard_rows=100) as store:
        for i in range(20):
            store.add(_row(i, n=16, k=8))
    schema = pq.read_schema(shard_files(tmp_path)[0])
    assert str(schema.field("topk_ids").type.value_type) == "int32"
    assert str(schema.field("topk_logprobs").type.value_type) == "halffloat"
    stats = store_stats(tmp_path)
    assert stats["rows"] == 20 and stats["tokens"] == 20 * 16 and stats["k"] == 8
    assert 0 < stats["bytes_per_entry"] <= 6.5  # int32 id + float16 logprob, before compression


def test_done_keys_and_dedup_across_workers(tmp_path):
    rows = [_row(i) for i in range(6)]
    with Store(tmp_path, shard_rows=2, worker="w000of002", meta=META) as a:
        for r in rows[:4]:
            a.add(r)
    with Store(tmp_path, shard_rows=2, worker="w001of002", meta=META) as b:
        assert b.done_keys() == {r["key"] for r in rows[:4]}
        for r in rows[2:]:  # overlaps rows 2 and 3 (two workers given the same prompts)
            b.add(r)
    assert sum(1 for _ in iter_keys(tmp_path)) == 8
    out = read_store(tmp_path)
    assert [r["key"] for r in out] == [r["key"] for r in rows]
    assert store_stats(tmp_path)["rows"] == 6
    names = [p.name for p in shard_files(tmp_path)]
    assert sum(n.startswith("w000of002-") for n in names) == 2 and sum(n.startswith("w001of002-") for n in names) == 2


def test_crash_leftovers_lose_nothing(tmp_path):
    with Store(tmp_path, shard_rows=2, meta=META) as store:
        for i in range(4):
            store.add(_row(i))
    # a kill while writing: a half-written temp file; a kill before the manifest update: a shard it lacks
    (tmp_path / "shards" / ".w000of001-000009.tmp").write_bytes(b"PAR1 torn")
    (tmp_path / "manifest.w000of001.json").write_text(json.dumps({"shards": []}))
    assert len(read_store(tmp_path)) == 4
    store = Store(tmp_path, shard_rows=2, meta=META)  # reopening removes its own torn temp file
    assert not list((tmp_path / "shards").glob(".*.tmp"))
    assert len(store.done_keys()) == 4
    store.add(_row(4))
    store.close()
    assert len(read_store(tmp_path)) == 5
    assert len({p.name for p in shard_files(tmp_path)}) == 3  # the new shard got a fresh sequence number


def test_buffered_rows_are_flushed_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), Store(tmp_path, shard_rows=100, meta=META) as store:
        store.add(_row(0))
        raise RuntimeError("boom")
    assert len(read_store(tmp_path)) == 1


def test_store_refuses_other_settings(tmp_path):
    Store(tmp_path, meta=META).close()
    with pytest.raises(StoreError, match="params"):
        Store(tmp_path, meta={"teacher": "hf:tiny", "params": {"max_new_tokens": 16}})


def test_api_rows_keep_token_strings(tmp_path):
    row = {"key": "k1", "index": 0, "prompt": "p", "response": "ab", "finish_reason": "stop", "teacher": "openai:x",
           "response_tokens": ["a", "b"], "topk_tokens": [["a", "c"], ["b", ""]],
           "topk_logprobs": np.array([[-0.1, -2.5], [-0.2, -np.inf]]), "tail": np.array([0.0, 0.1])}
    with Store(tmp_path) as store:
        store.add(row)
    (got,) = read_store(tmp_path)
    assert got["topk_ids"] is None and got["response_ids"] is None
    assert got["response_tokens"] == ["a", "b"] and got["topk_tokens"] == [["a", "c"], ["b", ""]]
    assert got["topk_logprobs"].shape == (2, 2) and np.isneginf(got["topk_logprobs"][1, 1])


def test_bad_row_is_a_clear_error(tmp_path):
    bad = _row(0)
    bad["topk_ids"] = bad["topk_ids"][:2]
    with pytest.raises(StoreError, match="topk_ids"):
        Store(tmp_path).add(bad)


def test_key_depends_on_prompt_teacher_params_and_repeat():
    base = row_key("p", None, "hf:a", {"t": 0})
    assert base == row_key("p", None, "hf:a", {"t": 0})
    assert len({base, row_key("q", None, "hf:a", {"t": 0}), row_key("p", None, "hf:b", {"t": 0}),
                row_key("p", None, "hf:a", {"t": 1}), row_key("p", None, "hf:a", {"t": 0}, occurrence=1)}) == 5
