"""kill -9 of `distill generate` at random moments, then a rerun: rows = prompts, no duplicates, and rows that
were finished before a kill are neither lost nor computed again."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from distill.store.shards import iter_keys, read_store, shard_files

N_PROMPTS = 48


def _start(cfg: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "distill.cli", "generate", str(cfg), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _snapshot(store: Path) -> dict[str, tuple[int, frozenset]]:
    return {p.name: (p.stat().st_mtime_ns, frozenset(pq.read_table(p, columns=["key"]).column("key").to_pylist()))
            for p in shard_files(store)}


def _kill_when(proc: subprocess.Popen, store: Path, min_shards: int, extra: float) -> bool:
    """Wait until `min_shards` shards exist (0: no wait), then `extra` seconds, then SIGKILL; True if killed."""
    deadline = time.monotonic() + 120
    while len(shard_files(store)) < min_shards and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(extra)
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    return True


def test_kill_minus_9_then_rerun_loses_and_repeats_nothing(tmp_path, teacher_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Q: Tom has {i} apples. He eats {i % 7}. How many now? A:"})
                               + "\n" for i in range(N_PROMPTS)))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({
        "run_dir": str(tmp_path / "run"), "teacher": {"model": str(teacher_dir)},
        "generate": {"input": str(prompts), "max_new_tokens": 8, "top_k": 4, "batch_size": 2, "shard_rows": 3},
    }))
    store = tmp_path / "run" / "teacher"
    rng = random.Random(1234)
    # a kill during start-up, then two kills at random moments once shards are being written
    plans = [(0, rng.uniform(0.0, 0.5)), (1, rng.uniform(0.0, 0.3)), (2, rng.uniform(0.0, 0.3))]
    killed_mid_run = 0
    for min_shards, extra in plans:
        before = _snapshot(store) if store.exists() else {}
        proc = _start(cfg)
        killed = _kill_when(proc, store, len(before) + min_shards if min_shards else 0, extra)
        after = _snapshot(store) if store.exists() else {}
        assert all(after[name] == snap for name, snap in before.items())  # finished shards untouched
        new_keys = [k for name, (_, keys) in after.items() if name not in before for k in keys]
        done_before = {k for _, keys in before.values() for k in keys}
        assert not done_before & set(new_keys)  # nothing finished was computed again
        killed_mid_run += killed and min_shards > 0 and len(after) > len(before)
        if not killed:
            break
    assert killed_mid_run >= 1, "no kill landed while shards were being written"

    before = _snapshot(store)
    done = len({k for _, keys in before.values() for k in keys})
    assert 0 < done < N_PROMPTS
    proc = _start(cfg, "--shard", "0/1")  # one worker of one: the same worker id as the killed runs
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert re.search(rf"{N_PROMPTS} prompts, {done} already in .*, {N_PROMPTS - done} to do", err, re.DOTALL), err
    assert out.strip().endswith(str(store))
    assert re.search(rf"store: {N_PROMPTS} rows, \d+ tokens, .* bytes per \(token, k\) entry \(k=4\)", err)
    after = _snapshot(store)
    assert all(after[name] == snap for name, snap in before.items())
    keys = list(iter_keys(store))
    assert len(keys) == len(set(keys)) == N_PROMPTS  # no duplicates even before read-time de-duplication
    rows = read_store(store)
    assert [r["index"] for r in rows] == list(range(N_PROMPTS))
    assert all(r["topk_ids"].shape == (len(r["response_ids"]), 4) for r in rows)
    assert not list((store / "shards").glob(".*.tmp"))


def test_workers_write_disjoint_shards_of_one_store(tmp_path, teacher_dir, prompts_file):
    from distill import generate
    from distill.config import load_config

    base = [f"run_dir={tmp_path}", f"teacher.model={teacher_dir}", f"generate.input={prompts_file}",
            "generate.max_new_tokens=4", "generate.top_k=2", "generate.shard_rows=2"]
    for i in (1, 0):  # any order; each worker only takes its share
        generate(load_config(None, [*base, f"generate.shard={i}/2"]))
    store = tmp_path / "teacher"
    by_worker = {w: {k for p in shard_files(store) if p.name.startswith(w)
                     for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()}
                 for w in ("w000of002-", "w001of002-")}
    assert len(by_worker["w000of002-"]) == len(by_worker["w001of002-"]) == 4
    assert not by_worker["w000of002-"] & by_worker["w001of002-"]
    rows = read_store(store)
    assert [r["index"] for r in rows] == list(range(8))
    assert {r["index"] for r in rows if r["key"] in by_worker["w001of002-"]} == {1, 3, 5, 7}
    # a single worker afterwards (e.g. a rerun without --shard) finds everything done
    generate(load_config(None, base))
    assert len(list(iter_keys(store))) == 8


def test_worker_from_flag_or_launcher_environment():
    import pytest

    from distill.config import ConfigError
    from distill.teachers.generate import worker_shard

    assert worker_shard("2/4", env={"RANK": "0", "WORLD_SIZE": "8"}) == (2, 4)
    assert worker_shard(None, env={"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8)
    assert worker_shard(None, env={"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (1, 2)
    assert worker_shard(None, env={}) == (0, 1)
    for bad in ("4/4", "1-2", "a/b"):
        with pytest.raises(ConfigError, match="generate.shard"):
            worker_shard(bad, env={})


# ---------------------------------------------------------------- store integrity (issue 21)


def _small_generate(tmp_path, teacher_dir, prompts_file, *extra: str):
    from distill.config import load_config

    return load_config(None, [f"run_dir={tmp_path}", f"teacher.model={teacher_dir}", f"generate.input={prompts_file}",
                              "generate.max_new_tokens=3", "generate.top_k=2", "generate.shard_rows=2", *extra])


def test_damaged_shard_advice_is_true(tmp_path, teacher_dir, prompts_file):
    """'remove it and rerun: only its rows are generated again' -- then the store is whole, nothing twice."""
    import pytest

    from distill import generate
    from distill.store import StoreError

    cfg = _small_generate(tmp_path, teacher_dir, prompts_file)
    store = generate(cfg)
    bad = shard_files(store)[1]
    lost = set(pq.read_table(bad, columns=["key"]).column("key").to_pylist())
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    with pytest.raises(StoreError, match="remove it and rerun") as err:
        generate(cfg)
    assert str(bad) in str(err.value)
    from typer.testing import CliRunner

    from distill.cli import app
    from distill.config import save_config

    save_config(cfg, tmp_path / "cfg.yaml")
    res = CliRunner().invoke(app, ["generate", str(tmp_path / "cfg.yaml")])
    assert res.exit_code == 2 and "remove it and rerun" in res.output and "Traceback" not in res.output  # user's to fix
    kept = {p.name for p in shard_files(store) if p != bad}
    bad.unlink()
    generate(cfg)
    (new,) = [p for p in shard_files(store) if p.name not in kept]
    assert set(pq.read_table(new, columns=["key"]).column("key").to_pylist()) == lost  # only its rows
    assert sorted(iter_keys(store)) == sorted({r["key"] for r in read_store(store)}) and len(read_store(store)) == 8


def test_generate_refuses_a_store_another_process_writes(tmp_path, teacher_dir, prompts_file):
    import pytest

    from distill import generate
    from distill.store import Store, StoreError

    cfg = _small_generate(tmp_path, teacher_dir, prompts_file)
    with Store(tmp_path / "teacher"), pytest.raises(StoreError, match=f"process {os.getpid()} is writing"):
        generate(cfg)
    assert shard_files(tmp_path / "teacher") == []


def test_a_teacher_output_that_cannot_be_stored_costs_no_other_row(tmp_path, teacher_dir, prompts_file, monkeypatch):
    """A lone surrogate in one output (an API can send '\\ud800' in valid JSON): that row is named by its
    file:line and left out, the 7 others are stored, and a rerun only retries it."""
    import pytest

    import distill.teachers.generate as gen
    from distill.store import StoreError

    real = gen.store_row

    def store_row(prompt, c, teacher):
        row = real(prompt, c, teacher)
        return {**row, "response": row["response"] + "\ud800"} if prompt.index == 4 else row

    monkeypatch.setattr(gen, "store_row", store_row)
    cfg = _small_generate(tmp_path, teacher_dir, prompts_file)
    with pytest.raises(StoreError, match=r"1 of 8 prompts could not be stored.*prompts.jsonl:5: field 'response'"):
        gen.generate(cfg)
    assert sorted(r["index"] for r in read_store(tmp_path / "teacher")) == [0, 1, 2, 3, 5, 6, 7]
    monkeypatch.undo()
    gen.generate(cfg)
    assert len(read_store(tmp_path / "teacher")) == 8
