"""The streaming store reader and the lazy training examples: the same rows, examples, weights and resumed
batches as the old in-memory path (`read_store` + a list of examples), without holding the rows."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import save_sharp_teacher

from distill.config import load_config
from distill.data.batching import encode_example, tokenize_pair
from distill.data.prompts import DataError
from distill.data.store_examples import StoreExamples
from distill.store import shards
from distill.store.reader import StoreReader
from distill.store.shards import Store, read_store, row_key

META = {"teacher": "hf:tiny", "params": {"top_k": 4}}


def _row(i: int, n: int | None = None, k: int = 4, ids: bool = True, key: str | None = None) -> dict:
    rng = np.random.default_rng(i)
    n = n or int(rng.integers(1, 9))
    lp = np.log(rng.dirichlet(np.ones(50), size=n))
    top = np.argsort(-lp, axis=-1)[:, :k]
    vals = np.take_along_axis(lp, top, -1)
    row = {
        "key": key or row_key(f"p{i}", None, "hf:tiny", {}), "index": i, "prompt": f"prompt {i}",
        "messages": [{"role": "user", "content": f"p{i}"}] if i % 3 == 0 else None, "reference": str(i),
        "response": f"answer {i}", "reasoning": f"because {i}" if i % 2 else None,
        "finish_reason": "stop", "teacher": "hf:tiny",
    }
    if ids:
        row.update(prompt_ids=[1] + [5 + (i + j) % 40 for j in range(int(rng.integers(1, 12)))],
                   response_ids=[int(t) for t in top[:, 0]], topk_ids=top, topk_logprobs=vals,
                   tail=1 - np.exp(vals).sum(-1))
    else:  # an API row: token strings only
        row.update(response_tokens=[f"t{t}" for t in top[:, 0]], topk_tokens=[[f"t{t}" for t in r] for r in top],
                   topk_logprobs=vals, tail=1 - np.exp(vals).sum(-1))
    return row


def _messy_store(path, n: int = 150) -> None:
    """Two workers, rows added out of order, a duplicate key in both workers, multi-row-group shards, k 4 and 6."""
    rows = [_row(i, k=4 if i % 5 else 6, ids=i % 7 != 3) for i in range(n)]
    order = list(range(n))
    random.Random(0).shuffle(order)
    with Store(path, shard_rows=70, worker="w000of002", meta=META) as a, \
            Store(path, shard_rows=45, worker="w001of002", meta=META) as b:
        for j, i in enumerate(order):
            (a if j % 2 else b).add(rows[i])
        a.add(rows[order[0]])  # the same key written by the other worker too
        b.add({**_row(999), "index": 5, "key": "zz-same-index-other-key"})  # ties on index sort by key


def _assert_rows_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        if isinstance(w, np.ndarray):
            assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape, name
            np.testing.assert_array_equal(g, w)
        else:
            assert g == w, name


def test_reader_rows_equal_read_store(tmp_path):
    _messy_store(tmp_path)
    old = read_store(tmp_path)
    reader = StoreReader(tmp_path, cache_bytes=20_000)  # a tiny cache: evictions on the way
    assert len(reader) == len(old) == 151
    assert [r["index"] for r in old][:7] == [0, 1, 2, 3, 4, 5, 5]
    for i in [*range(len(old)), *random.Random(1).sample(range(len(old)), 60)]:  # in order, then shuffled
        _assert_rows_equal(reader[i], old[i])
    assert any(reader[i]["topk_tokens"] is not None for i in range(len(old)))
    sub = reader.with_columns(["index", "topk_ids"])
    assert set(sub[0]) == {"index", "topk_ids"}
    np.testing.assert_array_equal(sub[10]["topk_ids"], old[10]["topk_ids"])
    lengths = reader.list_lengths("prompt_ids")
    assert lengths.tolist() == [-1 if r["prompt_ids"] is None else len(r["prompt_ids"]) for r in old]
    with pytest.raises(IndexError):
        reader[len(old)]


def test_reader_reads_stores_with_one_row_group_per_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "ROW_GROUP_ROWS", 1 << 20)  # stores written before small row groups
    _messy_store(tmp_path, n=60)
    old, reader = read_store(tmp_path), StoreReader(tmp_path)
    for i in range(len(old)):
        _assert_rows_equal(reader[i], old[i])


def _old_examples(path, tokenizer, max_length, same_tokenizer, want_topk, tail=True) -> list[dict]:
    """The in-memory path before streaming (train._examples_from_store on read_store), kept as the reference."""
    out = []
    for row in read_store(path):
        if same_tokenizer and row.get("prompt_ids") is not None and row.get("response_ids") is not None:
            topk = want_topk and row.get("topk_ids") is not None
            ex = encode_example(row["prompt_ids"], row["response_ids"], max_length,
                                row["topk_ids"] if topk else None, row["topk_logprobs"] if topk else None,
                                row.get("tail") if topk and tail else None)
        else:
            assert not want_topk
            ex = tokenize_pair(tokenizer, row["prompt"], row["response"], max_length)
        if ex is not None:
            out.append(ex)
    return out


def _assert_examples_equal(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for name in w:
            if isinstance(w[name], np.ndarray):
                np.testing.assert_array_equal(g[name], w[name])
                assert g[name].dtype == w[name].dtype
            else:
                assert g[name] == w[name]


def test_lazy_examples_equal_the_in_memory_ones(tmp_path, tokenizer):
    with Store(tmp_path, shard_rows=40, meta=META) as store:
        for i in range(100):
            store.add(_row(i))
    for max_length in (8, 64):  # 8: long prompts give no example and are dropped
        for tail in (True, False):
            got = StoreExamples(tmp_path, tokenizer, max_length, True, True, tail=tail)
            _assert_examples_equal(list(got), _old_examples(tmp_path, tokenizer, max_length, True, True, tail))
    assert 0 < len(StoreExamples(tmp_path, tokenizer, 8, True, True)) < 100
    text = StoreExamples(tmp_path, tokenizer, 64, False, False)  # another tokenizer: text rows, tokenised
    _assert_examples_equal(list(text), _old_examples(tmp_path, tokenizer, 64, False, False))


def test_offline_logit_rows_without_ids_are_a_clear_error(tmp_path, tokenizer):
    _messy_store(tmp_path, n=20)  # rows 3, 10, 17 are API rows with token strings only
    with pytest.raises(DataError, match=r"row 3 response, token 0: teacher token 't\d+' does not map to one token id.*uld"):
        StoreExamples(tmp_path, tokenizer, 64, True, True)
    with pytest.raises(DataError, match=r"row 0 has teacher token ids, but not in a tokenizer.*signal: none"):
        StoreExamples(tmp_path, tokenizer, 64, False, True)


# ------------------------------------------------------------------------------------ training on a store


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("sharp")
    return out, save_sharp_teacher(out, tokenizer, layers=2)


TEXTS = [f"Q: {a} + {b} = ? A: {a + b}. The answer is {a + b}." for a, b in
         [(12, 5), (20, 3), (9, 4), (15, 7), (30, 11), (8, 2), (44, 13), (17, 9), (3, 3), (61, 1), (7, 28)]]


def _teacher_store(path, teacher, tokenizer, k: int = 8) -> None:
    with Store(path, shard_rows=5, meta=META) as store:
        for i, text in enumerate(TEXTS):
            ex = tokenize_pair(tokenizer, text[:8], text[8:], 128)
            ids = torch.tensor([ex["input_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(teacher(ids).logits[0, :-1].float(), -1)[ex["prompt_len"] - 1:]
            top = logp.topk(k, dim=-1)
            store.add({"key": f"k{i}", "index": i, "prompt": text[:8], "response": text[8:],
                       "prompt_ids": ex["input_ids"][:ex["prompt_len"]],
                       "response_ids": ex["input_ids"][ex["prompt_len"]:],
                       "topk_ids": top.indices.numpy().astype("int32"), "topk_logprobs": top.values.numpy(),
                       "tail": (1 - top.values.exp().sum(-1)).clamp_min(0).numpy(),
                       "finish_reason": "stop", "teacher": "hf:tiny"})


def _offline_cfg(tmp_path, teacher_dir, store, run: str, **train):
    return load_config({
        "run_dir": str(tmp_path / run), "teacher": {"model": str(teacher_dir)},
        "student": {"init": "config", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                  "num_attention_heads": 4, "num_key_value_heads": 4}},
        "train": {"signal": "offline", "store": str(store), "max_steps": 6, "learning_rate": 3e-3,
                  "per_device_train_batch_size": 3, "logging_steps": 1, "save_steps": 1000,
                  "losses": [{"name": "forward_kl"}, {"name": "cross_entropy", "weight": 0.1}], **train},
    })


def _weights(out) -> dict:
    from distill.modeling import load_model

    return load_model(out).state_dict()


def test_offline_training_on_the_lazy_store_equals_the_in_memory_path(tmp_path, sharp_teacher, tokenizer,
                                                                         monkeypatch):
    import distill.training.train as train_mod

    teacher_dir, teacher = sharp_teacher
    _teacher_store(tmp_path / "store", teacher, tokenizer)
    (lazy_out,) = train_mod.train(_offline_cfg(tmp_path, teacher_dir, tmp_path / "store", "lazy",
                                               eval_fraction=0.2))
    assert isinstance(train_mod.build_examples(_offline_cfg(tmp_path, teacher_dir, tmp_path / "store", "x"),
                                               tokenizer, True), StoreExamples)
    monkeypatch.setattr(train_mod, "build_examples", lambda cfg, tok, same: _old_examples(
        tmp_path / "store", tok, cfg.train.max_length, same, True))
    (list_out,) = train_mod.train(_offline_cfg(tmp_path, teacher_dir, tmp_path / "store", "list",
                                               eval_fraction=0.2))
    logs = [json.loads((o / "train_log.json").read_text()) for o in (lazy_out, list_out)]
    losses = [[e["loss"] for e in log if "loss" in e] for log in logs]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
    a, b = _weights(lazy_out), _weights(list_out)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_resumed_offline_run_sees_the_same_batches(tmp_path, sharp_teacher, tokenizer):
    import shutil

    from distill.training.train import train

    teacher_dir, teacher = sharp_teacher
    _teacher_store(tmp_path / "store", teacher, tokenizer)
    cfg = _offline_cfg(tmp_path, teacher_dir, tmp_path / "store", "run", max_steps=6, save_steps=3,
                       num_train_epochs=2)
    (out,) = train(cfg)  # 6 steps straight through (checkpoints at 3 and 6)
    straight_log = json.loads((out / "train_log.json").read_text())
    straight = _weights(out)
    ckpts = tmp_path / "run" / "checkpoints" / "student"
    shutil.rmtree(ckpts / "checkpoint-6")
    shutil.rmtree(out)
    (out,) = train(cfg)  # as after a crash at step 4: resumes from checkpoint-3
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-3") and summary["global_steps"] == 6
    resumed_log = json.loads((out / "train_log.json").read_text())
    step_loss = [{e["step"]: e["loss"] for e in log if "loss" in e} for log in (straight_log, resumed_log)]
    assert [step_loss[1][s] for s in (4, 5, 6)] == [step_loss[0][s] for s in (4, 5, 6)]
    resumed = _weights(out)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-6, atol=1e-7)


def test_split_shuffles_indices_exactly_as_the_examples_were_shuffled(tmp_path, sharp_teacher):
    from distill.training.train import split_examples

    cfg = _offline_cfg(tmp_path, sharp_teacher[0], tmp_path, "r", eval_fraction=0.25)
    examples = [{"n": i} for i in range(23)]
    old = list(examples)
    random.Random(cfg.seed).shuffle(old)  # what training did before the examples became lazy
    train_set, eval_set = split_examples(cfg, examples, None)
    assert [eval_set[i] for i in range(len(eval_set))] == old[:5]
    assert [train_set[i] for i in range(len(train_set))] == old[5:]


def test_a_row_with_token_ids_but_top_k_strings_fails_when_read(tmp_path, tokenizer):
    row = _row(0)
    row.pop("topk_ids")
    row["topk_tokens"] = [[f"t{j}" for j in range(4)] for _ in row["response_ids"]]
    with Store(tmp_path, meta=META) as store:
        store.add(row)
        store.add(_row(1))
    examples = StoreExamples(tmp_path, tokenizer, 64, True, True)
    assert "topk_ids" in examples[1]
    with pytest.raises(DataError, match=r"row 0, top-k of token 0: teacher token 't0' does not map"):
        examples[0]


def test_examples_load_in_dataloader_workers_and_pickle_without_their_cache(tmp_path, tokenizer):
    import pickle

    from torch.utils.data import DataLoader

    from distill.data.batching import DistillCollator

    with Store(tmp_path, shard_rows=20, meta=META) as store:
        for i in range(40):
            store.add(_row(i))
    examples = StoreExamples(tmp_path, tokenizer, 64, True, True)
    examples[0]  # fills the readers' caches and open files
    clone = pickle.loads(pickle.dumps(examples))  # what a spawned worker gets: the index, no cache
    assert not clone.ids_reader._cache and not clone.ids_reader._handles
    _assert_examples_equal([clone[i] for i in range(len(clone))], list(examples))
    collate = DistillCollator(tokenizer.pad_token_id)
    plain = list(DataLoader(examples, batch_size=4, collate_fn=collate))
    workers = list(DataLoader(examples, batch_size=4, collate_fn=collate, num_workers=2))
    assert len(plain) == len(workers) == 10
    for a, b in zip(plain, workers):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_ascii_keys_dedupe_and_sort_like_read_store(tmp_path):
    with Store(tmp_path, shard_rows=2, meta=META) as store:
        for key, i in [("é-b", 1), ("a", 1), ("é-b", 1), ("ü", 0), ("b", 1)]:
            store.add({**_row(i), "key": key})
    old, reader = read_store(tmp_path), StoreReader(tmp_path)
    assert [r["key"] for r in old] == ["ü", "a", "b", "é-b"]
    assert [reader[i]["key"] for i in range(len(reader))] == [r["key"] for r in old]
