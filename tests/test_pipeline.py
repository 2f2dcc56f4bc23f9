"""`distill run`: every stage once, then nothing on rerun, then only what depends on a changed input."""

import json
import sys

import pytest

from distill.config import load_config
from distill.pipeline import StageLog, file_digest, run, stage_fingerprints


@pytest.fixture
def run_cfg(tmp_path, teacher_dir, prompts_file):
    held = tmp_path / "heldout.jsonl"
    held.write_text("\n".join(json.dumps({"prompt": f"Q: {a} + {b}? A:", "answer": str(a + b)})
                              for a, b in [(1, 2), (3, 4), (5, 6)]) + "\n")
    return load_config({
        "run_dir": str(tmp_path / "run"),
        "teacher": {"model": str(teacher_dir)},
        "generate": {"input": str(prompts_file), "max_new_tokens": 6, "top_k": 4, "batch_size": 4},
        "students": [{"name": "pruned", "init": "prune", "num_layers": 2},
                     {"name": "small", "init": "config", "config": {"hidden_size": 32, "intermediate_size": 64,
                                                                     "num_hidden_layers": 1}}],
        "train": {"signal": "offline", "max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1,
                  "losses": [{"name": "forward_kl"}]},
        "eval": {"input": str(held), "max_new_tokens": 4, "latency_requests": 2, "batch_size": 2},
    })


def test_run_skips_unchanged_and_reruns_downstream(run_cfg, tmp_path, monkeypatch):
    first = run(run_cfg)
    assert set(first.values()) == {"ran"}
    run_dir = tmp_path / "run"
    assert (run_dir / "report" / "report.md").exists()
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results["students"]) == {"pruned", "small"}
    weights = run_dir / "students" / "pruned" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    again = run(run_cfg)
    assert set(again.values()) == {"skipped"}
    assert weights.stat().st_mtime_ns == mtime

    # a changed held-out file reruns eval and report only
    held = tmp_path / "heldout.jsonl"
    held.write_text(held.read_text() + json.dumps({"prompt": "Q: 7 + 1? A:", "answer": "8"}) + "\n")
    third = run(run_cfg)
    assert third == {"generate": "skipped", "train:pruned": "skipped", "train:small": "skipped",
                     "eval": "ran", "report": "ran"}

    # a changed training setting reruns training (both students) and what follows, not generation
    changed = load_config(run_cfg.model_dump(mode="json"), ["train.learning_rate=1e-3"])
    fourth = run(changed)
    assert fourth["generate"] == "skipped" and fourth["train:pruned"] == "ran" and fourth["eval"] == "ran"
    assert weights.stat().st_mtime_ns != mtime

    # a stage that crashes is not marked done; the rerun does only that stage
    report_module = sys.modules["distill.reporting.report"]

    def boom(cfg):
        raise RuntimeError("crash in report")

    monkeypatch.setattr(report_module, "report", boom)
    changed_eval = load_config(changed.model_dump(mode="json"), ["eval.max_new_tokens=3"])
    with pytest.raises(RuntimeError, match="crash in report"):
        run(changed_eval)
    log, fps = StageLog(run_dir), stage_fingerprints(changed_eval)
    assert log.done("eval", fps["eval"]) and not log.done("report", fps["report"])
    monkeypatch.undo()
    assert run(changed_eval) == {"generate": "skipped", "train:pruned": "skipped", "train:small": "skipped",
                                 "eval": "skipped", "report": "ran"}


def test_fingerprints_follow_inputs(run_cfg, prompts_file):
    fps = stage_fingerprints(run_cfg)
    before = file_digest(prompts_file)
    prompts_file.write_text(prompts_file.read_text() + json.dumps({"prompt": "Q: new? A:", "answer": "1"}) + "\n")
    assert file_digest(prompts_file) != before
    after = stage_fingerprints(run_cfg)
    assert all(after[k] != fps[k] for k in fps)  # the store feeds everything downstream
    seed_changed = stage_fingerprints(load_config(run_cfg.model_dump(mode="json"), ["seed=1"]))
    assert seed_changed["generate"] == after["generate"] and seed_changed["train:small"] != after["train:small"]
