"""`distill run`: every stage once, then nothing on rerun, then only what depends on a changed input."""

import json
import sys
from pathlib import Path

import pytest

from distill.config import load_config
from distill.pipeline import StageLog, file_digest, run, stage_fingerprints
from distill.stage_inputs import FIELD_STAGES, OPERATIONAL, schema_fields


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


# ---------------------------------------------------------------- what reruns a stage (issue 18)

# a changed value for every operational field: a new operational field needs one here
OPERATIONAL_CHANGES = {
    "run_dir": None,  # set per test (another directory)
    "teacher.device": "cpu", "teacher.trust_remote_code": True, "teacher.base_url": "http://127.0.0.1:9/v1",
    "teacher.api_key_env": "OTHER_KEY", "teacher.max_concurrency": 3, "teacher.timeout": 5.0,
    "teacher.max_retries": 1, "teacher.retry_base_delay": 2.0, "teacher.retry_max_delay": 9.0,
    "teacher.tensor_parallel_size": 2, "teacher.gpu_memory_utilization": 0.5,
    "generate.batch_size": 3, "generate.shard_rows": 5, "generate.shard": "0/1",
    "train.logging_steps": 3, "train.save_steps": 7, "train.save_total_limit": 5, "train.eval_steps": 4,
    "train.resume": False, "train.report_to": ["tensorboard"], "train.threads": 2,
}


def test_every_config_field_is_classified():
    """A new config field must say which stages it reruns (distill.stage_inputs), or none."""
    assert sorted(set(schema_fields()) - set(FIELD_STAGES)) == []
    assert sorted(set(FIELD_STAGES) - set(schema_fields())) == []
    assert set(OPERATIONAL_CHANGES) == OPERATIONAL


@pytest.mark.parametrize("field", sorted(OPERATIONAL))
def test_operational_field_changes_no_fingerprint(run_cfg, tmp_path, field):
    value = str(tmp_path / "elsewhere") if field == "run_dir" else OPERATIONAL_CHANGES[field]
    tree = run_cfg.model_dump(mode="json")
    section, _, key = field.rpartition(".")
    (tree[section] if section else tree)[key] = value
    assert stage_fingerprints(load_config(tree)) == stage_fingerprints(run_cfg)


def test_operational_training_args_and_student_overrides_change_no_fingerprint(run_cfg):
    changed = load_config(run_cfg.model_dump(mode="json"), [
        "train.args={log_level: info, dataloader_num_workers: 2}", "students.0.train={logging_steps: 7}"])
    assert stage_fingerprints(changed) == stage_fingerprints(run_cfg)


@pytest.mark.parametrize("override, stages", [
    ("generate.top_k=8", {"generate", "train:pruned", "train:small", "eval", "report"}),
    ("generate.temperature=0.7", {"generate", "train:pruned", "train:small", "eval", "report"}),
    ("data.system_prompt=Be brief.", {"generate", "train:pruned", "train:small", "eval", "report"}),
    ("teacher.dtype=float32", {"train:pruned", "train:small", "eval", "report"}),
    ("train.learning_rate=0.01", {"train:pruned", "train:small", "eval", "report"}),
    ("train.args={adam_beta1: 0.8}", {"train:pruned", "train:small", "eval", "report"}),
    ("students.0.train={learning_rate: 0.01}", {"train:pruned", "eval", "report"}),
    ("seed=3", {"train:pruned", "train:small", "eval", "report"}),
    ("eval.max_new_tokens=3", {"eval", "report"}),
    ("generate.seed=5", set()),  # greedy decoding: the seed is not in the store key, nothing changes
])
def test_real_fields_rerun_their_stages(run_cfg, override, stages):
    before = stage_fingerprints(run_cfg)
    after = stage_fingerprints(load_config(run_cfg.model_dump(mode="json"), [override]))
    assert {k for k in before if before[k] != after[k]} == stages


def _fake_stages(monkeypatch) -> dict[str, list[str]]:
    """train/eval/report stand-ins that write the files those stages write and count their calls (these tests
    are about which stages run, not what they compute); generation stays real."""
    import distill.evaluation.evaluate as evaluate_mod
    import distill.reporting.report as report_mod
    import distill.training.train as train_mod

    calls: dict[str, list[str]] = {"train": [], "eval": [], "report": []}

    def write(path: Path, text: str = "x") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def train_student(cfg, s):
        out = Path(cfg.run_dir) / "students" / s.name
        for name in ("config.json", "train_summary.json", "model.safetensors"):
            write(out / name, f"{name} {len(calls['train'])}")
        write(Path(cfg.run_dir) / "checkpoints" / s.name / "checkpoint-1" / "state.json")
        calls["train"].append(f"{Path(cfg.run_dir).name}:{s.name}")
        return out

    def evaluate(cfg):
        write(Path(cfg.run_dir) / "eval" / "results.json", "{}")
        calls["eval"].append(Path(cfg.run_dir).name)

    def report(cfg):
        write(Path(cfg.run_dir) / "report" / "report.md")
        calls["report"].append(Path(cfg.run_dir).name)

    monkeypatch.setattr(train_mod, "train_student", train_student)
    monkeypatch.setattr(evaluate_mod, "evaluate", evaluate)
    monkeypatch.setattr(report_mod, "report", report)
    return calls


def test_operational_changes_rerun_nothing_and_keep_checkpoints(run_cfg, tmp_path, monkeypatch):
    calls = _fake_stages(monkeypatch)
    assert set(run(run_cfg).values()) == {"ran"}
    ckpt = tmp_path / "run" / "checkpoints" / "pruned" / "checkpoint-1"
    changed = load_config(run_cfg.model_dump(mode="json"), [
        "generate.batch_size=2", "generate.shard_rows=3", "teacher.timeout=7", "teacher.max_concurrency=2",
        "train.threads=1", "train.logging_steps=5", "train.save_steps=9", "train.report_to=[all]"])
    assert set(run(changed).values()) == {"skipped"}
    assert ckpt.is_dir() and calls["train"] == ["run:pruned", "run:small"]


def test_two_runs_share_one_store_and_neither_retrains(run_cfg, tmp_path, monkeypatch):
    """Run B generates into run A's store (nothing left to do, so nothing written): A's rerun skips all."""
    from distill.pipeline import outputs_signature

    calls = _fake_stages(monkeypatch)
    store = tmp_path / "shared_store"
    a = load_config(run_cfg.model_dump(mode="json"), [f"generate.store={store}"])
    b = load_config(a.model_dump(mode="json"), [f"run_dir={tmp_path / 'run_b'}"])
    assert set(run(a).values()) == {"ran"}
    before = outputs_signature([store])  # every file but hidden ones (the writer's lock)
    assert len(before) > 3 and any("config.w000of001.yaml" in f for f in before)
    outcome_b = run(b)
    assert outcome_b["train:pruned"] == "ran"  # run B's own students, once
    assert outputs_signature([store]) == before  # nothing left to generate: nothing written
    stages_a = json.loads((Path(a.run_dir) / "stages.json").read_text())
    stages_b = json.loads((Path(b.run_dir) / "stages.json").read_text())
    assert stages_a["generate"]["seconds"] is not None
    assert stages_b["generate"]["seconds"] is None  # B did not pay for the store: no generation cost claimed
    assert set(run(a).values()) == {"skipped"}
    assert set(run(b).values()) == {"skipped"}
    assert calls["train"] == ["run:pruned", "run:small", "run_b:pruned", "run_b:small"]
